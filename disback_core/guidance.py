"""Distillation++: inference-time teacher guidance of a few-step student (Park, Lee, Ye 2024,
arXiv 2412.08871).

At each of the first ``guided_steps`` student steps, the student's ``x0`` estimate is pulled
toward the teacher's: re-noise it to a noise level ``s``, denoise with the teacher, and mix::

    x_s  = x0_S + s n
    x0_T = D_teacher(x_s, s, cond)                 (optionally with CFG)
    x0   = (1 - lam) x0_S + lam x0_T

then the student's own step continues from ``x0``.

Why this is the paper's proximal SDS step, in the VE frame (``x_s = x0 + s n``). The SDS loss
``L(x0) = E_n || eps_T(x_s, s) - n ||^2`` has the (stop-gradient) gradient
``eps_T - n``; with ``eps_T = (x_s - D_T(x_s, s)) / s`` this is ``(x0 - x0_T) / s``: the
score-distillation gradient points from the teacher's denoised estimate to ``x0``. The proximal
step ``argmin_x ||x - x0_S||^2 / (2 gamma) + w / (2 s) ||x - x0_T||^2`` (``x0_T`` held fixed) is
``x = (x0_S + (gamma w / s) x0_T) / (1 + gamma w / s)``, i.e. the convex mix above with
``lam = (gamma w / s) / (1 + gamma w / s)`` in ``[0, 1)``; ``lam = 1`` is the limit of an infinite
step (the teacher's estimate alone). The paper writes it for VP,
``x_t = sqrt(abar) x0 + sqrt(1 - abar) eps`` and ``x0_T = (x_t - sqrt(1 - abar) eps_T) / sqrt(abar)``;
dividing by ``sqrt(abar)`` gives ``x_t / sqrt(abar) = x0 + sigma eps`` with
``sigma = sqrt((1 - abar) / abar)`` (as :class:`~disback_core.denoisers.DiffusersDenoiser` does),
so the two forms are the same update.

The teacher's noise level at step ``i`` is the *next* student sigma ``sigmas[i + 1]`` (the
level the student re-noises to, so teacher and student see the same noise level). After the
last student step there is no next sigma; ``final_sigma`` is used there, by default the midpoint
on the Karras ramp (``rho = 7``) between ``sigmas[-1]`` and ``sigma_min = 0.002``: for the
:func:`~disback_core.fewstep.fewstep_sigmas` schedules this is the ramp point half a student
step further (``K = 1`` at 80: 2.51; ``K = 2``: 0.170). Measured on digits
(``benchmarks/results/fewstep-digits/README.md``): for a one-step student 2.51 is far too large
(the teacher's x0 there is a blurry posterior mean and the metric gets much worse); pass a small
``final_sigma`` (0.5 helped with ``lam = 1``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .denoisers import CFGDenoiser, DiffusersDenoiser, check_denoiser, check_sample, first_step
from .fewstep import (
    _implied_noise,
    _next_input,
    _randn_like,
    _sigma_batch,
    check_noise_mode,
    timesteps_to_sigmas,
    unwrap_student,
)

__all__ = ["distillation_pp_sample", "default_final_sigma", "TEACHER_NOISE_MODES"]

TEACHER_NOISE_MODES = ("fresh", "student")


def default_final_sigma(sigmas: Sequence[float], *, sigma_min: float = 0.002, rho: float = 7.0) -> float:
    """The teacher's noise level after the last student step: the Karras-ramp midpoint between
    ``sigmas[-1]`` and ``sigma_min``, ``((sigmas[-1]^(1/rho) + sigma_min^(1/rho)) / 2)^rho``."""
    last = float(sigmas[-1])
    if last == math.inf:
        raise ValueError("the only student sigma is inf (a start from pure noise): pass final_sigma")
    if not last > sigma_min:
        raise ValueError(f"the last student sigma ({last}) must exceed sigma_min ({sigma_min}); pass final_sigma")
    return ((last ** (1 / rho) + sigma_min ** (1 / rho)) / 2) ** rho


@torch.no_grad()
def distillation_pp_sample(
    student: Any,
    teacher: Any,
    z: Tensor,
    cond: Any = None,
    *,
    sigmas: Sequence[float] | Tensor | None = None,
    timesteps: Sequence[float] | Tensor | None = None,
    guided_steps: int = 1,
    lam: float = 0.5,
    final_sigma: float | None = None,
    teacher_cfg_scale: float | None = None,
    uncond: Any = None,
    noise: str = "fresh",
    teacher_noise: str = "student",
    generator: torch.Generator | None = None,
    teacher_generator: torch.Generator | None = None,
    stats: dict[str, int] | None = None,
) -> Tensor:
    """Sample a K-step student with Distillation++ teacher guidance at its first ``guided_steps`` steps.

    See the module docstring for the update and its derivation. ``lam = 0`` gives
    :func:`~disback_core.fewstep.sample_fewstep` bit for bit (same seeds; with ``teacher_noise=
    "fresh"`` pass a separate ``teacher_generator`` so the student's noise stream is untouched).

    Args:
        student: a :class:`~disback_core.fewstep.MultiStepGenerator` / ``OneStepGenerator`` (own
            sigmas and ``noise_scale``) or a denoiser with ``sigmas`` or ``timesteps``. Its first
            call is :func:`~disback_core.denoisers.first_step`, as in ``sample_fewstep``
            (``sigmas[0] = inf``: ``from_noise(z)``, a flow-matching student from pure noise).
        teacher: the teacher denoiser ``D(x_t, sigma, cond)``.
        sigmas: the student's noise levels, strictly decreasing (see
            :func:`~disback_core.fewstep.unwrap_student` for how they meet a generator's ``noise_scale``).
        timesteps: instead of ``sigmas``, a diffusers schedule's timesteps (e.g. DMD2's
            ``(999, 749, 499, 249)``), converted with the student's (or else the teacher's)
            :meth:`DiffusersDenoiser.t_to_sigma`.
        guided_steps: how many leading student steps are guided, in ``[0, K]``.
        lam: the mixing weight in ``[0, 1]``: 0 = the student alone, 1 = the teacher's estimate.
        final_sigma: the teacher's noise level after the last step (see :func:`default_final_sigma`).
        teacher_cfg_scale: classifier-free guidance of the teacher (:class:`CFGDenoiser`); needs ``uncond``.
        uncond: the unconditional input for CFG (e.g. the null label).
        noise: the student's update between steps, ``"fresh"`` (DMD2) or ``"deterministic"`` (DDIM).
        teacher_noise: the noise ``n`` of ``x_s``: ``"student"`` reuses the noise the student's next
            step then uses (with ``noise="deterministic"``, the student's implied noise
            ``(x - x0_S) / s_i``, at the first step with ``x = noise_scale z``, or ``z`` at
            ``sigmas[0] = inf``), so student and teacher see the same ``x_s``; ``"fresh"`` draws
            new noise from ``teacher_generator`` (default ``generator``). After the last step the
            student draws no noise, so ``"student"`` draws it fresh there.
        generator: ``torch.Generator`` for the student's noise (default: the global RNG).
        teacher_generator: ``torch.Generator`` for the teacher's fresh noise.
        stats: a dict to which ``"student_evals"`` and ``"teacher_evals"`` are added (network
            evaluations; a CFG call counts 2, its two branches).
    """
    check_sample(z, "z")
    check_noise_mode(noise)
    if teacher_noise not in TEACHER_NOISE_MODES:
        raise ValueError(f"teacher_noise must be one of {TEACHER_NOISE_MODES}, got {teacher_noise!r}")
    if sigmas is not None and timesteps is not None:
        raise ValueError("pass sigmas or timesteps, not both")
    if timesteps is not None:
        sched = student if isinstance(student, DiffusersDenoiser) else teacher
        if not isinstance(sched, DiffusersDenoiser):
            raise TypeError("timesteps needs a DiffusersDenoiser student or teacher (for its schedule); pass sigmas")
        sigmas = timesteps_to_sigmas(sched, timesteps)
    denoiser, sig, scale = unwrap_student(student, sigmas)
    check_denoiser(teacher, "teacher")
    k = len(sig)
    if not (isinstance(guided_steps, int) and 0 <= guided_steps <= k):
        raise ValueError(f"guided_steps must be an int in [0, {k}] (the student's steps), got {guided_steps!r}")
    if not (isinstance(lam, (int, float)) and 0.0 <= lam <= 1.0):
        raise ValueError(f"lam must be in [0, 1], got {lam!r}")
    if teacher_cfg_scale is not None:
        if uncond is None:
            raise ValueError("teacher_cfg_scale needs uncond (the unconditional input, e.g. the null label)")
        teacher = CFGDenoiser(teacher, teacher_cfg_scale, uncond)
    if guided_steps == k:
        final_sigma = default_final_sigma(sig) if final_sigma is None else float(final_sigma)
        if not (math.isfinite(final_sigma) and final_sigma > 0):
            raise ValueError(f"final_sigma must be finite and > 0, got {final_sigma}")
    t_gen = generator if teacher_generator is None else teacher_generator
    teacher_evals = 0
    x = z  # the input of step i; step 0 takes the noise z itself (first_step scales it)
    for i, s in enumerate(sig):
        x0 = first_step(denoiser, z, s, scale, cond) if i == 0 else denoiser(x, _sigma_batch(s, x), cond)
        last = i + 1 == k
        n: Tensor | None = None
        if not last and teacher_noise == "student" and i < guided_steps:
            # the student's own noise for its next step, drawn once and shared with the teacher
            n = _implied_noise(z, x, x0, sig, i, scale) if noise == "deterministic" else _randn_like(x0, generator)
        if i < guided_steps:
            s_t = final_sigma if last else sig[i + 1]
            assert s_t is not None
            n_t = n if n is not None else _randn_like(x0, t_gen)
            x_s = x0 + s_t * n_t
            x0_t = teacher(x_s, _sigma_batch(s_t, x_s), cond)
            teacher_evals += 2 if isinstance(teacher, CFGDenoiser) else 1
            x0 = (1 - lam) * x0 + lam * x0_t
        if not last:
            if n is not None:
                x = x0 + sig[i + 1] * n
            else:
                x = _next_input(z, x, x0, sig, i, scale, noise, generator)
    if stats is not None:
        stats["student_evals"] = stats.get("student_evals", 0) + k
        stats["teacher_evals"] = stats.get("teacher_evals", 0) + teacher_evals
    return x0
