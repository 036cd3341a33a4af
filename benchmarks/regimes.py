"""The regime table of docs/WHEN_DISBACK_HELPS.md, from benchmarks/results/regimes/*/results.json.

    python benchmarks/regimes.py            # prints the tables and writes benchmarks/results/regimes/TABLE.md

Per regime and variant: the final value (mean ± sd over seeds), the paired seeds in which the
variant is lower, the verdict against the base (better / worse when the means differ by more than
the base's seed sd, else "within spread"), and the iterations and CPU seconds (recording included)
to reach the base's final value, as ratios to the base's own.
"""

from __future__ import annotations

import json
from pathlib import Path

R = Path(__file__).resolve().parent / "results" / "regimes"

# regime folder -> (what it is, the command's regime flags)
REGIMES = {
    "toy2d": ("built-in toy2d (teacher copy, critic 5 steps at the generator's lr)", "--problem toy2d"),
    "toy2d-edm": ("teacher trained with EDM's default noise, N(-1.2, 1.2^2)", "--problem toy2d-edm"),
    "grid25": ("25 unequal modes, EDM-noise teacher", "--problem grid25"),
    "toy2d-fresh": ("student re-initialised (teacher's architecture)", "--problem toy2d --student fresh"),
    "toy2d-small": ("smaller student (width 64, depth 2), fresh", "--problem toy2d --student small"),
    "toy2d-critic2": ("two critic steps per generator step", "--problem toy2d --critic-steps 2"),
    "toy2d-critic1": ("one critic step per generator step", "--problem toy2d --critic-steps 1"),
    "toy2d-slowcritic0.5": ("slow critic: fake-score lr 0.5x", "--problem toy2d --fake-lr-scale 0.5"),
    "toy2d-slowcritic0.3": ("slow critic: fake-score lr 0.3x", "--problem toy2d --fake-lr-scale 0.3"),
    "toy2d-slowcritic": ("slow critic: fake-score lr 0.1x", "--problem toy2d --fake-lr-scale 0.1"),
    "toy2d-distilled": (
        "start from a distilled generator (the toy2d regime's base, seed 0, 600 it)",
        "--problem toy2d --init-generator benchmarks/results/regimes/toy2d/generator-base-seed0.safetensors",
    ),
}


def _fmt(v, d=3) -> str:
    return "not reached" if v is None else f"{v:.{d}g}"


def rows(name: str, res: dict) -> list[str]:
    p, summ = res["primary"], res["summary"]
    base = summ["base"]
    b = base["final"][p]
    teacher = next(iter(res["references"].values()))["teacher_multistep"][p]
    start = res["runs"][0]["evals"][0]["metrics"][p]
    # a base that ends at or above 0.9x its starting value did not improve: reaching its final value says nothing
    stalled = b["mean"] >= 0.9 * start
    out = [f"| {name} | base | {b['mean']:.4f} ± {b['std']:.4f} | - | - | 1 | 1 | {len(base['seeds'])} | {teacher:.4f} |"]
    for lab, s in summ.items():
        if lab == "base":
            continue
        f = s["final"][p]
        wins = "-"
        if s["seeds"] == base["seeds"]:
            wins = f"{sum(v < w for v, w in zip(f['per_seed'], b['per_seed']))}/{len(s['seeds'])}"
        diff = f["mean"] - b["mean"]
        verdict = "better" if diff < -b["std"] else "worse" if diff > b["std"] else "within spread"
        ratios = (
            "base did not improve | -"
            if stalled
            else f"{_fmt(s.get('ratio_iterations'))} | {_fmt(s.get('ratio_cpu_seconds'))}"
        )
        out.append(
            f"| {name} | {lab} | {f['mean']:.4f} ± {f['std']:.4f} | {wins} | {verdict} | {ratios} | "
            f"{len(s['seeds'])} | |"
        )
    return out


def table(folder: Path) -> list[str]:
    head = [
        "| regime | variant | final (mean ± sd) | seeds lower than base | verdict | iterations to base final (ratio) "
        "| CPU seconds to base final, recording included (ratio) | seeds | teacher multi-step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    out = list(head)
    for name in REGIMES:
        path = folder / name / "results.json"
        if not path.is_file():
            continue
        res = json.loads(path.read_text())
        if res.get("partial"):
            continue
        out += rows(name, res)
    return out


def path_table() -> list[str]:
    """Node distances (mean over seeds) from results/path_shape-*.json: to the teacher and to G0."""
    out = [
        "| problem (student) | path | d(node k, teacher), k = 1..N | d(node k, G0), k = 1..N | d(teacher, G0) "
        "| share of the way to G0 at node N |",
        "|---|---|---|---|---|---|",
    ]
    for path in sorted(R.parent.glob("path_shape-*.json")):
        res = json.loads(path.read_text())
        for v in dict.fromkeys(r["variant"] for r in res["rows"]):
            rs = [r for r in res["rows"] if r["variant"] == v]
            n = len(rs[0]["to_teacher"])
            mean = lambda key, k: sum(r[key][k] for r in rs) / len(rs)  # noqa: E731
            tg = sum(r["teacher_to_g0"] for r in rs) / len(rs)
            to_t = " ".join(f"{mean('to_teacher', k):.2f}" for k in range(1, n))
            to_g = " ".join(f"{mean('to_g0', k):.2f}" for k in range(1, n))
            share = 1 - mean("to_g0", n - 1) / tg
            out.append(f"| {res['problem']} ({res['student']}) | {v} | {to_t} | {to_g} | {tg:.2f} | {share:.2f} |")
    return out


def main() -> None:
    text = "\n".join(
        [
            "## Base, the paper's schedule with LoRA nodes, and LoRA nodes at 3x the degradation lr: 5 seeds",
            "",
            *table(R / "5seeds"),
            "",
            "## Every variant: 3 seeds",
            "",
            *table(R),
            "",
            "## The path's shape (benchmarks/path_shape.py; mean of 2 seeds)",
            "",
            *path_table(),
        ]
    )
    (R / "TABLE.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
