"""Optional experiment trackers for benchmark curves: TensorBoard or wandb, only if installed.

Nothing here is imported by the library's core, and neither package is a dependency: asking for
a tracker that is not installed is a clear error, and ``"none"`` (the default) logs through plain
Python ``logging`` only.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["make_tracker", "TRACKERS"]

TRACKERS = ("none", "tensorboard", "wandb")
log = logging.getLogger(__name__)

Tracker = Callable[[str, int, dict[str, float]], None]  # (run name, generator iteration, scalars)


def _require(module: str, package: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise RuntimeError(
            f"tracker needs the '{package}' package, which is not installed: pip install {package}"
        ) from e


def make_tracker(kind: str, out_dir: str | Path, project: str = "disback") -> Tracker:
    """A function ``track(run, iteration, scalars)`` writing to the chosen backend."""
    if kind not in TRACKERS:
        raise ValueError(f"tracker must be one of {TRACKERS}, got {kind!r}")
    if kind == "none":
        return lambda run, it, scalars: log.debug("%s it %d %s", run, it, scalars)
    if kind == "tensorboard":
        _require("tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        writers: dict[str, Any] = {}

        def track_tb(run: str, it: int, scalars: dict[str, float]) -> None:
            w = writers.setdefault(run, SummaryWriter(str(Path(out_dir) / "tensorboard" / run)))
            for k, v in scalars.items():
                w.add_scalar(k, v, it)
            w.flush()

        return track_tb
    wandb = _require("wandb", "wandb")
    runs: dict[str, Any] = {}

    def track_wandb(run: str, it: int, scalars: dict[str, float]) -> None:
        if run not in runs:
            runs[run] = wandb.init(project=project, name=run, dir=str(out_dir), reinit=True)
        runs[run].log(dict(scalars), step=it)

    return track_wandb
