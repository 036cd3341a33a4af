"""Distribution Backtracking (DisBack, Zhang et al. 2025, Sec. 3.2): train the generator against
the recorded degradation path in reverse.

:class:`Backtrack` wraps any :class:`~disback_core.protocol.ScoreDistiller` and is one itself. It
changes exactly one thing: the target. The fake score starts from the most degraded node N
(:meth:`Backtrack.initial_fake`); the target starts at node N-1 and moves one node toward the
teacher whenever the schedule says so; the last target is the teacher, kept to the end.

Schedules (both checkpointable with ``state_dict``):

- :class:`FixedInterval`: the paper's rule, a switch every ``every`` generator updates.
- :class:`AdaptiveGap`: a switch once the generator has caught up with the current target, judged
  by the score gap ``g = mean ||D_fake(x_t) - D_target(x_t)||^2`` that every adapter reports
  (``"score_gap"``). Right after a switch the gap jumps (the target moved away from the fake
  score, which tracks the generator). Its mean over the first ``warmup`` updates is the reference
  ``g_ref``; an exponential moving average ``g_ema`` (decay ``decay``) follows it; the target moves
  on when ``g_ema <= ratio * g_ref`` after at least ``min_steps`` updates, or at ``max_steps``.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

from torch import Tensor, nn

from .protocol import LossDict, ScoreDistiller
from .trajectory import Trajectory, TrajectoryTarget

__all__ = ["Backtrack", "FixedInterval", "AdaptiveGap", "TeacherOnly"]


class FixedInterval:
    """Move the target on every ``every`` generator updates (the paper's schedule)."""

    def __init__(self, every: int):
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.every = int(every)

    @classmethod
    def from_share(cls, total_steps: int, degraded_nodes: int, share: float) -> "FixedInterval":
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

    def __init__(self, ratio: float = 0.5, warmup: int = 10, decay: float = 0.9,
                 min_steps: int = 20, max_steps: int = 1000):
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
            raise ValueError("AdaptiveGap needs the method's 'score_gap' statistic; the generator loss did not report it")
        if self.g_ref is None:
            self._warm.append(stat)
            if len(self._warm) >= self.warmup:
                self.g_ref = sum(self._warm) / len(self._warm)
                self.g_ema = self.g_ref
        else:
            self.g_ema = self.decay * self.g_ema + (1 - self.decay) * stat
        if steps_in_node >= self.max_steps:
            return True
        return (steps_in_node >= self.min_steps and self.g_ref is not None
                and self.g_ema <= self.ratio * self.g_ref)

    def state_dict(self) -> dict[str, Any]:
        return {"ratio": self.ratio, "warmup": self.warmup, "decay": self.decay, "min_steps": self.min_steps,
                "max_steps": self.max_steps, "warm": list(self._warm), "g_ref": self.g_ref, "g_ema": self.g_ema}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.__init__(d["ratio"], d["warmup"], d["decay"], d["min_steps"], d["max_steps"])
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


class Backtrack:
    """Distribution Backtracking around ``method``; implements ``ScoreDistiller``.

    Use ``backtrack.target`` as the target, ``backtrack.initial_fake()`` as the fake score, and call
    :meth:`on_generator_step` once per generator update (``train_step`` / ``generator_step`` do).

    Args:
        method: the base method (DiffInstruct, DMD2, SiD, ...).
        trajectory: the recorded path (node 0 = teacher).
        schedule: :class:`FixedInterval`, :class:`AdaptiveGap` or any object with ``advance``,
            ``reset``, ``state_dict`` and ``load_state_dict``.
        guidance: wraps the switchable target, e.g. ``lambda t: CFGDenoiser(t, 1.75, null)``, so
            every node (and the teacher) is guided as the teacher would be.
        start: the first target node (default N-1; ``0`` gives the fake-score warm start alone).
    """

    def __init__(self, method: ScoreDistiller, trajectory: Trajectory, schedule: Any, *,
                 guidance: Callable[[nn.Module], nn.Module] | None = None, start: int | None = None,
                 stat_key: str = "score_gap"):
        self.method = method
        self.trajectory = trajectory
        self.schedule = schedule
        self.stat_key = stat_key
        start = max(trajectory.last - 1, 0) if start is None else start
        self.switchable = TrajectoryTarget(trajectory, start)
        self.target = guidance(self.switchable) if guidance is not None else self.switchable
        self.generator_steps = 0
        self.steps_in_node = 0
        self.switches: list[tuple[int, int]] = [(0, start)]  # (generator step, new target node)
        self._stat: float | None = None
        self.schedule.reset()

    @property
    def critic_steps(self) -> int:
        return self.method.critic_steps

    @property
    def node(self) -> int:
        """The current target node (0 = teacher)."""
        return self.switchable.index

    def initial_fake(self) -> nn.Module:
        """A trainable copy of the most degraded node N: the fake score's starting point."""
        return self.trajectory.materialize(self.trajectory.last, trainable=True)

    # ---------------------------------------------------------------- ScoreDistiller
    def generator_loss(self, x: Tensor, target: Any, fake: Any, cond: Any = None) -> LossDict:
        if target is not None and target is not self.target:
            raise ValueError("Backtrack supplies the target itself: pass backtrack.target (or None) as target, "
                             "not the teacher; otherwise the trajectory would be silently ignored")
        out = self.method.generator_loss(x, self.target, fake, cond)
        if self.stat_key in out:
            self._stat = float(out[self.stat_key].detach())
        return out

    def fake_score_loss(self, x: Tensor, fake: Any, cond: Any = None, real: Tensor | None = None,
                        real_cond: Any = None) -> LossDict:
        return self.method.fake_score_loss(x, fake, cond, real=real, real_cond=real_cond)

    def dsm_loss(self, x: Tensor, fake: Any, cond: Any = None) -> Tensor:
        return self.method.dsm_loss(x, fake, cond)

    def critic_parameters(self) -> Iterable[nn.Parameter]:
        return self.method.critic_parameters()

    def on_generator_step(self) -> bool:
        """Count one generator update and move the target if the schedule says so; True on a switch."""
        self.generator_steps += 1
        self.steps_in_node += 1
        self.method.on_generator_step()
        if self.node == 0 or not self.schedule.advance(self.steps_in_node, self._stat):
            return False
        self.switchable.set_index(self.node - 1)
        self.steps_in_node = 0
        self.schedule.reset()
        self.switches.append((self.generator_steps, self.node))
        return True

    # ---------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {"node": self.node, "generator_steps": self.generator_steps, "steps_in_node": self.steps_in_node,
                "switches": [list(s) for s in self.switches], "schedule": self.schedule.state_dict(),
                "stat": self._stat}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.switchable.set_index(int(d["node"]))
        self.generator_steps = int(d["generator_steps"])
        self.steps_in_node = int(d["steps_in_node"])
        self.switches = [tuple(s) for s in d["switches"]]
        self.schedule.load_state_dict(d["schedule"])
        self._stat = d.get("stat")
