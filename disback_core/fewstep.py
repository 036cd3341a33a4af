"""Few-step students: DMD2's multi-step generator and its sampler (Yin et al. 2024, Sec. 4.5).

A K-step student is one network ``D`` run at a fixed, decreasing list of noise levels
``sigmas[0] > ... > sigmas[K-1]``: ``x0 = D(noise_scale z, sigmas[0])`` (``noise_scale =
sigmas[0]`` unless given), then ``x = x0 + sigmas[1] n``, ``x0 = D(x, sigmas[1])`` and so on. One
step (``K = 1``) is :class:`~disback_core.denoisers.OneStepGenerator` exactly; the first call of
every student and sampler is :func:`~disback_core.denoisers.first_step`. ``sigmas[0]`` may be
``math.inf`` for a denoiser with ``from_noise(z, cond)`` (a flow-matching model started from pure
noise, flow time t = 1); every later sigma is finite.

Training uses DMD2's *backward simulation* (Sec. 4.5): the generator's input at step ``k`` is
made by the current generator itself, so training and inference see the same inputs (no
train/test mismatch from noising real images). :class:`MultiStepGenerator` draws ``k`` per call,
builds ``x_k`` without gradient and returns ``D(x_k, sigmas[k])`` with gradient, so it drops into
:func:`~disback_core.step.train_step` (and :class:`~disback_core.backtracking.Backtrack`) as the
``generator`` unchanged.

DMD2's 4-step SDXL student uses the timesteps ``999, 749, 499, 249`` (uniform in ``t``, the last
one not at 0); :func:`fewstep_sigmas` is the analogue on EDM's Karras ramp and
:func:`timesteps_to_sigmas` maps a diffusers schedule's timesteps to sigmas.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .denoisers import (
    DiffusersDenoiser,
    OneStepGenerator,
    check_sample,
    check_start,
    first_noise,
    first_step,
    trainable_copy,
)

__all__ = [
    "MultiStepGenerator",
    "make_fewstep_generator",
    "sample_fewstep",
    "fewstep_sigmas",
    "timesteps_to_sigmas",
    "check_sigmas",
    "DMD2_SDXL_TIMESTEPS",
    "NOISE_MODES",
]

DMD2_SDXL_TIMESTEPS = (999, 749, 499, 249)
NOISE_MODES = ("fresh", "deterministic")


def check_sigmas(sigmas: Any, name: str = "sigmas", *, allow_inf_first: bool = False) -> tuple[float, ...]:
    """``sigmas`` as a tuple of floats: non-empty, finite, > 0 and strictly decreasing; else a
    ``ValueError`` (or ``TypeError``) naming ``name``.

    ``allow_inf_first`` (keyword-only): ``sigmas[0]`` may be ``math.inf`` (a start from pure noise,
    see :func:`~disback_core.denoisers.first_step`); every later sigma must still be finite.
    """
    if isinstance(sigmas, Tensor):
        if sigmas.ndim > 1:
            raise ValueError(f"{name} must be a 1-d list of noise levels, got shape {tuple(sigmas.shape)}")
        values = [float(v) for v in sigmas.reshape(-1).tolist()]
    elif isinstance(sigmas, (int, float)):
        values = [float(sigmas)]
    else:
        try:
            values = [float(v) for v in sigmas]
        except TypeError as e:
            raise TypeError(f"{name} must be a sequence of floats, got {type(sigmas).__name__}") from e
    if not values:
        raise ValueError(f"{name} must hold at least one noise level, got an empty list")
    if allow_inf_first and values[0] == math.inf:
        if not all(math.isfinite(v) and v > 0 for v in values[1:]):
            raise ValueError(
                f"{name} must be finite and > 0 after the first (only {name}[0] may be inf, "
                f"a start from pure noise), got {values}"
            )
    elif not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"{name} must be finite and > 0, got {values}")
    if any(b >= a for a, b in zip(values, values[1:])):
        raise ValueError(f"{name} must be strictly decreasing (sigmas[0] the largest), got {values}")
    return tuple(values)


def check_noise_mode(noise: str, name: str = "noise") -> str:
    if noise not in NOISE_MODES:
        raise ValueError(f"{name} must be one of {NOISE_MODES}, got {noise!r}")
    return noise


def fewstep_sigmas(
    steps: int, *, sigma_max: float = 80.0, sigma_min: float = 0.002, rho: float = 7.0
) -> tuple[float, ...]:
    """The bench's K-step schedule: ``steps`` points uniform on the Karras ramp (Karras et al. 2022,
    Eq. 5), from ``sigma_max`` down, without the end at ``sigma_min``.

    ``sigma_i = (hi + (i / K) (lo - hi))^rho``, ``i = 0..K-1``, ``lo, hi = sigma_{min,max}^(1/rho)``:
    the ramp analogue of DMD2's SDXL timesteps ``999, 749, 499, 249`` (``t_i = 999 - i * 1000 / K``).
    ``steps = 1`` gives ``(sigma_max,)``, the one-step generator; for ``K = 4`` and the defaults,
    ``(80, 17.5, 2.51, 0.170)``.
    """
    if not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return tuple(float(sigma_max) if i == 0 else (hi + i / steps * (lo - hi)) ** rho for i in range(steps))


def timesteps_to_sigmas(denoiser: DiffusersDenoiser, timesteps: Sequence[float] | Tensor) -> tuple[float, ...]:
    """A diffusers schedule's (decreasing) timesteps as VE sigmas, ``sigma_t = sqrt((1 - abar_t) / abar_t)``,
    via :meth:`DiffusersDenoiser.t_to_sigma`; e.g. DMD2's SDXL ``(999, 749, 499, 249)``."""
    if not isinstance(denoiser, DiffusersDenoiser):
        raise TypeError(f"denoiser must be a DiffusersDenoiser (it holds the schedule), got {type(denoiser).__name__}")
    t = torch.as_tensor(timesteps, dtype=torch.float64).reshape(-1)
    if t.numel() == 0:
        raise ValueError("timesteps must hold at least one timestep, got an empty list")
    if (t < 0).any() or (t > len(denoiser.log_sigmas) - 1).any():
        raise ValueError(f"timesteps must lie in [0, {len(denoiser.log_sigmas) - 1}], got {t.tolist()}")
    return check_sigmas(denoiser.t_to_sigma(t), "timesteps (as sigmas)")


def _sigma_batch(sigma: float, x: Tensor) -> Tensor:
    # a [batch] float32 tensor, exactly as OneStepGenerator passes it (NVlabs' EDMPrecond needs a tensor)
    return torch.full((x.shape[0],), sigma, device=x.device, dtype=torch.float32)


def _randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


class MultiStepGenerator(nn.Module):
    """DMD2's multi-step generator, trained by backward simulation (Yin et al. 2024, Sec. 4.5).

    ``forward(z, cond)`` (the training call): take a step index ``k`` (uniform over ``0..K-1``
    from ``generator``, or the fixed ``step``), start from ``x = noise_scale z``, run the *current*
    weights through steps ``0..k-1`` under ``torch.no_grad()`` (``x0 = D(x, s_i)``, ``x = x0 +
    s_{i+1} n`` with fresh noise ``n``, as DMD2 does), and return ``D(x_k, s_k, cond)`` with
    gradient. Gradients therefore flow only through the last call; the simulated input is
    detached. The first call of both is :func:`~disback_core.denoisers.first_step`. With ``K = 1``
    this is :class:`~disback_core.denoisers.OneStepGenerator` (same ``noise_scale``) bit for bit.
    For inference use :meth:`sample` (all K steps).

    Args:
        denoiser: the trainable ``D(x_t, sigma, cond)`` (a copy of the teacher).
        sigmas: the K noise levels, strictly decreasing, e.g. :func:`fewstep_sigmas` or
            :func:`timesteps_to_sigmas`. ``sigmas[0]`` may be ``math.inf`` when ``denoiser`` has
            ``from_noise(z, cond)`` (a flow-matching model from pure noise): then the first x0 is
            ``denoiser.from_noise(z, cond)``.
        noise_scale: keyword-only, what ``z`` is multiplied by for the first call ``D(noise_scale z,
            sigmas[0])`` (DMD2 Sec. 4.5: the first step sees pure noise): ``sigmas[0]`` by default
            (the EDM convention), ``sqrt(1 + sigma^2)`` for a DMD2-style diffusers student fed raw
            noise (as :func:`~disback_core.denoisers.timestep_generator`). Ignored (stored as 1.0)
            at ``sigmas[0] = inf``.
        generator: a ``torch.Generator`` for the step index and the simulation noise (seed it to
            reproduce a run); default: torch's global RNG.
        step: a fixed step index for every call (settable later: ``g.step = 2``); ``None`` draws.
    """

    def __init__(
        self,
        denoiser: nn.Module,
        sigmas: Sequence[float] | Tensor,
        *,
        noise_scale: float | None = None,
        generator: torch.Generator | None = None,
        step: int | None = None,
    ):
        super().__init__()
        self.sigmas = check_sigmas(sigmas, "sigmas", allow_inf_first=True)
        self.noise_scale = check_start(denoiser, self.sigmas[0], noise_scale, name="sigmas[0]")
        self.denoiser = denoiser
        self.generator = generator
        self.step = step
        self.last_step: int | None = None  # the step index of the latest call

    @property
    def steps(self) -> int:
        return len(self.sigmas)

    @property
    def sigma_init(self) -> float:
        """The first (largest) sigma, as :attr:`OneStepGenerator.sigma_init` (``inf`` for a pure-noise start)."""
        return self.sigmas[0]

    @property
    def step(self) -> int | None:
        return self._step

    @step.setter
    def step(self, value: int | None) -> None:
        if value is not None and not (isinstance(value, int) and 0 <= value < len(self.sigmas)):
            raise ValueError(f"step must be None or an int in [0, {len(self.sigmas) - 1}], got {value!r}")
        self._step = value

    def draw_step(self) -> int:
        """The step index of the next training call."""
        if self._step is not None:
            return self._step
        if len(self.sigmas) == 1:
            return 0  # no draw: K = 1 leaves the RNG untouched, like OneStepGenerator
        return int(torch.randint(len(self.sigmas), (1,), generator=self.generator))

    @torch.no_grad()
    def simulate(self, z: Tensor, cond: Any = None, step: int = 0) -> Tensor:
        """Backward simulation (DMD2 Sec. 4.5): the (detached) input ``x_step`` the current weights
        lead to, ``noise_scale z`` at ``step = 0``. A pure-noise start (``sigmas[0] = inf``) has no
        input at step 0 (its first call is ``from_noise(z)``): ``step`` must be >= 1 there."""
        if step == 0:
            if self.sigmas[0] == math.inf:
                raise ValueError(
                    "sigmas[0] is inf (a start from pure noise): step 0 has no input x_0; simulate step >= 1"
                )
            return self.noise_scale * z
        x0 = first_step(self.denoiser, z, self.sigmas[0], self.noise_scale, cond)
        x = x0 + self.sigmas[1] * _randn_like(x0, self.generator)
        for i in range(1, step):
            x0 = self.denoiser(x, _sigma_batch(self.sigmas[i], x), cond)
            x = x0 + self.sigmas[i + 1] * _randn_like(x0, self.generator)
        return x

    def forward(self, z: Tensor, cond: Any = None) -> Tensor:
        check_sample(z, "z")
        k = self.draw_step()
        self.last_step = k
        if k == 0:
            return first_step(self.denoiser, z, self.sigmas[0], self.noise_scale, cond)
        x = self.simulate(z, cond, k)
        return self.denoiser(x, _sigma_batch(self.sigmas[k], x), cond)

    def sample(
        self, z: Tensor, cond: Any = None, *, noise: str = "fresh", generator: torch.Generator | None = None
    ) -> Tensor:
        """All K steps (:func:`sample_fewstep` with this generator's sigmas)."""
        return sample_fewstep(self, z, cond, noise=noise, generator=generator)


def make_fewstep_generator(
    teacher: nn.Module,
    sigmas: Sequence[float] | Tensor,
    *,
    noise_scale: float | None = None,
    generator: torch.Generator | None = None,
) -> MultiStepGenerator:
    """A trainable :class:`MultiStepGenerator` from a deep copy of ``teacher`` (which is untouched);
    ``noise_scale`` and ``generator`` as there."""
    return MultiStepGenerator(trainable_copy(teacher), sigmas, noise_scale=noise_scale, generator=generator)


def unwrap_student(student: Any, sigmas: Any) -> tuple[Any, tuple[float, ...], float]:
    """The denoiser, sigmas and noise scale of a student: a :class:`MultiStepGenerator` or
    :class:`~disback_core.denoisers.OneStepGenerator` (their own sigmas and ``noise_scale`` unless
    ``sigmas`` is given), or a plain denoiser with ``sigmas`` (noise scale ``sigmas[0]``, or 1.0 for
    a pure-noise start, as :func:`~disback_core.denoisers.check_start` gives it).

    Given ``sigmas`` keep the generator's ``noise_scale`` when they start at its first sigma. At
    another first sigma the EDM convention (``noise_scale = sigmas[0]``) carries over, but a custom
    ``noise_scale`` (e.g. ``sqrt(1 + sigma^2)``) belongs to its own first sigma: a ``ValueError``.
    """
    if isinstance(student, (MultiStepGenerator, OneStepGenerator)):
        own = student.sigmas if isinstance(student, MultiStepGenerator) else (student.sigma_init,)
        denoiser, scale = student.denoiser, student.noise_scale
        if sigmas is None:
            return denoiser, own, scale
        sig = check_sigmas(sigmas, "sigmas", allow_inf_first=True)
        given: float | None = scale
        if sig[0] != own[0]:
            if own[0] != math.inf and scale != own[0]:
                raise ValueError(
                    f"sigmas start at {sig[0]}, but the student's noise_scale {scale} belongs to its own first "
                    f"sigma {own[0]}; start sigmas at {own[0]}, or pass the plain denoiser (student.denoiser) "
                    "to start from sigmas[0] * z"
                )
            given = None  # the convention noise_scale = sigmas[0] (or a pure-noise start)
        return denoiser, sig, check_start(denoiser, sig[0], given, name="sigmas[0]")
    if not callable(student):
        raise TypeError(f"student must be a generator or a denoiser D(x_t, sigma, cond), got {type(student).__name__}")
    if sigmas is None:
        raise ValueError("sigmas is required when the student is a plain denoiser (not a MultiStepGenerator)")
    sig = check_sigmas(sigmas, "sigmas", allow_inf_first=True)
    return student, sig, check_start(student, sig[0], None, name="sigmas[0]")


@torch.no_grad()
def sample_fewstep(
    student: Any,
    z: Tensor,
    cond: Any = None,
    *,
    sigmas: Sequence[float] | Tensor | None = None,
    noise: str = "fresh",
    generator: torch.Generator | None = None,
    stats: dict[str, int] | None = None,
) -> Tensor:
    """Run a K-step student: ``x0 = D(noise_scale z, s_0)`` (:func:`~disback_core.denoisers.first_step`;
    ``D.from_noise(z)`` at ``s_0 = inf``); then ``x = x0 + s_{i+1} n`` and ``x0 = D(x, s_{i+1})``,
    with fresh noise ``n`` (``noise="fresh"``, DMD2's sampler, Sec. 4.5) or the deterministic
    DDIM-style ``n = (x - x0) / s_i`` (``"deterministic"``; at the first step ``x = noise_scale z``,
    and ``n = z`` at ``s_0 = inf``, :func:`~disback_core.denoisers.first_noise`). Returns the last ``x0``.
    With one sigma it is the generator's own call, bit for bit.

    Args:
        student: a :class:`MultiStepGenerator`, a ``OneStepGenerator`` (their ``noise_scale``) or
            a denoiser (``noise_scale = sigmas[0]``).
        sigmas: the student's noise levels (default: the generator's own); see :func:`unwrap_student`.
        generator: a ``torch.Generator`` for the fresh noise (default: the global RNG).
        stats: a dict to which ``"student_evals"`` (network calls) is added.
    """
    check_sample(z, "z")
    check_noise_mode(noise)
    denoiser, sig, scale = unwrap_student(student, sigmas)
    x = z  # the input of step i; step 0 takes the noise z itself (first_step scales it)
    for i, s in enumerate(sig):
        x0 = first_step(denoiser, z, s, scale, cond) if i == 0 else denoiser(x, _sigma_batch(s, x), cond)
        if i + 1 < len(sig):
            x = _next_input(z, x, x0, sig, i, scale, noise, generator)
    if stats is not None:
        stats["student_evals"] = stats.get("student_evals", 0) + len(sig)
    return x0


def _implied_noise(z: Tensor, x: Tensor, x0: Tensor, sig: Sequence[float], i: int, scale: float) -> Tensor:
    """The noise of the deterministic update after step ``i``: ``(x - x0) / s_i`` for the input ``x``
    of step ``i``; at step 0 from the real first input ``scale * z`` (``z`` at ``s_0 = inf``)."""
    return first_noise(z, x0, sig[0], scale) if i == 0 else (x - x0) / sig[i]


def _next_input(
    z: Tensor,
    x: Tensor,
    x0: Tensor,
    sig: Sequence[float],
    i: int,
    scale: float,
    noise: str,
    generator: torch.Generator | None,
) -> Tensor:
    """The input of step ``i + 1``: ``x0 + s_{i+1} n``, ``n`` fresh or the deterministic update's."""
    n = _implied_noise(z, x, x0, sig, i, scale) if noise == "deterministic" else _randn_like(x0, generator)
    return x0 + sig[i + 1] * n
