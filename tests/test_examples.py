"""The examples run (tiny budgets) and do what they say."""
import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def test_hand_written_loop_improves_every_adapter(cache):
    out = _load("hand_written_loop").main(["--iterations", "60", "--cache-dir", cache, "--teacher-steps", "600"])
    assert set(out) == {"DiffInstruct", "DMD2", "SiD"}
    for name, (before, after) in out.items():
        assert after < 0.6 * before, (name, before, after)


def test_disback_in_your_loop_switches_to_the_teacher(cache):
    out = _load("disback_in_your_loop").main(["--iterations", "40", "--degradation-steps", "50",
                                              "--cache-dir", cache, "--teacher-steps", "600"])
    assert out["DMD2"] < 1.0 and out["DMD2 + DisBack"] < 1.0  # both far below the one-step start (~1.3)
    nodes = [n for _, n in out["switches"]]
    assert nodes == [4, 3, 2, 1, 0]  # every switch happened, ending on the teacher


def test_diffusers_wiring_runs():
    logs = _load("diffusers_text_to_image").main(iterations=2)
    assert {"generator/loss", "generator/score_gap", "critic/dsm"} <= set(logs)
