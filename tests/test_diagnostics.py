"""The critic-lag diagnostic: its statistic in closed form, its verdicts, and the bench folder reader."""

from __future__ import annotations

import math

import pytest
import torch

from disback_core.diagnostics import LAG_THRESHOLD, CriticLagMonitor, gap_growth, verdict_for


def test_gap_growth_is_the_log_ratio_of_the_last_and_first_chunk():
    assert gap_growth([2.0, 5.0, 8.0]) == pytest.approx(math.log(4.0))
    assert gap_growth([1.0, 1.0]) == 0.0
    with pytest.raises(ValueError, match="at least 2"):
        gap_growth([1.0])
    with pytest.raises(ValueError, match="finite and > 0"):
        gap_growth([1.0, 0.0])


def test_monitor_chunks_the_horizon_and_decides():
    mon = CriticLagMonitor(total_updates=240, horizon=0.25, chunks=6)  # window 60: chunks of 10
    assert mon.window == 60
    # a gap that doubles every chunk: growth log(2^5)
    for c in range(6):
        for _ in range(10):
            mon.update(torch.tensor(2.0**c))
    for _ in range(100):  # updates past the horizon are not used
        mon.update(1e6)
    rep = mon.report()
    assert rep.chunk_means == [2.0**c for c in range(6)]
    assert rep.growth == pytest.approx(5 * math.log(2.0))
    assert rep.verdict == "lagging" and "DisBack" in rep.advice
    # a shrinking gap: the critic keeps up
    mon = CriticLagMonitor(total_updates=24, horizon=1.0, chunks=2)
    for v in [4.0] * 12 + [1.0] * 12:
        mon.update(v)
    assert mon.report().growth == pytest.approx(math.log(0.25))
    assert mon.report().verdict == "keeping up"


def test_monitor_says_when_it_has_not_seen_enough_and_resumes():
    mon = CriticLagMonitor(total_updates=100)
    for v in range(10):
        mon.update(float(v + 1))
    assert mon.report().verdict == "not enough data" and mon.report().growth is None
    again = CriticLagMonitor(total_updates=100)
    again.load_state_dict(mon.state_dict())
    assert again.state_dict() == mon.state_dict()
    with pytest.raises(ValueError, match="score_gap must be finite"):
        mon.update(float("nan"))
    with pytest.raises(ValueError, match="total_updates"):
        CriticLagMonitor(total_updates=0)


def test_threshold_verdict():
    assert verdict_for(LAG_THRESHOLD + 1e-9) == "lagging"
    assert verdict_for(LAG_THRESHOLD) == "keeping up"


def _results(gaps_by_seed, finals, label="disback"):
    runs = []
    for seed, gaps in gaps_by_seed.items():
        evals = [{"iteration": 0, "logs": {}}] + [
            {"iteration": 25 * (i + 1), "logs": {"generator/score_gap": g}} for i, g in enumerate(gaps)
        ]
        runs.append({"label": "base", "seed": seed, "spec": {"iterations": 600}, "evals": evals,
                     "final": {"sw": finals[0]}})
        runs.append({"label": label, "seed": seed, "spec": {"iterations": 600}, "evals": evals,
                     "final": {"sw": finals[1]}})
    return {"primary": "sw", "runs": runs}


def test_disback_diagnose_reads_a_bench_folder(tmp_path, capsys):
    import json

    from disback_core.cli import main
    from disback_core.diagnostics import run_growth

    # windows at 25..150 are within the first 25% of 600 iterations; the one at 175 is not
    res = _results({0: [1.0, 2.0, 3.0, 4.0, 5.0, 16.0, 100.0], 1: [2.0, 2.0, 2.0, 2.0, 2.0, 32.0, 0.1]}, (0.4, 0.2))
    assert run_growth(res["runs"][0]) == pytest.approx(math.log(16.0))  # above LAG_THRESHOLD (2.2)
    (tmp_path / "results.json").write_text(json.dumps(res))
    assert main(["diagnose", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"mean {math.log(16.0):+.2f}" in out and "critic lagging" in out
    assert "measured: base sw 0.4, disback 0.2 (+50.0% of the base)" in out


def test_cli_refuses_abbreviated_options():
    from disback_core.cli import main

    with pytest.raises(SystemExit) as e:
        main(["demo", "--seed", "0"])  # once silently taken as --seeds, starting a long run
    assert e.value.code == 2
