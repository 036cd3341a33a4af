"""The degradation path: ordered score models from the teacher (node 0) to the most degraded node.

Nodes ``1..N`` are LoRA factors on the frozen teacher (``kind="lora"``, see :mod:`disback_core.lora`),
or full state dicts (``kind="full"``). The teacher's weights are held once: a node's weights are
computed from the teacher's (``W + scale * B @ A``, fp32, cast once) and written with ``copy_``
into a module of the teacher's structure: a private working copy (:meth:`Trajectory.target`),
a standalone copy (:meth:`Trajectory.materialize`), or the user's own module
(:func:`disback_core.attach.attach`).

On disk a trajectory is one folder (:mod:`disback_core.trajectory_files` holds the format):
``manifest.json`` and one content-named safetensors file per node (and the probe). A save writes
new files beside the old ones, then replaces ``manifest.json`` atomically (the switch), then
removes files no manifest names any more: a crash at any point leaves the previous complete save
or the new one, and the same trajectory gives the same bytes. Loading checks every field, file,
hash, header, key, shape and dtype and raises :class:`~disback_core.storage.StorageError` naming
the file and the first problem.

The probe is run by a *call convention* stored by name in the manifest (``"call"``), so that a path
recorded on a raw model with its own call signature verifies after a load:

- ``"denoiser"`` (the default): ``D(x, sigma, cond)``, the library's denoisers;
- ``"diffusers-unet"``: ``m(x, t, encoder_hidden_states=c)`` (``UNet2DConditionModel``) or
  ``m(x, t, class_labels=c)`` (``UNet2DModel``), a dict ``c`` as keywords, ``.sample`` taken;
- ``"flow-transformer"``: ``m(hidden_states=x, timestep=t, **c)`` for diffusers' SD3, FLUX, SANA
  and Wan transformers (a tensor ``c`` is ``encoder_hidden_states``), the first output taken;
- any name given with :func:`register_call`; ``"custom"``: a function that was never named, which
  :meth:`Trajectory.verify` then needs again (``verify(call=fn)`` or ``Trajectory.load(..., call=fn)``).
"""

from __future__ import annotations

import contextvars
import copy
import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .denoisers import freeze, map_cond
from .interpolate import check_position, target_at
from .lora import LoraSpec, check_node, inject_lora, load_lora_state, lora_template, node_layers, write_node_weight_
from .storage import (
    StorageError,
    atomic_write_bytes,
    fsync_dir,
    lowest_float_dtype,
    remove_files,
    tensors_fingerprint,
)
from .trajectory_files import (
    FINGERPRINT_DTYPES,
    FORMAT,
    KINDS,
    MANIFEST,
    VERSION,
    Probe,
    _check_call_savable,
    _check_fingerprint,
    _check_savable,
    _dtype_name,
    _load_node,
    _load_probe,
    _manifest_bytes,
    _node_max_bytes,
    _node_template,
    _write_node,
    _write_probe,
    manifest_digest,
    read_manifest,
    stale_files,
)

__all__ = [
    "Trajectory",
    "TrajectoryTarget",
    "Probe",
    "FORMAT",
    "VERSION",
    "DEFAULT_CALL",
    "CUSTOM_CALL",
    "call_module",
    "call_diffusers_unet",
    "call_flow_transformer",
    "register_call",
    "probe_call",
    "call_conventions",
    "resolve_call",
    "manifest_digest",
    "probe_error",
    "node_references",
]

DEFAULT_CALL = "denoiser"
CUSTOM_CALL = "custom"


def _first_output(out: Any) -> Tensor:
    if isinstance(out, (tuple, list)):
        out = out[0]
    return getattr(out, "sample", out)


def call_module(module: Callable[..., Any], x: Tensor, sigma: Any, cond: Any = None) -> Tensor:
    """``module(x, sigma, cond)`` (``module(x, sigma)`` when ``cond`` is None), unwrapping a diffusers
    output (``.sample``) or a tuple's first element: the default way a probe is run (``"denoiser"``)."""
    return _first_output(module(x, sigma) if cond is None else module(x, sigma, cond))


def call_diffusers_unet(module: Callable[..., Any], x: Tensor, t: Any, cond: Any = None) -> Tensor:
    """A raw diffusers UNet in its own units (``"diffusers-unet"``): ``module(x, t, **kw).sample``
    with a tensor ``cond`` as ``encoder_hidden_states`` (a model whose config has
    ``cross_attention_dim``, e.g. ``UNet2DConditionModel``) or ``class_labels`` (``UNet2DModel``),
    and a dict ``cond`` as the keywords themselves (SDXL's ``added_cond_kwargs``)."""
    if isinstance(cond, Mapping):
        kwargs = dict(cond)
    elif cond is None:
        kwargs = {}
    else:
        text = hasattr(getattr(module, "config", None), "cross_attention_dim")
        kwargs = {"encoder_hidden_states" if text else "class_labels": cond}
    return _first_output(module(x, t, **kwargs))


def call_flow_transformer(module: Callable[..., Any], x: Tensor, t: Any, cond: Any = None) -> Tensor:
    """A raw diffusers flow transformer in its own units (``"flow-transformer"``: SD3, FLUX, SANA, Wan):
    ``module(hidden_states=x, timestep=t, return_dict=False, **kw)[0]`` with a dict ``cond`` as the
    keywords (SD3/FLUX: ``encoder_hidden_states``, ``pooled_projections``; FLUX: packed tokens ``x``
    and its ``img_ids``/``txt_ids`` stored with a batch dimension, ``[B, N, 3]``, as a probe's
    condition must be, and passed as ``ids[0]``) and a tensor ``cond`` as ``encoder_hidden_states``.
    ``t`` is the model's own timestep (``1000 t_flow`` for SD3/SANA/Wan, ``t_flow`` for FLUX)."""
    from .flow import flow_arch

    arch = flow_arch(module) if isinstance(module, nn.Module) else None
    if isinstance(cond, Mapping):
        kwargs = dict(cond)
        if arch is not None and arch.name == "flux":
            for key in ("img_ids", "txt_ids"):
                ids = kwargs.get(key)
                if isinstance(ids, Tensor) and ids.ndim == 3:
                    kwargs[key] = ids[0]  # batch-independent positions (diffusers takes [N, 3])
    elif cond is None:
        kwargs = {}
    else:
        kwargs = {arch.tensor_cond if arch is not None else "encoder_hidden_states": cond}
    return _first_output(module(hidden_states=x, timestep=t, return_dict=False, **kwargs))


_CALLS: dict[str, Callable[..., Tensor]] = {
    DEFAULT_CALL: call_module,
    "diffusers-unet": call_diffusers_unet,
    "flow-transformer": call_flow_transformer,
}
_BUILTIN_CALLS = frozenset(_CALLS)
CALL_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")  # what a manifest's "call" may hold


def _check_call_name(name: Any) -> str:
    if not isinstance(name, str) or not CALL_NAME.fullmatch(name):
        raise ValueError(
            f"a call convention name must be 1-64 characters of a-z, 0-9, '_', '.', '-' (starting with a "
            f"letter or digit), got {name!r}"
        )
    return name


def register_call(name: str, fn: Callable[..., Tensor], *, replace: bool = False) -> None:
    """Register ``fn(module, x, sigma, cond) -> output`` as the call convention ``name``: a trajectory
    recorded with it stores ``name`` in its manifest, and ``Trajectory.load`` finds ``fn`` again by that
    name (register it in the loading process too). The built-in names and ``"custom"`` cannot be
    replaced; another function under a registered name needs ``replace=True``."""
    _check_call_name(name)
    if not callable(fn):
        raise TypeError(
            f"call convention {name!r} must be a function fn(module, x, sigma, cond), got {type(fn).__name__}"
        )
    if name == CUSTOM_CALL or name in _BUILTIN_CALLS:
        if _CALLS.get(name) is fn:
            return
        raise ValueError(f"{name!r} is a built-in call convention name and cannot be replaced; pick another name")
    if name in _CALLS and _CALLS[name] is not fn and not replace:
        raise ValueError(
            f"call convention {name!r} is already registered to another function ({_CALLS[name]!r}); "
            "pick another name or pass replace=True"
        )
    _CALLS[name] = fn


def call_conventions() -> dict[str, Callable[..., Tensor]]:
    """The registered call conventions by name (a copy)."""
    return dict(_CALLS)


def probe_call(name: str) -> Callable[..., Tensor]:
    """The function registered as call convention ``name``; an unknown name is a ``ValueError``
    naming it, the known ones and how to register it."""
    fn = _CALLS.get(name) if isinstance(name, str) else None
    if fn is None:
        how = (
            "it was recorded with a function that was never named: pass it again as call=fn"
            if name == CUSTOM_CALL
            else f"register it first with disback_core.trajectory.register_call({name!r}, fn), or pass call=fn"
        )
        raise ValueError(f"unknown call convention {name!r} (known: {sorted(_CALLS)}); {how}")
    return fn


def resolve_call(call: str | Callable[..., Tensor] | None = None, call_name: str | None = None) -> tuple[str, Any]:
    """``(name, function)`` of a probe call given as a registered name or a function.

    A function registered under a name gets that name; another function gets ``call_name`` (which is
    then registered to it in this process; a name that holds another function is refused), or
    ``"custom"`` when no name is given. ``call=None`` is ``call_name`` (default ``"denoiser"``);
    ``(None, "custom")`` gives ``("custom", None)``: a convention whose function is not known here.
    """
    if call is None:
        name = DEFAULT_CALL if call_name is None else _check_call_name(call_name)
        return (name, None) if name == CUSTOM_CALL else (name, probe_call(name))
    if isinstance(call, str):
        if call_name is not None and call_name != call:
            raise ValueError(f"call={call!r} names a convention; call_name={call_name!r} would rename it")
        if call == CUSTOM_CALL:
            raise ValueError("'custom' is not a registered convention: pass the function itself as call=fn")
        return _check_call_name(call), probe_call(call)
    if not callable(call):
        raise TypeError(f"call must be a convention name or a function fn(module, x, sigma, cond), got {call!r}")
    if call_name is None:
        return next((n for n, f in _CALLS.items() if f is call), CUSTOM_CALL), call
    name = _check_call_name(call_name)
    if name != CUSTOM_CALL:
        register_call(name, call)
    return name, call


def _state(module: nn.Module) -> dict[str, Tensor]:
    """Live parameters and persistent buffers under their state-dict names (no copies)."""
    return dict(module.state_dict(keep_vars=True))


def _as_node(n: Any, k: int) -> dict[str, Tensor]:
    if isinstance(n, nn.Module):
        return {key: v.detach().to("cpu").clone() for key, v in n.state_dict().items()}
    if not isinstance(n, Mapping):
        raise TypeError(f"node {k} must be a state dict or an nn.Module, got {type(n).__name__}")
    return dict(n)


# Set while the library deep-copies a teacher that may hold an attached node (the copy is then
# overwritten with a node's weights): an attachment's copy warning stays quiet for these.
_INTERNAL_COPY = contextvars.ContextVar("disback_internal_copy", default=False)


def _deepcopy_quietly(module: Any, memo: dict[int, Any] | None = None) -> Any:
    token = _INTERNAL_COPY.set(True)
    try:
        return copy.deepcopy(module, memo)
    finally:
        _INTERNAL_COPY.reset(token)


class Trajectory:
    """Node 0 is ``teacher``; ``nodes[k-1]`` holds node ``k`` (a LoRA node or a full state dict).

    Args:
        teacher: the base model (a denoiser ``D(x_t, sigma, cond)``); never modified, and its
            ``requires_grad``/train flags are left as they are.
        nodes: node states in path order, teacher side first; with ``kind="full"`` also modules
            (a list of degraded copies of the teacher).
        kind: ``"lora"`` or ``"full"``.
        lora: the LoRA spec of ``kind="lora"`` nodes.
        steps: the degradation step at which each node was taken.
        merge: ``target(k)`` writes node k's weights into a plain working copy (forward costs the
            teacher's); ``False`` keeps the LoRA factors unmerged (exactly the recorded slot).
        probe: inputs and recorded outputs for :meth:`verify`.
        call / call_name: how the probe runs a module (see :func:`resolve_call`): a registered
            convention's name (default ``"denoiser"``: ``module(x, sigma, cond)``) or a function;
            the name is saved in the manifest (attributes ``call_name`` and ``call_fn``).
        base_fingerprint: the teacher's fingerprint if already known (``load`` passes the verified one).
        base_fingerprints: its fingerprints cast to float32/bfloat16/float16 (:attr:`base_fingerprints`),
            if already known (``load`` passes the manifest's verified ones); else computed here.

    Precision: :attr:`probe_dtype` is the dtype the probe outputs were computed in (the teacher's
    lowest floating dtype when recorded: the recorder runs each node in the teacher's precision). A
    module verified in another dtype (a bf16 copy of an fp32 path, or the teacher cast after
    recording) is compared with node k's weights written in its own dtype and run on the probe
    (:func:`node_references`): the recorded outputs differ from any bf16 run by its rounding, more
    than the nodes differ from each other. The teacher may be cast to another floating dtype after
    recording: :meth:`check_base` accepts it when its weights are the recorded ones cast.

    Every node is checked against the teacher here: a key, shape or dtype that does not fit is an
    error naming the node and the key.
    """

    def __init__(
        self,
        teacher: nn.Module,
        nodes: Sequence[Mapping[str, Tensor] | nn.Module],
        *,
        kind: str = "lora",
        lora: LoraSpec | None = None,
        steps: Sequence[int] | None = None,
        merge: bool = True,
        probe: Probe | None = None,
        meta: Mapping[str, Any] | None = None,
        base_fingerprint: str | None = None,
        call: str | Callable[..., Tensor] | None = None,
        call_name: str | None = None,
        base_fingerprints: Mapping[str, str] | None = None,
    ):
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be an nn.Module, got {type(teacher).__name__}")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if kind == "lora" and lora is None:
            raise ValueError("kind='lora' needs the LoRA spec (lora=)")
        if isinstance(nodes, (Mapping, nn.Module)) or not nodes:
            raise ValueError("a trajectory needs at least one degraded node (a list of states or modules)")
        steps = list(steps) if steps is not None else list(range(1, len(nodes) + 1))
        if len(steps) != len(nodes):
            raise ValueError(f"steps has {len(steps)} entries for {len(nodes)} nodes")
        self.teacher = teacher
        self.kind = kind
        self.nodes = [_as_node(n, k) for k, n in enumerate(nodes, start=1)]
        if kind == "lora" and any(isinstance(n, nn.Module) for n in nodes):
            raise ValueError("module nodes are full copies: pass kind='full'")
        self.lora = lora.resolved(teacher) if lora is not None and kind == "lora" else None
        self.steps = [int(s) for s in steps]
        self.merge = merge
        self.probe = probe
        self.meta = dict(meta or {})
        self.call_name, self.call_fn = resolve_call(call, call_name)
        self._template = self._node_template()
        for k in range(1, len(self.nodes) + 1):
            self._check_node(k)
        state = teacher.state_dict()
        self.base_fingerprint = base_fingerprint or tensors_fingerprint(state)
        # The recorded base in every dtype it may be cast to later (a bf16 real_unet in DMD2's SD layout):
        # kept now, since the weights they describe are gone once the teacher is cast in place.
        self.base_dtype: torch.dtype | None = lowest_float_dtype(state)
        self.base_fingerprints: dict[str, str] = (
            dict(base_fingerprints)
            if base_fingerprints is not None
            else _cast_fingerprints(state, self.base_fingerprint)
        )
        self.probe_dtype: torch.dtype | None = self.base_dtype  # the precision the probe outputs were computed in
        self._base_override: dict[str, Tensor] = {}  # originals kept by an attachment of the teacher itself
        self._work: nn.Module | None = None
        self.active_node: float = -1  # which node (or interpolate.py position) the working copy holds; -1: none

    # ------------------------------------------------------------------ nodes

    @property
    def last(self) -> int:
        """Index of the most degraded node (N)."""
        return len(self.nodes)

    def __len__(self) -> int:
        """Number of nodes including the teacher (N + 1)."""
        return len(self.nodes) + 1

    def _check_index(self, k: int) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= self.last:
            raise IndexError(f"node index {k!r} out of range 0..{self.last}")

    def _lora_spec(self) -> LoraSpec:
        """The LoRA spec of a ``kind="lora"`` trajectory (``__init__`` sets it for that kind)."""
        if self.lora is None:
            raise RuntimeError("this LoRA trajectory has no LoRA spec (Trajectory.lora is None)")
        return self.lora

    def _node_template(self) -> dict[str, tuple[int, ...]]:
        if self.kind == "lora":
            return lora_template(self.teacher, self._lora_spec())
        return {k: tuple(v.shape) for k, v in self.teacher.state_dict().items()}

    def _check_node(self, k: int) -> None:
        state = self.nodes[k - 1]
        if self.kind == "lora":
            check_node(state, self._template, f"node {k}")
            return
        missing = sorted(set(self._template) - set(state))
        unexpected = sorted(set(state) - set(self._template))
        if missing or unexpected:
            raise ValueError(f"node {k} does not fit the teacher: missing {missing[:3]}, unexpected {unexpected[:3]}")
        for key, shape in self._template.items():
            if tuple(state[key].shape) != shape:
                raise ValueError(
                    f"node {k} does not fit the teacher: {key} has shape {tuple(state[key].shape)}, expected {shape}"
                )

    def layers(self) -> list[str]:
        """The state-dict names a node sets (LoRA: ``<layer>.weight`` of each target; full: all)."""
        if self.kind == "lora":
            return [f"{name}.weight" for name in node_layers(self.nodes[0])]
        return sorted(self._template)

    def base_tensors(self) -> dict[str, Tensor]:
        """The teacher's tensors (node 0): live, except those an in-place attachment of the teacher
        itself currently overwrites, which come from the attachment's copy of the originals."""
        base = _state(self.teacher)
        base.update(self._base_override)
        return base

    def check_base(self) -> None:
        """Refuse a teacher whose weights changed since recording or loading (a node would be applied
        to the wrong weights). A teacher cast to another floating dtype since then (float32, bfloat16
        or float16) is accepted when its weights equal the recorded ones cast to that dtype; otherwise
        the error names both dtypes and what to do."""
        base = self.base_tensors()
        if tensors_fingerprint(base) == self.base_fingerprint:
            return
        now = lowest_float_dtype(base)
        if now == self.base_dtype or now is None or self.base_dtype is None:
            raise ValueError(
                "the trajectory's teacher changed since the trajectory was recorded or loaded "
                "(fingerprint); a node would be applied to the wrong weights"
            )
        cast = self.base_fingerprints.get(_dtype_name(now))
        if cast is not None and cast == tensors_fingerprint(base, now):
            return  # only cast: node k is W + delta on the cast weights
        was, new = _dtype_name(self.base_dtype), _dtype_name(now)
        if cast is None:
            raise ValueError(
                f"the trajectory's teacher was cast from {was} (as recorded) to {new}, a dtype whose fingerprint "
                f"the trajectory does not keep (only {sorted(self.base_fingerprints)}): cast the teacher back "
                f"to {was}, or to one of those"
            )
        raise ValueError(
            f"the trajectory's teacher changed since the trajectory was recorded or loaded: its weights are "
            f"{new} now, {was} when recorded, and they differ from the recorded weights even cast to {new} "
            "(fingerprint), so it is not only a cast: a node would be applied to the wrong weights. Attach "
            f"to the teacher the path was recorded on (any cast of it), or load the saved path with "
            "Trajectory.load(folder, teacher)"
        )

    def write(
        self,
        tensors: Mapping[str, Tensor],
        k: int,
        base: Mapping[str, Tensor] | None = None,
        names: Sequence[str] | None = None,
    ) -> None:
        """Copy node ``k`` into ``tensors`` (a module's live tensors by state-dict name) in place.

        ``names``: which tensors (default :meth:`layers`); ``base``: the teacher's values (default
        :meth:`base_tensors`). A LoRA node's weight is ``W + scale * B @ A`` from the base value
        in ``dst``'s dtype (fp32 sum, cast once). Parameters keep their identity, ``requires_grad``
        and device.
        """
        self._check_index(k)
        base = self.base_tensors() if base is None else base
        state = self.nodes[k - 1] if k else None
        with torch.no_grad():
            for name in self.layers() if names is None else names:
                dst = tensors[name]
                b = base[name].to(dst.device, dst.dtype)
                if state is None:
                    dst.copy_(b)
                elif self.kind == "lora":
                    write_node_weight_(dst, b, state, name[: -len(".weight")], self._lora_spec().scale)
                else:
                    dst.copy_(state[name])

    # ------------------------------------------------------------------ targets

    def _working_copy(self) -> nn.Module:
        if self._work is None:
            unmerged = self.kind == "lora" and not self.merge
            touched = set(self.layers())
            # Merged: untouched tensors are shared with the teacher (held once), touched ones are
            # private. Unmerged: a whole private copy (peft freezes every tensor of a model it wraps).
            memo = {} if unmerged else {id(t): t for n, t in _state(self.teacher).items() if n not in touched}
            work = _deepcopy_quietly(self.teacher, memo)
            state = _state(work)
            self.write(state, 0)
            for n in state if unmerged else touched:  # shared tensors keep the teacher's flags
                state[n].requires_grad_(False)
            if unmerged:
                inject_lora(work, self._lora_spec())
                work.requires_grad_(False)
            self._work = work.eval()
        return self._work

    def target(self, k: int) -> nn.Module:
        """A frozen denoiser for node ``k``. ``target(0)`` is the teacher itself (or, while the
        teacher module is attached in place and holds another node, the working copy at node 0).

        Nodes share one working copy, reconfigured by each call: a module returned for node ``k``
        follows the next call for another node (use :class:`TrajectoryTarget` or
        :meth:`materialize` to hold a node).
        """
        self._check_index(k)
        if k == 0 and not self._base_override:
            return self.teacher
        work = self._working_copy()
        if self.active_node != k:
            if self.kind == "lora" and not self.merge:
                if k == 0:
                    raise RuntimeError("unmerged targets need the teacher for node 0; detach its attachment first")
                load_lora_state(work, self.nodes[k - 1], source=f"node {k}")
            else:
                self.write(_state(work), k)
            self.active_node = k
        return work

    def materialize(self, k: int, trainable: bool = False) -> nn.Module:
        """A standalone copy of the teacher with node ``k``'s weights (no LoRA wrappers).

        ``trainable=True`` gives a module to train (DisBack's fake score starts from node N).
        """
        self._check_index(k)
        m = _deepcopy_quietly(self.teacher)
        self.write(_state(m), k)
        if trainable:
            m.requires_grad_(True)
            m.train()
        else:
            freeze(m)
        return m

    def load_into(self, module: nn.Module, k: int, prefix: str = "", base: Mapping[str, Tensor] | None = None) -> None:
        """Make ``module`` (a copy of the teacher, e.g. the user's fake score) equal node ``k`` in place:
        node tensors from node k, every other tensor from the teacher (``base``: the teacher's tensors
        to use, default :meth:`base_tensors`; may be the module's own). Its parameters keep their
        identity (an optimizer holding them keeps working), ``requires_grad`` and train mode."""
        self._check_index(k)
        dst = {prefix + n: t for n, t in _state(module).items()}
        base = self.base_tensors() if base is None else base
        missing = sorted(set(base) - set(dst))
        unexpected = sorted(set(dst) - set(base))
        if missing or unexpected:
            raise ValueError(
                f"{type(module).__name__} does not have the teacher's structure: missing "
                f"{missing[:3]}, unexpected {unexpected[:3]}"
            )
        for n in base:
            if dst[n].shape != base[n].shape:
                raise ValueError(
                    f"{type(module).__name__}: {n} has shape {tuple(dst[n].shape)}, "
                    f"the teacher's is {tuple(base[n].shape)}"
                )
        touched = set(self.layers())
        with torch.no_grad():
            for n in base:
                if n not in touched:
                    dst[n].copy_(base[n])
        self.write(dst, k, base)

    def nbytes(self) -> int:
        """Bytes of the stored node tensors (the teacher not included)."""
        return sum(t.numel() * t.element_size() for n in self.nodes for t in n.values())

    def probe_runner(self, call: Callable[..., Tensor] | None = None) -> Callable[..., Tensor]:
        """The function that runs a module on the probe: ``call``, else the trajectory's convention
        (:attr:`call_fn`); a ``"custom"`` trajectory loaded without its function is refused."""
        fn = call if call is not None else self.call_fn
        if fn is None:
            raise ValueError(
                f"this trajectory's probe was recorded with a {self.call_name!r} call (a function that was "
                "never named), which is not known here: pass it again, verify(call=fn) or "
                "Trajectory.load(..., call=fn) (or record with call_name= / a registered convention)"
            )
        if not callable(fn):
            raise TypeError(f"call must be a function fn(module, x, sigma, cond), got {fn!r}")
        return fn

    def verify(self, call: Callable[..., Tensor] | None = None) -> list[float]:
        """Max abs difference between each node's outputs now and as recorded on the probe
        (``inf`` where an output is not finite, so a NaN node never passes a tolerance check).
        ``call`` runs a module on the probe (default: the trajectory's convention, :attr:`call_name`)."""
        if self.probe is None:
            raise ValueError("this trajectory has no probe to verify against")
        fn = self.probe_runner(call)
        now = lowest_float_dtype(self.base_tensors())
        if self.probe_dtype is None or now == self.probe_dtype:
            return [probe_error(self.target(k), self.probe, k, fn) for k in range(len(self))]
        # The teacher was cast after recording: the recorded outputs hold the other precision's rounding,
        # so each target is compared with its node's weights written, in the teacher's dtype, into a copy.
        refs = node_references(self, self.teacher, range(len(self)), fn)
        return [_max_error(probe_output(self.target(k), self.probe, fn), refs[k]) for k in range(len(self))]

    # ------------------------------------------------------------------ persistence

    def save(self, path: str | os.PathLike) -> Path:
        """Write the folder so that the previous complete save survives any crash.

        Node and probe files are named by their content and written atomically (an existing file
        with the same name and bytes is reused); then ``manifest.json`` is replaced atomically,
        which switches to the new save; only then are files no longer referenced removed, with
        temporary files left by earlier crashes. The same trajectory gives the same bytes.
        """
        _check_savable(self.steps, self.meta)  # refused before anything is written
        _check_call_savable(self.call_name, self.probe)
        folder = Path(path)
        created = not folder.exists()
        folder.mkdir(parents=True, exist_ok=True)
        if created:
            fsync_dir(folder.parent)
        nodes = [
            _write_node(folder, k, state, step) for k, (state, step) in enumerate(zip(self.nodes, self.steps), start=1)
        ]
        probe = _write_probe(folder, self.probe) if self.probe is not None else None
        manifest = _manifest_bytes(self._manifest_body(nodes, probe))
        fsync_dir(folder)  # every file the new manifest names is durable before the switch
        atomic_write_bytes(folder / MANIFEST, manifest)  # the switch
        keep = {MANIFEST} | {e["file"] for e in nodes} | ({probe["file"]} if probe else set())
        remove_files(folder, stale_files(folder, keep))
        return folder

    def _manifest_body(self, nodes: list[dict[str, Any]], probe: dict[str, str] | None) -> dict[str, Any]:
        """The manifest (without its digest) for node entries ``nodes`` and probe entry ``probe``."""
        from . import __version__

        base = self.base_tensors()
        body: dict[str, Any] = {
            "format": FORMAT,
            # the lowest version that holds it: version 2 (no "call" field) is the "denoiser" convention
            "version": 2 if self.call_name == DEFAULT_CALL else VERSION,
            "library": f"disback {__version__}",
            "kind": self.kind,
            "base_fingerprint": self.base_fingerprint,
            "base_fingerprints": {
                name: self.base_fingerprints.get(name) or tensors_fingerprint(base, d)
                for name, d in ((_dtype_name(d), d) for d in FINGERPRINT_DTYPES)
            },
            "lora": self.lora.to_json() if self.lora else None,
            "node_count": len(nodes),
            "nodes": nodes,
            "probe": probe,
            "meta": self.meta,
        }
        if self.call_name != DEFAULT_CALL:
            body["call"] = self.call_name
        return json.loads(json.dumps(body, allow_nan=True))  # plain JSON types: the digest of what a reader parses

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        teacher: nn.Module,
        merge: bool = True,
        check_fingerprint: bool = True,
        *,
        call: Callable[..., Tensor] | None = None,
    ) -> Trajectory:
        """Load a trajectory folder onto ``teacher``; refuse anything that does not verify.

        Every problem with the folder is a :class:`StorageError` naming the file and the problem
        (see docs/RELIABILITY.md for the list of checks). A teacher cast to another floating dtype
        after recording (e.g. bf16) is recognised by the manifest's per-dtype fingerprints.
        Format versions 1 (``node-0001.safetensors`` names, no digest), 2 and 3 (a ``"call"``
        convention other than ``"denoiser"``) are read.

        ``call``: the function that runs a module on the probe (for :meth:`verify`), used instead of
        the manifest's convention; needed for a trajectory recorded with an unnamed function
        (``"custom"``: without it the path loads and :meth:`verify` refuses). Without ``call`` the
        manifest's convention is looked up by name (:func:`register_call`): an unknown name is refused.
        """
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be an nn.Module, got {type(teacher).__name__}")
        if call is not None and not callable(call):
            raise TypeError(f"call must be a function fn(module, x, sigma, cond), got {call!r}")
        folder = Path(path)
        if not folder.is_dir():
            raise StorageError(f"trajectory folder {folder} {'is not a folder' if folder.exists() else 'is missing'}")
        where = folder / MANIFEST
        man = read_manifest(where)
        name = man.get("call", DEFAULT_CALL)
        if call is None and name != CUSTOM_CALL and name not in _CALLS:
            raise StorageError(
                f"{where}: the probe is run by the call convention {name!r}, which is not registered here "
                f"(known: {sorted(_CALLS)}); register it first with "
                f"disback_core.trajectory.register_call({name!r}, fn), or pass Trajectory.load(..., call=fn)"
            )
        fp = _check_fingerprint(man, teacher, where) if check_fingerprint else None
        lora, template = _node_template(man, teacher, where)
        limit = _node_max_bytes(template)
        nodes = [_load_node(folder, e, template, limit) for e in man["nodes"]]
        probe = (
            _load_probe(folder, man["probe"], len(nodes), integer_sigma=name != DEFAULT_CALL)
            if man["probe"] is not None
            else None
        )
        fps = man.get("base_fingerprints")
        exact = fp is not None and fp == man["base_fingerprint"] and isinstance(fps, dict)
        try:
            traj = cls(
                teacher,
                nodes,
                kind=man["kind"],
                lora=lora,
                steps=[e["step"] for e in man["nodes"]],
                merge=merge,
                probe=probe,
                meta=man["meta"],
                base_fingerprint=fp,
                # the manifest's cast fingerprints describe this very teacher when it matched exactly
                base_fingerprints=fps
                if exact and isinstance(fps, dict) and len(fps) == len(FINGERPRINT_DTYPES)
                else None,
            )
        except StorageError:
            raise
        except (TypeError, ValueError) as e:
            raise StorageError(f"{where}: the stored trajectory does not fit this teacher: {e}") from e
        traj.call_name = name
        traj.call_fn = call if call is not None else _CALLS.get(name)
        traj.probe_dtype = _recorded_dtype(man) or traj.probe_dtype
        return traj


def probe_output(module: Callable[..., Any], probe: Probe, call: Callable[..., Tensor] = call_module) -> Tensor:
    """``module``'s output on the probe inputs (moved to its device), as float32 on the CPU."""
    dev = next((p.device for p in getattr(module, "parameters", lambda: iter(()))()), probe.x.device)
    with torch.no_grad():
        out = call(module, probe.x.to(dev), probe.sigma.to(dev), map_cond(lambda t: t.to(dev), probe.cond))
    return out.detach().float().cpu()


def _max_error(out: Tensor, ref: Tensor) -> float:
    err = (out - ref.float()).abs().max()
    return float(err) if torch.isfinite(err) else float("inf")


def probe_error(module: Callable[..., Any], probe: Probe, k: int, call: Callable[..., Tensor] = call_module) -> float:
    """Max abs difference between ``module``'s output on the probe and node ``k``'s recorded one."""
    return _max_error(probe_output(module, probe, call), probe.outputs[k])


def node_references(
    trajectory: Trajectory,
    module: nn.Module,
    nodes: Sequence[int],
    call: Callable[..., Tensor],
    *,
    prefix: str = "",
    base: Mapping[str, Tensor] | None = None,
) -> dict[int, Tensor]:
    """The probe outputs of ``nodes`` in ``module``'s own dtypes and on its device: node k's weights
    written (``W + scale * B @ A`` from ``base``, default the trajectory's base tensors, summed in fp32
    and cast once to each tensor's dtype, as an attachment writes them) into one private copy of
    ``module``, which is then run on the probe by ``call``. ``prefix``: where ``module`` sits in the
    trajectory's teacher. The reference for a module held in another precision than the recorded
    outputs' (:attr:`Trajectory.probe_dtype`): a bf16 module's outputs differ from fp32 ones by more
    than nodes differ from each other, so only outputs in its own precision tell its node apart."""
    if trajectory.probe is None:
        raise ValueError("the trajectory has no probe to verify against")
    work = _deepcopy_quietly(module)
    state = _state(work)
    dst = {name: state[name[len(prefix) :]] for name in trajectory.layers()}
    out: dict[int, Tensor] = {}
    for k in nodes:
        trajectory.write(dst, k, base)
        out[k] = probe_output(work.eval(), trajectory.probe, call)
    return out


def _cast_fingerprints(state: Mapping[str, Tensor], exact: str) -> dict[str, str]:
    """The state's fingerprint cast to each of :data:`FINGERPRINT_DTYPES` (the exact one where no cast changes it)."""
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    return {_dtype_name(d): exact if dtypes == {d} else tensors_fingerprint(state, d) for d in FINGERPRINT_DTYPES}


def _recorded_dtype(man: Mapping[str, Any]) -> torch.dtype | None:
    """The teacher's dtype when a manifest was recorded: the dtype whose cast fingerprint is the exact
    one (None for a teacher of mixed floating dtypes, or a format-1 manifest without them)."""
    fps = man.get("base_fingerprints")
    if not isinstance(fps, dict):
        return None
    return next((d for d in FINGERPRINT_DTYPES if fps.get(_dtype_name(d)) == man.get("base_fingerprint")), None)


class TrajectoryTarget(nn.Module):
    """A stable target module whose node can be switched in place: ``forward`` runs node ``index``.

    Pass it as the ``target`` of any method; :class:`~disback_core.backtracking.Backtrack` moves
    ``index`` toward the teacher. It re-switches the trajectory's working copy if something else
    reconfigured it, so its output always comes from node ``index``.
    """

    def __init__(self, trajectory: Trajectory, index: int):
        super().__init__()
        self.trajectory = trajectory
        trajectory._check_index(index)
        self.index = index
        self.position = float(index)  # a real position between nodes: set_position (interpolate.py)

    def set_index(self, k: int) -> None:
        self.trajectory._check_index(k)
        self.index = k
        self.position = float(k)

    def set_position(self, position: float) -> None:
        """Run the interpolated weights at ``position`` in ``[0, N]`` (:mod:`disback_core.interpolate`);
        ``index`` becomes ``ceil(position)``, the more degraded of the two nodes it mixes."""
        self.position = check_position(self.trajectory, position)
        self.index = math.ceil(self.position)

    def forward(self, x: Tensor, sigma: Any, cond: Any = None) -> Tensor:
        return target_at(self.trajectory, self.position)(x, sigma, cond)
