"""DisBack under torch.distributed (DDP through accelerate or torchrun; gloo on CPU, NCCL on GPU).

The roles follow the usual rule: the generator and the fake score are wrapped (DDP) or sharded;
the teacher and the trajectory are never wrapped (frozen, identical on every rank). What needs
care is only what DDP does not do by itself:

- :func:`allreduce_grads`: average the gradients of trainable parameters that no DDP wrapper
  owns (a method's GAN head, for instance);
- :func:`share_trajectory`: after Degradation Recording (whose gradients are averaged over ranks:
  by :class:`~disback_core.recording.DegradationRecorder` itself, or by a DDP wrapper,
  ``record_degradation(..., wrap=DDP)``), rank 0 writes the path, all ranks wait, then every rank
  loads it and checks that all ranks hold the same path (the manifest's sha256 and the teacher's
  fingerprint are gathered and compared; a rank that passes its own recorded path also checks the
  loaded nodes against its own and its own probe outputs against them);
- :func:`check_same_trajectory`: every rank holds the same path (a digest of its nodes, steps and
  teacher); :func:`~disback_core.attach.attach` calls it, so a run never backtracks along
  different paths on different ranks;
- :func:`check_same_on_all_ranks`: a cheap identity check of modules across ranks (tests, debugging);
- :func:`full_state_to` / :func:`full_state_from`: copy an FSDP2-sharded module's full weights and
  optimizer state into a plain CPU copy of it and back, so that :mod:`disback_core.state` saves and
  restores sharded runs exactly (every rank holds the gathered copy; fine for UNet-size models; a
  sharded path for larger ones: :mod:`disback_core.sharded_state`).

Every function is a no-op pass-through when ``torch.distributed`` is not initialised.
"""

from __future__ import annotations

import hashlib
import json
import os
import weakref
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import cast

import torch
from torch import Tensor, nn

from .storage import sha256_file, tensors_fingerprint
from .trajectory import Trajectory

__all__ = [
    "is_distributed",
    "rank",
    "world_size",
    "barrier",
    "allreduce_grads",
    "broadcast_parameters",
    "share_trajectory",
    "check_same_trajectory",
    "trajectory_digest",
    "check_same_on_all_ranks",
    "gather_strings",
    "full_state_to",
    "full_state_from",
    "any_rank",
    "max_over_ranks",
]


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if is_distributed() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if is_distributed() else 1


def barrier() -> None:
    if is_distributed():
        torch.distributed.barrier()


def gather_strings(s: str) -> list[str]:
    """Every rank's ``s`` (all_gather_object: strings only, never loaded from files)."""
    if not is_distributed():
        return [s]
    out: list[str] = [""] * world_size()
    torch.distributed.all_gather_object(out, s)
    return out


def _comm_device() -> torch.device:
    """Where small control tensors live for a collective: the current CUDA device under NCCL (which
    reduces CUDA tensors only), else the CPU."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def max_over_ranks(values: Sequence[float], dtype: torch.dtype = torch.float64) -> list[float]:
    """The element-wise maximum of ``values`` over every rank (one tiny all-reduce); ``values`` itself
    without a process group. Negate an entry to get its minimum too (equal on every rank: max == -max(-v))."""
    if not is_distributed():
        return list(values)
    t = torch.tensor(list(values), dtype=dtype, device=_comm_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t.tolist()


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is True on any rank (one tiny all-reduce; e.g. to skip an
    update on all ranks together when one rank's loss is not finite)."""
    return max_over_ranks([1.0 if flag else 0.0])[0] > 0


_BUCKET_BYTES = 64 * 2**20  # gradients are all-reduced in flat buckets of at most this size


def allreduce_grads(params: Iterable[nn.Parameter], *, only_present: bool = False) -> None:
    """Average ``.grad`` over ranks for parameters outside any DDP wrapper (missing grads count as 0).

    Gradients are flattened into buckets (per device and dtype, at most 64 MiB each), so a LoRA
    slot of hundreds of small factors costs a few all-reduces, not hundreds. ``only_present``: a
    parameter whose ``.grad`` is None on every rank is left alone (one small all-reduce of a mask
    first); without it such a parameter gets a zero gradient, which an optimizer with momentum
    would still move. Collective: every rank passes the same parameters in the same order."""
    if not is_distributed():
        return
    n = world_size()
    params = [p for p in params if p.requires_grad]
    if only_present:
        mask = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=_comm_device())
        torch.distributed.all_reduce(mask, op=torch.distributed.ReduceOp.MAX)
        params = [p for p, m in zip(params, mask.tolist()) if m]
    buckets: dict[tuple[torch.device, torch.dtype], list[tuple[list[Tensor], int]]] = {}
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        g = p.grad
        if g.is_sparse:
            torch.distributed.all_reduce(g, op=torch.distributed.ReduceOp.SUM)
            g.div_(n)
            continue
        groups = buckets.setdefault((g.device, g.dtype), [([], 0)])
        grads, size = groups[-1]
        nbytes = g.numel() * g.element_size()
        if grads and size + nbytes > _BUCKET_BYTES:
            groups.append(([g], nbytes))
        else:
            grads.append(g)
            groups[-1] = (grads, size + nbytes)
    for groups in buckets.values():
        for grads, _ in groups:
            flat = torch.cat([g.reshape(-1) for g in grads])
            torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
            flat.div_(n)
            offset = 0
            for g in grads:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()


def broadcast_parameters(params: Iterable[Tensor], src: int = 0) -> None:
    """Overwrite ``params`` on every rank with rank ``src``'s values (as DDP does when it is built:
    e.g. a LoRA slot initialised from each rank's own RNG). Collective."""
    if not is_distributed():
        return
    with torch.no_grad():
        for p in params:
            torch.distributed.broadcast(p.data, src=src)


def _default_rtol(dtype: torch.dtype | None) -> float:
    """The relative tolerance of :func:`share_trajectory`'s checks for a path recorded in ``dtype``:
    room for the rounding of a LoRA node merged into the weights (``W + scale B A``) against the
    recorded unmerged slot, far below the difference between paths recorded from different data."""
    if dtype == torch.float16:
        return 2e-2
    if dtype == torch.bfloat16:
        return 1e-1
    return 1e-3


def _against_own(loaded: Trajectory, own: Trajectory, call: Callable[..., Tensor] | None, rtol: float | None) -> str:
    """Why ``loaded`` (rank 0's written path) is not this rank's recorded path ``own``; "" if it is:
    the same number of nodes at the same steps, each node's tensors within ``rtol`` (relative to
    their largest magnitude), and the loaded nodes reproduce this rank's own probe outputs (its
    own inputs) within ``rtol`` (relative to ``max(1, |output|)``)."""
    if len(own.nodes) != len(loaded.nodes) or own.steps != loaded.steps:
        return f"it recorded {len(own.nodes)} nodes at steps {own.steps}, rank 0 {len(loaded.nodes)} at {loaded.steps}"
    tol = _default_rtol(loaded.probe_dtype) if rtol is None else rtol
    for k, (mine, theirs) in enumerate(zip(own.nodes, loaded.nodes), start=1):
        if set(mine) != set(theirs):
            return f"its node {k} holds other tensors than rank 0's ({sorted(set(mine) ^ set(theirs))[:3]})"
        for name, t in mine.items():
            a, b = t.detach().float().cpu(), theirs[name].detach().float().cpu()
            if a.shape != b.shape:
                return f"its node {k} tensor {name!r} has shape {tuple(a.shape)}, rank 0's {tuple(b.shape)}"
            diff = float((a - b).abs().max()) if a.numel() else 0.0
            if not diff <= tol * float(a.abs().max().clamp_min(1e-12)):
                return (
                    f"its node {k} differs from rank 0's (tensor {name!r}, max difference {diff:.3g}): the "
                    "ranks recorded different paths; average the recording's gradients over ranks "
                    "(DegradationRecorder does it under torch.distributed unless average_grads=False; or "
                    "compute the loss with a DDP wrapper)"
                )
    if own.probe is None:
        return ""
    saved = loaded.probe
    try:
        loaded.probe = own.probe  # this rank's own inputs and recorded outputs
        errors = loaded.verify(call)
    finally:
        loaded.probe = saved
    for k, err in enumerate(errors):
        bound = tol * max(1.0, float(own.probe.outputs[k].abs().max()))
        if not err <= bound:
            return (
                f"the shared path's node {k} gives its own probe outputs only within {err:.3g} (tolerance {bound:.3g})"
            )
    return ""


def share_trajectory(
    trajectory: Trajectory | None,
    folder: str | os.PathLike,
    teacher: nn.Module,
    *,
    merge: bool = True,
    call: Callable[..., Tensor] | None = None,
    rtol: float | None = None,
) -> Trajectory:
    """Rank 0 saves ``trajectory`` to ``folder``; after a barrier every rank loads it onto its own
    ``teacher`` (verified: hashes, fingerprint) and all ranks must agree on the manifest's sha256
    and on the teacher's fingerprint, else ``RuntimeError`` naming the ranks that differ. ``call``:
    the probe's call for a path recorded with an unnamed function (``"custom"``), as for
    :meth:`Trajectory.load`; a named convention must be registered on every rank.

    Every rank may pass its own recorded ``trajectory`` (rank 0's is the one written; the others
    may pass None): a rank that does also checks that the loaded path is the one it recorded: the
    same nodes at the same steps (within ``rtol`` of their magnitude), and the loaded nodes
    reproduce its own probe outputs on its own probe inputs (:meth:`Trajectory.verify`; within
    ``rtol * max(1, |output|)``). ``rtol`` defaults to 1e-3 for a path recorded in float32 (2e-2
    in float16, 1e-1 in bfloat16): paths recorded with averaged gradients have bit-identical nodes,
    and the outputs differ only by rounding. Any failure on any rank (rank 0 cannot write, a rank cannot
    load, a check fails) is a ``RuntimeError`` on every rank naming the ranks and why (rank 0
    re-raises its own error when it could not write); no rank is left waiting."""
    folder = Path(folder)
    written: BaseException | None = None
    if rank() == 0:
        try:
            if trajectory is None:
                raise ValueError("rank 0 must pass the recorded trajectory")
            trajectory.save(folder)
        except Exception as e:  # reported to every rank below instead of leaving them at a barrier
            written = e
    status = gather_strings("" if written is None else f"{type(written).__name__}: {written}")  # the barrier
    if status[0]:
        if written is not None:
            raise written
        raise RuntimeError(f"rank 0 could not write the trajectory to {folder}: {status[0]}")
    loaded: Trajectory | None = None
    try:
        loaded = Trajectory.load(folder, teacher, merge=merge, call=call)
        why = _against_own(loaded, trajectory, call, rtol) if trajectory is not None else ""
        mine = {
            "id": f"{sha256_file(folder / 'manifest.json')}|{tensors_fingerprint(teacher.state_dict())}",
            "error": why,
        }
    except Exception as e:
        mine = {"id": "", "error": f"could not load it: {type(e).__name__}: {e}"}
    everyone = [json.loads(s) for s in gather_strings(json.dumps(mine))]
    failed = {r: d["error"] for r, d in enumerate(everyone) if d["error"]}
    if failed:
        lines = "; ".join(f"rank {r}: {why}" for r, why in failed.items())
        raise RuntimeError(f"the trajectory shared through {folder} is not the one every rank recorded: {lines}")
    ids = [d["id"] for d in everyone]
    differ = [r for r, s in enumerate(ids) if s != ids[0]]
    if differ:
        raise RuntimeError(
            f"ranks {differ} hold another trajectory or teacher than rank 0 "
            f"(manifest sha256 | teacher fingerprint): {ids}"
        )
    assert loaded is not None  # every rank loaded it, or an error was raised above
    return loaded


_DIGESTS: weakref.WeakKeyDictionary[Trajectory, tuple[tuple[tuple[int, int], ...], str]] = weakref.WeakKeyDictionary()


def trajectory_digest(trajectory: Trajectory) -> str:
    """sha256 of what a path is for training: its kind, LoRA spec, node steps, its teacher's
    fingerprint and every node's tensors (not the probe nor the meta, which may be per rank).
    Cached per trajectory until a node tensor is changed in place."""
    key = tuple((id(t), t._version) for node in trajectory.nodes for t in node.values())
    cached = _DIGESTS.get(trajectory)
    if cached is not None and cached[0] == key:
        return cached[1]
    h = hashlib.sha256()
    head = {
        "kind": trajectory.kind,
        "lora": trajectory.lora.to_json() if trajectory.lora is not None else None,
        "steps": trajectory.steps,
        "teacher": trajectory.base_fingerprint,
    }
    h.update(json.dumps(head, sort_keys=True).encode())
    for node in trajectory.nodes:
        h.update(tensors_fingerprint(node).encode())
    digest = h.hexdigest()
    _DIGESTS[trajectory] = (key, digest)
    return digest


def check_same_trajectory(trajectory: Trajectory, what: str = "this") -> None:
    """Under ``torch.distributed`` with more than one rank: every rank holds the same path
    (:func:`trajectory_digest`), else ``RuntimeError`` on every rank naming the ranks that differ
    from rank 0. Nothing without a process group. Collective."""
    if world_size() < 2:
        return
    everyone = gather_strings(trajectory_digest(trajectory))
    differ = [r for r, s in enumerate(everyone) if s != everyone[0]]
    if differ:
        raise RuntimeError(
            f"{what}: ranks {differ} hold another trajectory than rank 0 (nodes, steps or teacher differ; "
            f"digests {[s[:12] for s in everyone]}). Every rank must backtrack along one path: record it "
            "with gradients averaged over ranks (DegradationRecorder does it under torch.distributed) and "
            "share it (rec.save(folder), or disback_core.distributed.share_trajectory) before attaching"
        )


def check_same_on_all_ranks(*modules: nn.Module) -> bool:
    """True if every rank holds bit-identical parameters and buffers in ``modules``."""
    h = hashlib.sha256()
    for m in modules:
        h.update(tensors_fingerprint(m.state_dict()).encode())
    everyone = gather_strings(h.hexdigest())
    return all(s == everyone[0] for s in everyone)


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True)


def full_state_to(
    mirror: nn.Module,
    sharded: nn.Module,
    mirror_optimizer: torch.optim.Optimizer | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> None:
    """Copy the full weights (and optimizer state) of an FSDP2 ``sharded`` module into ``mirror``,
    a plain copy of the same architecture (and ``mirror_optimizer``, the same optimizer class over
    it). Collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    full = _full_options()
    # a module's state dict holds tensors only; torch types its values as any state-dict value
    state = cast("dict[str, Tensor]", get_model_state_dict(sharded, options=full))
    mirror.load_state_dict({k: v.detach().to("cpu") for k, v in state.items()}, strict=True)
    if optimizer is not None:
        if mirror_optimizer is None:
            raise ValueError("pass mirror_optimizer together with optimizer")
        osd = get_optimizer_state_dict(sharded, optimizer, options=full)
        set_optimizer_state_dict(mirror, mirror_optimizer, osd, options=full)


def full_state_from(
    mirror: nn.Module,
    sharded: nn.Module,
    mirror_optimizer: torch.optim.Optimizer | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> None:
    """The reverse of :func:`full_state_to`: shard ``mirror``'s weights (and optimizer state) back
    into ``sharded`` (and ``optimizer``). Collective."""
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    full = _full_options()
    set_model_state_dict(sharded, mirror.state_dict(), options=full)
    if optimizer is not None:
        if mirror_optimizer is None:
            raise ValueError("pass mirror_optimizer together with optimizer")
        osd = get_optimizer_state_dict(mirror, mirror_optimizer, options=full)
        set_optimizer_state_dict(sharded, optimizer, osd, options=full)
