"""The degradation path: ordered score models from the teacher (node 0) to the most degraded node.

Nodes ``1..N`` are LoRA deltas on the frozen teacher (``kind="lora"``; peft + safetensors), or
full state dicts (``kind="full"``, for comparison). The teacher's weights are held once: one
reusable working copy carries whichever node is active.

On disk a trajectory is one folder::

    manifest.json           format, version, base-model fingerprint, LoRA spec, nodes (step, file, sha256)
    node-0001.safetensors   one file per node
    probe.safetensors       fixed inputs and every node's recorded outputs on them (optional)

Loading checks the format, the base model's fingerprint and every file's sha256 and keys, and
raises :class:`~disback_core.storage.StorageError` naming the first problem.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from .denoisers import freeze
from .lora import (ADAPTER, LoraSpec, inject_lora, load_lora_state, lora_layers, lora_state_template,
                   merge_lora_into, unmerge_lora)
from .storage import (StorageError, load_tensors, read_json, save_tensors, tensors_fingerprint, write_json)

__all__ = ["Trajectory", "TrajectoryTarget", "Probe", "FORMAT", "VERSION"]

FORMAT = "disback-trajectory"
VERSION = 1
KINDS = ("lora", "full")


@dataclass
class Probe:
    """Fixed inputs ``(x, sigma, cond)`` and each node's outputs on them, recorded when the node was
    made; :meth:`Trajectory.verify` recomputes them to prove every node loads as recorded."""

    x: Tensor
    sigma: Tensor
    cond: Tensor | None
    outputs: list[Tensor]  # index k = node k (0 = teacher)


class Trajectory:
    """Node 0 is ``teacher``; ``nodes[k-1]`` holds node ``k`` (a LoRA state or a full state dict).

    Args:
        teacher: the frozen base model (a denoiser ``D(x_t, sigma, cond)``); frozen here if not yet.
        nodes: node states in path order, teacher side first.
        kind: ``"lora"`` or ``"full"``.
        lora: the LoRA spec of ``kind="lora"`` nodes.
        steps: the degradation step at which each node was taken.
        merge: ``target(k)`` merges node k into the working copy (forward costs the teacher's);
            ``False`` keeps the adapters unmerged (a low-rank product per layer, exact recording).
    """

    def __init__(self, teacher: nn.Module, nodes: Sequence[Mapping[str, Tensor]], *, kind: str = "lora",
                 lora: LoraSpec | None = None, steps: Sequence[int] | None = None, merge: bool = True,
                 probe: Probe | None = None, meta: Mapping[str, Any] | None = None):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if kind == "lora" and lora is None:
            raise ValueError("kind='lora' needs the LoRA spec (lora=)")
        if not nodes:
            raise ValueError("a trajectory needs at least one degraded node")
        steps = list(steps) if steps is not None else list(range(1, len(nodes) + 1))
        if len(steps) != len(nodes):
            raise ValueError(f"steps has {len(steps)} entries for {len(nodes)} nodes")
        self.teacher = freeze(teacher)
        self.kind = kind
        self.lora = lora.resolved(teacher) if lora is not None else None
        self.nodes = [dict(n) for n in nodes]
        self.steps = [int(s) for s in steps]
        self.merge = merge
        self.probe = probe
        self.meta = dict(meta or {})
        self._work: nn.Module | None = None
        self._plain: nn.Module | None = None
        self.active_node = 0  # which node the working copy holds (0: none yet)

    # ------------------------------------------------------------------ nodes and targets

    @property
    def last(self) -> int:
        """Index of the most degraded node (N)."""
        return len(self.nodes)

    def __len__(self) -> int:
        """Number of nodes including the teacher (N + 1)."""
        return len(self.nodes) + 1

    def _check_index(self, k: int) -> None:
        if not 0 <= k <= self.last:
            raise IndexError(f"node index {k} out of range 0..{self.last}")

    def _working_copy(self) -> nn.Module:
        if self._work is None:
            work = copy.deepcopy(self.teacher)
            if self.kind == "lora":
                inject_lora(work, self.lora)
                # A plain twin of the teacher whose LoRA-target layers *are* the slot's base layers
                # (shared, not copied): merged targets run through it without peft's wrappers.
                memo = {id(self.teacher.get_submodule(n)): layer.get_base_layer() for n, layer in lora_layers(work)}
                self._plain = freeze(copy.deepcopy(self.teacher, memo))
            self._work = freeze(work)
        return self._work

    def _load_node(self, module: nn.Module, k: int) -> None:
        state = self.nodes[k - 1]
        if self.kind == "lora":
            load_lora_state(module, state, source=f"node {k}")
        else:
            try:
                module.load_state_dict(state, strict=True)
            except RuntimeError as e:
                raise ValueError(f"node {k} does not fit the teacher: {e}") from e

    def target(self, k: int) -> nn.Module:
        """A frozen denoiser for node ``k``. ``target(0)`` is the teacher itself.

        Nodes ``k >= 1`` share one working copy, reconfigured by each call: a module returned
        for node ``k`` follows the next call for another node (use :class:`TrajectoryTarget` or
        :meth:`materialize` to hold a node).
        """
        self._check_index(k)
        if k == 0:
            return self.teacher
        work = self._working_copy()
        if self.active_node != k:
            self._load_node(work, k)
            if self.kind == "lora":
                (merge_lora_into if self.merge else unmerge_lora)(work, self.teacher)
            self.active_node = k
        return self._plain if self.kind == "lora" and self.merge else work

    def materialize(self, k: int, trainable: bool = False) -> nn.Module:
        """A standalone copy of the teacher with node ``k``'s weights (no peft wrappers).

        ``trainable=True`` gives a module to train (DisBack's fake score starts from node N).
        """
        self._check_index(k)
        m = copy.deepcopy(self.teacher)
        if k > 0:
            if self.kind == "lora":
                work = self._working_copy()
                self._load_node(work, k)
                self.active_node = -1  # the slot now holds node k unmerged-in-state; force a re-switch
                with torch.no_grad():
                    base = dict(self.teacher.named_parameters())
                    for name, layer in lora_layers(work):
                        delta = layer.get_delta_weight(ADAPTER)
                        m.get_submodule(name).weight.copy_(base[f"{name}.weight"] + delta.to(base[f"{name}.weight"].dtype))
            else:
                self._load_node(m, k)
        if trainable:
            m.requires_grad_(True)
            m.train()
        else:
            freeze(m)
        return m

    def nbytes(self) -> int:
        """Bytes of the stored node tensors (the teacher not included)."""
        return sum(t.numel() * t.element_size() for n in self.nodes for t in n.values())

    def verify(self) -> list[float]:
        """Max abs difference between each node's outputs now and as recorded on the probe."""
        if self.probe is None:
            raise ValueError("this trajectory has no probe to verify against")
        p = self.probe
        errs = []
        with torch.no_grad():
            for k in range(len(self)):
                dev = next(iter(self.teacher.parameters()), p.x).device
                out = self.target(k)(p.x.to(dev), p.sigma.to(dev), None if p.cond is None else p.cond.to(dev))
                errs.append(float((out.cpu() - p.outputs[k]).abs().max()))
        return errs

    # ------------------------------------------------------------------ persistence

    def save(self, path: str | os.PathLike) -> Path:
        """Write the folder: node files first, the manifest last (atomically), so a crash mid-save
        never leaves a manifest that points at missing or half-written nodes."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        entries = []
        for k, (state, step) in enumerate(zip(self.nodes, self.steps), start=1):
            name = f"node-{k:04d}.safetensors"
            sha = save_tensors(folder / name, state, {"node": str(k), "step": str(step)})
            entries.append({"index": k, "step": step, "file": name, "sha256": sha})
        probe_entry = None
        if self.probe is not None:
            t = {"x": self.probe.x, "sigma": self.probe.sigma}
            if self.probe.cond is not None:
                t["cond"] = self.probe.cond
            t.update({f"out.{k}": o for k, o in enumerate(self.probe.outputs)})
            probe_entry = {"file": "probe.safetensors", "sha256": save_tensors(folder / "probe.safetensors", t)}
        from . import __version__

        write_json(folder / "manifest.json", {
            "format": FORMAT, "version": VERSION, "library": f"disback {__version__}", "kind": self.kind,
            "base_fingerprint": tensors_fingerprint(self.teacher.state_dict()),
            "lora": self.lora.to_json() if self.lora else None, "nodes": entries, "probe": probe_entry,
            "meta": self.meta,
        })
        return folder

    @classmethod
    def load(cls, path: str | os.PathLike, teacher: nn.Module, merge: bool = True,
             check_fingerprint: bool = True) -> "Trajectory":
        """Load a trajectory folder onto ``teacher``; refuse anything that does not verify."""
        folder = Path(path)
        if not folder.is_dir():
            raise StorageError(f"trajectory folder {folder} is missing")
        man = read_json(folder / "manifest.json", "trajectory manifest")
        where = folder / "manifest.json"
        if not isinstance(man, dict) or man.get("format") != FORMAT:
            raise StorageError(f"{where} is not a disback trajectory manifest")
        if man.get("version") != VERSION:
            raise StorageError(f"{where} has format version {man.get('version')!r}; this library reads {VERSION}")
        kind = man.get("kind")
        if kind not in KINDS:
            raise StorageError(f"{where}: unknown node kind {kind!r}")
        if check_fingerprint:
            fp = tensors_fingerprint(teacher.state_dict())
            if man.get("base_fingerprint") != fp:
                raise StorageError(f"{where}: trajectory was recorded on another base model "
                                   f"(fingerprint {str(man.get('base_fingerprint'))[:12]}..., this teacher {fp[:12]}...)")
        try:
            lora = LoraSpec.from_json(man["lora"]) if kind == "lora" else None
        except (KeyError, TypeError, ValueError) as e:
            raise StorageError(f"{where}: bad LoRA spec: {e}") from e
        entries = man.get("nodes")
        if not isinstance(entries, list) or not entries:
            raise StorageError(f"{where}: no nodes listed")
        # Build the template the node files must match.
        if kind == "lora":
            probe_model = inject_lora(copy.deepcopy(teacher), lora)
            template = {k: tuple(v.shape) for k, v in lora_state_template(probe_model).items()}
            del probe_model
        else:
            template = {k: tuple(v.shape) for k, v in teacher.state_dict().items()}
        nodes, steps = [], []
        for i, e in enumerate(entries, start=1):
            if not isinstance(e, dict) or e.get("index") != i:
                raise StorageError(f"{where}: node entry {i} is malformed or out of order")
            name = str(e.get("file", ""))
            if not name or "/" in name or "\\" in name or name.startswith("."):
                raise StorageError(f"{where}: node {i} has an invalid file name {name!r}")
            state = load_tensors(folder / name, sha256=e.get("sha256") or "missing")
            missing = sorted(set(template) - set(state))
            unexpected = sorted(set(state) - set(template))
            if missing or unexpected:
                raise StorageError(f"{folder / name}: keys do not fit this teacher: missing {missing[:3]}, "
                                   f"unexpected {unexpected[:3]}")
            for k, shape in template.items():
                if tuple(state[k].shape) != shape:
                    raise StorageError(f"{folder / name}: {k} has shape {tuple(state[k].shape)}, expected {shape}")
            nodes.append(state)
            steps.append(int(e.get("step", i)))
        probe = None
        if man.get("probe"):
            pe = man["probe"]
            t = load_tensors(folder / str(pe.get("file")), sha256=pe.get("sha256") or "missing")
            outs = [t.get(f"out.{k}") for k in range(len(nodes) + 1)]
            if any(o is None for o in outs) or "x" not in t or "sigma" not in t:
                raise StorageError(f"{folder / str(pe.get('file'))}: probe lacks inputs or outputs for some node")
            probe = Probe(t["x"], t["sigma"], t.get("cond"), outs)
        return cls(teacher, nodes, kind=kind, lora=lora, steps=steps, merge=merge, probe=probe,
                   meta=man.get("meta") or {})


class TrajectoryTarget(nn.Module):
    """A stable target module whose node can be switched in place: ``forward`` runs node ``index``.

    Pass it as the ``target`` of any method; :class:`~disback_core.backtracking.Backtrack` moves
    ``index`` toward the teacher. It re-switches the trajectory's working copy if something else
    reconfigured it, so its output always comes from node ``index``.
    """

    def __init__(self, trajectory: Trajectory, index: int):
        super().__init__()
        self.trajectory = trajectory
        self.index = index
        trajectory._check_index(index)

    def set_index(self, k: int) -> None:
        self.trajectory._check_index(k)
        self.index = k

    def forward(self, x: Tensor, sigma: Any, cond: Any = None) -> Tensor:
        return self.trajectory.target(self.index)(x, sigma, cond)

