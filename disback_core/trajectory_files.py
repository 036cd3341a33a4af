"""A trajectory folder on disk (format versions 2 and 3): writing its files, reading and checking them.

    manifest.json                            format, version, base-model fingerprints, LoRA spec,
                                             node_count, nodes (index, step, file, sha256), probe,
                                             meta, [call], digest (sha256 over all of it but the digest)
    node-0001-<16 hex of sha256>.safetensors one file per node, named by its content
    probe-<16 hex of sha256>.safetensors     fixed inputs and every node's recorded outputs (optional)

:meth:`disback_core.trajectory.Trajectory.save` and ``load`` use these pieces; the checks are
listed in docs/RELIABILITY.md. Every problem is a :class:`~disback_core.storage.StorageError`
naming the file and the problem.

Version 3 is version 2 with one more field, ``call``: the name of the convention that runs a module
on the probe (:func:`disback_core.trajectory.register_call`), e.g. ``"flow-transformer"`` for a path
recorded on a raw diffusers transformer. A trajectory with the default ``"denoiser"`` convention is
written as version 2 (no ``call`` field), so libraries that read only versions 1 and 2 still read
it, and refuse by its version, rather than verify wrongly, one whose probe needs another call.
Manifests without the field (versions 1 and 2) are ``"denoiser"``. The probe's ``sigma`` is floating,
or, under a convention other than ``"denoiser"``, an integer tensor (a diffusers UNet's timesteps).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .denoisers import flatten_cond, unflatten_cond
from .lora import LoraSpec, lora_template
from .storage import (
    StorageError,
    body_digest,
    check_digest,
    check_fields,
    check_format,
    check_int,
    is_number,
    is_sha256,
    json_bytes,
    load_tensors,
    loadable,
    lowest_float_dtype,
    read_json,
    save_tensors_once,
    short,
    temp_target,
    tensors_fingerprint,
    tensors_misfit,
    tensors_sha256,
)

FORMAT = "disback-trajectory"
VERSION = 3  # the newest written; 2 adds content-named files, node_count and digest; 3 adds call
READ_VERSIONS = (1, 2, 3)
KINDS = ("lora", "full")
FINGERPRINT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MANIFEST = "manifest.json"
MAX_STEP = 2**63 - 1
_V1_KEYS = {"format", "version", "kind", "base_fingerprint", "lora", "nodes", "probe", "meta"}
_KEYS = {  # version -> (required, optional) top-level manifest fields
    1: (_V1_KEYS, {"library", "base_fingerprints"}),
    2: (_V1_KEYS | {"library", "base_fingerprints", "node_count", "digest"}, set()),
    3: (_V1_KEYS | {"library", "base_fingerprints", "node_count", "digest", "call"}, set()),
}
_CALL_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")  # = trajectory.CALL_NAME
_LORA_KEYS = {"rank", "alpha", "use_rslora", "target_modules"}
_ENTRY_KEYS = {"index", "step", "file", "sha256"}
_PROBE_KEYS = {"file", "sha256"}
# files a save owns in its folder: node/probe files of formats 1 and 2, and (temporary files of) writes
_OWNED = re.compile(r"(?:node-\d{4,}|probe)(?:-[0-9a-f]{16})?\.safetensors")
_WRITTEN = re.compile(r"manifest\.json|(?:node|probe)[^/\\]*\.safetensors")


@dataclass
class Probe:
    """Fixed inputs ``(x, sigma, cond)`` and each node's outputs on them, recorded when the node was
    made; :meth:`Trajectory.verify` recomputes them to prove every node loads as recorded.
    ``sigma`` is whatever the module's second argument is (a timestep for a raw diffusers UNet)."""

    x: Tensor
    sigma: Tensor
    cond: Any  # None, a tensor, or a (nested) dict of tensors (SDXL's added_cond_kwargs)
    outputs: list[Tensor]  # index k = node k (0 = teacher)


def _dtype_name(d: torch.dtype) -> str:
    return str(d).removeprefix("torch.")


def _check_savable(steps: Sequence[Any], meta: Any) -> None:
    """Refuse, before writing, steps a reader would refuse and meta that is not JSON it would read."""
    for k, step in enumerate(steps, start=1):
        check_int(step, f"node {k}: step", 0, MAX_STEP)
    loadable(json_bytes(meta, "meta", sort_keys=False), "meta", "of this trajectory")


def _check_call_savable(call_name: str, probe: Probe | None) -> None:
    """Refuse, before writing, a probe a reader would refuse: integer sigmas under ``"denoiser"``."""
    if probe is None or call_name != "denoiser":
        return
    sigma = probe.sigma
    if not sigma.is_floating_point():
        raise ValueError(
            f"the probe's sigma has dtype {sigma.dtype}: a D(x, sigma, cond) denoiser (call 'denoiser') takes "
            "real noise levels, and a saved integer sigma would not load; record the raw model with its own "
            "call convention (call='diffusers-unet', 'flow-transformer' or a registered name), or pass the "
            "timesteps as floats (t.float())"
        )


def _file_name(prefix: str, sha: Any, version: int = VERSION) -> str:
    """A node's or the probe's file name: ``<prefix>-<first 16 hex of its sha256>.safetensors``
    (format 1: ``<prefix>.safetensors``)."""
    return f"{prefix}.safetensors" if version == 1 else f"{prefix}-{str(sha)[:16]}.safetensors"


def _write_file(folder: Path, prefix: str, tensors: Mapping[str, Tensor], meta: Any = None) -> dict[str, Any]:
    """Write ``tensors`` as a content-named file (reused if already there); returns its manifest entry."""
    sha = tensors_sha256(tensors, meta)
    save_tensors_once(folder / _file_name(prefix, sha), tensors, sha, meta)
    return {"file": _file_name(prefix, sha), "sha256": sha}


def _write_node(folder: Path, k: int, state: Mapping[str, Tensor], step: int) -> dict[str, Any]:
    entry = _write_file(folder, f"node-{k:04d}", state, {"node": str(k), "step": str(step)})
    return {"index": k, "step": step, **entry}


def _write_probe(folder: Path, probe: Probe) -> dict[str, str]:
    t = {"x": probe.x, "sigma": probe.sigma, **flatten_cond(probe.cond)}  # "cond" or "cond.<key>[.<key>]"
    return _write_file(folder, "probe", {**t, **{f"out.{k}": o for k, o in enumerate(probe.outputs)}})


def manifest_digest(body: Mapping[str, Any]) -> str:
    """sha256 over the canonical JSON of every manifest field except ``digest``: the node count,
    the ordered node entries (steps, files, hashes), the LoRA spec, the probe, the fingerprints and meta."""
    return body_digest(body)


def _manifest_bytes(body: Mapping[str, Any]) -> bytes:
    """The manifest file's bytes (key-sorted, indented JSON with its digest); refused if a reader
    would refuse it (too large or too deeply nested meta)."""
    return loadable(json_bytes({**body, "digest": manifest_digest(body)}), "the manifest", "of this trajectory")


def stale_files(folder: str | os.PathLike, keep: Iterable[str]) -> list[str]:
    """Names in ``folder`` that a trajectory save owns but ``keep`` does not list: node and probe
    files of other saves (formats 1 and 2) and temporary files of interrupted writes."""
    keep = set(keep)
    return sorted(
        n
        for n in os.listdir(folder)
        if n not in keep and (_OWNED.fullmatch(n) or _WRITTEN.fullmatch(temp_target(n) or ""))
    )


# ---------------------------------------------------------------------------- reading the manifest


def read_manifest(where: Path) -> dict[str, Any]:
    """Read and validate ``manifest.json`` (format 1 or 2): every field's type and range, file
    names, the node count and (format 2) the digest. Raises :class:`StorageError` naming ``where``."""
    man = read_json(where, "trajectory manifest")
    version = check_format(man, where, FORMAT, READ_VERSIONS)
    required, optional = _KEYS[version]
    missing, unknown = sorted(required - set(man)), sorted(set(man) - required - optional)
    if missing or unknown:
        raise StorageError(f"{where}: missing fields {missing}, unknown fields {[u[:40] for u in unknown[:5]]}")
    if not isinstance(man["kind"], str) or man["kind"] not in KINDS:
        raise StorageError(f"{where}: unknown node kind {short(man['kind'])}; expected one of {KINDS}")
    if not isinstance(man.get("library", ""), str):
        raise StorageError(f"{where}: library must be a string, got {short(man['library'])}")
    _check_fingerprints(man, where)
    _check_lora_field(man, where)
    _check_nodes_field(man, where)
    if man["probe"] is not None:
        _check_file_entry(man["probe"], _PROBE_KEYS, where, "the probe entry", "probe", version)
    if not isinstance(man["meta"], dict):
        raise StorageError(f"{where}: meta must be a JSON object, got {type(man['meta']).__name__}")
    if version >= 3 and not (isinstance(man["call"], str) and _CALL_NAME.fullmatch(man["call"])):
        raise StorageError(
            f"{where}: call must be a call convention name (1-64 characters of a-z, 0-9, '_', '.', '-'), "
            f"got {short(man['call'])}"
        )
    if version >= 2:  # node entries, their order, the LoRA spec, the probe, meta
        check_digest(man, where)
    return man


def _check_fingerprints(man: Mapping[str, Any], where: Path) -> None:
    if not is_sha256(man["base_fingerprint"]):
        raise StorageError(f"{where}: base_fingerprint must be 64 hex digits, got {short(man['base_fingerprint'])}")
    fps = man.get("base_fingerprints", {})
    known = {_dtype_name(d) for d in FINGERPRINT_DTYPES}
    if (
        not isinstance(fps, dict)
        or set(fps) - known
        or (man["version"] >= 2 and set(fps) != known)
        or not all(is_sha256(v) for v in fps.values())
    ):
        raise StorageError(
            f"{where}: base_fingerprints must map {sorted(known)} to 64-hex fingerprints, got {short(fps)}"
        )


def _check_lora_field(man: Mapping[str, Any], where: Path) -> None:
    """The LoRA spec's JSON shape (the values are checked by :meth:`LoraSpec.from_json` later)."""
    spec = man["lora"]
    if man["kind"] == "full":
        if spec is not None:
            raise StorageError(f"{where}: a kind='full' trajectory has no LoRA spec, got {short(spec)}")
        return
    if not isinstance(spec, dict):
        raise StorageError(f"{where}: bad LoRA spec: must be a JSON object, got {short(spec)}")
    if man["version"] >= 2 and set(spec) != _LORA_KEYS:
        raise StorageError(f"{where}: bad LoRA spec: fields must be {sorted(_LORA_KEYS)}, got {sorted(map(str, spec))}")
    if man["version"] >= 2 and not is_number(spec["alpha"]):
        raise StorageError(
            f"{where}: bad LoRA spec: alpha must be a number (saved resolved), got {short(spec['alpha'])}"
        )
    tm = spec.get("target_modules")
    if (tm is None and man["version"] >= 2) or (tm is not None and not _is_name_list(tm)):
        raise StorageError(
            f"{where}: bad LoRA spec: target_modules must be a non-empty list of distinct layer names, got {short(tm)}"
        )


def _is_name_list(v: Any) -> bool:
    return (
        isinstance(v, list)
        and 0 < len(v)
        and len(set(map(str, v))) == len(v)
        and all(isinstance(t, str) and 0 < len(t) <= 1000 for t in v)
    )


def _check_nodes_field(man: Mapping[str, Any], where: Path) -> None:
    entries = man["nodes"]
    if not isinstance(entries, list) or not entries:
        raise StorageError(f"{where}: nodes must be a non-empty list, got {short(entries)}")
    if man["version"] >= 2 and (type(man["node_count"]) is not int or man["node_count"] != len(entries)):
        raise StorageError(
            f"{where}: node_count {short(man['node_count'])} does not match the {len(entries)} node "
            "entries (an entry was dropped or added)"
        )
    for i, e in enumerate(entries, start=1):
        what = f"node entry {i}"
        check_fields(e, _ENTRY_KEYS, where, what)
        if type(e["index"]) is not int or e["index"] != i:
            raise StorageError(f"{where}: {what} has index {short(e['index'])}; entries must be in order 1..N")
        check_int(e["step"], f"{where}: {what}: step", 0, MAX_STEP, StorageError)
        _check_file_entry(e, _ENTRY_KEYS, where, what, f"node-{i:04d}", man["version"])


def _check_file_entry(e: Any, keys: set[str], where: Path, what: str, prefix: str, version: int) -> None:
    """A file entry: exactly ``keys``, a 64-hex sha256, and the file name its prefix and sha256 give
    (so a plain name inside the folder)."""
    check_fields(e, keys, where, what)
    if not is_sha256(e["sha256"]):
        raise StorageError(f"{where}: {what} has sha256 {short(e['sha256'])}, not 64 hex digits")
    if e["file"] != (want := _file_name(prefix, e["sha256"], version)):
        raise StorageError(
            f"{where}: {what} has an invalid file name {short(e['file'])}, expected {want!r} (entries edited or swapped)"
        )


def _check_fingerprint(man: Mapping[str, Any], teacher: nn.Module, where: Path) -> str:
    """The teacher's fingerprint if it is the recorded base model (in its dtype or cast); else raise."""
    state = teacher.state_dict()
    fp = tensors_fingerprint(state)
    if man.get("base_fingerprint") == fp:
        return fp
    dtype = lowest_float_dtype(state)
    fps = man.get("base_fingerprints")
    cast = fps.get(_dtype_name(dtype)) if isinstance(fps, dict) and dtype is not None else None
    if isinstance(cast, str) and cast == tensors_fingerprint(state, dtype):
        return fp
    raise StorageError(
        f"{where}: trajectory was recorded on another base model "
        f"(fingerprint {str(man.get('base_fingerprint'))[:12]}..., this teacher {fp[:12]}...)"
    )


# ---------------------------------------------------------------------------- reading the files


def _node_template(
    man: Mapping[str, Any], teacher: nn.Module, where: Path
) -> tuple[LoraSpec | None, dict[str, Tensor]]:
    """(LoRA spec, the tensors a node must hold: the teacher's, or meta tensors of the LoRA factors' shapes)."""
    if man["kind"] == "full":
        return None, teacher.state_dict()
    spec = man["lora"]
    tm = spec.get("target_modules")
    if tm is not None and len(tm) > sum(1 for _ in teacher.modules()):
        raise StorageError(f"{where}: bad LoRA spec: {len(tm)} target_modules, more than the teacher has layers")
    try:
        lora = LoraSpec.from_json(spec)
        template = lora_template(teacher, lora)
    except (KeyError, TypeError, ValueError, re.error) as e:
        raise StorageError(f"{where}: bad LoRA spec: {e}") from e
    return lora, {k: torch.empty(s, device="meta") for k, s in template.items()}


def _node_max_bytes(template: Mapping[str, Tensor]) -> int:
    """The largest file a node of ``template`` can be: 8-byte elements and a generous header."""
    return 8 + (64 << 10) + 1024 * len(template) + 8 * sum(t.numel() for t in template.values())


def _load_node(folder: Path, e: Mapping[str, Any], template: Mapping[str, Tensor], max_bytes: int) -> dict[str, Tensor]:
    """Node entry ``e``'s tensors, checked: size, sha256, header, keys, shapes, float dtypes."""
    path = folder / e["file"]  # a plain name (read_manifest); a symlink is refused by the reader
    state = load_tensors(path, sha256=e["sha256"], max_bytes=max_bytes)
    if problem := tensors_misfit(state, template):
        raise StorageError(f"{path}: keys do not fit this teacher: {problem}")
    return state


def _is_integer(t: Tensor) -> bool:
    return not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool


def _load_probe(folder: Path, e: Mapping[str, Any], n_nodes: int, integer_sigma: bool = False) -> Probe:
    """The probe's tensors, checked: sha256, header, exactly x, sigma, [cond], out.0..out.N, float
    inputs and outputs, one output shape with x's batch size. ``integer_sigma``: the sigma may also
    be an integer tensor (a raw model's timesteps, under a call convention other than ``"denoiser"``)."""
    path = folder / e["file"]  # a plain name (read_manifest); a symlink is refused by the reader
    t = load_tensors(path, sha256=e["sha256"])
    outs = [f"out.{k}" for k in range(n_nodes + 1)]
    conds = sorted(k for k in t if k == "cond" or (k.startswith("cond.") and all(k.split(".")[1:])))
    if "cond" in conds and len(conds) > 1:
        raise StorageError(f"{path}: probe holds both a tensor cond and dict cond entries {conds[1:3]}")
    expected = {"x", "sigma", *outs, *conds}
    if set(t) != expected:
        raise StorageError(
            f"{path}: probe must hold x, sigma, [cond or cond.<key>] and out.0..out.{n_nodes}; missing "
            f"{sorted(expected - set(t))[:3]}, unexpected {[u[:80] for u in sorted(set(t) - expected)[:3]]}"
        )
    for k in ["x", "sigma", *outs]:
        if k == "sigma" and integer_sigma and _is_integer(t[k]):
            continue
        if not t[k].is_floating_point():
            raise StorageError(
                f"{path}: probe tensor {k} has dtype {t[k].dtype}, expected a floating dtype"
                + (" (integer timesteps only under a raw-model call convention)" if k == "sigma" else "")
            )
    x = t["x"]
    for k in ["sigma", *conds, *outs]:
        v = t.get(k)
        if x.ndim == 0 or (v is not None and v.ndim > 0 and v.shape[0] != x.shape[0]):
            raise StorageError(f"{path}: probe tensor {k} does not have one row per sample of x {tuple(x.shape)}")
    if any(t[k].shape != t["out.0"].shape for k in outs):
        raise StorageError(f"{path}: probe outputs do not all have the shape {tuple(t['out.0'].shape)}")
    return Probe(x, t["sigma"], unflatten_cond({k: t[k] for k in conds}), [t[k] for k in outs])
