"""DMD2 (Yin et al., NeurIPS 2024): normalised distribution matching + optional GAN head.

Generator (DMD, Yin et al. 2024a, Eq. 7-8; DMD2 Sec. 4): ``sigma = karras_grid[i]``,
``i ~ U{20..980}`` of 1000, ``x_t = x + sigma n``; without gradient ``p_real = x - D_real``,
``p_fake = x - D_fake`` and::

    grad = (p_real - p_fake) / mean_{C,H,W} |p_real|        # = (D_fake - D_real) / mean|x - D_real|
    loss = 0.5 * mse(x, (x - grad).detach())                # d loss / d x = grad / x.numel()

Critic: EDM DSM with sigma on the same grid, index ``U{0..999}``, weight ``1/sigma^2 + 1/sd^2``,
mean over all elements; plus, with a GAN head, ``gan_critic_weight * (softplus(D(fake)) +
softplus(-D(real)))`` on diffusion-GAN-noised inputs (weight 1e-2). The generator then adds
``gan_generator_weight * softplus(-D(G(z)))`` (3e-3 on ImageNet). Two-time-scale rule: five
critic updates per generator update. Paper optimiser: AdamW (0.9, 0.999), wd 0.01, grad clip 10.

With DisBack (this library's measurements, docs/WHEN_DISBACK_HELPS.md; same budgets and learning
rates): on 2D problems where the critic lags (one critic step, or a fake-score lr of 0.1x-0.3x the
generator's) DisBack converges where DMD2 does not (toy ring, one critic step: sliced W2 0.25 vs
1.76, 5 seeds) and at 0.3x reaches DMD2's final value in 0.33x the iterations; with DMD2's own
recipe (5 critic steps) it is level. On images it has not shown that: within the seed spread on
digits (one critic step, 5 seeds: 87.3 vs 107 FD, a 0.3x fake score, the built-in recipe on 16x16
RGB patches) and on class-conditional digits at one critic step (22.5 vs 19.6), worse there at 0.3x
(7.70 vs 6.63), and better by 0.85 FD (29.03 vs 29.88) on digits distilled from an SD3 flow transformer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from disback_core.checks import check_number
from disback_core.denoisers import check_sample, pad_dims
from disback_core.gan import GANHead
from disback_core.losses import (
    DSMLoss,
    abs_mean_normaliser,
    check_finite,
    gan_discriminator_loss,
    gan_generator_loss,
    reduce_per_sample,
)
from disback_core.protocol import DSMFakeScore, LossDict, check_roles
from disback_core.sigmas import KarrasIndexSigma, SigmaSampler, edm_weight

__all__ = ["DMD2"]


class DMD2(DSMFakeScore):
    """DMD2's generator and critic losses; implements ``ScoreDistiller``.

    Args:
        gan_head: a :class:`~disback_core.gan.GANHead` reading the fake score's bottleneck, or
            ``None`` for DMD2 without GAN. With a head, :meth:`fake_score_loss` needs ``real``.
        dsm_weight: keyword-only, the fake score's DSM weight: EDM's ``edm_weight`` (Karras et al. 2022,
            Table 1) by default; ``flow_weight`` for a flow-matching model (SD3, FLUX, ...), which makes
            the fake-score loss the velocity loss those models are trained with.
    """

    def __init__(
        self,
        sigma_sampler: SigmaSampler | None = None,
        sigma_data: float = 0.5,
        fake_sigma_sampler: SigmaSampler | None = None,
        gan_head: GANHead | None = None,
        gan_generator_weight: float = 3e-3,
        gan_critic_weight: float = 1e-2,
        critic_steps: int = 5,
        *,
        dsm_weight: Callable[[Tensor, float], Tensor] = edm_weight,
    ):
        self.sigma_sampler = sigma_sampler or KarrasIndexSigma(index_min=20, index_max=980)
        self.dsm = DSMLoss(fake_sigma_sampler or KarrasIndexSigma(), sigma_data, reduction="mean", weight=dsm_weight)
        self.gan_head = gan_head
        self.gan_generator_weight = check_number("gan_generator_weight", gan_generator_weight, low=0.0)
        self.gan_critic_weight = check_number("gan_critic_weight", gan_critic_weight, low=0.0)
        self.critic_steps = int(check_number("critic_steps", critic_steps, low=1, integer=True))

    def distribution_matching_grad(self, x: Tensor, target: Any, fake: Any, cond: Any = None) -> tuple[Tensor, Tensor]:
        """The normalised DMD gradient wrt ``x`` (before the ``1/numel`` of the mse), no graph, and
        the score gap ``mean ||D_fake - D_real||^2``."""
        sigma = self.sigma_sampler(x.shape[0], device=x.device)
        x0 = x.detach()
        x_t = x0 + pad_dims(sigma, x) * torch.randn_like(x)
        with torch.no_grad():
            d_real = target(x_t, sigma, cond)
            d_fake = fake(x_t, sigma, cond)
        check_finite("DMD2 generator loss", x=x, target_output=d_real, fake_output=d_fake)
        gap = reduce_per_sample((d_fake - d_real) ** 2, "mean").mean()
        return (d_fake - d_real) / abs_mean_normaliser(x0, d_real), gap

    def generator_loss(self, x: Tensor, target: Any, fake: Any, cond: Any = None) -> LossDict:
        check_sample(x, "x")
        check_roles(target, fake)
        grad, gap = self.distribution_matching_grad(x, target, fake, cond)
        dm = 0.5 * F.mse_loss(x, (x - grad).detach())
        out = {"loss": dm, "dm": dm.detach(), "score_gap": gap}
        if self.gan_head is not None:
            g = gan_generator_loss(self.gan_head.logits(fake, x, cond))
            out["loss"] = dm + self.gan_generator_weight * g
            out["gan"] = g.detach()
        return out

    def fake_score_loss(
        self, x: Tensor, fake: Any, cond: Any = None, real: Tensor | None = None, real_cond: Any = None
    ) -> LossDict:
        out = super().fake_score_loss(x, fake, cond)
        if self.gan_head is not None:
            if real is None:
                raise ValueError("DMD2 with a GAN head needs real data: pass real= (and real_cond= if conditional)")
            check_sample(real, "real")
            d = gan_discriminator_loss(
                self.gan_head.logits(fake, real, real_cond), self.gan_head.logits(fake, x.detach(), cond)
            )
            out["loss"] = out["loss"] + self.gan_critic_weight * d
            out["gan"] = d.detach()
        return out

    def critic_parameters(self) -> list[nn.Parameter]:
        return [] if self.gan_head is None else list(self.gan_head.parameters())
