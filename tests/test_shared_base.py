"""DisBack on one shared base: the path as a second peft adapter beside the generator's (LoRA memory)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig

from conftest import CustomEDM, tiny_unet2d_condition
from disback_core import (Batch, DegradationRecorder, DiffusersDenoiser, FixedInterval, LinearPath, LoraSpec,
                          Trajectory, attach, make_generator, record_degradation)
from disback_core.adapters import DMD2
from disback_core.shared_base import SharedBasePath, attach_adapter, bare_view

GEN_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


def _x0(x_t, eps, t, sched):
    a = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    return (x_t - (1 - a).sqrt() * eps) / a.sqrt()


def _one_base(steps=8, nodes=4, rank=2, seed=0):
    """The one-base layout: a frozen base UNet, the generator a peft adapter on it, DMD2's fake score a
    full copy; the path recorded on the base's adapter-free view with the user's own DSM loss."""
    from diffusers import DDPMScheduler

    torch.manual_seed(seed)
    unet = tiny_unet2d_condition().requires_grad_(False)
    fake = copy.deepcopy(unet).requires_grad_(True)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=GEN_TARGETS))
    with torch.no_grad():  # a generator some updates in: its adapter is not zero
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    sched = DDPMScheduler()
    cond = torch.randn(4, 5, 12)
    probe = (torch.randn(4, 2, 8, 8), torch.randint(0, 1000, (4,)), cond)
    rec = DegradationRecorder(bare_view(unet), fake, steps=steps, nodes=nodes, lr=1e-2, lora=LoraSpec(rank=rank),
                              call="diffusers-unet", probe=probe)
    for _ in range(steps):
        with torch.no_grad():  # the generator: the base with its adapter active
            x0 = _x0(torch.randn(4, 2, 8, 8), unet(torch.randn(4, 2, 8, 8), torch.full((4,), 999),
                                                    encoder_hidden_states=cond).sample, torch.full((4,), 999), sched)
        noise, t = torch.randn_like(x0), torch.randint(0, 1000, (4,))
        rec.update(F.mse_loss(rec.module(sched.add_noise(x0, noise, t), t, encoder_hidden_states=cond).sample, noise))
    return unet, fake, rec.trajectory(), sched


def _run(module, probe):
    x, t, c = probe
    with torch.no_grad():
        return module(x, t, encoder_hidden_states=c).sample


def _snapshot(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _equal(m, snap):
    sd = m.state_dict()
    return set(sd) == set(snap) and all(torch.equal(v, snap[k]) for k, v in sd.items())


def _peft_state(m):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {n: (list(x.active_adapters), x.disable_adapters, x._all_available_adapter_names())
            for n, x in m.named_modules() if isinstance(x, BaseTunerLayer)}


def test_every_node_is_served_on_the_users_base_and_node0_is_the_bare_base():
    unet, fake, traj, _ = _one_base()
    probe = traj.probe
    run = traj.probe_runner()  # the trajectory's call convention ("diffusers-unet")
    gaps = [float((o - probe.outputs[0]).abs().max()) for o in probe.outputs[1:]]
    assert min(gaps) > 1e-4, gaps  # the nodes really differ: a wrong node would be seen
    before = _peft_state(unet)
    path = SharedBasePath(unet, traj, FixedInterval(2), fake=fake)
    assert path.node == traj.last - 1 and len(path.layers) == len(traj.layers())
    assert path.nbytes() == 4 * sum(t.numel() for t in traj.nodes[0].values())  # one node's factors, fp32
    unet.disable_adapters()  # diffusers' own teacher: the base with the adapters disabled
    bare = run(unet, probe.x, probe.sigma, probe.cond).detach()
    unet.enable_adapters()
    seen = []
    for _ in range(2 * traj.last):
        with path.target() as base:
            assert base is unet
            with torch.no_grad():
                out = run(unet, probe.x, probe.sigma, probe.cond)
        seen.append(path.node)
        err = float((out - probe.outputs[path.node]).abs().max())
        assert err < 1e-5, (path.node, err)
        assert path.verify() == err
        if path.node == 0:
            assert torch.equal(out, bare) and torch.equal(out, probe.outputs[0])  # bit for bit
        assert _active(unet, before) == _active_of(before)  # the generator's adapter is active again
        path.step()
    assert seen[::2] == [3, 2, 1, 0] and path.switches == [(0, 3), (2, 2), (4, 1), (6, 0)]
    for k in range(traj.last + 1):  # set by hand, any order
        path.set_node(k)
        assert path.verify() < 1e-5
        with torch.no_grad():  # the callable form, for code that calls its teacher module directly
            called = path.as_target()(probe.x, probe.sigma, encoder_hidden_states=probe.cond).sample
        assert torch.equal(called, _in_target(path, unet, probe))
    with pytest.raises(KeyError), path.target():  # the previous adapters come back after an exception too
        raise KeyError("boom")
    assert _active(unet, before) == _active_of(before)


def _active_of(state):
    return {n: s[:2] for n, s in state.items()}


def _active(m, names):
    return {n: s[:2] for n, s in _peft_state(m).items() if n in names}


def _in_target(path, unet, probe):
    with path.target():
        return _run(unet, (probe.x, probe.sigma, probe.cond))


def test_the_generator_outside_the_target_is_bit_identical_at_every_node():
    unet, fake, traj, _ = _one_base()
    reference = copy.deepcopy(unet)  # the generator with no path adapter anywhere
    inputs = (torch.randn(3, 2, 8, 8), torch.full((3,), 999), torch.randn(3, 5, 12))
    want = _run(reference, inputs)
    path = attach_adapter(unet, traj, "manual")
    for k in [traj.last, 2, 1, 0, 3]:
        path.set_node(k)
        with path.target():
            _run(unet, inputs)
        got = _run(unet, inputs)
        assert torch.equal(got, want), k
    unet.train()  # train mode changes nothing either
    reference.train()
    assert torch.equal(_run(unet, inputs), _run(reference, inputs))


def _generator_step(unet, fake, teacher, sched, batch):
    """One DMD2 generator update's gradient on the generator adapter's parameters (the user's code)."""
    z, ehs, noise, timesteps = batch
    params = [p for n, p in unet.named_parameters() if ".lora_" in n and ".default." in n]
    for p in params:
        p.grad = None
    t_gen = torch.full((z.shape[0],), 999)
    x0 = _x0(z, unet(z, t_gen, encoder_hidden_states=ehs).sample, t_gen, sched)
    with torch.no_grad():
        noisy = sched.add_noise(x0, noise, timesteps)
        eps_real = teacher(noisy, timesteps, ehs)
        eps_fake = fake(noisy, timesteps, encoder_hidden_states=ehs).sample
        pred_real, pred_fake = _x0(noisy, eps_real, timesteps, sched), _x0(noisy, eps_fake, timesteps, sched)
        grad = torch.nan_to_num(((x0 - pred_real) - (x0 - pred_fake)) / (x0 - pred_real).abs().mean())
    loss = 0.5 * F.mse_loss(x0, (x0 - grad).detach())
    loss.backward()
    return [p.grad.clone() for p in params], eps_real


def test_the_generators_gradient_is_unaffected_by_the_path():
    unet, fake, traj, sched = _one_base()
    reference = copy.deepcopy(unet)  # a separate generator, no path adapter
    batch = (torch.randn(4, 2, 8, 8), torch.randn(4, 5, 12), torch.randn(4, 2, 8, 8), torch.randint(20, 981, (4,)))
    k = 2
    materialized = traj.materialize(k)  # node k as a separate plain copy of the teacher
    flags = [(p, p.requires_grad) for p in unet.parameters()]
    path = SharedBasePath(unet, traj, "manual", start=k)
    assert not any(p.requires_grad for p in path.adapter_parameters())

    def from_copy(x, t, c):
        return materialized(x, t, encoder_hidden_states=c).sample

    def from_path(x, t, c):
        with path.target():
            return unet(x, t, encoder_hidden_states=c).sample

    def path_used_then_copy(x, t, c):  # the path runs inside the step; the loss gets the copy's target
        assert (from_path(x, t, c) - from_copy(x, t, c)).abs().max() < 1e-5
        return from_copy(x, t, c)

    want, eps_copy = _generator_step(reference, fake, from_copy, sched, batch)
    got, eps_path = _generator_step(unet, fake, path_used_then_copy, sched, batch)
    assert len(got) == 64 and all(g.abs().max() > 0 for g in got)
    assert all(torch.equal(g, w) for g, w in zip(got, want))  # bit for bit
    served, eps_served = _generator_step(unet, fake, from_path, sched, batch)  # the path's own target values
    assert (eps_served - eps_copy).abs().max() < 1e-5
    for g, w in zip(served, want):  # the targets differ by float rounding (unmerged adapter vs merged copy)
        assert (g - w).norm() <= 1e-3 * w.norm()
    assert all(p.grad is None and not p.requires_grad for p in path.adapter_parameters())
    assert all(p.requires_grad == f for p, f in flags)  # nothing of the user's changed its flag


def test_state_dict_resumes_the_node_exactly(tmp_path):
    unet, fake, traj, _ = _one_base()
    traj.save(tmp_path / "path")
    path = SharedBasePath(unet, traj, FixedInterval(3))
    for _ in range(4):
        path.step()
    state = path.state_dict()
    with path.target():
        before = _run(unet, (traj.probe.x, traj.probe.sigma, traj.probe.cond))
    path.detach()
    loaded = Trajectory.load(tmp_path / "path", bare_view(unet))  # a new process: the path on the base's view
    resumed = SharedBasePath(unet, loaded, FixedInterval(3))
    resumed.load_state_dict(state)
    assert resumed.node == 2 and resumed.cursor.steps_in_node == 1 and resumed.switches == path.switches
    with resumed.target():
        assert torch.equal(_run(unet, (traj.probe.x, traj.probe.sigma, traj.probe.cond)), before)
    for _ in range(2):
        resumed.step()
    assert resumed.node == 1 and resumed.verify() < 1e-5


def test_detach_leaves_the_base_and_the_generator_bit_identical():
    unet, _, traj, _ = _one_base()
    inputs = (torch.randn(3, 2, 8, 8), torch.full((3,), 999), torch.randn(3, 5, 12))
    snap, peft_state, cfg = _snapshot(unet), _peft_state(unet), dict(unet.peft_config)
    modules = dict(unet.named_modules())
    flags = {n: p.requires_grad for n, p in unet.named_parameters()}
    out = _run(unet, inputs)
    path = SharedBasePath(unet, traj, FixedInterval(1))
    assert set(unet.state_dict()) != set(snap)  # the adapter is on the base meanwhile
    for _ in range(2):
        path.step()
    path.detach()
    path.detach()  # a second call does nothing
    assert _equal(unet, snap) and _peft_state(unet) == peft_state and dict(unet.peft_config) == cfg
    assert all(dict(unet.named_modules())[n] is m for n, m in modules.items()) and len(modules) == len(
        dict(unet.named_modules()))
    assert {n: p.requires_grad for n, p in unet.named_parameters()} == flags
    assert torch.equal(_run(unet, inputs), out)
    with pytest.raises(RuntimeError, match="detached"):
        path.step()


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")  # peft, on the user's second add_adapter
def test_the_fake_score_starts_at_the_last_node_as_a_copy_or_as_an_adapter():
    unet, fake, traj, _ = _one_base()
    probe = (traj.probe.x, traj.probe.sigma, traj.probe.cond)
    ids = [id(p) for p in fake.parameters()]
    path = SharedBasePath(unet, traj, FixedInterval(1), fake=fake)
    assert [id(p) for p in fake.parameters()] == ids  # loaded in place: the optimizer keeps its parameters
    assert (_run(fake, probe) - traj.probe.outputs[traj.last]).abs().max() < 1e-5
    # a LoRA fake score on the same base, on the path's layers with its rank and alpha
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=path.layers), adapter_name="fake")
    unet.set_adapter("default")
    path.load_fake("fake")
    unet.set_adapter("fake")
    assert (_run(unet, probe) - traj.probe.outputs[traj.last]).abs().max() < 1e-5
    unet.set_adapter("default")
    with pytest.raises(ValueError, match="scaling"):
        unet.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=path.layers), adapter_name="fake2")
        unet.set_adapter("default")
        path.load_fake("fake2")
    with pytest.raises(ValueError, match="exactly the path's"):
        path.load_fake("default")


def test_a_path_recorded_through_a_diffusers_wrapper_is_served_on_the_raw_unet():
    from diffusers import DDPMScheduler

    torch.manual_seed(0)
    unet = tiny_unet2d_condition().requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=GEN_TARGETS))
    teacher = DiffusersDenoiser(bare_view(unet), scheduler=DDPMScheduler(), clamp=True)
    cond = torch.randn(4, 5, 12)
    batch = lambda: Batch(torch.randn(4, 2, 8, 8), cond=cond)  # noqa: E731
    traj = record_degradation(teacher, make_generator(teacher, 10.0), DMD2(), batch, steps=4, nodes=2, lr=1e-2,
                              lora=LoraSpec(rank=2), probe_size=4, seed=0)
    path = SharedBasePath(unet, traj, FixedInterval(1))
    assert path.prefix == "model."
    for _ in range(2):
        assert path.verify() < 1e-4  # run through the wrapper, with the user's base in place of the view
        path.step()
    assert path.node == 0 and path.verify() == 0.0
    assert teacher.model is not unet  # the wrapper holds its view again


def test_bad_input_is_refused_with_its_name():
    unet, fake, traj, _ = _one_base()
    with pytest.raises(ValueError, match="already has an adapter named 'default'"):
        SharedBasePath(unet, traj, FixedInterval(1), path_adapter="default")
    with pytest.raises(ValueError, match="no adapter named 'gen'"):
        SharedBasePath(unet, traj, FixedInterval(1), generator_adapter="gen")
    with pytest.raises(ValueError, match="needs a schedule"):
        SharedBasePath(unet, traj)
    with pytest.raises(ValueError, match="interpolates"):
        SharedBasePath(unet, traj, LinearPath(10))
    full = Trajectory(traj.teacher, [traj.materialize(1).state_dict()], kind="full")
    with pytest.raises(ValueError, match="not LoRA factors"):
        SharedBasePath(unet, full, FixedInterval(1))
    other = copy.deepcopy(unet)
    with torch.no_grad():
        other.conv_in.weight.add_(1e-3)
    with pytest.raises(ValueError, match="does not hold the weights"):
        SharedBasePath(other, traj, FixedInterval(1))
    # the path recorded on the base itself, which now carries the generator's adapter
    plain = tiny_unet2d_condition()
    tr = Trajectory(plain, traj.nodes, lora=LoraSpec(rank=2, target_modules=tuple(traj.lora.target_modules)))
    plain.add_adapter(LoraConfig(r=2, target_modules=GEN_TARGETS))
    with pytest.raises(ValueError, match="carries peft adapters"):
        SharedBasePath(plain, tr, FixedInterval(1))
    # delta (parametrize) targets: custom layers peft cannot host
    edm = CustomEDM()
    view_like = copy.deepcopy(edm)
    rec = DegradationRecorder(edm, view_like, steps=2, nodes=2, lr=1e-2, lora=LoraSpec(rank=2),
                              probe=torch.randn(2, 2, 8, 8))
    for _ in range(2):
        rec.update(((rec.module(torch.randn(2, 2, 8, 8), torch.ones(2), None)) ** 2).mean())
    with pytest.raises(ValueError, match="delta"):
        SharedBasePath(edm, rec.trajectory(), FixedInterval(1), generator_adapter=None)
    # a base of another structure, or the path's layers under other names
    with pytest.raises(ValueError, match="structure"):
        SharedBasePath(tiny_unet2d_condition(block_out_channels=(8, 8)), traj, FixedInterval(1),
                       generator_adapter=None)
    with pytest.raises(ValueError, match="not under prefix"):
        SharedBasePath(unet, traj, FixedInterval(1), prefix="model.")
    # a merged generator adapter is not the teacher when disabled
    merged = copy.deepcopy(unet)
    for m in merged.modules():
        if hasattr(m, "merge") and hasattr(m, "lora_A"):
            m.merge()
    with pytest.raises(ValueError, match="merged"):
        SharedBasePath(merged, traj, FixedInterval(1), check_weights=False)
    path = SharedBasePath(unet, traj, FixedInterval(1))
    with pytest.raises(TypeError, match=r"path.target\(\)"), path:
        pass
    with path.target(), pytest.raises(RuntimeError, match="after the"):
        path.step()
    with pytest.raises(ValueError, match="already has an adapter"):  # twice on one base, same name
        SharedBasePath(unet, traj, FixedInterval(1))
    with pytest.raises(ValueError, match="module must be|structure"):
        attach(unet, traj, FixedInterval(1))  # the in-place route does not fit a peft-wrapped base
