"""Closed-form denoisers: exact teachers for tests and reference lines in benchmarks."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .denoisers import as_sigma, check_sample

__all__ = ["GaussianMixtureDenoiser"]


class GaussianMixtureDenoiser(nn.Module):
    """The exact ``E[x0 | x_t]`` for data ``sum_k w_k N(mu_k, s_k^2 I)`` and ``x_t = x0 + sigma n``.

    ``D(x_t) = sum_k r_k(x_t) (mu_k + s_k^2 / (s_k^2 + sigma^2) (x_t - mu_k))`` with
    responsibilities ``r_k`` proportional to ``w_k N(x_t; mu_k, (s_k^2 + sigma^2) I)``; computed in
    float64. A ``cond`` of component indices ``[batch]`` restricts each sample to its component.
    """

    # buffers, float64
    means: Tensor  # [K, d]
    stds: Tensor  # [K]
    log_weights: Tensor  # [K], normalised

    def __init__(self, means: Tensor, stds: Tensor | float, weights: Tensor | None = None):
        super().__init__()
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.ndim != 2:
            raise ValueError(f"means must have shape [components, dim], got {tuple(means.shape)}")
        k = means.shape[0]
        stds = torch.as_tensor(stds, dtype=torch.float64).expand(k).clone()
        weights = (
            torch.full((k,), 1.0 / k, dtype=torch.float64)
            if weights is None
            else torch.as_tensor(weights, dtype=torch.float64)
        )
        if (stds < 0).any() or (weights <= 0).any() or weights.shape != (k,):
            raise ValueError("stds must be >= 0 and weights > 0 with one value per component")
        self.register_buffer("means", means)
        self.register_buffer("stds", stds)
        self.register_buffer("log_weights", (weights / weights.sum()).log())

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``n`` samples (float32) and their component indices."""
        k = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        noise = torch.randn(n, self.means.shape[1], generator=generator, dtype=torch.float64)
        return (self.means[k] + self.stds[k, None] * noise).float(), k

    def forward(self, x: Tensor, sigma: Any, cond: Any = None) -> Tensor:
        check_sample(x, "x")
        s2 = as_sigma(sigma, x).to(torch.float64)[:, None] ** 2  # [B, 1]
        x64 = x.to(torch.float64).flatten(1)  # [B, d]
        v = self.stds[None] ** 2 + s2  # [B, K] total variance per component
        diff = x64[:, None, :] - self.means[None]  # [B, K, d]
        d = x64.shape[1]
        logp = self.log_weights[None] - 0.5 * (diff**2).sum(-1) / v - 0.5 * d * v.log()
        if cond is not None:
            mask = torch.full_like(logp, float("-inf"))
            mask.scatter_(1, torch.as_tensor(cond, device=x.device).long()[:, None], 0.0)
            logp = logp + mask
        r = logp.softmax(dim=1)  # [B, K]
        post = self.means[None] + (self.stds[None] ** 2 / v)[..., None] * diff  # [B, K, d]
        return (r[..., None] * post).sum(1).reshape(x.shape).to(x.dtype)
