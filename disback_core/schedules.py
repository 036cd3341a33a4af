"""Backtracking schedules: when the target moves one node toward the teacher.

Used by :class:`~disback_core.backtracking.Backtrack` (library loops) and
:class:`~disback_core.attach.Attachment` (the user's own module), through one :class:`NodeCursor`.

- :class:`FixedInterval`: the paper's rule (DisBack Sec. 3.2), a switch every ``every`` generator updates.
- :class:`AdaptiveGap`: a switch once the generator has caught up with the current target, judged
  by the score gap ``g = mean ||D_fake(x_t) - D_target(x_t)||^2`` (every adapter reports it as
  ``"score_gap"``; with an attachment, pass it to ``step(stat=...)``, e.g. from :func:`score_gap`).
  Right after a switch the gap jumps (the target moved away from the fake score, which tracks
  the generator). Its mean over the first ``warmup`` updates is the reference ``g_ref``; an
  exponential moving average ``g_ema`` (decay ``decay``) follows it; the target moves on when
  ``g_ema <= ratio * g_ref`` after at least ``min_steps`` updates, or at ``max_steps``.
- :class:`TeacherOnly`: never moves (ablations).
- :class:`LinearPath`: continuous motion: the target's position (:mod:`disback_core.interpolate`)
  falls linearly from the start node to the teacher over the first ``share`` of the run.
- :class:`Budgeted`: budget-aware adaptive: a rule (default :class:`AdaptiveGap`) may move the
  target early, but the k-th degraded target is left by ``k * share * total_steps / start``
  generator updates at the latest, so the teacher is the target from ``share * total_steps`` on,
  whatever the statistic does (it cannot stall).

A schedule either answers ``advance(steps_in_node, stat) -> bool`` (one node at a time) or gives
``position(cursor) -> float`` (a real position, monotone toward the teacher). A schedule with a
``bind(cursor)`` method is handed its :class:`NodeCursor` once, to read the run's progress.
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

__all__ = [
    "FixedInterval",
    "AdaptiveGap",
    "TeacherOnly",
    "LinearPath",
    "Budgeted",
    "NodeCursor",
    "score_gap",
    "check_schedule",
    "required_schedule",
]


def score_gap(target_x0: Tensor, fake_x0: Tensor) -> float:
    """``mean ||D_fake - D_target||^2`` per element, the statistic :class:`AdaptiveGap` reads, from the
    two denoiser outputs a user's own loss already computes."""
    return float(((fake_x0.detach().float() - target_x0.detach().float()) ** 2).mean())


def check_schedule(schedule: Any, name: str = "schedule") -> Any:
    """Refuse an object that is not a schedule, naming the argument."""
    moves = "position" if callable(getattr(schedule, "position", None)) else "advance"
    missing = [m for m in (moves, "reset", "state_dict", "load_state_dict") if not callable(getattr(schedule, m, None))]
    if missing:
        raise TypeError(
            f"{name} must be a schedule (FixedInterval, AdaptiveGap, Budgeted, LinearPath, TeacherOnly or "
            f"an object with advance (or position)/reset/state_dict/load_state_dict); "
            f"{type(schedule).__name__} lacks {missing}"
        )
    return schedule


def required_schedule(schedule: Any, start: int | None, who: str) -> Any:
    """The schedule an in-place attachment (``who``) runs: required unless ``start == 0`` (without one
    the target would hold node N-1 for the whole run); ``"manual"`` means none (the node moves only by
    ``set_node``) and is returned as ``None``."""
    if schedule is None and start != 0:
        raise ValueError(
            f"{who} needs a schedule, or the target stays on a degraded node for the whole run: pass "
            "FixedInterval.from_share(total_generator_updates, trajectory.last, share=0.1) (the measured "
            "default, docs/WHEN_DISBACK_HELPS.md), schedule='manual' to move it yourself with set_node(), "
            "or start=0 for the fake-score warm start alone"
        )
    if isinstance(schedule, str):
        if schedule != "manual":
            raise ValueError(f"schedule must be a schedule object or 'manual', got {schedule!r}")
        return None
    return schedule


def _check_budget(total_steps: int, share: float) -> tuple[int, float]:
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be an int >= 1 (the run's generator updates), got {total_steps!r}")
    if not 0 < share < 1:
        raise ValueError(f"share must be in (0, 1), got {share!r}")
    return total_steps, float(share)


class FixedInterval:
    """Move the target on every ``every`` generator updates (the paper's schedule)."""

    def __init__(self, every: int):
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.every = int(every)

    @classmethod
    def from_share(cls, total_steps: int, degraded_nodes: int, share: float) -> FixedInterval:
        """Spend ``share`` of ``total_steps`` generator updates on the ``degraded_nodes - 1`` degraded
        targets (nodes N-1..1), the rest on the teacher."""
        if not 0 < share < 1:
            raise ValueError(f"share must be in (0, 1), got {share}")
        return cls(max(1, round(share * total_steps / max(degraded_nodes - 1, 1))))

    def reset(self) -> None:
        pass

    def advance(self, steps_in_node: int, stat: float | None) -> bool:
        return steps_in_node >= self.every

    def state_dict(self) -> dict[str, Any]:
        return {"every": self.every}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.every = int(d["every"])


class AdaptiveGap:
    """Move the target on once the score gap at the current node fell to ``ratio`` of its value
    just after the switch (see the module docstring for the statistic)."""

    def __init__(
        self, ratio: float = 0.5, warmup: int = 10, decay: float = 0.9, min_steps: int = 20, max_steps: int = 1000
    ):
        if not 0 < ratio < 1:
            raise ValueError(f"ratio must be in (0, 1), got {ratio}")
        if not 0 <= decay < 1 or warmup < 1 or min_steps < warmup or max_steps < min_steps:
            raise ValueError("need 0 <= decay < 1, warmup >= 1 and warmup <= min_steps <= max_steps")
        self.ratio, self.warmup, self.decay = ratio, warmup, decay
        self.min_steps, self.max_steps = min_steps, max_steps
        self.reset()

    def reset(self) -> None:
        self._warm: list[float] = []
        self.g_ref: float | None = None
        self.g_ema: float | None = None

    def advance(self, steps_in_node: int, stat: float | None) -> bool:
        if stat is None:
            raise ValueError(
                "AdaptiveGap needs the score gap: Backtrack reads the method's 'score_gap' (this "
                "generator loss did not report it); an Attachment needs step(stat=...) "
                "(disback_core.score_gap(target_x0, fake_x0) computes it)"
            )
        if self.g_ref is None:
            self._warm.append(stat)
            if len(self._warm) >= self.warmup:
                self.g_ref = sum(self._warm) / len(self._warm)
                self.g_ema = self.g_ref
        else:
            if self.g_ema is None:
                raise RuntimeError("AdaptiveGap has a reference gap g_ref but no g_ema (inconsistent state_dict?)")
            self.g_ema = self.decay * self.g_ema + (1 - self.decay) * stat
        if steps_in_node >= self.max_steps:
            return True
        # g_ema is always set together with g_ref (above); the check narrows it for the type checker.
        return (
            steps_in_node >= self.min_steps
            and self.g_ref is not None
            and self.g_ema is not None
            and self.g_ema <= self.ratio * self.g_ref
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "ratio": self.ratio,
            "warmup": self.warmup,
            "decay": self.decay,
            "min_steps": self.min_steps,
            "max_steps": self.max_steps,
            "warm": list(self._warm),
            "g_ref": self.g_ref,
            "g_ema": self.g_ema,
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        type(self).__init__(self, d["ratio"], d["warmup"], d["decay"], d["min_steps"], d["max_steps"])
        self._warm, self.g_ref, self.g_ema = list(d["warm"]), d["g_ref"], d["g_ema"]


class TeacherOnly:
    """Ablation: never leave the start; use with ``start=0`` for the fake-score warm start alone."""

    def reset(self) -> None:
        pass

    def advance(self, steps_in_node: int, stat: float | None) -> bool:
        return False

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        pass


class LinearPath:
    """Continuous motion along the path (interpolated targets, :mod:`disback_core.interpolate`): the
    position falls linearly from the start node to 0 over the first ``share * total_steps`` generator
    updates, then stays on the teacher. The continuous twin of :meth:`FixedInterval.from_share`.

    ``every``: move the position every ``every`` updates only (each move writes the target's
    weights once; on a large model a few updates' spacing costs nothing in quality)."""

    def __init__(self, total_steps: int, share: float = 0.1, *, every: int = 1):
        self.total_steps, self.share = _check_budget(total_steps, share)
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an int >= 1, got {every!r}")
        self.every = every

    def position(self, cursor: NodeCursor) -> float:
        steps = cursor.generator_steps - cursor.generator_steps % self.every
        return max(0.0, cursor.start * (1.0 - steps / (self.share * self.total_steps)))

    def reset(self) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"total_steps": self.total_steps, "share": self.share, "every": self.every}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        type(self).__init__(self, d["total_steps"], d["share"], every=d["every"])


class Budgeted:
    """Budget-aware adaptive schedule: ``rule`` (default ``AdaptiveGap(ratio=0.5, warmup=3,
    min_steps=5)``, as benchmarked) may leave a node early, and a deadline leaves it late at the latest: the j-th
    degraded target (j = 1 at the start node) is left by generator update
    ``ceil(j * share * total_steps / start)``. The teacher is therefore the target from
    ``share * total_steps`` on whatever the statistic does: the schedule cannot stall."""

    def __init__(self, total_steps: int, share: float = 0.1, rule: Any = None):
        self.total_steps, self.share = _check_budget(total_steps, share)
        self.rule = (
            AdaptiveGap(ratio=0.5, warmup=3, min_steps=5, max_steps=max(5, total_steps))
            if rule is None
            else check_schedule(rule, "rule")
        )
        self._cursor: NodeCursor | None = None

    def bind(self, cursor: NodeCursor) -> None:
        self._cursor = cursor

    def _bound(self) -> NodeCursor:
        if self._cursor is None:
            raise RuntimeError("Budgeted is used through a NodeCursor (Backtrack or attach), which binds it")
        return self._cursor

    def deadline(self, node: int) -> int:
        """The generator update by which ``node`` (a degraded target, 1..start) is left."""
        start = max(self._bound().start, 1)
        return math.ceil((start - node + 1) * self.share * self.total_steps / start)

    def reset(self) -> None:
        self.rule.reset()

    def advance(self, steps_in_node: int, stat: float | None) -> bool:
        cursor = self._bound()
        if cursor.generator_steps >= self.deadline(cursor.node):
            return True
        return bool(self.rule.advance(steps_in_node, stat))

    def state_dict(self) -> dict[str, Any]:
        return {"total_steps": self.total_steps, "share": self.share, "rule": self.rule.state_dict()}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.total_steps, self.share = _check_budget(d["total_steps"], d["share"])
        self.rule.load_state_dict(d["rule"])


class NodeCursor:
    """Where backtracking stands: the current node (and position), the generator updates counted,
    the switches made.

    ``step(stat)`` counts one generator update and returns the new position on a move (the new
    node, an int, for a node-by-node schedule), else None. ``position`` is real-valued only under a
    schedule with ``position`` (:class:`LinearPath`); ``node`` is ``ceil(position)``, and a switch
    ``(generator step, node)`` is recorded whenever ``node`` changes.
    """

    def __init__(self, start: int, schedule: Any):
        self.schedule = check_schedule(schedule)
        self.start = int(start)
        self.node = int(start)
        self.position: float = float(start)
        self.generator_steps = 0
        self.steps_in_node = 0
        self.switches: list[tuple[int, int]] = [(0, self.node)]  # (generator step, new target node)
        self.stat: float | None = None
        if callable(getattr(self.schedule, "bind", None)):
            self.schedule.bind(self)
        self.schedule.reset()

    def step(self, stat: float | None = None) -> float | None:
        if stat is not None:
            self.stat = float(stat)
        self.generator_steps += 1
        self.steps_in_node += 1
        if self.position == 0:
            return None
        if callable(getattr(self.schedule, "position", None)):
            p = min(self.position, max(0.0, float(self.schedule.position(self))))
            if p == self.position:
                return None
            self.position = p
            if math.ceil(p) != self.node:
                self._switched(math.ceil(p))
            return p
        if not self.schedule.advance(self.steps_in_node, self.stat):
            return None
        self.moved(self.node - 1)
        return self.node

    def _switched(self, node: int) -> None:
        self.node = int(node)
        self.steps_in_node = 0
        self.schedule.reset()
        self.switches.append((self.generator_steps, self.node))

    def moved(self, node: int) -> None:
        """Record a switch to ``node`` (by the schedule or set by hand)."""
        self.position = float(node)
        self._switched(node)

    def state_dict(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "position": self.position,
            "start": self.start,
            "generator_steps": self.generator_steps,
            "steps_in_node": self.steps_in_node,
            "switches": [list(s) for s in self.switches],
            "schedule": self.schedule.state_dict(),
            "stat": self.stat,
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.node = int(d["node"])
        self.position = float(d.get("position", self.node))
        if math.ceil(self.position) != self.node:
            raise ValueError(f"cursor state: position {self.position} does not lie on node {self.node}'s interval")
        self.start = int(d.get("start", self.start))
        self.generator_steps = int(d["generator_steps"])
        self.steps_in_node = int(d["steps_in_node"])
        self.switches = [(int(a), int(b)) for a, b in d["switches"]]
        self.schedule.load_state_dict(d["schedule"])
        self.stat = d.get("stat")
