"""Offline, seeded sample-quality metrics."""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["sliced_wasserstein"]


def sliced_wasserstein(a: Tensor, b: Tensor, projections: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance between two equal-size point sets ``[n, d]``.

    ``sqrt(mean_theta W2^2(a.theta, b.theta))`` over ``projections`` random unit directions drawn
    from a generator seeded with ``seed`` (so the value is deterministic).
    """
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b must be [n, d] with the same d, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"a and b must have the same number of points, got {a.shape[0]} and {b.shape[0]}")
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(a.shape[1], projections, generator=g, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    pa = (a.double().cpu() @ theta).sort(0).values
    pb = (b.double().cpu() @ theta).sort(0).values
    return float(((pa - pb) ** 2).mean().sqrt())
