"""One training iteration of any :class:`~disback_core.protocol.ScoreDistiller`, for your own loop.

Plain functions, no Trainer: call :func:`critic_step` and :func:`generator_step` yourself, or
:func:`train_step`, which runs ``method.critic_steps`` critic updates and then one generator
update (DMD2's two-time-scale rule: the generator is updated once per five critic updates).

Example::

    for it in range(iterations):
        logs = train_step(method, generator, fake, target, g_opt, f_opt, next_batch)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .denoisers import takes_args
from .faults import NonFiniteGuard
from .protocol import ScoreDistiller

__all__ = ["Batch", "as_batch", "call_generator", "critic_step", "generator_step", "train_step", "optimizer_params"]


@dataclass
class Batch:
    """What one update consumes: generator noise ``z`` and its ``cond``; ``real`` data (and its
    ``real_cond``) only for methods with a GAN term."""

    z: Tensor
    cond: Any = None
    real: Tensor | None = None
    real_cond: Any = None


def as_batch(obj: Any, name: str = "sample()") -> Batch:
    """A :class:`Batch` from what a sampler returns: a ``Batch``, a noise tensor ``z``, or ``(z, cond)``."""
    if isinstance(obj, Batch):
        return obj
    if isinstance(obj, Tensor):
        return Batch(obj)
    if isinstance(obj, (tuple, list)) and len(obj) == 2 and isinstance(obj[0], Tensor):
        return Batch(obj[0], obj[1])
    raise TypeError(f"{name} must return a Batch, a noise tensor z, or a pair (z, cond); got {type(obj).__name__}")


def call_generator(generator: Callable[..., Tensor], z: Tensor, cond: Any = None) -> Tensor:
    """``generator(z, cond)``; a one-argument generator ``G(z)`` is called as such when ``cond`` is None."""
    if cond is None and not takes_args(generator, 2):
        return generator(z)
    if not takes_args(generator, 2):
        raise TypeError(f"generator ({type(generator).__name__}) takes only z, but the batch has a cond")
    return generator(z, cond)


def optimizer_params(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """The trainable parameters an optimizer updates."""
    return [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]


def _logs(prefix: str, out: dict[str, Tensor]) -> dict[str, float]:
    return {f"{prefix}/{k}": float(v.detach()) for k, v in out.items()}


def _update(
    where: str,
    loss_fn: Callable[[], dict[str, Tensor]],
    optimizer: torch.optim.Optimizer,
    max_grad_norm: float | None,
    guard: NonFiniteGuard | None,
) -> dict[str, float] | None:
    """zero_grad, loss, backward into the optimizer's parameters only, clip, step. With a ``guard``,
    a non-finite loss or gradient drops the update (None is returned) or stops the run, per its policy."""
    optimizer.zero_grad(set_to_none=True)
    params = optimizer_params(optimizer)
    try:
        out = loss_fn()
    except FloatingPointError as e:  # a loss's own finiteness check (check_finite) fired
        if guard is None:
            raise
        guard.failed(where, str(e), params)
        return None
    out["loss"].backward(inputs=params)
    if guard is not None and not guard.check(where, out["loss"], params):
        return None
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    return _logs(where, out)


def critic_step(
    method: ScoreDistiller,
    generator: Callable[..., Tensor],
    fake: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    max_grad_norm: float | None = None,
    guard: NonFiniteGuard | None = None,
    *,
    samples: Tensor | None = None,
) -> dict[str, float]:
    """One update of the fake score (and the method's GAN head) on fresh, detached generator samples,
    or on ``samples`` (generator outputs for ``batch``, e.g. the generator update's, as DMD2 reuses
    them). A dropped update (``guard``) returns ``{"critic/skipped": 1.0}``."""
    if samples is not None:
        x = samples.detach()
    else:
        with torch.no_grad():
            x = call_generator(generator, batch.z, batch.cond)
    logs = _update(
        "critic",
        lambda: method.fake_score_loss(x, fake, batch.cond, real=batch.real, real_cond=batch.real_cond),
        optimizer,
        max_grad_norm,
        guard,
    )
    return {"critic/skipped": 1.0} if logs is None else logs


def generator_step(
    method: ScoreDistiller,
    generator: Callable[..., Tensor],
    target: Any,
    fake: Any,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    max_grad_norm: float | None = None,
    guard: NonFiniteGuard | None = None,
) -> dict[str, float]:
    """One generator update, then ``method.on_generator_step()``.

    Only the optimizer's parameters receive gradients, so a fake score that the loss
    differentiates through (SiD, a GAN term) keeps its own gradients untouched. A dropped update
    (``guard``) is not counted as a generator step (no ``on_generator_step``) and returns
    ``{"generator/skipped": 1.0}``."""
    return _generator_update(method, generator, target, fake, optimizer, batch, max_grad_norm, guard)[0]


def _generator_update(
    method: ScoreDistiller,
    generator: Callable[..., Tensor],
    target: Any,
    fake: Any,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    max_grad_norm: float | None,
    guard: NonFiniteGuard | None,
) -> tuple[dict[str, float], Tensor | None]:
    """generator_step's update; also returns the samples it was computed on (detached), or None if dropped."""
    seen: list[Tensor] = []

    def loss() -> dict[str, Tensor]:
        x = call_generator(generator, batch.z, batch.cond)
        seen.append(x)
        return method.generator_loss(x, target, fake, batch.cond)

    logs = _update("generator", loss, optimizer, max_grad_norm, guard)
    if logs is None:
        return {"generator/skipped": 1.0}, None
    method.on_generator_step()
    return logs, seen[0].detach()


def train_step(
    method: ScoreDistiller,
    generator: Callable[..., Tensor],
    fake: nn.Module,
    target: Any,
    generator_optimizer: torch.optim.Optimizer,
    fake_optimizer: torch.optim.Optimizer,
    next_batch: Callable[[], Batch],
    max_grad_norm: float | None = None,
    guard: NonFiniteGuard | None = None,
    *,
    reuse_samples: bool = False,
) -> dict[str, float]:
    """``method.critic_steps`` critic updates, then one generator update; each draws its own batch.

    With ``reuse_samples`` the order is DMD2's own (Yin et al. 2024, ``train_one_step``): the generator
    update first, then the critic updates, the first of them on the generator update's samples
    (detached, computed before the generator's optimizer step, as DMD2 does) instead of a fresh
    forward: one generator forward fewer per iteration. Returns the last critic logs and the
    generator logs, as floats. ``guard``: see :class:`~disback_core.faults.NonFiniteGuard` (without
    one, a non-finite loss raises).
    """
    if method.critic_steps < 1:
        raise ValueError(f"method.critic_steps must be >= 1, got {method.critic_steps}")
    logs: dict[str, float] = {}
    if reuse_samples:
        batch = as_batch(next_batch(), "next_batch()")
        g_logs, x = _generator_update(method, generator, target, fake, generator_optimizer, batch, max_grad_norm, guard)
        for i in range(method.critic_steps):
            b = batch if i == 0 and x is not None else as_batch(next_batch(), "next_batch()")
            logs.update(
                critic_step(
                    method, generator, fake, fake_optimizer, b, max_grad_norm, guard, samples=x if i == 0 else None
                )
            )
        logs.update(g_logs)
        return logs
    for _ in range(method.critic_steps):
        logs.update(
            critic_step(
                method, generator, fake, fake_optimizer, as_batch(next_batch(), "next_batch()"), max_grad_norm, guard
            )
        )
    logs.update(
        generator_step(
            method,
            generator,
            target,
            fake,
            generator_optimizer,
            as_batch(next_batch(), "next_batch()"),
            max_grad_norm,
            guard,
        )
    )
    return logs
