"""Trajectory, Degradation Recording and Distribution Backtracking: every switch proven.

The reference implementation's defects (shared/research/disback.md) each have a test here:
- its switch loaded a state dict whose keys matched nothing (strict=False): the target never
  changed -> test_every_switch_changes_the_target_to_the_recorded_node, test_mismatched_keys_*;
- its switch fired once (`//` for `%`): -> test_fixed_interval_switches_at_every_multiple;
- its folder names assumed 5-digit steps: -> test_many_nodes_and_large_step_numbers_round_trip;
- every node was a full checkpoint: -> test_lora_path_is_small_against_full_nodes.
"""
import copy
import json
import re
from pathlib import Path

import pytest
import torch

from conftest import ring_means
from disback_core import (AdaptiveGap, Backtrack, Batch, FixedInterval, GaussianMixtureDenoiser, LoraSpec,
                          StorageError, Trajectory, edm_mlp, edm_unet, freeze, make_generator, record_degradation,
                          train_step)
from disback_core.adapters import DMD2, DiffInstruct, SiD
from disback_core.lora import inject_lora, load_lora_state, lora_state
from disback_core.storage import save_tensors
from disback_core.trajectory import manifest_digest


def _teacher(seed=0):
    torch.manual_seed(seed)
    return freeze(edm_mlp(2, sigma_data=1.0, width=32, depth=2))


def _record(teacher, mode="lora", steps=12, interval=3, rank=4, merge=True, method=None):
    gen = make_generator(teacher, 80.0)
    return record_degradation(teacher, gen, method or DMD2(sigma_data=1.0), lambda: Batch(torch.randn(64, 2)),
                              steps=steps, interval=interval, lr=1e-2, mode=mode, lora=LoraSpec(rank=rank),
                              merge=merge)


def _probe_out(traj, k):
    p = traj.probe
    with torch.no_grad():
        return traj.target(k)(p.x, p.sigma, p.cond)


def test_lora_slot_starts_as_the_teacher():
    t = _teacher()
    w = inject_lora(copy.deepcopy(t), LoraSpec(rank=4))
    x, s = torch.randn(8, 2), torch.rand(8) * 5 + 0.1
    with torch.no_grad():
        assert torch.equal(w(x, s), t(x, s))
    assert all(("lora_" in n) == p.requires_grad for n, p in w.named_parameters())


def test_recording_makes_interval_nodes_that_verify():
    t = _teacher()
    traj = _record(t, steps=12, interval=3)
    assert len(traj) == 5 and traj.last == 4 and traj.steps == [3, 6, 9, 12]
    assert traj.kind == "lora" and len(traj.meta["dsm_loss"]) == 4
    errs = traj.verify()
    assert errs[0] == 0.0 and max(errs) < 1e-5  # merged nodes equal the unmerged recording to float rounding
    unmerged = Trajectory(t, traj.nodes, kind="lora", lora=traj.lora, steps=traj.steps, merge=False, probe=traj.probe)
    assert max(unmerged.verify()) == 0.0  # the unmerged slot is exactly the recorded degrading score


@pytest.mark.parametrize("merge", [True, False])
def test_every_switch_changes_the_target_to_the_recorded_node(merge):
    t = _teacher()
    traj = _record(t, steps=12, interval=3, merge=merge)
    bt = Backtrack(DMD2(sigma_data=1.0), traj, FixedInterval(every=2))
    p = traj.probe
    with torch.no_grad():
        seen = [bt.target(p.x, p.sigma)]
    assert bt.node == traj.last - 1
    torch.testing.assert_close(seen[0], p.outputs[traj.last - 1], rtol=0, atol=1e-5)
    for _ in range(2 * traj.last + 4):
        switched = bt.on_generator_step()
        if switched:
            with torch.no_grad():
                out = bt.target(p.x, p.sigma)
            assert not torch.allclose(out, seen[-1]), f"target did not change at the switch to node {bt.node}"
            torch.testing.assert_close(out, p.outputs[bt.node], rtol=0, atol=1e-5)
            seen.append(out)
    assert bt.node == 0 and len(seen) == traj.last  # N-1 .. 0
    with torch.no_grad():
        assert torch.equal(bt.target(p.x, p.sigma), t(p.x, p.sigma))  # the last target is the teacher, bit-exact
    assert bt.target.trajectory.target(0) is t


def test_fake_score_starts_as_the_last_node():
    t = _teacher()
    traj = _record(t)
    bt = Backtrack(DiffInstruct(sigma_data=1.0), traj, FixedInterval(every=5))
    fake = bt.initial_fake()
    assert all(p.requires_grad for p in fake.parameters())
    assert not any("lora" in n for n, _ in fake.named_parameters())  # a plain module, no peft wrappers
    p = traj.probe
    with torch.no_grad():
        torch.testing.assert_close(fake(p.x, p.sigma), p.outputs[traj.last], rtol=0, atol=1e-5)
        merged = traj.target(traj.last)
        for (n, a), (_, b) in zip(fake.named_parameters(), _plain_params(merged)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def _plain_params(work):
    """Parameters of a merged working copy under the teacher's names (base layers unwrapped)."""
    out = []
    for n, p in work.named_parameters():
        if "lora_" in n:
            continue
        out.append((n.replace(".base_layer", ""), p))
    return out


def test_fixed_interval_switches_at_every_multiple():
    t = _teacher()
    traj = _record(t, steps=15, interval=3)  # 5 nodes: targets 4, 3, 2, 1, 0
    bt = Backtrack(DMD2(sigma_data=1.0), traj, FixedInterval(every=7))
    for _ in range(100):
        bt.on_generator_step()
    assert bt.switches == [(0, 4), (7, 3), (14, 2), (21, 1), (28, 0)]
    assert bt.node == 0
    share = FixedInterval.from_share(total_steps=1000, degraded_nodes=5, share=0.2)
    assert share.every == 50


def test_adaptive_schedule_moves_on_when_the_gap_closes_and_checkpoints():
    s = AdaptiveGap(ratio=0.5, warmup=2, decay=0.0, min_steps=3, max_steps=50)
    gaps = [1.0, 1.0, 0.9, 0.6, 0.49, 0.3]
    fired = [s.advance(i + 1, g) for i, g in enumerate(gaps)]
    assert fired == [False, False, False, False, True, True]  # g_ref = 1, fires once ema <= 0.5
    s2 = AdaptiveGap(ratio=0.5, warmup=2, decay=0.9, min_steps=3, max_steps=5)
    assert [s2.advance(i + 1, 1.0) for i in range(5)] == [False] * 4 + [True]  # max_steps forces it
    s3 = AdaptiveGap(ratio=0.5, warmup=2, decay=0.5, min_steps=2, max_steps=50)
    for i, g in enumerate([2.0, 2.0, 1.0]):
        s3.advance(i + 1, g)
    clone = AdaptiveGap()
    clone.load_state_dict(s3.state_dict())
    assert [clone.advance(4, 0.2), clone.advance(5, 0.2)] == [s3.advance(4, 0.2), s3.advance(5, 0.2)]
    with pytest.raises(ValueError, match="score_gap"):
        AdaptiveGap().advance(1, None)


def test_backtrack_checkpoint_resumes_the_schedule():
    t = _teacher()
    traj = _record(t, steps=15, interval=3)
    a = Backtrack(DMD2(sigma_data=1.0), traj, FixedInterval(every=4))
    for _ in range(6):
        a.on_generator_step()
    state = a.state_dict()
    b = Backtrack(DMD2(sigma_data=1.0), traj, FixedInterval(every=1))
    b.load_state_dict(state)
    assert (b.node, b.steps_in_node, b.schedule.every) == (a.node, a.steps_in_node, 4)
    for _ in range(20):
        a.on_generator_step()
        b.on_generator_step()
    assert a.switches == b.switches


def test_backtrack_refuses_the_plain_teacher_as_target():
    t = _teacher()
    traj = _record(t)
    bt = Backtrack(DMD2(sigma_data=1.0), traj, FixedInterval(every=5))
    with pytest.raises(ValueError, match="pass backtrack.target"):
        bt.generator_loss(torch.randn(4, 2), t, bt.initial_fake())


@pytest.mark.parametrize("method_cls", [DiffInstruct, DMD2, SiD])
def test_disback_composes_with_each_adapter(method_cls):
    teacher = GaussianMixtureDenoiser(ring_means(), 0.1)
    torch.manual_seed(0)
    net_teacher = freeze(edm_mlp(2, sigma_data=1.0, width=32, depth=2))
    method = method_cls(sigma_data=1.0)
    gen = make_generator(net_teacher, 80.0)
    traj = record_degradation(net_teacher, gen, method, lambda: Batch(torch.randn(64, 2)), steps=20, interval=5,
                              lr=1e-2, lora=LoraSpec(rank=4))
    bt = Backtrack(method, traj, FixedInterval(every=3))
    fake = bt.initial_fake()
    go = torch.optim.Adam(gen.parameters(), 1e-3)
    fo = torch.optim.Adam(fake.parameters(), 1e-3)
    before = [p.detach().clone() for p in gen.parameters()]
    for _ in range(12):
        logs = train_step(bt, gen, fake, bt.target, go, fo, lambda: Batch(torch.randn(32, 2)))
    assert bt.node == 0 and [n for _, n in bt.switches] == [3, 2, 1, 0]
    assert all(torch.isfinite(torch.tensor(v)) for v in logs.values())
    assert any(not torch.equal(a, p) for a, p in zip(before, gen.parameters()))
    del teacher


def test_svd_mode_reports_its_error_and_is_exact_at_full_rank():
    t = _teacher()
    lo = _record(t, mode="svd", rank=2)
    hi = _record(t, mode="svd", rank=64)  # >= every layer's rank: the SVD is exact for wrapped layers
    assert len(lo.meta["svd_error"]) == 4 and all(0 < e < 1 for e in lo.meta["svd_error"])
    assert max(hi.meta["svd_error"]) < 1e-6
    assert max(lo.verify()) < 1e-5 and max(hi.verify()) < 1e-5
    # only the wrapped weights were trained, so an exact SVD reproduces the fine-tuned outputs
    assert max(hi.meta["svd_output_error"]) < 1e-4 < min(lo.meta["svd_output_error"])


def test_full_mode_nodes_load_strictly():
    t = _teacher()
    traj = _record(t, mode="full")
    assert traj.kind == "full" and max(traj.verify()) == 0.0
    bad = {("module.fake_unet." + k): v for k, v in traj.nodes[0].items()}
    with pytest.raises(ValueError, match="node 1 does not fit"):  # refused at once, not at the first switch
        Trajectory(t, [bad], kind="full")


def test_conditional_unet_records_and_switches():
    torch.manual_seed(0)
    teacher = freeze(edm_unet(sample_size=8, channels=1, num_classes=3, block_out_channels=(8, 16),
                              norm_num_groups=4, attention=True))
    gen = make_generator(teacher, 80.0)
    batch = lambda: Batch(torch.randn(8, 1, 8, 8), cond=torch.randint(0, 3, (8,)))  # noqa: E731
    traj = record_degradation(teacher, gen, DMD2(), batch, steps=4, interval=2, lr=1e-2, lora=LoraSpec(rank=2),
                              probe_size=6)
    assert traj.probe.cond is not None and traj.probe.cond.shape == (6,)
    suffixes = {n.rsplit(".", 1)[-1] for n in traj.lora.target_modules}  # resolved to exact layer names
    assert suffixes >= {"to_q", "conv1", "time_emb_proj"}
    errs = traj.verify()
    assert errs[0] == 0.0 and max(errs) < 1e-4
    assert not torch.allclose(traj.probe.outputs[1], traj.probe.outputs[0])


# ----------------------------------------------------------------------------- persistence


def test_save_load_round_trip_is_bit_exact(tmp_path):
    t = _teacher()
    traj = _record(t)
    traj.save(tmp_path / "traj")
    back = Trajectory.load(tmp_path / "traj", t)
    assert back.steps == traj.steps and back.lora == traj.lora and back.kind == "lora"
    for a, b in zip(traj.nodes, back.nodes):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(a, b) for a, b in zip(traj.probe.outputs, back.probe.outputs))
    for k in range(len(traj)):
        assert torch.equal(_probe_out(back, k), _probe_out(traj, k))
    names = sorted(p.name for p in (tmp_path / "traj").iterdir())  # files named by their content
    assert names[0] == "manifest.json" and len(names) == 6
    assert all(re.fullmatch(rf"node-000{k}-[0-9a-f]{{16}}\.safetensors", n) for k, n in enumerate(names[1:5], start=1))
    assert re.fullmatch(r"probe-[0-9a-f]{16}\.safetensors", names[5])


def test_many_nodes_and_large_step_numbers_round_trip(tmp_path):
    t = _teacher()
    traj = _record(t, steps=12, interval=1)  # 12 nodes: "node-0010" must not sort before "node-0002"
    traj.steps = [123456 * (i + 1) for i in range(12)]  # steps far beyond 5 digits
    traj.save(tmp_path / "traj")
    back = Trajectory.load(tmp_path / "traj", t)
    assert back.steps == traj.steps
    for k in range(1, 13):
        assert torch.equal(_probe_out(back, k), _probe_out(traj, k))


def _saved(tmp_path):
    t = _teacher()
    _record(t).save(tmp_path / "traj")
    return t, tmp_path / "traj"


def test_tampered_truncated_and_missing_nodes_are_refused(tmp_path):
    t, folder = _saved(tmp_path)
    node = next(folder.glob("node-0002-*.safetensors"))
    data = bytearray(node.read_bytes())
    data[-5] ^= 0xFF
    node.write_bytes(bytes(data))
    with pytest.raises(StorageError, match=r"node-0002-[0-9a-f]{16}\.safetensors fails its sha256"):
        Trajectory.load(folder, t)
    node.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(StorageError, match=r"node-0002-[0-9a-f]{16}\.safetensors fails its sha256"):
        Trajectory.load(folder, t)
    node.unlink()
    with pytest.raises(StorageError, match=r"node-0002-[0-9a-f]{16}\.safetensors is missing"):
        Trajectory.load(folder, t)


def test_manifest_for_another_base_model_or_broken_is_refused(tmp_path):
    t, folder = _saved(tmp_path)
    with pytest.raises(StorageError, match="another base model"):
        Trajectory.load(folder, _teacher(seed=1))
    man = folder / "manifest.json"
    text = man.read_text()
    man.write_text(text[:-20])
    with pytest.raises(StorageError, match="not valid JSON"):
        Trajectory.load(folder, t)
    man.write_text(text.replace('"version": 2', '"version": 99'))
    with pytest.raises(StorageError, match="format version 99"):
        Trajectory.load(folder, t)
    node1 = next(folder.glob("node-0001-*.safetensors")).name
    man.write_text(text.replace(f'"{node1}"', f'"../{node1}"'))
    with pytest.raises(StorageError, match="invalid file name"):
        Trajectory.load(folder, t)
    (folder / "manifest.json").unlink()
    with pytest.raises(StorageError, match="manifest.json is missing"):
        Trajectory.load(folder, t)


def test_mismatched_keys_are_refused_not_silently_skipped(tmp_path):
    """The reference loaded 'module.fake_unet.*' keys with strict=False: nothing loaded. Not here."""
    t = _teacher()
    traj = _record(t)
    renamed = [{"module.fake_unet." + k: v for k, v in n.items()} for n in traj.nodes]
    with pytest.raises(ValueError, match="node 1 does not fit this model's LoRA slot"):
        Trajectory(t, renamed, kind="lora", lora=traj.lora)
    folder = traj.save(tmp_path / "bad")  # the same on disk: rename the keys of node 2, hash, name, digest rewritten
    man = json.loads((folder / "manifest.json").read_text())
    sha = save_tensors(folder / "renamed.safetensors", renamed[1])
    (folder / "renamed.safetensors").rename(folder / f"node-0002-{sha[:16]}.safetensors")
    man["nodes"][1].update(sha256=sha, file=f"node-0002-{sha[:16]}.safetensors")
    man["digest"] = manifest_digest(man)
    (folder / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(StorageError, match=r"node-0002-[0-9a-f]{16}\.safetensors: keys do not fit this teacher"):
        Trajectory.load(folder, t)
    w = inject_lora(copy.deepcopy(t), traj.lora)
    shrunk = {k: v[..., :1] for k, v in lora_state(w).items()}
    with pytest.raises(ValueError, match="has shape"):
        load_lora_state(w, shrunk)


def test_lora_path_is_small_against_full_nodes():
    torch.manual_seed(0)
    teacher = freeze(edm_unet(sample_size=8, channels=1, block_out_channels=(32, 64, 64)))
    gen = make_generator(teacher, 80.0)
    batch = lambda: Batch(torch.randn(4, 1, 8, 8))  # noqa: E731
    kw = dict(steps=2, interval=1, lr=1e-3, probe_size=2)
    lora = record_degradation(teacher, gen, DMD2(), batch, mode="lora", lora=LoraSpec(rank=4), **kw)
    full = record_degradation(teacher, gen, DMD2(), batch, mode="full", **kw)
    ratio = lora.nbytes() / full.nbytes()
    assert ratio < 0.08, ratio


def test_no_pickle_on_any_load_path():
    """The library (and its examples) never imports pickle; its one ``torch.load`` (legacy ``.bin``
    checkpoints, export.load_checkpoint) passes ``weights_only=True`` in the call itself."""
    import ast

    root = Path(__file__).resolve().parents[1]
    loads = []
    files = [*(root / "disback_core").rglob("*.py"), *(root / "adapters").rglob("*.py"), *(root / "examples").rglob("*.py")]
    for path in files:
        text = path.read_text()
        assert not re.search(r"^\s*(import|from)\s+(c?pickle|dill|joblib)\b|\bpickle\.load|\bnp\.load\(", text, re.M), path
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                kws = {k.arg: k.value for k in node.keywords}
                ok = isinstance(kws.get("weights_only"), ast.Constant) and kws["weights_only"].value is True
                assert ok, f"{path.relative_to(root)}:{node.lineno}: torch.load without weights_only=True"
                loads.append(path.name)
    assert loads == ["export.py"]  # the scan sees the one call there is


def test_bad_arguments_are_named():
    t = _teacher()
    gen = make_generator(t, 80.0)
    batch = lambda: Batch(torch.randn(8, 2))  # noqa: E731
    with pytest.raises(ValueError, match="mode must be one of"):
        record_degradation(t, gen, DMD2(), batch, steps=4, interval=2, mode="half")
    with pytest.raises(ValueError, match="interval"):
        record_degradation(t, gen, DMD2(), batch, steps=2, interval=4)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        LoraSpec(rank=0)
    with pytest.raises(ValueError, match="kind='lora' needs the LoRA spec"):
        Trajectory(t, [{}], kind="lora")
    with pytest.raises(ValueError, match="at least one degraded node"):
        Trajectory(t, [], kind="full")
    traj = _record(t)
    with pytest.raises(IndexError, match="out of range 0..4"):
        traj.target(5)
    with pytest.raises(ValueError, match="every must be >= 1"):
        FixedInterval(0)
    with pytest.raises(ValueError, match="share must be in"):
        FixedInterval.from_share(100, 5, 1.5)
    with pytest.raises(ValueError, match="target_modules .*does_not_exist.* match no layer"):
        inject_lora(copy.deepcopy(t), LoraSpec(rank=2, target_modules=("does_not_exist",)))


# ----------------------------------------------------------------------------- call conventions (manifest "call")


def _unet_recorded(call, call_name=None, int_timesteps=True, steps=4, nodes=2):
    """A raw diffusers UNet recorded as examples/wrap_diffusers_lora.py does: the user's eps loss inline,
    the probe in the UNet's own units (integer diffusers timesteps)."""
    from conftest import tiny_unet2d_condition
    from diffusers import DDPMScheduler

    from disback_core import DegradationRecorder

    torch.manual_seed(0)
    unet = tiny_unet2d_condition().requires_grad_(False)
    sched = DDPMScheduler()
    fake = copy.deepcopy(unet).requires_grad_(True)
    rec = DegradationRecorder(unet, fake, steps=steps, nodes=nodes, lr=1e-2, lora=LoraSpec(rank=2), call=call,
                              call_name=call_name)
    for _ in range(steps):
        ehs = torch.randn(4, 5, 12)
        x0 = torch.randn(4, 2, 8, 8)
        noise, t = torch.randn_like(x0), torch.randint(0, 1000, (4,))
        noisy = sched.add_noise(x0, noise, t)
        loss = torch.nn.functional.mse_loss(rec.module(noisy, t, encoder_hidden_states=ehs).sample, noise)
        rec.update(loss, probe=(noisy, t if int_timesteps else t.float(), ehs))
    return unet, rec.trajectory()


def unet_call(m, x, t, c):
    """The example's own probe call (a function the library does not know)."""
    return m(x, t, encoder_hidden_states=c).sample


def test_integer_unet_timesteps_in_the_probe_save_and_load(tmp_path):
    """Before: an int64 probe sigma saved and never loaded ("expected a floating dtype"). Now it is kept
    exactly under a raw-model convention, and refused before writing under "denoiser"."""
    unet, traj = _unet_recorded("diffusers-unet")
    assert traj.call_name == "diffusers-unet" and traj.probe.sigma.dtype == torch.int64
    errs = traj.verify()
    assert errs[0] == 0.0 and max(errs) < 1e-5
    assert not torch.allclose(traj.probe.outputs[-1], traj.probe.outputs[0])  # the nodes are told apart
    traj.save(tmp_path / "p")
    m = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert m["version"] == 3 and m["call"] == "diffusers-unet"
    back = Trajectory.load(tmp_path / "p", unet)
    assert back.call_name == "diffusers-unet" and back.probe.sigma.dtype == torch.int64
    assert torch.equal(back.probe.sigma, traj.probe.sigma)
    assert back.verify() == errs  # the same inputs, bit for bit: the same errors
    # the example's own unnamed function: saved as "custom", loaded, verified only with the function again
    unet, custom = _unet_recorded(unet_call)
    assert custom.call_name == "custom"
    custom.save(tmp_path / "c")
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["call"] == "custom"
    loaded = Trajectory.load(tmp_path / "c", unet)
    with pytest.raises(ValueError, match=r"recorded with a 'custom' call .*verify\(call=fn\)"):
        loaded.verify()
    assert max(loaded.verify(call=unet_call)) < 1e-5
    assert max(Trajectory.load(tmp_path / "c", unet, call=unet_call).verify()) < 1e-5
    # "denoiser" with integer timesteps would save a folder that never loads: refused before writing
    unet, plain = _unet_recorded("denoiser")  # (m(x, t, c) runs a UNet2DConditionModel positionally)
    with pytest.raises(ValueError, match=r"sigma has dtype torch.int64.*call='diffusers-unet'"):
        plain.save(tmp_path / "d")
    assert not (tmp_path / "d" / "manifest.json").exists()
    # floats (the same integer values) save under any convention
    unet, floats = _unet_recorded("denoiser", int_timesteps=False)
    floats.save(tmp_path / "f")
    assert max(Trajectory.load(tmp_path / "f", unet).verify()) < 1e-5


def test_a_named_function_travels_by_name_and_an_unknown_name_is_refused(tmp_path):
    from disback_core import DegradationRecorder
    from disback_core.trajectory import _CALLS, call_conventions, register_call

    def my_call(m, x, t, c):
        return m(x, t, encoder_hidden_states=c).sample

    try:
        unet, traj = _unet_recorded(my_call, call_name="my-unet")  # registered to my_call in this process
        assert traj.call_name == "my-unet" and call_conventions()["my-unet"] is my_call
        traj.save(tmp_path / "p")
        assert max(Trajectory.load(tmp_path / "p", unet).verify()) < 1e-5
        with pytest.raises(ValueError, match="already registered to another function"):
            _unet_recorded(unet_call, call_name="my-unet")
        del _CALLS["my-unet"]  # a process that did not register it
        with pytest.raises(StorageError, match=r"call convention 'my-unet'.*not registered.*register_call\('my-unet'"):
            Trajectory.load(tmp_path / "p", unet)
        assert max(Trajectory.load(tmp_path / "p", unet, call=my_call).verify()) < 1e-5
        register_call("my-unet", my_call)
        assert Trajectory.load(tmp_path / "p", unet).call_fn is my_call
    finally:
        _CALLS.pop("my-unet", None)
    with pytest.raises(ValueError, match="built-in call convention"):
        register_call("denoiser", unet_call)
    with pytest.raises(ValueError, match="built-in call convention"):
        register_call("custom", unet_call)
    with pytest.raises(ValueError, match="call convention name must be"):
        register_call("My Call!", unet_call)
    with pytest.raises(ValueError, match=r"unknown call convention 'nope'.*register_call\('nope'"):
        DegradationRecorder(_teacher(), interval=2, call="nope")


def test_old_manifests_without_the_call_field_load_as_denoiser(tmp_path):
    t = _teacher()
    traj = _record(t)
    traj.save(tmp_path / "v2")
    m = json.loads((tmp_path / "v2" / "manifest.json").read_text())
    assert m["version"] == 2 and "call" not in m  # the default convention writes the format-2 manifest unchanged
    back = Trajectory.load(tmp_path / "v2", t)
    assert back.call_name == "denoiser" and max(back.verify()) < 1e-5
    # a format-3 manifest needs the field; format 2 may not hold it
    bad = {**m, "version": 3}
    bad["digest"] = manifest_digest(bad)
    (tmp_path / "v2" / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(StorageError, match=r"missing fields \['call'\]"):
        Trajectory.load(tmp_path / "v2", t)
    for value, match in (("denoiser", None), ("Not A Name", "call must be a call convention name"),
                         (5, "call must be a call convention name"), ("x" * 65, "call must be")):
        bad = {**m, "version": 3, "call": value}
        bad["digest"] = manifest_digest(bad)
        (tmp_path / "v2" / "manifest.json").write_text(json.dumps(bad))
        if match is None:
            assert Trajectory.load(tmp_path / "v2", t).call_name == "denoiser"
        else:
            with pytest.raises(StorageError, match=match):
                Trajectory.load(tmp_path / "v2", t)
    extra = {**m, "call": "flow-transformer"}
    extra["digest"] = manifest_digest(extra)
    (tmp_path / "v2" / "manifest.json").write_text(json.dumps(extra))
    with pytest.raises(StorageError, match=r"unknown fields \['call'\]"):
        Trajectory.load(tmp_path / "v2", t)
    # an edited name without the digest rewritten is caught by the digest
    traj.call_name, traj.call_fn = "diffusers-unet", None
    traj.save(tmp_path / "v3")
    text = (tmp_path / "v3" / "manifest.json").read_text()
    (tmp_path / "v3" / "manifest.json").write_text(text.replace('"diffusers-unet"', '"flow-transformer"'))
    with pytest.raises(StorageError, match="fails its digest check"):
        Trajectory.load(tmp_path / "v3", t)


def test_raw_unet_probe_inputs_and_convention_are_the_diffusers_calls():
    from conftest import tiny_unet2d, tiny_unet2d_condition
    from diffusers import DDPMScheduler

    from disback_core.recording import probe_inputs_raw
    from disback_core.trajectory import call_diffusers_unet

    sched = DDPMScheduler()
    unet, x0, ehs = tiny_unet2d_condition(), torch.randn(5, 2, 8, 8), torch.randn(5, 4, 12)
    x, t, cond = probe_inputs_raw(unet, x0, ehs, sched, seed=7)
    idx = torch.tensor([50, 275, 500, 724, 949])  # round(f * 999) for f = 0.05, 0.275, 0.5, 0.725, 0.95
    assert t.dtype == torch.float32 and torch.equal(t, idx.float()) and cond is ehs
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(x, sched.add_noise(x0, eps, idx), rtol=0, atol=1e-6)  # add_noise's closed form
    with torch.no_grad():
        assert torch.equal(call_diffusers_unet(unet, x, t, ehs), unet(x, t, encoder_hidden_states=ehs).sample)
        labelled, labels = tiny_unet2d(num_class_embeds=3), torch.tensor([0, 1, 2, 0, 1])
        assert torch.equal(call_diffusers_unet(labelled, x, t, labels), labelled(x, t, class_labels=labels).sample)
    with pytest.raises(ValueError, match="DDPM-family scheduler"):
        probe_inputs_raw(unet, x0, ehs, None)
