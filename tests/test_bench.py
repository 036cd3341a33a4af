"""Built-in problems (teacher training and caching), the runner's summary arithmetic, and the
`disback demo` main job end to end with a tiny budget."""
import dataclasses
import json
import statistics

import pytest
import torch

from disback_core.bench.problems import Digits, Toy2D
from disback_core.bench.runner import RunSpec, summarise
from disback_core.cli import main


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def test_toy_teacher_trains_caches_bit_exactly_and_retrains_a_corrupted_cache(cache):
    a = Toy2D(cache_dir=cache, teacher_steps=300)
    info = a.teacher_info
    assert info["cached"] is False and info["heldout_dsm_after"] < 0.8 * info["heldout_dsm_before"]
    b = Toy2D(cache_dir=cache, teacher_steps=300)
    assert b.teacher_info["cached"] is True
    sa, sb = a.teacher.state_dict(), b.teacher.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    weights = next(cache.glob("toy2d-teacher-*/weights.safetensors"))
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.warns(RuntimeWarning, match="sha256.*retraining toy2d-teacher"):
        c = Toy2D(cache_dir=cache, teacher_steps=300)
    assert c.teacher_info["cached"] is False
    sc = c.teacher.state_dict()
    assert all(torch.equal(sa[k], sc[k]) for k in sa)  # deterministic retraining


def test_problems_score_the_data_itself_near_zero(cache):
    toy = Toy2D(cache_dir=cache, teacher_steps=300)
    m = toy.evaluate(toy._draw(4000, torch.Generator().manual_seed(5)))
    assert m["sw"] < 0.12 and abs(m["energy"]) < 0.01 and m["mode_coverage"] == 1.0 and m["precision"] > 0.98
    far = toy.evaluate(torch.zeros(4000, 2))
    assert far["precision"] == 0.0 and far["mode_coverage"] == 0.0 and far["sw"] > 1.0
    digits = Digits(conditional=True, cache_dir=cache, teacher_steps=20)
    d = digits.evaluate(digits.x_train[:540], digits.y_train[:540])
    assert d["fd"] < 5 and d["class_coverage"] == 1.0 and d["label_accuracy"] > 0.97 and d["recall"] > 0.7
    assert digits.evaluate(torch.zeros(540, 1, 8, 8))["fd"] > 100


def test_text_conditional_digits_read_prompts_and_guide_with_the_empty_prompt(cache):
    from disback_core import CFGDenoiser

    text = Digits(text=True, cache_dir=cache, teacher_steps=10)
    assert text.name == "digits-text" and type(text.teacher.net.unet).__name__ == "UNet2DConditionModel"
    labels = text.y_train[:540]
    prompts = text._encode(labels)
    assert prompts.shape == (540, 4, 16) and torch.equal(text.labels_of(prompts), labels)
    assert torch.equal(text.uncond(), torch.zeros(4, 16))  # the null class: the empty prompt
    d = text.evaluate(text.x_train[:540], prompts)  # real images with their own prompts
    assert d["label_accuracy"] > 0.97 and d["fd"] < 5
    z, c = text.eval_inputs(20)
    assert torch.equal(text.labels_of(c), torch.arange(20) % 10)
    x, s = torch.randn(4, 1, 8, 8), torch.full((4,), 2.0)
    with torch.no_grad():
        u, cc = text.teacher(x, s, text.uncond().expand(4, 4, 16)), text.teacher(x, s, c[:4])
        assert torch.allclose(CFGDenoiser(text.teacher, 3.0, text.uncond())(x, s, c[:4]), u + 3.0 * (cc - u), atol=1e-5)
    assert Digits(conditional=True, cache_dir=cache, teacher_steps=10).uncond() == 10


def _curve(label, seed, ys, seconds_per_it=1.0, offset=0.0):
    evals = [{"iteration": 10 * i, "seconds": offset + 10 * i * seconds_per_it, "metrics": {"m": y}} for i, y in enumerate(ys)]
    tail = evals[1:][-2:]
    return {"label": label, "seed": seed, "evals": evals, "final": {"m": statistics.fmean(e["metrics"]["m"] for e in tail)},
            "seconds_per_iteration": seconds_per_it, "degradation_seconds": offset}


def test_summary_ratios_follow_the_documented_rule():
    runs = [_curve("base", 0, [9, 8, 6, 5, 4, 3, 3, 3, 3, 3, 3]),
            _curve("base", 1, [9, 8, 6, 5, 4, 3, 3, 3, 3, 3, 3]),
            _curve("disback", 0, [9, 6, 4, 3, 3, 3, 2, 2, 2, 2, 2], 1.1, offset=5.0),
            _curve("disback", 1, [9, 6, 4, 3, 3, 3, 2, 2, 2, 2, 2], 1.1, offset=5.0)]
    s = summarise(runs, "m")
    assert s["base"]["final"]["m"]["mean"] == 3.0 and s["disback"]["final"]["m"]["mean"] == 2.0
    # 10 evaluations after the first: the final window is 2. Base final 3: base's trailing 2-mean first
    # reaches 3 at iteration 60 (3, 3); DisBack's at 40 (3, 3).
    assert s["base"]["iterations_to_base_final"] == 60 and s["disback"]["iterations_to_base_final"] == 40
    assert s["disback"]["ratio_iterations"] == pytest.approx(40 / 60)
    assert s["disback"]["seconds_to_base_final"] == pytest.approx(5.0 + 40 * 1.1)
    assert s["disback"]["ratio_seconds"] == pytest.approx((5.0 + 44.0) / 60.0)
    assert s["disback"]["overhead_per_iteration"] == pytest.approx(1.1)
    assert s["disback"]["final"]["m"]["std"] == 0.0


@pytest.mark.parametrize("problem,extra", [("toy2d", ["--teacher-steps", "300"]),
                                           ("digits", ["--teacher-steps", "20", "--batch", "8", "--eval-samples", "300",
                                                       "--no-headline"])])
def test_demo_runs_end_to_end_and_writes_every_file(tmp_path, cache, capsys, problem, extra):
    out = tmp_path / "demo"
    rc = main(["demo", "--problem", problem, "--iterations", "4", "--eval-every", "2", "--seeds", "0", "1",
               "--degradation-steps", "10", "--out", str(out), "--cache-dir", str(cache), "--no-progress", *extra])
    assert rc == 0
    for name in ["report.md", "results.json", "curves.png", "samples-base.png", "samples-disback.png"]:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    res = json.loads((out / "results.json").read_text())
    assert res["schema"] == "disback-benchmark/1" and res["problem"] == problem
    assert "path" not in res["teacher"] and res["teacher"]["cache_key"].startswith(f"{problem}-teacher-")
    assert [r["label"] for r in res["runs"]] == ["base", "base", "disback", "disback"]
    assert all(len(r["evals"]) == 3 for r in res["runs"])
    dis = [r for r in res["runs"] if r["label"] == "disback"]
    assert all(r["switches"][0] == [0, 4] and r["degradation_seconds"] > 0 for r in dis)
    assert set(res["summary"]) == {"base", "disback"}
    printed = capsys.readouterr().out
    assert "| base |" in printed and "| disback |" in printed
    assert "| base |" in (out / "report.md").read_text()
    from disback_core.cli import HEADLINE

    if "--no-headline" in extra:
        assert not (out / "headline").exists()
        return
    head = json.loads((out / "headline" / "results.json").read_text())  # the headline regime, beside it
    assert [r["label"] for r in head["runs"]] == ["base", "base", "disback", "disback"]
    assert all(r["spec"][k] == v for r in head["runs"] for k, v in HEADLINE.items())
    assert all(r["spec"][k] == RunSpec().to_json()[k] for r in res["runs"] for k in HEADLINE)
    assert "headline regime" in printed and (out / "headline" / "curves.png").is_file()


def test_bench_guides_the_teacher_and_every_node_with_cfg_scale(tmp_path, cache, monkeypatch):
    """--cfg-scale: the base target is CFG(teacher); DisBack's is CFG(the node in use), both with the
    problem's empty prompt as the unconditional input."""
    from disback_core import CFGDenoiser
    from disback_core.bench import runner

    seen = []
    real_step = runner.train_step

    def spy(method, generator, fake, target, *a, **kw):
        seen.append((getattr(method, "node", None), target))
        return real_step(method, generator, fake, target, *a, **kw)

    monkeypatch.setattr(runner, "train_step", spy)
    out = tmp_path / "b"
    rc = main(["bench", "--problem", "digits-text", "--cfg-scale", "2.5", "--iterations", "2", "--eval-every", "2",
               "--seeds", "0", "--degradation-steps", "4", "--batch", "4", "--eval-samples", "40", "--out", str(out),
               "--cache-dir", str(cache), "--teacher-steps", "10", "--no-progress"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert all(r["spec"]["cfg_scale"] == 2.5 for r in res["runs"]) and "label_accuracy" in res["runs"][0]["final"]
    assert len(seen) == 4 and all(isinstance(t, CFGDenoiser) and t.scale == 2.5 for _, t in seen)
    assert torch.equal(seen[0][1].uncond, torch.zeros(4, 16))
    base_target, (node, dis_target) = seen[0][1], seen[2]
    assert base_target.denoiser is not dis_target.denoiser and node == 4  # the switchable target, at node N-1
    with pytest.raises(SystemExit):
        main(["bench", "--problem", "toy2d", "--cfg-scale", "2", "--iterations", "1", "--out", str(tmp_path / "t"),
              "--cache-dir", str(cache), "--teacher-steps", "300", "--seeds", "0", "--no-progress"])


def test_a_diverging_run_is_reported(cache, monkeypatch):
    from disback_core.bench.runner import RunSpec, run_one

    toy = Toy2D(cache_dir=cache, teacher_steps=300)
    values = iter([5.0, 1.0, 1.2, 30.0, 40.0])
    monkeypatch.setattr(toy, "evaluate", lambda samples, cond=None: {"sw": next(values)})
    r = run_one(toy, RunSpec(iterations=4, eval_every=1, batch=16), seed=0)
    assert r["divergence"] is not None and r["divergence"].startswith("iteration 3: diverging: value 30")
    calm = iter([5.0, 1.0, 1.2, 3.0, 4.0])
    monkeypatch.setattr(toy, "evaluate", lambda samples, cond=None: {"sw": next(calm)})
    assert run_one(toy, RunSpec(iterations=4, eval_every=1, batch=16), seed=0)["divergence"] is None


def test_trackers_are_optional_and_named_when_missing(tmp_path, monkeypatch):
    import sys
    import types

    from disback_core.bench.tracking import make_tracker

    make_tracker("none", tmp_path)("run", 1, {"sw": 0.5})
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(RuntimeError, match="'wandb' package, which is not installed"):
        make_tracker("wandb", tmp_path)
    logged = []

    class FakeRun:
        def log(self, scalars, step):
            logged.append((step, scalars))

    fake = types.SimpleNamespace(init=lambda **kw: FakeRun())
    monkeypatch.setitem(sys.modules, "wandb", fake)
    track = make_tracker("wandb", tmp_path)
    track("dmd2-base-seed0", 25, {"sw": 0.25})
    track("dmd2-base-seed0", 50, {"sw": 0.2})
    assert logged == [(25, {"sw": 0.25}), (50, {"sw": 0.2})]
    with pytest.raises(ValueError, match="tracker must be one of"):
        make_tracker("mlflow", tmp_path)


def test_bench_resume_reruns_only_what_an_interrupted_run_lost(tmp_path, cache, monkeypatch):
    import disback_core.bench.runner as runner

    args = ["bench", "--problem", "toy2d", "--teacher-steps", "300", "--iterations", "4", "--eval-every", "2",
            "--seeds", "0", "1", "--degradation-steps", "10", "--cache-dir", str(cache), "--no-progress",
            "--variants", "base", "disback"]
    full = tmp_path / "full"
    assert main([*args, "--out", str(full)]) == 0
    reference = json.loads((full / "results.json").read_text())

    real_run_one, calls = runner.run_one, []

    def crash_on_third(problem, spec, seed, **kw):
        calls.append((spec.label, seed))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_run_one(problem, spec, seed, **kw)

    out = tmp_path / "resumed"
    monkeypatch.setattr(runner, "run_one", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        main([*args, "--out", str(out)])
    partial = json.loads((out / "results.json").read_text())
    assert partial["partial"] is True and [(r["label"], r["seed"]) for r in partial["runs"]] == calls[:2]

    calls.clear()
    monkeypatch.setattr(runner, "run_one", lambda *a, **kw: (calls.append(a[1:3]), real_run_one(*a, **kw))[1])
    assert main([*args, "--out", str(out), "--resume"]) == 0
    assert [(s.label, seed) for s, seed in calls] == [("disback", 0), ("disback", 1)]
    resumed = json.loads((out / "results.json").read_text())
    assert "partial" not in resumed
    for a, b in zip(reference["runs"], resumed["runs"]):  # deterministic per seed: same curves
        assert [e["metrics"] for e in a["evals"]] == [e["metrics"] for e in b["evals"]]

    # a --resume asking for fewer variants or seeds keeps what an earlier command measured
    calls.clear()
    assert main([*args[:-2], "base", "--seeds", "1", "--out", str(out), "--resume"]) == 0
    assert calls == []
    kept = json.loads((out / "results.json").read_text())
    assert sorted((r["label"], r["seed"]) for r in kept["runs"]) == sorted((r["label"], r["seed"]) for r in resumed["runs"])
    assert set(kept["summary"]) >= {"base", "disback"}
    # the commands that made the kept runs stay named, oldest first, each once
    assert "--resume" not in partial["command"] and resumed["earlier_commands"] == [partial["command"]]
    assert kept["earlier_commands"] == [partial["command"], resumed["command"]]
    assert f"Earlier command (runs kept by --resume): `{partial['command']}`" in (out / "report.md").read_text()

    with pytest.raises(ValueError, match="--resume: .* problem 'toy2d'"):
        main(["bench", "--problem", "digits", "--teacher-steps", "2", "--iterations", "2", "--seeds", "0",
              "--cache-dir", str(cache), "--no-progress", "--out", str(out), "--resume", "--batch", "8",
              "--eval-samples", "300"])


def test_grid25_draws_its_unequal_weights_and_scores_the_data_near_zero(cache):
    from disback_core.bench.problems import get_problem

    grid = get_problem("grid25", cache, teacher_steps=50)
    assert grid.name == "grid25" and grid.means.shape == (25, 2)
    assert grid.weights.sum().item() == pytest.approx(1.0) and grid.weights.max() / grid.weights.min() == pytest.approx(25)
    x = grid._draw(20000, torch.Generator().manual_seed(3)).double()
    nearest = torch.cdist(x, grid.means).argmin(1)
    freq = torch.bincount(nearest, minlength=25) / 20000
    assert (freq - grid.weights).abs().max() < 0.01  # 0.01 is > 4 standard errors for the heaviest mode
    assert grid.evaluate(grid._draw(4000, torch.Generator().manual_seed(4)))["mode_coverage"] == 1.0
    edm = get_problem("toy2d-edm", cache, teacher_steps=50)
    assert edm.name == "toy2d-edm" and "toy2d-edm-teacher-" in edm.teacher_info["path"]
    assert torch.equal(edm._draw(10, torch.Generator().manual_seed(1)), Toy2D(cache, teacher_steps=300)._draw(
        10, torch.Generator().manual_seed(1)))  # the ring's data, another teacher


def test_regime_options_change_the_student_the_critic_and_the_start(tmp_path, cache, monkeypatch):
    from disback_core.bench import runner
    from disback_core.bench.runner import RunSpec, make_student, run_one
    from disback_core.storage import save_tensors

    toy = Toy2D(cache_dir=cache, teacher_steps=300)
    teacher = toy.teacher.state_dict()
    fresh = make_student(toy, RunSpec(student="fresh"), 80.0, (80.0,), seed=0).denoiser.state_dict()
    assert fresh.keys() == teacher.keys() and not any(torch.equal(fresh[k], teacher[k]) for k in teacher if k.endswith("weight"))
    small = make_student(toy, RunSpec(student="small"), 80.0, (80.0,), seed=0)
    n_small = sum(p.numel() for p in small.parameters())
    assert n_small < 0.5 * sum(p.numel() for p in toy.teacher.parameters())
    assert all(p.requires_grad for p in small.parameters())
    with pytest.raises(ValueError, match="student: 'toy2d' offers"):
        make_student(toy, RunSpec(student="huge"), 80.0, (80.0,), seed=0)
    # an already distilled generator as the start
    path = tmp_path / "g.safetensors"
    save_tensors(path, {k: v + 1 for k, v in small.state_dict().items()})
    loaded = make_student(toy, RunSpec(student="small", init_generator=str(path)), 80.0, (80.0,), seed=0)
    assert all(torch.equal(v, small.state_dict()[k] + 1) for k, v in loaded.state_dict().items())
    # a slow critic: the fake score's learning rate and its updates per generator update
    seen = []
    real_step = runner.train_step

    def spy(method, generator, fake, target, g_opt, f_opt, *a, **kw):
        seen.append((method.critic_steps, f_opt.param_groups[0]["lr"], g_opt.param_groups[0]["lr"]))
        return real_step(method, generator, fake, target, g_opt, f_opt, *a, **kw)

    monkeypatch.setattr(runner, "train_step", spy)
    for disback in (False, True):
        r = run_one(toy, RunSpec(iterations=2, eval_every=2, batch=16, fake_lr_scale=0.1, critic_steps=1, lr=1e-3,
                                 disback=disback, degradation_steps=10, student="small"), seed=0)
        assert r["spec"]["student"] == "small" and len(r["evals"]) == 2
    assert seen == [(1, pytest.approx(1e-4), 1e-3)] * 4


def test_the_default_records_lora_nodes_at_3x_and_resume_never_reuses_older_runs():
    from disback_core.bench.runner import RunSpec, degradation_lr, same_spec

    assert degradation_lr(RunSpec(lr=1e-4)) == pytest.approx(3e-4)  # LoRA nodes: the full fine-tuning path
    assert degradation_lr(RunSpec(lr=1e-4, node_mode="full")) == pytest.approx(1e-4)
    assert degradation_lr(RunSpec(lr=1e-4, node_mode="svd")) == pytest.approx(1e-4)
    assert degradation_lr(RunSpec(lr=1e-4, degradation_lr_scale=1.0)) == pytest.approx(1e-4)
    want = RunSpec(disback=True).to_json()
    older = {k: v for k, v in want.items() if k != "degradation_lr_scale"}  # stored before the field: ran at 1x
    assert not same_spec(older, want)
    assert same_spec(older, RunSpec(disback=True, degradation_lr_scale=1.0).to_json())
    assert same_spec(want, want) and not same_spec({**want, "share": 0.3}, want)


def test_area_and_equal_compute_measures_on_hand_made_curves():
    """The area under the curve (trapezoids over iterations) and the value at the base's compute budget."""
    from disback_core.bench.runner import summarise

    def run(label, seed, ys, cpu_per_it, start=0.0):
        its = [0, 10, 20, 30, 40, 50]
        evals = [{"iteration": i, "seconds": start + i * cpu_per_it, "cpu_seconds": start + i * cpu_per_it,
                  "metrics": {"fd": y}} for i, y in zip(its, ys)]
        return {"label": label, "seed": seed, "evals": evals, "final": {"fd": statistics.fmean(ys[-1:])},
                "seconds_per_iteration": cpu_per_it, "cpu_seconds_per_iteration": cpu_per_it, "degradation_seconds": start}

    base = [run("base", s, [100, 80, 60, 40, 20, 10], 1.0) for s in (0, 1)]
    # DisBack: 20 CPU s of recording first, so the base's 50 s budget ends at its iteration 30
    db = [run("disback", s, [100, 50, 30, 20, 15, 12], 1.0, start=20.0) for s in (0, 1)]
    summ = summarise(base + db, "fd")
    # trapezoids: (90 + 70 + 50 + 30 + 15) * 10 / 50 = 51; (75 + 40 + 25 + 17.5 + 13.5) * 10 / 50 = 34.2
    assert summ["base"]["auc"] == {"mean": pytest.approx(51.0), "std": 0.0}
    assert summ["disback"]["auc"]["mean"] == pytest.approx(34.2)
    assert summ["disback"]["ratio_auc"] == pytest.approx(34.2 / 51.0)
    assert summ["base"]["at_base_budget"]["mean"] == pytest.approx(10.0)  # the base's final value (window of 1)
    assert summ["disback"]["at_base_budget"]["mean"] == pytest.approx(20.0)  # at 50 CPU s: iteration 30
    short = [run("disback", s, [100, 50, 30, 20, 15, 12], 1.0, start=49.0) for s in (0, 1)]
    assert summarise(base + short, "fd")["disback"]["at_base_budget"] is None  # no evaluation within the budget


def test_fake_start_picks_node_n_or_the_teacher_and_refuses_anything_else(cache, monkeypatch):
    from disback_core.bench import runner
    from disback_core.bench.runner import RunSpec, run_one
    from disback_core.cli import parse_variant

    toy = Toy2D(cache_dir=cache, teacher_steps=300)
    fakes, real_step = [], runner.train_step

    def spy(method, generator, fake, target, *a, **kw):
        if not fakes or fakes[-1][0] is not method:
            # the fake score before its first update, and the node it should equal
            node = method.trajectory.materialize(method.trajectory.last) if hasattr(method, "trajectory") else None
            fakes.append((method, {k: v.clone() for k, v in fake.state_dict().items()}, node))
        return real_step(method, generator, fake, target, *a, **kw)

    monkeypatch.setattr(runner, "train_step", spy)
    spec = RunSpec(iterations=1, eval_every=1, batch=16, disback=True, degradation_steps=10, nodes=3)
    for start in ("node", "teacher"):
        run_one(toy, dataclasses.replace(spec, fake_start=start), seed=0)
    (_, at_node, node_n), (_, at_teacher, _) = fakes
    teacher = toy.teacher.state_dict()
    assert all(torch.equal(at_teacher[k], teacher[k]) for k in teacher)
    assert all(torch.equal(at_node[k], v) for k, v in node_n.state_dict().items())
    assert not all(torch.equal(at_node[k], teacher[k]) for k in teacher)  # node N is not the teacher
    assert parse_variant(spec, "disback:fake_start=teacher").fake_start == "teacher"
    with pytest.raises(ValueError, match="fake_start must be 'node' or 'teacher', got 'student'"):
        run_one(toy, dataclasses.replace(spec, fake_start="student"), seed=0)
