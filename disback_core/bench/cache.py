"""Train-once caches for the built-in teachers and feature networks.

A cached model is a folder ``<cache>/<name>-<config hash>/`` with ``weights.safetensors`` and
``info.json`` (config, sha256 of the weights, what training reported). A cache whose files are
missing, corrupted or for another config is not loaded: it is retrained, with a warning.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from ..storage import StorageError, config_hash, load_tensors, read_json, save_tensors, write_json

__all__ = ["default_cache_dir", "cached_model"]

log = logging.getLogger(__name__)
FORMAT = 1


def default_cache_dir() -> Path:
    """``$DISBACK_CACHE`` if set, else ``~/.cache/disback``."""
    return Path(os.environ.get("DISBACK_CACHE", Path.home() / ".cache" / "disback"))


def cached_model(
    name: str,
    config: Mapping[str, Any],
    build: Callable[[], nn.Module],
    train: Callable[[nn.Module], Mapping[str, Any]],
    cache_dir: str | os.PathLike | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Return ``(model, info)``: loaded from the cache if a verified entry exists, else trained.

    ``build()`` makes the untrained model from ``config``; ``train(model)`` trains it in place
    (deterministically, from seeds in ``config``) and returns JSON-serialisable facts about the
    run (losses, seconds). ``info`` holds those facts and ``"cached": bool``.
    """
    key = {"name": name, "format": FORMAT, **dict(config)}
    folder = Path(cache_dir or default_cache_dir()) / f"{name}-{config_hash(key)}"
    model = build()
    if folder.exists():
        try:
            meta = read_json(folder / "info.json", "cache info")
            if meta.get("config") != key:
                raise StorageError(f"cache info {folder / 'info.json'} is for another config")
            state = load_tensors(folder / "weights.safetensors", sha256=meta.get("sha256"))
            missing, unexpected = model.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise StorageError(
                    f"cached weights {folder} do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
                )
            log.info("loaded %s from cache %s", name, folder)
            return model, {**meta.get("train", {}), "cached": True, "path": str(folder)}
        except StorageError as e:
            warnings.warn(f"{e}; retraining {name}", RuntimeWarning, stacklevel=2)
            model = build()
    log.info("training %s (cache %s)", name, folder)
    facts = dict(train(model))
    sha = save_tensors(folder / "weights.safetensors", model.state_dict())
    write_json(folder / "info.json", {"config": key, "sha256": sha, "train": facts})
    return model, {**facts, "cached": False, "path": str(folder)}
