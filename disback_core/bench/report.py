"""Markdown report and console table from a benchmark result (see :mod:`.runner` for the schema)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["summary_table", "write_report"]


def _fmt(v: float | None, digits: int = 4) -> str:
    if v is None:
        return "not reached"
    return f"{v:.{digits}g}"


def summary_table(result: dict[str, Any]) -> str:
    """One row per label: primary metric (mean +- std over seeds, min..max), the other metrics'
    means, iterations and seconds to the base's final value, and the cost per iteration."""
    p = result["primary"]
    summ = result["summary"]
    others = [k for k in next(iter(summ.values()))["final"] if k != p]
    cpu = all("cpu_seconds_to_base_final" in s for s in summ.values())
    kind, pre = ("CPU s", "cpu_") if cpu else ("wall s", "")
    head = (
        f"| run | final {p} (mean ± std, min..max) | "
        + " | ".join(others)
        + f" | area under {p} (ratio) | {p} at the base's {kind} |"
        + f" iterations to base final (ratio) | {kind} to base final (ratio) | {kind} / iteration (ratio) |"
    )
    lines = [head, "|" + "---|" * (7 + len(others))]
    for lab, s in summ.items():
        f = s["final"][p]
        row = [f"{lab}", f"{f['mean']:.4g} ± {f['std']:.2g} ({f['min']:.4g}..{f['max']:.4g})"]
        row += [f"{s['final'][k]['mean']:.3g}" for k in others]
        auc, at = s.get("auc"), s.get("at_base_budget")
        row.append(f"{auc['mean']:.4g} ± {auc['std']:.2g} ({_fmt(s.get('ratio_auc'), 3)})" if auc else "")
        row.append(f"{at['mean']:.4g} ± {at['std']:.2g}" if at else "not reached" if "budget" in s else "")
        row.append(f"{_fmt(s.get('iterations_to_base_final'))} ({_fmt(s.get('ratio_iterations'), 3)})")
        row.append(f"{_fmt(s.get(pre + 'seconds_to_base_final'))} ({_fmt(s.get('ratio_' + pre + 'seconds'), 3)})")
        spi = s.get(pre + "seconds_per_iteration", s["seconds_per_iteration"])
        row.append(f"{spi:.4f} ({_fmt(s.get(pre + 'overhead_per_iteration'), 3)})")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def write_report(result: dict[str, Any], path: str | Path, title: str = "disback benchmark") -> None:
    p = result["primary"]
    lines = [
        f"# {title}",
        "",
        f"Command: `{result['command']}`" if result.get("command") else "",
        "",
        *(f"Earlier command (runs kept by --resume): `{c}`  " for c in result.get("earlier_commands", [])),
        "",
        f"Problem `{result['problem']}`; primary metric `{p}` (lower is better). Final values are the mean "
        "over the last 20% of evaluations of each seed; ± is the standard deviation over seeds. "
        "'To base final': first evaluation where the seed-mean curve, averaged over the same trailing "
        "window, reaches the base's final value; DisBack's seconds include Degradation Recording. "
        "'Area under': the metric's mean over the iterations (trapezoids), mean ± std over seeds, which also "
        "ranks a base that oscillates or never converges. 'At the base's CPU s' (or wall s): each seed's value "
        "at its last evaluation within the base's total compute, recording included (equal compute). "
        "CPU seconds (single-threaded runs) are not inflated by other processes on the machine.",
        "",
        "## Summary",
        "",
        summary_table(result),
        "",
    ]
    lines += [
        "## Reference lines",
        "",
        f"| sigma_init | teacher multi-step ({result.get('reference_sampler', 'EDM Heun, 18 steps')}) "
        "| teacher one-step | held-out data |",
        "|---|---|---|---|",
    ]
    for si, refs in result["references"].items():
        cells = [
            ", ".join(f"{k} {v:.4g}" for k, v in refs.get(key, {}).items())
            for key in ("teacher_multistep", "teacher_onestep", "data")
        ]
        lines.append(f"| {si} | " + " | ".join(cells) + " |")
    lines += ["", "## Runs", ""]
    for r in result["runs"]:
        sw = f", target switches (iteration, node): {r['switches']}" if r["switches"] else ""
        lines.append(
            f"- `{r['label']}` seed {r['seed']}: final {p} {r['final'][p]:.4g}, "
            f"{r['seconds_per_iteration']:.4f} s/iteration, recording {r['degradation_seconds']:.1f} s{sw}"
        )
    lines += ["", "## Figures", "", "![curves](curves.png)", ""]
    for lab in dict.fromkeys(r["label"] for r in result["runs"]):
        lines.append(f"![{lab}](samples-{lab}.png)")
    teacher = result.get("teacher") or {}
    if teacher:
        lines += ["", "## Teacher", "", "```", ", ".join(f"{k}: {v}" for k, v in teacher.items() if k != "path"), "```"]
    Path(path).write_text("\n".join(lines) + "\n")
