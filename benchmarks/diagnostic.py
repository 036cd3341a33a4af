"""Validate the critic-lag diagnostic (disback_core.diagnostics) on every measured regime, leave-one-regime-out.

For each regime: the statistic on the *base* runs' logs (score-gap log growth over the first 25% of
the iterations, the mean over seeds), and the measured gain of the default DisBack over the base
(final metric, mean over seeds; "helps" = the base's mean minus DisBack's exceeds the base's seed
sd). Leave-one-regime-out: the threshold is chosen on the other regimes (the midpoint that
classifies them best), then applied to the held-out one. Writes a Markdown table and JSON.

    python benchmarks/diagnostic.py            # -> benchmarks/results/diagnostic/TABLE.md, table.json

A regime folder whose results predate the logs takes its base logs from
``benchmarks/results/diagnostic/<regime>/`` (base runs only, rerun with the same flags).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics as st
from pathlib import Path

from disback_core.diagnostics import run_growth

R = Path(__file__).resolve().parent / "results"
DEFAULT_LABELS = ("disback-degradation_lr_scale3", "disback")  # the default DisBack, by the name each set used

# (name, results folder, where the base logs are when the folder has none)
REGIMES = [
    ("toy2d", "regimes/5seeds/toy2d", None),
    ("toy2d-edm", "regimes/5seeds/toy2d-edm", "diagnostic/toy2d-edm"),
    ("grid25", "regimes/5seeds/grid25", "diagnostic/grid25"),
    ("toy2d fresh student", "regimes/5seeds/toy2d-fresh", "diagnostic/toy2d-fresh"),
    ("toy2d small student", "regimes/5seeds/toy2d-small", "diagnostic/toy2d-small"),
    ("toy2d 1 critic step", "regimes/5seeds/toy2d-critic1", None),
    ("toy2d 2 critic steps", "regimes/toy2d-critic2", None),
    ("toy2d fake lr 0.1x", "regimes/5seeds/toy2d-slowcritic", "diagnostic/toy2d-slowcritic"),
    ("toy2d fake lr 0.3x", "regimes/5seeds/toy2d-slowcritic0.3", None),
    ("toy2d fake lr 0.5x", "regimes/toy2d-slowcritic0.5", None),
    ("toy2d from a distilled G", "regimes/toy2d-distilled", None),
    ("digits DMD2 1 critic step", "image-regimes/digits-dmd2-critic1", None),
    ("digits DMD2 fake lr 0.3x", "image-regimes/digits-dmd2-slowcritic0.3", None),
    ("digits Diff-Instruct", "image-regimes/digits-di", None),
    ("digits SiD", "image-regimes/digits-sid", None),
    ("digits DMD2 small student", "image-regimes/digits-dmd2-small", None),
    ("digits DMD2 from a distilled G, 1 critic step", "image-regimes/digits-dmd2-distilled-critic1", None),
    ("digits-cond DMD2 1 critic step", "image-regimes/digits-cond-dmd2-critic1", None),
    ("digits-cond DMD2 fake lr 0.3x", "image-regimes/digits-cond-dmd2-slowcritic0.3", None),
    ("digits-cond Diff-Instruct", "image-regimes/digits-cond-di", None),
    ("digits-cond SiD", "image-regimes/digits-cond-sid", None),
    ("patches DMD2", "patches/dmd2", None),
    ("patches DMD2 1 critic step", "patches/dmd2-critic1", None),
    ("digits-flow DMD2", "digits-flow/dmd2", None),
    ("digits-flow SiD", "digits-flow/sid", None),
    ("digits-flow DMD2 1 critic step", "digits-flow/dmd2-critic1", None),
]


def regime_row(name: str, folder: str, logs_folder: str | None) -> dict | None:
    path = R / folder / "results.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    primary = data["primary"]
    runs = data["runs"]
    base = [r for r in runs if r["label"] == "base"]
    label = next((lab for lab in DEFAULT_LABELS if any(r["label"] == lab for r in runs)), None)
    dis = [r for r in runs if r["label"] == label]
    if not base or not dis:
        return None
    log_runs = base
    if logs_folder is not None:
        lp = R / logs_folder / "results.json"
        log_runs = [r for r in json.loads(lp.read_text())["runs"] if r["label"] == "base"] if lp.is_file() else []
    growths = [g for g in (run_growth(r) for r in log_runs) if g is not None]
    if not growths:
        return None
    b = [r["final"][primary] for r in base]
    d = [r["final"][primary] for r in dis]
    bm, dm = st.mean(b), st.mean(d)
    bsd = st.stdev(b) if len(b) > 1 else 0.0
    return {
        "regime": name,
        "folder": folder,
        "metric": primary,
        "base": bm,
        "base_sd": bsd,
        "disback": dm,
        "disback_sd": st.stdev(d) if len(d) > 1 else 0.0,
        "seeds": min(len(b), len(d)),
        "gain": (bm - dm) / bm,
        "helps": bm - dm > bsd,
        "growth": st.mean(growths),
        "growth_sd": st.stdev(growths) if len(growths) > 1 else 0.0,
    }


def best_threshold(rows: list[dict]) -> float:
    """The midpoint between sorted statistics that classifies ``rows`` best (ties: the smallest)."""
    gs = sorted({r["growth"] for r in rows})
    cands = [gs[0] - 1.0] + [(a + b) / 2 for a, b in zip(gs, gs[1:])] + [gs[-1] + 1.0]

    def acc(t: float) -> int:
        return sum((r["growth"] > t) == r["helps"] for r in rows)

    return max(cands, key=lambda t: (acc(t), -abs(t)))


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""

    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    ra, rb = ranks(a), ranks(b)
    ma, mb = st.mean(ra), st.mean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    return cov / math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--out", default=str(R / "diagnostic"))
    args = ap.parse_args()
    rows = [r for r in (regime_row(*spec) for spec in REGIMES) if r is not None]
    for i, row in enumerate(rows):
        others = rows[:i] + rows[i + 1 :]
        t = best_threshold(others)
        row["loo_threshold"] = t
        row["predicted"] = row["growth"] > t
    full = best_threshold(rows)
    correct = sum(r["predicted"] == r["helps"] for r in rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        "# The critic-lag diagnostic, leave-one-regime-out",
        "",
        "Statistic: log(score gap at the end / at the start of the first 25% of the base run), the mean over seeds",
        "(`disback_core.diagnostics`). Helps: the base's final mean minus DisBack's (the default: LoRA nodes at 3x)",
        "exceeds the base's seed sd. Predicted: the statistic above the threshold chosen on the other regimes.",
        "",
        "| regime | metric | base | DisBack (default) | seeds | gain | helps | gap growth (mean ± sd over seeds) | LOO threshold | predicted | right |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['regime']} | {r['metric']} | {r['base']:.4g} ± {r['base_sd']:.2g} | {r['disback']:.4g} ± {r['disback_sd']:.2g} "
            f"| {r['seeds']} | {100 * r['gain']:+.1f}% | {'yes' if r['helps'] else 'no'} | {r['growth']:+.2f} ± {r['growth_sd']:.2f} "
            f"| {r['loo_threshold']:+.2f} | {'helps' if r['predicted'] else 'no gain'} | {'yes' if r['predicted'] == r['helps'] else '**no**'} |"
        )
    rho = spearman([r["growth"] for r in rows], [r["gain"] for r in rows])
    helps = sum(r["helps"] for r in rows)
    lines += [
        "",
        f"Always answering the majority outcome ({'helps' if 2 * helps > len(rows) else 'no gain'}) would be right "
        f"{max(helps, len(rows) - helps)} of {len(rows)} times.",
        "",
        f"Spearman rank correlation of the statistic with the measured gain: {rho:+.2f} ({len(rows)} regimes).",
        "",
        f"Leave-one-regime-out: {correct} of {len(rows)} right. Threshold on all regimes: {full:+.2f} "
        f"(`LAG_THRESHOLD` in disback_core/diagnostics.py).",
        "",
        "Command: `python benchmarks/diagnostic.py` (the regimes' commands are in benchmarks/run_all.sh).",
    ]
    (out / "TABLE.md").write_text("\n".join(lines) + "\n")
    (out / "table.json").write_text(json.dumps({"rows": rows, "threshold_all": full, "loo_correct": correct, "spearman": rho}, indent=1))
    print("\n".join(lines))
    if not math.isfinite(full):
        raise SystemExit("no threshold")


if __name__ == "__main__":
    main()
