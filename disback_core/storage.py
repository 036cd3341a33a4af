"""Safe persistence: safetensors + JSON, sha256, atomic writes, verified loads. No pickle.

Every writer goes through a temporary file in the destination folder, ``fsync`` and
``os.replace``, so a crash leaves either the old file or the new one, never a torn one. Every
reader checks what it can (existence, JSON syntax, safetensors header, sha256) and raises
:class:`StorageError` naming the file and the first problem found.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

__all__ = [
    "StorageError",
    "atomic_write_bytes",
    "write_json",
    "read_json",
    "save_tensors",
    "load_tensors",
    "sha256_file",
    "tensors_fingerprint",
    "lowest_float_dtype",
    "config_hash",
]


class StorageError(ValueError):
    """A file is missing, corrupted, tampered with, or belongs to something else."""


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write ``obj`` as indented, key-sorted JSON."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """Read JSON, raising :class:`StorageError` naming ``path`` when missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise StorageError(f"{what} {path} is missing")
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StorageError(f"{what} {path} is not valid JSON: {e}") from e


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_tensors(path: str | os.PathLike, tensors: Mapping[str, Tensor],
                 metadata: Mapping[str, str] | None = None) -> str:
    """Save tensors as one safetensors file, atomically; returns the file's sha256."""
    from safetensors.torch import save

    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    data = save(clean, metadata=dict(metadata) if metadata else None)
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def load_tensors(path: str | os.PathLike, sha256: str | None = None,
                 device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """Load a safetensors file; with ``sha256``, refuse a file whose hash differs."""
    from safetensors.torch import load

    path = Path(path)
    if not path.is_file():
        raise StorageError(f"tensor file {path} is missing")
    data = path.read_bytes()
    if sha256 is not None:
        got = hashlib.sha256(data).hexdigest()
        if got != sha256:
            raise StorageError(f"tensor file {path} fails its sha256 check (expected {sha256[:12]}..., got {got[:12]}...): "
                               "it was modified or truncated")
    try:
        out = load(data)
    except Exception as e:  # safetensors raises its own error types for a bad header or size
        raise StorageError(f"tensor file {path} is not a valid safetensors file: {e}") from e
    return {k: v.to(device) for k, v in out.items()}


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
