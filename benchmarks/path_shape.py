"""The shape of the recorded path: how far each node is from the teacher and from the initial generator.

For every path setting (a bench variant string, e.g. ``disback:node_mode=full`` or
``disback:rank=8,degradation_lr_scale=10``) the path is recorded exactly as ``disback bench`` records
it (same seed, batches and learning rate), then each node k is sampled with the EDM Heun sampler
(18 steps) from the problem's fixed evaluation noise, and the problem's distance (sliced W2 on the 2D
problems, Frechet distance in classifier features on digits) is measured to the teacher's samples
(node 0) and to the initial generator G0's samples. A path that reaches G0 has d(node N, G0) near the
floor d(G0, G0') of two sample sets; a path that barely moves has d(node k, teacher) near 0.

    python benchmarks/path_shape.py --problem toy2d --out benchmarks/results/path_shape-toy2d.json \\
        --variants disback disback:node_mode=full disback:degradation_lr_scale=10
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import torch

from disback_core.bench.problems import get_problem
from disback_core.bench.runner import RunSpec, _adapters, make_student, record_path
from disback_core.cli import PROBLEM_DEFAULTS, parse_variant
from disback_core.fewstep import fewstep_sigmas
from disback_core.sampling import edm_sampler
from disback_core.storage import write_json


@torch.no_grad()
def shape(problem, spec: RunSpec, seed: int, n: int) -> dict:
    a = _adapters()[spec.adapter]
    sigma_init = spec.sigma_init or a["sigma_init"]
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    method = a["cls"](sigma_data=problem.sigma_data)
    generator = make_student(problem, spec, sigma_init, fewstep_sigmas(1, sigma_max=sigma_init), seed)
    next_batch = lambda: problem.batch(spec.batch, g)  # noqa: E731
    t0 = time.process_time()
    with torch.enable_grad():
        traj = record_path(problem, spec, generator, method, next_batch)
    seconds = time.process_time() - t0
    z, c = problem.eval_inputs(n)
    z2, c2 = problem.eval_inputs(n, seed=54321)
    g0 = generator(z, c)
    floor = problem.distance(g0, generator(z2, c2))
    samples = [edm_sampler(traj.target(k), z, c, steps=18) for k in range(traj.last + 1)]
    return {
        "variant": spec.label,
        "seed": seed,
        "recording_cpu_seconds": seconds,
        "to_teacher": [problem.distance(s, samples[0]) for s in samples],
        "to_g0": [problem.distance(s, g0) for s in samples],
        "g0_floor": floor,
        "teacher_to_g0": problem.distance(samples[0], g0),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--problem", default="toy2d")
    p.add_argument("--student", default="copy")
    p.add_argument("--variants", nargs="+", default=["disback", "disback:node_mode=full"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    problem = get_problem(args.problem)
    d = PROBLEM_DEFAULTS[args.problem]
    base = RunSpec(problem=args.problem, batch=d["batch"], lr=d["lr"], degradation_steps=d["degradation_steps"],
                   student=args.student)
    rows = []
    for v in args.variants:
        spec = parse_variant(base, v)
        for seed in args.seeds:
            r = shape(problem, spec, seed, args.samples)
            rows.append(r)
            print(f"{r['variant']:<40} seed {seed}: to teacher " + " ".join(f"{x:.3f}" for x in r["to_teacher"])
                  + " | to G0 " + " ".join(f"{x:.3f}" for x in r["to_g0"]) + f" (G0 floor {r['g0_floor']:.3f})",
                  flush=True)
    write_json(args.out, {"command": "python benchmarks/path_shape.py " + " ".join(sys.argv[1:] if argv is None else argv),
                          "problem": args.problem, "student": args.student, "rows": rows,
                          "spec": dataclasses.asdict(base)})
    print(json.dumps({"wrote": args.out}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
