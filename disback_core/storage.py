"""Safe persistence, the one layer under trajectories, training states and exports: verified
folders of safetensors and JSON files. No pickle.

Writers: every file goes through a temporary file in the destination folder (``.<name>.<random>.tmp``),
``fsync``, ``os.replace`` and an ``fsync`` of the folder, so a crash leaves either the old file or
the new one under a name, never a torn one. Safetensors files are written by this module (not by
the ``safetensors`` package, whose metadata order is random): the same tensors and metadata give
the same bytes. A JSON file is refused before it is written where the reader would refuse it
(:func:`loadable`). A folder is written beside its destination (:func:`new_folder_beside`),
fsynced, and switched in whole (:func:`switch_folder`), or switched by replacing the one file
that names its files (a trajectory's manifest, a run's ``latest.json``).

A manifest lists every file of its folder with its sha256 (and size: :func:`file_entry`) and
holds a digest of its own fields (:func:`body_digest`); a reader checks the manifest
(:func:`check_format`, :func:`check_digest`, :func:`check_file_table`) and verifies every file
(:func:`verify_file`, :func:`load_tensors`) before using it.

Readers check before they trust: a file must be a regular file (not a symlink, FIFO or device) of
a bounded size; JSON must be UTF-8, bounded in size and nesting depth, without duplicate keys;
a safetensors header is parsed here first (bounded length, known dtypes, ``data_offsets``
consistent with each shape and covering the data exactly, without overlap), and a file with an
expected sha256 is hashed by streaming before any tensor is allocated. Every problem is a
:class:`StorageError` naming the file and the problem.

Every JSON read goes through one bounded reader (:func:`parse_json`): a size cap per file kind,
then a linear byte scan (:class:`JsonScan`: chunked, no recursion, no string materialised) that
measures the nesting depth of arrays and objects outside strings and the longest string, and only
then ``json.loads``. Time and memory are linear in the file's size with small constants: the scan
needs a fixed window (a few MiB), the parse the text and the objects it builds.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import hashlib
import io
import json
import math
import os
import re
import reprlib
import secrets
import shutil
import stat
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeGuard

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "StorageError",
    "short",
    "is_number",
    "check_int",
    "MAX_JSON_BYTES",
    "MAX_JSON_DEPTH",
    "MAX_HEADER_BYTES",
    "MAX_HEADER_STRING_BYTES",
    "JsonScan",
    "DTYPES",
    "dtype_name",
    "TensorInfo",
    "atomic_write",
    "atomic_write_bytes",
    "fsync_dir",
    "remove_files",
    "temp_target",
    "write_json",
    "read_bytes",
    "open_regular",
    "read_json",
    "gc_paused",
    "check_json",
    "parse_json",
    "canonical_json",
    "json_bytes",
    "loadable",
    "body_digest",
    "is_sha256",
    "sha256_bytes",
    "sha256_file",
    "sha256_stream",
    "file_entry",
    "is_file_entry",
    "is_plain_name",
    "check_file_table",
    "check_fields",
    "check_format",
    "check_digest",
    "verify_file",
    "remove_path",
    "exchange_folders",
    "new_folder_beside",
    "switch_folder",
    "folders_beside",
    "recover_folder",
    "remove_stale_beside",
    "tensors_to_bytes",
    "tensors_sha256",
    "save_tensors",
    "save_tensors_once",
    "read_tensor_header",
    "load_tensors",
    "tensors_misfit",
    "tensors_fingerprint",
    "lowest_float_dtype",
    "config_hash",
]

MAX_JSON_BYTES = 16 << 20  # a JSON file larger than this is refused before parsing
MAX_JSON_DEPTH = 64  # deeper nesting of arrays/objects is refused before parsing
MAX_HEADER_BYTES = 100 << 20  # a safetensors header longer than this is refused before reading it
# a string in a safetensors header (a ``__metadata__`` value, a tensor name) longer than this is
# refused by the scan, before the header is parsed
MAX_HEADER_STRING_BYTES = 16 << 20
TEMP_SUFFIX = ".tmp"
_TEMP_NAME = re.compile(r"\.(.+)\.[A-Za-z0-9_]+\.tmp", re.DOTALL)  # .<target>.<token>.tmp
_CHUNK = 1 << 20
_SCAN_CHUNK = 1 << 18  # the JSON scan's window: its arrays take about 30 bytes per byte of window (~8 MiB)
_HEX64 = re.compile(r"[0-9a-f]{64}")
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")

# safetensors dtype name -> torch dtype (only those this library reads and writes)
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)
_NAMES = {v: k for k, v in DTYPES.items()}


class StorageError(ValueError):
    """A file is missing, corrupted, tampered with, or belongs to something else."""


# --------------------------------------------------------------------------- values in messages and checks

_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxtuple = 2, 4, 4, 4


def short(v: Any) -> str:
    """A bounded rendering of a value read from a file, for messages (never the whole value)."""
    if isinstance(v, str):
        return json.dumps(v[:60] + ("..." if len(v) > 60 else ""))
    if v is None or isinstance(v, (bool, int, float)):
        return json.dumps(v)[:60]
    return _REPR.repr(v)


def is_number(v: Any) -> TypeGuard[int | float]:
    """Whether ``v`` is an int (not a bool) or a float whose value is a finite float."""
    try:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    except OverflowError:  # an int beyond the float range
        return False


def check_int(value: Any, name: str, lo: int, hi: int | None = None, error: type[Exception] = ValueError) -> int:
    """``value`` if it is an int (not a bool) in ``lo..hi``; else ``error`` naming ``name``."""
    if type(value) is not int or value < lo or (hi is not None and value > hi):
        rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise error(f"{name} must be an integer {rng}, got {short(value)}")
    return value


# --------------------------------------------------------------------------- writing


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make the folder's entries (renames, new files) durable; a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse fsync on a folder
        pass
    finally:
        os.close(fd)


def _temp_path(path: Path) -> Path:
    return path.parent / f".{path.name}.{secrets.token_hex(8)}{TEMP_SUFFIX}"


def temp_target(name: str) -> str | None:
    """The name of the file whose interrupted :func:`atomic_write` may have left the temporary file
    ``name`` (``.<target>.<token>.tmp``, this writer's and earlier ones'), or None."""
    m = _TEMP_NAME.fullmatch(name)
    return m.group(1) if m else None


def atomic_write(path: str | os.PathLike, chunks: Iterable[bytes | memoryview], sync_dir: bool = True) -> str:
    """Write ``chunks`` to ``path`` atomically: a temporary file in the same folder, fsync,
    ``os.replace`` and (with ``sync_dir``) an fsync of the folder. The file gets the usual
    permissions (``0o666`` less the umask). Returns the sha256 of what was written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    h = hashlib.sha256()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
                h.update(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if sync_dir:
        fsync_dir(path.parent)
    return h.hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes, sync_dir: bool = True) -> str:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`); returns its sha256."""
    return atomic_write(path, [data], sync_dir)


def _holds(path: Path, sha256: str) -> bool:
    """Whether ``path`` is a regular file (not a symlink) whose content has this sha256."""
    try:
        return sha256_stream(path)[0] == sha256
    except (StorageError, OSError):
        return False


def remove_files(folder: str | os.PathLike, names: Iterable[str]) -> list[str]:
    """Remove the regular files or symlinks ``folder/<name>`` (never folders), best effort: a file
    that cannot be removed is left for the next call. Returns those removed."""
    removed = []
    for name in names:
        p = Path(folder) / name
        try:
            if stat.S_ISDIR(os.lstat(p).st_mode):
                continue
            os.unlink(p)
            removed.append(name)
        except OSError:
            continue
    return removed


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write ``obj`` as indented, key-sorted JSON."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


# --------------------------------------------------------------------------- reading files safely


def _open_regular(path: Path, what: str) -> tuple[io.FileIO, int]:
    """Open ``path`` for reading without following a symlink and without blocking on a FIFO;
    refuse anything but a regular file. Returns the open file and its size."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        if os.path.islink(path):
            raise StorageError(f"{what} {path} is a symlink; only regular files are read")
        fd = os.open(path, flags)
    except StorageError:
        raise
    except FileNotFoundError:
        raise StorageError(f"{what} {path} is missing") from None
    except OSError as e:  # ELOOP (a symlink), ENAMETOOLONG, EACCES, EISDIR, ...
        raise StorageError(f"{what} {path} cannot be opened: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise StorageError(f"{what} {path} is not a regular file")
        return os.fdopen(fd, "rb", buffering=0), st.st_size
    except BaseException:
        os.close(fd)
        raise


open_regular = _open_regular


def _read_exact(f: io.RawIOBase, buf: memoryview, path: Path, what: str) -> None:
    """Fill ``buf`` from ``f`` or raise (the file is shorter than its header says)."""
    got = 0
    while got < len(buf):
        n = f.readinto(buf[got:])
        if not n:
            raise StorageError(f"{what} {path} ended early (read {got} of {len(buf)} bytes): it was truncated")
        got += n


class JsonScan:
    """A linear scan of JSON bytes, fed in pieces of any size: the nesting depth of arrays and objects
    outside strings and the longest string (raw bytes between its quotes), without parsing,
    recursing or materialising a string. Memory is one fixed window (:data:`_SCAN_CHUNK`) whatever
    the input; :meth:`feed` raises :class:`StorageError` naming ``where`` as soon as the input goes
    deeper than ``max_depth`` or holds a string longer than ``max_string`` (``None``: no limit).

    Exact for every prefix that ``json.loads`` accepts (a quote is escaped iff an odd run of
    backslashes precedes it; brackets count outside strings only), so a text it passes cannot make
    the parser recurse deeper than ``max_depth``; invalid JSON is left to the parser to refuse."""

    def __init__(self, where: str | os.PathLike, what: str, max_depth: int, max_string: int | None = None):
        self.where, self.what, self.max_depth, self.max_string = where, what, max_depth, max_string
        self.depth = self.deepest = 0  # current and deepest nesting so far
        self.longest = 0  # the longest string closed so far, in raw bytes
        self.pos = 0  # bytes scanned
        self.in_string = False
        self.opened = 0  # position of the current string's opening quote
        self.odd_backslashes = 0  # 1 when the bytes so far end with an odd run of backslashes

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        for start in range(0, len(view), _SCAN_CHUNK):
            self._window(np.frombuffer(view[start : start + _SCAN_CHUNK], dtype=np.uint8))
            self._check()

    def _window(self, c: np.ndarray) -> None:
        n, started_inside = c.size, self.in_string
        idx = np.arange(n, dtype=np.int32)
        # last[i]: the last position <= i that is not a backslash (-1 - carry before the window)
        last = np.where(c == 92, np.int32(-1 - self.odd_backslashes), idx)
        np.maximum.accumulate(last, out=last)
        quotes = np.flatnonzero(c == 34)
        if quotes.size:
            before = np.where(quotes > 0, last[np.maximum(quotes - 1, 0)], -1 - self.odd_backslashes)
            quotes = quotes[((quotes - 1 - before) & 1) == 0]  # an even run of backslashes: a real quote
        self.odd_backslashes = int((n - 1 - int(last[-1])) & 1)
        # strings: the real quotes alternate opening and closing
        marks = quotes.astype(np.int64) + self.pos
        if self.in_string:
            marks = np.concatenate(([self.opened], marks))
        closed = marks.size // 2
        if closed:
            self.longest = max(self.longest, int((marks[1 : 2 * closed : 2] - marks[0 : 2 * closed : 2]).max()) - 1)
        self.in_string = bool(marks.size % 2)
        if self.in_string:
            self.opened = int(marks[-1])
        # brackets outside strings
        toggles = np.zeros(n, dtype=np.int8)
        toggles[quotes] = 1
        inside = np.cumsum(toggles, dtype=np.int32)
        inside += started_inside
        inside &= 1
        step = (c == 91).view(np.int8) + (c == 123).view(np.int8) - (c == 93).view(np.int8) - (c == 125).view(np.int8)
        step[inside.astype(bool)] = 0
        level = np.cumsum(step, dtype=np.int64)
        level += self.depth
        self.deepest = max(self.deepest, int(level.max()))
        self.depth = int(level[-1])
        self.pos += n

    def _check(self) -> None:
        if self.deepest > self.max_depth:
            raise StorageError(
                f"{self.what} {self.where} is nested more than {self.max_depth} levels deep "
                f"({self.deepest} in its first {self.pos} bytes)"
            )
        if self.max_string is not None:
            longest = max(self.longest, self.pos - self.opened - 1 if self.in_string else 0)
            if longest > self.max_string:
                raise StorageError(
                    f"{self.what} {self.where} holds a string of more than {self.max_string} bytes "
                    f"({longest} in its first {self.pos} bytes)"
                )


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise ValueError(f"duplicate key {k[:80]!r}")
            seen.add(k)
    return out


@contextlib.contextmanager
def gc_paused() -> Generator[None, None, None]:
    """Pause the cyclic garbage collector while building or walking many acyclic objects (parsed JSON):
    its collections would otherwise grow with the heap and make a large parse superlinear."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _loads(data: bytes | bytearray | memoryview, where: str | os.PathLike, what: str) -> Any:
    """``json.loads`` of UTF-8 bytes already checked by :func:`check_json`; refuses duplicate keys."""
    try:
        text = str(data, "utf-8")
    except UnicodeDecodeError as e:
        raise StorageError(f"{what} {where} is not valid JSON (not UTF-8: {e})") from None
    try:
        with gc_paused():  # parsed JSON has no cycles
            return json.loads(text, object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, duplicate keys, a 5000-digit int
        raise StorageError(f"{what} {where} is not valid JSON: {str(e)[:200]}") from None


def check_json(
    data: bytes | bytearray | memoryview,
    where: str | os.PathLike,
    what: str = "JSON file",
    max_depth: int = MAX_JSON_DEPTH,
    max_bytes: int = MAX_JSON_BYTES,
    max_string: int | None = None,
) -> None:
    """Refuse JSON bytes that :func:`parse_json` would refuse before parsing: more than ``max_bytes``,
    nested deeper than ``max_depth``, a string longer than ``max_string``. Linear time, fixed memory.
    Writers call it on what they are about to write, so that nothing is saved that cannot be loaded."""
    n = memoryview(data).nbytes
    if n > max_bytes:
        raise StorageError(f"{what} {where} is {n} bytes, more than the {max_bytes} allowed")
    JsonScan(where, what, max_depth, max_string).feed(data)


def parse_json(
    data: bytes | bytearray | memoryview,
    where: str | os.PathLike,
    what: str = "JSON file",
    max_depth: int = MAX_JSON_DEPTH,
    max_bytes: int = MAX_JSON_BYTES,
    max_string: int | None = None,
) -> Any:
    """Parse UTF-8 JSON ``data``: refused, before parsing, if larger than ``max_bytes``, nested deeper
    than ``max_depth`` or holding a string longer than ``max_string`` (:func:`check_json`); then
    refused if malformed or with duplicate keys. Every problem is a :class:`StorageError` naming
    ``where``. The one JSON reader of the library."""
    check_json(data, where, what, max_depth, max_bytes, max_string)
    return _loads(data, where, what)


def read_bytes(
    path: str | os.PathLike, what: str = "file", max_bytes: int = MAX_JSON_BYTES, sha256: str | None = None
) -> bytes:
    """The bytes of a regular file of at most ``max_bytes`` (no symlink, FIFO or device; the size is
    checked before anything is read, the bytes are read once, without a copy); with ``sha256``, other
    contents are refused. Every problem is a :class:`StorageError` naming ``path``."""
    path = Path(path)
    f, size = _open_regular(path, what)
    with f:
        if size > max_bytes:
            raise StorageError(f"{what} {path} is {size} bytes, more than the {max_bytes} allowed")
        data = f.read(size) or b""  # one read, no copy (a regular file is read whole but for signals)
        if len(data) < size:  # a short read: read the rest (a file shrunk under us is refused)
            parts, got = [data], len(data)
            while got < size and (more := f.read(size - got)):
                parts.append(more)
                got += len(more)
            if got < size:
                raise StorageError(f"{what} {path} ended early (read {got} of {size} bytes): it was truncated")
            data = b"".join(parts)
        if f.read(1):
            raise StorageError(f"{what} {path} grew while it was read")
    if sha256 is not None and sha256_bytes(data) != sha256:
        raise StorageError(f"{what} {path} fails its sha256 check: it was modified, truncated or replaced")
    return data


def read_json(
    path: str | os.PathLike,
    what: str = "JSON file",
    max_bytes: int = MAX_JSON_BYTES,
    *,
    max_depth: int = MAX_JSON_DEPTH,
    sha256: str | None = None,
) -> Any:
    """Read a JSON file (a regular file of at most ``max_bytes``, with ``sha256`` that content only)
    through :func:`parse_json`, raising :class:`StorageError` naming ``path`` when it is missing, too
    large, too deeply nested or malformed."""
    return parse_json(read_bytes(path, what, max_bytes, sha256), path, what, max_depth, max_bytes)


def canonical_json(obj: Any) -> bytes:
    """Compact, key-sorted, ASCII JSON of ``obj``: equal objects give equal bytes (digests)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True).encode()


def json_bytes(
    obj: Any, what: str = "JSON file", *, indent: int = 2, sort_keys: bool = True, allow_nan: bool = True
) -> bytes:
    """The bytes of a JSON file holding ``obj`` (indented, ASCII, a final newline); a ValueError
    naming ``what`` where it is not JSON. Check them with :func:`loadable` before writing them."""
    try:
        return (json.dumps(obj, indent=indent, sort_keys=sort_keys, allow_nan=allow_nan) + "\n").encode()
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} must be JSON-serialisable: {e}") from None


def loadable(
    data: bytes, what: str, where: str | os.PathLike, max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH
) -> bytes:
    """``data`` if :func:`parse_json` would read it back (at most ``max_bytes``, nested at most
    ``max_depth`` deep), else a ValueError before it is written: nothing is saved that cannot be loaded."""
    try:
        check_json(data, where, what, max_depth, max_bytes)
    except StorageError as e:
        raise ValueError(f"{what} cannot be saved: it would not load back: {e}") from None
    return data


# --------------------------------------------------------------------------- hashes


def body_digest(body: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of every field of ``body`` except ``digest``: a manifest's
    digest of itself, so an edited field is refused even where no file hash covers it."""
    return sha256_bytes(canonical_json({k: v for k, v in body.items() if k != "digest"}))


def is_sha256(v: Any) -> bool:
    """Whether ``v`` is a lowercase 64-hex-digit string."""
    return isinstance(v, str) and _HEX64.fullmatch(v) is not None


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sha256_open(f: BinaryIO) -> str:
    h = hashlib.sha256()
    f.seek(0)
    for chunk in iter(lambda: f.read(_CHUNK), b""):
        h.update(chunk)
    return h.hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of a file, read in 1 MiB chunks."""
    with open(path, "rb") as f:
        return _sha256_open(f)


def sha256_stream(path: str | os.PathLike, what: str = "file", size: int | None = None) -> tuple[str, int]:
    """(sha256, size) of a regular file (no symlink, FIFO or device), read in 1 MiB chunks; with
    ``size``, a file of another size is refused before it is read. Problems are :class:`StorageError`."""
    path = Path(path)
    f, got = _open_regular(path, what)
    with f:
        if size is not None and got != size:
            raise StorageError(f"{what} {path} is {got} bytes, expected {size}: it was truncated or extended")
        return _sha256_open(f), got


# --------------------------------------------------------------------------- manifests of files


def file_entry(path: str | os.PathLike, sha256: str, size_key: str = "size") -> dict[str, Any]:
    """A manifest's entry for the file just written at ``path`` with this sha256: ``{sha256, size}``."""
    return {"sha256": sha256, size_key: os.stat(path).st_size}


def is_file_entry(entry: Any, size_key: str = "size") -> bool:
    """Whether ``entry`` is a well-formed :func:`file_entry`: exactly a 64-hex sha256 and a size >= 0."""
    return (
        isinstance(entry, dict)
        and set(entry) == {"sha256", size_key}
        and is_sha256(entry["sha256"])
        and type(entry[size_key]) is int
        and entry[size_key] >= 0
    )


def is_plain_name(v: Any) -> bool:
    """Whether ``v`` is 1-100 letters, digits, '_', '.' or '-', not starting with '.' or '-': a file
    name inside its folder, never a path or a hidden file."""
    return isinstance(v, str) and _PLAIN_NAME.fullmatch(v) is not None


def check_file_table(files: Any, expected: Iterable[str], where: str | os.PathLike, size_key: str = "size") -> None:
    """A manifest's table of files: exactly the ``expected`` plain names, each with a well-formed
    :func:`file_entry`."""
    if not isinstance(files, dict):
        raise StorageError(f"{where}: files must be exactly the files it uses, as an object, got {short(files)}")
    odd = sorted(set(files) ^ set(expected), key=str)
    if odd:
        problem = "listed but not used" if odd[0] in files else "used but not listed"
        raise StorageError(f"{where}: files must be exactly the files it uses: {short(odd[0])} is {problem}")
    for name, entry in files.items():
        if not is_plain_name(name):
            raise StorageError(f"{where}: file name {short(name)} is not a plain file name")
        if not is_file_entry(entry, size_key):
            raise StorageError(f"{where}: files[{short(name)}] needs a sha256 (64 hex digits) and a {size_key} >= 0")


def check_fields(obj: Any, keys: set[str], where: str | os.PathLike, what: str) -> dict[str, Any]:
    """``obj`` if it is a JSON object with exactly the fields ``keys``; else a :class:`StorageError`."""
    if not isinstance(obj, dict) or set(obj) != keys:
        got = f"fields {sorted(str(k)[:40] for k in obj)[:8]}" if isinstance(obj, dict) else short(obj)
        raise StorageError(f"{where}: {what} must hold exactly the fields {sorted(keys)}, got {got}")
    return obj


def check_format(m: Any, where: str | os.PathLike, fmt: str, versions: Iterable[int], what: str = "manifest") -> int:
    """A manifest's first checks: a JSON object of format ``fmt`` and one of ``versions`` (returned)."""
    if not isinstance(m, dict) or m.get("format") != fmt:
        raise StorageError(f"{where}: not a {fmt} {what}")
    if type(m.get("version")) is not int or m["version"] not in versions:
        raise StorageError(f"{where} has format version {short(m.get('version'))}; this library reads {list(versions)}")
    return m["version"]


def check_digest(m: Mapping[str, Any], where: str | os.PathLike) -> None:
    """A manifest's ``digest`` (:func:`body_digest`) must match its other fields: none was edited."""
    if not is_sha256(m.get("digest")) or m["digest"] != body_digest(m):
        raise StorageError(f"{where} fails its digest check: its fields were edited")


def verify_file(
    path: str | os.PathLike, sha256: str | None, size: int, what: str = "file", source: str = "its manifest"
) -> Path:
    """``path``, checked against its manifest entry: a regular file (no symlink, FIFO or device; never
    blocks) of ``size`` bytes, checked before anything is read, whose content has ``sha256``
    (streamed; ``None`` for a file whose reader hashes it anyway)."""
    path = Path(path)
    f, got = _open_regular(path, what)
    with f:
        if got != size:
            raise StorageError(
                f"{what} {path} is {got} bytes, {source} says {size}: it was truncated, extended or replaced"
            )
        if sha256 is not None and (sha := _sha256_open(f)) != sha256:
            raise StorageError(
                f"{what} {path} fails its sha256 check (expected {sha256[:12]}..., got {sha[:12]}...): it was modified"
            )
    return path


# --------------------------------------------------------------------------- switching folders

PARTIAL, PREVIOUS = ".partial", ".previous"  # a folder being written beside its destination, one switched out


def remove_path(path: str | os.PathLike) -> None:
    """Remove the file, symlink or folder tree at ``path``, if there is one (a folder best effort)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def exchange_folders(a: Path, b: Path) -> bool:
    """Atomically swap two folders (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    if not hasattr(os, "uname") or os.uname().sysname != "Linux":
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: this file system or kernel cannot
        return False
    raise OSError(err, f"cannot switch {b} into place: {os.strerror(err)}")


def new_folder_beside(folder: Path) -> Path:
    """A new empty folder ``.<name>.<16 hex>.partial`` beside ``folder``, to be filled and switched in."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    new = folder.parent / f".{folder.name}.{secrets.token_hex(8)}{PARTIAL}"
    new.mkdir()
    return new


def switch_folder(new: Path, folder: Path, exchange: Callable[[Path, Path], bool] = exchange_folders) -> None:
    """Make ``new`` (complete, fsynced) the folder ``folder`` atomically; the old one is removed.

    Where the OS swaps folders (``exchange``) one swap is the switch. Elsewhere two renames are: a
    crash between them leaves the old folder complete at ``.<name>.<16 hex>.previous``, which
    :func:`recover_folder` puts back."""
    parent = folder.parent
    if not folder.exists():
        os.rename(new, folder)
        fsync_dir(parent)
        return
    if exchange(new, folder):
        fsync_dir(parent)
        remove_path(new)  # now the old folder
        return
    old = parent / f".{folder.name}.{secrets.token_hex(8)}{PREVIOUS}"
    os.rename(folder, old)
    os.rename(new, folder)  # a crash between the two renames leaves the old folder at `old`
    fsync_dir(parent)
    remove_path(old)


def folders_beside(folder: Path, suffix: str) -> list[Path]:
    """The folders ``.<name>.*<suffix>`` beside ``folder`` (not symlinks), sorted."""
    prefix = f".{folder.name}."
    try:
        return sorted(
            p
            for p in folder.parent.iterdir()
            if p.name.startswith(prefix) and p.name.endswith(suffix) and p.is_dir() and not p.is_symlink()
        )
    except FileNotFoundError:
        return []


def recover_folder(folder: Path, complete: Callable[[Path], bool], restore: bool = True) -> Path | None:
    """The newest complete folder (``complete``) an interrupted two-rename :func:`switch_folder` left
    beside ``folder``, when ``folder`` is missing (else None); with ``restore``, it is renamed back first."""
    if folder.exists() or folder.is_symlink():
        return None
    prev = next((p for p in reversed(folders_beside(folder, PREVIOUS)) if complete(p)), None)
    if prev is not None and restore:
        os.replace(prev, folder)
        fsync_dir(folder.parent)
    return prev


def remove_stale_beside(folder: Path) -> None:
    """Remove the folders that interrupted writes and switches of ``folder`` left beside it."""
    for stale in folders_beside(folder, PARTIAL) + folders_beside(folder, PREVIOUS):
        remove_path(stale)


# --------------------------------------------------------------------------- safetensors


def _check_tensor(name: Any, t: Any) -> str:
    """The safetensors dtype name of tensor ``name``; refuse what cannot be saved."""
    if not isinstance(name, str) or not name or name == "__metadata__":
        raise ValueError(f"tensor name {name!r} is not allowed")
    if not isinstance(t, Tensor):
        raise ValueError(f"tensor {name!r} is a {type(t).__name__}, not a torch.Tensor")
    return dtype_name(t, f"tensor {name!r}")


def dtype_name(t: Tensor, where: str, error: type[Exception] = ValueError) -> str:
    """The safetensors dtype name of a dense tensor of a saved dtype; else ``error`` naming ``where``."""
    if t.layout != torch.strided:
        raise error(f"{where} has layout {t.layout}; only dense tensors are saved")
    dt = _NAMES.get(t.dtype)
    if dt is None:
        raise error(f"{where} has dtype {t.dtype}, which is not saved (known: {sorted(DTYPES)})")
    return dt


def _layout(tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None) -> tuple[bytes, list[str]]:
    """(length + header bytes, tensor names in data order) of a safetensors file, deterministic.

    Data is laid out like the ``safetensors`` package does (larger element sizes first, then by
    name, so every tensor is aligned); the header is key-sorted compact JSON padded with spaces to a
    multiple of 8 bytes."""
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError("safetensors metadata must map strings to strings")
    dtypes = {name: _check_tensor(name, t) for name, t in tensors.items()}
    order = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in order:
        t = tensors[name]
        size = t.numel() * t.element_size()
        header[name] = {"dtype": dtypes[name], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    head += b" " * (-len(head) % 8)
    return len(head).to_bytes(8, "little") + head, order


def _tensor_chunks(tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None) -> Iterator[bytes | memoryview]:
    """The bytes of a safetensors file, one tensor at a time (a CPU tensor's own memory, no copy)."""
    head, order = _layout(tensors, metadata)
    yield head
    for name in order:
        flat = tensors[name].detach().to("cpu").resolve_conj().resolve_neg().contiguous().reshape(-1)
        if flat.numel():
            # numpy's stubs declare ndarray.__buffer__ only for Python >= 3.12; it is a buffer on all versions
            yield memoryview(flat.view(torch.uint8).numpy())  # type: ignore[arg-type]


def tensors_to_bytes(tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """A safetensors file's bytes, deterministic: the same tensors and metadata give the same bytes
    (unlike the ``safetensors`` package, whose metadata order is random). Readable by
    ``safetensors`` and by :func:`load_tensors`."""
    return b"".join(bytes(c) for c in _tensor_chunks(tensors, metadata))


def tensors_sha256(tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None) -> str:
    """sha256 of :func:`tensors_to_bytes` without building the file in memory."""
    h = hashlib.sha256()
    for chunk in _tensor_chunks(tensors, metadata):
        h.update(chunk)
    return h.hexdigest()


def save_tensors(
    path: str | os.PathLike,
    tensors: Mapping[str, Tensor],
    metadata: Mapping[str, str] | None = None,
    sync_dir: bool = True,
) -> str:
    """Save tensors as one safetensors file, atomically and reproducibly, streaming one tensor at
    a time; returns the file's sha256."""
    return atomic_write(path, _tensor_chunks(tensors, metadata), sync_dir)


def save_tensors_once(
    path: str | os.PathLike, tensors: Mapping[str, Tensor], sha256: str, metadata: Mapping[str, str] | None = None
) -> bool:
    """Save tensors whose file has the given ``sha256`` (:func:`tensors_sha256`) to ``path``, unless
    a regular file there already has that hash (then it is reused). Returns whether it wrote.
    The folder is not fsynced: call :func:`fsync_dir` once after the last file."""
    path = Path(path)
    if _holds(path, sha256):
        return False
    got = save_tensors(path, tensors, metadata, sync_dir=False)
    if got != sha256:
        raise ValueError(
            f"tensors written to {path} changed while they were saved (sha256 {got[:12]}..., expected {sha256[:12]}...)"
        )
    return True


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors header: its dtype name, shape and byte range in the data section."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def _tensor_info(name: str, v: Any, path: Path) -> TensorInfo:
    """Validate one header entry: known dtype, non-negative int shape, offsets matching shape*itemsize."""
    where = f"safetensors file {path}: tensor {name!r}"
    if not isinstance(v, dict) or set(v) != {"dtype", "shape", "data_offsets"}:
        raise StorageError(f"{where} must be an object with exactly dtype, shape and data_offsets")
    dt, shape, offs = v["dtype"], v["shape"], v["data_offsets"]
    if not isinstance(dt, str) or dt not in DTYPES:
        raise StorageError(f"{where} has unknown dtype {dt!r} (known: {sorted(DTYPES)})")
    if not isinstance(shape, list) or len(shape) > 64 or not all(_nonneg_int(d) for d in shape):
        raise StorageError(f"{where} has an invalid shape {shape!r}")
    if not isinstance(offs, list) or len(offs) != 2 or not all(_nonneg_int(o) for o in offs) or offs[0] > offs[1]:
        raise StorageError(f"{where} has invalid data_offsets {offs!r}")
    nbytes = math.prod(shape) * DTYPES[dt].itemsize
    if offs[1] - offs[0] != nbytes:
        raise StorageError(
            f"{where}: data_offsets {offs} span {offs[1] - offs[0]} bytes, but shape {shape} of {dt} needs {nbytes}"
        )
    return TensorInfo(dt, tuple(shape), offs[0], offs[1])


def _nonneg_int(v: Any) -> bool:
    return type(v) is int and v >= 0


def _check_layout(infos: Mapping[str, TensorInfo], data_len: int, path: Path) -> None:
    """The tensors' byte ranges must tile the data section exactly: no gap, no overlap, nothing after."""
    pos = 0
    for name, info in sorted(infos.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if info.begin != pos:
            problem = "overlaps the previous tensor" if info.begin < pos else "leaves a gap before it"
            raise StorageError(f"safetensors file {path}: tensor {name!r} at bytes {info.begin}..{info.end} {problem}")
        pos = info.end
    if pos != data_len:
        raise StorageError(
            f"safetensors file {path}: tensors cover {pos} bytes of a {data_len}-byte data "
            "section (truncated or extra bytes)"
        )


def _parse_header(f: io.RawIOBase, size: int, path: Path) -> tuple[int, dict[str, TensorInfo], dict[str, str]]:
    """Read and validate the header of an open safetensors file of ``size`` bytes.

    Returns (header length, tensors by name, metadata). Nothing is allocated beyond the header,
    whose length is checked against :data:`MAX_HEADER_BYTES` and the file size first.
    """
    what = "safetensors file"
    if size < 8:
        raise StorageError(f"{what} {path} is {size} bytes: too short for a safetensors header")
    f.seek(0)
    raw_len = bytearray(8)
    _read_exact(f, memoryview(raw_len), path, what)
    n = int.from_bytes(raw_len, "little")
    if n > MAX_HEADER_BYTES:
        raise StorageError(f"{what} {path} declares a {n}-byte header (more than {MAX_HEADER_BYTES}): refused")
    if n > size - 8:
        raise StorageError(
            f"{what} {path} declares a {n}-byte header but holds only {size - 8} bytes after the "
            "length: it was truncated"
        )
    # read in 1 MiB pieces, each scanned as it arrives: a header too deep or holding a string longer
    # than MAX_HEADER_STRING_BYTES (its metadata) is refused before the rest is read, held or parsed
    raw = bytearray()
    scan = JsonScan(path, f"{what} header of", MAX_JSON_DEPTH, MAX_HEADER_STRING_BYTES)
    while len(raw) < n:
        piece = f.read(min(_CHUNK, n - len(raw)))
        if not piece:
            raise StorageError(f"{what} {path} ended early (read {8 + len(raw)} of {8 + n} bytes): it was truncated")
        scan.feed(piece)
        raw += piece
    header = _loads(raw, path, f"{what} header of")
    if not isinstance(header, dict):
        raise StorageError(f"{what} {path}: the header is not a JSON object")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise StorageError(f"{what} {path}: __metadata__ must map strings to strings")
    infos = {}
    for name, v in header.items():
        if not name:
            raise StorageError(f"{what} {path}: a tensor has an empty name")
        infos[name] = _tensor_info(name, v, path)
    _check_layout(infos, size - 8 - n, path)
    return n, infos, meta


def read_tensor_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """The validated header of a safetensors file: tensors by name and the metadata (no data read)."""
    path = Path(path)
    f, size = _open_regular(path, "tensor file")
    with f:
        _, infos, meta = _parse_header(f, size, path)
    return infos, meta


def _read_tensor(f: io.RawIOBase, info: TensorInfo, start: int, h: Any, path: Path, name: str) -> Tensor:
    """Read one tensor's bytes (already validated against the file size) into a fresh tensor."""
    nbytes = info.end - info.begin
    buf = torch.empty(nbytes, dtype=torch.uint8)
    if nbytes:
        f.seek(start + info.begin)
        # numpy's stubs declare ndarray.__buffer__ only for Python >= 3.12; it is a buffer on all versions
        view = memoryview(buf.numpy())  # type: ignore[arg-type]
        _read_exact(f, view, path, "tensor file")
        if h is not None:
            h.update(view)
    if info.dtype == "BOOL" and nbytes and int(buf.max()) > 1:
        raise StorageError(f"tensor file {path}: BOOL tensor {name!r} holds bytes other than 0 and 1")
    return buf.view(info.torch_dtype).reshape(info.shape)


def load_tensors(
    path: str | os.PathLike, sha256: str | None = None, device: str | torch.device = "cpu", max_bytes: int | None = None
) -> dict[str, Tensor]:
    """Load a safetensors file, checking it before any tensor is allocated.

    The file must be a regular file (not a symlink) of at most ``max_bytes``; with ``sha256``, it
    is hashed by streaming and refused if the hash differs; its header must be valid (see
    :func:`read_tensor_header`). The bytes read into the tensors are hashed again, so a file changed
    between the checks and the read is refused too. Every problem with the file is a :class:`StorageError`.
    """
    path = Path(path)
    if sha256 is not None and not is_sha256(sha256):
        raise StorageError(f"tensor file {path}: the expected sha256 {str(sha256)[:80]!r} is not 64 hex digits")
    f, size = _open_regular(path, "tensor file")
    try:
        with f:
            if max_bytes is not None and size > max_bytes:
                raise StorageError(f"tensor file {path} is {size} bytes, more than the {max_bytes} it can be")
            if sha256 is not None:
                got = _sha256_open(f)
                if got != sha256:
                    raise StorageError(
                        f"tensor file {path} fails its sha256 check (expected {sha256[:12]}..., "
                        f"got {got[:12]}...): it was modified or truncated"
                    )
            n, infos, _ = _parse_header(f, size, path)
            h = None
            if sha256 is not None:
                h = hashlib.sha256()
                head = bytearray(8 + n)
                f.seek(0)
                _read_exact(f, memoryview(head), path, "tensor file")
                h.update(head)
            out = {}
            for name, info in sorted(infos.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
                out[name] = _read_tensor(f, info, 8 + n, h, path, name)
            if h is not None and h.hexdigest() != sha256:
                raise StorageError(f"tensor file {path} changed while it was read")
    except StorageError:
        raise
    except Exception as e:  # a reader error of another kind (I/O, memory): still the file's problem
        raise StorageError(f"tensor file {path} cannot be read: {type(e).__name__}: {str(e)[:200]}") from None
    return {k: v.to(device) for k, v in out.items()}


def tensors_misfit(got: Mapping[str, Tensor], want: Mapping[str, Tensor], exact_dtype: bool = False) -> str | None:
    """What keeps the tensors ``got`` (read from a file) from fitting the template ``want`` (a module's
    state dict, or meta tensors): missing or unexpected keys, shapes, dtypes (``exact_dtype``: the same;
    else floating where the template is, other dtypes the same: a relabelled or integer tensor is
    never cast into a weight); None if they fit."""
    missing, extra = [k for k in want if k not in got], [k[:80] for k in got if k not in want]
    both = [k for k in want if k in got]
    shapes = [k for k in both if tuple(got[k].shape) != tuple(want[k].shape)]
    dtypes = [
        k
        for k in both
        if got[k].dtype != want[k].dtype
        and (exact_dtype or not (got[k].is_floating_point() and want[k].is_floating_point()))
    ]
    parts = [f"{len(missing)} keys missing (e.g. {missing[:3]})"] if missing else []
    if extra:
        parts.append(f"{len(extra)} unexpected keys (e.g. {extra[:3]})")
    if shapes:
        k = shapes[0]
        a, b = list(got[k].shape), list(want[k].shape)
        parts.append(f"{len(shapes)} shapes differ (e.g. {k!r}: {a} in the file, {b} in the module)")
    if dtypes:
        k = dtypes[0]
        da, db = got[k].dtype, want[k].dtype
        parts.append(f"{len(dtypes)} dtypes differ (e.g. {k!r}: {da} in the file, {db} in the module)")
    return "; ".join(parts) or None


# --------------------------------------------------------------------------- fingerprints


def tensors_fingerprint(tensors: Mapping[str, Tensor], dtype: torch.dtype | None = None) -> str:
    """sha256 over names, dtypes, shapes and bytes of a state dict, in sorted key order.

    Identifies a base model exactly: a trajectory recorded on one teacher is refused on another.
    With ``dtype``, floating tensors are cast to it first (a teacher cast to bf16 after recording
    matches the recorded teacher's bf16 fingerprint, because the cast is deterministic).
    """
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        t = t.to("cpu").contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def lowest_float_dtype(tensors: Mapping[str, Tensor]) -> torch.dtype | None:
    """The least precise floating dtype among ``tensors`` (None if none is floating)."""
    dts = {t.dtype for t in tensors.values() if t.is_floating_point()}
    return min(dts, key=lambda d: torch.finfo(d).eps * -1) if dts else None


def config_hash(config: Mapping[str, Any]) -> str:
    """A short, stable hash of a JSON-serialisable config (cache keys)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]
