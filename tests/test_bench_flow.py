"""The built-in flow-matching problem (`digits-flow`): its SD3 transformer teacher, the flow-time
samplers and flow-matching fake-score loss it gives the methods, and a bench run end to end."""

import json
import math

import pytest
import torch


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def problem(cache):
    from disback_core.bench.problems import get_problem

    return get_problem("digits-flow", cache, teacher_steps=20)


def test_the_teacher_is_a_trained_cached_sd3_flow_model(problem, cache):
    from diffusers import SD3Transformer2DModel

    from disback_core.bench.problems import get_problem
    from disback_core.flow import FlowMatchDenoiser

    t = problem.teacher
    assert isinstance(t, FlowMatchDenoiser) and isinstance(t.model, SD3Transformer2DModel)
    assert t.shift_factor() == 1.0 and not any(p.requires_grad for p in t.parameters())
    info = problem.teacher_info
    assert info["cached"] is False and info["heldout_dsm_after"] < info["heldout_dsm_before"]
    again = get_problem("digits-flow", cache, teacher_steps=20)
    assert again.teacher_info["cached"] is True
    sa, sb = t.state_dict(), again.teacher.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # prompts, labels and the empty prompt are digits-text's
    z, c = problem.eval_inputs(20)
    assert c.shape == (20, 4, 16) and torch.equal(problem.labels_of(c), torch.arange(20) % 10)
    assert torch.equal(problem.uncond(), torch.zeros(4, 16))
    with torch.no_grad():  # one velocity call at t = 1 on the noise itself, and a finite sigma
        assert problem.teacher.from_noise(z[:4], c[:4]).shape == (4, 1, 8, 8)
        assert torch.isfinite(problem.teacher(z[:4], torch.full((4,), 2.0), c[:4])).all()


def test_the_methods_get_flow_samplers_and_the_velocity_loss(problem):
    from disback_core.bench.runner import RunSpec, make_method
    from disback_core.sigmas import LogitNormalSigma, UniformTimeSigma, flow_weight

    assert problem.generator_sigma_init(80.0) == math.inf
    assert problem.student_sigmas(4, math.inf)[0] == math.inf
    dmd2 = make_method(problem, RunSpec(problem="digits-flow", adapter="dmd2"))
    assert dmd2.sigma_sampler == UniformTimeSigma(0.02, 0.98, 1.0)
    assert dmd2.dsm.sigma_sampler == UniformTimeSigma(1e-3, 0.999, 1.0)
    assert dmd2.dsm.weight is flow_weight and dmd2.dsm.reduction == "mean" and dmd2.critic_steps == 5
    sid = make_method(problem, RunSpec(problem="digits-flow", adapter="sid"))
    assert sid.sigma_sampler == UniformTimeSigma(1e-3, 0.8, 1.0) and sid.dsm.sigma_sampler == LogitNormalSigma()
    assert sid.dsm.weight is flow_weight and sid.dsm.reduction == "sum"
    di = make_method(problem, RunSpec(problem="digits-flow", adapter="di", critic_steps=2))
    assert di.sigma_sampler == LogitNormalSigma() and di.dsm.weight is flow_weight and di.critic_steps == 2
    # the fake-score loss is the flow-matching loss: velocity error, mean over pixels (DMD2)
    x = torch.randn(3, 1, 8, 8)
    c = problem._encode(torch.tensor([0, 1, 2]))
    sigma, noise = torch.tensor([0.5, 1.0, 3.0]), torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        loss = dmd2.dsm(problem.teacher, x, c, sigma=sigma, noise=noise)
        t = (sigma / (1 + sigma)).view(-1, 1, 1, 1)
        v = problem.teacher.velocity((1 - t) * x + t * noise, t.flatten(), c).float()
    assert torch.allclose(loss, ((v - (noise - x)) ** 2).mean(dim=(1, 2, 3)), rtol=1e-4)


def test_bench_runs_base_and_disback_with_dmd2_and_writes_results(tmp_path, cache, problem):
    from disback_core.cli import main

    out = tmp_path / "b"
    rc = main(
        [
            "bench",
            "--problem",
            "digits-flow",
            "--adapter",
            "dmd2",
            "--iterations",
            "2",
            "--eval-every",
            "2",
            "--seeds",
            "0",
            "--degradation-steps",
            "4",
            "--batch",
            "4",
            "--eval-samples",
            "40",
            "--out",
            str(out),
            "--cache-dir",
            str(cache),
            "--teacher-steps",
            "20",
            "--no-progress",
            "--variants",
            "base",
            "disback",
        ]
    )
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["problem"] == "digits-flow" and res["reference_sampler"] == "flow Euler, 32 steps"
    assert res["teacher"]["cache_key"].startswith("digits-flow-teacher-") and list(res["references"]) == ["inf"]
    assert [r["label"] for r in res["runs"]] == ["base", "disback"]
    assert all(r["sigma_init"] == math.inf and len(r["evals"]) == 2 for r in res["runs"])
    assert all(math.isfinite(r["final"]["fd"]) and "label_accuracy" in r["final"] for r in res["runs"])
    dis = res["runs"][1]
    assert dis["switches"][0] == [0, 4] and dis["degradation_seconds"] > 0
    assert set(res["summary"]) == {"base", "disback"}
    assert "flow Euler, 32 steps" in (out / "report.md").read_text()
    for name in ["curves.png", "samples-base.png", "samples-disback.png", "generator-disback-seed0.safetensors"]:
        assert (out / name).is_file(), name
