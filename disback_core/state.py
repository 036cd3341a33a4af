"""Resumable training state: one call saves everything a distillation run needs to continue
(:func:`save_state`), one call restores it exactly (:func:`load_state`). No pickle: tensors go to
safetensors files, everything else to JSON; ``torch.load`` is never used.

On disk, one run folder::

    latest.json                     the switch: {"directory": "step-000001200", "manifest_sha256": ...}
    step-000001000/                 the previous states (the last ``keep`` are kept)
    step-000001200/
        manifest.json               format, version, step, config and its hash, world size, library and
                                    torch versions, the optimizers' param_groups and non-tensor state,
                                    the schedulers' state, extra, every file's sha256 and size, and
                                    digest: the sha256 of the canonical JSON of every other field
        module-<name>.safetensors   each module's state_dict
        optimizer-<name>.safetensors  each optimizer's tensors (``state.<param index>.<key>``)
        extra.safetensors           tensors found in schedulers' states or in ``extra`` (only if any)
        rng-rank<r>.safetensors     per rank: torch CPU RNG, CUDA RNG of every device, named generators
        rng-rank<r>.json            per rank: numpy's global RNG and Python's ``random`` state

A save writes everything into a temporary sibling folder (``.step-<step>.tmp-<pid>``), renames it
into place, then replaces ``latest.json``: that replacement is the switch (every write and rename
durable, see :mod:`~disback_core.storage`). Only then are the step folders beyond the last ``keep``
and stray temporary folders removed. A state saved again at a step that already has a folder is
switched to under its temporary name first, so ``latest.json`` always names a complete folder; a
folder named ``step-<step>`` is only ever made by renaming a complete one. The same state gives the
same bytes in every file; a save refuses, before writing anything, a state the loader would refuse.

A load reads ``latest.json`` (or the step folder it is given), checks the manifest (against the
sha256 ``latest.json`` records and against its own digest, so that a step folder loaded directly is
verified like the live one) and every file before any tensor is read, the run configuration, the
world size, the names, shapes and types of everything it restores, and only then writes into the
caller's modules, optimizers, schedulers, generators and RNGs. Every problem is a
:class:`~disback_core.storage.StorageError` naming the file and the problem.

Not in scope here: sharded states (FSDP / ``torch.distributed.checkpoint``); every rank of a
replicated (DDP) run shares one folder on a shared file system, rank 0 writing all but the RNG files.
"""

from __future__ import annotations

import functools
import math
import os
import random
import re
import stat
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .storage import (
    MAX_JSON_DEPTH,
    StorageError,
    atomic_write,
    atomic_write_bytes,
    body_digest,
    check_digest,
    check_fields,
    check_file_table,
    check_format,
    check_int,
    config_hash,
    file_entry,
    fsync_dir,
    gc_paused,
    is_number,
    is_plain_name,
    is_sha256,
    json_bytes,
    load_tensors,
    loadable,
    parse_json,
    read_bytes,
    read_json,
    remove_path,
    save_tensors,
    sha256_bytes,
    sha256_stream,
    short,
    temp_target,
    tensors_misfit,
    verify_file,
)

__all__ = ["save_state", "load_state", "latest_state", "list_states", "FORMAT", "VERSION"]

FORMAT = "disback-state"
POINTER_FORMAT = "disback-state-pointer"
VERSION = 1
MANIFEST = "manifest.json"
LATEST = "latest.json"
EXTRA_FILE = "extra.safetensors"
MAX_STEP = 999_999_999  # nine digits in the folder name
# Size caps per JSON file kind (checked before reading); a save refuses a state beyond them.
MAX_MANIFEST_BYTES = 16 << 20  # an SDXL-size run's manifest (2 x AdamW over 1700 tensors) is ~1.5 MB
MAX_RNG_JSON_BYTES = 1 << 20
MAX_POINTER_BYTES = 64 << 10
_MAX_DEPTH = 60  # Python nesting a state may hold (extra, schedulers' and optimizers' states, config)
# JSON nesting of a manifest, measured before parsing: the deepest a save writes is 185 (tuples and
# dicts with non-string keys take 2 and 3 JSON levels per level of _MAX_DEPTH, under 4 of the manifest's)
MAX_MANIFEST_DEPTH = 192
_MAX_CUDA_DEVICES = 1024
_STEP_DIR = re.compile(r"step-(\d{9})")
_TMP_DIR = re.compile(r"\.step-(\d{9})\.tmp-[A-Za-z0-9-]{1,80}")
_TAGS = ("__tuple__", "__tensor__", "__dict__", "__float__")
_TAG_SET = frozenset(_TAGS)
_short = short  # the name other modules of the library import


# --------------------------------------------------------------------------- JSON encoding


def _join(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _encode(obj: Any, where: str, sink: dict[str, Tensor] | None, key: str, depth: int = 0) -> Any:
    """``obj`` as JSON-able data. Tuples, dicts with non-string keys and non-finite floats are tagged
    (``{"__tuple__": [...]}``, ``{"__dict__": [[k, v], ...]}``, ``{"__float__": "inf"}``); tensors go to
    ``sink`` under the dotted ``key`` and are referenced as ``{"__tensor__": key}`` (refused if
    ``sink`` is None). Anything else is a ``TypeError`` naming ``where``."""
    if depth > _MAX_DEPTH:
        raise ValueError(f"{where} is nested more than {_MAX_DEPTH} levels deep")
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj) if math.isfinite(obj) else {"__float__": repr(float(obj))}
    if isinstance(obj, Tensor):
        if sink is None:
            raise TypeError(f"{where} is a tensor; tensors are not allowed there")
        name = key or "value"
        while name in sink:
            name += "~"
        sink[name] = obj
        return {"__tensor__": name}
    if type(obj).__module__ == "numpy" and getattr(obj, "ndim", None) == 0 and hasattr(obj, "item"):
        return _encode(obj.item(), where, sink, key, depth)  # a numpy scalar: saved as a Python number
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{where}[{i}]", sink, _join(key, i), depth + 1) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{where}[{i}]", sink, _join(key, i), depth + 1) for i, v in enumerate(obj)]
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) and k not in _TAGS for k in obj):
            return {k: _encode(v, f"{where}[{k!r}]", sink, _join(key, k), depth + 1) for k, v in obj.items()}
        return {
            "__dict__": [
                [
                    _encode(k, f"{where} key {k!r}", None, "", depth + 1),
                    _encode(v, f"{where}[{k!r}]", sink, _join(key, k), depth + 1),
                ]
                for k, v in obj.items()
            ]
        }
    raise TypeError(
        f"{where} is a {type(obj).__name__}, which a state cannot hold "
        "(JSON values, tuples, dicts, numpy scalars and tensors can)"
    )


class _Malformed(Exception):
    """A malformed value met while decoding; ``path`` is filled in while the recursion unwinds, so
    that no location string is built for the values that decode."""

    def __init__(self, problem: str):
        super().__init__(problem)
        self.problem = problem
        self.path: list[str] = []


def _decode(obj: Any, tensors: Mapping[str, Tensor], where: str, used: set[str] | None = None) -> Any:
    """Inverse of :func:`_encode`, in place (``obj`` is freshly parsed JSON, used once); a malformed
    tag or a missing tensor is a StorageError naming ``where`` and the path inside it. The names of
    the tensors it refers to are added to ``used``."""
    try:
        with gc_paused():
            return _decoded(obj, tensors, set() if used is None else used)
    except _Malformed as e:
        raise StorageError(f"{where}{''.join(reversed(e.path))}: {e.problem}") from None


def _decoded(obj: Any, tensors: Mapping[str, Tensor], used: set[str]) -> Any:
    if type(obj) is list or (type(obj) is dict and _TAG_SET.isdisjoint(obj)):
        for k, v in enumerate(obj) if isinstance(obj, list) else obj.items():
            if v and (type(v) is list or type(v) is dict):  # an empty one decodes to itself
                try:
                    obj[k] = _decoded(v, tensors, used)
                except _Malformed as e:
                    e.path.append(f"[{k}]" if isinstance(obj, list) else f"[{short(k)}]")
                    raise
        return obj
    if type(obj) is not dict:
        return obj
    if len(obj) != 1:
        raise _Malformed(f"a tagged value {next(k for k in _TAGS if k in obj)!r} has other keys beside it")
    tag, v = next(iter(obj.items()))
    if tag == "__tuple__" and isinstance(v, list):
        return tuple(_decoded(v, tensors, used))
    if tag == "__tensor__" and isinstance(v, str):
        if v not in tensors:
            raise _Malformed(f"tensor {short(v)} is not in the state's tensor file")
        used.add(v)
        return tensors[v]
    if tag == "__float__" and v in ("nan", "inf", "-inf"):
        return float(v)
    if tag == "__dict__" and isinstance(v, list) and all(isinstance(p, list) and len(p) == 2 for p in v):
        out = {}
        for i, (k, x) in enumerate(v):
            try:
                k = _decoded(k, tensors, used)
            except _Malformed as e:
                e.path.append(f" key {i}")
                raise
            try:
                out[k] = _decoded(x, tensors, used)
            except TypeError:
                raise _Malformed(f"key {i} ({short(k)}) cannot be a dict key") from None
            except _Malformed as e:
                e.path.append(f"[{short(k)}]")
                raise
        return out
    raise _Malformed(f"malformed {tag} value {short(v)}")


def _tensor_refs(obj: Any, out: set[str] | None = None) -> set[str]:
    """Every ``{"__tensor__": key}`` reference in an encoded object (iteratively: no recursion limit)."""
    out = set() if out is None else out
    stack = [obj]
    while stack:
        o = stack.pop()
        if type(o) is dict:
            if len(o) == 1 and type(o.get("__tensor__")) is str:
                out.add(o["__tensor__"])
            else:
                stack.extend(o.values())
        elif type(o) is list:
            stack.extend(o)
    return out


def _same_kind(saved: Any, own: Any) -> bool:
    """Whether a decoded scheduler value has the kind of this scheduler's own value: numbers for numbers
    (finite where its own is), a bool for a bool, lists of the same length, element by element, dicts
    with the same keys; None, strings and callables' placeholders are taken as they are."""
    if isinstance(own, bool) or isinstance(saved, bool):
        return type(saved) is type(own) or own is None
    if isinstance(own, (int, float)):
        return isinstance(saved, (int, float)) and (math.isfinite(saved) or not math.isfinite(own))
    if isinstance(own, (list, tuple)):
        return isinstance(saved, (list, tuple)) and len(saved) == len(own) and all(map(_same_kind, saved, own))
    if isinstance(own, dict):
        return isinstance(saved, dict) and set(saved) == set(own) and all(_same_kind(saved[k], own[k]) for k in own)
    return True


def _json_bytes(obj: Any) -> bytes:
    """Deterministic JSON bytes (ASCII, no NaN). Keys keep their order, so that a restored dict
    iterates like the saved one; the library's own sections are built in a fixed order."""
    return json_bytes(obj, indent=1, sort_keys=False, allow_nan=False)


_loadable = loadable  # (data, what, where, max_bytes, max_depth): refused before writing if a load would refuse it


# --------------------------------------------------------------------------- files


# storage's implementations, bound here under the names the crash-point tests patch
_fsync_dir = fsync_dir
_write_new = atomic_write_bytes  # a file of the temporary folder (sync_dir=False: the folder is fsynced once)
_replace_file = atomic_write_bytes  # latest.json: temporary file, fsync, os.replace, fsync of the run folder
_remove = remove_path


def _link_copy(src: Path, dst: Path) -> None:
    """A new folder ``dst`` holding the files of ``src`` as hard links (copies where links fail)."""
    _remove(dst)
    dst.mkdir()
    for entry in sorted(os.listdir(src)):
        s, d = src / entry, dst / entry
        try:
            os.link(s, d)
        except OSError:  # no hard links here: a copy, by storage's writer (the folder is fsynced below)
            with open(s, "rb") as f:
                atomic_write(d, iter(functools.partial(f.read, 1 << 20), b""), sync_dir=False)
    _fsync_dir(dst)


# --------------------------------------------------------------------------- argument checks


_check_int = check_int


def _check_names(objs: Mapping[str, Any], arg: str, kind: type | tuple[type, ...] | None = None) -> None:
    if not isinstance(objs, Mapping):
        raise TypeError(f"{arg} must be a mapping of names to objects, got {type(objs).__name__}")
    for name, obj in objs.items():
        if not is_plain_name(name):
            raise ValueError(
                f"{arg}: name {name!r} must be 1-100 characters of letters, digits, '_', '.' "
                "or '-', not starting with '.' or '-'"
            )
        if kind is not None and not isinstance(obj, kind):
            want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise TypeError(f"{arg}[{name!r}] is a {type(obj).__name__}, not a {want}")
        if kind is None and not (
            callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))
        ):
            raise TypeError(f"{arg}[{name!r}] ({type(obj).__name__}) has no state_dict/load_state_dict")


def _check_objects(modules: Any, optimizers: Any, schedulers: Any, generators: Any) -> None:
    """The named objects a save or a load is given (full and sharded)."""
    _check_names(modules, "modules", nn.Module)
    _check_names(optimizers, "optimizers", torch.optim.Optimizer)
    _check_names(schedulers, "schedulers")
    _check_names(generators, "generators", torch.Generator)


def _check_mapping(v: Any, arg: str) -> None:
    if not isinstance(v, Mapping):
        raise TypeError(f"{arg} must be a mapping, got {type(v).__name__}")


def _check_ranks(rank: int, world_size: int) -> None:
    _check_int(world_size, "world_size", 1)
    _check_int(rank, "rank", 0, world_size - 1)


def _check_save(
    step: int, keep: int, config: Any, extra: Any, rank: int = 0, world_size: int = 1, barrier: Any = None
) -> None:
    """A save's arguments but the named objects (full and sharded)."""
    _check_int(step, "step", 0, MAX_STEP)
    _check_int(keep, "keep", 1)
    _check_ranks(rank, world_size)
    if world_size > 1 and barrier is None:
        raise ValueError(f"world_size={world_size} needs barrier= (e.g. torch.distributed.barrier)")
    if barrier is not None and not callable(barrier):
        raise TypeError(f"barrier must be callable, got {type(barrier).__name__}")
    _check_mapping(config, "config")
    _check_mapping(extra, "extra")


# --------------------------------------------------------------------------- collecting a state


def _dotted(mname: str, module: nn.Module, pname: str) -> tuple[Any, ...]:
    return (f"{mname}.{pname}",)


def _param_names(
    modules: Mapping[str, nn.Module], name: Callable[[str, nn.Module, str], tuple[Any, ...]] = _dotted
) -> dict[int, tuple[Any, ...]]:
    """id(parameter) -> its name in the state (``name(module name, module, parameter name)``)."""
    names: dict[int, tuple[Any, ...]] = {}
    for mname, m in modules.items():
        for pname, p in m.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), name(mname, m, pname))
    return names


def _optimizer_params(
    opt: torch.optim.Optimizer, names: Mapping[int, tuple[Any, ...]], unnamed: tuple[None, ...] = (None,)
) -> list[list[Any]]:
    """Per parameter of the optimizer, in its order: [*its name (``unnamed`` for one of no module passed), shape]."""
    return [[*names.get(id(p), unnamed), list(p.shape)] for g in opt.param_groups for p in g["params"]]


def _module_tensors(name: str, module: nn.Module) -> dict[str, Tensor]:
    sd = module.state_dict()
    for k, v in sd.items():
        if not isinstance(v, Tensor):
            raise TypeError(f"modules[{name!r}]: state_dict entry {k!r} is a {type(v).__name__}, not a tensor")
    return dict(sd)


def _rng_state(
    generators: Mapping[str, torch.Generator], rank: int, world_size: int
) -> tuple[dict[str, Tensor], bytes]:
    """This process's RNG states: tensors (torch CPU, CUDA, named generators) and JSON bytes (numpy, Python)."""
    tensors = {"torch.cpu": torch.get_rng_state()}
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    for i, s in enumerate(cuda):
        tensors[f"torch.cuda.{i}"] = s
    for name, g in generators.items():
        tensors[f"generator.{name}"] = g.get_state()
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    info: dict[str, Any] = {
        "format": FORMAT + "-rng",
        "rank": rank,
        "world_size": world_size,
        "cuda_devices": len(cuda),
        "generators": {n: {"device": str(g.device)} for n, g in generators.items()},
        "python": {"version": version, "state": list(internal), "gauss_next": _encode(gauss, "gauss", None, "")},
        "numpy": {
            "bit_generator": kind,
            "keys": [int(k) for k in keys],
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": _encode(float(cached), "cached_gaussian", None, ""),
        },
    }
    data = _json_bytes(info)
    return tensors, _loadable(data, "the RNG file", f"of rank {rank}", MAX_RNG_JSON_BYTES, MAX_JSON_DEPTH)


def _common_sections(
    schedulers: Mapping[str, Any], extra: Mapping[str, Any], config: Mapping[str, Any], sink: dict[str, Tensor]
) -> dict[str, Any]:
    """The manifest's sections after its modules and optimizers (rank 0's, full and sharded): the
    schedulers' states and extra (their tensors into ``sink``), ``tensors_file``, the config and its hash."""
    return {
        "schedulers": {
            n: _encode(s.state_dict(), f"schedulers[{n!r}].state_dict()", sink, f"schedulers.{n}")
            for n, s in schedulers.items()
        },
        "extra": _encode(dict(extra), "extra", sink, "extra"),
        "tensors_file": EXTRA_FILE if sink else None,
        "config": _encode(dict(config), "config", None, ""),
        "config_hash": config_hash(config),
    }


def _payload(
    modules: Mapping[str, nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer],
    schedulers: Mapping[str, Any],
    extra: Mapping[str, Any],
    config: Mapping[str, Any],
) -> tuple[dict[str, dict[str, Tensor]], dict[str, Any]]:
    """What rank 0 writes: tensor files and the manifest's sections, collected before anything is written."""
    files: dict[str, dict[str, Tensor]] = {}
    sections: dict[str, Any] = {"modules": {}, "optimizers": {}}
    for name, m in modules.items():
        files[f"module-{name}.safetensors"] = _module_tensors(name, m)
        sections["modules"][name] = {"file": f"module-{name}.safetensors"}
    names = _param_names(modules)
    for name, opt in optimizers.items():
        fname = f"optimizer-{name}.safetensors"
        files[fname] = {}
        sd = _encode(opt.state_dict(), f"optimizers[{name!r}].state_dict()", files[fname], "")
        sections["optimizers"][name] = {"file": fname, "state_dict": sd, "params": _optimizer_params(opt, names)}
    sink: dict[str, Tensor] = {}
    sections.update(_common_sections(schedulers, extra, config, sink))
    if sink:
        files[EXTRA_FILE] = sink
    return files, sections


def _rank_files(ranks: Iterable[int]) -> list[str]:
    return [f"rng-rank{r}.{ext}" for r in ranks for ext in ("safetensors", "json")]


def _write_tensors(path: Path, tensors: Mapping[str, Tensor]) -> dict[str, Any]:
    return file_entry(path, save_tensors(path, tensors))


def _write_rank_files(tmp: Path, rank: int, tensors: Mapping[str, Tensor], data: bytes) -> dict[str, Any]:
    tname, jname = _rank_files([rank])
    return {
        tname: _write_tensors(tmp / tname, tensors),
        jname: file_entry(tmp / jname, _write_new(tmp / jname, data, sync_dir=False)),
    }


def _hashed(path: Path, what: str) -> dict[str, Any]:
    """A manifest's entry for a file written by another rank (or by DCP): ``{sha256, size}``."""
    return dict(zip(("sha256", "size"), sha256_stream(path, what)))


def _head(fmt: str, version: int, step: int, world_size: int, generators: Iterable[str]) -> dict[str, Any]:
    """A manifest's first fields (full and sharded)."""
    return {
        "format": fmt,
        "version": version,
        "step": step,
        "world_size": world_size,
        "library_version": _library_version(),
        "torch_version": str(torch.__version__),
        "generators": sorted(generators),
    }


def _manifest_bytes(head: Mapping[str, Any], sections: Mapping[str, Any], files: Mapping[str, Any]) -> bytes:
    """The manifest's bytes, its digest (sha256 of the canonical JSON of every other field) last;
    refused before it is written where the loader would refuse it (too large or too deep)."""
    m = {**head, **sections, "files": {k: files[k] for k in sorted(files)}}
    m["digest"] = body_digest(m)
    return _loadable(_json_bytes(m), "the manifest", "of this state", MAX_MANIFEST_BYTES, MAX_MANIFEST_DEPTH)


def _precheck(head: Mapping[str, Any], sections: Mapping[str, Any], names: Iterable[str]) -> None:
    """Refuse, before any write, a manifest the loader would refuse (too large or too deep): the same
    manifest with placeholder hashes and 20-digit sizes for ``names`` and every rank's RNG files is at
    least as large."""
    names = [*names, *_rank_files(range(head["world_size"]))]
    _manifest_bytes(head, sections, dict.fromkeys(names, {"sha256": "0" * 64, "size": 10**19}))


def _library_version() -> str:
    import disback_core

    return str(getattr(disback_core, "__version__", "unknown"))


# --------------------------------------------------------------------------- switching


def _step_name(step: int) -> str:
    return f"step-{step:09d}"


def _tmp_name(step: int, world_size: int) -> str:
    # Every rank must find the same folder without communicating: one name per world when ranks share it.
    return f".step-{step:09d}.tmp-" + (str(os.getpid()) if world_size == 1 else f"ws{world_size}")


def _write_pointer(folder: Path, directory: str, step: int, manifest_sha: str) -> None:
    d = {"format": POINTER_FORMAT, "version": VERSION, "step": step, "directory": directory}
    _replace_file(folder / LATEST, _json_bytes({**d, "manifest_sha256": manifest_sha}))


def _install(folder: Path, tmp: Path, step: int, manifest_sha: str) -> Path:
    """Make the complete folder ``tmp`` the live state ``folder/step-<step>``; ``latest.json`` names a
    complete folder at every moment."""
    final = folder / _step_name(step)
    if not os.path.lexists(final):
        os.rename(tmp, final)
        _fsync_dir(folder)
        _write_pointer(folder, final.name, step, manifest_sha)
        return final
    # A folder of this step exists (perhaps the live one): switch to the new state under its
    # temporary name first, then give it its name.
    _write_pointer(folder, tmp.name, step, manifest_sha)
    _move_in(folder, tmp, final, step, manifest_sha)
    return final


def _move_in(folder: Path, live: Path, final: Path, step: int, manifest_sha: str) -> None:
    """``latest.json`` names the complete temporary folder ``live``: move whatever has the name
    ``final`` aside, give ``live``'s files that name (hard links), switch to it, remove the rest."""
    old, staged = folder / f"{live.name}-old", folder / f"{live.name}-link"
    if os.path.lexists(final):
        _remove(old)
        os.rename(final, old)
    _link_copy(live, staged)
    os.rename(staged, final)
    _fsync_dir(folder)
    _write_pointer(folder, final.name, step, manifest_sha)
    _remove(old)
    _remove(live)


def _recover(folder: Path) -> None:
    """Finish a save that was interrupted after switching to a temporary folder (a re-save of a
    step), so that the state it made live keeps its step name and is not removed as a stray."""
    if not os.path.lexists(folder / LATEST):
        return
    try:
        live, sha = _read_pointer(folder)
    except StorageError:
        return  # a broken pointer: the new save replaces it
    m = _TMP_DIR.fullmatch(live.name)
    if m is not None:
        _move_in(folder, live, folder / _step_name(int(m.group(1))), int(m.group(1)), sha)


def _cleanup(folder: Path, step: int, keep: int, live: str) -> None:
    """Remove stray temporary folders and files, step folders after ``step`` (an abandoned future
    of a run resumed from an earlier state) and all but the ``keep`` newest up to ``step``."""
    steps, doomed = [], []
    for entry in os.scandir(folder):
        name = entry.name
        if name == live:
            continue
        # temporary files of a latest.json write: storage's, and this module's earlier ".latest.json.tmp-*"
        if _TMP_DIR.fullmatch(name) or temp_target(name) == LATEST or name.startswith(f".{LATEST}.tmp-"):
            doomed.append(folder / name)
        elif _STEP_DIR.fullmatch(name) and entry.is_dir(follow_symlinks=False):
            steps.append(int(name[5:]))
    kept = sorted((s for s in steps if s < step), reverse=True)[: keep - 1]
    for s in steps:
        if s not in kept:
            aside = folder / f".{_step_name(s)}.tmp-{os.getpid()}-old"
            _remove(aside)
            os.rename(folder / _step_name(s), aside)  # a step-* folder is complete or absent, never partial
            doomed.append(aside)
    if doomed:
        _fsync_dir(folder)
    for p in doomed:
        _remove(p)


def _make_tmp(folder: Path, tmp: Path) -> None:
    """Rank 0's start of a save (full and sharded): the run folder, an interrupted re-save finished, a
    fresh temporary folder."""
    folder.mkdir(parents=True, exist_ok=True)
    _recover(folder)
    _remove(tmp)
    tmp.mkdir()


def _finish(
    folder: Path, tmp: Path, step: int, keep: int, world_size: int, files: dict[str, Any], manifest: Callable[[], bytes]
) -> Path:
    """Rank 0's end of a save (full and sharded), after every rank wrote: the other ranks' RNG files
    hashed into ``files``, the manifest (``manifest()``) written, the folder fsynced and made live, old
    steps removed. A failure before the switch removes the temporary folder."""
    try:
        for r in range(1, world_size):
            for fname in _rank_files([r]):
                files[fname] = _hashed(tmp / fname, f"rank {r}'s RNG file")
        data = manifest()
        _write_new(tmp / MANIFEST, data, sync_dir=False)
        _fsync_dir(tmp)
    except BaseException:
        _remove(tmp)
        raise
    final = _install(folder, tmp, step, sha256_bytes(data))
    _cleanup(folder, step, keep, final.name)
    return final


def _sync(barrier: Callable[[], None] | None) -> None:
    if barrier is not None:
        barrier()


# --------------------------------------------------------------------------- save


def save_state(
    folder: str | os.PathLike,
    *,
    step: int,
    modules: Mapping[str, nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer] = {},
    schedulers: Mapping[str, Any] = {},
    generators: Mapping[str, torch.Generator] = {},
    extra: Mapping[str, Any] = {},
    config: Mapping[str, Any],
    keep: int = 3,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] | None = None,
) -> Path:
    """Save everything needed to continue a run as ``folder/step-<step:09d>/`` and switch
    ``folder/latest.json`` to it; returns that folder.

    Args:
        step: the iteration reached (0..999999999).
        modules: modules by name; each module's ``state_dict()`` (parameters and buffers) is saved.
        optimizers: optimizers by name: tensors to safetensors, ``param_groups`` and the rest to JSON,
            with the module-qualified name and shape of each parameter (checked on load).
        schedulers: LR schedulers (or any object with ``state_dict``/``load_state_dict``) by name;
            tensors in their state go to ``extra.safetensors``.
        generators: ``torch.Generator`` objects by name (a data sampler's: its state is the data position).
        extra: any JSON-able data (``Backtrack.state_dict()``, ``Attachment.state_dict()``, the epoch,
            the data index); tuples, non-string keys, non-finite floats and tensors are kept exactly.
        config: the run's configuration (JSON-able); a load with another configuration is refused.
        keep: how many step folders to keep (the newest up to this step); later steps are removed.
        rank, world_size: this process in a replicated (DDP) run. Every rank writes its own RNG files;
            rank 0 writes the rest (other ranks' modules, optimizers, ... are not read) and switches.
        barrier: required when ``world_size > 1`` (e.g. ``torch.distributed.barrier``); called three
            times: after rank 0 made the temporary folder, after every rank wrote, after the switch.

    The RNG state saved is this process's: torch CPU, CUDA (every device, if CUDA is available),
    numpy's global one and Python's ``random``. Saving consumes no random numbers. Not thread-safe:
    one saver per run folder.
    """
    folder = Path(folder)
    _check_save(step, keep, config, extra, rank, world_size, barrier)
    _check_names(generators, "generators", torch.Generator)
    payload: dict[str, dict[str, Tensor]] = {}
    if rank == 0:
        _check_objects(modules, optimizers, schedulers, {})
        payload, sections = _payload(modules, optimizers, schedulers, extra, config)  # refuses bad values first
        head = _head(FORMAT, VERSION, step, world_size, generators)
        _precheck(head, sections, payload)
    rng_tensors, rng_json = _rng_state(generators, rank, world_size)

    tmp = folder / _tmp_name(step, world_size)
    if rank == 0:
        _make_tmp(folder, tmp)
    _sync(barrier)
    final = folder / _step_name(step)
    try:
        files = _write_rank_files(tmp, rank, rng_tensors, rng_json)
        for fname, tensors in payload.items():
            files[fname] = _write_tensors(tmp / fname, tensors)
    except BaseException:
        if rank == 0:
            _remove(tmp)
        raise
    _sync(barrier)
    if rank == 0:
        final = _finish(folder, tmp, step, keep, world_size, files, lambda: _manifest_bytes(head, sections, files))
    _sync(barrier)
    return final


# --------------------------------------------------------------------------- finding a state


def _read_pointer(folder: Path) -> tuple[Path, str]:
    """The step folder ``latest.json`` names (checked: inside ``folder``, a real folder) and the
    manifest sha256 it records."""
    ptr = folder / LATEST
    d = read_json(ptr, "state pointer", MAX_POINTER_BYTES)
    check_format(d, f"state pointer {ptr}", POINTER_FORMAT, (VERSION,), "pointer")
    check_fields(d, {"format", "version", "step", "directory", "manifest_sha256"}, f"state pointer {ptr}", "it")
    name, step, sha = d["directory"], d["step"], d["manifest_sha256"]
    m = (_STEP_DIR.fullmatch(name) or _TMP_DIR.fullmatch(name)) if isinstance(name, str) else None
    if m is None:
        raise StorageError(f"state pointer {ptr} names {short(name)}, which is not a step folder inside {folder}")
    if type(step) is not int or step != int(m.group(1)):
        raise StorageError(f"state pointer {ptr}: step {short(step)} does not match its folder {name}")
    if not is_sha256(sha):
        raise StorageError(f"state pointer {ptr}: manifest_sha256 is not 64 hex digits")
    path = folder / name
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise StorageError(f"state pointer {ptr} names {path}, which does not exist") from None
    if not stat.S_ISDIR(st.st_mode):
        raise StorageError(f"state pointer {ptr} names {path}, which is not a folder (a symlink or a file)")
    return path, sha


def latest_state(folder: str | os.PathLike) -> Path | None:
    """The step folder ``folder/latest.json`` points at, or None when no state was saved there yet.
    A broken pointer is a :class:`StorageError` (files are not verified here: :func:`load_state` does)."""
    folder = Path(folder)
    if not os.path.lexists(folder / LATEST):
        return None
    return _read_pointer(folder)[0]


def list_states(folder: str | os.PathLike) -> list[int]:
    """Steps of the ``step-*`` folders in ``folder`` that hold a manifest, ascending (not verified)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(
        int(e.name[5:])
        for e in os.scandir(folder)
        if _STEP_DIR.fullmatch(e.name)
        and e.is_dir(follow_symlinks=False)
        and os.path.isfile(os.path.join(e.path, MANIFEST))
    )


def _resolve(folder: Path) -> tuple[Path, str | None]:
    """(step folder, expected manifest sha256 or None) for a run folder or a step folder."""
    if not folder.is_dir():
        raise StorageError(f"state folder {folder} does not exist or is not a folder")
    if os.path.lexists(folder / MANIFEST) or _STEP_DIR.fullmatch(folder.name) or _TMP_DIR.fullmatch(folder.name):
        return folder, None
    if not os.path.lexists(folder / LATEST):
        raise StorageError(f"state folder {folder} has no {LATEST} and no {MANIFEST}: no state was saved there")
    return _read_pointer(folder)


# --------------------------------------------------------------------------- reading a manifest


def _bad(path: Path, problem: str) -> StorageError:
    return StorageError(f"manifest {path}: {problem}")


def _want(cond: bool, path: Path, problem: str) -> None:
    if not cond:
        raise _bad(path, problem)


def _pointer_sha(step_dir: Path) -> str | None:
    """The manifest sha256 that the run folder's ``latest.json`` records, if it names ``step_dir``."""
    try:
        live, sha = _read_pointer(step_dir.parent)
    except StorageError:
        return None
    return sha if live.name == step_dir.name else None


_FIELDS = {"step": int, "world_size": int, "files": dict, "modules": dict, "optimizers": dict, "schedulers": dict}
_FIELDS.update({"generators": list, "config": dict, "config_hash": str})  # and their JSON types


def _manifest_json(step_dir: Path, expected_sha: str | None) -> tuple[bytes, Any]:
    """The bytes and parsed JSON of the manifest of ``step_dir`` (full or sharded), bounded, and
    checked against the sha256 ``latest.json`` records (``expected_sha``, when loaded through it)."""
    path = step_dir / MANIFEST
    if not os.path.lexists(path):
        raise StorageError(f"step folder {step_dir} has no {MANIFEST}: an incomplete or foreign save")
    data = read_bytes(path, "manifest", MAX_MANIFEST_BYTES)
    if expected_sha is not None and sha256_bytes(data) != expected_sha:
        raise _bad(path, f"fails the sha256 recorded in {LATEST}: it was modified or replaced")
    return data, parse_json(data, path, "manifest", MAX_MANIFEST_DEPTH, MAX_MANIFEST_BYTES)


def _read_manifest(step_dir: Path, expected_sha: str | None) -> dict[str, Any]:
    """The checked manifest of ``step_dir``: the sha256 ``latest.json`` records (``expected_sha``, when
    loaded through the run folder) and the manifest's own digest (always: a step folder loaded directly
    is verified like the live one); a manifest without a digest (saved before digests) only when
    ``latest.json`` names its folder and records its sha256."""
    path = step_dir / MANIFEST
    data, m = _manifest_json(step_dir, expected_sha)
    check_format(m, f"manifest {path}", FORMAT, (VERSION,))
    if "digest" in m:
        check_digest(m, f"manifest {path}")
    elif expected_sha is None and (known := _pointer_sha(step_dir)) is None:
        raise _bad(
            path,
            f"it has no digest (saved before states had one) and the run folder's {LATEST} does not name "
            f"{step_dir.name}: nothing can verify it (load the run folder while this is its latest state)",
        )
    elif expected_sha is None and sha256_bytes(data) != known:
        raise _bad(path, f"fails the sha256 recorded in {LATEST}: it was modified or replaced")
    _check_fields(m, path, step_dir, _FIELDS)
    _check_file_table(m, path)
    return m


def _check_fields(m: dict[str, Any], path: Path, step_dir: Path, fields: Mapping[str, type]) -> None:
    """The fields every state manifest shares (full and sharded): their JSON types, the step and world
    size in range and matching the folder's name, distinct generator names, ``tensors_file``."""
    for key, kind in fields.items():
        if type(m.get(key)) is not kind:
            raise _bad(path, f"{key!r} is missing or not a {kind.__name__}")
    if not (0 <= m["step"] <= MAX_STEP and 1 <= m["world_size"] <= len(m["files"]) // 2):
        raise _bad(path, "step or world_size out of range (every rank has two RNG files in the file table)")
    if not all(isinstance(g, str) for g in m["generators"]) or len(set(m["generators"])) != len(m["generators"]):
        raise _bad(path, "'generators' must be a list of distinct names")
    if not (m.get("tensors_file") is None or isinstance(m["tensors_file"], str)):
        raise _bad(path, "'tensors_file' must be a file name or null")
    match = _STEP_DIR.fullmatch(step_dir.name) or _TMP_DIR.fullmatch(step_dir.name)
    if match is not None and int(match.group(1)) != m["step"]:
        raise _bad(path, f"step {m['step']} does not match its folder's name")


def _check_file_table(m: dict[str, Any], path: Path) -> None:
    """The file table lists exactly the files the manifest's sections name and every rank's RNG files."""
    want = set(_rank_files(range(m["world_size"])))
    for section in ("modules", "optimizers"):
        for name, e in m[section].items():
            if not (isinstance(e, dict) and isinstance(e.get("file"), str)):
                raise _bad(path, f"{section}[{short(name)}] names no file")
            want.add(e["file"])
    if m.get("tensors_file") is not None:
        want.add(m["tensors_file"])
    if MANIFEST in want:
        raise _bad(path, f"a section names {MANIFEST} as its file")
    check_file_table(m["files"], want, f"manifest {path}")


def _verify_files(step_dir: Path, files: Mapping[str, Mapping[str, Any]]) -> None:
    """Every listed file: a regular file of the recorded size and sha256 (streamed)."""
    for name in sorted(files):
        verify_file(step_dir / name, files[name]["sha256"], files[name]["size"], "state file", "the manifest says")


# --------------------------------------------------------------------------- checking what is restored


def _config_diff(saved: Any, given: Any, path: str = "") -> list[str]:
    """Dotted keys where two encoded configs differ, with both values."""
    if isinstance(saved, dict) and isinstance(given, dict) and not (set(saved) & set(_TAGS)):
        out = []
        for k in sorted(set(saved) | set(given)):
            p = _join(path, k)
            if k not in given:
                out.append(f"{p} (only in the state)")
            elif k not in saved:
                out.append(f"{p} (only in the given config)")
            else:
                out += _config_diff(saved[k], given[k], p)
        return out
    if saved == given and type(saved) is type(given):
        return []
    return [f"{path or '<config>'}: {short(saved)} in the state, {short(given)} given"]


def _check_config(m: Mapping[str, Any], config: Mapping[str, Any], path: Path) -> None:
    _check_mapping(config, "config")
    given = _encode(dict(config), "config", None, "")
    given_hash = config_hash(config)
    if given == m["config"] and given_hash == m["config_hash"]:
        return
    diffs = _config_diff(m["config"], given) or ["no key differs: the config hash does"]
    more = f" (and {len(diffs) - 5} more)" if len(diffs) > 5 else ""
    raise StorageError(
        f"{path}: the state is from another run configuration (config hash {m['config_hash']} "
        f"in the state, {given_hash} given); differing keys: {'; '.join(diffs[:5])}{more}"
    )


def _check_world(m: Mapping[str, Any], rank: int, world_size: int, path: Path) -> None:
    if m["world_size"] != world_size:
        raise StorageError(
            f"{path}: the state was saved by a run of world size {m['world_size']}; this run has "
            f"world size {world_size}"
        )


def _check_sections(m: Mapping[str, Any], given: Mapping[str, Mapping[str, Any]], strict: bool, path: Path) -> None:
    """Everything passed must be in the state; with ``strict``, everything in the state must be passed."""
    for section, objs in given.items():
        saved = set(m[section])
        missing = sorted(set(objs) - saved)
        if missing:
            raise StorageError(
                f"{path}: {section} {missing[0]!r} is not in the state (it holds {short(sorted(saved))})"
            )
        unused = sorted(saved - set(objs))
        if strict and unused:
            raise StorageError(
                f"{path}: the state holds {section} {unused[0]!r}, which was not passed "
                "(pass it, or strict=False to leave it)"
            )


def _check_module(name: str, module: nn.Module, saved: Mapping[str, Tensor], file: Path) -> None:
    if problem := tensors_misfit(saved, module.state_dict(), exact_dtype=True):
        raise StorageError(f"{file}: module {name!r} does not fit the state: {problem}")


def _is_number(v: Any) -> bool:
    """A number (:func:`~disback_core.storage.is_number`) or a one-element finite floating tensor (torch takes tensor lrs)."""
    if is_number(v):
        return True
    return isinstance(v, Tensor) and v.numel() == 1 and v.is_floating_point() and bool(torch.isfinite(v).all())


def _is_pair(v: Any, item: Callable[[Any], bool] = _is_number) -> bool:
    return isinstance(v, (tuple, list)) and len(v) == 2 and all(item(x) for x in v)


# The types of the param_groups fields torch's optimizers use (a custom optimizer's other fields are
# taken as they are): refused on load rather than failing at the next step.
_GROUP_FIELDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    **dict.fromkeys(
        "lr initial_lr weight_decay momentum dampening alpha lr_decay rho lambd t0 momentum_decay "
        "initial_accumulator_value tolerance_grad tolerance_change beta2_decay d".split(),
        ("a finite number", _is_number),
    ),
    "eps": ("a finite number", _is_number),  # Adafactor's, a pair: see _check_groups
    **dict.fromkeys(("betas", "etas", "step_sizes"), ("a pair of finite numbers", _is_pair)),
    **dict.fromkeys(
        ("amsgrad", "maximize", "nesterov", "capturable", "differentiable", "centered", "decoupled_weight_decay"),
        ("a bool", lambda v: isinstance(v, bool)),
    ),
    **dict.fromkeys(("foreach", "fused"), ("a bool or null", lambda v: v is None or isinstance(v, bool))),
    **dict.fromkeys(("max_iter", "history_size"), ("an integer >= 1", lambda v: type(v) is int and v >= 1)),
    "max_eval": ("an integer >= 1 or null", lambda v: v is None or (type(v) is int and v >= 1)),
    "line_search_fn": ("a string or null", lambda v: v is None or isinstance(v, str)),
    "params": (
        "a list of parameter indices (integers >= 0)",
        lambda v: isinstance(v, list) and all(type(i) is int and i >= 0 for i in v),
    ),
    "param_names": ("a list of strings", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)),
}


def _check_groups(groups: list[Any], own: list[dict[str, Any]], where: str, owner: str) -> None:
    """Every param group an object of string keys whose known fields have their types (``own``: the
    optimizer's groups, for a field whose type depends on the optimizer), as many groups as ``own``,
    each with as many parameters (``owner`` names the optimizer in those messages)."""
    for i, g in enumerate(groups):
        if not isinstance(g, dict) or not all(isinstance(k, str) for k in g):
            raise StorageError(f"{where}: param_groups[{i}] is not an object of named fields")
        if "params" not in g:
            raise StorageError(f"{where}: param_groups[{i}] has no 'params'")
        pair_eps = i < len(own) and isinstance(own[i].get("eps"), (tuple, list))  # Adafactor: (eps1 or None, eps2)
        for key, v in g.items():
            want, ok = _GROUP_FIELDS.get(key, ("", None))
            if key == "eps" and pair_eps:
                want, ok = (
                    "a pair of finite numbers or nulls",
                    lambda v: _is_pair(v, lambda x: x is None or _is_number(x)),
                )
            if ok is not None and not ok(v):
                raise StorageError(f"{where}: param_groups[{i}].{key} is {short(v)}, not {want}")
    if len(groups) != len(own):
        raise StorageError(f"{owner}: {len(groups)} parameter groups in the state, {len(own)} here")
    for i, (g, og) in enumerate(zip(groups, own)):
        if len(g["params"]) != len(og["params"]):
            raise StorageError(
                f"{owner}: group {i} has {len(g['params'])} parameters in the state, {len(og['params'])} here"
            )


def _check_params(params: list[Any], here: list[Any], where: str, what: str) -> None:
    """The optimizer's parameters (``what`` of each) are those of the state, in its order."""
    if params != here:
        i = next((i for i, (a, b) in enumerate(zip(params, here)) if a != b), min(len(params), len(here)))
        a = params[i] if i < len(params) else None
        b = here[i] if i < len(here) else None
        raise StorageError(
            f"{where}: parameter {i} is {a} {what} in the state, {b} here: the optimizer "
            "holds other parameters or the same ones in another order"
        )


def _check_optimizer(
    name: str,
    opt: torch.optim.Optimizer,
    sd: Any,
    params: Any,
    names: Mapping[int, tuple[Any, ...]],
    file: Path,
    manifest: Path,
) -> None:
    where = f"{file}: optimizer {name!r}"
    if (
        not isinstance(sd, dict)
        or set(sd) != {"state", "param_groups"}
        or not isinstance(sd["state"], dict)
        or not isinstance(sd["param_groups"], list)
    ):
        raise StorageError(f"{where}: the saved state_dict is not an optimizer state (state, param_groups)")
    groups = sd["param_groups"]
    _check_groups(groups, opt.param_groups, f"{manifest}: optimizers[{name!r}].state_dict", where)
    if not isinstance(params, list) or not all(
        isinstance(e, list)
        and len(e) == 2
        and (e[0] is None or isinstance(e[0], str))
        and isinstance(e[1], list)
        and all(type(n) is int for n in e[1])
        for e in params
    ):
        raise StorageError(f"{where}: the saved parameter list is not [[name, shape], ...]")
    ids = [p for g in groups for p in g["params"]]
    if len(set(ids)) != len(ids) or not set(sd["state"]) <= set(ids):
        raise StorageError(f"{where}: the saved state names parameters its groups do not hold")
    shapes = dict(zip(ids, (e[1] for e in params))) if len(params) == len(ids) else {}
    for pid, entry in sd["state"].items():
        for key, t in entry.items() if isinstance(entry, dict) else ():
            if isinstance(t, Tensor) and t.ndim > 0 and (list(t.shape) != shapes.get(pid) or not t.is_floating_point()):
                raise StorageError(
                    f"{where}: state {pid}.{key} is {t.dtype} {list(t.shape)}; a parameter's state "
                    f"tensor is a scalar or floating with its shape {shapes.get(pid)}"
                )
    _check_params(params, _optimizer_params(opt, names), where, "(name, shape)")


def _check_scheduler(name: str, sched: Any, sd: Any, strict: bool, path: Path) -> None:
    if not isinstance(sd, dict):
        raise StorageError(f"{path}: scheduler {name!r}: the saved state is not an object")
    own = sched.state_dict()
    if strict and set(sd) != set(own):
        diff = sorted(set(sd) ^ set(own), key=repr)  # a forged state may hold non-string keys
        raise StorageError(
            f"{path}: scheduler {name!r} does not fit the state: key {short(diff[0])} is in only one of "
            "the state and this scheduler"
        )
    odd = sorted((k for k in set(sd) & set(own) if not _same_kind(sd[k], own[k])), key=repr)
    if odd:
        raise StorageError(
            f"{path}: scheduler {name!r}: {odd[0]!r} is {short(sd[odd[0]])} in "
            f"the state, which is not the kind of value this scheduler holds ({type(own[odd[0]]).__name__})"
        )


def _try_state(where: str, set_state: Callable[[], Any]) -> None:
    """Refuse an RNG state its generator would refuse (tried on a scratch one), before anything is restored."""
    try:
        set_state()
    except Exception as e:
        raise StorageError(f"{where} is not a valid state: {type(e).__name__}: {str(e)[:200]}") from None


def _words(v: Any, n: int) -> bool:
    """Whether ``v`` is a list of ``n`` unsigned 32-bit integers (a Mersenne Twister's state)."""
    return isinstance(v, list) and len(v) == n and all(type(x) is int and 0 <= x < 2**32 for x in v)


class _RankRng:
    """This rank's saved RNG states, checked."""

    def __init__(
        self,
        tensors: Mapping[str, Tensor],
        info: Any,
        rank: int,
        generators: Mapping[str, torch.Generator],
        strict: bool,
        tfile: Path,
        jfile: Path,
    ):
        if not isinstance(info, dict) or info.get("format") != FORMAT + "-rng" or type(info.get("rank")) is not int:
            raise StorageError(f"RNG file {jfile} is not rank {rank}'s RNG state")
        if info["rank"] != rank:
            raise StorageError(f"RNG file {jfile} is rank {info['rank']}'s RNG state, not rank {rank}'s")
        if "torch.cpu" not in tensors:
            raise StorageError(f"RNG file {tfile} holds no torch CPU RNG state")
        n, gens = info.get("cuda_devices"), info.get("generators")
        if type(n) is not int or not 0 <= n <= min(_MAX_CUDA_DEVICES, len(tensors)):  # before any list is built
            raise StorageError(
                f"RNG file {jfile}: cuda_devices is {short(n)}, not a device count 0..{_MAX_CUDA_DEVICES} "
                f"with a state in {tfile.name} for each"
            )
        if not isinstance(gens, dict) or not all(
            isinstance(g, dict) and set(g) == {"device"} and isinstance(g["device"], str) for g in gens.values()
        ):
            raise StorageError(f"RNG file {jfile}: 'generators' is not an object of {{name: {{device}}}}")
        want = {"torch.cpu", *(f"torch.cuda.{i}" for i in range(n)), *(f"generator.{g}" for g in gens)}
        if set(tensors) != want:
            odd = sorted(set(tensors) ^ want)[0]
            raise StorageError(f"RNG file {tfile}: tensor {short(odd)} is in only one of the file and {jfile.name}")
        self.cpu = tensors["torch.cpu"]
        _try_state(f"RNG file {tfile}: torch.cpu", lambda: torch.Generator().set_state(self.cpu))
        self.cuda = [tensors[f"torch.cuda.{i}"] for i in range(n)]
        here = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n != here:
            if strict:
                raise StorageError(
                    f"RNG file {tfile} holds the CUDA RNG states of {n} devices; this process sees "
                    f"{here} (strict=False skips restoring them)"
                )
            self.cuda = []
        self.generators = {}
        for name, g in generators.items():
            t = tensors.get(f"generator.{name}")
            if t is None or name not in gens:
                raise StorageError(f"RNG file {tfile} holds no state for generator {name!r}")
            dev = gens[name]["device"]
            if dev != str(g.device):
                raise StorageError(
                    f"RNG file {jfile}: generator {name!r} was on {short(dev)}, this one is on {g.device}"
                )
            _try_state(
                f"RNG file {tfile}: generator {name!r}",
                functools.partial(torch.Generator(device=g.device).set_state, t),
            )
            self.generators[name] = t
        self.python = self._python(info.get("python"), jfile)
        self.numpy = self._numpy(info.get("numpy"), jfile)

    @staticmethod
    def _python(d: Any, jfile: Path) -> Any:
        where = f"RNG file {jfile}: the Python random state"
        if (
            not isinstance(d, dict)
            or set(d) != {"version", "state", "gauss_next"}
            or d["version"] != 3  # what random.getstate() gives
            or type(d["version"]) is not int
            or not _words(d["state"], 625)  # 624 words and a position
        ):
            raise StorageError(f"{where} is not {{version: 3, state: 625 integers, gauss_next}}")
        gauss = _decode(d["gauss_next"], {}, f"{where}: gauss_next")
        if gauss is not None and type(gauss) is not float:
            raise StorageError(f"{where}: gauss_next is {short(gauss)}, not a float or null")
        st = (d["version"], tuple(d["state"]), gauss)
        _try_state(where, lambda: random.Random().setstate(st))
        return st

    @staticmethod
    def _numpy(d: Any, jfile: Path) -> Any:
        if d is None:  # saved where numpy could not be imported
            return None
        where = f"RNG file {jfile}: the numpy RNG state"
        if (
            not isinstance(d, dict)
            or set(d) != {"bit_generator", "keys", "pos", "has_gauss", "cached_gaussian"}
            or d["bit_generator"] != "MT19937"
            or not _words(d["keys"], 624)
            or type(d["pos"]) is not int
            or not 0 <= d["pos"] <= 624
            or d["has_gauss"] not in (0, 1)
            or type(d["has_gauss"]) is not int
        ):
            raise StorageError(
                f"{where} is not {{bit_generator: MT19937, keys: 624 integers < 2**32, pos: 0..624, "
                "has_gauss: 0 or 1, cached_gaussian}"
            )
        cached = _decode(d["cached_gaussian"], {}, f"{where}: cached_gaussian")
        if type(cached) not in (int, float):
            raise StorageError(f"{where}: cached_gaussian is {short(cached)}, not a number")
        st = (d["bit_generator"], np.array(d["keys"], dtype=np.uint32), d["pos"], d["has_gauss"], float(cached))
        _try_state(where, lambda: np.random.RandomState().set_state(st))
        return st

    def restore(self, generators: Mapping[str, torch.Generator]) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda:
            torch.cuda.set_rng_state_all(self.cuda)
        for name, t in self.generators.items():
            generators[name].set_state(t)
        random.setstate(self.python)
        if self.numpy is not None:
            np.random.set_state(self.numpy)


def _all_used(tensors: Mapping[str, Tensor], refs: set[str], path: Path) -> None:
    """A tensor file holds exactly the tensors its manifest entry refers to (none ignored, none missing)."""
    extra, missing = sorted(set(tensors) - refs), sorted(refs - set(tensors))
    if extra or missing:
        what = f"tensor {extra[0]!r} is referred to by nothing" if extra else f"tensor {missing[0]!r} is missing"
        raise StorageError(f"state file {path}: {what}")


def _load(step_dir: Path, files: Mapping[str, Any], fname: str) -> dict[str, Tensor]:
    """The tensors of a file of the state, checked against its entry in the file table."""
    return load_tensors(step_dir / fname, sha256=files[fname]["sha256"], max_bytes=files[fname]["size"])


def _schedulers_and_extra(
    m: Mapping[str, Any],
    step_dir: Path,
    schedulers: Mapping[str, Any],
    shared: Mapping[str, Tensor],
    used: set[str],
    strict: bool,
) -> tuple[dict[str, Any], Any]:
    """The schedulers' states to restore and extra, decoded (their tensors from ``shared``, the tensors
    file) and checked; the tensors file must hold exactly the tensors referred to (``used``: those of
    the sections not restored)."""
    mpath = step_dir / MANIFEST
    states = {}
    for name, sched in schedulers.items():
        states[name] = _decode(m["schedulers"][name], shared, f"{mpath}: schedulers[{name!r}]", used)
        _check_scheduler(name, sched, states[name], strict, mpath)
    extra = _decode(m.get("extra", {}), shared, f"{mpath}: extra", used)
    if m.get("tensors_file"):
        _all_used(shared, used, step_dir / m["tensors_file"])
    return states, extra


def _rank_rng(
    step_dir: Path, files: Mapping[str, Any], rank: int, generators: Mapping[str, torch.Generator], strict: bool
) -> _RankRng:
    tname, jname = _rank_files([rank])
    info = read_json(step_dir / jname, "RNG file", MAX_RNG_JSON_BYTES, sha256=files[jname]["sha256"])
    return _RankRng(_load(step_dir, files, tname), info, rank, generators, strict, step_dir / tname, step_dir / jname)


def _load_each(
    objs: Mapping[str, Any], states: Mapping[str, Any], load: Callable[[Any, Any], Any] | None = None
) -> None:
    load = load or (lambda obj, state: obj.load_state_dict(state))
    for name, obj in objs.items():
        load(obj, states[name])


def _restore(step_dir: Path, steps: Mapping[str, Callable[[], Any]]) -> None:
    """Run the restoring ``steps`` (keyed by what each restores) once every check passed; a failure is
    a StorageError naming what was being restored."""
    for where, run in steps.items():
        try:
            run()
        except Exception as e:
            raise StorageError(
                f"{step_dir}: restoring the {where} failed after every check passed; the objects may be "
                f"partly restored: {type(e).__name__}: {str(e)[:300]}"
            ) from e


# --------------------------------------------------------------------------- load


def load_state(
    folder: str | os.PathLike,
    *,
    modules: Mapping[str, nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer] = {},
    schedulers: Mapping[str, Any] = {},
    generators: Mapping[str, torch.Generator] = {},
    config: Mapping[str, Any],
    rank: int = 0,
    world_size: int = 1,
    strict: bool = True,
) -> dict[str, Any]:
    """Restore a state saved by :func:`save_state` into the given objects, in place; returns
    ``{"step": int, "extra": ..., "path": Path}``.

    ``folder`` is a run folder (its ``latest.json`` is followed) or one step folder. Before anything is
    written: the manifest (against the sha256 in ``latest.json``), every file's size and sha256,
    ``config`` (its hash and content: a differing key is named), ``world_size``, this rank's RNG file,
    and that every module's keys, shapes and dtypes and every optimizer's groups and parameters (names
    and shapes) fit. Then modules (``load_state_dict(strict=True)``: the same parameter objects, so
    optimizers stay valid), optimizers (tensors moved to each parameter's device by torch),
    schedulers, generators and this rank's RNG states (torch CPU, CUDA, numpy, Python) are restored.

    With ``strict`` (default) everything in the state must be passed, the schedulers' state keys must
    match, and the CUDA RNG states must be for as many devices as this process sees; with
    ``strict=False`` what is not passed is left, and CUDA RNG states that do not fit are skipped.
    Everything passed must be in the state. Every problem is a :class:`StorageError`.
    """
    _check_ranks(rank, world_size)
    _check_objects(modules, optimizers, schedulers, generators)
    step_dir, expected_sha = _resolve(Path(folder))
    m = _read_manifest(step_dir, expected_sha)
    mpath = step_dir / MANIFEST
    _check_config(m, config, mpath)
    _check_world(m, rank, world_size, mpath)
    given = {"modules": modules, "optimizers": optimizers, "schedulers": schedulers, "generators": generators}
    _check_sections(m, given, strict, mpath)
    files = m["files"]
    _verify_files(step_dir, files)
    mod_states = {}
    for name, module in modules.items():
        fname = m["modules"][name]["file"]
        mod_states[name] = _load(step_dir, files, fname)
        _check_module(name, module, mod_states[name], step_dir / fname)
    names = _param_names(modules)
    opt_states = {}
    for name, opt in optimizers.items():
        e = m["optimizers"][name]
        fname = e["file"]
        tensors = _load(step_dir, files, fname)
        used: set[str] = set()
        sd = _decode(e.get("state_dict"), tensors, f"{mpath}: optimizers[{name!r}]", used)
        _all_used(tensors, used, step_dir / fname)
        _check_optimizer(name, opt, sd, e.get("params"), names, step_dir / fname, mpath)
        opt_states[name] = sd
    shared = _load(step_dir, files, m["tensors_file"]) if m.get("tensors_file") else {}
    used = _tensor_refs([v for k, v in m["schedulers"].items() if k not in schedulers])  # those not restored
    sched_states, extra = _schedulers_and_extra(m, step_dir, schedulers, shared, used, strict)
    rng = _rank_rng(step_dir, files, rank, generators, strict)
    _restore(
        step_dir,
        {
            "modules": lambda: _load_each(modules, mod_states),  # strictly: the same parameter objects
            "optimizers": lambda: _load_each(optimizers, opt_states),
            "schedulers": lambda: _load_each(schedulers, sched_states),
            "RNG states": lambda: rng.restore(generators),
        },
    )
    return {"step": m["step"], "extra": extra, "path": step_dir}
