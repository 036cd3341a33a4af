"""DMD2's multi-step generator (backward simulation) and the few-step sampler."""
import copy

import pytest
import torch
from conftest import ring_means
from disback_core.adapters import DMD2

from disback_core import (
    Backtrack,
    Batch,
    DiffusersDenoiser,
    FixedInterval,
    GaussianMixtureDenoiser,
    MultiStepGenerator,
    OneStepGenerator,
    edm_mlp,
    fewstep_sigmas,
    make_fewstep_generator,
    record_degradation,
    sample_fewstep,
    timesteps_to_sigmas,
    train_step,
    trainable_copy,
)
from disback_core.bench.metrics import sliced_wasserstein
from disback_core.sigmas import LogNormalSigma


class Recorder(torch.nn.Module):
    """Records every call: input, sigma and whether autograd was on."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.calls = []

    def forward(self, x, sigma, cond=None):
        self.calls.append({"x": x.clone(), "sigma": float(sigma[0]), "x_requires_grad": x.requires_grad,
                           "grad_enabled": torch.is_grad_enabled()})
        return self.net(x, sigma, cond)


def mlp(seed=0, width=32):
    torch.manual_seed(seed)
    return edm_mlp(2, sigma_data=1.4, width=width, depth=2)


def test_one_step_equals_one_step_generator_bit_exactly():
    net = mlp()
    z = torch.randn(64, 2)
    one = OneStepGenerator(net, 80.0)
    multi = MultiStepGenerator(net, [80.0])
    state = torch.get_rng_state()
    out = multi(z)
    assert torch.equal(torch.get_rng_state(), state)  # K = 1 draws nothing
    assert torch.equal(out, one(z))
    assert torch.equal(sample_fewstep(multi, z), one(z))
    assert torch.equal(sample_fewstep(one, z), one(z))
    assert multi.sigma_init == one.sigma_init == 80.0 and multi.last_step == 0


@pytest.mark.parametrize("sigmas, match", [([], "empty"), ([80.0, 80.0], "strictly decreasing"),
                                           ([1.0, 2.0], "strictly decreasing"), ([80.0, 0.0], "> 0"),
                                           ([80.0, -1.0], "> 0"), ([float("nan")], "finite")])
def test_bad_sigmas_are_named(sigmas, match):
    with pytest.raises(ValueError, match=match) as e:
        MultiStepGenerator(mlp(), sigmas)
    assert "sigmas" in str(e.value)
    with pytest.raises(ValueError, match="sigmas"):
        sample_fewstep(mlp(), torch.randn(2, 2), sigmas=sigmas)


def test_bad_step_and_noise_and_missing_sigmas():
    with pytest.raises(ValueError, match="step"):
        MultiStepGenerator(mlp(), [80.0, 1.0], step=2)
    with pytest.raises(ValueError, match="noise"):
        sample_fewstep(MultiStepGenerator(mlp(), [80.0, 1.0]), torch.randn(2, 2), noise="ddim")
    with pytest.raises(ValueError, match="sigmas is required"):
        sample_fewstep(mlp(), torch.randn(2, 2))
    with pytest.raises(ValueError, match="steps"):
        fewstep_sigmas(0)


def test_fewstep_sigmas_rule():
    assert fewstep_sigmas(1) == (80.0,)
    s = fewstep_sigmas(4)
    assert s[0] == 80.0 and s == tuple(sorted(s, reverse=True))
    assert s[1:] == pytest.approx((17.528, 2.5152, 0.16975), rel=1e-4)
    assert fewstep_sigmas(2)[1] == pytest.approx(s[2])  # the K=2 grid is a subset of the K=4 grid
    assert fewstep_sigmas(2, sigma_max=2.5)[0] == 2.5


def test_backward_simulation_inputs_are_detached_current_and_reproducible():
    sig = (80.0, 2.5, 0.2)
    rec = Recorder(mlp())
    g = MultiStepGenerator(rec, sig, generator=torch.Generator().manual_seed(5), step=2)
    z = torch.randn(16, 2)
    out = g(z)
    assert [c["sigma"] for c in rec.calls] == pytest.approx(sig, rel=1e-6)
    # the first two calls simulate without autograd; the last one has it, on a detached input
    assert [c["grad_enabled"] for c in rec.calls] == [False, False, True]
    assert not any(c["x_requires_grad"] for c in rec.calls)
    assert out.requires_grad
    # the input equals a manual simulation with the same noise
    n = torch.Generator().manual_seed(5)
    with torch.no_grad():
        x = 80.0 * z
        x = rec.net(x, torch.full((16,), 80.0)) + 2.5 * torch.randn(16, 2, generator=n)
        x = rec.net(x, torch.full((16,), 2.5)) + 0.2 * torch.randn(16, 2, generator=n)
    assert torch.equal(rec.calls[2]["x"], x)
    # gradients flow only through the last call: equal to D(x_2, s_2) on the detached input alone
    out.pow(2).sum().backward()
    got = [p.grad.clone() for p in rec.net.parameters()]
    rec.net.zero_grad()
    rec.net(x, torch.full((16,), 0.2)).pow(2).sum().backward()
    for a, b in zip(got, (p.grad for p in rec.net.parameters())):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    # the simulation uses the current weights: change them and the input changes accordingly
    rec.calls.clear()
    g.generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in rec.net.parameters():
            p.add_(0.05)
    g(z)
    n = torch.Generator().manual_seed(5)
    with torch.no_grad():
        x2 = 80.0 * z
        x2 = rec.net(x2, torch.full((16,), 80.0)) + 2.5 * torch.randn(16, 2, generator=n)
        x2 = rec.net(x2, torch.full((16,), 2.5)) + 0.2 * torch.randn(16, 2, generator=n)
    assert torch.equal(rec.calls[2]["x"], x2)
    assert (x2 - x).abs().max() > 1e-3


def test_step_index_is_uniform_and_seeded():
    g = MultiStepGenerator(mlp(), fewstep_sigmas(4), generator=torch.Generator().manual_seed(0))
    ks = [g.draw_step() for _ in range(2000)]
    counts = torch.bincount(torch.tensor(ks), minlength=4)
    assert counts.sum() == 2000 and (counts - 500).abs().max() < 80  # ~3.5 std of a binomial(2000, 1/4)
    g.generator = torch.Generator().manual_seed(0)
    assert [g.draw_step() for _ in range(50)] == ks[:50]
    g.step = 3
    assert {g.draw_step() for _ in range(10)} == {3}


def test_sampler_updates_match_the_formulas():
    teacher = GaussianMixtureDenoiser(ring_means(), 0.1)
    sig = (80.0, 2.5, 0.2)
    z = torch.randn(32, 2)
    got = sample_fewstep(teacher, z, sigmas=sig, noise="deterministic")
    x = 80.0 * z
    for s, s_next in zip(sig, (*sig[1:], None)):
        x0 = teacher(x, s)
        if s_next is not None:
            x = x0 + s_next * (x - x0) / s
    assert torch.allclose(got, x0, atol=1e-6)
    stats = {}
    got = sample_fewstep(teacher, z, sigmas=sig, generator=torch.Generator().manual_seed(1), stats=stats)
    n = torch.Generator().manual_seed(1)
    x = 80.0 * z
    for s, s_next in zip(sig, (*sig[1:], None)):
        x0 = teacher(x, s)
        if s_next is not None:
            x = x0 + s_next * torch.randn(32, 2, generator=n)
    assert torch.allclose(got, x0, atol=1e-6) and stats == {"student_evals": 3}


class EpsModel(torch.nn.Module):
    """A stand-in for a diffusers eps-prediction UNet: ``model(x, t, return_dict=False)``."""

    def forward(self, x, t, return_dict=False, class_labels=None):
        return (0.3 * x + t.to(x.dtype)[:, None] / 1000,)


def test_timesteps_to_sigmas_for_a_diffusers_schedule():
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    den = DiffusersDenoiser(EpsModel(), abar, "epsilon", cond_kwarg="class_labels")
    sig = timesteps_to_sigmas(den, (999, 749, 499, 249))
    want = ((1 - abar) / abar).sqrt()[[999, 749, 499, 249]]
    assert torch.allclose(torch.tensor(sig, dtype=torch.float64), want, rtol=1e-12)
    z = torch.randn(8, 2)
    out = sample_fewstep(MultiStepGenerator(den, sig), z, generator=torch.Generator().manual_seed(0))
    assert out.shape == z.shape and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="timesteps"):
        timesteps_to_sigmas(den, (1200,))
    with pytest.raises(TypeError, match="DiffusersDenoiser"):
        timesteps_to_sigmas(mlp(), (999,))


def _dmd2_setup(k, seed=0):
    teacher = mlp(seed).requires_grad_(False).eval()
    gen = make_fewstep_generator(teacher, fewstep_sigmas(k, sigma_max=10.0), generator=torch.Generator().manual_seed(1))
    fake = trainable_copy(teacher)
    method = DMD2(sigma_data=1.4, critic_steps=2)
    g = torch.Generator().manual_seed(2)
    next_batch = lambda: Batch(torch.randn(32, 2, generator=g))  # noqa: E731
    return teacher, gen, fake, method, next_batch


def test_multistep_generator_inside_train_step_with_dmd2():
    teacher, gen, fake, method, next_batch = _dmd2_setup(3)
    rec = Recorder(gen.denoiser)
    gen.denoiser = rec
    before = copy.deepcopy(gen.state_dict())
    f_before = copy.deepcopy(fake.state_dict())
    g_opt = torch.optim.Adam(gen.parameters(), 1e-3)
    f_opt = torch.optim.Adam(fake.parameters(), 1e-3)
    steps = set()
    for _ in range(6):
        logs = train_step(method, gen, fake, teacher, g_opt, f_opt, next_batch)
        steps.add(gen.last_step)
        assert all(torch.isfinite(torch.tensor(v)) for v in logs.values()) and "generator/dm" in logs
    assert len(steps) >= 2  # the step index varies between calls
    # critic calls run without autograd; only the generator step's last call has it
    assert any(c["grad_enabled"] for c in rec.calls) and not any(c["x_requires_grad"] for c in rec.calls)
    moved = max((gen.state_dict()[k] - v).abs().max().item() for k, v in before.items())
    f_moved = max((fake.state_dict()[k] - v).abs().max().item() for k, v in f_before.items())
    assert moved > 1e-5 and f_moved > 1e-5


def test_multistep_generator_inside_backtrack_unchanged():
    teacher, gen, _, method, next_batch = _dmd2_setup(2)
    g0 = copy.deepcopy(gen).requires_grad_(False)
    traj = record_degradation(teacher, g0, method, next_batch, steps=4, interval=2, lr=1e-3, mode="full", seed=0)
    bt = Backtrack(method, traj, FixedInterval(2))
    fake = bt.initial_fake()
    g_opt = torch.optim.Adam(gen.parameters(), 1e-3)
    f_opt = torch.optim.Adam(fake.parameters(), 1e-3)
    assert bt.node == traj.last - 1 == 1
    before = copy.deepcopy(gen.state_dict())
    for _ in range(4):
        logs = train_step(bt, gen, fake, bt.target, g_opt, f_opt, next_batch)
        assert torch.isfinite(torch.tensor(logs["generator/loss"]))
    assert bt.node == 0 and bt.switches == [(0, 1), (2, 0)]  # moved to the teacher after 2 generator steps
    assert max((gen.state_dict()[k] - v).abs().max().item() for k, v in before.items()) > 1e-5


def test_two_step_student_trains_and_beats_one_step_at_init():
    """DMD2 with an exact Gaussian-mixture teacher (ring of 8), the student an MLP regressed onto
    the exact denoiser: at initialisation its 2-step samples are much closer to the data (sliced W2)
    than its 1-step output, and brief DMD2 training of the 2-step generator (backward simulation)
    more than halves the 2-step distance.

    Not asserted: that the *trained* student's 2 steps beat its own trained first step. Backward
    simulation trains the first step's output toward the data too; here (150 iterations) the two
    were within noise of each other (about 0.24 vs 0.28)."""
    torch.manual_seed(1)
    gmm = GaussianMixtureDenoiser(ring_means(), 0.1)
    net = edm_mlp(2, sigma_data=1.4, width=32, depth=2)
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    g0 = torch.Generator().manual_seed(1)
    sampler = LogNormalSigma(-0.5, 1.5)
    for _ in range(300):  # regression onto the exact x0 (lower variance than DSM)
        x, _ = gmm.sample(256, g0)
        s = sampler(256, generator=g0)
        xt = x + s[:, None] * torch.randn(256, 2, generator=g0)
        loss = ((net(xt, s) - gmm(xt, s)) ** 2).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    sig = fewstep_sigmas(2, sigma_max=80.0)
    gen = MultiStepGenerator(net, sig, generator=torch.Generator().manual_seed(1))
    fake = trainable_copy(net)
    method = DMD2(sigma_data=1.4, critic_steps=2)
    z = torch.randn(4000, 2, generator=torch.Generator().manual_seed(3))
    ref, _ = gmm.sample(4000, torch.Generator().manual_seed(4))

    def sw(steps):
        x = sample_fewstep(gen, z, sigmas=sig[:steps], generator=torch.Generator().manual_seed(5))
        return sliced_wasserstein(x, ref)

    sw1_init, sw2_init = sw(1), sw(2)
    assert sw2_init < 0.7 * sw1_init, (sw1_init, sw2_init)
    g = torch.Generator().manual_seed(2)
    g_opt = torch.optim.Adam(gen.parameters(), 1e-3)
    f_opt = torch.optim.Adam(fake.parameters(), 1e-3)
    for _ in range(150):
        train_step(method, gen, fake, gmm, g_opt, f_opt, lambda: Batch(torch.randn(256, 2, generator=g)))
    sw2 = sw(2)
    assert sw2 < 0.5 * sw2_init, (sw2_init, sw2)
    assert sw2 < 0.4, sw2


# --------------------------------------------------------------------------- the generator's input scale


def _ddpm_generator(seed=0):
    """DMD2's SDXL one-step setting on a tiny UNet: raw noise at timestep 399, noise_scale sqrt(1 + sigma^2)."""
    from conftest import tiny_unet2d
    from diffusers import DDPMScheduler

    from disback_core import timestep_generator

    torch.manual_seed(seed)
    return timestep_generator(tiny_unet2d(), 399, scheduler=DDPMScheduler())


def test_samplers_feed_a_timestep_generator_its_noise_scale_bit_exactly():
    g = _ddpm_generator()
    s0 = g.sigma_init
    assert g.noise_scale == pytest.approx((1 + s0 * s0) ** 0.5, rel=1e-15) and g.noise_scale > 1.1 * s0
    z = torch.randn(4, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = g(z)
        # G(z) is D(noise_scale z, sigma) (here 11% more than sigma z): the call the UNet was trained on
        assert torch.equal(ref, g.denoiser(g.noise_scale * z, torch.full((4,), s0)))
        assert (ref - g.denoiser(s0 * z, torch.full((4,), s0))).abs().max() > 0.1
        for noise in ("fresh", "deterministic"):
            assert torch.equal(sample_fewstep(g, z, noise=noise), ref)
        multi = MultiStepGenerator(g.denoiser, [s0], noise_scale=g.noise_scale)
        assert torch.equal(multi(z), ref) and torch.equal(sample_fewstep(multi, z), ref)
        # a plain denoiser with sigmas keeps the EDM convention noise_scale = sigmas[0]
        assert torch.equal(sample_fewstep(g.denoiser, z, sigmas=[s0]), g.denoiser(s0 * z, torch.full((4,), s0)))


def test_multistep_noise_scale_first_step_simulation_and_k1():
    net = mlp()
    z = torch.randn(16, 2)
    s = (80.0, 2.5, 0.2)
    assert MultiStepGenerator(net, s).noise_scale == 80.0  # the default: sigmas[0], as before
    g = MultiStepGenerator(net, s, noise_scale=3.0, generator=torch.Generator().manual_seed(4), step=0)
    with torch.no_grad():
        x0 = net(3.0 * z, torch.full((16,), 80.0))
        assert torch.equal(g(z), x0)  # the training call at k = 0
        g.step = 1
        want = net(x0 + 2.5 * torch.randn(16, 2, generator=torch.Generator().manual_seed(4)), torch.full((16,), 2.5))
        assert torch.equal(g(z), want)  # backward simulation starts from 3 z as well
        assert torch.equal(g.simulate(z, None, 0), 3.0 * z)
        # the deterministic sampler's first noise comes from the real first input 3 z
        eps = (3.0 * z - x0) / 80.0
        x1 = x0 + 2.5 * eps
        x01 = net(x1, torch.full((16,), 2.5))
        x2 = x01 + 0.2 * ((x1 - x01) / 2.5)
        assert torch.equal(sample_fewstep(g, z, noise="deterministic"), net(x2, torch.full((16,), 0.2)))
        # K = 1: OneStepGenerator with the same noise_scale, bit for bit
        one, k1 = OneStepGenerator(net, 80.0, noise_scale=3.0), MultiStepGenerator(net, [80.0], noise_scale=3.0)
        assert torch.equal(k1(z), one(z)) and torch.equal(k1(z), x0)
        assert torch.equal(sample_fewstep(k1, z), one(z)) and torch.equal(sample_fewstep(one, z), x0)
    made = make_fewstep_generator(net, s, noise_scale=3.0)
    assert made.noise_scale == 3.0 and made.denoiser is not net
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="noise_scale"):
            MultiStepGenerator(net, s, noise_scale=bad)


def test_sampler_sigmas_override_keeps_or_refuses_the_noise_scale():
    net = mlp()
    z = torch.randn(8, 2)
    g = MultiStepGenerator(net, (80.0, 2.5), noise_scale=3.0)
    with torch.no_grad():
        x0 = net(3.0 * z, torch.full((8,), 80.0))
        # the same first sigma: the generator's own noise_scale
        assert torch.equal(sample_fewstep(g, z, sigmas=[80.0]), x0)
        # another first sigma: a custom scale belongs to its own sigma, refused loudly
        with pytest.raises(ValueError, match="noise_scale 3.0 belongs to its own first sigma 80.0"):
            sample_fewstep(g, z, sigmas=[40.0, 2.5])
        # the EDM convention (noise_scale = sigma) carries over to another first sigma
        edm = MultiStepGenerator(net, (80.0, 2.5))
        assert torch.equal(sample_fewstep(edm, z, sigmas=[40.0]), net(40.0 * z, torch.full((8,), 40.0)))


# --------------------------------------------------------------------------- starting from pure noise


class LinearFlow(torch.nn.Module):
    """A closed-form stand-in for a flow-matching denoiser: ``D(x, sigma, c) = a x / (1 + sigma) + c``,
    i.e. x0 = a x_flow + c with ``x_flow = x / (1 + sigma)`` (the VE input at flow time
    ``t = sigma / (1 + sigma)``); ``from_noise(z, c) = a z + c``, its limit at sigma = inf
    (``x = (1 + sigma) z``, flow time t = 1)."""

    def __init__(self, a=0.5):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(float(a)))

    def forward(self, x, sigma, cond=None):
        out = self.a * x / (1 + sigma.reshape(-1, *[1] * (x.ndim - 1)))
        return out if cond is None else out + cond

    def from_noise(self, z, cond=None):
        out = self.a * z
        return out if cond is None else out + cond


INF = float("inf")


def test_one_step_generator_from_pure_noise():
    lf, z, c = LinearFlow(0.5), torch.randn(8, 2), torch.randn(8, 2)
    g = OneStepGenerator(lf, INF)
    assert g.sigma_init == INF and g.noise_scale == 1.0
    out = g(z, c)
    assert torch.equal(out, 0.5 * z + c) and out.requires_grad
    out.sum().backward()
    assert torch.allclose(lf.a.grad, z.sum(), rtol=1e-6)  # d/da sum(a z + c)
    # a given noise_scale is ignored there (stored as 1.0)
    g2 = OneStepGenerator(lf, INF, noise_scale=5.0)
    assert g2.noise_scale == 1.0 and torch.equal(g2(z, c), out)
    # the limit the pure-noise start stands for: a huge sigma with the flow's scale 1 + sigma
    with torch.no_grad():
        near = OneStepGenerator(lf, 1e6, noise_scale=1e6 + 1)(z, c)
    assert torch.allclose(near, out, atol=1e-5)


def test_multistep_generator_from_pure_noise_trains_at_every_step():
    lf, z, c = LinearFlow(0.5), torch.randn(8, 2), torch.randn(8, 2)
    sig = (INF, 2.0, 0.5)
    g = MultiStepGenerator(lf, sig, generator=torch.Generator().manual_seed(3), step=0)
    assert g.sigma_init == INF and g.noise_scale == 1.0 and g.steps == 3
    out = g(z, c)
    assert torch.equal(out, 0.5 * z + c) and out.requires_grad
    out.sum().backward()
    assert torch.allclose(lf.a.grad, z.sum(), rtol=1e-6)
    for k in (1, 2):
        lf.a.grad = None
        g.step, g.generator = k, torch.Generator().manual_seed(3)
        out = g(z, c)
        n = torch.Generator().manual_seed(3)
        with torch.no_grad():  # the closed form of the backward simulation: a z + c, then a x / (1 + s) + c
            x = 0.5 * z + c + 2.0 * torch.randn(8, 2, generator=n)
            if k == 2:
                x = 0.5 * x / 3.0 + c + 0.5 * torch.randn(8, 2, generator=n)
        s = sig[k]
        assert torch.allclose(out, 0.5 * x / (1 + s) + c, atol=1e-6)
        out.sum().backward()  # the gradient goes through the last call only, on the detached x_k
        assert torch.allclose(lf.a.grad, (x / (1 + s)).sum(), rtol=1e-5)
    with pytest.raises(ValueError, match="step 0 has no input"):
        g.simulate(z, c, 0)


def _ddim_closed_form(a, s1, s2):
    """The deterministic sampler's output coefficient (x0 = k z) for LinearFlow(a), sigmas (inf, s1, s2), cond 0:
    x0 = a z, eps = z, x1 = (a + s1) z, x0 = a (a + s1) / (1 + s1) z, eps = (x1 - x0) / s1, x2 = x0 + s2 eps."""
    x1 = a + s1
    b1 = a * x1 / (1 + s1)
    x2 = b1 + s2 * (x1 - b1) / s1
    return a * x2 / (1 + s2)


def test_sample_fewstep_from_pure_noise_fresh_and_deterministic():
    lf, z = LinearFlow(0.5), torch.randn(64, 2, dtype=torch.float64)
    sig = (INF, 2.0, 0.5)
    with torch.no_grad():
        det = sample_fewstep(lf, z, sigmas=sig, noise="deterministic")
        assert torch.allclose(det, _ddim_closed_form(0.5, 2.0, 0.5) * z, rtol=1e-6)
        # the same through the generator, and eps = z is the limit of a huge first sigma with scale 1 + sigma
        g = MultiStepGenerator(lf, sig)
        assert torch.equal(sample_fewstep(g, z, noise="deterministic"), det)
        near = MultiStepGenerator(lf, (1e6, 2.0, 0.5), noise_scale=1e6 + 1)
        assert torch.allclose(sample_fewstep(near, z, noise="deterministic"), det, atol=1e-5)
        c = torch.randn(64, 2, dtype=torch.float64)
        fresh = sample_fewstep(g, z, c, generator=torch.Generator().manual_seed(9))
        n = torch.Generator().manual_seed(9)
        x = 0.5 * z + c + 2.0 * torch.randn(64, 2, generator=n, dtype=torch.float64)
        x = 0.5 * x / 3.0 + c + 0.5 * torch.randn(64, 2, generator=n, dtype=torch.float64)
        assert torch.allclose(fresh, 0.5 * x / 1.5 + c, rtol=1e-12, atol=1e-12)
        assert torch.equal(sample_fewstep(g, z, c, sigmas=[INF]), 0.5 * z + c)


def test_pure_noise_errors_name_the_sigma_and_the_missing_from_noise():
    z = torch.randn(4, 2)
    with pytest.raises(ValueError, match="sigma_init is inf.*cannot start from pure noise"):
        OneStepGenerator(mlp(), INF)
    with pytest.raises(ValueError, match=r"sigmas\[0\] is inf.*cannot start from pure noise"):
        MultiStepGenerator(mlp(), [INF, 1.0])
    with pytest.raises(ValueError, match=r"sigmas\[0\] is inf.*cannot start from pure noise"):
        sample_fewstep(mlp(), z, sigmas=[INF, 1.0])
    with pytest.raises(ValueError, match="only sigmas\\[0\\] may be inf"):
        MultiStepGenerator(LinearFlow(), [INF, INF])
    for bad in ([80.0, INF], [INF, 2.0, INF]):
        with pytest.raises(ValueError, match="finite"):
            MultiStepGenerator(LinearFlow(), bad)
        with pytest.raises(ValueError, match="finite"):
            sample_fewstep(LinearFlow(), z, sigmas=bad)
    from disback_core.fewstep import check_sigmas

    with pytest.raises(ValueError, match="finite"):
        check_sigmas([INF, 1.0])  # strict by default
    assert check_sigmas([INF, 1.0], allow_inf_first=True) == (INF, 1.0)
    with pytest.raises(ValueError, match="finite"):
        OneStepGenerator(LinearFlow(), -INF)
    # a denoiser swapped in later without from_noise is caught at the call
    g = MultiStepGenerator(LinearFlow(), [INF, 1.0], step=0)
    g.denoiser = Recorder(LinearFlow())
    with pytest.raises(ValueError, match="cannot start from pure noise"):
        g(z)
