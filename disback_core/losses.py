"""Loss pieces shared by every method: the DSM loss, the DMD/SiD normaliser, GAN terms, R1.

Adapters compose these; none of them re-implements one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .checks import check_number, check_same_shape
from .denoisers import as_sigma, check_sample, pad_dims
from .sigmas import LogNormalSigma, SigmaSampler, edm_weight

__all__ = [
    "DSMLoss",
    "abs_mean_normaliser",
    "gan_discriminator_loss",
    "gan_generator_loss",
    "r1_penalty",
    "check_finite",
    "reduce_per_sample",
]


def check_finite(name: str, **tensors: Tensor) -> None:
    """Raise ``FloatingPointError`` naming the loss and each input that holds a NaN or an inf."""
    bad = [k for k, t in tensors.items() if t is not None and not torch.isfinite(t).all()]
    if bad:
        raise FloatingPointError(f"{name}: non-finite values (NaN or inf) in {', '.join(bad)}")


def reduce_per_sample(x: Tensor, reduction: str) -> Tensor:
    """Reduce every dimension but the batch: ``"mean"`` or ``"sum"``; returns shape ``[batch]``."""
    if reduction == "mean":
        return x.flatten(1).mean(1)
    if reduction == "sum":
        return x.flatten(1).sum(1)
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


class DSMLoss:
    """Denoising score matching with EDM weighting (Karras et al. 2022, Eq. 2 and Eq. 8).

    ``loss_i = lambda(sigma_i) * reduce(|| D(x_i + sigma_i n_i, sigma_i, c_i) - x_i ||^2)``,
    ``lambda = (sigma^2 + sd^2) / (sigma sd)^2``; returns the per-sample loss ``[batch]``.
    ``reduction`` is over the non-batch dimensions: ``"sum"`` (EDM, Diff-Instruct, SiD) or
    ``"mean"`` (DMD2). The fake-score loss of every adapter and Degradation Recording use it.
    """

    def __init__(
        self,
        sigma_sampler: SigmaSampler | None = None,
        sigma_data: float = 0.5,
        reduction: str = "sum",
        weight: Callable[[Tensor, float], Tensor] = edm_weight,
    ):
        reduce_per_sample(torch.zeros(1, 1), reduction)  # validates the name
        self.sigma_sampler = sigma_sampler or LogNormalSigma()
        self.sigma_data = check_number("sigma_data", sigma_data, low=0.0, low_open=True)
        self.reduction = reduction
        self.weight = weight

    def __call__(
        self,
        denoiser: Callable[..., Tensor],
        x: Tensor,
        cond: Any = None,
        sigma: Tensor | None = None,
        noise: Tensor | None = None,
    ) -> Tensor:
        check_sample(x, "x")
        if sigma is None:
            sigma = self.sigma_sampler(x.shape[0], device=x.device)
        sigma = as_sigma(sigma, x, "sigma")
        if noise is None:
            noise = torch.randn_like(x)
        check_same_shape("x", x, "noise", noise)
        d = denoiser(x + pad_dims(sigma, x) * noise, sigma, cond)
        per = self.weight(sigma, self.sigma_data) * reduce_per_sample((d - x) ** 2, self.reduction)
        check_finite("DSM loss", x=x, denoiser_output=d)
        return per


def abs_mean_normaliser(x: Tensor, d_real: Tensor, min_value: float = 0.0) -> Tensor:
    """``mean_{C,H,W} |x - D_real(x_t)|`` per sample, shaped to broadcast against ``x``; no grad.

    DMD2's gradient normaliser (Yin et al. 2024, Eq. 8 of DMD) and SiD's ``w`` (clamped at 1e-5).
    """
    check_same_shape("x", x, "d_real", d_real)
    with torch.no_grad():
        w = (x - d_real).abs().flatten(1).mean(1)
        if min_value > 0:
            w = w.clamp_min(min_value)
    return pad_dims(w, x)


def gan_discriminator_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Non-saturating GAN discriminator loss, mean of ``softplus(D(fake)) + softplus(-D(real))``."""
    return F.softplus(logits_fake).mean() + F.softplus(-logits_real).mean()


def gan_generator_loss(logits_fake: Tensor) -> Tensor:
    """Non-saturating GAN generator loss, mean of ``softplus(-D(G(z)))``."""
    return F.softplus(-logits_fake).mean()


def r1_penalty(logits_real: Tensor, x_real: Tensor) -> Tensor:
    """R1: ``mean_i ||d sum(D(x_real)) / d x_real_i||^2`` (Mescheder et al. 2018); ``x_real`` must require grad."""
    if not x_real.requires_grad:
        raise ValueError("x_real must require grad for the R1 penalty")
    (g,) = torch.autograd.grad(logits_real.sum(), x_real, create_graph=True)
    return g.flatten(1).pow(2).sum(1).mean()
