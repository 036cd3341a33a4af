"""Training-time faults: never train on NaN/inf, and say when a generator diverges.

- :class:`NonFiniteGuard`: a NaN or an inf in a loss or a gradient is detected before the
  optimizer steps. Policy ``"skip"`` drops that update (gradients cleared, optimizer not stepped)
  and counts it; after ``max_consecutive`` skipped updates in a row the run stops with
  ``FloatingPointError`` (resume from the last good state). Policy ``"raise"`` stops at the first.
  :func:`~disback_core.step.critic_step`, :func:`~disback_core.step.generator_step` and
  :func:`~disback_core.step.train_step` take it as ``guard=``; a loop of your own calls
  :meth:`NonFiniteGuard.check` between ``backward()`` and ``optimizer.step()``.
- :class:`DivergenceMonitor`: flags a metric (a loss, an evaluation) that grows past ``factor``
  times the best value seen after ``warmup`` observations.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

__all__ = ["NonFiniteGuard", "DivergenceMonitor", "POLICIES"]

POLICIES = ("skip", "raise")


def _grads_finite(params: Iterable[Tensor]) -> bool:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return True
    norms = torch.stack([torch.linalg.vector_norm(g.detach().float()) for g in grads])
    return bool(torch.isfinite(norms).all())


class NonFiniteGuard:
    """Detects non-finite losses and gradients and applies a policy; see the module docstring.

    Attributes: ``skipped`` (updates dropped so far), ``consecutive`` (in a row, now),
    ``last_reason`` (what the last dropped update held).
    """

    def __init__(self, policy: str = "skip", *, max_consecutive: int = 10):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if isinstance(max_consecutive, bool) or not isinstance(max_consecutive, int) or max_consecutive < 1:
            raise ValueError(f"max_consecutive must be an integer >= 1, got {max_consecutive!r}")
        self.policy, self.max_consecutive = policy, max_consecutive
        self.skipped = 0
        self.consecutive = 0
        self.last_reason = ""

    def check(self, where: str, loss: Tensor | None, params: Iterable[Tensor]) -> bool:
        """True if ``loss`` and the gradients of ``params`` are finite (step the optimizer); False if
        this update must be dropped (the gradients of ``params`` are cleared here); raises per policy."""
        params = list(params)
        if loss is not None and not bool(torch.isfinite(loss.detach()).all()):
            return self.failed(where, f"loss {float(loss.detach().float().sum())}", params)
        if not _grads_finite(params):
            return self.failed(where, "a gradient holds NaN or inf", params)
        self.consecutive = 0
        return True

    def failed(self, where: str, reason: str, params: Iterable[Tensor] = ()) -> bool:
        """Record a dropped update (e.g. a loss that raised ``FloatingPointError``); False, or raise."""
        for p in params:
            p.grad = None
        self.skipped += 1
        self.consecutive += 1
        self.last_reason = f"{where}: {reason}"
        if self.policy == "raise":
            raise FloatingPointError(f"non-finite {self.last_reason} (policy 'raise')")
        if self.consecutive >= self.max_consecutive:
            raise FloatingPointError(
                f"{self.consecutive} updates in a row were non-finite (last: {self.last_reason}); "
                f"stopping instead of training on garbage ({self.skipped} skipped in all). "
                "Resume from the last good state with a lower learning rate or more clipping"
            )
        return False

    def state_dict(self) -> dict[str, int | str]:
        return {"skipped": self.skipped, "consecutive": self.consecutive, "last_reason": self.last_reason}

    def load_state_dict(self, d: dict) -> None:
        self.skipped, self.consecutive = int(d["skipped"]), int(d["consecutive"])
        self.last_reason = str(d.get("last_reason", ""))


class DivergenceMonitor:
    """``update(value)`` returns True (and sets ``diverged``) once ``value`` is non-finite or exceeds
    ``factor`` times the lowest value seen (in absolute value), after ``warmup`` values; ``report``
    says when and by how much."""

    def __init__(self, factor: float = 10.0, *, warmup: int = 10):
        if not (math.isfinite(factor) and factor > 1):
            raise ValueError(f"factor must be finite and > 1, got {factor!r}")
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1, got {warmup!r}")
        self.factor, self.warmup = float(factor), int(warmup)
        self.seen = 0
        self.best = math.inf
        self.diverged = False
        self.report = ""

    def update(self, value: float) -> bool:
        self.seen += 1
        v = abs(float(value))
        if self.seen > self.warmup and not self.diverged and (not math.isfinite(v) or v > self.factor * self.best):
            self.diverged = True
            self.report = (
                f"diverging: value {value:.4g} at observation {self.seen} is more than {self.factor:g}x "
                f"the best {self.best:.4g}"
            )
        if math.isfinite(v):
            self.best = min(self.best, v)
        return self.diverged
