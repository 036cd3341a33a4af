"""DisBack under torch.distributed (DDP through accelerate or torchrun; gloo on CPU, NCCL on GPU).

The roles follow the usual rule: the generator and the fake score are wrapped (DDP) or sharded;
the teacher and the trajectory are never wrapped (frozen, identical on every rank). What needs
care is only what DDP does not do by itself:

- :func:`allreduce_grads`: average the gradients of trainable parameters that no DDP wrapper
  owns (a method's GAN head, for instance);
- :func:`share_trajectory`: after Degradation Recording (whose degrading score is DDP-wrapped so
  its gradients are averaged, ``record_degradation(..., wrap=DDP)``), rank 0 writes the path, all
  ranks wait, then every rank loads it and checks that all ranks hold the same path (the
  manifest's sha256 and the teacher's fingerprint are gathered and compared);
- :func:`check_same_on_all_ranks`: a cheap identity check of modules across ranks (tests, debugging);
- :func:`full_state_to` / :func:`full_state_from`: copy an FSDP2-sharded module's full weights and
  optimizer state into a plain CPU copy of it and back, so that :mod:`disback_core.state` saves and
  restores sharded runs exactly (every rank holds the gathered copy; fine for UNet-size models; a
  sharded ``torch.distributed.checkpoint`` path for larger ones is not written yet).

Every function is a no-op pass-through when ``torch.distributed`` is not initialised.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable
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
    "share_trajectory",
    "check_same_on_all_ranks",
    "gather_strings",
    "full_state_to",
    "full_state_from",
    "any_rank",
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


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is True on any rank (one tiny all-reduce; e.g. to skip an
    update on all ranks together when one rank's loss is not finite)."""
    if not is_distributed():
        return flag
    nccl = torch.distributed.get_backend() == "nccl"  # NCCL reduces CUDA tensors only
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def allreduce_grads(params: Iterable[nn.Parameter]) -> None:
    """Average ``.grad`` over ranks for parameters outside any DDP wrapper (missing grads count as 0)."""
    if not is_distributed():
        return
    n = world_size()
    for p in params:
        if not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.SUM)
        p.grad.div_(n)


def share_trajectory(
    trajectory: Trajectory | None,
    folder: str | os.PathLike,
    teacher: nn.Module,
    *,
    merge: bool = True,
    call: Callable[..., Tensor] | None = None,
) -> Trajectory:
    """Rank 0 saves ``trajectory`` to ``folder``; after a barrier every rank loads it onto its own
    ``teacher`` (verified: hashes, fingerprint) and all ranks must agree on the manifest's sha256
    and on the teacher's fingerprint, else ``RuntimeError`` naming the ranks that differ. ``call``:
    the probe's call for a path recorded with an unnamed function (``"custom"``), as for
    :meth:`Trajectory.load`; a named convention must be registered on every rank."""
    folder = Path(folder)
    if rank() == 0:
        if trajectory is None:
            raise ValueError("rank 0 must pass the recorded trajectory")
        trajectory.save(folder)
    barrier()
    loaded = Trajectory.load(folder, teacher, merge=merge, call=call)
    mine = f"{sha256_file(folder / 'manifest.json')}|{tensors_fingerprint(teacher.state_dict())}"
    everyone = gather_strings(mine)
    differ = [r for r, s in enumerate(everyone) if s != everyone[0]]
    if differ:
        raise RuntimeError(
            f"ranks {differ} hold another trajectory or teacher than rank 0 "
            f"(manifest sha256 | teacher fingerprint): {everyone}"
        )
    return loaded


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
