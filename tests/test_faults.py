"""Training-time faults: NaN/inf losses and gradients are caught before the optimizer steps."""
import math

import pytest
import torch

from disback_core import Batch, DivergenceMonitor, NonFiniteGuard, critic_step, generator_step, train_step
from disback_core.losses import check_finite


class Poisoned:
    """A tiny ScoreDistiller whose losses turn NaN (or whose gradients turn inf) on request."""

    critic_steps = 1

    def __init__(self):
        self.mode, self.generator_steps = "ok", 0

    def _loss(self, x, net):
        y = net(x).sum()
        if self.mode == "nan-loss":
            y = y * float("nan")
        if self.mode == "raise":
            check_finite("poisoned loss", loss=y * float("inf"))
        if self.mode == "inf-grad":
            t = x if x.requires_grad else next(net.parameters())  # the generator's output, or the critic's weight
            y = y + ((t - t.detach()) ** 2).sum().sqrt()  # a finite loss whose gradient is NaN (sqrt at 0)
        return {"loss": y}

    def generator_loss(self, x, target, fake, cond=None):
        return self._loss(x, fake)

    def fake_score_loss(self, x, fake, cond=None, real=None, real_cond=None):
        return self._loss(x, fake)

    def on_generator_step(self):
        self.generator_steps += 1


def _setup():
    torch.manual_seed(0)
    gen, fake = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    g = lambda z, cond=None: gen(z)  # noqa: E731
    return gen, fake, g, torch.optim.SGD(gen.parameters(), 0.1), torch.optim.SGD(fake.parameters(), 0.1)


@pytest.mark.parametrize("mode", ["nan-loss", "raise", "inf-grad"])
def test_a_non_finite_update_is_skipped_counted_and_leaves_the_weights(mode):
    gen, fake, g, go, fo = _setup()
    method, guard = Poisoned(), NonFiniteGuard("skip", max_consecutive=3)
    before = [p.detach().clone() for p in [*gen.parameters(), *fake.parameters()]]
    method.mode = mode
    assert critic_step(method, g, fake, fo, Batch(torch.randn(4, 2)), guard=guard) == {"critic/skipped": 1.0}
    assert generator_step(method, g, None, fake, go, Batch(torch.randn(4, 2)), guard=guard) == {"generator/skipped": 1.0}
    after = [*gen.parameters(), *fake.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, after))  # nothing was stepped
    assert all(p.grad is None for p in after)  # and the bad gradients are gone
    assert guard.skipped == 2 and method.generator_steps == 0  # a dropped update is not a generator step
    method.mode = "ok"
    logs = train_step(method, g, fake, None, go, fo, lambda: Batch(torch.randn(4, 2)), guard=guard)
    assert "generator/loss" in logs and guard.consecutive == 0 and method.generator_steps == 1
    assert any(not torch.equal(a, b) for a, b in zip(before, after))


def test_repeated_non_finite_updates_stop_the_run_with_a_message():
    gen, fake, g, go, fo = _setup()
    method, guard = Poisoned(), NonFiniteGuard("skip", max_consecutive=3)
    method.mode = "nan-loss"
    with pytest.raises(FloatingPointError, match=r"3 updates in a row were non-finite .*stopping"):
        for _ in range(3):
            train_step(method, g, fake, None, go, fo, lambda: Batch(torch.randn(4, 2)), guard=guard)
    strict = NonFiniteGuard("raise")
    with pytest.raises(FloatingPointError, match="non-finite critic: loss nan .policy 'raise'"):
        critic_step(method, g, fake, fo, Batch(torch.randn(4, 2)), guard=strict)
    with pytest.raises(FloatingPointError, match="poisoned loss"):  # without a guard a loss check raises as before
        method.mode = "raise"
        critic_step(method, g, fake, fo, Batch(torch.randn(4, 2)))
    with pytest.raises(ValueError, match="policy must be one of"):
        NonFiniteGuard("ignore")
    restored = NonFiniteGuard()
    restored.load_state_dict(guard.state_dict())
    assert (restored.skipped, restored.consecutive) == (guard.skipped, guard.consecutive)


def test_divergence_is_reported():
    m = DivergenceMonitor(factor=10, warmup=3)
    values = [1.0, 0.5, 0.4, 0.3, 2.0, 3.5]
    assert [m.update(v) for v in values] == [False] * 5 + [True]  # 3.5 > 10 x 0.3
    assert "3.5" in m.report and "0.3" in m.report
    n = DivergenceMonitor(warmup=1)
    assert [n.update(v) for v in (1.0, math.nan)] == [False, True]
