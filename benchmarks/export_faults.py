"""Fault injection for exports: SIGKILL a process while it re-exports generators over one folder.

Two one-step generators of a tiny diffusers UNet (A and B) are exported over one folder in the
cycle A, A, B, B by a writer process forked from this (warm) one, so no kill waits for imports.
The writer is killed with SIGKILL after a seeded random delay, uniform over three median export
times. After each kill the folder (or, where the switch fell between the two renames of the
fallback, the previous export beside it) must load with :func:`load_generator`, its outputs must
equal A's or B's bit for bit, and be the last export that completed or the one in progress.
Leftover hidden folders (``.<name>.*.partial`` / ``.previous``) are counted; the next export
removes them. ``--no-exchange`` forces the two-rename fallback (no ``RENAME_EXCHANGE``).

    python benchmarks/export_faults.py --kills 60 --seed 0 --out benchmarks/results/export_faults.json
    python benchmarks/export_faults.py --kills 60 --seed 1 --no-exchange --out benchmarks/results/export_faults_two_renames.json

A crash before every file-system operation of a re-export is a test (tests/test_export.py).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import torch

CYCLE = ("A", "A", "B", "B")


def generators() -> dict[str, Any]:
    from diffusers import DDPMScheduler, UNet2DModel

    from disback_core import DiffusersDenoiser, OneStepGenerator

    out = {}
    for i, name in enumerate("AB"):
        torch.manual_seed(i)
        unet = UNet2DModel(sample_size=8, in_channels=2, out_channels=2, block_out_channels=(16, 32), layers_per_block=1,
                           down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                           up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4)
        out[name] = OneStepGenerator(DiffusersDenoiser(unet, scheduler=DDPMScheduler()), 10.0).eval()
    return out


def _writer(folder: Path, gens: dict[str, Any], progress: Path, offset: int, exchange: bool) -> None:
    """The child: export the cycle forever, appending "start <name>" / "done <name> <seconds>" lines."""
    from disback_core import export as ex

    if not exchange:
        ex._exchange = lambda a, b: False  # type: ignore[assignment]
    i = offset
    with open(progress, "a", buffering=1) as log:
        while True:
            name = CYCLE[i % len(CYCLE)]
            log.write(f"start {name}\n")
            t0 = time.perf_counter()
            ex.export_generator(gens[name], folder)
            log.write(f"done {name} {time.perf_counter() - t0:.6f}\n")
            i += 1


def _progress(path: Path) -> tuple[str | None, str | None, list[float]]:
    """(last completed export, export in progress at the kill or None, export seconds)."""
    done, current, secs = None, None, []
    for line in path.read_text().splitlines():
        parts = line.split()
        if parts[0] == "start":
            current = parts[1]
        elif parts[0] == "done" and len(parts) == 3:
            done, current = parts[1], None
            secs.append(float(parts[2]))
    return done, current, secs


def run(kills: int = 60, seed: int = 0, exchange: bool = True, workdir: str | None = None) -> dict[str, Any]:
    from disback_core import export_generator, load_generator

    torch.set_num_threads(1)
    gens = generators()
    z = torch.randn(4, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        refs = {k: g(z) for k, g in gens.items()}
    root = Path(tempfile.mkdtemp(prefix="export-faults-", dir=workdir))
    folder = root / "g"
    export_generator(gens["A"], folder)
    rng = random.Random(seed)
    rows, export_s, last = [], [0.05], "A"
    for kill in range(kills):
        progress = root / f"progress-{kill}.txt"
        progress.write_text("")
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child never returns
            try:
                _writer(folder, gens, progress, kill, exchange)
            finally:
                os._exit(1)
        delay = rng.uniform(0.0, 3 * statistics.median(export_s))
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        done, current, secs = _progress(progress)
        export_s.extend(secs)
        leftovers = sorted(p.name for p in root.iterdir() if p.name.startswith(".g."))
        allowed = {done or last} | ({current} if current else set())
        try:
            with torch.no_grad():
                out = load_generator(folder)(z)
            got = next((k for k, v in refs.items() if torch.equal(out, v)), None)
            error = None if got in allowed else f"loaded {got}, allowed {sorted(allowed)}"
        except Exception as e:  # any failure to load is a broken promise
            got, error = None, f"{type(e).__name__}: {e}"
        rows.append({"kill": kill, "delay_s": round(delay, 4), "completed_exports": len(secs), "loaded": got,
                     "in_progress": current, "leftover_hidden_folders": len(leftovers), "error": error})
        last = got or last
    export_generator(gens["A"], folder)  # the next export cleans up
    clean = sorted(p.name for p in root.iterdir() if p.name.startswith(".g."))
    with torch.no_grad():
        final_ok = torch.equal(load_generator(folder)(z), refs["A"])
    ok = sum(r["error"] is None for r in rows)
    mid = sum(r["in_progress"] is not None for r in rows)
    return {"kills": kills, "seed": seed, "switch": "rename-exchange" if exchange else "two-renames",
            "loaded_and_verified": ok, "failures": [r for r in rows if r["error"]],
            "killed_during_an_export": mid,
            "kills_with_leftover_hidden_folders": sum(r["leftover_hidden_folders"] > 0 for r in rows),
            "leftover_after_next_export": clean, "final_export_ok": bool(final_ok),
            "median_export_s": statistics.median(export_s[1:]) if len(export_s) > 1 else None,
            "torch": torch.__version__, "rows": rows}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--kills", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-exchange", action="store_true", help="force the two-rename switch")
    p.add_argument("--workdir", default=None)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    res = run(a.kills, a.seed, not a.no_exchange, a.workdir)
    summary = {k: v for k, v in res.items() if k != "rows"}
    print(json.dumps(summary, indent=2))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2, sort_keys=True) + "\n")
    return res


if __name__ == "__main__":
    sys.exit(0 if not main()["failures"] else 1)
