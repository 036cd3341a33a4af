"""Flow-matching transformers end to end: tiny random SD3, FLUX, SANA and Wan through DMD2, Degradation
Recording with LoRA nodes, save/load/verify, Backtrack and an attachment to the raw transformer; Diff-Instruct
and SiD through the flow wrapper; a path recorded on a raw transformer in its own units (call convention
"flow-transformer") that verifies after a load.

Every check compares the library's values with a closed form or bit for bit: the DMD2 and Diff-Instruct
generator gradients with their formulas, node outputs with the recorded ones and with each other (each node
is told apart from every other), switched modules with the recorded node, the detached module with the
original tensors.
"""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from disback_core import (
    Backtrack,
    Batch,
    DegradationRecorder,
    FixedInterval,
    LoraSpec,
    Trajectory,
    attach,
    freeze,
    record_degradation,
    train_step,
    trainable_copy,
)
from disback_core.adapters import DMD2, DiffInstruct, SiD
from disback_core.flow import FlowMatchDenoiser, flux_image_ids, make_flow_generator, pack_latents, unpack_latents
from disback_core.presets import build_model, example_cond, sample_shape
from disback_core.recording import probe_inputs_raw
from disback_core.sigmas import LogitNormalSigma
from disback_core.trajectory import call_flow_transformer, probe_error

ARCHS = ["tiny-sd3", "tiny-flux", "tiny-sana", "tiny-wan"]
ATTN = ("to_q", "to_k", "to_v", "to_out.0")  # explicit: independent of lora.py's default target sets
B = 2
TOL = 1e-5  # merged nodes against the recorded (unmerged) slot: float rounding only
APART = 1e-3  # another node's outputs are at least this far from a node's


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _teacher(preset: str) -> tuple[torch.nn.Module, FlowMatchDenoiser]:
    torch.manual_seed(0)
    model = build_model(preset).eval()
    return model, freeze(FlowMatchDenoiser(model, FlowMatchEulerDiscreteScheduler()))


def _sampler(model: torch.nn.Module, seed: int):
    g = torch.Generator().manual_seed(seed)

    def sample() -> Batch:
        return Batch(torch.randn(sample_shape(model, B), generator=g), example_cond(model, B, generator=g))

    return sample


def _dmd2() -> DMD2:
    return DMD2(fake_sigma_sampler=LogitNormalSigma(shift=3.0), critic_steps=1)


def _params(m: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in m.parameters()]


def _changed(before: list[torch.Tensor], m: torch.nn.Module) -> bool:
    return any(not torch.equal(a, p) for a, p in zip(before, m.parameters()))


def _state(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _same_state(m: torch.nn.Module, snap: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, snap[k]) for k, v in m.state_dict().items())


def _told_apart(traj: Trajectory, call=None) -> None:
    """Node j's target reproduces node j's recorded outputs (<= TOL) and no other node's (> APART)."""
    fn = traj.probe_runner(call)
    for j in range(len(traj)):
        errs = [probe_error(traj.target(j), traj.probe, k, fn) for k in range(len(traj))]
        assert errs[j] <= TOL, (j, errs)
        assert all(e > APART for k, e in enumerate(errs) if k != j), (j, errs)


# ----------------------------------------------------------------------------- DMD2, recording, backtracking


@pytest.mark.parametrize("preset", ARCHS)
def test_dmd2_step_on_every_flow_architecture(preset):
    model, teacher = _teacher(preset)
    generator = make_flow_generator(teacher)  # t = 1: the input is exactly the noise (sigma_init = inf)
    fake = trainable_copy(teacher)
    sample = _sampler(model, 1)
    b = sample()
    with torch.no_grad():  # a copy of the teacher at t = 1 is the teacher's own x0 from pure noise, bit for bit
        assert torch.equal(generator(b.z, b.cond), teacher.from_noise(b.z, b.cond))
    method = _dmd2()
    g0, f0 = _params(generator), _params(fake)
    g_opt = torch.optim.Adam(generator.parameters(), 1e-3)
    f_opt = torch.optim.Adam(fake.parameters(), 1e-3)
    logs = train_step(method, generator, fake, teacher, g_opt, f_opt, sample)
    assert {"critic/loss", "generator/loss", "generator/score_gap"} <= set(logs)
    assert all(torch.isfinite(torch.tensor(v)) for v in logs.values()), logs
    assert _changed(g0, generator) and _changed(f0, fake)
    assert all(torch.isfinite(p).all() for p in [*generator.parameters(), *fake.parameters()])
    # the generator gradient is DMD2's closed form, d(0.5 mse(x, x - g))/dx = g / numel, with
    # g = (D_fake - D_real) / mean|x - D_real| through the flow wrapper (non-zero: the fake has trained)
    x = torch.randn(sample_shape(model, B), requires_grad=True)
    torch.manual_seed(5)
    grad, _ = method.distribution_matching_grad(x, teacher, fake, b.cond)
    torch.manual_seed(5)
    sigma = method.sigma_sampler(B)
    x_t = x.detach() + sigma.view(-1, *[1] * (x.ndim - 1)) * torch.randn_like(x)
    with torch.no_grad():
        d_real, d_fake = teacher(x_t, sigma, b.cond), fake(x_t, sigma, b.cond)
    dims = tuple(range(1, x.ndim))
    want = (d_fake - d_real) / (x.detach() - d_real).abs().mean(dim=dims, keepdim=True)
    assert grad.abs().max() > 1e-4 and torch.equal(grad, want)
    torch.manual_seed(5)
    method.generator_loss(x, teacher, fake, b.cond)["loss"].backward()
    torch.testing.assert_close(x.grad, grad / x.numel(), rtol=0, atol=1e-3 * grad.abs().max().item() / x.numel())


@pytest.mark.parametrize("preset", ARCHS)
def test_lora_path_records_saves_loads_backtracks_and_attaches(preset, tmp_path):
    model, teacher = _teacher(preset)
    generator = make_flow_generator(teacher)
    spec = LoraSpec(rank=2, target_modules=ATTN)
    traj = record_degradation(
        teacher, generator, _dmd2(), _sampler(model, 2), steps=4, interval=2, lr=3e-2, lora=spec, probe_size=B, seed=0
    )
    assert traj.last == 2 and traj.steps == [2, 4] and traj.call_name == "denoiser"
    assert all(
        n.startswith("model.") and n.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "0")
        for n in traj.lora.target_modules
    )
    traj.save(tmp_path / "path")
    loaded = Trajectory.load(tmp_path / "path", teacher)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(traj.nodes, loaded.nodes) for k in a)
    errs = loaded.verify()
    assert errs[0] == 0.0 and max(errs) <= TOL, errs
    _told_apart(loaded)

    # Backtrack: the target at node k is the recorded trajectory's target(k), bit for bit, then the teacher
    p = loaded.probe
    bt = Backtrack(_dmd2(), loaded, FixedInterval(every=1))
    fake = bt.initial_fake()
    with torch.no_grad():
        torch.testing.assert_close(fake(p.x, p.sigma, p.cond), p.outputs[loaded.last], rtol=0, atol=TOL)
    g_opt = torch.optim.Adam(generator.parameters(), 1e-4)
    f_opt = torch.optim.Adam(fake.parameters(), 1e-4)
    seen = []
    for _ in range(loaded.last):
        k = bt.node
        with torch.no_grad():
            out = bt.target(p.x, p.sigma, p.cond)
            assert torch.equal(out, traj.target(k)(p.x, p.sigma, p.cond))
        assert (out - p.outputs[k]).abs().max() <= TOL
        seen.append(k)
        logs = train_step(bt, generator, fake, bt.target, g_opt, f_opt, _sampler(model, 3))
        assert all(torch.isfinite(torch.tensor(v)) for v in logs.values())
    assert seen == [1, 0][: loaded.last] and bt.node == 0
    with torch.no_grad():
        assert torch.equal(bt.target(p.x, p.sigma, p.cond), teacher(p.x, p.sigma, p.cond))

    # attach to the raw transformer inside the wrapper: every switch verified, node 0 and detach bit-exact
    original = _state(model)
    att = attach(model, loaded, FixedInterval(every=1), start=loaded.last)
    assert att.prefix == "model."
    nodes = []
    while True:
        nodes.append(att.node)
        with torch.no_grad():  # the module the user calls now holds this node, and no other
            out = teacher(p.x, p.sigma, p.cond)
        err = float((out - p.outputs[att.node]).abs().max())
        assert att.verify() == err <= TOL, (att.node, att.verify(), err)
        assert all((out - p.outputs[k]).abs().max() > APART for k in range(len(loaded)) if k != att.node)
        if att.node == 0:
            break
        assert att.step()
    assert nodes == list(range(loaded.last, -1, -1))
    assert _same_state(model, original)
    att.set_node(loaded.last)
    assert not _same_state(model, original)
    att.detach()
    assert _same_state(model, original)
    # a separate copy of the raw transformer cannot run the wrapper's probe: refused, not verified wrongly
    other = copy.deepcopy(model)
    with attach(other, loaded, "manual") as att:
        assert att.prefix == "model."
        with pytest.raises(ValueError, match="copy of its submodule 'model'.*call=fn"):
            att.verify()


# ----------------------------------------------------------------------------- Diff-Instruct and SiD


def test_diff_instruct_gradient_is_its_closed_form_and_a_step_trains():
    model, teacher = _teacher("tiny-sd3")
    generator, fake = make_flow_generator(teacher), trainable_copy(teacher)
    method = DiffInstruct()
    sample = _sampler(model, 4)
    f_opt = torch.optim.Adam(fake.parameters(), 1e-3)
    train_step(method, generator, fake, teacher, torch.optim.SGD(generator.parameters(), 0.0), f_opt, sample)
    # IKL: loss = sum((D_fake - D_real).detach() * x) / B, so dloss/dx = (D_fake - D_real) / B exactly
    b = sample()
    x = torch.randn(sample_shape(model, B), requires_grad=True)
    torch.manual_seed(6)
    method.generator_loss(x, teacher, fake, b.cond)["loss"].backward()
    torch.manual_seed(6)
    sigma = method.sigma_sampler(B)
    x_t = x.detach() + sigma.view(-1, 1, 1, 1) * torch.randn_like(x)
    with torch.no_grad():
        want = (fake(x_t, sigma, b.cond) - teacher(x_t, sigma, b.cond)) / B
    assert want.abs().max() > 0 and torch.equal(x.grad, want)
    g0, f0 = _params(generator), _params(fake)
    logs = train_step(method, generator, fake, teacher, torch.optim.Adam(generator.parameters(), 1e-3), f_opt, sample)
    assert (
        all(torch.isfinite(torch.tensor(v)) for v in logs.values()) and _changed(g0, generator) and _changed(f0, fake)
    )


def test_sid_differentiates_through_both_flow_scores():
    model, teacher = _teacher("tiny-sd3")
    b = _sampler(model, 5)()
    # the input derivative SiD uses, through the float64 flow conversion, against finite differences
    m64 = copy.deepcopy(model).double()
    d64 = FlowMatchDenoiser(m64, FlowMatchEulerDiscreteScheduler())
    cond64 = {k: v.double() for k, v in b.cond.items()}
    x = torch.randn(sample_shape(model, B), dtype=torch.float64, requires_grad=True)
    sigma = torch.tensor([0.7, 3.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: d64(x, sigma, cond64), (x,), fast_mode=True, atol=1e-6)

    method = SiD()
    generator, fake = make_flow_generator(teacher), trainable_copy(teacher)
    # fake == target: f_r - f_f is 0 and so is the loss and its gradient, exactly, with the graph connected
    out = method.generator_loss(generator(b.z, b.cond), teacher, fake, b.cond)
    out["loss"].backward()
    grads = [p.grad for p in generator.parameters()]
    assert out["loss"].item() == 0.0 and all(g is not None and not g.any() for g in grads)
    generator.zero_grad(set_to_none=True)
    # after a critic step the fake differs: a finite, non-zero gradient reaches the generator through both scores
    g0, f0 = _params(generator), _params(fake)
    g_opt = torch.optim.Adam(generator.parameters(), 1e-3)
    f_opt = torch.optim.Adam(fake.parameters(), 1e-3)
    logs = train_step(method, generator, fake, teacher, g_opt, f_opt, _sampler(model, 6))
    assert all(torch.isfinite(torch.tensor(v)) for v in logs.values()), logs
    assert logs["generator/loss"] != 0.0 and _changed(g0, generator) and _changed(f0, fake)
    assert all(p.grad is None for p in teacher.parameters())  # the target's parameters stay frozen


# ----------------------------------------------------------------------------- a raw transformer's own call


@pytest.mark.parametrize("preset", ARCHS)
def test_flow_transformer_convention_is_the_wrappers_own_model_call(preset):
    """``call_flow_transformer(model, x, timestep, cond)`` is the velocity FlowMatchDenoiser computes, bit
    for bit (FLUX: packed tokens and per-sample ``img_ids``/``txt_ids``, as a probe stores them)."""
    model, d = _teacher(preset)
    x, cond = torch.randn(sample_shape(model, B)), example_cond(model, B)
    t = torch.tensor([0.3, 0.8], dtype=torch.float64)
    with torch.no_grad():
        want = d.velocity(x, t, cond)
        if preset == "tiny-flux":
            h, w = x.shape[-2:]
            ids = {"img_ids": flux_image_ids(h, w).expand(B, -1, -1), "txt_ids": torch.zeros(B, 5, 3)}
            got = unpack_latents(call_flow_transformer(model, pack_latents(x), t.float(), {**cond, **ids}), h, w)
        else:
            got = call_flow_transformer(model, x, (t * d.time_scale).float(), cond)
    assert torch.equal(got.double(), want)


def test_a_path_recorded_on_the_raw_transformer_verifies_after_load(tmp_path):
    """Recorded on the raw SD3 transformer (``m(hidden_states=x, timestep=1000 t, **cond)``, the user's
    own velocity loss): the "flow-transformer" convention travels in the manifest, so the loaded path
    verifies, and so does an attachment to the raw module."""
    torch.manual_seed(0)
    model = build_model("tiny-sd3").eval().requires_grad_(False)
    fake = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(sample_shape(model, 3), generator=g)
    cond = example_cond(model, 3, generator=g)
    probe = probe_inputs_raw(model, x0, cond, FlowMatchEulerDiscreteScheduler(), seed=3)
    x, timestep, _ = probe
    t = torch.tensor([0.05, 0.5, 0.95])  # closed form: x = (1 - t) x0 + t eps, timestep = 1000 t
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(x, (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps)
    torch.testing.assert_close(timestep, 1000 * t)
    rec = DegradationRecorder(
        model, fake, steps=6, nodes=3, lr=3e-2, lora=LoraSpec(rank=2, target_modules=ATTN),
        call="flow-transformer", probe=probe,
    )  # fmt: skip
    for _ in range(6):
        x0, c = torch.randn(sample_shape(model, B), generator=g), example_cond(model, B, generator=g)
        tt, n = torch.rand(B, generator=g), torch.randn(sample_shape(model, B), generator=g)
        xt = (1 - tt.view(-1, 1, 1, 1)) * x0 + tt.view(-1, 1, 1, 1) * n
        v = rec.module(hidden_states=xt, timestep=1000 * tt, return_dict=False, **c)[0]
        rec.update(torch.nn.functional.mse_loss(v, n - x0))
    traj = rec.trajectory()
    assert traj.call_name == "flow-transformer" and traj.last == 3
    traj.save(tmp_path / "raw")
    loaded = Trajectory.load(tmp_path / "raw", model)
    assert loaded.call_name == "flow-transformer" and loaded.call_fn is call_flow_transformer
    errs = loaded.verify()
    assert errs[0] == 0.0 and max(errs) <= TOL, errs
    _told_apart(loaded)

    user = copy.deepcopy(model)  # the user's own copy of the raw module
    original = _state(user)
    att = attach(user, loaded, FixedInterval(every=1), start=loaded.last)
    assert att.prefix == ""
    p = loaded.probe
    for k in range(loaded.last, -1, -1):
        with torch.no_grad():  # the raw module holds node k, and no other
            out = call_flow_transformer(user, p.x, p.sigma, p.cond)
        err = float((out - p.outputs[k]).abs().max())
        assert att.node == k and att.verify() == err <= TOL, (k, att.verify(), err)
        assert all((out - p.outputs[j]).abs().max() > APART for j in range(len(loaded)) if j != k)
        att.step()
    assert _same_state(user, original)
    att.detach()
    assert _same_state(user, original)
