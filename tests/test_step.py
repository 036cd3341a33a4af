"""The training-step helpers: update counts, which parameters move, and an end-to-end distillation
of a one-step generator on a 2D mixture for each adapter."""
import pytest
import torch

from conftest import ring_means
from disback_core import Batch, GaussianMixtureDenoiser, OneStepGenerator, critic_step, edm_mlp, generator_step, train_step
from disback_core.adapters import DMD2, DiffInstruct, SiD
from disback_core.bench.metrics import sliced_wasserstein


class Counting:
    def __init__(self, method):
        self.m, self.calls = method, {"gen": 0, "fake": 0}
        self.critic_steps = method.critic_steps

    def generator_loss(self, *a, **k):
        self.calls["gen"] += 1
        return self.m.generator_loss(*a, **k)

    def fake_score_loss(self, *a, **k):
        self.calls["fake"] += 1
        return self.m.fake_score_loss(*a, **k)

    def on_generator_step(self):
        self.calls["after"] = self.calls.get("after", 0) + 1


def _roles(width=32):
    gen = OneStepGenerator(edm_mlp(2, sigma_data=1.0, width=width, depth=2), 80.0)
    fake = edm_mlp(2, sigma_data=1.0, width=width, depth=2)
    go = torch.optim.Adam(gen.parameters(), 1e-3, betas=(0.0, 0.999))
    fo = torch.optim.Adam(fake.parameters(), 1e-3, betas=(0.0, 0.999))
    return gen, fake, go, fo


TEACHER = GaussianMixtureDenoiser(ring_means(), 0.1)


def test_train_step_runs_critic_steps_then_one_generator_update():
    gen, fake, go, fo = _roles()
    m = Counting(DMD2(sigma_data=1.0))
    draws = []
    logs = train_step(m, gen, fake, TEACHER, go, fo, lambda: draws.append(1) or Batch(torch.randn(16, 2)))
    assert m.calls == {"gen": 1, "fake": 5, "after": 1} and len(draws) == 6
    assert {"critic/loss", "generator/loss", "generator/dm"} <= set(logs)


def test_generator_step_only_moves_the_generator():
    gen, fake, go, fo = _roles()
    fake_before = [p.detach().clone() for p in fake.parameters()]
    gen_before = [p.detach().clone() for p in gen.parameters()]
    generator_step(SiD(sigma_data=1.0), gen, TEACHER, fake, go, Batch(torch.randn(16, 2)))  # SiD differentiates through fake
    assert all(p.grad is None for p in fake.parameters())
    assert all(torch.equal(a, p) for a, p in zip(fake_before, fake.parameters()))
    assert any(not torch.equal(a, p) for a, p in zip(gen_before, gen.parameters()))
    critic_step(SiD(sigma_data=1.0), gen, fake, fo, Batch(torch.randn(16, 2)))
    assert any(not torch.equal(a, p) for a, p in zip(fake_before, fake.parameters()))


@pytest.mark.parametrize("method_cls", [DiffInstruct, DMD2, SiD])
def test_each_adapter_moves_a_one_step_generator_toward_the_data(method_cls):
    gen, fake, go, fo = _roles(width=64)
    m = method_cls(sigma_data=1.0)
    batch = lambda: Batch(torch.randn(256, 2))  # noqa: E731
    for _ in range(200):  # fit the fake score to the initial generator first
        critic_step(m, gen, fake, fo, batch())
    data, _ = TEACHER.sample(4000)
    z = torch.randn(4000, 2)
    with torch.no_grad():
        before = sliced_wasserstein(gen(z), data)
    for _ in range(300):
        train_step(m, gen, fake, TEACHER, go, fo, batch)
    with torch.no_grad():
        after = sliced_wasserstein(gen(z), data)
    assert before > 0.8  # the one-step output of an untrained network is far from the ring
    assert after < 0.4 * before, (before, after)
