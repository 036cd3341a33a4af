"""Multi-step samplers for any denoiser ``D(x_t, sigma, cond)`` (reference lines and Distillation++)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .sigmas import karras_sigmas

__all__ = ["edm_sampler", "sampling_sigmas"]


def sampling_sigmas(steps: int = 18, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> Tensor:
    """EDM's sampling schedule (Karras et al. 2022, Eq. 5), descending, with a final 0; float64."""
    return torch.cat([karras_sigmas(steps, sigma_min, sigma_max, rho).flip(0), torch.zeros(1, dtype=torch.float64)])


@torch.no_grad()
def edm_sampler(
    denoiser: Callable[..., Tensor],
    noise: Tensor,
    cond: Any = None,
    steps: int = 18,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
) -> Tensor:
    """EDM's deterministic Heun sampler (Karras et al. 2022, Alg. 1): ``2 * steps - 1`` evaluations.

    ``noise`` is standard normal; sampling starts from ``sigma_max * noise``.
    """
    t = sampling_sigmas(steps, sigma_min, sigma_max, rho).to(noise.device)
    x = noise.to(torch.float64) * t[0]
    for i in range(steps):
        s, s_next = t[i], t[i + 1]
        sb = s.expand(x.shape[0]).float()
        d = (x - denoiser(x.float(), sb, cond).to(torch.float64)) / s
        x_next = x + (s_next - s) * d
        if s_next > 0:
            sn = s_next.expand(x.shape[0]).float()
            d2 = (x_next - denoiser(x_next.float(), sn, cond).to(torch.float64)) / s_next
            x_next = x + (s_next - s) * (d + d2) / 2
        x = x_next
    return x.to(noise.dtype)
