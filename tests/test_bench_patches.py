"""The `patches` problem: 16x16 RGB patches of scikit-learn's two photographs, its fixed split, its
region-classifier features, and bench runs on it (tiny teacher and classifier budgets)."""

import dataclasses
import json
import math

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread, as the bench runs (these small convolutions gain nothing from more)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def problem(cache):
    from disback_core.bench.problems import get_problem

    return get_problem("patches", cache, teacher_steps=10, classifier_steps=20, eval_samples=40)


def test_the_split_is_fixed_disjoint_and_the_patches_in_range():
    from sklearn.datasets import load_sample_images

    from disback_core.bench.patches import N_TEST, crop_patches, draw_patches, load_photos, patch_split, test_patches

    photos = load_photos()
    assert photos.shape == (2, 427, 640, 3) and photos.min() >= -1 and photos.max() <= 1
    train, test = patch_split()
    assert len(test) == N_TEST and len(train) + len(test) == 2 * 412 * 625
    assert not set(test.tolist()) & set(train.tolist())
    # a position is (photograph, row, column): the last one is flower.jpg's bottom-right patch
    x, region = crop_patches(torch.tensor([0, 2 * 412 * 625 - 1]))
    flower = torch.as_tensor(load_sample_images().images[1][-16:, -16:].copy()).float() / 127.5 - 1
    assert torch.equal(x[1], flower.permute(2, 0, 1)) and region.tolist() == [0, 31]
    x_te, y_te = test_patches()
    assert x_te.shape == (N_TEST, 3, 16, 16) and x_te.min() >= -1 and x_te.max() <= 1 and x_te.min() < -0.9
    assert torch.bincount(y_te, minlength=32).min() > 64  # every region held out
    a, b = (draw_patches(8, torch.Generator().manual_seed(3)) for _ in range(2))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], test_patches()[0][:8])


def test_the_problem_builds_a_cached_unet_teacher_and_scores_held_out_data_near_zero(problem, cache):
    from disback_core.bench.problems import PROBLEMS, get_problem
    from disback_core.cli import PROBLEM_DEFAULTS
    from disback_core.denoisers import EDMPrecond

    assert "patches" in PROBLEMS and PROBLEM_DEFAULTS["patches"] == PROBLEM_DEFAULTS["digits"]
    t = problem.teacher
    assert isinstance(t, EDMPrecond) and type(t.net.unet).__name__ == "UNet2DModel"
    assert problem.sample_shape == (3, 16, 16) and problem.primary == "fd" and problem.uncond() is None
    info = problem.teacher_info
    assert info["cached"] is False and info["heldout_dsm_after"] < info["heldout_dsm_before"]
    again = get_problem("patches", cache, teacher_steps=10, classifier_steps=20, eval_samples=40)
    assert again.teacher_info["cached"] is True
    assert all(torch.equal(v, again.teacher.state_dict()[k]) for k, v in t.state_dict().items())
    x_te = problem.x_test
    assert problem.distance(x_te, x_te) < 1e-6  # the held-out data against themselves
    held = problem.evaluate(problem.heldout_data()[0])
    noise = problem.evaluate(torch.randn(40, 3, 16, 16))
    assert held["fd"] < 0.5 * noise["fd"] and set(held) == {"fd", "precision", "recall", "region_coverage"}
    small = problem.student_net("small", 0)
    assert sum(p.numel() for p in small.parameters()) < 0.5 * sum(p.numel() for p in t.parameters())


def test_one_dmd2_bench_iteration_runs_base_and_disback(problem, tmp_path):
    from disback_core.bench.runner import RunSpec, compare

    base = RunSpec(problem="patches", adapter="dmd2", iterations=1, batch=4, eval_every=1, degradation_steps=2)
    specs = [base, dataclasses.replace(base, label="disback", disback=True, nodes=2)]
    res = compare(specs, [0], tmp_path, progress=False, problem=problem)
    assert res["problem"] == "patches" and res["reference_sampler"] == "EDM Heun, 18 steps"
    refs = res["references"]["80.0"]
    assert set(refs) == {"teacher_multistep", "teacher_onestep", "data"}
    assert all(math.isfinite(r["final"]["fd"]) and len(r["evals"]) == 2 for r in res["runs"])
    assert res["runs"][1]["switches"][0] == [0, 1] and res["runs"][1]["degradation_seconds"] > 0
    assert json.loads((tmp_path / "results.json").read_text())["teacher"]["cache_key"].startswith("patches-teacher-")
    assert (tmp_path / "samples-base.png").is_file() and (tmp_path / "curves.png").is_file()


def test_the_other_adapters_and_the_regime_options_run(problem, tmp_path):
    from disback_core.bench.runner import RunSpec, run_one, weights_name
    from disback_core.storage import save_tensors

    spec = RunSpec(problem="patches", adapter="sid", iterations=1, batch=4, eval_every=1, student="small")
    assert math.isfinite(run_one(problem, spec, seed=0)["final"]["fd"])
    spec = dataclasses.replace(spec, adapter="di", critic_steps=2, fake_lr_scale=0.3)
    r = run_one(problem, spec, seed=0)
    assert math.isfinite(r["final"]["fd"]) and r["images_per_iteration"]["generated"] == 4 * 3
    path = tmp_path / weights_name("base", 0)
    save_tensors(path, r["_weights"])
    again = run_one(problem, dataclasses.replace(spec, init_generator=str(path)), seed=0)
    assert again["evals"][0]["metrics"] == pytest.approx(r["evals"][1]["metrics"])  # it starts where the first ended
