"""FlowMatchDenoiser on tiny random SD3, FLUX, SANA and Wan transformers: exact x0, shifts, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from disback_core import DiffusersDenoiser
from disback_core.flow import (
    FlowMatchDenoiser,
    flow_shift,
    flow_sigmas,
    flux_image_ids,
    flux_mu,
    pack_latents,
    unpack_latents,
)
from disback_core.presets import build_model, example_cond, sample_shape

ARCHS = ["tiny-sd3", "tiny-flux", "tiny-sana", "tiny-wan"]


def _setup(preset: str, batch: int = 2, **kw):
    torch.manual_seed(0)
    model = build_model(preset).eval()
    d = FlowMatchDenoiser(model, FlowMatchEulerDiscreteScheduler(), **kw)
    cond = example_cond(model, batch)
    x0 = torch.randn(sample_shape(model, batch))
    return model, d, cond, x0


def _raw_velocity(model, x_flow, t, cond):
    """The model called as its diffusers pipeline calls it (independent of the wrapper)."""
    name = type(model).__name__
    kwargs = dict(cond) if isinstance(cond, dict) else {"encoder_hidden_states": cond}
    h = x_flow
    if name == "FluxTransformer2DModel":
        h = pack_latents(x_flow)
        kwargs["img_ids"] = flux_image_ids(*x_flow.shape[-2:])
        kwargs["txt_ids"] = torch.zeros(kwargs["encoder_hidden_states"].shape[1], 3)
        timestep = t  # FluxPipeline passes timestep / 1000
    else:
        timestep = t * 1000
    v = model(hidden_states=h, timestep=timestep, return_dict=False, **kwargs)[0]
    return unpack_latents(v, *x_flow.shape[-2:]) if name == "FluxTransformer2DModel" else v


@pytest.mark.parametrize("preset", ARCHS)
@torch.no_grad()
def test_x0_equals_the_models_own_flow_x0(preset):
    """D(x, sigma) = x_flow - t v at t = sigma / (1 + sigma), x = (1 + sigma) x_flow, within 1e-6."""
    model, d, cond, _ = _setup(preset)
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(10)
    x_flow = torch.randn(sample_shape(model, 2), dtype=torch.float64)
    for i in (1, 4, 8):
        t = scheduler.sigmas[i].double().expand(2)
        tb = t.view(-1, *[1] * (x_flow.ndim - 1))
        v = _raw_velocity(model, x_flow.float(), t.float(), cond).double()
        own = x_flow - tb * v
        sigma = t / (1 - t)
        got = d(x_flow * (1 + sigma.view_as(tb)), sigma, cond)
        assert got.dtype == torch.float64
        assert (got - own).abs().max() < 1e-6, (preset, i)
        assert (d.flow_x0(x_flow, t, cond) - own).abs().max() < 1e-6
        # diffusers' Euler step from t straight to t = 0 is the same x0
        euler = x_flow + (0.0 - tb) * v
        assert (got - euler).abs().max() < 1e-6


@pytest.mark.parametrize("preset", ARCHS)
@torch.no_grad()
def test_from_noise_is_the_model_at_t_one_on_the_noise_itself(preset):
    model, d, cond, _ = _setup(preset)
    z = torch.randn(sample_shape(model, 2))
    v = _raw_velocity(model, z, torch.ones(2), cond)
    assert torch.allclose(d.from_noise(z, cond), z - v, atol=1e-6)


@torch.no_grad()
def test_euler_step_to_zero_is_the_wrapper_x0():
    """FlowMatchEulerDiscreteScheduler.step with the last sigma 0 is x - t v = D's x0."""
    model, d, cond, _ = _setup("tiny-sd3")
    s = FlowMatchEulerDiscreteScheduler(shift=3.0)
    s.set_timesteps(1)  # sigmas = [1, 0]: one Euler step from pure noise to t = 0
    z = torch.randn(sample_shape(model, 2))
    v = _raw_velocity(model, z, s.sigmas[0].expand(2), cond)
    stepped = s.step(v, s.timesteps[0], z, return_dict=False)[0]
    assert (stepped - d.from_noise(z, cond)).abs().max() < 1e-6


def test_shift_is_a_factor_on_sigma():
    # SD3's static shift t' = s t / (1 + (s - 1) t) is sigma' = s sigma
    t = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    s = 3.0
    shifted = s * t / (1 + (s - 1) * t)
    assert torch.allclose(shifted / (1 - shifted), s * t / (1 - t))
    # FLUX's exponential shift e^mu / (e^mu + (1/t - 1)) is sigma' = e^mu sigma
    mu = flux_mu(1024)
    flux = math.exp(mu) / (math.exp(mu) + (1 / t - 1))
    assert torch.allclose(flux / (1 - flux), flow_shift(mu=mu) * t / (1 - t))
    assert abs(flux_mu(256) - 0.5) < 1e-12 and abs(flux_mu(4096) - 1.15) < 1e-12


def test_flow_sigmas_match_the_scheduler_and_start_at_pure_noise():
    s = FlowMatchEulerDiscreteScheduler(shift=3.0)
    s.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25])
    sig = flow_sigmas(4, shift=3.0)
    assert sig[0] == math.inf
    t = torch.tensor(sig[1:], dtype=torch.float64)
    assert torch.allclose(t / (1 + t), s.sigmas[1:4].double(), atol=1e-7)


def test_scheduler_shift_and_dynamic_shift_are_read():
    model = build_model("tiny-flux")
    d = FlowMatchDenoiser(model, FlowMatchEulerDiscreteScheduler(shift=3.0))
    assert d.shift_factor() == 3.0
    dyn = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    d = FlowMatchDenoiser(model, dyn)
    x = torch.randn(1, 4, 64, 64)  # 32 * 32 = 1024 packed tokens
    assert d.image_seq_len(x) == 1024
    assert math.isclose(d.shift_factor(x), math.exp(flux_mu(1024)))
    # the scheduler's own dynamic shift agrees
    dyn.set_timesteps(sigmas=[0.5], mu=flux_mu(1024))
    t = float(dyn.sigmas[0])
    assert math.isclose(t / (1 - t), d.shift_factor(x) * 1.0, rel_tol=1e-5)


def test_flux_guidance_and_packed_tokens():
    model = build_model(
        dict(build_model("tiny-flux").config, _class_name="FluxTransformer2DModel", guidance_embeds=True)
    )
    with pytest.raises(ValueError, match="guidance="):
        FlowMatchDenoiser(model)
    d = FlowMatchDenoiser(model, guidance=3.5)
    cond = example_cond(model, 2)
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        a = d(x, torch.tensor([2.0, 0.5]), cond)
        packed = pack_latents(x)
        d2 = FlowMatchDenoiser(model, guidance=3.5, extras={"img_ids": flux_image_ids(8, 8)})
        b = d2(packed, torch.tensor([2.0, 0.5]), cond)
    assert torch.equal(unpack_latents(b, 8, 8), a)
    assert torch.equal(unpack_latents(pack_latents(x), 8, 8), x)


def test_bad_input_names_the_argument():
    model = build_model("tiny-sd3")
    with pytest.raises(ValueError, match="not a flow-matching scheduler"):
        FlowMatchDenoiser(model, DDPMScheduler())
    with pytest.raises(ValueError, match="FlowMatchDenoiser"):
        DiffusersDenoiser(model, scheduler=FlowMatchEulerDiscreteScheduler())
    with pytest.raises(ValueError, match="not a known flow transformer"):
        FlowMatchDenoiser(torch.nn.Linear(2, 2))
    d = FlowMatchDenoiser(model)
    x = torch.randn(2, 4, 8, 8)
    cond = example_cond(model, 2)
    with pytest.raises(ValueError, match="config.joint_attention_dim is 16"):
        d(x, 1.0, {**cond, "encoder_hidden_states": torch.randn(2, 5, 32)})
    with pytest.raises(ValueError, match="config.pooled_projection_dim"):
        d(x, 1.0, {**cond, "pooled_projections": torch.randn(2, 3)})
    with pytest.raises(ValueError, match="needs 'pooled_projections'"):
        d(x, 1.0, cond["encoder_hidden_states"])
    with pytest.raises(ValueError, match="config.in_channels is 4"):
        d(torch.randn(2, 3, 8, 8), 1.0, cond)
    with pytest.raises(ValueError, match="rows but the batch has 2"):
        d(x, 1.0, {k: v[:1] for k, v in cond.items()})
    with pytest.raises(ValueError, match="takes 5-d samples"):
        FlowMatchDenoiser(build_model("tiny-wan"))(x, 1.0, torch.randn(2, 5, 16))


def test_a_raw_transformer_as_a_denoiser_is_refused_with_the_wrapper_to_use():
    from disback_core.adapters import DMD2
    from disback_core.denoisers import check_denoiser

    model = build_model("tiny-sd3")
    with pytest.raises(TypeError, match=r"raw diffusers SD3Transformer2DModel.*FlowMatchDenoiser\(model, scheduler\)"):
        check_denoiser(model, "target")
    d = FlowMatchDenoiser(model)
    x = torch.randn(2, 4, 8, 8)
    with pytest.raises(TypeError, match="target is a raw diffusers"):
        DMD2().generator_loss(x, model, d, example_cond(model, 2))


def test_flow_noise_distributions_in_closed_form():
    from disback_core.losses import DSMLoss
    from disback_core.sigmas import LogitNormalSigma, LogNormalSigma, UniformTimeSigma, flow_weight

    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = LogitNormalSigma(0.0, 1.0, shift=3.0)(1000, generator=g1)
    b = LogNormalSigma(math.log(3.0), 1.0)(1000, generator=g2)
    assert torch.equal(a, b)
    # logit t of the unshifted draws is N(0.5, 0.7^2)
    t = LogitNormalSigma(0.5, 0.7)(20000, generator=torch.Generator().manual_seed(0)).double()
    t = t / (1 + t)
    logit = (t / (1 - t)).log()
    assert abs(logit.mean() - 0.5) < 0.02 and abs(logit.std() - 0.7) < 0.02
    # uniform times, shifted: the unshifted t = sigma' / (shift + sigma') is uniform on (t_min, t_max)
    s = UniformTimeSigma(0.1, 0.9, shift=2.0)(20000, generator=torch.Generator().manual_seed(0)).double()
    u = s / (2.0 + s)
    assert u.min() >= 0.1 and u.max() <= 0.9 and abs(u.mean() - 0.5) < 0.01
    # the flow weight turns the x0 DSM loss into the velocity loss
    model, d, cond, x0 = _setup("tiny-sana")
    sigma = torch.tensor([0.3, 4.0])
    noise = torch.randn_like(x0)
    loss = DSMLoss(weight=flow_weight, reduction="mean")(d, x0, cond, sigma=sigma, noise=noise)
    t = (sigma / (1 + sigma)).view(-1, 1, 1, 1)
    x_flow = (1 - t) * x0 + t * noise
    with torch.no_grad():
        v_hat = _raw_velocity(model, x_flow, t.flatten(), cond)
    want = ((v_hat - (noise - x0)) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(loss.detach(), want, rtol=1e-4)


@torch.no_grad()
def test_teacher_cfg_on_a_flow_model_is_guidance_on_the_velocity():
    """CFGDenoiser on x0 equals SD3's pipeline guidance on v: v_u + s (v_c - v_u), since x0 = x_flow - t v."""
    from disback_core import CFGDenoiser

    model, d, cond, _ = _setup("tiny-sd3")
    null = {"encoder_hidden_states": torch.zeros(5, 16), "pooled_projections": torch.zeros(8)}
    guided = CFGDenoiser(d, 4.5, null)
    x_flow = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    t = torch.tensor([0.7, 0.2], dtype=torch.float64)
    sigma = t / (1 - t)
    got = guided(x_flow * (1 + sigma).view(-1, 1, 1, 1), sigma, cond)
    uncond = {k: v.expand(2, *v.shape) for k, v in null.items()}
    v_c = _raw_velocity(model, x_flow.float(), t.float(), cond).double()
    v_u = _raw_velocity(model, x_flow.float(), t.float(), uncond).double()
    want = x_flow - t.view(-1, 1, 1, 1) * (v_u + 4.5 * (v_c - v_u))
    assert (got - want).abs().max() < 1e-5


def test_adapters_train_a_flow_fake_score_with_the_velocity_loss():
    from disback_core.adapters import DMD2, SiD, DiffInstruct
    from disback_core.losses import DSMLoss
    from disback_core.sigmas import LogitNormalSigma, flow_weight

    model, d, cond, x0 = _setup("tiny-sd3")
    times = LogitNormalSigma(shift=3.0)
    for cls, reduction in ((DMD2, "mean"), (SiD, "sum"), (DiffInstruct, "sum")):
        method = cls(sigma_sampler=times, fake_sigma_sampler=times, dsm_weight=flow_weight)
        torch.manual_seed(5)
        got = method.fake_score_loss(x0, d, cond)["loss"]
        torch.manual_seed(5)
        want = DSMLoss(times, reduction=reduction, weight=flow_weight)(d, x0, cond).mean()
        assert torch.equal(got, want)


@pytest.mark.parametrize("t", [1.0, 0.7])
@torch.no_grad()
def test_samplers_reproduce_a_flow_generator_exactly(t):
    """sample_fewstep(G, z) and distillation_pp_sample(G, teacher, z, guided_steps=0) are G(z) bit for bit,
    and G's input is exactly the noise at flow time t."""
    from disback_core import distillation_pp_sample, flow_generator, sample_fewstep

    model, d, cond, _ = _setup("tiny-sd3")
    g = flow_generator(d, t)
    z = torch.randn(sample_shape(model, 2))
    out = g(z, cond)
    assert torch.equal(sample_fewstep(g, z, cond), out)
    assert torch.equal(distillation_pp_sample(g, d, z, cond, guided_steps=0), out)
    want = z.double() - t * _raw_velocity(model, z, torch.full((2,), t), cond).double()
    assert (out.double() - want).abs().max() < 1e-5
