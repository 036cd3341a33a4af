"""Does the critic lag the generator? A diagnostic from what any distillation loop already logs.

DisBack helps where the fake score (the critic) lags the generator: one critic update per
generator update, or a fake-score learning rate below the generator's (docs/WHEN_DISBACK_HELPS.md).
The signature of a lagging critic is in the score gap every generator loss reports,
``gap = mean ||D_fake(x_t) - D_target(x_t)||^2``: while the generator approaches the teacher and
the critic follows it, the gap shrinks; when the critic falls behind, it tracks a distribution the
generator has already left and the gap grows. :func:`gap_growth` is the log ratio of the gap's
mean over the last and the first of ``chunks`` equal parts of the early run (by default the first
25% of the planned updates); :class:`CriticLagMonitor` computes it from your loop, and
``disback diagnose FOLDER`` from a bench folder's base runs.

How well it works (``benchmarks/diagnostic.py``, ``benchmarks/results/diagnostic/TABLE.md``, 24
regimes, toy and image, UNet and flow): the statistic *ranks* regimes by DisBack's measured gain
(Spearman +0.33), and as a yes/no call against "DisBack beats the base by more than the base's seed
spread" it is right 19 of 24 times leave-one-regime-out, against 18 of 24 for always answering "no
gain": barely better than the majority answer. :data:`LAG_THRESHOLD` is the threshold that classifies
all 24 best (+2.2: the gap growing ~9x in the first quarter; toy one critic step +2.47 and fake lr
0.1x +3.23 above it, both with gains of 85%; below it, gains of -19% to +18%: SiD on digits -19% at
-0.22, Diff-Instruct on digits +15% at -0.06, digits-cond one critic step -15% at +1.82). Read the
verdict as a hint that the critic lags, not as a forecast.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .checks import check_number

__all__ = [
    "CriticLagMonitor",
    "LagReport",
    "gap_growth",
    "LAG_THRESHOLD",
    "verdict_for",
    "run_growth",
    "diagnose_results",
]

# log(gap_end / gap_start) above this: the critic lags (the threshold benchmarks/diagnostic.py chooses on
# all 24 measured regimes, 2.22, rounded; see the module doc)
LAG_THRESHOLD = 2.2


def gap_growth(chunk_means: Sequence[float]) -> float:
    """``log(last / first)`` of a sequence of score-gap means (chunks of the early run, in order).

    Raises ``ValueError`` when fewer than 2 chunks are given or a value is not finite and > 0.
    """
    vals = [float(v) for v in chunk_means]
    if len(vals) < 2:
        raise ValueError(f"gap_growth needs at least 2 chunk means, got {len(vals)}")
    if not all(math.isfinite(v) and v > 0 for v in vals):
        raise ValueError(f"score-gap means must be finite and > 0, got {vals}")
    return math.log(vals[-1] / vals[0])


def verdict_for(growth: float, threshold: float = LAG_THRESHOLD) -> str:
    """``"lagging"`` when the gap grew by more than ``threshold`` (log ratio), else ``"keeping up"``."""
    return "lagging" if growth > threshold else "keeping up"


@dataclass
class LagReport:
    """What :meth:`CriticLagMonitor.report` found.

    Attributes:
        growth: ``log(gap_end / gap_start)`` over the horizon (``None`` before it is reached).
        verdict: ``"lagging"``, ``"keeping up"`` or ``"not enough data"``.
        advice: one sentence for the user.
        updates: generator updates seen.
        chunk_means: the score gap's mean per chunk.
    """

    growth: float | None
    verdict: str
    advice: str
    updates: int
    chunk_means: list[float] = field(default_factory=list)

    def __str__(self) -> str:
        g = "n/a" if self.growth is None else f"{self.growth:+.2f}"
        return f"critic {self.verdict} (score-gap log growth {g} over {self.updates} updates): {self.advice}"


ADVICE = {
    "lagging": (
        "the fake score falls behind the generator: DisBack (or more critic updates per generator "
        "update, or a higher fake-score learning rate) is expected to help"
    ),
    "keeping up": "the fake score keeps up with the generator: DisBack is not expected to speed this run up",
    "not enough data": "feed more generator updates (the verdict needs the horizon's updates)",
}


class CriticLagMonitor:
    """Feed it the score gap of each generator update; it tells whether the critic lags.

    ``mon = CriticLagMonitor(total_updates=20_000)``; in the loop, after each generator update,
    ``mon.update(out["score_gap"])`` (every adapter's ``generator_loss`` reports it; in your own loop
    ``mean((D_fake(x_t) - D_real(x_t))**2)`` on the generator loss's own predictions, see
    :func:`~disback_core.schedules.score_gap`). ``mon.report()`` gives the verdict once the horizon
    (``horizon`` of the planned updates, default 25%) has been seen: run the base method for that
    long, then decide whether to pay for DisBack.

    Args:
        total_updates: the run's planned generator updates.
        horizon: the share of them the statistic looks at (0.25, as validated).
        chunks: the horizon is cut into this many equal parts; the statistic compares the last
            part's mean gap with the first's (6, as validated: the bench logs every 25 of 600).
        threshold: the log-growth above which the critic is called lagging (:data:`LAG_THRESHOLD`).
    """

    def __init__(self, total_updates: int, *, horizon: float = 0.25, chunks: int = 6, threshold: float = LAG_THRESHOLD):
        self.total_updates = int(check_number("total_updates", total_updates, low=1, integer=True))
        self.horizon = check_number("horizon", horizon, low=0.0, high=1.0, low_open=True)
        self.chunks = int(check_number("chunks", chunks, low=2, integer=True))
        self.threshold = check_number("threshold", threshold)
        self.window = max(self.chunks, int(round(self.total_updates * self.horizon)))
        self._gaps: list[float] = []

    def update(self, score_gap: Any) -> None:
        """Record one generator update's score gap (a float or a 0-d tensor)."""
        v = float(score_gap.detach().item() if hasattr(score_gap, "detach") else score_gap)
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"score_gap must be finite and >= 0, got {v}")
        if len(self._gaps) < self.window:
            self._gaps.append(v)

    def state_dict(self) -> dict[str, Any]:
        return {"gaps": list(self._gaps)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        gaps = state.get("gaps")
        if not isinstance(gaps, list) or not all(isinstance(g, (int, float)) for g in gaps):
            raise ValueError("state['gaps'] must be a list of numbers")
        self._gaps = [float(g) for g in gaps][: self.window]

    def chunk_means(self) -> list[float]:
        n = len(self._gaps) // self.chunks
        if n == 0:
            return []
        return [sum(self._gaps[i * n : (i + 1) * n]) / n for i in range(self.chunks)]

    def report(self) -> LagReport:
        if len(self._gaps) < self.window:
            return LagReport(None, "not enough data", ADVICE["not enough data"], len(self._gaps))
        means = self.chunk_means()
        if not all(m > 0 for m in means):
            return LagReport(
                None,
                "not enough data",
                "the score gap is zero: is the target the fake score itself?",
                len(self._gaps),
                means,
            )
        g = gap_growth(means)
        v = verdict_for(g, self.threshold)
        return LagReport(g, v, ADVICE[v], len(self._gaps), means)


def run_growth(run: Mapping[str, Any], horizon: float = 0.25) -> float | None:
    """The statistic on one bench run (an entry of ``results.json``'s ``runs``): the score-gap means of
    the logged eval windows ending within the first ``horizon`` of the iterations (None without logs)."""
    total = run["spec"]["iterations"]
    gaps = [
        e["logs"]["generator/score_gap"]
        for e in run["evals"]
        if e.get("logs") and "generator/score_gap" in e["logs"] and 0 < e["iteration"] <= horizon * total
    ]
    if len(gaps) < 2 or not all(g > 0 for g in gaps):
        return None
    return gap_growth(gaps)


def diagnose_results(results: Mapping[str, Any], threshold: float = LAG_THRESHOLD) -> list[str]:
    """Lines of a verdict for a bench ``results.json``: the statistic on each base run (its early
    score-gap growth), the verdict, and the measured outcome where DisBack runs are there too."""
    runs = results.get("runs", [])
    base = [r for r in runs if r.get("label") == "base"]
    if not base:
        return ["no base runs in these results: the diagnostic reads the base method's own logs"]
    growths = {r["seed"]: run_growth(r) for r in base}
    seen = [g for g in growths.values() if g is not None]
    lines = [
        f"seed {s}: score-gap log growth {'n/a (no logs)' if g is None else f'{g:+.2f}'}" for s, g in growths.items()
    ]
    if not seen:
        return [*lines, "these results have no train_step logs (run them with a current disback bench)"]
    mean = sum(seen) / len(seen)
    verdict = verdict_for(mean, threshold)
    lines.append(f"mean {mean:+.2f} (threshold {threshold:+.2f}): critic {verdict}: {ADVICE[verdict]}")
    primary = results.get("primary")
    for label in sorted({r["label"] for r in runs} - {"base"}):
        other = [r["final"][primary] for r in runs if r["label"] == label and primary in r.get("final", {})]
        mine = [r["final"][primary] for r in base if primary in r.get("final", {})]
        if other and mine:
            b, d = sum(mine) / len(mine), sum(other) / len(other)
            lines.append(f"measured: base {primary} {b:.4g}, {label} {d:.4g} ({100 * (b - d) / b:+.1f}% of the base)")
    return lines
