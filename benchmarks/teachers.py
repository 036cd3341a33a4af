"""Teacher quality on the built-in problems: multi-step vs one-step metrics and sample grids.

    python benchmarks/teachers.py --out benchmarks/results/teachers [--problems toy2d]

With ``--problems``, only those rows of an existing ``teachers.json`` are replaced.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from disback_core.bench.problems import PROBLEMS, get_problem
from disback_core.sampling import edm_sampler
from disback_core.storage import read_json, write_json


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False)
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--problems", nargs="+", choices=list(PROBLEMS), default=list(PROBLEMS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    old = out / "teachers.json"
    rows = read_json(old) if old.is_file() and args.problems != list(PROBLEMS) else {}
    for name in args.problems:
        p = get_problem(name)
        z, c = p.eval_inputs()
        with torch.no_grad():
            p.save_samples(edm_sampler(p.teacher, z, c, steps=18), out / f"{name}-multistep.png",
                           f"{name}: teacher, 18 Heun steps", c)
            p.save_samples(p.teacher(80.0 * z, 80.0, c), out / f"{name}-onestep.png", f"{name}: teacher, one step at sigma 80", c)
        refs = {str(s): p.references(s) for s in (80.0, 2.5, 1.0)}
        info = {k: v for k, v in p.teacher_info.items() if k not in ("path", "cached")}
        rows[name] = {"teacher": info, "references": refs}
        print(name, info)
        for s, r in refs.items():
            print(f"  sigma_init {s}: multi-step {r['teacher_multistep']}\n    one-step {r['teacher_onestep']}\n    data {r['data']}")
    write_json(out / "teachers.json", rows)


if __name__ == "__main__":
    main()
