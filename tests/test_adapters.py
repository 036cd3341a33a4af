"""Each adapter against its paper's expression on Gaussian data with exact teacher and fake scores."""
import pytest
import torch
import torch.nn.functional as F

from disback_core import GANHead, GaussianMixtureDenoiser, edm_mlp
from disback_core.adapters import DMD2, DiffInstruct, SiD

D_DIM, B = 3, 6
MU_R, S_R = torch.tensor([1.0, -0.5, 0.25], dtype=torch.float64), 0.8
MU_F, S_F = torch.tensor([0.2, 0.3, -1.0], dtype=torch.float64), 1.7
REAL = GaussianMixtureDenoiser(MU_R[None], S_R)
FAKE = GaussianMixtureDenoiser(MU_F[None], S_F)
SIGMA = torch.tensor([0.05, 0.3, 1.0, 2.5, 7.0, 20.0])


class Const:
    """A sigma 'sampler' returning fixed values (draws no random numbers)."""

    def __call__(self, n, device=None, generator=None):
        return SIGMA[:n].to(device)


def _x():
    return (torch.randn(B, D_DIM, dtype=torch.float64) * 1.5).requires_grad_(True)


def _analytic(x, noise, mu, s):
    a = (s**2 / (s**2 + SIGMA.double() ** 2)).view(-1, 1)
    x_t = x + SIGMA.view(-1, 1).double() * noise
    return mu + a * (x_t - mu), a


def _grad_and_noise(method, x, target=REAL, fake=FAKE, seed=1):
    torch.manual_seed(seed)
    loss = method.generator_loss(x, target, fake)["loss"]
    (g,) = torch.autograd.grad(loss, x)
    torch.manual_seed(seed)
    noise = torch.randn_like(x)  # the first random draw inside each loss (Const draws none)
    return loss, g, noise


def test_diff_instruct_gradient_is_ikl():
    x = _x()
    _, g, n = _grad_and_noise(DiffInstruct(sigma_sampler=Const()), x)
    d_r, _ = _analytic(x.detach(), n, MU_R, S_R)
    d_f, _ = _analytic(x.detach(), n, MU_F, S_F)
    torch.testing.assert_close(g, (d_f - d_r) / B, rtol=1e-10, atol=1e-12)


def test_dmd2_gradient_is_normalised_distribution_matching():
    x = _x()
    _, g, n = _grad_and_noise(DMD2(sigma_sampler=Const()), x)
    d_r, _ = _analytic(x.detach(), n, MU_R, S_R)
    d_f, _ = _analytic(x.detach(), n, MU_F, S_F)
    norm = (x.detach() - d_r).abs().mean(1, keepdim=True)
    torch.testing.assert_close(g, (d_f - d_r) / norm / (B * D_DIM), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("alpha", [1.0, 1.2])
def test_sid_loss_and_gradient_closed_form(alpha):
    x = _x()
    loss, g, n = _grad_and_noise(SiD(alpha=alpha, sigma_sampler=Const()), x)
    xd = x.detach()
    f_r, a_r = _analytic(xd, n, MU_R, S_R)
    f_f, a_f = _analytic(xd, n, MU_F, S_F)
    w = (xd - f_r).abs().mean(1, keepdim=True)
    d, e = f_r - f_f, f_r - xd
    # written form (Zhou et al. 2024): (f_r - f_f)^T ((f_r - x) - alpha (f_r - f_f)) / w, x100, / batch
    want = 100.0 * ((d * (e - alpha * d)) / w).sum(1).mean()
    if alpha == 1.0:  # reduces to (f_r - f_f)^T (f_f - x) / w
        torch.testing.assert_close(want, 100.0 * ((d * (f_f - xd)) / w).sum(1).mean())
    torch.testing.assert_close(loss.detach(), want, rtol=1e-10, atol=1e-12)
    # gradient through both frozen scores wrt their input: d f / d x = a I for a Gaussian
    grad = 100.0 / B * ((a_r - a_f) * (e - alpha * d) + d * ((a_r - 1) - alpha * (a_r - a_f))) / w
    torch.testing.assert_close(g, grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", [DiffInstruct(), DMD2()])
def test_gradient_is_zero_when_fake_equals_target(method):
    x = _x()
    _, g, _ = _grad_and_noise(method, x, target=REAL, fake=REAL)
    assert torch.count_nonzero(g) == 0


@pytest.mark.parametrize("method", [DiffInstruct(), DMD2(), SiD()])
def test_nan_in_a_score_is_named(method):
    nan_target = lambda x, s, c=None: torch.full_like(x, float("nan"))  # noqa: E731
    with pytest.raises(FloatingPointError, match="target_output"):
        method.generator_loss(_x(), nan_target, FAKE)
    with pytest.raises(FloatingPointError, match="DSM loss"):
        method.fake_score_loss(_x(), nan_target)


def test_dmd2_gan_terms_and_signs():
    fake = edm_mlp(2, sigma_data=1.0, width=32, depth=2)
    head = GANHead.build(fake, "net.blocks.1", torch.randn(4, 2))
    m = DMD2(sigma_data=1.0, gan_head=head)
    x = torch.randn(8, 2, requires_grad=True)
    real = torch.randn(8, 2) + 3
    torch.manual_seed(3)
    out = m.generator_loss(x, REAL_2D, fake)
    torch.manual_seed(3)
    grad, _ = m.distribution_matching_grad(x, REAL_2D, fake)
    logits = head.logits(fake, x)
    dm = 0.5 * F.mse_loss(x, (x - grad).detach())
    torch.testing.assert_close(out["loss"], dm + 3e-3 * F.softplus(-logits).mean())
    # generator term: d/dlogit softplus(-l) = -sigmoid(-l) < 0, so G raises its realism logits
    (gl,) = torch.autograd.grad(F.softplus(-logits).mean(), logits)
    assert (gl < 0).all()
    torch.manual_seed(4)
    c = m.fake_score_loss(x, fake, real=real)
    torch.manual_seed(4)
    dsm = m.dsm_loss(x, fake)
    lr, lf = head.logits(fake, real), head.logits(fake, x.detach())
    torch.testing.assert_close(c["loss"], dsm + 1e-2 * (F.softplus(lf).mean() + F.softplus(-lr).mean()))
    with pytest.raises(ValueError, match="needs real data"):
        m.fake_score_loss(x, fake)
    assert len(m.critic_parameters()) == len(list(head.parameters())) > 0


REAL_2D = GaussianMixtureDenoiser(torch.tensor([[1.0, 1.0]]), 0.5)
