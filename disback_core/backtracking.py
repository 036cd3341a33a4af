"""Distribution Backtracking (DisBack, Zhang et al. 2025, Sec. 3.2): train the generator against
the recorded degradation path in reverse.

:class:`Backtrack` wraps any :class:`~disback_core.protocol.ScoreDistiller` and is one itself. It
changes exactly one thing: the target. The fake score starts from the most degraded node N
(:meth:`Backtrack.initial_fake`); the target starts at node N-1 and moves one node toward the
teacher whenever the schedule (:mod:`disback_core.schedules`) says so; the last target is the
teacher, kept to the end. For a loop whose losses call its own teacher module directly, use
:func:`disback_core.attach.attach` instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor, nn

from .denoisers import check_denoiser
from .protocol import LossDict, ScoreDistiller
from .schedules import AdaptiveGap, Budgeted, FixedInterval, LinearPath, NodeCursor, TeacherOnly
from .trajectory import Trajectory, TrajectoryTarget

__all__ = ["Backtrack", "FixedInterval", "AdaptiveGap", "Budgeted", "LinearPath", "TeacherOnly"]

_METHOD = ("generator_loss", "fake_score_loss", "dsm_loss", "critic_parameters", "on_generator_step")


class Backtrack:
    """Distribution Backtracking around ``method``; implements ``ScoreDistiller``.

    Use ``backtrack.target`` as the target, ``backtrack.initial_fake()`` as the fake score, and call
    :meth:`on_generator_step` once per generator update (``train_step`` / ``generator_step`` do).

    Args:
        method: the base method (DiffInstruct, DMD2, SiD, ...).
        trajectory: the recorded path (node 0 = teacher).
        schedule: :class:`FixedInterval`, :class:`AdaptiveGap`, :class:`Budgeted`, :class:`LinearPath`
            (interpolated targets) or any object with ``advance`` (or ``position``), ``reset``,
            ``state_dict`` and ``load_state_dict`` (:mod:`disback_core.schedules`).
        guidance: wraps the switchable target, e.g. ``lambda t: CFGDenoiser(t, 1.75, null)``, so
            every node (and the teacher) is guided as the teacher would be.
        start: the first target node (default N-1; ``0`` gives the fake-score warm start alone).
    """

    def __init__(
        self,
        method: ScoreDistiller,
        trajectory: Trajectory,
        schedule: Any,
        *,
        guidance: Callable[[nn.Module], nn.Module] | None = None,
        start: int | None = None,
        stat_key: str = "score_gap",
    ):
        missing = [m for m in _METHOD if not callable(getattr(method, m, None))]
        if missing:
            raise TypeError(
                f"method must be a ScoreDistiller (DMD2, DiffInstruct, SiD, ...); {type(method).__name__} "
                f"lacks {missing}. For a loop with its own loss code use disback_core.attach(...)"
            )
        if not isinstance(trajectory, Trajectory):
            raise TypeError(f"trajectory must be a Trajectory, got {type(trajectory).__name__}")
        check_denoiser(trajectory.teacher, "trajectory.teacher")
        self.method = method
        self.trajectory = trajectory
        self.stat_key = stat_key
        start = max(trajectory.last - 1, 0) if start is None else start
        self.switchable = TrajectoryTarget(trajectory, start)
        self.target = guidance(self.switchable) if guidance is not None else self.switchable
        self.cursor = NodeCursor(start, schedule)

    @property
    def schedule(self) -> Any:
        return self.cursor.schedule

    @property
    def switches(self) -> list[tuple[int, int]]:
        return self.cursor.switches

    @property
    def generator_steps(self) -> int:
        return self.cursor.generator_steps

    @property
    def steps_in_node(self) -> int:
        return self.cursor.steps_in_node

    @property
    def critic_steps(self) -> int:
        return self.method.critic_steps

    @property
    def node(self) -> int:
        """The current target node (0 = teacher; ``ceil(position)`` between nodes)."""
        return self.switchable.index

    @property
    def position(self) -> float:
        """The target's real-valued position on the path (= ``node`` unless the schedule interpolates)."""
        return self.switchable.position

    def initial_fake(self, into: nn.Module | None = None) -> nn.Module:
        """The fake score's starting point, node N: a new trainable copy, or, with ``into`` (the fake
        score your optimizer already holds), node N loaded into it in place."""
        if into is not None:
            self.trajectory.load_into(into, self.trajectory.last)
            return into
        return self.trajectory.materialize(self.trajectory.last, trainable=True)

    # ---------------------------------------------------------------- ScoreDistiller
    def generator_loss(self, x: Tensor, target: Any, fake: Any, cond: Any = None) -> LossDict:
        if target is not None and target is not self.target:
            raise ValueError(
                "Backtrack supplies the target itself: pass backtrack.target (or None) as target, "
                "not the teacher; otherwise the trajectory would be silently ignored"
            )
        out = self.method.generator_loss(x, self.target, fake, cond)
        if self.stat_key in out:
            self.cursor.stat = float(out[self.stat_key].detach())
        return out

    def fake_score_loss(
        self, x: Tensor, fake: Any, cond: Any = None, real: Tensor | None = None, real_cond: Any = None
    ) -> LossDict:
        return self.method.fake_score_loss(x, fake, cond, real=real, real_cond=real_cond)

    def dsm_loss(self, x: Tensor, fake: Any, cond: Any = None) -> Tensor:
        return self.method.dsm_loss(x, fake, cond)

    def critic_parameters(self) -> Iterable[nn.Parameter]:
        return self.method.critic_parameters()

    def on_generator_step(self) -> bool:
        """Count one generator update and move the target if the schedule says so; True on a switch."""
        self.method.on_generator_step()
        position = self.cursor.step()
        if position is None:
            return False
        self.switchable.set_position(position)
        return True

    # ---------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        return self.cursor.state_dict()

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.trajectory._check_index(int(d["node"]))
        self.cursor.load_state_dict(d)
        self.switchable.set_position(self.cursor.position)
