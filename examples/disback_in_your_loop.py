"""Adding DisBack to an existing loop: record the path once, then swap three names.

    python examples/disback_in_your_loop.py --iterations 300

The base loop below is what a DMD2 user already has (``train_step`` or their own updates); the
DisBack version differs in: the recorded trajectory, ``Backtrack`` around the method, the fake
score's starting point, and ``bt.target`` in place of the teacher.
"""
from __future__ import annotations

import argparse
import copy
import tempfile

import torch

from disback_core import Backtrack, FixedInterval, LoraSpec, Trajectory, make_generator, record_degradation, train_step, trainable_copy
from disback_core.adapters import DMD2
from disback_core.bench.problems import get_problem


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(allow_abbrev=False)
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--degradation-steps", type=int, default=500)
    ap.add_argument("--cache-dir")
    ap.add_argument("--teacher-steps", type=int, default=8000)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    problem = get_problem("toy2d", args.cache_dir, teacher_steps=args.teacher_steps)
    teacher, g = problem.teacher, torch.Generator().manual_seed(0)
    next_batch = lambda: problem.batch(256, g)  # noqa: E731
    method = DMD2(sigma_data=problem.sigma_data)
    results = {}
    for use_disback in (False, True):
        torch.manual_seed(0)
        generator = make_generator(teacher, sigma_init=80.0)
        target, fake, distiller = teacher, trainable_copy(teacher), method
        if use_disback:
            # 1. Degradation Recording: 5 LoRA nodes from the teacher toward the frozen initial generator.
            g0 = copy.deepcopy(generator).requires_grad_(False)
            traj = record_degradation(teacher, g0, method, next_batch, steps=args.degradation_steps,
                                      interval=args.degradation_steps // 5, lr=1e-4, lora=LoraSpec(rank=8))
            with tempfile.TemporaryDirectory() as d:  # the path is a folder of safetensors files
                traj.save(d)
                traj = Trajectory.load(d, teacher)
            # 2. Distribution Backtracking: the only changes to the loop.
            distiller = Backtrack(method, traj, FixedInterval.from_share(args.iterations, traj.last, share=0.1))
            fake, target = distiller.initial_fake(), distiller.target
        g_opt = torch.optim.AdamW(generator.parameters(), 1e-4, weight_decay=0.01)
        f_opt = torch.optim.AdamW([*fake.parameters(), *distiller.critic_parameters()], 1e-4, weight_decay=0.01)
        for _ in range(args.iterations):
            train_step(distiller, generator, fake, target, g_opt, f_opt, next_batch, max_grad_norm=10.0)
        z, c = problem.eval_inputs()
        with torch.no_grad():
            sw = problem.evaluate(generator(z, c))["sw"]
        label = "DMD2 + DisBack" if use_disback else "DMD2"
        switches = f", target switches {distiller.switches}" if use_disback else ""
        print(f"{label:15s} sliced W2 {sw:.4f}{switches}")
        results[label] = sw
        if use_disback:
            results["switches"] = list(distiller.switches)
    return results


if __name__ == "__main__":
    main()
