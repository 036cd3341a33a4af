"""Per-iteration cost of DisBack against the base method, and the cost of a target's forward.

Base and DisBack training steps are timed interleaved in one process (so machine noise hits both
alike) on the built-in problems' teachers; the target forward is timed for the teacher, a merged
LoRA node (the default) and an unmerged one. Writes JSON and prints a table.

    python benchmarks/overhead.py --out benchmarks/results/overhead.json
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

from disback_core import Backtrack, Batch, FixedInterval, LoraSpec, make_generator, record_degradation, train_step, trainable_copy
from disback_core.adapters import DMD2, DiffInstruct, SiD
from disback_core.bench.problems import get_problem
from disback_core.storage import write_json

METHODS = {"dmd2": (DMD2, 80.0), "di": (DiffInstruct, 1.0), "sid": (SiD, 2.5)}


def _timed(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def measure(problem_name: str, adapter: str, batch: int, reps: int, rounds: int) -> dict:
    problem = get_problem(problem_name)
    cls, sigma_init = METHODS[adapter]
    g = torch.Generator().manual_seed(0)
    nb = lambda: problem.batch(batch, g)  # noqa: E731
    method = cls(sigma_data=problem.sigma_data)
    gen_b = make_generator(problem.teacher, sigma_init)
    traj = record_degradation(problem.teacher, copy.deepcopy(gen_b).requires_grad_(False), method, nb,
                              steps=50, interval=10, lr=1e-3, lora=LoraSpec(rank=8))
    bt = Backtrack(method, traj, FixedInterval(10**9))  # stay on node N-1: every step uses a LoRA node
    gen_d = copy.deepcopy(gen_b)
    fake_b, fake_d = trainable_copy(problem.teacher), bt.initial_fake()
    opt = lambda m: torch.optim.Adam(m.parameters(), 1e-5)  # noqa: E731
    ob, ofb, od, ofd = opt(gen_b), opt(fake_b), opt(gen_d), opt(fake_d)
    step_b = lambda: train_step(method, gen_b, fake_b, problem.teacher, ob, ofb, nb)  # noqa: E731
    step_d = lambda: train_step(bt, gen_d, fake_d, bt.target, od, ofd, nb)  # noqa: E731
    for _ in range(3):
        step_b(), step_d()
    tb, td = [], []
    for _ in range(rounds):  # interleave blocks of steps
        tb += _timed(step_b, reps)
        td += _timed(step_d, reps)
    # target forward: teacher, merged node, unmerged node
    x = nb()
    xs = gen_b(x.z, x.cond).detach()
    sigma = torch.full((batch,), 1.0)
    unmerged = copy.copy(traj)
    unmerged.merge, unmerged._work, unmerged.active_node = False, None, -1
    mods = {"teacher": problem.teacher, "merged_node": traj.target(traj.last - 1),
            "unmerged_node": unmerged.target(traj.last - 1)}
    times: dict[str, list[float]] = {k: [] for k in mods}
    with torch.no_grad():
        for r in range(rounds + 1):  # interleaved like the steps; the first round is warm-up
            for name, mod in mods.items():
                t = _timed(lambda: mod(xs, sigma, x.cond), 5 * reps)
                times[name] += t if r else []
    fwd = {k: statistics.median(v) for k, v in times.items()}
    return {"problem": problem_name, "adapter": adapter, "batch": batch, "steps_timed": len(tb),
            "base_step_s": statistics.median(tb), "disback_step_s": statistics.median(td),
            "ratio": statistics.median(td) / statistics.median(tb),
            "forward_s": fwd, "forward_ratio_merged": fwd["merged_node"] / fwd["teacher"],
            "forward_ratio_unmerged": fwd["unmerged_node"] / fwd["teacher"]}


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False)
    ap.add_argument("--out", required=True)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for problem, batch in [("toy2d", 256), ("digits", 64)]:
        for adapter in METHODS:
            r = measure(problem, adapter, batch, args.reps, args.rounds)
            rows.append(r)
            print(f"{problem:7s} {adapter:5s} base {r['base_step_s']*1e3:7.2f} ms  disback {r['disback_step_s']*1e3:7.2f} ms  "
                  f"ratio {r['ratio']:.3f}  forward merged/teacher {r['forward_ratio_merged']:.3f}  "
                  f"unmerged/teacher {r['forward_ratio_unmerged']:.3f}", flush=True)
    write_json(args.out, {"threads": args.threads, "torch": torch.__version__, "rows": rows})


if __name__ == "__main__":
    main()
