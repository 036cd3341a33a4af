"""The training script (disback_core/train.py, run as examples/train.py and `disback train`): one process
and two (torchrun, gloo), DDP and FSDP2, and exact resume; the model class from the config (UNets and
SD3/FLUX/SANA/Wan flow transformers), with and without DisBack. The command line, --export, `disback
export` and extending a finished run: tests/test_train_cli.py."""
import ast
import hashlib
import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


# FSDP2 with gathered full states: byte-reproducible files (its sharded states, the default under --fsdp,
# are not: test_train_cli.py's test_fsdp2_sharded_states_resume_exactly_and_export_as_the_full_format).
@pytest.mark.parametrize("ranks,extra",
                         [(1, []), (2, []), (2, ["--fsdp", "--state-format", "full", "--method", "sid"])],
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


# ------------------------------------------------------------------ --unet/--model: the class from the config
# In-process (``main(argv)``): a few updates of a tiny random model at batch 2 take about a second.


@pytest.fixture(scope="module")
def train():
    """The script's module (examples/train.py is a thin call of its main, checked here)."""
    import disback_core.train

    spec = importlib.util.spec_from_file_location("examples_train", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)  # imports, does not run (no __main__)
    assert script.main is disback_core.train.main
    return disback_core.train


def _main(train, *argv):
    """``main(argv)`` in this process, leaving accelerate's singleton state and torch's threads as found."""
    from accelerate.state import AcceleratorState

    threads = torch.get_num_threads()
    try:
        return train.main([str(a) for a in argv])
    finally:
        AcceleratorState._reset_state(True)
        torch.set_num_threads(threads)


def _tiny(out, model, *extra, flag="--model"):
    return [flag, model, "--iterations", "6", "--record-steps", "6", "--nodes", "3", "--batch-size", "2",
            "--no-progress", "--out", out, *extra]


def _saved_config(out):
    return json.loads(next(Path(out, "state").glob("step-*/manifest.json")).read_text())["config"]


@pytest.mark.parametrize("preset,extra", [
    ("tiny-sd3", ["--disback"]),
    ("tiny-flux", ["--disback", "--shift", "1.0"]),
    ("tiny-sana", ["--method", "sid"]),
    ("tiny-wan", ["--disback", "--method", "di"]),
])
def test_flow_transformer_presets_train_with_and_without_disback(tmp_path, train, preset, extra):
    out = tmp_path / preset
    result = _main(train, *_tiny(out, preset, *extra))
    saved = json.loads((out / "result.json").read_text())
    assert saved["world_size"] == 1 and saved["updates"] == 6 and saved["skipped_updates"] == 0
    assert math.isfinite(saved["logs"]["critic"]) and math.isfinite(saved["logs"]["generator"])
    assert saved["generator_change"] > 0  # the one-step generator trained
    config = _saved_config(out)
    assert config["unet"] == preset and config["shift"] == (1.0 if "--shift" in extra else train.DEFAULT_SHIFT)
    if "--disback" in extra:  # LoRA nodes on the transformer's attention, then backtracked: 2 -> 1 -> 0
        assert [n for _, n in saved["switches"]] == [2, 1, 0] == [n for _, n in result["switches"]]
        manifest = json.loads((out / "trajectory" / "manifest.json").read_text())
        assert manifest["kind"] == "lora" and manifest["node_count"] == 3
        targets = manifest["lora"]["target_modules"] if isinstance(manifest["lora"], dict) else manifest["lora"]
        assert "attn" in str(targets)
    else:
        assert "switches" not in saved


def test_flow_task_conditions_fit_and_the_teacher_is_the_flow_wrapper(train):
    from disback_core.flow import FlowMatchDenoiser
    from disback_core.sigmas import LogitNormalSigma, flow_weight

    for preset, ndim in (("tiny-sd3", 4), ("tiny-flux", 4), ("tiny-sana", 4), ("tiny-wan", 5)):
        args = train.parse_args(["--model", preset, "--shift", "2"])
        task = train.build_model_task(args)
        assert isinstance(task["teacher"], FlowMatchDenoiser) and task["flow"] and task["shift"] == 2.0
        batch = task["sample"](3, torch.Generator().manual_seed(0))
        assert batch.z.ndim == ndim and batch.z.shape[0] == 3
        with torch.no_grad():
            assert task["teacher"](batch.z, torch.full((3,), 1.5), batch.cond).shape == batch.z.shape
        method = train.make_method(args, task)
        assert method.sigma_sampler == LogitNormalSigma(shift=2.0) and method.dsm.weight is flow_weight


def test_a_save_pretrained_sd3_folder_and_a_pipeline_folder_train(tmp_path, train):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from disback_core.presets import build_model

    model = build_model("tiny-sd3", seed=7)  # other weights than the preset's seed-0 ones: loaded, not rebuilt
    model.save_pretrained(tmp_path / "sd3")
    task = train.build_model_task(train.parse_args(["--unet", str(tmp_path / "sd3")]))
    assert type(task["teacher"].model).__name__ == "SD3Transformer2DModel" and task["shift"] == train.DEFAULT_SHIFT
    assert all(torch.equal(a, b) for a, b in zip(task["teacher"].model.state_dict().values(),
                                                  model.state_dict().values()))
    result = _main(train, *_tiny(tmp_path / "run", str(tmp_path / "sd3"), "--disback", "--iterations", "3"))
    assert math.isfinite(result["logs"]["generator"]) and result["generator_change"] > 0
    assert [n for _, n in result["switches"]] == [2, 1, 0]

    root = tmp_path / "pipe"  # a pipeline folder: its transformer/ and the shift of its scheduler/
    model.save_pretrained(root / "transformer")
    FlowMatchEulerDiscreteScheduler(shift=2.5).save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    _main(train, *_tiny(tmp_path / "run-pipe", root, "--iterations", "2", flag="--pretrained_model_name_or_path"))
    assert _saved_config(tmp_path / "run-pipe")["shift"] == 2.5


def test_a_flow_run_resumes_bit_exactly_and_refuses_another_shift(tmp_path, train):
    def run(out, *extra):
        return _main(train, *_tiny(tmp_path / out, "tiny-sd3", "--disback", "--iterations", "8", "--save-every", "4",
                                   *extra))

    run("whole")
    run("cut", "--stop-after", "5")
    assert run("cut", "--resume")["updates"] == 8
    whole, cut = _final_files(tmp_path / "whole"), _final_files(tmp_path / "cut")
    assert set(whole) == set(cut) and all(whole[n] == cut[n] for n in whole)
    with pytest.raises(SystemExit, match="--shift: 3.0 in the run, 2.0 given"):  # named before anything loads
        run("cut", "--resume", "--shift", "2")


def test_an_unknown_model_class_is_refused_by_name(tmp_path, train, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"_class_name": "FooTransformer2DModel"}))
    with pytest.raises(SystemExit) as e:
        _main(train, "--unet", tmp_path / "m", "--out", tmp_path / "out")
    err = capsys.readouterr().err
    assert e.value.code == 2 and "FooTransformer2DModel" in err
    assert all(name in err for name in ("UNet2DConditionModel", "SD3Transformer2DModel", "WanTransformer3DModel"))
    assert not (tmp_path / "out").exists()  # refused before anything started


def test_an_unknown_preset_is_refused_listing_the_presets(tmp_path, train, capsys):
    from disback_core.presets import TINY_PRESETS

    with pytest.raises(SystemExit) as e:
        _main(train, "--unet", "tiny-txt", "--out", tmp_path / "out")
    err = capsys.readouterr().err
    assert e.value.code == 2 and "tiny-txt" in err and "did you mean 'tiny-text'" in err
    assert all(name in err for name in TINY_PRESETS) and "Traceback" not in err


def test_model_flag_aliases_no_abbreviations_and_shift_only_for_flow(train, capsys):
    for flag in ("--unet", "--model", "--pretrained_model_name_or_path", "--pretrained-model-name-or-path"):
        assert train.parse_args([flag, "tiny-wan"]).unet == "tiny-wan"
    for argv in (["--mod", "tiny-sd3"], ["--unet", "tiny-sd3", "--iter", "3"],  # abbreviations are refused
                 ["--unet", "tiny-text", "--shift", "3"], ["--unet", "tiny-sd3", "--shift", "0"],
                 ["--problem", "toy2d", "--model", "tiny-sd3"]):
        with pytest.raises(SystemExit):
            train.parse_args(argv)
    assert "flow-matching transformers" in capsys.readouterr().err


# ------------------------------------------------------------------ nothing lost, every mistake a clear error


def _tree(folder):
    """Every file under ``folder``: its path and the sha256 of its bytes."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def test_a_second_run_into_a_used_out_is_refused_and_changes_nothing(tmp_path, cache, train, capsys):
    out = tmp_path / "run"
    run = lambda *extra: _main(train, *_args(cache, out, "--save-every", "4", *extra)[1:])  # noqa: E731
    run("--stop-after", "5")
    before = _tree(out)
    assert {"trajectory/manifest.json", "state/latest.json"} <= set(before)
    for extra in ([], ["--iterations", "12"], ["--method", "sid"]):  # the same run, or another
        with pytest.raises(SystemExit) as e:
            run(*extra)
        msg = str(e.value.code)  # a string: printed to stderr, exit status 1
        assert msg.startswith(f"--out {out} holds an earlier run: state/ (resumable states), trajectory/ "
                              "(a recorded path)"), msg
        assert "Pass --resume to continue from its newest state, or a new --out, or --overwrite" in msg
        assert _tree(out) == before  # every file of the first run byte-identical, nothing added or removed
    with pytest.raises(SystemExit) as e:  # told both: refused by argparse
        run("--resume", "--overwrite")
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    assert _tree(out) == before

    capsys.readouterr()
    assert run("--resume_from_checkpoint", "latest")["updates"] == 8  # diffusers' spelling of --resume
    assert "resumed at update 5" in capsys.readouterr().out
    steps = lambda: sorted(p.name for p in (out / "state").glob("step-*"))  # noqa: E731
    assert steps() == ["step-000000004", "step-000000005", "step-000000008"]
    finished = _tree(out)
    with pytest.raises(SystemExit, match="result.json \\(a result\\)"):  # a finished run is refused too
        run()
    assert _tree(out) == finished

    assert run("--overwrite")["updates"] == 8  # told to: the earlier states go, this run's replace them
    assert steps() == ["step-000000004", "step-000000008"] and (out / "result.json").is_file()
    only_result = tmp_path / "only-result"
    only_result.mkdir()
    (only_result / "result.json").write_text("{}")
    (only_result / "state").mkdir()  # an empty folder is nothing to lose
    assert train.earlier_run(only_result) == ["result.json (a result)"] and train.earlier_run(tmp_path / "x") == []


def test_a_launch_that_asked_for_other_processes_is_refused_naming_both_numbers(tmp_path, train, monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun's count of this node's processes, while 1 runs
    with pytest.raises(SystemExit) as e:
        _main(train, *_tiny(tmp_path / "a", "tiny-sd3"))
    msg = str(e.value.code)
    assert msg.startswith("this launch asked for 2 processes (LOCAL_WORLD_SIZE=2) but the Accelerator sees 1 "
                          "process: the script was started with python instead of the launcher"), msg
    assert not (tmp_path / "a").exists()  # refused before training
    monkeypatch.delenv("LOCAL_WORLD_SIZE")

    def launched_by(n):  # the launcher's command line, as accelerate launch's --cpu launcher leaves it
        return lambda: [sys.executable, "/venv/bin/accelerate", "launch", "--num_processes", str(n), "--cpu",
                        str(SCRIPT), "--num_processes", "5"]  # the script's own arguments are not the launcher's

    monkeypatch.setattr(train, "_launcher_argv", launched_by(2))
    with pytest.raises(SystemExit) as e:
        _main(train, *_tiny(tmp_path / "b", "tiny-sd3"))
    msg = str(e.value.code)
    assert msg.startswith("this launch asked for 2 processes (accelerate launch --num_processes 2) but the "
                          "Accelerator sees 1 process"), msg
    assert "accelerate launch --multi_gpu --num_processes 2" in msg and "torchrun --nproc-per-node 2" in msg

    monkeypatch.setattr(train, "_launcher_argv", launched_by(1))  # what matches runs as before
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    result = _main(train, *_tiny(tmp_path / "c", "tiny-sd3", "--iterations", "2"))
    assert result["world_size"] == 1 and result["updates"] == 2


def test_accelerate_launch_cpu_with_two_processes_is_refused(tmp_path, cache):
    """The issue's command: ``accelerate launch --num_processes 2 --cpu`` starts one process; it used to
    train it and exit 0, saying so only in result.json."""
    cli = Path(sys.executable).parent / "accelerate"
    launcher = [str(cli)] if cli.is_file() else [sys.executable, "-m", "accelerate.commands.launch"]
    cmd = [*launcher, "launch", "--num_processes", "2", "--cpu", *_args(cache, tmp_path / "out")]
    if not cli.is_file():
        cmd.remove("launch")
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode != 0
    assert ("this launch asked for 2 processes (accelerate launch --num_processes 2) but the Accelerator sees 1 "
            "process") in done.stderr, done.stderr[-3000:]
    assert not (tmp_path / "out").exists()


# Every argparse parser refuses abbreviations (``--iter`` for ``--iterations``, ``--mod`` for ``--model``).
# disback_core/ is to be added here once its CLI's parser has allow_abbrev=False.
PARSER_DIRS = ("examples", "benchmarks", "disback_core")
PARSER_FILES = sorted(p for d in PARSER_DIRS for p in (SCRIPT.parents[1] / d).rglob("*.py")
                      if "ArgumentParser(" in p.read_text() or "add_parser(" in p.read_text())


@pytest.mark.parametrize("path", PARSER_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_argument_parser_refuses_abbreviations(path):
    calls = [node for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None))
             in ("ArgumentParser", "add_parser")]
    assert calls
    for call in calls:
        abbrev = [k.value for k in call.keywords if k.arg == "allow_abbrev"]
        assert abbrev and isinstance(abbrev[0], ast.Constant) and abbrev[0].value is False, \
            f"{path.name}:{call.lineno}: ArgumentParser(...) without allow_abbrev=False"
