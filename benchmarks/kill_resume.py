"""Kill-and-resume fault injection for training states (:mod:`disback_core.state`).

A worker trains a tiny model plus a ``pad x pad`` linear layer (AdamW, LambdaLR, a data sampler's
generator, torch/numpy/Python RNG used in every step) and saves a state after every step. It is
SIGKILLed at seeded random points (into a step, into a save, or anywhere early in a run) and
restarted, resuming from the folder's latest state. After every kill the latest state must load,
verify, be no older than the last save reported complete, and equal the uninterrupted reference
run's state at its step (weights, optimizer, scheduler, every RNG: one sha256); every other folder
left there must be refused or be such a complete state; every loss any worker printed must equal the
reference run's. Finally a worker resumes to the end and its parameters must equal the reference
run's bit for bit. Workers are forked from one server process that paid the imports (see
``tests/_resume_worker.py``). CPU, one torch thread.

    python benchmarks/kill_resume.py --out benchmarks/results/kill_resume.json
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from _resume_worker import kill_campaign  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--kills", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=150, help="length of the run (kills stop short of its end)")
    ap.add_argument("--pad", type=int, default=1024, help="pad layer width: 1024 gives 12 MiB states")
    ap.add_argument("--keep", type=int, default=2)
    ap.add_argument("--workdir", help="default: a temporary folder, removed afterwards")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        r = kill_campaign(args.workdir or tmp, kills=args.kills, seed=args.seed, steps=args.steps, pad=args.pad,
                          keep=args.keep)
    ok = (r["loads_after_kill_failed"] == 0 and r["partial_accepted"] == 0 and r["step_dirs_refused"] == 0
          and r["losses_equal"] == r["losses_checked"] and r["final_params_equal"] and not r["stray_entries"]
          and not r["failures"])
    result = {"command": "python benchmarks/kill_resume.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": f"{platform.machine()}, 1 torch thread, torch {torch.__version__}, CPU",
              "settings": {"kills": args.kills, "seed": args.seed, "steps": args.steps, "pad": args.pad,
                           "keep": args.keep, "save_every": 1},
              "all_promises_kept": ok, **r}
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2, sort_keys=False) + "\n")
    return result


if __name__ == "__main__":
    main()
