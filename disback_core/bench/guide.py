"""``disback guide``: trained students with and without Distillation++ (Park, Lee, Ye 2024).

For every run of a ``disback bench`` folder (its ``results.json`` and the
``generator-LABEL-seedS.safetensors`` weights the runner saves), rebuild the K-step student,
sample the problem's fixed evaluation inputs plainly (K network evaluations) and with teacher
guidance at the first ``g`` steps for each ``lam`` (K + g evaluations), and write
``guide.json`` and ``guide.md``: the primary metric (mean and std over seeds) against total
network evaluations (student + teacher) and wall seconds per 1000 samples. This answers whether
one teacher evaluation buys more than one more student step.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch

from ..denoisers import make_generator
from ..fewstep import make_fewstep_generator, sample_fewstep
from ..guidance import default_final_sigma, distillation_pp_sample
from ..storage import load_tensors, read_json, write_json
from .problems import Problem, get_problem
from .runner import SCHEMA, weights_name

__all__ = ["guide_folder", "guide_main", "guide_table"]

GUIDE_SCHEMA = "disback-guide/1"
SAMPLE_SEED = 4321  # the runner's evaluation noise seed, so "plain" reproduces its last evaluation


def _student(problem: Problem, run: dict[str, Any], folder: Path) -> torch.nn.Module:
    spec = run["spec"]
    steps = int(spec.get("student_steps", 1))
    sigmas = run.get("student_sigmas") or [run["sigma_init"]]
    g = make_generator(problem.teacher, sigmas[0]) if steps == 1 else make_fewstep_generator(problem.teacher, sigmas)
    path = folder / weights_name(run["label"], run["seed"])
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no saved generator weights (rerun the bench with this version)")
    g.load_state_dict(load_tensors(path))
    return g.requires_grad_(False).eval()


def _sample(
    student: torch.nn.Module,
    teacher: Any,
    z: torch.Tensor,
    cond: Any,
    guided: int,
    lam: float,
    final_sigma: float | None,
    stats: dict[str, int],
    chunk: int = 1000,
) -> torch.Tensor:
    gen = torch.Generator().manual_seed(SAMPLE_SEED)
    out = []
    for i in range(0, z.shape[0], chunk):
        zc, cc = z[i : i + chunk], None if cond is None else cond[i : i + chunk]
        if guided == 0:
            out.append(sample_fewstep(student, zc, cc, generator=gen, stats=stats))
        else:
            out.append(
                distillation_pp_sample(
                    student,
                    teacher,
                    zc,
                    cc,
                    guided_steps=guided,
                    lam=lam,
                    final_sigma=final_sigma,
                    teacher_noise="student",
                    generator=gen,
                    stats=stats,
                )
            )
    return torch.cat(out)


def guide_folder(
    folder: str | Path,
    *,
    guided_steps: list[int],
    lams: list[float],
    cache_dir: Any = None,
    problem: Problem | None = None,
    final_sigmas: list[float | None] | None = None,
) -> dict[str, Any]:
    """Evaluate every run of one bench folder plainly and with Distillation++; writes guide.json and guide.md.

    ``final_sigmas``: the teacher's noise levels tried when the last student step is guided
    (``None``: :func:`~disback_core.guidance.default_final_sigma`)."""
    folder = Path(folder)
    res = read_json(folder / "results.json", "benchmark results")
    if res.get("schema") != SCHEMA:
        raise ValueError(f"{folder / 'results.json'}: not a {SCHEMA} results file")
    teacher = res.get("teacher", {})
    if problem is None:
        kw = {"teacher_steps": teacher["steps"]} if "steps" in teacher else {}
        problem = get_problem(res["problem"], cache_dir, **kw)
    key = Path(problem.teacher_info.get("path", "")).name
    if "cache_key" in teacher and key and key != teacher["cache_key"]:
        raise ValueError(
            f"{folder}: the students were distilled from teacher {teacher['cache_key']}, "
            f"but {key} was loaded; pass the bench's --cache-dir"
        )
    z, c = problem.eval_inputs()
    rows: list[dict[str, Any]] = []
    for run in res["runs"]:
        student = _student(problem, run, folder)
        k = int(run["spec"].get("student_steps", 1))
        sig = run.get("student_sigmas") or [run["sigma_init"]]
        finals = final_sigmas or [None]
        configs = [(0, 0.0, None)] + [
            (g, lam, fs if g == k else None)
            for g in guided_steps
            if 1 <= g <= k
            for lam in lams
            for fs in (finals if g == k else [None])
        ]
        for g, lam, fs in configs:
            stats: dict[str, int] = {}
            t0 = time.perf_counter()
            x = _sample(student, problem.teacher, z, c, g, lam, fs, stats)
            sec = time.perf_counter() - t0
            chunks = -(-z.shape[0] // 1000)  # stats count calls on chunks of 1000 samples
            last = (default_final_sigma(sig) if fs is None else fs) if g == k else None
            rows.append(
                {
                    "label": run["label"],
                    "seed": run["seed"],
                    "student_steps": k,
                    "guided_steps": g,
                    "lam": lam,
                    "final_sigma": last,
                    "student_evals": stats["student_evals"] // chunks,
                    "teacher_evals": stats.get("teacher_evals", 0) // chunks,
                    "seconds_per_1000": sec * 1000 / z.shape[0],
                    "metrics": problem.evaluate(x, c),
                }
            )
    out = {
        "schema": GUIDE_SCHEMA,
        "problem": problem.name,
        "primary": problem.primary,
        "rows": rows,
        "references": res.get("references", {}),
    }
    write_json(folder / "guide.json", out)
    (folder / "guide.md").write_text(guide_table(out) + "\n")
    return out


def guide_table(result: dict[str, Any]) -> str:
    """Markdown: one line per (label, guided steps, lam), the primary metric over seeds vs evaluations."""
    m = result["primary"]

    def key(r: dict[str, Any]) -> tuple[Any, ...]:
        return r["label"], r["guided_steps"], r["lam"], r.get("final_sigma")

    keys = list(dict.fromkeys(key(r) for r in result["rows"]))
    lines = [
        f"| student | K | guided steps | lam | teacher sigma, last step | NFE (student + teacher) | {m} mean | "
        f"{m} std | seeds | s / 1000 samples |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for lab, g, lam, fs in keys:
        rs = [r for r in result["rows"] if key(r) == (lab, g, lam, fs)]
        v = [r["metrics"][m] for r in rs]
        r0 = rs[0]
        lines.append(
            f"| {lab} | {r0['student_steps']} | {g} | {lam if g else '-'} | "
            f"{'-' if fs is None else format(fs, '.3g')} | "
            f"{r0['student_evals'] + r0['teacher_evals']} ({r0['student_evals']} + {r0['teacher_evals']}) | "
            f"{statistics.fmean(v):.4g} | {statistics.stdev(v) if len(v) > 1 else 0.0:.2g} | {len(v)} | "
            f"{statistics.fmean(r['seconds_per_1000'] for r in rs):.3g} |"
        )
    return "\n".join(lines)


def guide_main(
    folders: list[str],
    *,
    guided_steps: list[int],
    lams: list[float],
    cache_dir: Any = None,
    threads: int | None = None,
    final_sigmas: list[float | None] | None = None,
) -> int:
    if threads:
        torch.set_num_threads(threads)
    for folder in folders:
        out = guide_folder(folder, guided_steps=guided_steps, lams=lams, cache_dir=cache_dir, final_sigmas=final_sigmas)
        print(f"{folder} ({out['problem']}):\n{guide_table(out)}\n")
    return 0
