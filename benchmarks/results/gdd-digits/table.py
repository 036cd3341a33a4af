"""Table of the GDD / GDD-I / DMD2 / DMD2+GDD-I digits runs (results.json in the sibling folders).

    .venv/bin/python benchmarks/results/gdd-digits/table.py [--plot]   # --plot: curves-vs-images.png

Per method (mean ± std over seeds): "FD at N it" is the mean FD over the evaluations at
iterations in (0.8 N, N] (the runner's final-value rule for an N-iteration run), so runs of
different lengths compare at equal generator iterations, i.e. at equal images of each kind. "Images" counts, per generator iteration, the real images the critic
consumed (GDD's D: one batch per D step; DMD2 consumes none) and the generator samples drawn
(critic steps + generator step, one batch each), as the runner records in images_per_iteration.
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
FOLDERS = [("gdd", "GDD"), ("gdd-i", "GDD-I (GDD + gddi freezing)"), ("dmd2", "DMD2"),
           ("dmd2-gddi", "DMD2 + gddi freezing")]


def ms(v: list[float], digits: int = 1) -> str:
    if not v:
        return "-"
    sd = statistics.stdev(v) if len(v) > 1 else 0.0
    return f"{statistics.fmean(v):.{digits}f} ± {sd:.{digits}f}"


def window(run: dict, n: int) -> float | None:
    """Mean FD over the evaluations at iterations in (0.8 n, n], the runner's final window for an
    n-iteration run; None when the run is shorter than n."""
    v = [e["metrics"]["fd"] for e in run["evals"] if 0.8 * n < e["iteration"] <= n]
    return statistics.fmean(v) if v and run["spec"]["iterations"] >= n else None


def cpu_at(run: dict, n: int) -> float | None:
    v = [e["cpu_seconds"] for e in run["evals"] if e["iteration"] == n]
    return v[0] if v else None


def main() -> int:
    rows = []
    refs = None
    for folder, name in FOLDERS:
        path = HERE / folder / "results.json"
        if not path.is_file():
            rows.append(f"| {name} | (not run) |||||||||")
            continue
        res = json.loads(path.read_text())
        refs = refs or res["references"]["80.0"]
        runs = [r for r in res["runs"] if r["label"] == "base"]
        its = runs[0]["spec"]["iterations"]
        ipi = runs[0]["images_per_iteration"]
        cols = [ms([v for v in (window(r, n) for r in runs) if v is not None]) for n in (200, 600, 900, 1800)]
        cpu = ms([r["cpu_seconds_per_iteration"] for r in runs], 3)
        c600 = ms([v for v in (cpu_at(r, 600) for r in runs) if v is not None], 0)
        rows.append(f"| {name} | {len(runs)}{' (partial)' if res.get('partial') else ''} | {its} | "
                    f"{ipi['real']} / {ipi['generated']} | {' | '.join(cols)} | {cpu} | {c600} | "
                    f"{runs[0].get('frozen_fraction', 0.0):.3f} |")
    print("| method | seeds | iterations | real / generated images per iteration | FD at 200 it | FD at 600 it | "
          "FD at 900 it | FD at 1800 it | CPU s / iteration | CPU s to 600 it | frozen fraction |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    if refs:
        print(f"\nreferences: teacher one-step (sigma 80) FD {refs['teacher_onestep']['fd']:.1f}, teacher 18-step Heun "
              f"FD {refs['teacher_multistep']['fd']:.2f}, held-out data FD {refs['data']['fd']:.2f}")
    return 0


def plot(path: Path) -> None:
    """Seed-mean FD against generator samples drawn and against CPU seconds, every method on one figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, (folder, name) in enumerate(FOLDERS):
        f = HERE / folder / "results.json"
        if not f.is_file():
            continue
        runs = [r for r in json.loads(f.read_text())["runs"] if r["label"] == "base"]
        n = min(len(r["evals"]) for r in runs)
        per = runs[0]["images_per_iteration"]["generated"]
        fd = [statistics.fmean(r["evals"][j]["metrics"]["fd"] for r in runs) for j in range(n)]
        xs = [runs[0]["evals"][j]["iteration"] * per for j in range(n)]
        cs = [statistics.fmean(r["evals"][j]["cpu_seconds"] for r in runs) for j in range(n)]
        for ax, x in zip(axes, (xs, cs)):
            ax.plot(x[1:], fd[1:], color=f"C{i}", label=f"{name} ({len(runs)} seeds)")
    for ax, lab in zip(axes, ("generator samples drawn", "CPU seconds of training (shared machine)")):
        ax.set_xlabel(lab)
        ax.set_ylabel("FD (digits)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    if "--plot" in sys.argv:
        plot(HERE / "curves-vs-images.png")
    sys.exit(main())
