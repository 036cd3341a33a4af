"""SiD, Score identity Distillation (Zhou et al., ICML 2024).

Generator (paper Eq. 20 with the weighting of Sec. 4.2): ``u ~ U(0, 0.8)``,
``sigma = (smax^(1/7) + (1 - u)(smin^(1/7) - smax^(1/7)))^7``, ``x_t = x + sigma n`` *with*
gradient; ``f_r = D_target(x_t)``, ``f_f = D_fake(x_t)`` are differentiated wrt their input (their
parameters stay frozen), ``w = mean_{C,H,W} |x - f_r|`` (no grad, clamped at 1e-5) and::

    loss = scale * mean_batch sum_pixels( (f_r - f_f) * ((f_r - x) - alpha (f_r - f_f)) / w )

with ``alpha = 1.2`` and ``scale = 100`` (the reference's generator loss scaling). The loss can be
negative. Critic: EDM DSM, log-normal sigma, summed over pixels, averaged over the batch; one
critic update per generator update. Paper optimiser: Adam (0, 0.999), lr 1e-5; sigma_init 2.5.

With DisBack (this library's measurements, docs/WHEN_DISBACK_HELPS.md; same budgets and learning
rates): on digits (UNet teacher, 600 iterations, 5 seeds) the default DisBack ends worse than SiD
alone, 30.15 +- 3.4 against 25.27 +- 2.9 FD; no variant tried beats SiD alone (the fake-score warm
start alone 31.6 +- 4.8; the path without the warm start 27.1 +- 4.0; the paper's 1x path
28.1 +- 3.5). It is level on class-conditional digits (6.18 vs 6.17) and on digits distilled from
an SD3 flow transformer (25.24 vs 25.28). On UNet images, use SiD without DisBack.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from disback_core.checks import check_number
from disback_core.denoisers import check_sample, pad_dims
from disback_core.losses import DSMLoss, abs_mean_normaliser, check_finite, reduce_per_sample
from disback_core.protocol import DSMFakeScore, LossDict, check_roles
from disback_core.sigmas import KarrasContinuousSigma, LogNormalSigma, SigmaSampler, edm_weight

__all__ = ["SiD"]


class SiD(DSMFakeScore):
    """SiD's generator loss and EDM DSM critic; implements ``ScoreDistiller``.

    Args:
        dsm_weight: keyword-only, the fake score's DSM weight: EDM's ``edm_weight`` (Karras et al. 2022,
            Table 1) by default; ``flow_weight`` for a flow-matching model (SD3, FLUX, ...), which makes
            the fake-score loss the velocity loss those models are trained with.
    """

    def __init__(
        self,
        alpha: float = 1.2,
        sigma_sampler: SigmaSampler | None = None,
        sigma_data: float = 0.5,
        fake_sigma_sampler: SigmaSampler | None = None,
        generator_loss_scale: float = 100.0,
        fake_loss_scale: float = 1.0,
        normaliser_min: float = 1e-5,
        critic_steps: int = 1,
        *,
        dsm_weight: Callable[[Tensor, float], Tensor] = edm_weight,
    ):
        self.alpha = check_number("alpha", alpha)
        self.sigma_sampler = sigma_sampler or KarrasContinuousSigma(u_max=0.8)
        self.dsm = DSMLoss(fake_sigma_sampler or LogNormalSigma(), sigma_data, reduction="sum", weight=dsm_weight)
        self.generator_loss_scale = check_number("generator_loss_scale", generator_loss_scale, low=0.0, low_open=True)
        self.fake_loss_scale = check_number("fake_loss_scale", fake_loss_scale, low=0.0, low_open=True)
        self.normaliser_min = check_number("normaliser_min", normaliser_min, low=0.0)
        self.critic_steps = int(check_number("critic_steps", critic_steps, low=1, integer=True))

    def generator_loss(self, x: Tensor, target: Any, fake: Any, cond: Any = None) -> LossDict:
        check_sample(x, "x")
        check_roles(target, fake)
        sigma = self.sigma_sampler(x.shape[0], device=x.device)
        x_t = x + pad_dims(sigma, x) * torch.randn_like(x)
        f_r = target(x_t, sigma, cond)
        f_f = fake(x_t, sigma, cond)
        check_finite("SiD generator loss", x=x, target_output=f_r, fake_output=f_f)
        w = abs_mean_normaliser(x.detach(), f_r.detach(), self.normaliser_min)
        per = reduce_per_sample((f_r - f_f) * ((f_r - x) - self.alpha * (f_r - f_f)) / w, "sum")
        loss = self.generator_loss_scale * per.mean()
        return {"loss": loss, "score_gap": reduce_per_sample((f_r - f_f).detach() ** 2, "mean").mean()}
