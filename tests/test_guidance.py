"""Distillation++ teacher guidance of a few-step student (Park, Lee, Ye 2024)."""
import pytest
import torch
from conftest import ring_means

from disback_core import (
    CFGDenoiser,
    DiffusersDenoiser,
    GaussianMixtureDenoiser,
    MultiStepGenerator,
    default_final_sigma,
    distillation_pp_sample,
    edm_mlp,
    fewstep_sigmas,
    sample_fewstep,
    timesteps_to_sigmas,
)
from disback_core.bench.metrics import sliced_wasserstein


class Counter(torch.nn.Module):
    """Counts calls and records the sigma of each."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.sigmas = []

    def forward(self, x, sigma, cond=None):
        self.sigmas.append(float(sigma[0]))
        return self.net(x, sigma, cond)


def student(k=3, seed=0):
    torch.manual_seed(seed)
    return MultiStepGenerator(edm_mlp(2, sigma_data=1.4, width=32, depth=2), fewstep_sigmas(k)).requires_grad_(False)


def teacher():
    return GaussianMixtureDenoiser(ring_means(), 0.1)


def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("noise", ["fresh", "deterministic"])
@pytest.mark.parametrize("guided", [1, 2, 3])
def test_lam_zero_is_the_plain_student_bit_exactly(noise, guided):
    s, z = student(3), torch.randn(64, 2)
    plain = sample_fewstep(s, z, noise=noise, generator=gen(7))
    got = distillation_pp_sample(s, teacher(), z, guided_steps=guided, lam=0.0, noise=noise,
                                 teacher_noise="student", generator=gen(7))
    assert torch.equal(got, plain)
    # fresh teacher noise from its own generator leaves the student's stream untouched
    got = distillation_pp_sample(s, teacher(), z, guided_steps=guided, lam=0.0, noise=noise,
                                 teacher_noise="fresh", generator=gen(7), teacher_generator=gen(99))
    assert torch.equal(got, plain)
    assert not torch.equal(distillation_pp_sample(s, teacher(), z, guided_steps=guided, lam=0.5, noise=noise,
                                                  generator=gen(7)), plain)


def test_lam_one_gives_the_teachers_x0_at_the_next_sigma():
    s, t, z = student(2), teacher(), torch.randn(64, 2)
    s0, s1 = s.sigmas
    got = distillation_pp_sample(s, t, z, guided_steps=1, lam=1.0, teacher_noise="student", generator=gen(3))
    n_g = gen(3)
    with torch.no_grad():
        x0_s = s.denoiser(s0 * z, torch.full((64,), s0))
        n = torch.randn(64, 2, generator=n_g)  # the student's own noise for step 2, shared
        x0 = t(x0_s + s1 * n, torch.full((64,), s1))  # the teacher's x0 at the NEXT student sigma
        want = s.denoiser(x0 + s1 * n, torch.full((64,), s1))
    assert torch.equal(got, want)
    # guiding the last step: the teacher's x0 at final_sigma is the output
    one = MultiStepGenerator(s.denoiser, [80.0])
    got = distillation_pp_sample(one, t, z, guided_steps=1, lam=1.0, final_sigma=0.5, generator=gen(4))
    with torch.no_grad():
        x0_s = s.denoiser(80.0 * z, torch.full((64,), 80.0))
        want = t(x0_s + 0.5 * torch.randn(64, 2, generator=gen(4)), torch.full((64,), 0.5))
    assert torch.equal(got, want)


def test_mixing_is_the_convex_combination():
    one, t, z = student(1), teacher(), torch.randn(32, 2)
    a = distillation_pp_sample(one, t, z, guided_steps=1, lam=0.0, final_sigma=0.5, generator=gen(1))
    b = distillation_pp_sample(one, t, z, guided_steps=1, lam=1.0, final_sigma=0.5, generator=gen(1))
    c = distillation_pp_sample(one, t, z, guided_steps=1, lam=0.25, final_sigma=0.5, generator=gen(1))
    assert torch.allclose(c, 0.75 * a + 0.25 * b, atol=1e-6)


@pytest.mark.parametrize("guided", [0, 1, 2, 4])
def test_guidance_is_never_applied_beyond_guided_steps(guided):
    s, t = student(4), Counter(teacher())
    stats = {}
    distillation_pp_sample(s, t, torch.randn(16, 2), guided_steps=guided, lam=0.5, generator=gen(0), stats=stats)
    sig = s.sigmas
    want = [*sig[1:], default_final_sigma(sig)][:guided]
    assert t.sigmas == pytest.approx(want, rel=1e-6)
    assert stats == {"student_evals": 4, "teacher_evals": guided}


def test_default_final_sigma_is_the_ramp_midpoint():
    assert default_final_sigma((80.0,)) == pytest.approx(fewstep_sigmas(2)[1])
    assert default_final_sigma(fewstep_sigmas(2)) == pytest.approx(fewstep_sigmas(4)[3])


def test_teacher_cfg_uses_cfgdenoiser_and_counts_both_branches():
    s = MultiStepGenerator(teacher(), [80.0, 2.5])
    t = Counter(teacher())
    z, cond = torch.randn(16, 2), torch.arange(16) % 8
    stats = {}
    got = distillation_pp_sample(s, t, z, cond, guided_steps=1, lam=1.0, teacher_cfg_scale=2.0, uncond=torch.tensor(0),
                                 generator=gen(2), stats=stats)
    assert stats["teacher_evals"] == 2 and len(t.sigmas) == 1  # one batched call, two branches
    cfg = CFGDenoiser(teacher(), 2.0, torch.tensor(0))
    want = distillation_pp_sample(s, cfg, z, cond, guided_steps=1, lam=1.0, generator=gen(2))
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="uncond"):
        distillation_pp_sample(s, t, z, cond, teacher_cfg_scale=2.0)


@pytest.mark.parametrize("kw, match", [({"lam": 1.5}, "lam must be in"), ({"lam": -0.1}, "lam must be in"),
                                       ({"guided_steps": 4}, "guided_steps"), ({"guided_steps": -1}, "guided_steps"),
                                       ({"teacher_noise": "x"}, "teacher_noise"), ({"noise": "x"}, "noise"),
                                       ({"sigmas": [1.0, 2.0]}, "strictly decreasing"),
                                       ({"final_sigma": 0.0, "guided_steps": 3}, "final_sigma")])
def test_bad_arguments_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        distillation_pp_sample(student(3), teacher(), torch.randn(4, 2), **kw)


class EpsModel(torch.nn.Module):
    """A stand-in for a diffusers eps-prediction UNet."""

    def forward(self, x, t, return_dict=False, class_labels=None):
        return (0.3 * x + t.to(x.dtype)[:, None] / 1000,)


def test_diffusers_timesteps():
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    den = DiffusersDenoiser(EpsModel(), abar, "epsilon", cond_kwarg="class_labels")
    tea = DiffusersDenoiser(EpsModel(), abar, "epsilon", cond_kwarg="class_labels", clamp=True)
    z = torch.randn(8, 2)
    steps = (999, 749, 499, 249)
    sig = timesteps_to_sigmas(den, steps)
    a = distillation_pp_sample(den, tea, z, timesteps=steps, guided_steps=2, lam=0.5, generator=gen(0))
    b = distillation_pp_sample(den, tea, z, sigmas=sig, guided_steps=2, lam=0.5, generator=gen(0))
    assert torch.equal(a, b) and torch.isfinite(a).all()
    plain = distillation_pp_sample(den, tea, z, timesteps=steps, guided_steps=2, lam=0.0, generator=gen(0))
    assert torch.equal(plain, sample_fewstep(den, z, sigmas=sig, generator=gen(0)))
    with pytest.raises(ValueError, match="not both"):
        distillation_pp_sample(den, tea, z, timesteps=steps, sigmas=sig)


def test_guidance_by_an_exact_teacher_repairs_a_wrong_student():
    """A student whose ring has radius 1.5 instead of 2: mixing in the exact teacher's x0 moves
    the samples toward the data, monotonically in lam."""
    wrong = MultiStepGenerator(GaussianMixtureDenoiser(ring_means(radius=1.5), 0.1), fewstep_sigmas(2))
    z = torch.randn(4000, 2, generator=gen(0))
    ref, _ = teacher().sample(4000, gen(1))
    sw = [sliced_wasserstein(distillation_pp_sample(wrong, teacher(), z, guided_steps=2, lam=lam, generator=gen(2)), ref)
          for lam in (0.0, 0.5, 1.0)]
    assert sw[0] > 0.35 and sw[1] < 0.8 * sw[0] and sw[2] < 0.5 * sw[0], sw


def test_bench_k_step_students_resume_and_guide(tmp_path, monkeypatch):
    """The runner trains K-step students and saves their weights; `guide` reloads them (its plain
    rows reproduce the runner's final metrics exactly) and adds guided rows with the right
    evaluation counts; a results.json written before `student_steps` existed still resumes."""
    from disback_core.bench import guide, runner
    from disback_core.bench.problems import Toy2D
    from disback_core.storage import read_json, write_json

    torch.set_num_threads(1)
    problem = Toy2D(tmp_path / "cache", teacher_steps=30, eval_samples=200)
    specs = [runner.RunSpec(label="base", iterations=2, batch=16, eval_every=2),
             runner.RunSpec(label="base-2step", iterations=2, batch=16, eval_every=2, student_steps=2)]
    out = tmp_path / "out"
    res = runner.compare(specs, [0], out, progress=False, problem=problem)
    assert [r["student_sigmas"] for r in res["runs"]] == [[80.0], list(fewstep_sigmas(2))]
    g = guide.guide_folder(out, guided_steps=[1, 2], lams=[0.5, 1.0], problem=problem, final_sigmas=[None, 0.5])
    assert len(g["rows"]) == (1 + 2 * 2) + (1 + 2 + 2 * 2)  # final sigmas only vary where the last step is guided
    finals = sorted(r["final_sigma"] for r in g["rows"] if r["label"] == "base" and r["guided_steps"] == 1)
    assert finals == pytest.approx([0.5, 0.5, default_final_sigma((80.0,)), default_final_sigma((80.0,))])
    plain = {r["label"]: r for r in g["rows"] if r["guided_steps"] == 0}
    for run in res["runs"]:
        assert plain[run["label"]]["metrics"] == run["final"]
    nfe = sorted((r["label"], r["guided_steps"], r["student_evals"], r["teacher_evals"]) for r in g["rows"])
    assert set(nfe) == {("base", 0, 1, 0), ("base", 1, 1, 1), ("base-2step", 0, 2, 0), ("base-2step", 1, 2, 1),
                        ("base-2step", 2, 2, 2)}
    assert "| base-2step | 2 | 2 | 1.0 | 0.17 | 4 (2 + 2) |" in (out / "guide.md").read_text()
    # an old results.json (no student_steps in its specs) is reused, not rerun
    stored = read_json(out / "results.json")
    assert stored["runs"][0]["spec"]["student_steps"] == 1
    stored["runs"][0]["spec"].pop("student_steps")
    write_json(out / "results.json", stored)
    monkeypatch.setattr(runner, "run_one", lambda *a, **k: pytest.fail("rerun instead of reused"))
    again = runner.compare(specs, [0], out, progress=False, problem=problem, resume=True)
    assert [r["final"] for r in again["runs"]] == [r["final"] for r in res["runs"]]


# --------------------------------------------------------------------------- the student's first step


def test_guided_sampling_feeds_a_timestep_generator_its_noise_scale():
    """DMD2's SDXL one-step setting (timestep 399, raw noise: noise_scale sqrt(1 + sigma^2)) on a tiny
    UNet: unguided it is G(z) bit for bit; guided, the teacher starts from G(z)."""
    from conftest import tiny_unet2d
    from diffusers import DDPMScheduler
    from test_fewstep import _ddpm_generator

    g = _ddpm_generator()
    tea = DiffusersDenoiser(tiny_unet2d(), scheduler=DDPMScheduler(), clamp=True)
    z = torch.randn(4, 2, 8, 8, generator=gen(1))
    with torch.no_grad():
        ref = g(z)
        for noise in ("fresh", "deterministic"):
            assert torch.equal(distillation_pp_sample(g, tea, z, guided_steps=0, noise=noise), ref)
        got = distillation_pp_sample(g, tea, z, guided_steps=1, lam=1.0, final_sigma=0.5, generator=gen(2))
        want = tea(ref + 0.5 * torch.randn(4, 2, 8, 8, generator=gen(2)), torch.full((4,), 0.5))
    assert torch.equal(got, want)


def test_deterministic_guidance_uses_the_noise_of_the_real_first_input():
    s = MultiStepGenerator(student(2).denoiser, fewstep_sigmas(2), noise_scale=3.0)
    t, z = teacher(), torch.randn(32, 2)
    s0, s1 = s.sigmas
    with torch.no_grad():
        assert torch.equal(distillation_pp_sample(s, t, z, guided_steps=2, lam=0.0, noise="deterministic"),
                           sample_fewstep(s, z, noise="deterministic"))
        got = distillation_pp_sample(s, t, z, guided_steps=1, lam=1.0, noise="deterministic", teacher_noise="student")
        x0 = s.denoiser(3.0 * z, torch.full((32,), s0))
        n = (3.0 * z - x0) / s0  # the student's implied noise: from 3 z, not from s0 z
        x0 = t(x0 + s1 * n, torch.full((32,), s1))
        want = s.denoiser(x0 + s1 * n, torch.full((32,), s1))
    assert torch.equal(got, want)


def test_guided_sampling_of_a_pure_noise_student():
    from test_fewstep import INF, LinearFlow

    lf, t, z = LinearFlow(0.5), teacher(), torch.randn(16, 2)
    s = MultiStepGenerator(lf, (INF, 2.0))
    with torch.no_grad():
        for noise in ("fresh", "deterministic"):
            assert torch.equal(distillation_pp_sample(s, t, z, guided_steps=2, lam=0.0, noise=noise, generator=gen(5)),
                               sample_fewstep(s, z, noise=noise, generator=gen(5)))
        got = distillation_pp_sample(s, t, z, guided_steps=1, lam=1.0, teacher_noise="student", generator=gen(3))
        n = torch.randn(16, 2, generator=gen(3))
        x0 = t(0.5 * z + 2.0 * n, torch.full((16,), 2.0))  # from_noise(z) = a z, re-noised to the next sigma
        assert torch.equal(got, lf(x0 + 2.0 * n, torch.full((16,), 2.0)))
        # deterministic: the implied first noise is z itself
        got = distillation_pp_sample(s, t, z, guided_steps=1, lam=1.0, noise="deterministic")
        x0 = t(0.5 * z + 2.0 * z, torch.full((16,), 2.0))
        assert torch.equal(got, lf(x0 + 2.0 * z, torch.full((16,), 2.0)))
        one = MultiStepGenerator(lf, [INF])
        with pytest.raises(ValueError, match="pass final_sigma"):
            distillation_pp_sample(one, t, z, guided_steps=1)
        got = distillation_pp_sample(one, t, z, guided_steps=1, lam=1.0, final_sigma=0.5, generator=gen(4))
        assert torch.equal(got, t(0.5 * z + 0.5 * torch.randn(16, 2, generator=gen(4)), torch.full((16,), 0.5)))
    with pytest.raises(ValueError, match="cannot start from pure noise"):
        distillation_pp_sample(student(1).denoiser, t, z, sigmas=[INF, 1.0])
