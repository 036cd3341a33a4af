"""Kill-and-check fault injection for sharded training states (:mod:`disback_core.sharded_state`).

Workers save a sharded state at step after step (DCP + HuggingFace safetensors storage), at world
size 1 (plain modules) and at world size 2 (FSDP2 on CPU over gloo, two forked processes), in turn.
They are SIGKILLed at seeded random points (into a save, just after one, or anywhere early; at
world size 2 both ranks, in a random order, a few ms apart). A third resume by re-saving the live
step or an earlier one. After every kill the run folder's latest state must load at world size 1
(states saved at 2 are resharded on the way), verify, and equal bit for bit the state of the last
save reported complete or of the save in flight (each step's state is rebuilt from its step and
worker generation); every ``step-*`` folder must load and equal its step's state; every temporary
folder must be refused or complete. Finally one worker per folder runs to its end and the folder
must hold only ``latest.json`` and the last ``keep`` step folders. Workers are forked from one server
process that paid the imports (see ``tests/_sharded_kill.py``). CPU, one torch thread per process.

    python benchmarks/kill_sharded.py --out benchmarks/results/kill_sharded.json
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

from _sharded_kill import kill_campaign  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--kills", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2], help="world sizes, in turn")
    ap.add_argument("--pad", type=int, default=384, help="pad layer width: 384 gives 1.7 MiB states")
    ap.add_argument("--keep", type=int, default=2)
    ap.add_argument("--workdir", help="default: a temporary folder, removed afterwards")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        r = kill_campaign(
            args.workdir or tmp,
            kills=args.kills,
            seed=args.seed,
            worlds=tuple(args.worlds),
            pad=args.pad,
            keep=args.keep,
            timeout=3600,
        )
    ok = (
        r["loads_after_kill_failed"] == 0
        and r["partial_accepted"] == 0
        and r["step_dirs_refused"] == 0
        and not r["failures"]
        and all(r["final_clean"].values())
    )
    result = {
        "command": "python benchmarks/kill_sharded.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": f"{platform.machine()}, 1 torch thread per process, torch {torch.__version__}, CPU, gloo",
        "settings": {
            "kills": args.kills,
            "seed": args.seed,
            "worlds": args.worlds,
            "pad": args.pad,
            "keep": args.keep,
            "save_every": 1,
        },
        "all_promises_kept": ok,
        **r,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    sys.exit(0 if main()["all_promises_kept"] else 1)
