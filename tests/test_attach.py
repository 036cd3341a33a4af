"""In-place attachment to the user's own modules, and recording from the user's own loss."""
import copy

import pytest
import torch

from conftest import CustomEDM, tiny_unet2d_condition
from disback_core import (AdaptiveGap, Batch, DegradationRecorder, DiffusersDenoiser, FixedInterval, LoraSpec,
                          Trajectory, Unconditional, attach, check_denoiser, make_generator, record_degradation,
                          score_gap)
from disback_core.adapters import DMD2
from disback_core.lora import lora_parameters, node_weight


def _user_dsm(net, x0, labels=None):
    """The user's own fake-score loss (EDM weighting), as their codebase writes it."""
    sigma = (torch.randn(x0.shape[0]) * 1.2 - 1.2).exp()
    noisy = x0 + sigma[:, None, None, None] * torch.randn_like(x0)
    w = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    return (w[:, None, None, None] * (net(noisy, sigma, labels) - x0) ** 2).mean()


def _recorded(mode="lora", steps=12, nodes=4, seed=0):
    """A teacher of custom layers and a path recorded from the user's own loop."""
    torch.manual_seed(seed)
    teacher = CustomEDM()
    g0 = make_generator(teacher, 80.0).requires_grad_(False)
    fake = copy.deepcopy(teacher)
    with torch.no_grad():
        x0 = g0(torch.randn(6, 2, 8, 8))
    rec = DegradationRecorder(teacher, fake, steps=steps, nodes=nodes, mode=mode, lora=LoraSpec(rank=2), probe=x0)
    opt = torch.optim.Adam(rec.parameters(), 1e-2)
    for _ in range(steps):
        with torch.no_grad():
            x = g0(torch.randn(8, 2, 8, 8))
        loss = _user_dsm(rec.module, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        rec.step()
    return teacher, fake, rec.trajectory()


def _snapshot(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _equal(m, snap):
    return all(torch.equal(v, snap[k]) for k, v in m.state_dict().items())


def test_recorder_on_the_users_module_and_loss():
    teacher, fake, traj = _recorded()
    assert traj.kind == "lora" and traj.last == 4 and traj.steps == [3, 6, 9, 12]
    assert {n.split(".")[0] for n in traj.lora.target_modules} == {"conv0", "affine", "conv1"}  # custom layers
    errs = traj.verify()
    assert errs[0] == 0.0 and max(errs) < 1e-5
    assert not torch.allclose(traj.probe.outputs[-1], traj.probe.outputs[0], atol=1e-4)  # it degraded
    # the slot is gone again: the user's fake is their plain module, at the teacher's weights, trainable
    assert [n for n, _ in fake.named_parameters()] == [n for n, _ in teacher.named_parameters()]
    assert _equal(fake, _snapshot(teacher)) and all(p.requires_grad for p in fake.parameters())


@pytest.mark.parametrize("mode", ["lora", "full", "svd"])
def test_every_switch_puts_the_recorded_node_into_the_users_module(mode):
    teacher, fake, traj = _recorded(mode)
    teacher.requires_grad_(True).train()  # as DMD2 leaves its real_unet between turns: never relied on
    original = _snapshot(teacher)
    att = attach(teacher, traj, FixedInterval(every=2), fake=fake)
    assert att.node == traj.last - 1 and att.verify() < 1e-5
    seen = [att.node]
    for _ in range(2 * traj.last + 3):
        if att.step():
            seen.append(att.node)
            assert att.verify() < 1e-5, f"module does not hold node {att.node}"
    assert seen == [3, 2, 1, 0] and att.switches == [(0, 3), (2, 2), (4, 1), (6, 0)]
    assert _equal(teacher, original)  # node 0 is the teacher, bit-exactly
    assert all(p.requires_grad for p in teacher.parameters()) and teacher.training
    att.set_node(2)
    assert not _equal(teacher, original)
    att.detach()
    assert _equal(teacher, original)


def test_fake_is_loaded_in_place_and_its_optimizer_keeps_working():
    teacher, fake, traj = _recorded()
    opt = torch.optim.SGD(fake.parameters(), lr=0.1)
    ids = [id(p) for p in fake.parameters()]
    fake.train()
    attach(teacher, traj, FixedInterval(5), fake=fake)
    assert [id(p) for p in fake.parameters()] == ids and fake.training
    want = traj.materialize(traj.last)
    assert all(torch.equal(a, b) for a, b in zip(fake.state_dict().values(), want.state_dict().values()))
    before = [p.detach().clone() for p in fake.parameters()]
    opt.zero_grad()
    _user_dsm(fake, torch.randn(4, 2, 8, 8)).backward()
    opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, fake.parameters()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_node_zero_is_bit_exact_after_many_switches(dtype):
    teacher, _, traj = _recorded(nodes=6, steps=12)
    user = copy.deepcopy(teacher).to(dtype)  # the user's own (bf16) copy of the teacher
    original = _snapshot(user)
    att = attach(user, traj, "manual", start=traj.last)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        att.set_node(int(torch.randint(0, traj.last + 1, (1,), generator=g)))
        assert all(v.dtype == original[k].dtype for k, v in user.state_dict().items())
    att.set_node(0)
    assert _equal(user, original)
    att.set_node(traj.last)
    touched = set(traj.layers())
    for name, v in user.state_dict().items():  # W + scale * B @ A summed in fp32 from the user's own W, cast once
        want = (node_weight(original[name], traj.nodes[-1], name[: -len(".weight")], traj.lora.scale)
                if name in touched else original[name])
        assert want.dtype == dtype and torch.equal(v, want), name
    att.detach()
    assert _equal(user, original)


def test_trajectory_targets_stay_correct_while_the_teacher_is_attached():
    teacher, _, traj = _recorded()
    with attach(teacher, traj, "manual", start=1):
        errs = traj.verify()  # node 0 here comes from the attachment's copy of the originals
        assert errs[0] == 0.0 and max(errs) < 1e-5
        assert traj.target(0) is not teacher
    assert traj.target(0) is teacher and max(traj.verify()) < 1e-5


def test_attach_to_the_unet_inside_a_diffusers_wrapper():
    torch.manual_seed(0)
    unet = tiny_unet2d_condition()
    from diffusers import DDPMScheduler

    teacher = DiffusersDenoiser(unet, scheduler=DDPMScheduler(), clamp=True)
    cond = torch.randn(4, 5, 12)
    batch = lambda: Batch(torch.randn(4, 2, 8, 8), cond=cond)  # noqa: E731
    traj = record_degradation(teacher, make_generator(teacher, 10.0), DMD2(), batch, steps=4, nodes=2, lr=1e-2,
                              lora=LoraSpec(rank=2), probe_size=4, seed=0)
    assert all(n.startswith("model.") for n in traj.lora.target_modules)
    att = attach(unet, traj, FixedInterval(1))  # the raw UNet the user's script calls
    assert att.prefix == "model."
    for _ in range(2):
        assert att.verify() < 1e-4  # the wrapper's model is the user's unet, switched in place
        att.step()
    assert att.node == 0 and att.verify() == 0.0


def test_adaptive_schedule_is_fed_by_the_user():
    teacher, _, traj = _recorded()
    att = attach(teacher, traj, AdaptiveGap(ratio=0.5, warmup=2, decay=0.0, min_steps=3, max_steps=50))
    with pytest.raises(ValueError, match=r"step\(stat=\.\.\.\)"):
        att.step()
    gap = score_gap(torch.zeros(3, 2), torch.ones(3, 2))
    assert gap == 1.0
    fired = [att.step(stat=g) for g in [1.0, 0.9, 0.6, 0.4]]
    assert fired == [False, False, False, True] and att.node == traj.last - 2


def test_attachment_state_round_trips():
    teacher, _, traj = _recorded()
    a = attach(teacher, traj, FixedInterval(3))
    for _ in range(4):
        a.step()
    state = a.state_dict()
    a.detach()
    b = attach(teacher, traj, FixedInterval(1))
    b.load_state_dict(state)
    assert b.node == 2 and b.cursor.steps_in_node == 1 and b.verify() < 1e-5


def test_bad_input_is_refused_with_its_name():
    teacher, fake, traj = _recorded()
    with pytest.raises(ValueError, match=r"attach needs a schedule.*FixedInterval.from_share"):
        attach(teacher, traj)
    att = attach(teacher, traj, "manual")
    with pytest.raises(RuntimeError, match="already attached"):
        attach(teacher, traj, "manual")
    with pytest.raises(IndexError, match="out of range 0..4"):
        att.set_node(5)
    att.detach()
    att.detach()  # a second detach does nothing
    with pytest.raises(RuntimeError, match="detached"):
        att.set_node(1)
    changed = copy.deepcopy(teacher)
    with torch.no_grad():
        changed.conv1.bias.add_(1e-3)
    with pytest.raises(ValueError, match="does not hold the weights of the trajectory's teacher"):
        attach(changed, traj, "manual")
    with pytest.raises(ValueError, match="does not have the structure"):
        attach(torch.nn.Linear(3, 3), traj, "manual")
    with torch.no_grad():
        teacher.conv0.bias.add_(1.0)  # the teacher itself modified after recording
    with pytest.raises(ValueError, match="changed since the trajectory was recorded"):
        attach(teacher, traj, "manual")
    with pytest.raises(TypeError, match="schedule must be a schedule"):
        attach(fake, Trajectory(fake, traj.nodes, kind="lora", lora=traj.lora), schedule=5)
    with pytest.raises(TypeError, match="module must be"):
        attach("unet", traj, "manual")
    quantised = copy.deepcopy(fake)
    quantised.conv0.weight = torch.nn.Parameter(quantised.conv0.weight.detach().to(torch.int8), requires_grad=False)
    with pytest.raises(TypeError, match="'conv0.weight' has dtype torch.int8: a node's weights cannot be cast"):
        attach(quantised, traj, "manual")


def test_recorder_and_recording_refuse_or_accept_what_users_pass():
    teacher = CustomEDM()
    with pytest.raises(ValueError, match="interval=, or steps= and nodes="):
        DegradationRecorder(teacher, interval=None)
    with pytest.raises(ValueError, match="not the teacher itself"):
        DegradationRecorder(teacher, teacher, interval=2)
    other = CustomEDM()
    with pytest.raises(ValueError, match="weights differ"):
        DegradationRecorder(teacher, other, interval=2)
    with pytest.raises(ValueError, match=r"probe sigma must have shape \[4\]"):
        DegradationRecorder(teacher, interval=2, probe=(torch.randn(4, 2, 8, 8), torch.ones(3), None))
    with pytest.raises(ValueError, match="probe cond must be a tensor, or a dict of tensors, with 4 rows"):
        DegradationRecorder(teacher, interval=2, probe=(torch.randn(4, 2, 8, 8), torch.ones(4), torch.ones(3)))
    rec = DegradationRecorder(teacher, interval=5)
    with pytest.raises(ValueError, match="no node recorded yet"):
        rec.trajectory()

    class TwoArg(torch.nn.Module):  # a hand-written loop's D(x, sigma)
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)

        def forward(self, x, sigma):
            return self.lin(x) / (1 + sigma[:, None] ** 2)

    with pytest.raises(TypeError, match=r"Unconditional\(teacher\)"):
        check_denoiser(TwoArg(), "teacher")
    net = Unconditional(TwoArg())
    g0 = lambda z: z * 0.5  # noqa: E731  a one-argument generator
    loss = lambda d, x0: ((d(x0 + torch.randn_like(x0), torch.ones(x0.shape[0])) - x0) ** 2).mean()  # noqa: E731
    runs = [record_degradation(net, g0, loss, lambda: torch.randn(16, 2), steps=6, nodes=3, lr=1e-2, seed=7,
                               mode="full") for _ in range(2)]
    assert runs[0].steps == [2, 4, 6]
    assert all(torch.equal(a[k], b[k]) for a, b in zip(runs[0].nodes, runs[1].nodes) for k in a)  # seed= reproduces
    with pytest.raises(TypeError, match="ScoreDistiller .* or a loss callable"):
        record_degradation(net, g0, object(), lambda: torch.randn(16, 2), steps=2, nodes=1)
    with pytest.raises(TypeError, match="must return a Batch"):
        record_degradation(net, g0, loss, lambda: "z", steps=2, nodes=1)
    assert lora_parameters(net) == []


def test_make_generator_passes_sigma_as_a_tensor():
    teacher = CustomEDM()  # its forward calls sigma.to(...), as NVlabs' EDMPrecond does
    g = make_generator(teacher, 80.0)
    assert g(torch.randn(3, 2, 8, 8)).shape == (3, 2, 8, 8)


def test_attach_inside_a_ddp_wrapped_guidance_module(tmp_path):
    """As DMD2 under accelerate: the guidance module (frozen real_unet + trainable fake_unet) is DDP-wrapped."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    class Guidance(torch.nn.Module):
        def __init__(self, real, fake):
            super().__init__()
            self.real_unet, self.fake_unet = real.requires_grad_(False), fake

        def forward(self, x0):
            return _user_dsm(self.fake_unet, x0) + 0 * self.real_unet(x0, torch.ones(x0.shape[0])).sum()

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        teacher, fake, traj = _recorded()
        original = _snapshot(teacher)
        ddp = DistributedDataParallel(Guidance(teacher, fake))
        opt = torch.optim.SGD(ddp.parameters(), lr=1e-2)
        att = attach(ddp.module.real_unet, traj, FixedInterval(1), fake=ddp.module.fake_unet)
        for _ in range(traj.last):
            opt.zero_grad()
            ddp(torch.randn(4, 2, 8, 8)).backward()
            opt.step()
            assert att.verify() < 1e-5
            att.step()
        assert att.node == 0 and _equal(teacher, original)
        assert all(p.grad is not None for p in fake.parameters())  # the user's fake kept training through DDP
    finally:
        dist.destroy_process_group()


def test_a_hand_written_loop_with_module_nodes_and_two_argument_networks():
    """A small loop's own path: degraded copies kept as a list of modules, D(x, sigma) networks."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = torch.nn.Linear(3, 16), torch.nn.Linear(16, 2)

        def forward(self, x, sigma):
            return self.fc2(torch.tanh(self.fc1(torch.cat([x, sigma.log()[:, None]], 1))))

    torch.manual_seed(0)
    teacher = Net()
    copies = []
    for i in range(3):
        m = copy.deepcopy(teacher)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.1 * (i + 1) * torch.randn_like(p))
        copies.append(m)
    traj = Trajectory(teacher, copies, kind="full")  # modules are accepted as full nodes
    x, s = torch.randn(5, 2), torch.rand(5) + 0.5
    original, pristine = _snapshot(teacher), copy.deepcopy(teacher)
    att = attach(teacher, traj, FixedInterval(1), start=3)
    with torch.no_grad():
        assert torch.equal(teacher(x, s), copies[2](x, s))  # a 2-argument network, switched in place
        for k in (2, 1, 0):
            att.step()
            assert torch.equal(teacher(x, s), (copies[k - 1] if k else pristine)(x, s))
    assert _equal(teacher, original)
    with pytest.raises(ValueError, match="module nodes are full copies"):
        Trajectory(teacher, copies, kind="lora", lora=LoraSpec(rank=2))




def test_the_recorder_applies_the_measured_learning_rate_scale():
    """The public default is the benchmarks' path: LoRA nodes at 3x the fake score's lr, full/SVD at 1x."""
    from disback_core.recording import DEGRADATION_LR_SCALE

    assert DEGRADATION_LR_SCALE == {"lora": 3.0, "svd": 1.0, "full": 1.0}
    teacher = CustomEDM()
    rec = DegradationRecorder(teacher, steps=4, nodes=2, lr=1e-4)
    assert rec.lr == pytest.approx(3e-4) and rec.lr_scale == 3.0
    x0 = torch.randn(4, 2, 8, 8)
    rec.update(_user_dsm(rec.module, x0))
    assert rec.optimizer.param_groups[0]["lr"] == pytest.approx(3e-4)  # the Adam really runs at 3x
    assert DegradationRecorder(teacher, steps=4, nodes=2, lr=1e-4, mode="full").lr == pytest.approx(1e-4)
    assert DegradationRecorder(teacher, steps=4, nodes=2, lr=1e-4, degradation_lr_scale=1).lr == pytest.approx(1e-4)
    with pytest.raises(ValueError, match="degradation_lr_scale scales the recorder's own Adam"):
        DegradationRecorder(teacher, steps=4, nodes=2, optimizer=torch.optim.SGD, degradation_lr_scale=3)
    with pytest.raises(ValueError, match="degradation_lr_scale must be > 0"):
        DegradationRecorder(teacher, steps=4, nodes=2, degradation_lr_scale=0)
    g0 = make_generator(teacher, 80.0).requires_grad_(False)
    traj = record_degradation(teacher, g0, DMD2(), lambda: Batch(torch.randn(4, 2, 8, 8)), steps=2, nodes=1, lr=1e-4)
    assert traj.meta["lr"] == pytest.approx(3e-4) and traj.meta["lr_scale"] == 3.0


def test_a_recording_loss_on_another_module_is_refused():
    teacher = CustomEDM()
    fake = copy.deepcopy(teacher).requires_grad_(True)
    x0 = torch.randn(4, 2, 8, 8)
    rec = DegradationRecorder(teacher, steps=4, nodes=2)  # the recorder made its own copy: rec.module is not fake
    with pytest.raises(ValueError, match="gives rec.module's trainable parameters no gradient"):
        rec.update(_user_dsm(fake, x0))
    with pytest.raises(ValueError, match="has no gradient: compute it with rec.module"):
        rec.update(_user_dsm(teacher.requires_grad_(False), x0).detach())
    # stepping one's own optimizer over another module, then rec.step(): the node would be the teacher
    rec = DegradationRecorder(teacher, steps=2, nodes=2, probe=x0)
    opt = torch.optim.Adam(fake.parameters(), 1e-2)
    loss = _user_dsm(fake, x0)
    loss.backward()
    opt.step()
    with pytest.raises(RuntimeError, match="rec.module did not move"):
        rec.step()


def test_copying_the_attached_teacher_warns_while_it_holds_a_degraded_node():
    teacher, _, traj = _recorded()
    original = _snapshot(teacher)
    att = attach(teacher, traj, FixedInterval(1))
    with pytest.warns(UserWarning, match="while DisBack holds node 3 in it"):
        generator = copy.deepcopy(teacher)  # the trap: a generator made from the teacher after attach
    assert not _equal(generator, original)  # it really is the degraded node
    assert "__deepcopy__" not in generator.__dict__  # the copy carries no hook
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        traj.materialize(2)  # the library's own copies (overwritten with a node) stay quiet
        att.set_node(0)
        copy.deepcopy(teacher)  # at node 0 the module is the teacher
        att.set_node(3)
    fresh = CustomEDM()
    fresh.load_state_dict(att.original_state_dict())
    assert _equal(fresh, original)  # the route the warning names gives the teacher's weights
    att.detach()
    assert "__deepcopy__" not in teacher.__dict__ and _equal(teacher, original)
