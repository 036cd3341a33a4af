"""Interpolated targets: a real-valued position on the degradation path.

DisBack (Sec. 3.2) moves the target from node to node. With a position ``p`` in ``[0, N]``,
``k = floor(p)`` and ``w = p - k``, the target's weights are the linear interpolation

    W(p) = (1 - w) W_k + w W_{k+1}

of the two neighbouring nodes: for LoRA and SVD nodes ``W + scale ((1 - w) B_k A_k + w B_{k+1} A_{k+1})``
(a weighted merge of their deltas), for full nodes a lerp of the two states. An integer position is
the node itself, bit for bit. The weights are written into the same merged working copy
:meth:`Trajectory.target` uses (or into an attached module), so a forward costs the teacher's;
moving costs one write of the touched layers (two node writes and a lerp, in float32).

:class:`~disback_core.schedules.LinearPath` moves the position continuously; any schedule with a
``position(generator_steps, start)`` method does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from .trajectory import Trajectory

__all__ = ["check_position", "write_position", "target_at"]


def check_position(trajectory: Trajectory, position: float) -> float:
    """``position`` as a float in ``[0, N]``, or a ValueError naming it."""
    if isinstance(position, bool) or not isinstance(position, (int, float)):
        raise TypeError(f"position must be a number in [0, {trajectory.last}], got {type(position).__name__}")
    p = float(position)
    if not (math.isfinite(p) and 0.0 <= p <= trajectory.last):
        raise ValueError(f"position must be in [0, {trajectory.last}] (node 0 = teacher), got {position!r}")
    return p


def write_position(
    trajectory: Trajectory,
    tensors: Mapping[str, Tensor],
    position: float,
    base: Mapping[str, Tensor] | None = None,
    names: Sequence[str] | None = None,
) -> None:
    """Copy the weights at ``position`` into ``tensors`` in place (see the module docstring);
    ``base`` / ``names`` as in :meth:`Trajectory.write`. An integer position is ``Trajectory.write``."""
    p = check_position(trajectory, position)
    k = math.floor(p)
    w = p - k
    if w == 0.0:
        trajectory.write(tensors, k, base, names)
        return
    names = list(trajectory.layers() if names is None else names)
    lo = {n: torch.empty(tensors[n].shape, dtype=torch.float32, device=tensors[n].device) for n in names}
    hi = {n: torch.empty_like(t) for n, t in lo.items()}
    trajectory.write(lo, k, base, names)
    trajectory.write(hi, k + 1, base, names)
    with torch.no_grad():
        for n in names:
            tensors[n].copy_(lo[n].lerp_(hi[n], w))


def target_at(trajectory: Trajectory, position: float) -> nn.Module:
    """A frozen denoiser at ``position``: :meth:`Trajectory.target` for an integer position, else the
    trajectory's merged working copy holding the interpolated weights (shared as ``target`` is)."""
    p = check_position(trajectory, position)
    if p == math.floor(p):
        return trajectory.target(int(p))
    if trajectory.kind == "lora" and not trajectory.merge:
        raise ValueError(
            "interpolated targets need merged LoRA targets (Trajectory(merge=True), the default): "
            "unmerged factors cannot hold a weighted merge of two nodes"
        )
    work = trajectory._working_copy()
    if trajectory.active_node != p:
        write_position(trajectory, dict(work.state_dict(keep_vars=True)), p)
        trajectory.active_node = p
    return work
