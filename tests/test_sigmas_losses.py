"""Sigma samplers, the DSM loss, the normaliser and the GAN terms against their formulas."""
import math

import pytest
import torch
import torch.nn.functional as F

from disback_core import (DSMLoss, GaussianMixtureDenoiser, KarrasContinuousSigma, KarrasIndexSigma, LogNormalSigma,
                          abs_mean_normaliser, edm_weight, gan_discriminator_loss, gan_generator_loss, karras_sigmas,
                          r1_penalty)


def test_karras_grid_and_index_sampler():
    g = karras_sigmas(1000, 0.002, 80.0, 7.0)
    assert g[0].item() == pytest.approx(0.002, rel=1e-12) and g[-1].item() == pytest.approx(80.0, rel=1e-12)
    assert (g[1:] > g[:-1]).all()
    # Eq. 5 at i = 500
    lo, hi = 0.002 ** (1 / 7), 80 ** (1 / 7)
    assert g[500].item() == pytest.approx((lo + 500 / 999 * (hi - lo)) ** 7, rel=1e-12)
    s = KarrasIndexSigma(index_min=20, index_max=980)(20000)
    assert s.min().item() == pytest.approx(g[20].item(), rel=1e-6)
    assert s.max().item() == pytest.approx(g[980].item(), rel=1e-6)
    assert set(s.unique().tolist()) <= set(g.float().tolist())
    with pytest.raises(ValueError, match="index_min"):
        KarrasIndexSigma(index_min=10, index_max=1000)


def test_karras_continuous_range_and_lognormal_moments():
    s = KarrasContinuousSigma(u_max=0.8)(50000)
    lo, hi = 0.002 ** (1 / 7), 80 ** (1 / 7)
    top = (hi + 0.2 * (lo - hi)) ** 7  # ~24.4 at u = 0.8
    assert s.min().item() >= 0.002 * (1 - 1e-6) and s.max().item() <= top * (1 + 1e-6)
    assert s.max().item() > 0.95 * top
    ln = LogNormalSigma(-1.2, 1.2)(200000).log()
    assert ln.mean().item() == pytest.approx(-1.2, abs=0.01)
    assert ln.std().item() == pytest.approx(1.2, abs=0.01)


def test_dsm_loss_formula_and_reductions():
    x = torch.randn(4, 3, 2)
    sigma = torch.tensor([0.1, 1.0, 2.0, 5.0])
    noise = torch.randn_like(x)
    D = lambda x_t, s, c=None: 0.5 * x_t  # noqa: E731
    d = 0.5 * (x + sigma.view(-1, 1, 1) * noise)
    w = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    for red, f in [("sum", lambda t: t.flatten(1).sum(1)), ("mean", lambda t: t.flatten(1).mean(1))]:
        got = DSMLoss(sigma_data=0.5, reduction=red)(D, x, sigma=sigma, noise=noise)
        torch.testing.assert_close(got, w * f((d - x) ** 2))
    torch.testing.assert_close(edm_weight(sigma, 0.5), 1 / sigma**2 + 1 / 0.25)
    with pytest.raises(ValueError, match="reduction"):
        DSMLoss(reduction="max")


def test_exact_denoiser_minimises_dsm():
    """The posterior mean is the DSM minimiser: any perturbation of it raises the Monte-Carlo loss."""
    gmm = GaussianMixtureDenoiser(torch.tensor([[-1.0, 0.0], [2.0, 1.0]]), 0.3)
    x, _ = gmm.sample(20000)
    sigma = torch.full((20000,), 0.7)
    noise = torch.randn_like(x)
    dsm = DSMLoss(sigma_data=1.0)
    base = dsm(gmm, x, sigma=sigma, noise=noise).mean()
    for eps in (0.05, -0.05):
        pert = dsm(lambda a, s, c=None: gmm(a, s) * (1 + eps), x, sigma=sigma, noise=noise).mean()
        assert pert > base


def test_normaliser_and_gan_terms():
    x = torch.tensor([[1.0, -1.0], [0.0, 4.0]])
    d = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    torch.testing.assert_close(abs_mean_normaliser(x, d).flatten(), torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(abs_mean_normaliser(x, x, 1e-5).flatten(), torch.tensor([1e-5, 1e-5]))
    zero = torch.zeros(3)
    assert gan_discriminator_loss(zero, zero).item() == pytest.approx(2 * math.log(2))
    lr, lf = torch.tensor([1.0, 2.0], requires_grad=True), torch.tensor([-1.0, 0.5], requires_grad=True)
    loss = gan_discriminator_loss(lr, lf)
    torch.testing.assert_close(loss, F.softplus(lf).mean() + F.softplus(-lr).mean())
    loss.backward()
    assert (lr.grad < 0).all() and (lf.grad > 0).all()  # D pushes real logits up, fake logits down
    lg = torch.tensor([-1.0, 0.5], requires_grad=True)
    gan_generator_loss(lg).backward()
    assert (lg.grad < 0).all()  # G pushes its logits up
    xr = torch.randn(5, 3, requires_grad=True)
    logits = (xr * torch.tensor([1.0, 2.0, -2.0])).sum(1)
    assert r1_penalty(logits, xr).item() == pytest.approx(9.0)
