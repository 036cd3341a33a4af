"""examples/train.py: one process and two (torchrun, gloo), DDP and FSDP2, and exact resume."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train.py"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("teacher-cache")


def _args(cache, out, *extra):
    return [str(SCRIPT), "--problem", "toy2d", "--method", "dmd2", "--disback", "--iterations", "8",
            "--record-steps", "6", "--nodes", "3", "--batch-size", "32", "--teacher-steps", "150",
            "--cache-dir", str(cache), "--no-progress", "--out", str(out), *extra]


def _run(args, ranks=1):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if ranks == 1:
        cmd = [sys.executable, *args]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
               "--master-port", str(port), *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _final_files(out, step=8):
    d = Path(out) / "state" / f"step-{step:09d}"
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.mark.parametrize("ranks,extra", [(1, []), (2, []), (2, ["--fsdp", "--method", "sid"])],
                         ids=["1-rank", "2-ranks-ddp", "2-ranks-fsdp2"])
def test_resumed_run_equals_the_uninterrupted_one_bit_exactly(tmp_path, cache, ranks, extra):
    _run(_args(cache, tmp_path / "whole", "--save-every", "4", *extra), ranks)
    _run(_args(cache, tmp_path / "cut", "--save-every", "4", "--stop-after", "5", *extra), ranks)
    done = _run(_args(cache, tmp_path / "cut", "--save-every", "4", "--resume", *extra), ranks)
    assert "resumed at update 5" in done.stdout + done.stderr
    whole, cut = _final_files(tmp_path / "whole"), _final_files(tmp_path / "cut")
    assert set(whole) == set(cut) and {f"rng-rank{r}.safetensors" for r in range(ranks)} <= set(whole)
    for name in whole:  # models, optimizers, schedule, every rank's RNG: the same bytes
        assert whole[name] == cut[name], name
    result = json.loads((tmp_path / "whole" / "result.json").read_text())
    assert result["world_size"] == ranks and [n for _, n in result["switches"]] == [2, 1, 0]
    assert result["generator_change"] > 1e-5  # it trained (an optimizer over stale parameters would not)


def test_resume_refuses_another_configuration(tmp_path, cache):
    _run(_args(cache, tmp_path / "run", "--save-every", "4", "--stop-after", "4"))
    cmd = [sys.executable, *_args(cache, tmp_path / "run", "--save-every", "4", "--resume", "--lr", "3e-4")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0 and "lr" in done.stderr[-2000:]


def test_fsdp2_with_gradient_accumulation_on_two_cpu_ranks(tmp_path, cache):
    _run(_args(cache, tmp_path / "fsdp", "--fsdp", "--grad-accum", "2", "--method", "di"), ranks=2)
    result = json.loads((tmp_path / "fsdp" / "result.json").read_text())
    assert result["world_size"] == 2 and result["generator_change"] > 1e-5
    assert [n for _, n in result["switches"]] == [2, 1, 0]
