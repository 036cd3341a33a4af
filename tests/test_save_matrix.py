"""No save that cannot be loaded (issue 21 item 2): every save path, over the combinations users make,
is loaded back and compared exactly. Hypothesis draws the combinations (derandomised: the same cases
on every run); a save is either refused before anything is written, or loads bit-exactly.

- trajectories: node mode x probe kind (none, clean x0, ready inputs with float or integer timesteps,
  tensor / class-label / nested-dict conditions) x call convention x teacher dtype;
- training states: optimizer class and options x scheduler x extra kinds x module dtype x RNG generators;
- exports: generator kind x dtype (see also tests/test_export*.py).
"""

import copy
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from disback_core import DegradationRecorder, LoraSpec, StorageError, Trajectory, load_state, save_state

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


class CondDenoiser(nn.Module):
    """D(x, sigma, cond) with a condition of any kind users pass: None, a tensor, class labels, a dict."""

    def __init__(self, dim=3, width=16):
        super().__init__()
        self.inp = nn.Linear(dim + 1, width)
        self.cond = nn.Linear(4, width)
        self.label = nn.Embedding(5, width)
        self.out = nn.Linear(width, dim)

    def _embed(self, cond, ref):
        if cond is None:
            return 0
        if isinstance(cond, dict):
            return sum(self._embed(v, ref) for v in cond.values())
        if not torch.is_floating_point(cond):
            return self.label(cond)
        return self.cond(cond.to(ref.dtype))

    def forward(self, x, sigma, cond=None):
        dt = self.inp.weight.dtype
        s = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1, 1).expand(x.shape[0], 1)
        h = self.inp(torch.cat([x.float(), s.log1p() / 4], 1).to(dt))
        h = torch.nn.functional.silu(h + self._embed(cond, h))
        return (x.float() / (1 + s**2) + self.out(h).float() * s / (1 + s**2).sqrt()).to(x.dtype)


def int_call(m, x, t, c):
    """A raw-model style convention: integer timesteps in the model's own units (here /100)."""
    return m(x, t.float() / 100, c)


CONDS = {
    "none": lambda n, g: None,
    "tensor": lambda n, g: torch.randn(n, 4, generator=g),
    "labels": lambda n, g: torch.randint(0, 5, (n,), generator=g),
    "dict": lambda n, g: {"a": torch.randn(n, 4, generator=g), "b": {"c": torch.randint(0, 5, (n,), generator=g)}},
}


def _record(mode, probe_kind, cond_kind, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    teacher = CondDenoiser().to(dtype).requires_grad_(False)
    call, call_name = "denoiser", None
    n = 6
    x = torch.randn(n, 3, generator=g).to(dtype)
    cond = CONDS[cond_kind](n, g)
    if probe_kind == "none":
        probe = None
    elif probe_kind == "x0":
        probe = x
    elif probe_kind == "float-sigma":
        probe = (x, torch.rand(n, generator=g).to(dtype) * 5 + 0.1, cond)
    else:  # "int-timesteps" under a named function convention
        probe = (x, torch.randint(1, 999, (n,), generator=g), cond)
        call, call_name = int_call, "test-int-call"
    rec = DegradationRecorder(teacher, copy.deepcopy(teacher).requires_grad_(True), steps=4, nodes=2, mode=mode, lr=3e-2,
                              lora=LoraSpec(rank=2), probe=probe, call=call, call_name=call_name)
    for _ in range(4):
        xb = torch.randn(8, 3, generator=g).to(dtype)
        cb = CONDS[cond_kind](8, g)
        sigma = torch.full((8,), 1.0)
        out = rec.module(xb + torch.randn_like(xb) * 0.5, sigma, cb)
        rec.update(((out.float() - xb.float() - 1.0) ** 2).mean())
    return teacher, rec.trajectory()


@SETTINGS
@given(mode=st.sampled_from(["lora", "svd", "full"]),
       probe=st.sampled_from(["none", "x0", "float-sigma", "int-timesteps"]),
       cond=st.sampled_from(list(CONDS)), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       seed=st.integers(0, 2**16))
def test_every_trajectory_save_loads_bit_exactly(tmp_path_factory, mode, probe, cond, dtype, seed):
    if probe == "x0" and cond != "none":
        cond = "none"  # clean samples carry no condition (ready inputs do)
    teacher, traj = _record(mode, probe, cond, dtype, seed)
    folder = tmp_path_factory.mktemp("traj") / "p"
    traj.save(folder)
    back = Trajectory.load(folder, teacher, call=int_call if probe == "int-timesteps" else None)
    assert len(back.nodes) == len(traj.nodes)
    for a, b in zip(back.nodes, traj.nodes):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    if traj.probe is None:
        assert back.probe is None
        return
    assert torch.equal(back.probe.x, traj.probe.x) and torch.equal(back.probe.sigma, traj.probe.sigma)
    assert back.probe.sigma.dtype == traj.probe.sigma.dtype
    assert all(torch.equal(a, b) for a, b in zip(back.probe.outputs, traj.probe.outputs))
    errs = back.verify()
    assert errs == traj.verify() and errs[0] == 0.0  # the same inputs bit for bit: the same errors
    assert max(errs) <= (1e-2 if dtype == torch.bfloat16 else 1e-5)


OPTIMIZERS = {
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw-amsgrad": lambda p: torch.optim.AdamW(p, lr=1e-2, amsgrad=True, weight_decay=0.1),
    "sgd-nesterov": lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, nesterov=True),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3, centered=True),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-2),
    "two-groups": lambda p: torch.optim.Adam([{"params": p[:1], "lr": 1e-3}, {"params": p[1:], "betas": (0.5, 0.9)}]),
}
SCHEDULERS = {
    "none": None,
    "step": lambda o: torch.optim.lr_scheduler.StepLR(o, 2, gamma=0.5),
    "cosine": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, 10),
    "onecycle": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=20, cycle_momentum=False),
}
EXTRAS = {
    "plain": {"epoch": 3, "name": "run"},
    "exact": {"t": (1, (2.5, None)), "k": {1: "a", (2, 3): [True]}, "nan": math.nan, "inf": -math.inf},
    "tensor": {"ema": torch.arange(4.0), "nested": [{"x": torch.ones(2, dtype=torch.bfloat16)}]},
}


def _objects(opt_kind, sched_kind, dtype, seed):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 5), nn.GELU(), nn.Linear(5, 2)).to(dtype)
    opt = OPTIMIZERS[opt_kind](list(net.parameters()))
    sched = SCHEDULERS[sched_kind](opt) if SCHEDULERS[sched_kind] else None
    return net, opt, sched


def _train(net, opt, sched, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        net(torch.randn(4, 3, generator=g).to(net[0].weight.dtype)).float().pow(2).mean().backward()
        opt.step()
        if sched is not None:
            sched.step()


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return type(a) is type(b) and a == b


@SETTINGS
@given(opt=st.sampled_from(list(OPTIMIZERS)), sched=st.sampled_from(list(SCHEDULERS)),
       extra=st.sampled_from(list(EXTRAS)), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       gens=st.integers(0, 2), steps=st.integers(0, 3), seed=st.integers(0, 2**16))
def test_every_state_save_loads_exactly(tmp_path_factory, opt, sched, extra, dtype, gens, steps, seed):
    net, o, s = _objects(opt, sched, dtype, seed)
    _train(net, o, s, steps, seed)
    generators = {f"g{i}": torch.Generator().manual_seed(seed + i) for i in range(gens)}
    for gen in generators.values():
        torch.rand(3, generator=gen)
    folder = tmp_path_factory.mktemp("state")
    kw = {"schedulers": {"lr": s}} if s is not None else {}
    save_state(folder, step=steps, modules={"net": net}, optimizers={"opt": o}, generators=generators,
               extra=EXTRAS[extra], config={"opt": opt, "dtype": str(dtype)}, **kw)
    net2, o2, s2 = _objects(opt, sched, dtype, seed + 1)
    gens2 = {k: torch.Generator() for k in generators}
    kw2 = {"schedulers": {"lr": s2}} if s2 is not None else {}
    got = load_state(folder, modules={"net": net2}, optimizers={"opt": o2}, generators=gens2,
                     config={"opt": opt, "dtype": str(dtype)}, **kw2)
    assert got["step"] == steps and _same(got["extra"], EXTRAS[extra])
    assert _same(net2.state_dict(), net.state_dict()) and _same(o2.state_dict(), o.state_dict())
    if s is not None:
        assert _same(s2.state_dict(), s.state_dict())
    for k, gen in generators.items():
        assert torch.equal(gens2[k].get_state(), gen.get_state())
    _train(net, o, s, 1, seed + 7)  # and the next step is the same step
    _train(net2, o2, s2, 1, seed + 7)
    assert _same(net2.state_dict(), net.state_dict())


def test_a_state_with_another_config_or_an_unsaved_object_is_refused_not_half_loaded(tmp_path):
    net, o, _ = _objects("adam", "none", torch.float32, 0)
    save_state(tmp_path, step=1, modules={"net": net}, optimizers={"opt": o}, config={"a": 1})
    net2, o2, _ = _objects("adam", "none", torch.float32, 1)
    before = copy.deepcopy(net2.state_dict())
    with pytest.raises(StorageError, match=r"differing keys: a: 1 in the state, 2 given"):
        load_state(tmp_path, modules={"net": net2}, optimizers={"opt": o2}, config={"a": 2})
    with pytest.raises(StorageError, match=r"'other'"):
        load_state(tmp_path, modules={"net": net2, "other": nn.Linear(1, 1)}, config={"a": 1})
    assert _same(net2.state_dict(), before)


def test_a_frozen_copy_as_the_degrading_score_is_named_not_a_torch_error():
    teacher = CondDenoiser().requires_grad_(False)
    for mode in ("full", "svd"):
        with pytest.raises(ValueError, match=r"module has no trainable parameters .*requires_grad_\(True\)"):
            DegradationRecorder(teacher, copy.deepcopy(teacher), interval=2, mode=mode)
    DegradationRecorder(teacher, copy.deepcopy(teacher), interval=2, mode="lora")  # the slot is trainable
