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
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

__all__ = ["FixedInterval", "AdaptiveGap", "TeacherOnly", "NodeCursor", "score_gap", "check_schedule"]


def score_gap(target_x0: Tensor, fake_x0: Tensor) -> float:
    """``mean ||D_fake - D_target||^2`` per element, the statistic :class:`AdaptiveGap` reads, from the
    two denoiser outputs a user's own loss already computes."""
    return float(((fake_x0.detach().float() - target_x0.detach().float()) ** 2).mean())


def check_schedule(schedule: Any, name: str = "schedule") -> Any:
    """Refuse an object that is not a schedule, naming the argument."""
    missing = [
        m for m in ("advance", "reset", "state_dict", "load_state_dict") if not callable(getattr(schedule, m, None))
    ]
    if missing:
        raise TypeError(
            f"{name} must be a schedule (FixedInterval, AdaptiveGap, TeacherOnly or an object with "
            f"advance/reset/state_dict/load_state_dict); {type(schedule).__name__} lacks {missing}"
        )
    return schedule


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


class NodeCursor:
    """Where backtracking stands: the current node, the generator updates counted, the switches made.

    ``step(stat)`` counts one generator update and returns the new node on a switch (else None).
    """

    def __init__(self, start: int, schedule: Any):
        self.schedule = check_schedule(schedule)
        self.node = int(start)
        self.generator_steps = 0
        self.steps_in_node = 0
        self.switches: list[tuple[int, int]] = [(0, self.node)]  # (generator step, new target node)
        self.stat: float | None = None
        self.schedule.reset()

    def step(self, stat: float | None = None) -> int | None:
        if stat is not None:
            self.stat = float(stat)
        self.generator_steps += 1
        self.steps_in_node += 1
        if self.node == 0 or not self.schedule.advance(self.steps_in_node, self.stat):
            return None
        self.moved(self.node - 1)
        return self.node

    def moved(self, node: int) -> None:
        """Record a switch to ``node`` (by the schedule or set by hand)."""
        self.node = int(node)
        self.steps_in_node = 0
        self.schedule.reset()
        self.switches.append((self.generator_steps, self.node))

    def state_dict(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "generator_steps": self.generator_steps,
            "steps_in_node": self.steps_in_node,
            "switches": [list(s) for s in self.switches],
            "schedule": self.schedule.state_dict(),
            "stat": self.stat,
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.node = int(d["node"])
        self.generator_steps = int(d["generator_steps"])
        self.steps_in_node = int(d["steps_in_node"])
        self.switches = [(int(a), int(b)) for a, b in d["switches"]]
        self.schedule.load_state_dict(d["schedule"])
        self.stat = d.get("stat")
