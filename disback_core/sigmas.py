"""Noise-level samplers and denoising-score-matching weights, each defined once.

A sampler is called as ``sampler(n, device=None, generator=None) -> sigma`` of shape ``[n]``.

- :class:`LogNormalSigma`: EDM's training distribution ``ln sigma ~ N(P_mean, P_std^2)``
  (Karras et al. 2022, Table 1); Diff-Instruct and SiD's fake-score loss.
- :class:`KarrasIndexSigma`: a uniform index into the Karras grid of ``num`` levels; DMD2
  (generator: indices 20..980 of 1000; fake score and GAN: 0..999).
- :class:`KarrasContinuousSigma`: a continuous position on the Karras ramp, ``u ~ U(0, u_max)``;
  SiD's generator loss (``u_max = tmax / 1000 = 0.8``).
- :class:`LogitNormalSigma`: SD3's flow-time distribution ``logit t ~ N(m, s^2)`` (Esser et al.
  2024, Sec. 3.1), optionally shifted; :class:`UniformTimeSigma`: rectified flow's ``t ~ U`` (shifted).
  With ``sigma = t / (1 - t)`` (the flow frame, :mod:`disback_core.flow`), ``logit t = ln sigma``, so
  logit-normal in ``t`` is log-normal in ``sigma``, and a timestep shift ``s`` multiplies sigma by ``s``.
- :func:`flow_weight`: the DSM weight that makes the x0 loss the flow-matching velocity loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from .checks import check_number

__all__ = [
    "SigmaSampler",
    "LogNormalSigma",
    "KarrasIndexSigma",
    "KarrasContinuousSigma",
    "karras_sigmas",
    "edm_weight",
    "LogitNormalSigma",
    "UniformTimeSigma",
    "flow_weight",
]


class SigmaSampler(Protocol):
    def __call__(
        self, n: int, device: torch.device | str | None = None, generator: torch.Generator | None = None
    ) -> Tensor: ...


def _check_range(sigma_min: float, sigma_max: float, rho: float) -> None:
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    if not rho > 0:
        raise ValueError(f"rho must be > 0, got {rho}")


def karras_sigmas(num: int = 1000, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> Tensor:
    """The Karras grid (Karras et al. 2022, Eq. 5), ascending: index 0 is ``sigma_min``; float64."""
    _check_range(sigma_min, sigma_max, rho)
    if num < 2:
        raise ValueError(f"num must be >= 2, got {num}")
    ramp = torch.linspace(0, 1, num, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (lo + ramp * (hi - lo)) ** rho


@dataclass(frozen=True)
class LogNormalSigma:
    """``ln sigma ~ N(p_mean, p_std^2)``; EDM's defaults (-1.2, 1.2)."""

    p_mean: float = -1.2
    p_std: float = 1.2

    def __post_init__(self):
        check_number("p_mean", self.p_mean)
        check_number("p_std", self.p_std, low=0.0, low_open=True)

    def __call__(self, n: int, device=None, generator=None) -> Tensor:
        check_number("n", n, low=1, integer=True)
        z = torch.randn(n, generator=generator, device=device)
        return (z * self.p_std + self.p_mean).exp()


@dataclass(frozen=True)
class KarrasIndexSigma:
    """``sigma = grid[i]``, ``i ~ U{index_min..index_max}`` (inclusive) on an ascending Karras grid."""

    num: int = 1000
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    index_min: int = 0
    index_max: int = 999

    def __post_init__(self):
        if not 0 <= self.index_min <= self.index_max < self.num:
            raise ValueError(
                f"need 0 <= index_min <= index_max < num, got {self.index_min}, {self.index_max}, {self.num}"
            )
        _check_range(self.sigma_min, self.sigma_max, self.rho)

    @property
    def grid(self) -> Tensor:
        return karras_sigmas(self.num, self.sigma_min, self.sigma_max, self.rho)

    def __call__(self, n: int, device=None, generator=None) -> Tensor:
        idx = torch.randint(self.index_min, self.index_max + 1, (n,), generator=generator, device=device)
        return self.grid.to(device=idx.device, dtype=torch.float32)[idx]


@dataclass(frozen=True)
class KarrasContinuousSigma:
    """``sigma = (hi + (1 - u)(lo - hi))^rho`` with ``lo, hi = sigma_{min,max}^(1/rho)``, ``u ~ U(0, u_max)``.

    ``u = 0`` gives ``sigma_min``; ``u = 1`` would give ``sigma_max``. SiD uses ``u_max = 0.8``,
    so its sigmas lie in ``[0.002, ~24.4]`` for the default range.
    """

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    u_max: float = 0.8

    def __post_init__(self):
        _check_range(self.sigma_min, self.sigma_max, self.rho)
        if not 0 < self.u_max <= 1:
            raise ValueError(f"u_max must be in (0, 1], got {self.u_max}")

    def __call__(self, n: int, device=None, generator=None) -> Tensor:
        u = torch.rand(n, generator=generator, device=device) * self.u_max
        lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        return (hi + (1 - u) * (lo - hi)) ** self.rho


@dataclass(frozen=True)
class LogitNormalSigma:
    """SD3's logit-normal flow times, shifted: ``logit t ~ N(mean, std^2)``, ``sigma = shift * t / (1 - t)``.

    Since ``ln(t / (1 - t)) = logit t``, this is ``ln sigma ~ N(mean + ln shift, std^2)``: exactly
    :class:`LogNormalSigma` (same draws for the same generator). SD3 trains with ``(0, 1)`` (Esser
    et al. 2024, Sec. 3.1 and Table 1, "lognorm(0.00, 1.00)") and samples with ``shift = 3``.
    """

    mean: float = 0.0
    std: float = 1.0
    shift: float = 1.0

    def __post_init__(self):
        check_number("mean", self.mean)
        check_number("std", self.std, low=0.0, low_open=True)
        check_number("shift", self.shift, low=0.0, low_open=True)

    def __call__(self, n: int, device=None, generator=None) -> Tensor:
        return LogNormalSigma(self.mean + math.log(self.shift), self.std)(n, device, generator)


@dataclass(frozen=True)
class UniformTimeSigma:
    """Rectified flow's uniform times, shifted: ``t ~ U(t_min, t_max)``, ``sigma = shift * t / (1 - t)``
    (Liu et al. 2023; SD3's shift, Esser et al. 2024, Sec. 5.3.2). ``t_max < 1`` keeps sigma finite."""

    t_min: float = 1e-3
    t_max: float = 0.999
    shift: float = 1.0

    def __post_init__(self):
        if not 0 < self.t_min < self.t_max < 1:
            raise ValueError(f"need 0 < t_min < t_max < 1, got t_min={self.t_min}, t_max={self.t_max}")
        check_number("shift", self.shift, low=0.0, low_open=True)

    def __call__(self, n: int, device=None, generator=None) -> Tensor:
        check_number("n", n, low=1, integer=True)
        t = self.t_min + (self.t_max - self.t_min) * torch.rand(n, generator=generator, device=device)
        return self.shift * t / (1 - t)


def flow_weight(sigma: Tensor, sigma_data: float = 0.5) -> Tensor:
    """``(1 + sigma)^2 / sigma^2 = 1 / t^2``: with it the DSM loss on x0 is the flow-matching loss on
    the velocity, ``||v_hat - (eps - x0)||^2`` (``x0_hat - x0 = -t (v_hat - v)``); ``sigma_data`` unused.
    Pass it as ``DSMLoss(..., weight=flow_weight)``."""
    return (1 + sigma) ** 2 / sigma**2


def edm_weight(sigma: Tensor, sigma_data: float) -> Tensor:
    """EDM's loss weight ``lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2`` (Karras et al. 2022, Table 1)."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
