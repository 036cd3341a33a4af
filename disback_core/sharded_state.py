"""Sharded training states for FSDP2 runs: every rank writes its own shards through
``torch.distributed.checkpoint`` (DCP) with its HuggingFace safetensors storage, and a state saved
at one world size loads at another (:func:`save_sharded_state`, :func:`load_sharded_state`). No
pickle is read: tensors are safetensors files, everything else JSON.

On disk, one run folder, laid out like :mod:`disback_core.state`'s (and switched by the same
``latest.json``)::

    latest.json                     the switch: {"directory": "step-000001200", "manifest_sha256": ...}
    step-000001000/                 the previous states (the last ``keep`` are kept)
    step-000001200/
        manifest.json               format "disback-sharded-state", version, step, world size, config
                                    and its hash, library and torch versions, each module's tensors
                                    (name, dtype, global shape), each optimizer's parameters (module,
                                    name, shape), param_groups and non-tensor state, the schedulers'
                                    state, extra, the shard files, every file's sha256 and size, and
                                    digest: the sha256 of the canonical JSON of every other field
        shard-<r+1>-model-00001-of-00001.safetensors   rank r's shards, written by DCP's
                                    ``HuggingFaceStorageWriter(save_distributed=True)``: each local
                                    shard of every module and optimizer tensor under its key
                                    (``module/<name>/<fqn>``, ``optimizer/<name>/<index>/<key>``),
                                    its offset in the global tensor in the file's ``DCP_SHARDING_INFO``
                                    metadata; a tensor that is not sharded (a buffer, Adam's ``step``)
                                    is written once, by one rank; a rank with nothing to write has no file
        extra.safetensors           tensors found in schedulers' states, extra or optimizers' groups
        rng-rank<r>.safetensors     per rank: torch CPU RNG, CUDA RNG of every device, named generators
        rng-rank<r>.json            per rank: numpy's global RNG and Python's ``random`` state

DCP writes no index or metadata file of its own here (``save_distributed=True`` without
consolidation writes only the shard files; DCP's pickled ``.metadata`` is never written), so the
manifest lists every file of the step folder; a save refuses to switch to a folder holding anything
else.

Promises, as for :func:`~disback_core.state.save_state`: a save writes into a temporary sibling
folder; every rank writes its RNG files and its shards (fsynced); after every rank has finished
(DCP's own collective and then a barrier), rank 0 hashes every file, checks that the shards read
back (each tensor of the manifest tiled exactly by its chunks), writes the manifest, fsyncs the
folder and makes it live through ``latest.json`` (state.py's ``_install``: temporary file, fsync,
``os.replace``); then the step folders beyond the last ``keep`` are removed; a final barrier returns
on every rank. A killed save leaves the previous state live. A load checks, on every rank, the
manifest (the sha256 ``latest.json`` records and its own digest), every file's size and sha256,
every shard's header and sharding information, the configuration (a differing key is named), the
names, shapes and dtypes of everything restored; the ranks then agree (one all-reduce) so that
either every rank goes on or every rank raises; only then are the tensors read (into fresh
buffers), and only after every rank read them are modules, optimizers, schedulers, generators and
RNGs written. Every problem is a :class:`~disback_core.storage.StorageError` naming the file.
Collective: every rank calls both functions, with the same arguments but for its own objects, and
the run folder is on a file system every rank shares. Without a process group they work in one
process (world size 1) on plain modules. Nothing pickled is written or read: DCP's own ``.metadata``
file is never made, the shard index is rebuilt from the verified safetensors headers, and a load
plans each rank's reads locally (``no_dist=True``: no object collective); a save lets DCP exchange
its write plans between the ranks with torch.distributed's object collectives (in memory, between
the run's own processes).

Resharding: the manifest records global shapes and every shard file its chunks' offsets, so a load
builds DCP's metadata from them, allocates each tensor as the loading module holds it (a DTensor
sharded like its FSDP2 parameter, or a plain tensor) and lets DCP's planner read, from every shard
that overlaps it, exactly the slices this rank needs. So a state saved by FSDP2 at world size 2
loads into plain modules at world size 1 and the other way round, bit for bit. A module whose
shapes differ from the state's is refused before anything is read. RNG states are per rank: they
are restored only when the world size is the one saved (``"rng_restored"`` in the result says
whether); named generators passed under another world size are refused (``strict=False`` leaves
them).

Prefer gathered full states (:func:`disback_core.distributed.full_state_to` and
:func:`~disback_core.state.save_state`) for models that fit in one process's memory: one file per
module, the same bytes for the same state, a format any tool reads, no shard bookkeeping. Prefer
sharded states when gathering is too slow or too large (no rank gathers the model: each writes its
own shards, and a load allocates only what the loading rank holds), or when a run is resumed at
another world size.

Files are not byte-reproducible here (the ``safetensors`` package orders metadata at random), and
every rank hashes every file of the state on load (the whole state is read once per rank). A DTensor
anywhere but in a module's state dict or at the first level of an optimizer's per-parameter state
is refused; tensors in schedulers' states, ``extra`` and param_groups are rank 0's, saved whole.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .state import (
    _FIELDS,
    EXTRA_FILE,
    MANIFEST,
    _check_config,
    _check_fields,
    _check_groups,
    _check_objects,
    _check_params,
    _check_save,
    _check_sections,
    _common_sections,
    _decode,
    _encode,
    _finish,
    _hashed,
    _head,
    _load,
    _load_each,
    _make_tmp,
    _manifest_bytes,
    _manifest_json,
    _optimizer_params,
    _param_names,
    _precheck,
    _rank_files,
    _rank_rng,
    _resolve,
    _restore,
    _rng_state,
    _schedulers_and_extra,
    _short,
    _step_name,
    _tensor_refs,
    _tmp_name,
    _verify_files,
    _want,
    _write_rank_files,
    _write_tensors,
)
from .state import FORMAT as FULL_FORMAT
from .storage import (
    DTYPES,
    MAX_JSON_DEPTH,
    StorageError,
    body_digest,
    check_file_table,
    dtype_name,
    is_sha256,
    parse_json,
    read_tensor_header,
)

if TYPE_CHECKING:
    from torch.distributed.checkpoint.metadata import Metadata

__all__ = ["save_sharded_state", "load_sharded_state", "FORMAT", "VERSION"]

FORMAT = "disback-sharded-state"
VERSION = 1
SHARD_FILE = re.compile(r"shard-\d{5}-model-\d{5}-of-\d{5}\.safetensors")
_SHARDING_INFO = "DCP_SHARDING_INFO"  # the shard files' metadata key (torch.distributed.checkpoint._hf_utils)
_OFFSETS = "saved_offsets"
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_NDIM = 64


# --------------------------------------------------------------------------- ranks


def _world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextlib.contextmanager
def _together(world: int, other: str | Callable[[], str]) -> Iterator[None]:
    """Collective (one tiny all-reduce) at the end of the block: raise on every rank when any rank's
    block failed. A rank that failed raises its own error; the others a :class:`StorageError` saying
    ``other`` (or what it returns, when it depends on the block)."""
    err: Exception | None = None
    try:
        yield
    except Exception as e:
        err = e
    failed = err is not None
    if world > 1:
        from .distributed import any_rank

        failed = any_rank(failed)
    if err is not None:
        raise err
    if failed:
        raise StorageError(other if isinstance(other, str) else other())


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """DCP warns that it assumes one process whenever no process group is up: expected here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


# --------------------------------------------------------------------------- collecting a state


def _spec(t: Tensor, where: str) -> list[Any]:
    """[safetensors dtype name, global shape] of a tensor (a DTensor's shape is its global shape)."""
    return [dtype_name(t, where, TypeError), list(t.shape)]


def _fqn(mname: str, module: nn.Module, pname: str) -> tuple[str, str]:
    """(module name, the parameter's name in the module's state dict)."""
    from torch.distributed.checkpoint.state_dict import _get_fqns

    fqns = _get_fqns(module, pname)  # without DDP's "module." and torch.compile's "_orig_mod." prefixes
    return mname, next(iter(fqns)) if len(fqns) == 1 else pname


def _module_key(name: str, fqn: str) -> str:
    return f"module/{name}/{fqn}"


def _optimizer_key(name: str, index: int, key: str) -> str:
    return f"optimizer/{name}/{index}/{key}"


class _Collected:
    """This rank's part of a state: the tensors DCP writes (local shards of DTensors, plain tensors)
    and the manifest's module and optimizer sections (global shapes)."""

    def __init__(
        self, modules: Mapping[str, nn.Module], optimizers: Mapping[str, torch.optim.Optimizer], sink: dict[str, Tensor]
    ):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        self.tensors: dict[str, Tensor] = {}
        self._storages: set[int] = set()
        self.modules: dict[str, Any] = {}
        self.optimizers: dict[str, Any] = {}
        for name, module in modules.items():
            table = {}
            for fqn, v in get_model_state_dict(module).items():
                where = f"modules[{name!r}] entry {fqn!r}"
                if not isinstance(v, Tensor):
                    raise TypeError(f"{where} is a {type(v).__name__}, not a tensor")
                self._put(_module_key(name, fqn), v, where)
                table[fqn] = _spec(v, where)
            self.modules[name] = {"tensors": table}
        names = _param_names(modules, _fqn)
        for name, opt in optimizers.items():
            sd = opt.state_dict()
            params = _optimizer_params(opt, names, (None, None))
            where = f"optimizers[{name!r}].state_dict()"
            groups = _encode(sd["param_groups"], f"{where}['param_groups']", sink, f"optimizers.{name}.param_groups")
            state: dict[str, Any] = {}
            for i, entry in sd["state"].items():
                if type(i) is not int or not 0 <= i < len(params) or not isinstance(entry, Mapping):
                    raise TypeError(f"{where}: state {i!r} is not a parameter index's state")
                tensors, values = {}, {}
                for k, v in entry.items():
                    if not isinstance(k, str) or not k:
                        raise TypeError(f"{where}: state {i} key {k!r} is not a non-empty string")
                    if isinstance(v, Tensor):
                        self._put(_optimizer_key(name, i, k), v, f"{where}['state'][{i}][{k!r}]")
                        tensors[k] = _spec(v, f"{where}['state'][{i}][{k!r}]")
                    else:
                        values[k] = v
                state[str(i)] = {
                    "tensors": tensors,
                    "values": _encode(values, f"{where}['state'][{i}]", sink, f"optimizers.{name}.state.{i}"),
                }
            self.optimizers[name] = {"params": params, "param_groups": groups, "state": state}

    def _put(self, key: str, t: Tensor, where: str) -> None:
        if key in self.tensors:
            raise ValueError(f"{where}: key {key!r} is taken twice")
        local = t.to_local() if hasattr(t, "to_local") else t  # a DTensor's shard
        if local.numel():
            # a safetensors file holds no two tensors sharing memory (tied weights) and no strided view
            ptr = local.untyped_storage().data_ptr()
            if ptr in self._storages or not local.is_contiguous():
                t = t.detach().clone(memory_format=torch.contiguous_format)
            self._storages.add(ptr)
        self.tensors[key] = t


# --------------------------------------------------------------------------- save


def save_sharded_state(
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
) -> Path:
    """Save everything needed to continue a (sharded) run as ``folder/step-<step:09d>/`` and switch
    ``folder/latest.json`` to it; returns that folder. Collective: every rank of the default process
    group calls it (without one: a single process).

    Args:
        step: the iteration reached (0..999999999); the same on every rank.
        modules: modules by name, FSDP2 (``fully_shard``) or plain; each rank's shards of their
            ``get_model_state_dict`` (parameters and buffers, global names) are written by DCP.
        optimizers: optimizers by name (``torch.optim``): each rank's shards of their state tensors
            through DCP; ``param_groups`` and non-tensor state to the manifest, with the module, name
            and global shape of each parameter (checked on load).
        schedulers: LR schedulers (or any object with ``state_dict``/``load_state_dict``) by name.
        generators: ``torch.Generator`` objects by name (per rank, like the RNG states).
        extra: any JSON-able data; tuples, non-string keys, non-finite floats and tensors are kept exactly.
        config: the run's configuration (JSON-able); a load with another configuration is refused.
        keep: how many step folders to keep (the newest up to this step); later steps are removed.

    Rank 0's schedulers, extra and config are written (the other ranks' are not read). The RNG state
    saved is each rank's: torch CPU, CUDA (if available), numpy's global one, Python's ``random``.
    Saving consumes no random numbers and does not change the optimizers (no state is initialised).
    A rank that refuses the state (a bad argument, a value that cannot be saved) makes every rank
    raise before anything is written. The run folder must be on a file system all ranks share.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    folder = Path(folder)
    rank, world = _world()
    refused = f"another rank refused to save step {step!r} in {folder} (its own error says why); nothing was saved"
    with _together(world, refused):
        _check_save(step, keep, config, extra)
        _check_objects(modules, optimizers, schedulers, generators)
        sink: dict[str, Tensor] = {}
        got = _Collected(modules, optimizers, sink)  # refuses bad values before any write
        sections: dict[str, Any] = {"modules": got.modules, "optimizers": got.optimizers}
        for key, t in sink.items():
            if hasattr(t, "to_local"):
                raise TypeError(
                    f"{key} is a DTensor nested inside a value; only modules' tensors and an optimizer's "
                    "per-parameter state tensors are saved sharded"
                )
        if rank == 0:
            sections.update(_common_sections(schedulers, extra, config, sink))
            shards = [f"shard-{r + 1:05d}-model-00001-of-00001.safetensors" for r in range(world)]  # one per rank
            head = _head(FORMAT, VERSION, step, world, generators)
            _precheck(head, {**sections, "shards": shards}, [*shards, EXTRA_FILE])
        rng_tensors, rng_json = _rng_state(generators, rank, world)
        if world > 1:  # every rank saves the same step
            from .distributed import max_over_ranks

            if max_over_ranks([step, -step, keep, -keep], torch.int64) != [step, -step, keep, -keep]:
                raise ValueError(f"step={step} and keep={keep} are not the same on every rank")

    tmp = folder / _tmp_name(step, world)
    with _together(world, f"rank 0 could not make {tmp} (its own error says why); nothing was saved"):
        if rank == 0:
            _make_tmp(folder, tmp)
    with _together(world, f"another rank could not write its files into {tmp}; nothing was switched to"):
        files = _write_rank_files(tmp, rank, rng_tensors, rng_json)
        if rank == 0 and sink:
            files[EXTRA_FILE] = _write_tensors(tmp / EXTRA_FILE, sink)
    with _together(world, f"another rank could not write its shards into {tmp}; nothing was switched to"), _quiet():
        writer = HuggingFaceStorageWriter(str(tmp), save_distributed=True)
        dcp.save(got.tensors, storage_writer=writer, no_dist=world == 1)

    def manifest() -> bytes:  # after the other ranks' RNG files are in ``files``
        shards = sorted(n for n in os.listdir(tmp) if SHARD_FILE.fullmatch(n))
        for n in shards:
            files[n] = _hashed(tmp / n, "shard file")
        odd = sorted(set(os.listdir(tmp)) - set(files))
        if odd:
            raise StorageError(f"{tmp} holds {odd[0]!r}, which is no file of this state: nothing was switched to")
        _shard_metadata(tmp, shards, _tensor_table(sections, tmp / MANIFEST))  # the shards read back
        return _manifest_bytes(head, {**sections, "shards": shards}, files)

    final = folder / _step_name(step)
    with _together(world, f"rank 0 could not finish the save of {final} (its own error says why)"):
        if rank == 0:
            final = _finish(folder, tmp, step, keep, world, files, manifest)
    return final


# --------------------------------------------------------------------------- reading a manifest


def _is_spec(v: Any) -> bool:
    return (
        isinstance(v, list)
        and len(v) == 2
        and v[0] in DTYPES
        and isinstance(v[1], list)
        and len(v[1]) <= _MAX_NDIM
        and all(type(n) is int and n >= 0 for n in v[1])
    )


def _is_param(v: Any) -> bool:
    return (
        isinstance(v, list)
        and len(v) == 3
        and (v[0] is None or isinstance(v[0], str))
        and (v[1] is None or isinstance(v[1], str))
        and isinstance(v[2], list)
        and all(type(n) is int and n >= 0 for n in v[2])
    )


def _tensor_table(m: Mapping[str, Any], path: Path) -> dict[str, tuple[str, list[int]]]:
    """Every tensor the shards must hold, by key: (dtype name, global shape); checks the manifest's
    module and optimizer sections on the way."""
    table: dict[str, tuple[str, list[int]]] = {}
    for name, e in m["modules"].items():
        _want(
            isinstance(e, dict) and set(e) == {"tensors"} and isinstance(e["tensors"], dict),
            path,
            f"modules[{_short(name)}] is not {{tensors: {{name: [dtype, shape]}}}}",
        )
        for fqn, spec in e["tensors"].items():
            _want(_is_spec(spec), path, f"modules[{_short(name)}] tensor {_short(fqn)} is not [dtype, shape]")
            table[_module_key(name, fqn)] = (spec[0], spec[1])
    for name, e in m["optimizers"].items():
        _want(
            isinstance(e, dict)
            and set(e) == {"params", "param_groups", "state"}
            and isinstance(e["params"], list)
            and isinstance(e["state"], dict),
            path,
            f"optimizers[{_short(name)}] is not {{params, param_groups, state}}",
        )
        _want(
            all(_is_param(p) for p in e["params"]),
            path,
            f"optimizers[{_short(name)}].params is not [[module, name, shape], ...]",
        )
        for si, se in e["state"].items():
            _want(
                isinstance(si, str) and si.isdigit() and si == str(int(si)) and int(si) < len(e["params"]),
                path,
                f"optimizers[{_short(name)}].state key {_short(si)} is not a parameter index",
            )
            _want(
                isinstance(se, dict)
                and set(se) == {"tensors", "values"}
                and isinstance(se["tensors"], dict)
                and all(isinstance(k, str) and k and _is_spec(v) for k, v in se["tensors"].items()),
                path,
                f"optimizers[{_short(name)}].state[{si}] is not {{tensors: {{key: [dtype, shape]}}, values}}",
            )
            for k, spec in se["tensors"].items():
                table[_optimizer_key(name, int(si), k)] = (spec[0], spec[1])
    return table


def _read_manifest(step_dir: Path, expected_sha: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The checked manifest of ``step_dir`` (against the sha256 ``latest.json`` records, when loaded
    through the run folder, and always against its own digest) and its tensor table."""
    path = step_dir / MANIFEST
    m = _manifest_json(step_dir, expected_sha)[1]
    fmt = m.get("format") if isinstance(m, dict) else None
    hint = " (a gathered full state: load it with disback_core.state.load_state)" if fmt == FULL_FORMAT else ""
    _want(isinstance(m, dict) and fmt == FORMAT, path, f"not a {FORMAT} manifest{hint}")
    _want(
        type(m.get("version")) is int and m.get("version") == VERSION,
        path,
        f"format version {_short(m.get('version'))}; this library reads {VERSION}",
    )
    _want(
        is_sha256(m.get("digest")) and m["digest"] == body_digest(m),
        path,
        "its digest does not match its content: it was modified",
    )
    _check_fields(m, path, step_dir, {**_FIELDS, "shards": list})
    _want(m.get("tensors_file") in (None, EXTRA_FILE), path, f"'tensors_file' must be {EXTRA_FILE!r} or null")
    shards = m["shards"]
    _want(
        all(isinstance(s, str) and SHARD_FILE.fullmatch(s) for s in shards)
        and len(set(shards)) == len(shards)
        and len(shards) <= m["world_size"],
        path,
        "'shards' must be distinct shard file names, at most one per rank",
    )
    want = [*_rank_files(range(m["world_size"])), *shards, *([m["tensors_file"]] if m.get("tensors_file") else [])]
    check_file_table(m["files"], want, f"manifest {path}")
    return m, _tensor_table(m, path)


# --------------------------------------------------------------------------- reading the shards


def _overlap(a: tuple[tuple[int, ...], tuple[int, ...]], b: tuple[tuple[int, ...], tuple[int, ...]]) -> bool:
    return all(ao < bo + bs and bo < ao + as_ for ao, as_, bo, bs in zip(a[0], a[1], b[0], b[1]))


def _tiling_problem(shape: list[int], chunks: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> str | None:
    """Why ``chunks`` (offsets, sizes; each inside ``shape``) do not cover the tensor exactly once, or None."""
    total = math.prod(shape)
    live = [c for c in chunks if math.prod(c[1]) > 0]
    held = sum(math.prod(c[1]) for c in live)
    if held != total:
        return f"its chunks hold {held} of its {total} elements"
    if len(live) > 1:
        if all(o[1:] == (0,) * (len(shape) - 1) and tuple(s[1:]) == tuple(shape[1:]) for o, s in live):
            rows = sorted((o[0], s[0]) for o, s in live)  # blocks of rows (FSDP2's Shard(0)): one sort
            if any(a0 + an > b0 for (a0, an), (b0, _) in zip(rows, rows[1:])):
                return "two of its chunks overlap"
        elif any(_overlap(a, b) for i, a in enumerate(live) for b in live[i + 1 :]):
            return "two of its chunks overlap"
    return None


def _shard_metadata(step_dir: Path, shards: list[str], table: Mapping[str, tuple[str, list[int]]]) -> Metadata:
    """DCP's metadata of the shard files, built from their (validated) headers: every tensor of a
    shard is in ``table`` with its dtype and lies inside its global shape, and every tensor of
    ``table`` is tiled exactly by its chunks."""
    from torch.distributed.checkpoint._hf_utils import _HFStorageInfo
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        StorageMeta,
        TensorProperties,
        TensorStorageMetadata,
    )

    chunks: dict[str, list[tuple[tuple[int, ...], tuple[int, ...]]]] = {}
    storage: dict[Any, Any] = {}
    for fname in shards:
        path = step_dir / fname
        infos, meta = read_tensor_header(path)
        raw = meta.get(_SHARDING_INFO)
        if raw is None:
            raise StorageError(f"shard file {path} has no {_SHARDING_INFO} metadata: it is not a DCP shard")
        data = raw.encode()
        info = parse_json(data, path, f"{_SHARDING_INFO} metadata of shard file", MAX_JSON_DEPTH, len(data))
        if not isinstance(info, dict) or set(info) != set(infos):
            raise StorageError(f"shard file {path}: its {_SHARDING_INFO} and its tensors name different keys")
        for key, ti in infos.items():
            spec = table.get(key)
            if spec is None:
                raise StorageError(f"shard file {path}: tensor {_short(key)} is not in the manifest")
            dtype, shape = spec
            e = info[key]
            off = e.get(_OFFSETS) if isinstance(e, dict) else None
            if (
                not isinstance(e, dict)
                or set(e) != {_OFFSETS}
                or not isinstance(off, list)
                or len(off) != len(shape)
                or len(ti.shape) != len(shape)
                or not all(type(o) is int and o >= 0 for o in off)
            ):
                raise StorageError(f"shard file {path}: tensor {key!r} has malformed sharding information {_short(e)}")
            if ti.dtype != dtype:
                raise StorageError(f"shard file {path}: tensor {key!r} is {ti.dtype}; the manifest says {dtype}")
            if any(o + s > n for o, s, n in zip(off, ti.shape, shape)):
                raise StorageError(
                    f"shard file {path}: tensor {key!r}'s chunk at {off} of shape {list(ti.shape)} lies outside "
                    f"its global shape {shape}"
                )
            chunks.setdefault(key, []).append((tuple(off), ti.shape))
            if math.prod(ti.shape) > 0:
                storage[MetadataIndex(fqn=key, offset=torch.Size(off))] = _HFStorageInfo(
                    relative_path=str(path), shape=torch.Size(ti.shape), dtype=DTYPES[dtype]
                )
    sdm: dict[str, Any] = {}
    for key, (dtype, shape) in table.items():
        problem = _tiling_problem(shape, chunks.get(key, []))
        if problem is not None:
            raise StorageError(f"shard files of {step_dir}: tensor {key!r} of shape {shape}: {problem}")
        sdm[key] = TensorStorageMetadata(
            properties=TensorProperties(dtype=DTYPES[dtype]),
            size=torch.Size(shape),
            chunks=[
                ChunkStorageMetadata(offsets=torch.Size(o), sizes=torch.Size(s))
                for o, s in chunks.get(key, [])
                if math.prod(s) > 0
            ],
        )
    return Metadata(state_dict_metadata=sdm, storage_data=storage, storage_meta=StorageMeta())


def _reader(step_dir: Path, metadata: Metadata) -> Any:
    """DCP's HuggingFace safetensors reader over the verified shard files, given their metadata (the
    stock reader would list every ``*.safetensors`` of the folder and trust their headers)."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    class _Reader(HuggingFaceStorageReader):
        def read_metadata(self) -> Metadata:
            return metadata

    return _Reader(str(step_dir))


# --------------------------------------------------------------------------- what is restored


def _module_targets(name: str, module: nn.Module, saved: Mapping[str, Any], mpath: Path) -> dict[str, Tensor]:
    """Fresh buffers laid out as ``module`` holds its state (DTensors sharded like its parameters,
    or plain tensors), after checking names, global shapes and dtypes against the state."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    own = get_model_state_dict(module)
    missing, unexpected = [k for k in own if k not in saved], [k for k in saved if k not in own]
    where = f"{mpath}: module {name!r} does not fit the state"
    if missing:
        raise StorageError(f"{where}: key {missing[0]!r} is not in the state ({len(missing)} missing)")
    if unexpected:
        raise StorageError(
            f"{where}: the state's key {unexpected[0]!r} is not in the module ({len(unexpected)} unexpected)"
        )
    out = {}
    for fqn, v in own.items():
        if not isinstance(v, Tensor):
            raise TypeError(f"modules[{name!r}] entry {fqn!r} is a {type(v).__name__}, not a tensor")
        dtype, shape = saved[fqn]
        if list(v.shape) != shape or _DTYPE_NAMES.get(v.dtype) != dtype:
            raise StorageError(
                f"{where}: {fqn!r} is {dtype} {shape} in the state, {v.dtype} {list(v.shape)} in the module "
                "(a state is resharded to any world size, never to other shapes or dtypes)"
            )
        out[fqn] = torch.zeros_like(v)
    return out


def _optimizer_targets(
    name: str,
    opt: torch.optim.Optimizer,
    e: Mapping[str, Any],
    names: Mapping[int, tuple[Any, ...]],
    shared: Mapping[str, Tensor],
    used: set[str],
    mpath: Path,
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The optimizer's state dict to load (torch's own layout, its tensors fresh buffers laid out like
    their parameters) and those buffers by DCP key, after checking it fits ``opt``."""
    where = f"{mpath}: optimizer {name!r}"
    params = e["params"]
    _check_params(params, _optimizer_params(opt, names, (None, None)), where, "(module, name, shape)")
    groups = _decode(e["param_groups"], shared, f"{mpath}: optimizers[{name!r}].param_groups", used)
    if not isinstance(groups, list):
        raise StorageError(f"{where}: param_groups is not a list")
    _check_groups(groups, opt.param_groups, f"{mpath}: optimizers[{name!r}].param_groups", where)
    if [p for g in groups for p in g["params"]] != list(range(len(params))):
        raise StorageError(f"{where}: the groups' parameter indices are not 0..{len(params) - 1} in order")
    plist = [p for g in opt.param_groups for p in g["params"]]
    state: dict[int, Any] = {}
    targets: dict[str, Tensor] = {}
    for si, se in e["state"].items():
        i = int(si)
        values = _decode(se["values"], shared, f"{mpath}: optimizers[{name!r}].state[{i}]", used)
        if not isinstance(values, dict) or set(values) & set(se["tensors"]):
            raise StorageError(f"{where}: state {i}'s values are not an object apart from its tensors")
        entry = dict(values)
        p = plist[i]
        for k, (dtype, shape) in se["tensors"].items():
            if shape and shape == list(p.shape):  # laid out like its parameter (sharded where it is)
                t = torch.zeros_like(p, dtype=DTYPES[dtype], requires_grad=False)
            else:
                t = torch.zeros(shape, dtype=DTYPES[dtype])
            targets[_optimizer_key(name, i, k)] = entry[k] = t
        state[i] = entry
    return {"state": state, "param_groups": groups}, targets


# --------------------------------------------------------------------------- load


def load_sharded_state(
    folder: str | os.PathLike,
    *,
    modules: Mapping[str, nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer] = {},
    schedulers: Mapping[str, Any] = {},
    generators: Mapping[str, torch.Generator] = {},
    config: Mapping[str, Any],
    strict: bool = True,
) -> dict[str, Any]:
    """Restore a state saved by :func:`save_sharded_state` into the given objects, in place, at any
    world size; returns ``{"step": int, "extra": ..., "path": Path, "world_size": int (the saving
    run's), "rng_restored": bool}``. Collective: every rank calls it (without a process group: one
    process, plain modules).

    ``folder`` is a run folder (its ``latest.json`` is followed) or one step folder. Before anything
    is read into a buffer, on every rank: the manifest (against the sha256 in ``latest.json`` and its
    digest), every file's size and sha256, every shard's header and sharding information (each tensor
    tiled exactly), ``config`` (a differing key is named), and that every module's keys, global
    shapes and dtypes and every optimizer's groups and parameters (module, name, shape) fit; then the
    ranks agree. Then each rank reads the slices of the shards it holds into fresh buffers, the ranks
    agree again, and modules (``set_model_state_dict``: the same parameter objects, so optimizers
    stay valid), optimizers (``load_state_dict``), schedulers, generators and (saved at this world
    size) this rank's RNG states are restored.

    With ``strict`` (default) everything in the state must be passed, the schedulers' state keys must
    match, and the CUDA RNG states must be for as many devices as this process sees; generators passed
    under another world size than the saved one are refused. With ``strict=False`` what is not passed
    is left, CUDA RNG states that do not fit are skipped, and so are generators under another world
    size. Everything passed must be in the state. Every problem is a :class:`StorageError`.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    rank, world = _world()
    step_dir = Path(folder)
    # the message names the step folder resolved in the block
    with _together(
        world,
        lambda: f"{step_dir}: another rank refused this state (its own error names the file); nothing was restored",
    ):
        _check_objects(modules, optimizers, schedulers, generators)
        step_dir, expected_sha = _resolve(Path(folder))
        m, table = _read_manifest(step_dir, expected_sha)
        mpath = step_dir / MANIFEST
        _check_config(m, config, mpath)
        _check_sections(m, {"modules": modules, "optimizers": optimizers, "schedulers": schedulers}, strict, mpath)
        saved_gens = set(m["generators"])
        same_world = m["world_size"] == world
        # under another world size the saved generators cannot be restored: not passing them is fine
        if not set(generators) <= saved_gens or (strict and same_world and saved_gens - set(generators)):
            odd = sorted(set(generators) ^ saved_gens)[0]
            raise StorageError(f"{mpath}: generator {odd!r} is in only one of the state and the generators passed")
        if generators and not same_world and strict:
            raise StorageError(
                f"{mpath}: the state was saved at world size {m['world_size']}, this run has {world}: the "
                "per-rank generator states cannot be given to other ranks (strict=False leaves them)"
            )
        files = m["files"]
        _verify_files(step_dir, files)
        metadata = _shard_metadata(step_dir, m["shards"], table)

        shared = _load(step_dir, files, m["tensors_file"]) if m.get("tensors_file") else {}
        used = _tensor_refs(
            [
                *(v for k, v in m["schedulers"].items() if k not in schedulers),
                *(v for k, v in m["optimizers"].items() if k not in optimizers),
            ]
        )  # those not restored
        targets: dict[str, Tensor] = {}
        mod_states: dict[str, dict[str, Any]] = {}
        for name, module in modules.items():
            mod_states[name] = _module_targets(name, module, m["modules"][name]["tensors"], mpath)
            targets.update({_module_key(name, k): v for k, v in mod_states[name].items()})
        names = _param_names(modules, _fqn)
        opt_states = {}
        for name, opt in optimizers.items():
            opt_states[name], buffers = _optimizer_targets(name, opt, m["optimizers"][name], names, shared, used, mpath)
            targets.update(buffers)
        sched_states, extra = _schedulers_and_extra(m, step_dir, schedulers, shared, used, strict)
        rng = _rank_rng(step_dir, files, rank, generators, strict) if same_world else None

    with _together(world, f"{step_dir}: another rank could not read its shards; nothing was restored"), _quiet():
        try:
            dcp.load(targets, storage_reader=_reader(step_dir, metadata), planner=DefaultLoadPlanner(), no_dist=True)
        except Exception as e:
            raise StorageError(
                f"shard files of {step_dir} cannot be read: {type(e).__name__}: {str(e)[:300]}"
            ) from None

    options = StateDictOptions(strict=True)
    _restore(
        step_dir,
        {
            "modules": lambda: _load_each(
                modules, mod_states, lambda o, sd: set_model_state_dict(o, sd, options=options)
            ),
            "optimizers": lambda: _load_each(optimizers, opt_states),
            "schedulers": lambda: _load_each(schedulers, sched_states),
            "RNG states": lambda: None if rng is None else rng.restore(generators),
        },
    )
    return {
        "step": m["step"],
        "extra": extra,
        "path": step_dir,
        "world_size": m["world_size"],
        "rng_restored": rng is not None,
    }
