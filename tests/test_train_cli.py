"""`disback train` and `disback export` (disback_core/train.py through disback_core/cli.py): --export and
its exact load, exporting any saved state, the diffusers flag names, refusals, and extending a finished
run. In-process, a tiny random SD3 transformer at batch 2: a run takes a second or two."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import disback_core.export
from disback_core import cli, load_generator, read_export_note
from disback_core import train as train_mod
from disback_core.presets import build_model, example_cond, sample_shape

TINY = ["--model", "tiny-sd3", "--batch-size", "2", "--no-progress"]
DISBACK = ["--disback", "--record-steps", "6", "--nodes", "3"]


def _cli(*argv):
    """``disback ARGV`` in this process, leaving accelerate's singleton state and torch's threads as found."""
    from accelerate.state import AcceleratorState

    threads = torch.get_num_threads()
    try:
        return cli.main([str(a) for a in argv])
    finally:
        AcceleratorState._reset_state(True)
        torch.set_num_threads(threads)


def _inputs(n=3):
    model = build_model("tiny-sd3")
    g = torch.Generator().manual_seed(123)
    cond = example_cond(model, n, tokens=7, generator=g)
    return torch.randn(sample_shape(model, n), generator=g), cond


def _same_outputs(a, b):
    z, cond = _inputs()
    with torch.no_grad():
        return torch.equal(a.eval()(z, cond), b.eval()(z, cond))


def _weights(folder):
    return (Path(folder) / "diffusion_pytorch_model.safetensors").read_bytes()


def _files(step_dir):
    return {p.name: p.read_bytes() for p in sorted(Path(step_dir).iterdir())}


def _result(out):
    return json.loads((Path(out) / "result.json").read_text())


# ------------------------------------------------------------------ --export and `disback export`


def test_train_export_loads_bit_exactly_and_disback_export_of_any_state_equals_it(tmp_path, monkeypatch):
    captured = {}
    real = disback_core.export.export_generator

    def spy(generator, folder, **kw):  # the trained generator, as the script hands it to export_generator
        captured["generator"], captured["metadata"] = copy.deepcopy(generator), kw.get("metadata")
        return real(generator, folder, **kw)

    monkeypatch.setattr(disback_core.export, "export_generator", spy)
    out, exp = tmp_path / "run", tmp_path / "onestep"
    assert _cli("train", *TINY, "--iterations", "2", "--save-every", "1", "--out", out, "--export", exp) == 0
    assert _result(out)["export"] == str(exp)
    trained, loaded = captured["generator"], load_generator(exp)
    assert _same_outputs(loaded, trained)  # bit for bit
    note = read_export_note(exp)
    assert note["kind"] == "diffusers-flow" and note["metadata"]["updates"] == 2
    run = train_mod.read_state(out / "state")["config"]
    assert note["metadata"]["run"] == run and run["unet"] == "tiny-sd3" and run["world_size"] == 1

    monkeypatch.setattr(disback_core.export, "export_generator", real)
    # any state folder: the run's --out, its state/, the newest step folder: the same export
    for i, state in enumerate([out, out / "state", out / "state" / "step-000000002"]):
        assert _cli("export", state, tmp_path / f"again{i}") == 0
        assert _weights(tmp_path / f"again{i}") == _weights(exp)
        assert _same_outputs(load_generator(tmp_path / f"again{i}"), trained)
    # a kept earlier step: the generator after 1 update, which a 1-update run exports too
    _cli("export", out / "state" / "step-000000001", tmp_path / "step1")
    assert read_export_note(tmp_path / "step1")["metadata"]["updates"] == 1
    assert _weights(tmp_path / "step1") != _weights(exp)
    _cli("train", *TINY, "--iterations", "1", "--out", tmp_path / "one", "--export", tmp_path / "one-exp")
    assert _weights(tmp_path / "step1") == _weights(tmp_path / "one-exp")
    # an existing export is replaced (atomically, by export_generator)
    _cli("export", out / "state" / "step-000000001", exp)
    assert _weights(exp) == _weights(tmp_path / "step1") and not list(tmp_path.glob(".onestep.*"))
    # the generator, rebuilt from the state, for use in Python
    rebuilt, saved = train_mod.build_generator(out)
    assert saved["step"] == 2 and _same_outputs(rebuilt, trained)


def test_an_export_folder_that_is_not_an_export_is_refused_before_anything(tmp_path, capsys):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    (tmp_path / "file").write_text("x")
    for target in (busy, tmp_path / "file"):
        with pytest.raises(SystemExit) as e:
            _cli("train", *TINY, "--iterations", "1", "--out", tmp_path / "run", "--export", target)
        assert str(e.value.code).startswith(f"--export {target} exists") and "not" in str(e.value.code)
        with pytest.raises(SystemExit) as e:
            _cli("export", tmp_path / "run", target)
        assert str(e.value.code).startswith(f"OUT {target} exists")
    assert not (tmp_path / "run").exists() and (busy / "notes.txt").read_text() == "mine"
    for target in (tmp_path / "p" / "run", tmp_path / "p"):  # --out itself, or a folder holding it
        with pytest.raises(SystemExit, match="holds --out"):
            _cli("train", *TINY, "--iterations", "1", "--out", tmp_path / "p" / "run", "--export", target)
    assert not (tmp_path / "p").exists()
    with pytest.raises(SystemExit, match="no state was saved there|does not exist"):  # not a state: a message
        _cli("export", busy, tmp_path / "exp")
    assert not (tmp_path / "exp").exists() and "Traceback" not in capsys.readouterr().err


def test_fsdp2_on_two_ranks_exports_the_gathered_generator(tmp_path):
    """``torchrun -m disback_core.cli train``: under FSDP2 the full weights are gathered, rank 0 exports
    them, and `disback export` of the run's state writes the same bytes. --train_batch_size is per
    device: 1 x 2 ranks x 2 micro-batches is a global batch of 4."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out, exp = tmp_path / "run", tmp_path / "onestep"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
           "-m", "disback_core.cli", "train", "--model", "tiny-sd3", "--iterations", "2", "--train_batch_size", "1",
           "--gradient_accumulation_steps", "2", "--fsdp", "--no-progress", "--output_dir", str(out),
           "--export", str(exp)]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    config = train_mod.read_state(out / "state")["config"]
    assert config["world_size"] == 2 and config["batch_size"] == 4 and config["fsdp"]
    assert read_export_note(exp)["metadata"]["run"] == config
    _cli("export", out, tmp_path / "again")
    assert _weights(tmp_path / "again") == _weights(exp)
    assert _same_outputs(load_generator(exp), train_mod.build_generator(out)[0])


# ------------------------------------------------------------------ extending a finished run


@pytest.mark.parametrize("extra", [["--warmup", "3"], DISBACK], ids=["warmup", "disback"])
def test_extending_a_finished_run_equals_one_longer_run_bit_exactly(tmp_path, capsys, extra):
    run = lambda out, *more: _cli("train", *TINY, *extra, "--out", tmp_path / out, *more)  # noqa: E731
    run("long", "--iterations", "10")
    run("ext", "--iterations", "6")
    finished = _files(tmp_path / "ext" / "state" / "step-000000006")
    with pytest.raises(SystemExit, match="--max_train_steps 4 is below the update the state .* reached \\(6\\)"):
        run("ext", "--resume", "--max_train_steps", "4")  # shortening is refused
    capsys.readouterr()
    run("ext", "--resume", "--max_train_steps", "10")
    assert "resumed at update 6, to go on to 10" in capsys.readouterr().out
    long, ext = tmp_path / "long" / "state", tmp_path / "ext" / "state"
    assert _files(ext / "step-000000006") == finished  # the finished run's state, kept as it was
    a, b = _files(long / "step-000000010"), _files(ext / "step-000000010")
    assert set(a) == set(b) and all(a[n] == b[n] for n in a)  # models, optimizers, schedules, RNGs: same bytes
    rebuilt = [train_mod.build_generator(s)[0] for s in (long, ext)]
    assert all(torch.equal(x, y) for x, y in zip(rebuilt[0].state_dict().values(), rebuilt[1].state_dict().values()))
    assert _result(tmp_path / "ext")["updates"] == 10 and _result(tmp_path / "ext")["generator_change"] > 0
    if "--disback" in extra:
        assert _result(tmp_path / "ext")["switches"] == _result(tmp_path / "long")["switches"]
    # resumed again at its own total: nothing to train, the state and the result stay
    result = (tmp_path / "ext" / "result.json").read_bytes()
    run("ext", "--resume", "--max_train_steps", "10")
    assert _files(ext / "step-000000010") == b and (tmp_path / "ext" / "result.json").read_bytes() == result


def test_an_extension_keeps_the_first_runs_path_schedule(tmp_path):
    """DisBack's interval is set from the first total (share x total / (nodes - 1)): 0.4 x 6 / 2 -> 1,
    0.4 x 10 / 2 -> 2. Extended from 6 to 10, the run keeps the interval 1 and its position (the path
    was walked by update 2: the 4 new updates are on the teacher), unlike a 10-update run."""
    run = lambda out, *more: _cli("train", *TINY, *DISBACK, "--share", "0.4", "--out", tmp_path / out, *more)  # noqa: E731
    run("short", "--iterations", "6")
    run("long", "--iterations", "10")
    run("short", "--resume", "--max_train_steps", "10")
    short, long = _result(tmp_path / "short")["switches"], _result(tmp_path / "long")["switches"]
    assert [n for _, n in short] == [n for _, n in long] == [2, 1, 0]
    assert [s for s, _ in short] == [0, 1, 2] and [s for s, _ in long] == [0, 2, 4]
    manifest = json.loads((tmp_path / "short" / "state" / "step-000000010" / "manifest.json").read_text())
    assert manifest["extra"]["backtrack"]["schedule"] == {"every": 1} and "iterations" not in manifest["config"]


def test_a_state_whose_config_holds_the_total_still_resumes_and_extends(tmp_path, capsys):
    """States saved before the total left the run's identity hold ``iterations`` in their config."""
    from disback_core.state import latest_state, load_state, save_state

    out = tmp_path / "old"
    _cli("train", *TINY, "--iterations", "2", "--out", out)
    # rewrite the state as the earlier script saved it: the same objects, the config with the total
    args = train_mod.parse_args([*TINY, "--iterations", "2", "--out", str(out)])
    new_config = train_mod.read_state(out / "state")["config"]
    task = train_mod.build_task(args)
    gen = train_mod.make_student(args, task, task["teacher"])
    fake = train_mod.trainable_copy(task["teacher"])
    opts = {k: torch.optim.AdamW(m.parameters(), lr=args.lr, weight_decay=0.01) for k, m in
            (("generator", gen), ("fake", fake))}
    scheds = {k: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0) for k, o in opts.items()}
    data = torch.Generator()
    modules = {"generator": gen, "fake": fake}
    load_state(out / "state", modules=modules, optimizers=opts, schedulers=scheds, generators={"data": data},
               config=new_config)
    save_state(out / "state", step=2, modules=modules, optimizers=opts, schedulers=scheds, generators={"data": data},
               extra={"backtrack": None}, config=new_config | {"iterations": 2})
    assert train_mod.read_state(latest_state(out / "state"))["config"]["iterations"] == 2
    capsys.readouterr()
    _cli("train", *TINY, "--out", out, "--resume", "--max_train_steps", "3")
    assert "resumed at update 2, to go on to 3" in capsys.readouterr().out
    assert "iterations" not in train_mod.read_state(out / "state")["config"]


# ------------------------------------------------------------------ the command line


def test_diffusers_flag_names_map_to_the_same_configuration():
    ours = ["--model", "tiny-sd3", "--out", "o", "--iterations", "7", "--lr", "3e-4", "--batch-size", "8",
            "--grad-accum", "2", "--save-every", "5", "--keep", "2", "--mixed-precision", "bf16",
            "--max-grad-norm", "1.5", "--seed", "3", "--resume"]
    theirs = ["--pretrained_model_name_or_path", "tiny-sd3", "--output_dir", "o", "--max_train_steps", "7",
              "--learning_rate", "3e-4", "--train_batch_size", "4", "--gradient_accumulation_steps", "2",
              "--checkpointing_steps", "5", "--checkpoints_total_limit", "2", "--mixed_precision", "bf16",
              "--max_grad_norm", "1.5", "--seed", "3", "--resume_from_checkpoint", "latest"]
    hyphens = [a.replace("_", "-") if a.startswith("--") else a for a in theirs]
    settings = ("out", "iterations", "save_every", "keep", "resume")
    want = train_mod.parse_args(ours)
    want_config = train_mod.run_config(want, 1)
    for argv in (theirs, hyphens):
        got = train_mod.parse_args(argv)
        assert train_mod.run_config(got, 1) == want_config  # one process: 4 per device x 2 micro-batches = 8
        assert {k: getattr(got, k) for k in settings} == {k: getattr(want, k) for k in settings}
    assert set(train_mod.DIFFUSERS_ALIASES) <= set(theirs[::2]) | {"--seed"}
    # --train_batch_size is diffusers' per-device batch: on 2 processes the global batch doubles
    assert train_mod.run_config(train_mod.parse_args(theirs), 2)["batch_size"] == 16
    assert train_mod.run_config(train_mod.parse_args(ours), 2)["batch_size"] == 8
    for bad in (["--batch-size", "8", "--train_batch_size", "4"], ["--max_train", "3"], ["--mixed_precision", "fp16"],
                ["--train_batch_size", "0"]):
        with pytest.raises(SystemExit):
            train_mod.parse_args(["--model", "tiny-sd3", *bad])


def test_train_help_lists_the_aliases_and_needs_no_accelerate(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "accelerate", None)  # as if `pip install disback` without [distributed]
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--help"])
    help_text = capsys.readouterr().out
    assert e.value.code == 0 and help_text.startswith("usage: disback train")
    for flag in (*train_mod.DIFFUSERS_ALIASES, "--out", "--iterations", "--lr", "--batch-size", "--export",
                 "--output-dir", "--max-train-steps"):
        assert f"{flag} " in help_text or f"{flag}," in help_text, flag
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    listing = capsys.readouterr().out
    assert e.value.code == 0 and all(f"    {c} " in listing for c in ("train", "export"))
    with pytest.raises(SystemExit) as e:  # training needs it: refused naming the extra, before anything
        cli.main(["train", *TINY, "--out", str(tmp_path / "run")])
    assert "pip install 'disback[distributed]'" in str(e.value.code) and not (tmp_path / "run").exists()
    with pytest.raises(SystemExit) as e:  # other commands' unknown options are still refused
        cli.main(["export", "a", "b", "--nope"])
    assert e.value.code == 2 and "unrecognized arguments: --nope" in capsys.readouterr().err


def test_the_cli_and_the_train_module_import_without_accelerate():
    code = ("import sys, disback_core.cli as c, disback_core.train\n"
            "try:\n    c.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('accelerate' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0 and done.stdout.strip().endswith("False"), done.stderr[-2000:]


# ------------------------------------------------------------------ a resumed run's identity


def test_resume_with_a_changed_seed_names_the_seed_before_any_load(tmp_path, capsys):
    """A preset's random teacher comes from --seed: resuming with another seed used to surface as a path
    "recorded on another base model". Both the state and (without a state) the recorded path name it."""
    out = tmp_path / "run"
    run = [*TINY, *DISBACK, "--iterations", "2", "--save-every", "1", "--out", out]
    _cli("train", *run, "--stop-after", "1")
    with pytest.raises(SystemExit, match=r"--seed: 0 in the run, 1 given") as e:
        _cli("train", *run, "--resume", "--seed", "1")
    assert "step-000000001" in str(e.value) and "on another base model" not in str(e.value)
    with pytest.raises(SystemExit, match=r"--lr: 0\.0001 in the run, 0\.5 given"):
        _cli("train", *run, "--resume", "--lr", "0.5")
    import shutil

    shutil.rmtree(out / "state")  # a path without a state: its manifest's run is checked before the teacher's
    meta = json.loads((out / "trajectory" / "manifest.json").read_text())["meta"]["run"]
    assert meta["seed"] == 0 and meta["method"] == "dmd2" and "iterations" not in meta
    with pytest.raises(SystemExit, match=r"trajectory is from a run with other options: --seed: 0 in the run, 1 given"):
        _cli("train", *run, "--resume", "--seed", "1")
    _cli("train", *run, "--resume")  # the same options: the path loads and the run goes on
    assert _result(out)["switches"]


# ------------------------------------------------------------------ nothing lost: a fuzz over command sequences

ACTIONS = {
    "fresh": [],
    "resume": ["--resume"],
    "resume-longer": ["--resume", "--max_train_steps", "6"],
    "resume-other-seed": ["--resume", "--seed", "3"],
    "resume-other-lr": ["--resume", "--lr", "0.002"],
    "overwrite": ["--overwrite"],
    "overwrite-and-resume": ["--overwrite", "--resume"],
}


def _snapshot(out):
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(Path(out).rglob("*")) if p.is_file()}


def _newest(out):
    from disback_core.state import list_states

    return max(list_states(out / "state"), default=None) if (out / "state").exists() else None


def test_no_command_sequence_deletes_work_it_was_not_told_to(tmp_path_factory):
    """Issue 21 item 1, fuzzed: random sequences of `disback train` commands into one --out. A command
    either refuses before it writes anything (the folder's bytes unchanged, the message naming --resume
    or the option that differs), or it is --overwrite, or it resumes: then the newest state only moves on."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    seen = {"refused": 0, "resumed": 0, "overwritten": 0, "started": 0}

    @settings(max_examples=5, deadline=None, derandomize=True)
    @given(st.lists(st.sampled_from(list(ACTIONS)), min_size=2, max_size=3))
    def check(actions):
        out = tmp_path_factory.mktemp("run") / "out"
        base = [*TINY, *DISBACK, "--iterations", "4", "--save-every", "2", "--out", out]
        for a in actions:
            before, newest = _snapshot(out) if out.exists() else {}, _newest(out)
            try:
                _cli("train", *base, *ACTIONS[a])
            except SystemExit as e:
                assert _snapshot(out) == before if out.exists() else before == {}, a  # nothing written
                msg = str(e)  # (argparse's own refusals exit with code 2 and print the message)
                assert e.code == 2 or any(w in msg for w in ("--resume", "in the run,", "not shortened")), (a, msg)
                seen["refused"] += 1
                continue
            if a.startswith("overwrite"):
                seen["overwritten"] += 1
            elif before:
                assert a.startswith("resume"), (a, "a fresh start into an earlier run must be refused")
                assert newest is None or _newest(out) >= newest  # the newest state only moves on
                seen["resumed"] += 1
            else:
                seen["started"] += 1

    check()
    assert seen["refused"] > 0 and seen["resumed"] + seen["overwritten"] + seen["started"] > 0, seen


# ------------------------------------------------------------------ sharded states (--state-format, --fsdp)

# torchrun's processes run these `disback train` command lines one after the other (one launch: the
# interpreter, torch and diffusers start once), resetting accelerate's singleton state between them and
# keeping the process group (end_training would destroy it; a new one would not rendezvous again).
_RUNS = """import json, sys
import torch.distributed as dist
from accelerate.state import AcceleratorState, PartialState
from disback_core.train import main
keep = lambda self, group=None: None
PartialState.destroy_process_group = AcceleratorState.destroy_process_group = keep
for argv in json.loads(sys.argv[1]):
    main(argv)
    AcceleratorState._reset_state(True)
dist.destroy_process_group()
"""


def _torchrun(tmp_path, *runs):
    import socket

    script = tmp_path / "runs.py"
    script.write_text(_RUNS)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
           str(script), json.dumps([[str(a) for a in r] for r in runs])]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


def _sharded_content(step_dir):
    """What a sharded step folder holds, file by file: the shards' tensors and sharding information
    (their bytes are not reproducible: the safetensors package orders a file's metadata at random),
    the other files' bytes, and the manifest without the shards' hashes (and so its digest)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    got = {}
    for p in sorted(Path(step_dir).iterdir()):
        if p.name.startswith("shard-"):
            with safe_open(str(p), "pt") as f:
                info = json.loads(f.metadata()["DCP_SHARDING_INFO"])
            got[p.name] = (info, load_file(str(p)))
        elif p.name == "manifest.json":
            m = json.loads(p.read_text())
            m.pop("digest")
            m["files"] = {k: v for k, v in m["files"].items() if not k.startswith("shard-")}
            got[p.name] = m
        else:
            got[p.name] = p.read_bytes()
    return got


def _same_content(a, b):
    assert set(a) == set(b)
    for name in a:
        if name.startswith("shard-"):
            assert a[name][0] == b[name][0], name
            assert set(a[name][1]) == set(b[name][1]), name
            assert all(torch.equal(a[name][1][k], b[name][1][k]) for k in a[name][1]), name
        else:
            assert a[name] == b[name], name


def test_fsdp2_sharded_states_resume_exactly_and_export_as_the_full_format(tmp_path, capsys):
    """Issue 22 item 1: `disback train --fsdp` on 2 ranks saves sharded states by default (every rank its
    own shards, nothing gathered). The run equals the same run saved --state-format full: its --export,
    `disback export` of its state in this one process (resharded 2 -> 1) and generator_change are the
    same; stopped and resumed, it equals the uninterrupted run (every shard's tensors, every rank's RNG,
    the optimizers, schedules and DisBack's schedule). A --state-format naming the other format is
    refused on --resume, and so is resuming at another world size (the world size is the run's)."""
    from disback_core.sharded_state import FORMAT as SHARDED
    from disback_core.state import FORMAT as FULL
    from disback_core.state import list_states

    base = ["--model", "tiny-sd3", "--batch-size", "2", "--no-progress", "--fsdp", *DISBACK, "--iterations", "4",
            "--save-every", "2"]
    full, whole, cut = tmp_path / "full", tmp_path / "whole", tmp_path / "cut"
    _torchrun(tmp_path,
              [*base, "--state-format", "full", "--out", full, "--export", tmp_path / "full-exp"],
              [*base, "--out", whole, "--export", tmp_path / "whole-exp"],
              [*base, "--out", cut, "--stop-after", "3"])
    log = _torchrun(tmp_path, [*base, "--out", cut, "--resume", "--export", tmp_path / "cut-exp"])
    assert "resumed at update 3, to go on to 4" in log

    def manifest(out, step):
        return json.loads((out / "state" / f"step-{step:09d}" / "manifest.json").read_text())

    assert list_states(whole / "state") == [2, 4] and list_states(cut / "state") == [2, 3, 4]
    for out, steps in ((whole, (2, 4)), (cut, (2, 3, 4))):  # sharded by default under --fsdp: 2 ranks' shards
        for step in steps:
            m = manifest(out, step)
            assert m["format"] == SHARDED and m["world_size"] == 2
            assert m["shards"] == [f"shard-0000{r}-model-00001-of-00001.safetensors" for r in (1, 2)]
        assert train_mod.read_state(out / "state")["format"] == "sharded"
    assert manifest(full, 4)["format"] == FULL and train_mod.read_state(full / "state")["format"] == "full"
    config = train_mod.read_state(whole / "state")["config"]
    assert config == train_mod.read_state(full / "state")["config"] and "state_format" not in config

    # stopped at 3 and resumed: the same state as the uninterrupted run, at 4 (and at 2, before the stop)
    for step in (2, 4):
        _same_content(_sharded_content(whole / "state" / f"step-{step:09d}"),
                      _sharded_content(cut / "state" / f"step-{step:09d}"))
    rng = [f"rng-rank{r}.{x}" for r in (0, 1) for x in ("safetensors", "json")]  # the same writer in both formats
    assert all(_files(full / "state" / "step-000000004")[n] == _files(whole / "state" / "step-000000004")[n]
               for n in rng)
    results = [_result(out) for out in (full, whole, cut)]
    assert results[0]["generator_change"] == results[1]["generator_change"] == results[2]["generator_change"] > 0
    assert results[0]["switches"] == results[1]["switches"] == results[2]["switches"]

    # exports: the run's own (gathered at the end), and `disback export` in one process: all the same bytes
    want = _weights(tmp_path / "full-exp")
    assert _weights(tmp_path / "whole-exp") == want and _weights(tmp_path / "cut-exp") == want
    assert read_export_note(tmp_path / "whole-exp")["metadata"] == read_export_note(tmp_path / "full-exp")["metadata"]
    for out in (whole, cut):
        _cli("export", out, tmp_path / f"{out.name}-again")
        assert _weights(tmp_path / f"{out.name}-again") == want
    rebuilt, saved = train_mod.build_generator(whole / "state" / "step-000000004")
    assert saved["format"] == "sharded" and saved["world_size"] == 2
    assert _same_outputs(rebuilt, load_generator(tmp_path / "full-exp"))
    _cli("export", cut / "state" / "step-000000003", tmp_path / "step3")  # a kept step folder of the stopped run
    assert read_export_note(tmp_path / "step3")["metadata"]["updates"] == 3 and _weights(tmp_path / "step3") != want

    # --resume: the format follows the state; a flag naming the other one is refused before anything
    before = _snapshot(whole)
    for out, fmt, other in ((whole, "sharded", "full"), (full, "full", "sharded")):
        with pytest.raises(SystemExit) as e:
            _cli("train", *base, "--out", out, "--resume", "--iterations", "6", "--state-format", other)
        assert str(e.value.code) == (
            f"--resume: {out / 'state' / 'step-000000004'} is a {fmt} state, but --state-format {other} was given. "
            f"Resume with --state-format {fmt}, or without --state-format (a resumed run keeps its states' format); "
            "to save the other format, start a new run (a new --out, or --overwrite).")
    # a 2-rank run resumed in one process: refused, naming the world size (part of the run's identity)
    with pytest.raises(SystemExit, match=r"--world_size: 2 in the run, 1 given"):
        _cli("train", *base, "--out", whole, "--resume", "--iterations", "6")
    assert _snapshot(whole) == before
