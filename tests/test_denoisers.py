"""Denoiser wrappers: diffusers eps/v/x0 models against the DDPM formulas, EDM preconditioning,
CFG, one-step generators, and the errors on bad input."""
import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
from torch import nn

from conftest import tiny_unet2d, tiny_unet2d_condition
from disback_core import CFGDenoiser, DiffusersDenoiser, EDMPrecond, OneStepGenerator, make_generator


def _ddpm_case(prediction_type="epsilon"):
    sched = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    ab = sched.alphas_cumprod.to(torch.float64)
    t = torch.tensor([0, 10, 250, 600, 999])
    x_vp = torch.randn(5, 2, 8, 8)
    return sched, ab, t, x_vp


@pytest.mark.parametrize("timestep", ["nearest", "interp"])
def test_eps_unet2d_matches_ddpm_formula(timestep):
    sched, ab, t, x_vp = _ddpm_case()
    unet = tiny_unet2d()
    with torch.no_grad():
        eps = unet(x_vp, t).sample.double()
        a = ab[t].view(-1, 1, 1, 1)
        x0_formula = (x_vp.double() - (1 - a).sqrt() * eps) / a.sqrt()
        D = DiffusersDenoiser(unet, scheduler=sched, timestep=timestep)
        sigma = ((1 - ab[t]) / ab[t]).sqrt()
        x_t = (x_vp.double() / a.sqrt()).float()
        x0 = D(x_t, sigma)
    # the model sees float32(x_t) * sqrt(abar) instead of x_vp: agree to float32 rounding of x_t
    rel = ((x0.double() - x0_formula).abs() / (1 + x0_formula.abs())).max()
    assert rel < 5e-5  # float32 rounding of x_t, amplified by 1/sqrt(abar) ~ 150 at t = 999


def test_eps_unet2d_condition_with_text_embedding():
    sched, ab, t, x_vp = _ddpm_case()
    unet = tiny_unet2d_condition()
    emb = torch.randn(5, 3, 12)
    with torch.no_grad():
        eps = unet(x_vp, t, encoder_hidden_states=emb).sample.double()
        a = ab[t].view(-1, 1, 1, 1)
        x0_formula = (x_vp.double() - (1 - a).sqrt() * eps) / a.sqrt()
        D = DiffusersDenoiser(unet, ab, "epsilon", timestep="nearest")
        x0 = D((x_vp.double() / a.sqrt()).float(), ((1 - ab[t]) / ab[t]).sqrt(), emb)
    rel = ((x0.double() - x0_formula).abs() / (1 + x0_formula.abs())).max()
    assert rel < 5e-5  # float32 rounding of x_t, amplified by 1/sqrt(abar) ~ 150 at t = 999
    assert D.cond_kwarg == "encoder_hidden_states"


def test_v_and_sample_prediction():
    sched, ab, t, x_vp = _ddpm_case()
    unet = tiny_unet2d()
    a = ab[t].view(-1, 1, 1, 1)
    sigma = ((1 - ab[t]) / ab[t]).sqrt()
    x_t = (x_vp.double() / a.sqrt()).float()
    with torch.no_grad():
        out = unet((x_t.double() * a.sqrt()).float(), t).sample.double()
        v_formula = a.sqrt() * (x_t.double() * a.sqrt()).float().double() - (1 - a).sqrt() * out
        Dv = DiffusersDenoiser(unet, ab, "v_prediction", timestep="nearest")
        torch.testing.assert_close(Dv(x_t, sigma).double(), v_formula, rtol=1e-5, atol=1e-5)
        Ds = DiffusersDenoiser(unet, ab, "sample", timestep="nearest")
        torch.testing.assert_close(Ds(x_t, sigma).double(), out, rtol=1e-6, atol=1e-6)


def test_sigma_timestep_round_trip():
    sched = DDPMScheduler(num_train_timesteps=1000)
    D = DiffusersDenoiser(nn.Identity(), scheduler=sched, prediction_type="epsilon")
    t = torch.tensor([0.0, 1.0, 17.25, 500.5, 998.9, 999.0], dtype=torch.float64)
    torch.testing.assert_close(D.sigma_to_t(D.t_to_sigma(t)), t, rtol=0, atol=1e-9)
    ab = sched.alphas_cumprod.double()
    ti = torch.arange(0, 999, 37)
    sig = ((1 - ab[ti]) / ab[ti]).sqrt()
    torch.testing.assert_close(D.t_to_sigma(ti.double()), sig, rtol=1e-12, atol=0)
    Dn = DiffusersDenoiser(nn.Identity(), scheduler=sched, prediction_type="epsilon", timestep="nearest")
    assert torch.equal(Dn.sigma_to_t(sig * 1.0001), ti.double())


def test_cfg_equals_formula():
    unet = tiny_unet2d(num_class_embeds=4)
    D = DiffusersDenoiser(unet, DDPMScheduler().alphas_cumprod, "epsilon")
    x = torch.randn(3, 2, 8, 8) * 5
    sigma = torch.tensor([0.5, 3.0, 20.0])
    labels = torch.tensor([0, 1, 2])
    null = torch.tensor(3)
    with torch.no_grad():
        d_c = D(x, sigma, labels)
        d_u = D(x, sigma, torch.full((3,), 3))
        got = CFGDenoiser(D, 1.75, null)(x, sigma, labels)
    torch.testing.assert_close(got, d_u + 1.75 * (d_c - d_u), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="needs cond"):
        CFGDenoiser(D, 1.75, null)(x, sigma)


class _Linear(nn.Module):
    def forward(self, x, c_noise, cond=None):
        return 0.3 * x + c_noise.view(-1, *[1] * (x.ndim - 1))


def test_edm_precond_formula_and_one_step_generator():
    sd = 0.5
    D = EDMPrecond(_Linear(), sigma_data=sd)
    x = torch.randn(4, 3)
    s = torch.tensor([0.01, 0.5, 2.0, 80.0])
    sv = s.view(-1, 1)
    c_skip = sd**2 / (sv**2 + sd**2)
    c_out = sv * sd / (sv**2 + sd**2).sqrt()
    c_in = 1 / (sv**2 + sd**2).sqrt()
    want = c_skip * x + c_out * (0.3 * c_in * x + sv.log() / 4)
    torch.testing.assert_close(D(x, s), want)
    G = OneStepGenerator(D, 80.0)
    z = torch.randn(4, 3)
    torch.testing.assert_close(G(z), D(80.0 * z, torch.full((4,), 80.0)))
    teacher = EDMPrecond(nn.Linear(3, 3), 0.5)
    teacher.requires_grad_(False)
    g = make_generator(teacher, 2.5)
    assert all(p.requires_grad for p in g.parameters())
    assert not any(p.requires_grad for p in teacher.parameters())


# ----------------------------------------------------------------------------- bad input


def test_bad_shapes_and_sigmas_are_named():
    D = EDMPrecond(_Linear())
    with pytest.raises(ValueError, match="x must have shape"):
        D(torch.randn(4), 1.0)
    with pytest.raises(TypeError, match="x must be a floating"):
        D(torch.ones(4, 2, dtype=torch.long), 1.0)
    with pytest.raises(ValueError, match="sigma must be > 0"):
        D(torch.randn(4, 2), torch.tensor([1.0, 0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="sigma must be > 0"):
        D(torch.randn(4, 2), -1.0)
    with pytest.raises(ValueError, match="sigma must be finite"):
        D(torch.randn(4, 2), float("nan"))
    with pytest.raises(ValueError, match="sigma has 3 values but the batch has 4"):
        D(torch.randn(4, 2), torch.ones(3))
    with pytest.raises(ValueError, match="sigma_init"):
        OneStepGenerator(D, 0.0)


def test_bad_schedulers_and_prediction_types():
    unet = tiny_unet2d()
    with pytest.raises(ValueError, match="has no alphas_cumprod"):
        DiffusersDenoiser(unet, scheduler=FlowMatchEulerDiscreteScheduler())
    with pytest.raises(ValueError, match="prediction_type must be declared"):
        DiffusersDenoiser(unet, DDPMScheduler().alphas_cumprod)
    with pytest.raises(ValueError, match="prediction_type must be declared"):
        DiffusersDenoiser(unet, DDPMScheduler().alphas_cumprod, "eps")
    with pytest.raises(ValueError, match="strictly decreasing"):
        DiffusersDenoiser(unet, DDPMScheduler().alphas_cumprod.flip(0), "epsilon")
    D = DiffusersDenoiser(unet, DDPMScheduler().alphas_cumprod, "epsilon")
    with pytest.raises(ValueError, match="outside the schedule's range"):
        D(torch.randn(2, 2, 8, 8), 500.0)
    Dc = DiffusersDenoiser(unet, DDPMScheduler().alphas_cumprod, "epsilon", clamp=True)
    assert float(Dc.sigma_to_t(torch.tensor([500.0]))) == 999.0
