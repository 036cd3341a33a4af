"""disback_core.sharded_state: FSDP2 states sharded through torch.distributed.checkpoint, resharded
across world sizes bit for bit, verified before anything is restored, refusals, fuzz, SIGKILLs."""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _sharded_run import CFG, build, differences, full_state, kw, train_step

from disback_core import sharded_state as sh
from disback_core.sharded_state import FORMAT, load_sharded_state, save_sharded_state
from disback_core.state import latest_state, list_states, load_state
from disback_core.storage import StorageError, body_digest, load_tensors, save_tensors, sha256_file

torch.set_num_threads(1)
WORLD = 2
EXTRA = {"epoch": 1, "pair": (1, 2), "t": torch.arange(3)}


def _sampler(seed: int) -> torch.Generator:
    g = torch.Generator().manual_seed(seed)
    torch.randn(5, generator=g)  # a used generator, not a freshly seeded one
    return g


def _refused(fn: Any) -> str | None:
    try:
        fn()
    except (StorageError, ValueError) as e:
        return f"{type(e).__name__}: {e}"
    return None


# --------------------------------------------------------------------------- world size 2 (gloo, CPU)


def _dist_worker(rank: int, tmp: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=WORLD)
    res: dict[str, Any] = {}
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (WORLD,))

        def dump(name: str, o: dict) -> None:
            s = full_state(o)  # collective
            if rank == 0:
                save_tensors(tmp / f"{name}.safetensors", s)

        # the uninterrupted FSDP2 run: three steps, a save, a fourth step
        o = build(mesh=mesh)
        for k in (1, 2, 3):
            train_step(o, k)
        gens = {"sampler": _sampler(50 + rank)}
        save_sharded_state(tmp / "ws2", step=3, **kw(o), generators=gens, extra=EXTRA, config=CFG)
        saved_gen, saved_rng = gens["sampler"].get_state(), torch.get_rng_state()
        dump("ws2-saved", o)
        train_step(o, 4)
        dump("ws2-step4", o)

        # 2 -> 2: another initialisation, RNG moved on; everything restored, per-rank RNGs included
        o2, g2 = build(seed=1, mesh=mesh), {"sampler": torch.Generator()}
        torch.manual_seed(1234)
        r = load_sharded_state(tmp / "ws2", **kw(o2), generators=g2, config=CFG)
        res["2to2"] = {
            "step": r["step"],
            "world_size": r["world_size"],
            "rng_restored": r["rng_restored"],
            "generator": torch.equal(g2["sampler"].get_state(), saved_gen),
            "torch_rng": torch.equal(torch.get_rng_state(), saved_rng),
            "extra": repr(r["extra"]),
        }
        dump("2to2-loaded", o2)
        train_step(o2, 4)
        dump("2to2-step4", o2)

        # 1 -> 2: the plain world-size-1 state into FSDP2 modules
        o3 = build(seed=1, mesh=mesh)
        r = load_sharded_state(tmp / "ws1", **kw(o3), config=CFG)
        res["1to2"] = {"step": r["step"], "world_size": r["world_size"], "rng_restored": r["rng_restored"]}
        dump("1to2-loaded", o3)
        train_step(o3, 4)
        dump("1to2-step4", o3)

        # refusals: on every rank, before anything is restored
        res["other_shapes"] = _refused(
            lambda: load_sharded_state(tmp / "ws2", **kw(build(width=17, mesh=mesh)), config=CFG, strict=False)
        )
        res["generators_at_other_world_size"] = _refused(
            lambda: load_sharded_state(
                tmp / "ws1", **kw(build(mesh=mesh)), generators={"sampler": torch.Generator()}, config=CFG
            )
        )
        o4 = build(seed=2, mesh=mesh)
        before = full_state(o4)
        res["one_rank_other_config"] = _refused(
            lambda: load_sharded_state(
                tmp / "ws2", **kw(o4), config=CFG if rank == 0 else {**CFG, "lr": 0.5}, strict=False
            )
        )
        if rank == 0:
            shutil.copytree(tmp / "ws2", tmp / "ws2-bad")
            shard = next((tmp / "ws2-bad").glob("step-*/shard-00002-*"))
            data = bytearray(shard.read_bytes())
            data[-3] ^= 0x10
            shard.write_bytes(bytes(data))
        dist.barrier()
        res["corrupt_shard"] = _refused(lambda: load_sharded_state(tmp / "ws2-bad", **kw(o4), config=CFG, strict=False))
        res["untouched_after_refusals"] = not differences(full_state(o4), before)
        res["save_other_step_on_one_rank"] = _refused(
            lambda: save_sharded_state(tmp / "ws2-odd", step=5 + rank, **kw(o), config=CFG)
        )

        # keep-K at world size 2, and what a step folder holds
        for k in (5, 6, 7):
            train_step(o, k)
            save_sharded_state(tmp / "ws2-keep", step=k, **kw(o), config=CFG, keep=2)
        res["keep"] = sorted(os.listdir(tmp / "ws2-keep"))
        res["odd_folder"] = sorted(os.listdir(tmp / "ws2-odd")) if (tmp / "ws2-odd").exists() else []
        dist.barrier()
    finally:
        (tmp / f"result-{rank}.json").write_text(json.dumps(res))
        dist.destroy_process_group()


def _spawn(fn: Any, args: tuple, timeout: float = 300) -> None:
    ctx = mp.start_processes(fn, args=args, nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise TimeoutError(f"the {WORLD} ranks did not finish within {timeout} s")


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    """A world-size-1 plain run saved at step 3, then one spawn of two FSDP2 ranks (saves at 2, loads
    of both states at 2, refusals); returns the folders, full states and each rank's results."""
    tmp = tmp_path_factory.mktemp("matrix")
    o = build()
    for k in (1, 2, 3):
        train_step(o, k)
    gens = {"sampler": _sampler(50)}
    save_sharded_state(tmp / "ws1", step=3, **kw(o), generators=gens, extra=EXTRA, config=CFG)
    ws1 = {"saved": full_state(o), "gen": gens["sampler"].get_state(), "rng": torch.get_rng_state()}
    train_step(o, 4)
    ws1["step4"] = full_state(o)
    t0 = time.perf_counter()
    _spawn(_dist_worker, (tmp,))
    results = [json.loads((tmp / f"result-{r}.json").read_text()) for r in range(WORLD)]
    dumps = {p.stem: load_tensors(p) for p in tmp.glob("*.safetensors")}
    return {"tmp": tmp, "ws1": ws1, "dumps": dumps, "results": results, "spawn_seconds": time.perf_counter() - t0}


def test_fsdp2_at_two_and_plain_at_one_are_the_same_run(matrix):
    """The reference for the matrix: three and four steps of the FSDP2 run equal the plain run's bit for bit."""
    d = matrix["dumps"]
    assert differences(d["ws2-saved"], matrix["ws1"]["saved"]) == []
    assert differences(d["ws2-step4"], matrix["ws1"]["step4"]) == []
    print(f"spawn of {WORLD} ranks: {matrix['spawn_seconds']:.1f} s")


def test_reshard_2_to_2_restores_everything(matrix):
    d = matrix["dumps"]
    assert differences(d["2to2-loaded"], d["ws2-saved"]) == []  # weights, buffers, Adam and SGD state, lrs
    assert differences(d["2to2-step4"], d["ws2-step4"]) == []  # the next step equals the uninterrupted run's
    for r in matrix["results"]:
        assert r["2to2"] == {
            "step": 3,
            "world_size": 2,
            "rng_restored": True,
            "generator": True,
            "torch_rng": True,
            "extra": repr(EXTRA),
        }, r


def test_reshard_1_to_2_into_fsdp2(matrix):
    d = matrix["dumps"]
    assert differences(d["1to2-loaded"], matrix["ws1"]["saved"]) == []
    assert differences(d["1to2-step4"], matrix["ws1"]["step4"]) == []
    for r in matrix["results"]:
        assert r["1to2"] == {"step": 3, "world_size": 1, "rng_restored": False}, r


def test_reshard_2_to_1_into_plain_modules(matrix):
    o = build(seed=1)
    r = load_sharded_state(matrix["tmp"] / "ws2", **kw(o), config=CFG)
    assert (r["step"], r["world_size"], r["rng_restored"]) == (3, 2, False)
    assert repr(r["extra"]) == repr(EXTRA)
    assert differences(full_state(o), matrix["dumps"]["ws2-saved"]) == []
    train_step(o, 4)
    assert differences(full_state(o), matrix["dumps"]["ws2-step4"]) == []


def test_reshard_1_to_1_restores_rng_and_generators(matrix):
    o, g = build(seed=1), {"sampler": torch.Generator()}
    torch.manual_seed(777)
    r = load_sharded_state(matrix["tmp"] / "ws1", **kw(o), generators=g, config=CFG)
    assert (r["step"], r["world_size"], r["rng_restored"]) == (3, 1, True)
    assert torch.equal(g["sampler"].get_state(), matrix["ws1"]["gen"])
    assert torch.equal(torch.get_rng_state(), matrix["ws1"]["rng"])
    assert differences(full_state(o), matrix["ws1"]["saved"]) == []
    train_step(o, 4)
    assert differences(full_state(o), matrix["ws1"]["step4"]) == []


def test_refusals_and_keep_at_world_size_2(matrix):
    r0, r1 = matrix["results"]
    for r in (r0, r1):
        assert re.search(
            r"StorageError: .*module 'net' does not fit the state: 'a.weight' is F32 \[16, 6\] in the "
            r"state, torch.float32 \[17, 6\] in the module",
            r["other_shapes"],
        ), r
        assert "per-rank generator states cannot be given to other ranks" in r["generators_at_other_world_size"]
        assert re.search(
            r"state file .*shard-00002-model-00001-of-00001.safetensors fails its sha256", r["corrupt_shard"]
        ), r
        assert r["untouched_after_refusals"] and r["odd_folder"] == []
        assert "not the same on every rank" in r["save_other_step_on_one_rank"]
        assert r["keep"] == ["latest.json", "step-000000006", "step-000000007"], r
    assert "another run configuration" not in r0["one_rank_other_config"]  # rank 0's config matches ...
    assert "another rank refused this state" in r0["one_rank_other_config"]  # ... it raises with rank 1
    assert (
        "another run configuration" in r1["one_rank_other_config"]
        and "lr: 0.01 in the state, 0.5" in r1["one_rank_other_config"]
    )


def test_step_folder_layout_and_manifest_list_every_file(matrix):
    step_dir = matrix["tmp"] / "ws2" / "step-000000003"
    m = json.loads((step_dir / "manifest.json").read_text())
    assert m["format"] == FORMAT and m["world_size"] == 2 and m["step"] == 3
    assert m["shards"] == [
        "shard-00001-model-00001-of-00001.safetensors",
        "shard-00002-model-00001-of-00001.safetensors",
    ]
    assert sorted(os.listdir(step_dir)) == sorted([*m["files"], "manifest.json"])  # no DCP .metadata, no pickle
    assert set(m["files"]) == {
        *m["shards"],
        "extra.safetensors",
        *(f"rng-rank{r}.{x}" for r in (0, 1) for x in ("json", "safetensors")),
    }
    for name, e in m["files"].items():
        assert e == {"sha256": sha256_file(step_dir / name), "size": (step_dir / name).stat().st_size}
    assert m["modules"]["net"]["tensors"]["a.weight"] == ["F32", [16, 6]]  # global shapes, not shards
    assert m["digest"] == body_digest(m)
    assert latest_state(matrix["tmp"] / "ws2") == step_dir and list_states(matrix["tmp"] / "ws2") == [3]


# --------------------------------------------------------------------------- world size 1: keep, refusals


@pytest.fixture
def saved(tmp_path):
    o = build()
    for k in (1, 2, 3):
        train_step(o, k)
    save_sharded_state(tmp_path / "run", step=3, **kw(o), extra=EXTRA, config=CFG)
    return tmp_path / "run", full_state(o)


def test_keep_resave_and_rewind(tmp_path):
    o = build()
    states = {}
    for k in range(1, 6):
        train_step(o, k)
        save_sharded_state(tmp_path, step=k, **kw(o), config=CFG, keep=2)
        states[k] = full_state(o)
    assert sorted(os.listdir(tmp_path)) == ["latest.json", "step-000000004", "step-000000005"]
    (tmp_path / ".step-000000009.tmp-123").mkdir()  # a stray temporary folder of a killed save
    other = build(seed=5)
    train_step(other, 9)
    save_sharded_state(tmp_path, step=5, **kw(other), config=CFG, keep=2)  # a re-save of the live step
    assert sorted(os.listdir(tmp_path)) == ["latest.json", "step-000000004", "step-000000005"]
    o2 = build(seed=1)
    assert load_sharded_state(tmp_path, **kw(o2), config=CFG)["step"] == 5
    assert differences(full_state(o2), full_state(other)) == []
    o3 = build(seed=1)
    load_sharded_state(tmp_path / "step-000000004", **kw(o3), config=CFG)  # an older step, loaded directly
    assert differences(full_state(o3), states[4]) == []
    save_sharded_state(tmp_path, step=3, **kw(o3), config=CFG, keep=2)  # a rewind drops the abandoned future
    assert sorted(os.listdir(tmp_path)) == ["latest.json", "step-000000003"]


def test_a_module_of_other_shapes_is_refused(saved):
    folder, _ = saved
    o = build(seed=1, width=17)
    before = full_state(o)
    with pytest.raises(
        StorageError,
        match=r"module 'net' does not fit the state: 'a.weight' is F32 \[16, 6\] in "
        r"the state, torch.float32 \[17, 6\] in the module",
    ):
        load_sharded_state(folder, **kw(o), config=CFG)
    assert differences(full_state(o), before) == []


def test_a_missing_or_corrupted_shard_and_an_edited_manifest_are_refused(saved):
    folder, _ = saved
    step_dir = folder / "step-000000003"
    shard = step_dir / "shard-00001-model-00001-of-00001.safetensors"
    data = shard.read_bytes()
    o = build(seed=1)
    before = full_state(o)
    shard.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    with pytest.raises(StorageError, match=r"shard-00001-model-00001-of-00001.safetensors fails its sha256 check"):
        load_sharded_state(folder, **kw(o), config=CFG)
    shard.unlink()
    with pytest.raises(StorageError, match=r"shard-00001-model-00001-of-00001.safetensors is missing"):
        load_sharded_state(folder, **kw(o), config=CFG)
    shard.write_bytes(data)
    mpath = step_dir / "manifest.json"
    m = json.loads(mpath.read_text())
    m["modules"]["net"]["tensors"]["a.weight"] = ["F32", [16, 7]]
    mpath.write_text(json.dumps(m))
    with pytest.raises(StorageError, match=r"manifest .* fails the sha256 recorded in latest.json"):
        load_sharded_state(folder, **kw(o), config=CFG)
    with pytest.raises(StorageError, match=r"its digest does not match its content"):
        load_sharded_state(step_dir, **kw(o), config=CFG)  # a step folder loaded directly: its digest
    assert differences(full_state(o), before) == []


def test_another_configuration_and_other_formats_are_refused(saved, tmp_path):
    folder, _ = saved
    with pytest.raises(StorageError, match=r"another run configuration.*differing keys: lr: 0.01 in the state, 0.02"):
        load_sharded_state(folder, **kw(build(seed=1)), config={**CFG, "lr": 0.02})
    with pytest.raises(StorageError, match="not a disback-state manifest"):
        load_state(folder, **kw(build(seed=1)), config=CFG)
    from disback_core.state import save_state

    save_state(tmp_path / "full", step=1, **kw(build()), config=CFG)
    with pytest.raises(StorageError, match=r"not a disback-sharded-state manifest \(a gathered full state: load it"):
        load_sharded_state(tmp_path / "full", **kw(build(seed=1)), config=CFG)
    o = build(seed=1)
    o["optimizers"]["adam"] = torch.optim.Adam(list(o["modules"]["net"].parameters())[::-1])
    with pytest.raises(StorageError, match=r"optimizer 'adam': parameter 0 is \['net', 'a.weight', \[16, 6\]\]"):
        load_sharded_state(folder, **kw(o), config=CFG)


def test_tied_and_strided_parameters_round_trip(tmp_path):
    def tied(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(seed)
        m = torch.nn.Sequential(torch.nn.Embedding(5, 4), torch.nn.Linear(4, 5, bias=False))
        m[1].weight = m[0].weight  # one tensor under two names
        m.register_parameter("t", torch.nn.Parameter(torch.randn(3, 4).t()))  # not contiguous
        return m, torch.optim.Adam(m.parameters())

    m, opt = tied(0)
    (m[1](m[0](torch.tensor([1, 2]))).sum() + m.t.sum()).backward()
    opt.step()
    save_sharded_state(tmp_path, step=1, modules={"m": m}, optimizers={"o": opt}, config={})
    m2, opt2 = tied(1)
    load_sharded_state(tmp_path, modules={"m": m2}, optimizers={"o": opt2}, config={})
    assert m2[1].weight is m2[0].weight
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))
    for s1, s2 in zip(opt.state_dict()["state"].values(), opt2.state_dict()["state"].values()):
        assert all(torch.equal(s1[k], s2[k]) for k in s1)


def test_bad_arguments_name_themselves(tmp_path):
    o = build()
    with pytest.raises(ValueError, match="step must be an integer"):
        save_sharded_state(tmp_path, step=-1, **kw(o), config=CFG)
    with pytest.raises(TypeError, match=r"extra\['bad'\] is a object"):
        save_sharded_state(tmp_path, step=1, **kw(o), extra={"bad": object()}, config=CFG)
    assert not tmp_path.joinpath("latest.json").exists() and list(tmp_path.iterdir()) == []


def test_no_pickle_on_the_load_path(matrix, monkeypatch):
    src = Path(sh.__file__).read_text()
    assert not re.search(r"^\s*(import|from)\s+(c?pickle|dill)\b|\bpickle\.|torch\.load\(", src, re.M)

    def refuse(*a, **k):
        raise AssertionError("pickle or torch.load used while loading")

    for mod, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(mod, name, refuse)
    for run in ("ws1", "ws2"):
        o = build(seed=1)
        load_sharded_state(
            matrix["tmp"] / run, **kw(o), generators={"sampler": torch.Generator()} if run == "ws1" else {}, config=CFG
        )
        assert differences(full_state(o), matrix["ws1"]["saved"]) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_round_trip_restores_cuda_state_and_rng(tmp_path):
    o = build(device="cuda")
    for k in (1, 2, 3):
        train_step(o, k)
    torch.cuda.manual_seed_all(11)
    save_sharded_state(tmp_path, step=3, **kw(o), config=CFG)
    saved, cuda_rng = full_state(o), torch.cuda.get_rng_state_all()
    torch.cuda.manual_seed_all(12)
    o2 = build(seed=1, device="cuda")
    assert load_sharded_state(tmp_path, **kw(o2), config=CFG)["rng_restored"]
    assert all(torch.equal(a, b) for a, b in zip(torch.cuda.get_rng_state_all(), cuda_rng))
    assert differences(full_state(o2), saved) == []
    assert all(p.is_cuda for m in o2["modules"].values() for p in m.parameters())
    train_step(o, 4)
    train_step(o2, 4)
    assert differences(full_state(o2), full_state(o)) == []


# --------------------------------------------------------------------------- fuzz


def _flip(p: Path, rng: random.Random, head: bool) -> None:
    data = bytearray(p.read_bytes())
    if not data:
        data = bytearray(b"x")
    i = rng.randrange(min(len(data), 64) if head else len(data))
    data[i] ^= rng.randrange(1, 256)
    p.write_bytes(bytes(data))


def _file_cases(names: list[str]) -> list[tuple[str, str]]:
    kinds = [
        "flip-head",
        "flip-any",
        "flip-any",
        "truncate",
        "truncate-0",
        "extend",
        "delete",
        "rename",
        "swap",
        "symlink",
    ]
    return [(n, k) for n in names for k in kinds]


def _apply_file_case(run: Path, name: str, kind: str, rng: random.Random) -> None:
    step_dir = next(run.glob("step-*"))
    p = run / name if name == "latest.json" else step_dir / name
    if kind.startswith("flip"):
        _flip(p, rng, kind == "flip-head")
    elif kind == "truncate":
        p.write_bytes(p.read_bytes()[: rng.randrange(max(1, p.stat().st_size))])
    elif kind == "truncate-0":
        p.write_bytes(b"")
    elif kind == "extend":
        p.write_bytes(p.read_bytes() + bytes([rng.randrange(256)]))
    elif kind == "delete":
        p.unlink()
    elif kind == "rename":
        p.rename(p.with_name(p.name + ".bak"))
    elif kind == "swap":  # with another file of the folder
        others = sorted(q for q in step_dir.iterdir() if q.is_file() and q != p)
        q = rng.choice(others)
        tmp = p.with_name(".swap")
        p.rename(tmp)
        q.rename(p)
        tmp.rename(q)
    elif kind == "symlink":  # the same bytes behind a symlink
        copy = p.with_name(".copy-" + p.name)
        shutil.copyfile(p, copy)
        p.unlink()
        p.symlink_to(copy.name)


# manifest fields edited (then saved with a fresh digest and latest.json's sha256 updated, or left
# stale): structural fields, which a load must refuse or find harmless. Values the manifest is the
# only record of (extra, the schedulers' state, param_groups' values) are not among them.
_EDITS: list[tuple[str, Any]] = [
    ("format", lambda m: m.update(format="disback-state")),
    ("version", lambda m: m.update(version=2)),
    ("step", lambda m: m.update(step=4)),
    ("world_size down", lambda m: m.update(world_size=m["world_size"] - 1)),
    ("world_size up", lambda m: m.update(world_size=m["world_size"] + 1)),
    ("shards: one dropped", lambda m: m["shards"].pop()),
    ("shards: reversed", lambda m: m["shards"].reverse()),
    ("shards: a stranger", lambda m: m["shards"].append("shard-00009-model-00001-of-00001.safetensors")),
    ("files: one dropped", lambda m: m["files"].pop(sorted(m["files"])[0])),
    ("files: a sha256", lambda m: m["files"][sorted(m["files"])[-1]].update(sha256="0" * 64)),
    ("files: a size", lambda m: m["files"][m["shards"][0]].update(size=m["files"][m["shards"][0]]["size"] + 1)),
    ("files: a stranger", lambda m: m["files"].update({"other.bin": {"sha256": "0" * 64, "size": 1}})),
    ("module shape", lambda m: m["modules"]["net"]["tensors"]["a.weight"][1].__setitem__(1, 7)),
    ("module dtype", lambda m: m["modules"]["net"]["tensors"]["a.weight"].__setitem__(0, "F64")),
    ("module key dropped", lambda m: m["modules"]["net"]["tensors"].pop("b.bias")),
    ("module key added", lambda m: m["modules"]["net"]["tensors"].update({"z": ["F32", [1]]})),
    ("module renamed", lambda m: m["modules"].update(other=m["modules"].pop("net"))),
    ("optimizer param name", lambda m: m["optimizers"]["adam"]["params"][0].__setitem__(1, "b.weight")),
    ("optimizer param shape", lambda m: m["optimizers"]["adam"]["params"][1][2].__setitem__(0, 17)),
    (
        "optimizer state shape",
        lambda m: m["optimizers"]["adam"]["state"]["0"]["tensors"]["exp_avg"][1].__setitem__(0, 8),
    ),
    ("optimizer state dropped", lambda m: m["optimizers"]["adam"]["state"].pop("0")),
    ("optimizer state index", lambda m: m["optimizers"]["adam"]["state"].update({"99": {"tensors": {}, "values": {}}})),
    ("optimizer group params", lambda m: m["optimizers"]["adam"]["param_groups"][0]["params"].reverse()),
    ("tensors_file", lambda m: m.update(tensors_file=None)),
    ("config_hash", lambda m: m.update(config_hash="0" * 16)),
    ("config", lambda m: m["config"].update(lr=0.5)),
    ("generators", lambda m: m.update(generators=["sampler", "other"])),
    ("library_version", lambda m: m.update(library_version="0.0")),
]


def _apply_edit(run: Path, edit: Any, rehash: bool) -> None:
    step_dir = next(run.glob("step-*"))
    mpath = step_dir / "manifest.json"
    m = json.loads(mpath.read_text())
    edit(m)
    if rehash:
        m["digest"] = body_digest(m)
    mpath.write_text(json.dumps(m, indent=1))
    if rehash:
        ptr = json.loads((run / "latest.json").read_text())
        ptr["manifest_sha256"] = sha256_file(mpath)
        (run / "latest.json").write_text(json.dumps(ptr))


def test_fuzz_every_file_and_manifest_field(matrix, tmp_path):
    """Seeded: flip/truncate/extend/delete/rename/swap/symlink every file of a state saved at world size 2
    and of one saved at 1, and edit the manifest's structural fields (stale or with a fresh digest and
    pointer); each loaded at world size 1: refused with a StorageError, or the exact original."""
    rng = random.Random(0)
    counts: dict[str, Any] = {"cases": 0, "refused": 0, "loaded_exact": 0, "loaded_exact_cases": [], "wrong": []}
    for run_name in ("ws2", "ws1"):
        src = matrix["tmp"] / run_name
        step_dir = next(src.glob("step-*"))
        names = ["latest.json", *sorted(os.listdir(step_dir))]
        cases: list[tuple[str, Any]] = [(f"{n}: {k}", (n, k)) for n, k in _file_cases(names)]
        cases += [
            (f"manifest {label} ({'fresh digest' if rh else 'stale'})", (edit, rh))
            for label, edit in _EDITS
            for rh in (True, False)
        ]
        for label, case in cases:
            run = tmp_path / f"{run_name}-{counts['cases']}"
            shutil.copytree(src, run, symlinks=True)
            if isinstance(case[0], str):
                _apply_file_case(run, case[0], case[1], rng)
            else:
                _apply_edit(run, *case)
            counts["cases"] += 1
            o = build(seed=1)
            gens = {"sampler": torch.Generator()} if run_name == "ws1" else {}  # restored at the saved world size
            try:
                r = load_sharded_state(run, **kw(o), generators=gens, config=CFG)
            except StorageError:
                counts["refused"] += 1
                continue
            if (
                r["step"] == 3
                and repr(r["extra"]) == repr(EXTRA)
                and not differences(full_state(o), matrix["ws1"]["saved"])
            ):
                counts["loaded_exact"] += 1
                counts["loaded_exact_cases"].append(f"{run_name} {label}")
            else:
                counts["wrong"].append(f"{run_name} {label}")
            shutil.rmtree(run)
    print("sharded fuzz:", json.dumps(counts))
    assert counts["wrong"] == [] and counts["cases"] >= 250, counts
    assert counts["refused"] + counts["loaded_exact"] == counts["cases"]


# --------------------------------------------------------------------------- SIGKILL


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize("case", ["next step", "re-save of the live step"])
def test_a_crash_at_every_file_operation_of_a_save_leaves_the_old_or_the_new_state(tmp_path, case):
    """A save in a forked child that dies (``os._exit``: no cleanup, like SIGKILL) just before its k-th
    rename, replace, fsync, unlink or link (DCP's shard writes, the manifest, the switch, the cleanup),
    for every k until a save completes: the run folder always loads the old state or the new one."""
    from conftest import crashing_at

    old = build()
    for k in (1, 2):
        train_step(old, k)
    template = tmp_path / "template"
    save_sharded_state(template, step=1, **kw(old), config=CFG, keep=2)
    save_sharded_state(template, step=2, **kw(old), config=CFG, keep=2)
    new = build(seed=3)
    train_step(new, 3)
    step = 3 if case == "next step" else 2
    old_state, new_state = full_state(old), full_state(new)
    targets = [(os, name) for name in ("rename", "replace", "fsync", "unlink", "link")]
    completed, k = False, 0
    while not completed:
        k += 1
        folder = tmp_path / f"crash-{k}"
        shutil.copytree(template, folder)
        completed = crashing_at(
            k, targets, lambda f=folder: save_sharded_state(f, step=step, **kw(new), config=CFG, keep=2)
        )
        o = build(seed=1)
        got = load_sharded_state(folder, **kw(o), config=CFG)
        is_old = got["step"] == 2 and not differences(full_state(o), old_state)
        is_new = got["step"] == step and not differences(full_state(o), new_state)
        assert is_old or is_new, (k, got["step"])
        assert is_new or not completed, k
        for s in list_states(folder):  # a step folder is never partial
            load_sharded_state(folder / f"step-{s:09d}", **kw(build(seed=1)), config=CFG)
        save_sharded_state(folder, step=step, **kw(new), config=CFG, keep=2)  # the next save repairs everything
        assert sorted(os.listdir(folder)) == ["latest.json", *(f"step-{s:09d}" for s in sorted({1, 2, step})[-2:])]
        shutil.rmtree(folder)
    print(f"{case}: {k} crash points")
    assert k >= (15 if case == "next step" else 25), k


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_sigkill_during_saves_never_loses_the_last_state(tmp_path):
    """12 SIGKILLs of workers saving at world sizes 1 and 2 (FSDP2 over gloo, its states checked
    resharded to 1): the latest state always loads and equals a completed (or the in-flight) save."""
    from _sharded_kill import kill_campaign

    r = kill_campaign(tmp_path, kills=12, seed=0, worlds=(1, 2), pad=128, timeout=300)
    print("sharded kills:", json.dumps(r))
    assert r["kills"] == 12 and r["kills_by_world"] == {"1": 6, "2": 6}, r
    assert r["failures"] == [] and r["loads_after_kill_failed"] == 0 and r["partial_accepted"] == 0, r
    assert r["step_dirs_refused"] == 0 and r["loads_after_kill_ok"] + r["no_state_yet"] == 12, r
    assert r["kills_mid_save"] >= 4 and r["resharded_loads"] >= 5, r
    assert r["final_clean"] == {"1": True, "2": True}, r
