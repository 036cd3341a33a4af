"""GDD (adapters/gdd.py) and the discriminators: closed-form GAN/R1 checks, the lazy schedule, resume,
clear errors, and a short run on real data that must improve a real metric."""
import math

import pytest
import torch
from conftest import ring_means, tiny_unet2d
from disback_core.adapters import GDD
from torch import nn

from disback_core.bench.metrics import sliced_wasserstein
from disback_core.denoisers import EDMPrecond, freeze, make_generator
from disback_core.discriminators import (
    MLPDiscriminator,
    MultiScaleDiscriminator,
    TeacherFeatureDiscriminator,
    default_discriminator,
)
from disback_core.losses import DSMLoss, r1_penalty
from disback_core.nets import UNetNet, edm_mlp
from disback_core.sigmas import LogNormalSigma
from disback_core.step import Batch, train_step


class LinearD(nn.Module):
    """D(x) = w . x + c, per sample."""

    def __init__(self, w: torch.Tensor, c: float = 0.0):
        super().__init__()
        self.w = nn.Parameter(w.clone())
        self.c = nn.Parameter(torch.tensor(float(c)))

    def forward(self, x, cond=None):
        return x.flatten(1) @ self.w + self.c


def sp(v: float) -> float:
    return math.log1p(math.exp(v))


@pytest.mark.parametrize("c", [-1.5, 0.0, 2.0])
def test_constant_logit_gives_softplus_values_exactly(c):
    d = LinearD(torch.zeros(3), c)  # constant logit c
    m = GDD(r1_interval=0)
    x, real = torch.randn(5, 3), torch.randn(5, 3)
    assert float(m.generator_loss(x, None, d)["loss"].detach()) == pytest.approx(sp(-c), abs=1e-6)
    out = m.fake_score_loss(x, d, real=real)
    assert float(out["loss"].detach()) == pytest.approx(sp(c) + sp(-c), abs=1e-6) and "r1" not in out


def test_generator_gradient_pushes_the_logit_up():
    torch.manual_seed(0)
    w = torch.randn(4)
    d = LinearD(w, 0.3).requires_grad_(False)
    x = torch.randn(8, 4, requires_grad=True)
    GDD().generator_loss(x, None, d)["loss"].backward()
    # dL/dx_i = -sigmoid(-D(x_i)) w / B: anti-parallel to w, so a descent step raises every D(x_i)
    expected = -torch.sigmoid(-(x.detach() @ w + 0.3))[:, None] * w / 8
    assert torch.allclose(x.grad, expected, atol=1e-7)
    bias = nn.Parameter(torch.zeros(4))  # G(z) = z + b, one SGD step on the G loss
    z = torch.randn(64, 4)
    before = float(d(z + bias).mean().detach())
    opt = torch.optim.SGD([bias], lr=0.5)
    GDD().generator_loss(z + bias, None, d)["loss"].backward()
    opt.step()
    assert float(d(z + bias).mean().detach()) > before
    # the discriminator loss's gradient lowers D(fake) and raises D(real)
    dd = LinearD(torch.zeros(4))
    GDD(r1_interval=0).fake_score_loss(torch.ones(6, 4), dd, real=-torch.ones(6, 4))["loss"].backward()
    assert torch.allclose(dd.w.grad, torch.full((4,), 1.0))  # 0.5 * 1 (fake) + 0.5 * 1 (real at -1)


def test_r1_of_a_linear_discriminator_is_its_squared_norm():
    w = torch.tensor([3.0, -1.0, 2.0])
    real = torch.randn(7, 3, requires_grad=True)
    assert float(r1_penalty(LinearD(w)(real), real).detach()) == pytest.approx(14.0)


def test_lazy_r1_every_16th_d_step_with_the_documented_weight():
    w = torch.tensor([3.0, -1.0, 2.0])  # ||w||^2 = 14
    d = LinearD(w)
    m = GDD(gamma=0.01, r1_interval=16)  # sigma_data 0.5: gamma used as given
    applied = []
    for step in range(1, 33):
        out = m.fake_score_loss(torch.randn(4, 3), d, real=torch.randn(4, 3))
        extra = float((out["loss"] - out["gan"]).detach())
        if "r1" in out:
            applied.append(step)
            assert float(out["r1"]) == pytest.approx(14.0)
            assert extra == pytest.approx(16 * 0.01 / 2 * 14.0, rel=1e-5)
        else:
            assert extra == 0.0
    assert applied == [16, 32] and m.d_steps == 32
    assert GDD(gamma=1e-4, sigma_data=1.0).gamma == pytest.approx(4e-4)  # R1 ~ 1/x^2: gamma scales with sd^2
    assert not GDD(r1_interval=0).r1_due(16)


def test_state_dict_resumes_the_schedule_exactly():
    d = LinearD(torch.ones(2))
    a = GDD()
    for _ in range(5):
        a.fake_score_loss(torch.randn(3, 2), d, real=torch.randn(3, 2))
    b = GDD()
    b.load_state_dict(a.state_dict())
    due = [("r1" in b.fake_score_loss(torch.randn(3, 2), d, real=torch.randn(3, 2))) for _ in range(11)]
    assert due == [False] * 10 + [True]  # the 16th D step overall


def test_clear_errors():
    d = LinearD(torch.ones(2))
    m = GDD()
    with pytest.raises(ValueError, match="real"):
        m.fake_score_loss(torch.randn(3, 2), d)
    with pytest.raises(NotImplementedError, match="DSM"):
        m.dsm_loss(torch.randn(3, 2), d)
    assert m.critic_steps == 1 and m.critic_parameters() == [] and m.needs_real


def test_cli_rejects_disback_for_gdd(capsys, tmp_path):
    from disback_core.cli import main

    with pytest.raises(SystemExit):
        main(["bench", "--adapter", "gdd", "--variants", "base", "disback", "--out", str(tmp_path)])
    assert "DisBack does not apply" in capsys.readouterr().err


def test_discriminators_shapes_projection_and_teacher_features():
    x = torch.randn(3, 2, 8, 8, requires_grad=True)
    ms = default_discriminator(x)
    assert isinstance(ms, MultiScaleDiscriminator) and ms(x).shape == (3, 16 + 16)  # 8x8 -> 4x4 patches, 4x4 scale
    proj = GDD.discriminator_for(x, torch.tensor([0, 4, 2]))
    assert proj.num_classes == 5 and proj(x, torch.tensor([1, 1, 3])).shape == (3, 32)
    with pytest.raises(ValueError, match="integer class labels"):
        proj(x)
    assert isinstance(default_discriminator(torch.randn(3, 2)), MLPDiscriminator)
    teacher = freeze(EDMPrecond(UNetNet(tiny_unet2d())))
    td = TeacherFeatureDiscriminator.build(teacher, "net.unet.mid_block", x.detach())
    assert all(p.requires_grad for p in td.parameters()) and not any(k.startswith("net.") for k in td.state_dict())
    logits = td(x)
    assert logits.shape == (3,)
    r1 = r1_penalty(logits, x)  # double backward through the frozen teacher
    r1.backward()
    assert float(r1.detach()) > 0 and td.head.head[0].weight.grad.abs().sum() > 0  # (the last bias has no R1 gradient)


def _ring(n, g):
    means = ring_means()
    return means[torch.randint(0, 8, (n,), generator=g)] + 0.1 * torch.randn(n, 2, generator=g)


def test_short_gdd_run_improves_on_the_teachers_one_step_output():
    """Real metric, real data: a quickly DSM-trained MLP teacher on the 8-Gaussian ring; its one-step
    output at sigma 80 collapses toward the mean. 400 GDD iterations (train_step, no teacher query)
    must at least halve the sliced Wasserstein distance to held-out ring data."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    teacher = edm_mlp(2, sigma_data=1.4, width=64, depth=2)
    dsm = DSMLoss(LogNormalSigma(-0.5, 1.5), 1.4)
    opt = torch.optim.Adam(teacher.parameters(), 2e-3)
    for _ in range(300):
        loss = dsm(teacher, _ring(256, g)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    freeze(teacher)
    gen = make_generator(teacher, 80.0)
    disc = GDD.discriminator_for(torch.zeros(4, 2))
    method = GDD(sigma_data=1.4)
    g_opt = torch.optim.Adam(gen.parameters(), 1e-3, betas=(0.0, 0.99))
    d_opt = torch.optim.Adam(disc.parameters(), 1e-3, betas=(0.0, 0.99))
    z_eval, ref = torch.randn(2000, 2, generator=torch.Generator().manual_seed(1)), _ring(2000, torch.Generator().manual_seed(2))

    def sw() -> float:
        with torch.no_grad():
            return sliced_wasserstein(gen(z_eval), ref)

    before = sw()

    def next_batch():
        return Batch(torch.randn(256, 2, generator=g), real=_ring(256, g))

    for _ in range(400):
        logs = train_step(method, gen, disc, None, g_opt, d_opt, next_batch)
    after = sw()
    assert math.isfinite(logs["generator/loss"]) and method.d_steps == 400
    print(before, after)
    assert after < 0.5 * before, (before, after)


def test_minibatch_std_closed_form():
    from disback_core.discriminators import minibatch_std

    same = torch.ones(4, 3, 2, 2)
    assert torch.allclose(minibatch_std(same, 4), torch.full((4, 1, 2, 2), 1e-4))
    pm = torch.cat([torch.full((2, 3, 2, 2), 2.0), torch.full((2, 3, 2, 2), -2.0)])  # groups {0, 2}, {1, 3}
    assert torch.allclose(minibatch_std(pm, 2), torch.full((4, 1, 2, 2), 2.0))
    assert minibatch_std(torch.randn(6, 3, 2, 2), 4).shape == (6, 1, 2, 2)  # gcd(6, 4) = 2 per group


def test_disback_around_gdd_is_rejected_clearly():
    from disback_core import Backtrack, FixedInterval, Trajectory, record_degradation

    teacher = freeze(edm_mlp(2, width=16, depth=1))
    gen = make_generator(teacher, 80.0).requires_grad_(False)
    with pytest.raises(NotImplementedError, match="Degradation"):
        record_degradation(teacher, gen, GDD(), lambda: Batch(torch.randn(4, 2)), steps=2, interval=1)
    node = {k: v.clone() for k, v in teacher.state_dict().items()}
    bt = Backtrack(GDD(), Trajectory(teacher, [node], kind="full"), FixedInterval(1))
    with pytest.raises(TypeError, match="DisBack"):
        bt.generator_loss(gen(torch.randn(4, 2)), bt.target, LinearD(torch.ones(2)))
