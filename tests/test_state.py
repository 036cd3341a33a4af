"""disback_core.state: exact resume, atomic saves, verified loads, refusals, kill test."""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import crashing_at

from disback_core import state as st
from disback_core.state import latest_state, list_states, load_state, save_state
from disback_core.storage import StorageError

CFG = {"run": "test", "lr": 1e-2, "hidden": 16, "betas": (0.9, 0.99)}


# --------------------------------------------------------------------------- a tiny run


def build(seed: int = 0, hidden: int = 16, device: str = "cpu") -> dict:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 4)).to(device)
    head = nn.Linear(4, 1).to(device)
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.01)
    sgd = torch.optim.SGD(head.parameters(), lr=1e-2, momentum=0.9)
    return {"modules": {"model": model, "head": head}, "optimizers": {"adamw": adamw, "sgd": sgd},
            "schedulers": {"lambda": torch.optim.lr_scheduler.LambdaLR(adamw, lambda s: 0.9 ** s),
                           "step": torch.optim.lr_scheduler.StepLR(sgd, step_size=2, gamma=0.5)},
            "generators": {"sampler": torch.Generator().manual_seed(100 + seed)}}


DATA = torch.randn(64, 4, generator=torch.Generator().manual_seed(3))


def kw(o: dict) -> dict:
    return {k: o[k] for k in ("modules", "optimizers", "schedulers", "generators")}


def train(o: dict, steps: int) -> list[float]:
    """Each step draws from the sampler, torch's global RNG, numpy's and Python's random."""
    model, head = o["modules"]["model"], o["modules"]["head"]
    dev = next(model.parameters()).device
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, DATA.shape[0], (8,), generator=o["generators"]["sampler"])
        x = DATA[idx] * (1 + random.random()) + float(np.random.standard_normal()) * 0.1 + random.gauss(0, 0.01)
        x = (x + 0.1 * torch.randn_like(x)).to(dev)
        if dev.type == "cuda":
            x = x + 0.1 * torch.randn(x.shape, device=dev)
        y = model(x)
        loss = (y - x.flip(1)).pow(2).mean() + head(y).pow(2).mean()
        for opt in o["optimizers"].values():
            opt.zero_grad()
        loss.backward()
        for opt in o["optimizers"].values():
            opt.step()
        for s in o["schedulers"].values():
            s.step()
        losses.append(loss.item())
    return losses


def params(o: dict) -> dict[str, torch.Tensor]:
    return {f"{n}.{k}": v.detach().clone() for n, m in o["modules"].items() for k, v in m.state_dict().items()}


def files_of(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.fixture
def saved(tmp_path):
    """A run folder with one state at step 3."""
    o = build()
    train(o, 3)
    save_state(tmp_path, step=3, **kw(o), extra={"epoch": 1}, config=CFG)
    return tmp_path, o


# --------------------------------------------------------------------------- exact resume


def test_round_trip_is_bit_exact(tmp_path):
    o = build()
    train(o, 4)
    extra = {"epoch": 2, "backtrack": {"node": 3, "switches": [[10, 4], [20, 3]]}, "pair": (1, "a"),
             "by_int": {0: 1.5, 7: None}, "inf": -math.inf, "ema": torch.arange(3.0)}
    path = save_state(tmp_path, step=4, **kw(o), extra=extra, config=CFG)
    assert path == tmp_path / "step-000000004" and latest_state(tmp_path) == path
    want_losses = train(o, 6)
    want = params(o)

    fresh = build(seed=1)  # other weights, other sampler, other global RNG until the load
    ids = [id(p) for m in fresh["modules"].values() for p in m.parameters()]
    random.seed(9)
    np.random.seed(9)
    out = load_state(tmp_path, **kw(fresh), config=CFG)
    assert out["step"] == 4 and out["path"] == path
    got_extra = dict(out["extra"])
    assert torch.equal(got_extra.pop("ema"), extra["ema"]) and got_extra.pop("inf") == -math.inf
    assert got_extra == {k: v for k, v in extra.items() if k not in ("ema", "inf")}
    assert isinstance(got_extra["pair"], tuple) and list(got_extra["by_int"]) == [0, 7]
    assert [id(p) for m in fresh["modules"].values() for p in m.parameters()] == ids  # restored in place
    assert fresh["optimizers"]["adamw"].param_groups[0]["betas"] == (0.9, 0.99)
    again = save_state(tmp_path / "again", step=4, **kw(fresh), extra=out["extra"],
                       config=CFG)  # the restored objects save to the same bytes
    assert files_of(again) == files_of(path)
    assert train(fresh, 6) == want_losses
    got = params(fresh)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_same_state_gives_same_bytes_and_resave_keeps_the_good_one(tmp_path):
    o = build()
    train(o, 2)
    a = save_state(tmp_path / "a", step=2, **kw(o), extra={"x": (1, 2)}, config=CFG)
    b = save_state(tmp_path / "b", step=2, **kw(o), extra={"x": (1, 2)}, config=CFG)
    first = files_of(a)
    assert first == files_of(b)
    again = save_state(tmp_path / "a", step=2, **kw(o), extra={"x": (1, 2)}, config=CFG)  # re-save, same step
    assert again == a and files_of(a) == first
    assert sorted(os.listdir(tmp_path / "a")) == ["latest.json", "step-000000002"]
    train(o, 1)  # a different state saved again at step 2 replaces the old one
    save_state(tmp_path / "a", step=2, **kw(o), config=CFG)
    fresh = build(seed=1)
    load_state(tmp_path / "a", **kw(fresh), config=CFG)
    assert all(torch.equal(v, params(o)[k]) for k, v in params(fresh).items())
    assert sorted(os.listdir(tmp_path / "a")) == ["latest.json", "step-000000002"]


def test_keep_latest_and_stray_temporaries(tmp_path):
    o = build()
    for step in range(1, 6):
        train(o, 1)
        save_state(tmp_path, step=step, **kw(o), config=CFG, keep=2)
    assert list_states(tmp_path) == [4, 5]
    assert latest_state(tmp_path) == tmp_path / "step-000000005"
    assert json.loads((tmp_path / "latest.json").read_text())["directory"] == "step-000000005"
    # a crashed save: a half-written temporary folder, a temporary pointer file
    stray = tmp_path / ".step-000000006.tmp-424242"
    stray.mkdir()
    (stray / "module-model.safetensors").write_bytes(b"half")
    (tmp_path / ".latest.json.tmp-424242").write_text("{")
    with pytest.raises(StorageError, match="no manifest.json"):
        load_state(stray, **kw(build()), config=CFG)
    save_state(tmp_path, step=6, **kw(o), config=CFG, keep=3)
    assert sorted(os.listdir(tmp_path)) == ["latest.json", "step-000000004", "step-000000005", "step-000000006"]
    # resumed from step 4: the later steps (an abandoned future) go, the older ones stay up to keep
    load_state(tmp_path / "step-000000004", **kw(o), config=CFG)
    save_state(tmp_path, step=5, **kw(o), config=CFG, keep=3)
    assert list_states(tmp_path) == [4, 5] and latest_state(tmp_path) == tmp_path / "step-000000005"


def test_crash_inside_a_resave_leaves_a_complete_live_state(tmp_path, monkeypatch):
    o = build()
    train(o, 2)
    save_state(tmp_path, step=2, **kw(o), config=CFG)
    train(o, 1)
    want = params(o)

    def boom(*a, **k):
        raise RuntimeError("killed")

    monkeypatch.setattr(st, "_link_copy", boom)  # after the first switch, with the old folder moved aside
    with pytest.raises(RuntimeError, match="killed"):
        save_state(tmp_path, step=2, **kw(o), config=CFG)
    assert not (tmp_path / "step-000000002").exists()
    fresh = build(seed=1)
    assert load_state(tmp_path, **kw(fresh), config=CFG)["path"].name.startswith(".step-000000002.tmp-")
    assert all(torch.equal(v, want[k]) for k, v in params(fresh).items())
    monkeypatch.undo()
    monkeypatch.setattr(st, "_write_pointer", boom)  # a new step folder renamed into place, never switched to
    with pytest.raises(RuntimeError, match="killed"):
        save_state(tmp_path, step=3, **kw(o), config=CFG)
    assert load_state(tmp_path, **kw(fresh), config=CFG)["step"] == 2
    monkeypatch.undo()
    save_state(tmp_path, step=3, **kw(o), config=CFG)
    assert sorted(os.listdir(tmp_path)) == ["latest.json", "step-000000002", "step-000000003"]
    assert load_state(tmp_path, **kw(fresh), config=CFG)["step"] == 3


def test_ranks_write_their_own_rng_files(tmp_path):
    o = build()
    train(o, 1)
    bar = threading.Barrier(2)
    errors = []

    def save(rank):
        try:
            save_state(tmp_path, step=1, **kw(o), config=CFG, rank=rank, world_size=2, barrier=bar.wait)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)
            bar.abort()

    threads = [threading.Thread(target=save, args=(r,)) for r in (0, 1)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors
    d = tmp_path / "step-000000001"
    assert {"rng-rank0.safetensors", "rng-rank0.json", "rng-rank1.safetensors", "rng-rank1.json"} <= set(os.listdir(d))
    assert load_state(tmp_path, **kw(build()), config=CFG, rank=1, world_size=2)["step"] == 1
    with pytest.raises(StorageError, match="world size 2; this run has world size 1"):
        load_state(tmp_path, **kw(build()), config=CFG)
    (d / "rng-rank1.safetensors").unlink()
    with pytest.raises(StorageError, match="rng-rank1.safetensors is missing"):
        load_state(tmp_path, **kw(build()), config=CFG, rank=0, world_size=2)
    with pytest.raises(ValueError, match="needs barrier"):
        save_state(tmp_path, step=2, **kw(o), config=CFG, rank=0, world_size=2)


_CRASH_POINTS = ("save_tensors", "_write_new", "_replace_file", "_fsync_dir", "_link_copy", "_remove")


def _save_crashing_at(k: int, folder: Path, o: dict, step: int) -> bool:
    """Save in a forked child that dies (``os._exit``: no cleanup runs, like SIGKILL) just before its
    k-th file-system operation of the state module (writes, fsyncs, renames, removals, switches);
    returns whether the save completed first."""
    missing = [name for name in _CRASH_POINTS if not hasattr(st, name)]
    assert not missing, f"crash points {missing} are gone from disback_core.state: update _CRASH_POINTS"
    targets = [(st, name) for name in _CRASH_POINTS] + [(st.os, "rename")]
    return crashing_at(k, targets, lambda: save_state(folder, step=step, **kw(o), config=CFG, keep=2))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize("case", ["next step", "re-save of the live step"])
def test_a_crash_at_every_point_of_a_save_leaves_the_old_or_the_new_state(tmp_path, case):
    old = build()
    train(old, 2)
    template = tmp_path / "template"
    save_state(template, step=1, **kw(old), config=CFG, keep=2)
    save_state(template, step=2, **kw(old), config=CFG, keep=2)
    new = build()
    train(new, 3)  # another state, saved at step 3 or again at step 2
    step = 3 if case == "next step" else 2
    completed, k = False, 0
    while not completed:
        k += 1
        folder = tmp_path / f"crash-{k}"
        shutil.copytree(template, folder)
        completed = _save_crashing_at(k, folder, new, step)
        fresh = build(seed=1)
        got = load_state(folder, **kw(fresh), config=CFG)
        now = params(fresh)
        is_old = all(torch.equal(now[n], v) for n, v in params(old).items())
        is_new = all(torch.equal(now[n], v) for n, v in params(new).items())
        assert (is_old and got["step"] == 2) or (is_new and got["step"] == step), (k, got)
        assert is_new or not completed, k
        for s in list_states(folder):  # a step folder is never partial
            load_state(folder / f"step-{s:09d}", **kw(build()), config=CFG)
        save_state(folder, step=step, **kw(new), config=CFG, keep=2)  # the next save repairs everything
        assert sorted(os.listdir(folder)) == ["latest.json", *(f"step-{s:09d}" for s in sorted({1, 2, step})[-2:])]
        assert load_state(folder, **kw(build(seed=1)), config=CFG)["step"] == step
    assert k >= (15 if case == "next step" else 20), k  # that many crash points were tried


# --------------------------------------------------------------------------- refusals


def test_another_run_configuration_is_refused(saved):
    folder, _ = saved
    with pytest.raises(StorageError, match=r"another run configuration.*lr: 0.01 in the state, 0.02 given"):
        load_state(folder, **kw(build()), config={**CFG, "lr": 2e-2})
    with pytest.raises(StorageError, match=r"extra_key \(only in the given config\)"):
        load_state(folder, **kw(build()), config={**CFG, "extra_key": 1})


@pytest.mark.parametrize("name", ["manifest.json", "module-model.safetensors", "module-head.safetensors",
                                  "optimizer-adamw.safetensors", "optimizer-sgd.safetensors",
                                  "rng-rank0.safetensors", "rng-rank0.json"])
@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_file_is_refused_before_anything_is_restored(saved, name, damage):
    folder, _ = saved
    path = folder / "step-000000003" / name
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
    else:
        del data[-7:]
    path.write_bytes(bytes(data))
    fresh = build(seed=1)
    before, rng, gen = params(fresh), torch.get_rng_state(), fresh["generators"]["sampler"].get_state()
    with pytest.raises(StorageError, match=name.replace(".", r"\.")) as e:
        load_state(folder, **kw(fresh), config=CFG)
    assert ("sha256" in str(e.value)) or ("truncated" in str(e.value))
    assert all(torch.equal(v, before[k]) for k, v in params(fresh).items())  # nothing restored
    assert torch.equal(torch.get_rng_state(), rng) and torch.equal(fresh["generators"]["sampler"].get_state(), gen)
    assert not fresh["optimizers"]["adamw"].state


def test_missing_and_unfitting_modules_are_refused(saved):
    folder, _ = saved
    d = folder / "step-000000003"
    fresh = build(seed=1)
    before = params(fresh)
    other = build(seed=1, hidden=8)
    with pytest.raises(StorageError, match=r"module-model.safetensors: module 'model' does not fit.*'0\.weight'"
                                           r".*\[16, 4\] in the file.*\[8, 4\] in the module"):
        load_state(folder, modules={**fresh["modules"], "model": other["modules"]["model"]},
                   **{k: v for k, v in kw(fresh).items() if k != "modules"}, config=CFG)
    assert all(torch.equal(v, before[k]) for k, v in params(fresh).items())  # head untouched: nothing half-restored
    with pytest.raises(StorageError, match="'bogus' is not in the state"):
        load_state(folder, **{**kw(fresh), "modules": {**fresh["modules"], "bogus": nn.Linear(1, 1)}}, config=CFG)
    with pytest.raises(StorageError, match="holds modules 'head', which was not passed"):
        load_state(folder, **{**kw(fresh), "modules": {"model": fresh["modules"]["model"]}}, config=CFG)
    (d / "module-head.safetensors").unlink()
    with pytest.raises(StorageError, match="module-head.safetensors is missing"):
        load_state(folder, **kw(fresh), config=CFG)


def test_an_optimizer_over_other_parameters_is_refused(saved):
    folder, _ = saved
    fresh = build(seed=1)
    m = fresh["modules"]["model"]
    swapped = torch.optim.AdamW([m[2].weight, m[2].bias, m[0].weight, m[0].bias], lr=1e-2)
    with pytest.raises(StorageError, match=r"optimizer 'adamw': parameter 0 is \['model.0.weight'"):
        load_state(folder, **{**kw(fresh), "optimizers": {**fresh["optimizers"], "adamw": swapped}}, config=CFG)


@pytest.mark.parametrize("directory, problem", [
    ("../elsewhere/step-000000003", "not a step folder inside"),
    ("/tmp/step-000000003", "not a step folder inside"),
    ("step-000000099", "which does not exist"),
])
def test_a_bad_latest_pointer_is_refused(saved, directory, problem):
    folder, _ = saved
    ptr = json.loads((folder / "latest.json").read_text())
    ptr.update(directory=directory, step=99 if directory.endswith("99") else 3)
    (folder / "latest.json").write_text(json.dumps(ptr))
    with pytest.raises(StorageError, match=f"latest.json.*{problem}"):
        load_state(folder, **kw(build()), config=CFG)


def test_a_symlinked_step_folder_and_no_state_are_refused(saved, tmp_path_factory):
    folder, _ = saved
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    os.rename(folder / "step-000000003", elsewhere / "step-000000003")
    os.symlink(elsewhere / "step-000000003", folder / "step-000000003")
    with pytest.raises(StorageError, match="not a folder"):
        load_state(folder, **kw(build()), config=CFG)
    with pytest.raises(StorageError, match="no state was saved there"):
        load_state(tmp_path_factory.mktemp("empty"), **kw(build()), config=CFG)
    assert latest_state(tmp_path_factory.mktemp("none")) is None


def test_bad_arguments_name_themselves(tmp_path):
    o = build()
    with pytest.raises(TypeError, match=r"extra\['fn'\] is a function"):
        save_state(tmp_path, step=1, **kw(o), extra={"fn": lambda: 0}, config=CFG)
    with pytest.raises(ValueError, match="step must be an integer"):
        save_state(tmp_path, step=-1, **kw(o), config=CFG)
    with pytest.raises(ValueError, match="modules: name '../x'"):
        save_state(tmp_path, step=1, modules={"../x": nn.Linear(1, 1)}, config=CFG)
    with pytest.raises(TypeError, match=r"config\['t'\] is a tensor"):
        save_state(tmp_path, step=1, **kw(o), config={"t": torch.ones(1)})
    assert not tmp_path.exists() or os.listdir(tmp_path) == []


def test_no_pickle_in_the_state_module():
    import re

    src = Path(st.__file__).read_text()
    assert not re.search(r"^\s*(import|from)\s+(c?pickle|dill)\b|\bpickle\.|torch\.load\(", src, re.M)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_round_trip_restores_cuda_rng(tmp_path):
    o = build(device="cuda")
    train(o, 3)
    save_state(tmp_path, step=3, **kw(o), config=CFG)
    want_losses, want = train(o, 4), params(o)
    fresh = build(seed=1, device="cuda")
    torch.cuda.manual_seed_all(5)
    load_state(tmp_path, **kw(fresh), config=CFG)
    assert train(fresh, 4) == want_losses
    assert all(torch.equal(v, want[k]) for k, v in params(fresh).items())


# --------------------------------------------------------------------------- kill test


def test_sigkill_during_training_and_saves_never_loses_the_last_state(tmp_path):
    """12 SIGKILLs at seeded random points of a worker that saves after every step (6.75 MiB states)."""
    from _resume_worker import kill_campaign

    r = kill_campaign(tmp_path, kills=12, seed=0, steps=40, pad=768, keep=2)
    assert r["kills"] == 12 and r["worker_finished_early"] == 0, r
    assert r["kills_mid_save"] >= 3 and r["kills_mid_step"] >= 1 and r["resave_runs"] >= 1, r
    assert r["loads_after_kill_failed"] == 0 and r["loads_after_kill_ok"] + r["kills_before_first_save"] == 12, r
    assert r["partial_accepted"] == 0 and r["step_dirs_refused"] == 0 and not r["failures"], r
    assert r["losses_equal"] == r["losses_checked"] > 40, r
    assert r["final_params_equal"] and r["final_resume_from_step"] > 0, r
    assert r["stray_entries"] == [] and r["missing_entries"] == [], r
