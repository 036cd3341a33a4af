"""DisBack in a loop you did not write: switch the user's own teacher module along the path, in place.

A DMD2-style guidance module calls its frozen ``real_unet`` directly; an EDM fork calls
``net(x, sigma, class_labels)``; a diffusers script calls ``unet(x, t, encoder_hidden_states)``.
None of them takes a target argument, so :func:`attach` changes the module they already call:

    att = attach(guidance.real_unet, trajectory, FixedInterval(500), fake=guidance.fake_unet)
    ...                                   # the user's loop, unchanged
    att.step()                            # after each generator update

- node k's weights are written into the module's own tensors with ``copy_`` (registration,
  device, dtype, DDP wrapping and the user's checkpoints stay intact; fp16/bf16 weights get
  ``W + delta`` summed in fp32 and cast once);
- the attachment keeps its own copy of the original weights of the layers it touches (on CPU by
  default), so node 0 is restored bit-exactly and never aliased with a degraded node;
- ``fake=`` loads node N into the user's existing fake score in place (their optimizer keeps
  working);
- ``requires_grad`` and train/eval mode of the user's modules are never changed nor relied on;
- :meth:`Attachment.detach` restores the module exactly;
- under ``torch.distributed`` with more than one rank, every rank must attach the same path (nodes,
  steps and teacher: :func:`~disback_core.distributed.check_same_trajectory`), else every rank
  refuses, naming the ranks that differ.
"""

from __future__ import annotations

import copy
import warnings
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .distributed import check_same_trajectory
from .interpolate import write_position
from .schedules import NodeCursor, TeacherOnly, required_schedule
from .storage import lowest_float_dtype, tensors_fingerprint
from .trajectory import _INTERNAL_COPY, Trajectory, _max_error, _state, node_references, probe_error, probe_output

__all__ = ["attach", "Attachment"]

_LIVE: weakref.WeakSet[Attachment] = weakref.WeakSet()
_WRAPPERS = ("DistributedDataParallel", "DataParallel")


def _unwrap(module: nn.Module) -> nn.Module:
    while type(module).__name__ in _WRAPPERS:
        inner = getattr(module, "module", None)
        if not isinstance(inner, nn.Module):
            break
        module = inner
    return module


def _prefix(module: nn.Module, trajectory: Trajectory) -> str:
    """Where ``module`` sits in the trajectory's teacher: "" for the teacher itself (or a module of
    the same structure), ``"model."`` for the UNet inside a ``DiffusersDenoiser``, and so on."""
    teacher = trajectory.teacher
    for name, sub in teacher.named_modules():
        if sub is module:
            return f"{name}." if name else ""
    shapes = {k: v.shape for k, v in module.state_dict().items()}
    for name, sub in teacher.named_modules():
        if {k: v.shape for k, v in sub.state_dict().items()} == shapes:
            return f"{name}." if name else ""
    first = trajectory.layers()[0]
    raise ValueError(
        f"module ({type(module).__name__}) does not have the structure of the trajectory's teacher "
        f"({type(teacher).__name__}) or of any of its submodules: e.g. the trajectory sets {first!r}; "
        "pass the module the trajectory was recorded on, or prefix="
    )


class Attachment:
    """An in-place attachment of a trajectory to the user's module; made by :func:`attach`.

    Attributes: ``module``, ``trajectory``, ``node`` (the node the module holds now),
    ``switches`` (``(generator step, node)`` pairs), ``cursor`` (schedule state).
    """

    def __init__(
        self,
        module: nn.Module,
        trajectory: Trajectory,
        schedule: Any = None,
        *,
        fake: nn.Module | None = None,
        start: int | None = None,
        prefix: str | None = None,
        call: Callable[..., Tensor] | None = None,
        check_weights: bool = True,
        originals_device: str | torch.device = "cpu",
    ):
        if call is not None and not callable(call):
            raise TypeError(f"call must be a function fn(module, x, sigma, cond), got {call!r}")
        if not isinstance(trajectory, Trajectory):
            raise TypeError(f"trajectory must be a Trajectory, got {type(trajectory).__name__}")
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be the nn.Module your loop calls as the teacher, got {type(module).__name__}")
        schedule = required_schedule(schedule, start, "attach")
        check_same_trajectory(trajectory, "attach")  # collective under torch.distributed, before any change
        module = _unwrap(module)
        self.module, self.trajectory, self.call = module, trajectory, call
        self.prefix = _prefix(module, trajectory) if prefix is None else prefix
        live = _state(module)
        self._dst: dict[str, Tensor] = {}
        for name in trajectory.layers():
            local = name[len(self.prefix) :] if name.startswith(self.prefix) else None
            if local is None or local not in live:
                raise ValueError(
                    f"module ({type(module).__name__}) has no tensor {local or name!r} that the "
                    f"trajectory sets (as {name!r}); it does not fit this trajectory"
                )
            t = live[local]
            if not t.is_floating_point():
                raise TypeError(f"module tensor {local!r} has dtype {t.dtype}: a node's weights cannot be cast to it")
            self._dst[name] = t
        base = trajectory.base_tensors()
        for name, t in self._dst.items():
            if t.shape != base[name].shape:
                raise ValueError(
                    f"module tensor {name[len(self.prefix) :]!r} has shape {tuple(t.shape)}, "
                    f"the trajectory's teacher has {tuple(base[name].shape)}"
                )
        ids = {id(t) for t in self._dst.values()}
        for other in list(_LIVE):
            if ids & {id(t) for t in other._dst.values()}:
                raise RuntimeError(
                    f"{type(module).__name__} is already attached to a trajectory (at node "
                    f"{other.node}); call detach() on that attachment first"
                )
        if check_weights:
            self._check_weights(live, base)
        self.originals = {n: t.detach().to(originals_device, copy=True) for n, t in self._dst.items()}
        teacher_ids = {id(t) for t in _state(trajectory.teacher).values()}
        self._aliased = [n for n, t in self._dst.items() if id(t) in teacher_ids]
        trajectory._base_override.update({n: self.originals[n] for n in self._aliased})
        trajectory.active_node = -1  # a working copy made from the teacher must be rebuilt from originals
        start = max(trajectory.last - 1, 0) if start is None else start
        trajectory._check_index(start)
        self.cursor = NodeCursor(start, TeacherOnly() if schedule is None else schedule)
        self._attached = True
        _LIVE.add(self)
        self._write(start)
        # A copy of the module taken now (e.g. the user's generator initialised from the teacher after
        # attach) would start from a degraded node, not the teacher: warn on deepcopy while attached.
        object.__setattr__(module, "__deepcopy__", self._copy_warning)
        if fake is not None:
            self.load_fake(fake)

    def _check_weights(self, live: Mapping[str, Tensor], base: Mapping[str, Tensor]) -> None:
        """The trajectory's teacher must be unchanged since recording/loading (or only cast to another
        dtype: :meth:`Trajectory.check_base`), and ``module`` must hold the same weights, compared in
        the less precise of the two dtypes (a bf16 copy of an fp32 teacher fits, and so does an fp32
        module beside a bf16 teacher cast from it, DMD2's SD layout)."""
        traj = self.trajectory
        traj.check_base()
        if all(id(live[n[len(self.prefix) :]]) == id(base[n]) for n in self._dst):
            return  # the module is (part of) the trajectory's teacher
        mine = {self.prefix + k: v for k, v in live.items()}
        theirs = {k: base[k] for k in mine if k in base}
        dtype = lowest_float_dtype({f"{i}": t for i, t in enumerate([*mine.values(), *theirs.values()])})
        if set(mine) != set(theirs) or tensors_fingerprint(mine, dtype) != tensors_fingerprint(theirs, dtype):
            a, b = lowest_float_dtype(mine), lowest_float_dtype(theirs)
            dtypes = (
                f" Their dtypes differ (module {_name(a)}, the trajectory's teacher {_name(b)}), but they differ "
                f"even compared in {_name(dtype)}, so it is not a cast of the same weights: attach a copy of the "
                "teacher the path was recorded on (in any dtype)"
                if a != b and set(mine) == set(theirs)
                else ""
            )
            raise ValueError(
                f"module ({type(self.module).__name__}) does not hold the weights of the trajectory's "
                "teacher (fingerprint): its weights changed since recording, or it is another model." + dtypes
            )

    # ------------------------------------------------------------------ moving along the path

    @property
    def node(self) -> int:
        return self.cursor.node

    @property
    def switches(self) -> list[tuple[int, int]]:
        return self.cursor.switches

    @property
    def position(self) -> float:
        """The module's real-valued position on the path (= ``node`` unless the schedule interpolates)."""
        return self.cursor.position

    def _write(self, position: float) -> None:
        if not self._attached:
            raise RuntimeError("this attachment was detached; attach again to move the module along the path")
        write_position(self.trajectory, self._dst, position, self.originals)

    def step(self, stat: float | None = None) -> bool:
        """Count one generator update (call it after each); move the module one node toward the
        teacher when the schedule says so. ``stat``: the score gap for :class:`AdaptiveGap`
        (e.g. ``disback_core.score_gap(pred_real, pred_fake)`` from your own loss). True on a switch."""
        position = self.cursor.step(stat)
        if position is None:
            return False
        self._write(position)
        return True

    def set_node(self, k: int) -> None:
        """Put node ``k`` into the module now (0 = the teacher, restored bit-exactly)."""
        self.trajectory._check_index(k)
        self._write(k)
        self.cursor.moved(k)

    def load_fake(self, fake: nn.Module) -> None:
        """Load node N into ``fake`` (a copy of the teacher: the user's fake score) in place.

        A fake score in a finer dtype than the trajectory's teacher whose weights are the teacher's
        (equal when cast to the teacher's dtype: an fp32 ``fake_unet`` beside a bf16 ``real_unet``,
        DMD2's SD layout) keeps its own weights under the node (``W_fp32 + scale * B @ A``, as the
        recording module held node N) instead of the teacher's rounded ones."""
        fake = _unwrap(fake)
        own = {self.prefix + k: v for k, v in _state(fake).items()}
        base = self.trajectory.base_tensors()
        finer = _finer_copy(own, base)
        self.trajectory.load_into(fake, self.trajectory.last, prefix=self.prefix, base=finer)

    def verify(self, node: int | None = None) -> float:
        """Max abs difference between the module's output on the trajectory's probe now and node
        ``node``'s (default: the node it holds). The probe is run by ``call`` if given to :func:`attach`,
        else by the trajectory's call convention (``trajectory.call_name``, saved with it); a module
        inside the trajectory's teacher (the UNet of a ``DiffusersDenoiser``, the transformer of a
        ``FlowMatchDenoiser``) runs through that teacher, in whose units the probe was recorded.

        In the recorded precision (``trajectory.probe_dtype``) node k's output is the recorded one. A
        module in another precision (a bf16 copy of a path recorded in fp32) is compared with node k's
        weights written in its own dtypes into a private copy of it and run on the probe
        (:func:`~disback_core.trajectory.node_references`): bf16 rounding moves the outputs more than
        the nodes differ, so only its own precision tells its node from the others."""
        traj = self.trajectory
        if traj.probe is None:
            raise ValueError("the trajectory has no probe to verify against")
        k = self.node if node is None else node
        traj._check_index(k)
        # A module inside the trajectory's teacher is probed through that teacher, with the
        # trajectory's convention: the probe was recorded on the teacher.
        inside = any(m is self.module for m in traj.teacher.modules())
        if inside:
            probed, prefix, fn = traj.teacher, "", self.call or traj.probe_runner()
        elif self.call is None and self.prefix:
            raise ValueError(
                f"the probe was recorded on the trajectory's teacher ({type(traj.teacher).__name__}) in its "
                f"units; this module ({type(self.module).__name__}) is a copy of its submodule "
                f"{self.prefix[:-1]!r}, which cannot run it: attach the teacher's own submodule, or pass "
                "attach(..., call=fn) that runs this module on the probe"
            )
        else:
            probed, prefix, fn = self.module, self.prefix, traj.probe_runner(self.call)
        if traj.probe_dtype is None or lowest_float_dtype(_state(probed)) == traj.probe_dtype:
            return probe_error(probed, traj.probe, k, fn)
        ref = node_references(traj, probed, [k], fn, prefix=prefix, base=self.originals)[k]
        return _max_error(probe_output(probed, traj.probe, fn), ref)

    def _copy_warning(self, memo: dict[int, Any]) -> nn.Module:
        """``copy.deepcopy`` of the attached module: warn when it holds a degraded node, then copy."""
        if self.node != 0 and not _INTERNAL_COPY.get():
            warnings.warn(
                f"copying {type(self.module).__name__} while DisBack holds node {self.node} in it (a degraded "
                "teacher, not the teacher): a generator or fake score made from this copy starts from that "
                "node. Copy the teacher before attach(...), or take the teacher's weights from "
                "att.original_state_dict()",
                stacklevel=3,
            )
        hook = self.module.__dict__.pop("__deepcopy__", None)
        try:
            return copy.deepcopy(self.module, memo)
        finally:
            if hook is not None:
                object.__setattr__(self.module, "__deepcopy__", hook)

    def original_state_dict(self) -> dict[str, Tensor]:
        """The module's state dict with the teacher's original weights in the tensors DisBack switches
        (copies; the module itself keeps its current node): initialise a generator from this."""
        out = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
        for name, t in self.originals.items():
            out[name[len(self.prefix) :]] = t.to(out[name[len(self.prefix) :]].device).clone()
        return out

    def detach(self) -> None:
        """Restore the module's original weights exactly and release it (a second call does nothing)."""
        if not self._attached:
            return
        self.trajectory.write(self._dst, 0, self.originals)
        for n in self._aliased:
            self.trajectory._base_override.pop(n, None)
        self.trajectory.active_node = -1
        self._attached = False
        self.module.__dict__.pop("__deepcopy__", None)
        _LIVE.discard(self)

    def __enter__(self) -> Attachment:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    # ------------------------------------------------------------------ checkpoint

    def state_dict(self) -> dict[str, Any]:
        return self.cursor.state_dict()

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        self.trajectory._check_index(int(d["node"]))
        self.cursor.load_state_dict(dict(d))
        self._write(self.cursor.position)


def _finer_copy(own: Mapping[str, Tensor], base: Mapping[str, Tensor]) -> Mapping[str, Tensor] | None:
    """``own`` if it holds ``base``'s tensors in a finer floating dtype (equal once cast to base's), else None."""
    mine, theirs = lowest_float_dtype(own), lowest_float_dtype(base)
    if mine is None or theirs is None or set(own) != set(base):
        return None
    if torch.finfo(mine).eps >= torch.finfo(theirs).eps:
        return None
    return own if tensors_fingerprint(own, theirs) == tensors_fingerprint(base, theirs) else None


def _name(dtype: torch.dtype | None) -> str:
    return str(dtype).removeprefix("torch.")


def attach(
    module: nn.Module,
    trajectory: Trajectory,
    schedule: Any = None,  # required unless start=0: see the docstring
    *,
    fake: nn.Module | None = None,
    start: int | None = None,
    prefix: str | None = None,
    call: Callable[..., Tensor] | None = None,
    check_weights: bool = True,
    originals_device: str | torch.device = "cpu",
) -> Attachment:
    """Attach ``trajectory`` to ``module`` (the teacher your loop calls) in place, at node ``start``.

    Args:
        module: the user's teacher module (or the UNet inside the trajectory's teacher wrapper; a
            DDP wrapper is looked through). Its weights must be the trajectory's teacher's.
        trajectory: the recorded path; its nodes are computed from this attachment's copy of the
            module's original weights.
        schedule: :class:`~disback_core.schedules.FixedInterval` (the measured default:
            ``FixedInterval.from_share(total_generator_updates, trajectory.last, share=0.1)``),
            :class:`~disback_core.schedules.AdaptiveGap` (feed it with ``step(stat=...)``), ... or
            ``"manual"`` (the node moves only by :meth:`Attachment.set_node`). Required unless
            ``start=0``: without one the module would hold node N-1 for the whole run.
        fake: the user's fake score (a copy of the teacher); node N is loaded into it in place.
        start: the first node (default N-1, as in DisBack; 0 = the teacher).
        prefix: the module's name inside the trajectory's teacher (found automatically).
        call: how to run the module on the probe for :meth:`Attachment.verify` (default: the
            trajectory's call convention, ``trajectory.call_name``).
        check_weights: refuse a module whose weights are not the trajectory's teacher's.
        originals_device: where the copy of the original weights is kept (CPU by default).

    Under ``torch.distributed`` (a process group of more than one rank) this is collective: every
    rank calls it, and it refuses on every rank (``RuntimeError`` naming the ranks that differ from
    rank 0) unless all ranks hold the same path (:func:`~disback_core.distributed.trajectory_digest`:
    nodes, steps, LoRA spec and teacher; not the probe). Without a process group nothing changes.
    """
    return Attachment(
        module,
        trajectory,
        schedule,
        fake=fake,
        start=start,
        prefix=prefix,
        call=call,
        check_weights=check_weights,
        originals_device=originals_device,
    )
