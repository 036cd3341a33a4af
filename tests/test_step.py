"""The training-step helpers: update counts, which parameters move, and an end-to-end distillation
of a one-step generator on a 2D mixture for each adapter."""
import copy

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


def test_reuse_samples_runs_dmd2s_order_with_one_generator_forward_fewer():
    """reuse_samples: generator update first, then the critic updates, the first on the generator
    update's own samples (as computed before its optimizer step), as DMD2's train_one_step does."""
    torch.manual_seed(0)
    teacher = edm_mlp(2, width=16, depth=1).requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    batches = []

    def next_batch():
        batches.append(Batch(torch.randn(8, 2, generator=g)))
        return batches[-1]

    for reuse in (False, True):
        torch.manual_seed(1)
        gen = OneStepGenerator(copy.deepcopy(teacher).requires_grad_(True), 80.0)
        fake = copy.deepcopy(teacher).requires_grad_(True)
        with torch.no_grad():  # a fake score unlike the teacher, so the generator moves
            for p in fake.parameters():
                p.add_(0.3 * torch.randn_like(p))
        method = DMD2(sigma_data=0.5, critic_steps=3)
        calls, critic_x, order = [0], [], []
        gen.register_forward_hook(lambda m, a, o: calls.__setitem__(0, calls[0] + 1))
        orig_fake_loss, orig_gen_loss = method.fake_score_loss, method.generator_loss
        method.fake_score_loss = lambda x, *a, **k: (critic_x.append(x.clone()), order.append("c"),
                                                     orig_fake_loss(x, *a, **k))[2]
        method.generator_loss = lambda x, *a, **k: (order.append("g"), orig_gen_loss(x, *a, **k))[1]
        batches.clear()
        before = copy.deepcopy(gen)
        train_step(method, gen, fake, teacher, torch.optim.SGD(gen.parameters(), 1e-2),
                   torch.optim.SGD(fake.parameters(), 1e-2), next_batch, reuse_samples=reuse)
        if not reuse:
            assert order == ["c", "c", "c", "g"] and calls[0] == 4 and len(batches) == 4
        else:
            assert order == ["g", "c", "c", "c"] and calls[0] == 3 and len(batches) == 3
            with torch.no_grad():  # the first critic update saw the generator's pre-update samples
                assert torch.equal(critic_x[0], before(batches[0].z))
                assert not torch.equal(critic_x[0], gen(batches[0].z))
