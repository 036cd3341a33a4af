"""The contract every score-distillation method implements, and the roles it names.

Roles (all denoisers ``D(x_t, sigma, cond) -> x0``, see :mod:`disback_core.denoisers`):

- the **generator** ``G(z, cond) -> x``: trainable, one step;
- the **target**: frozen; the teacher in the base methods, a trajectory node under DisBack. It
  is always an *argument*: no method keeps a hidden teacher, so DisBack can swap it;
- the **fake** score: trainable online critic fitted to the generator's samples by DSM.

A method returns a dict of tensors from each loss: ``"loss"`` is what to back-propagate, the
other entries are detached parts for logging.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

from .denoisers import check_denoiser
from .losses import DSMLoss

__all__ = ["ScoreDistiller", "LossDict", "DSMFakeScore", "check_roles"]

LossDict = dict[str, Tensor]


@runtime_checkable
class ScoreDistiller(Protocol):
    """One score-distillation method (Diff-Instruct, DMD2, SiD, ... and DisBack around them).

    Attributes:
        critic_steps: fake-score (critic) updates per generator update (DMD2: 5, DI and SiD: 1).
    """

    critic_steps: int

    def generator_loss(self, x: Tensor, target: Any, fake: Any, cond: Any = None) -> LossDict:
        """Loss for the generator given its samples ``x = G(z, cond)`` (with grad)."""
        ...

    def fake_score_loss(
        self, x: Tensor, fake: Any, cond: Any = None, real: Tensor | None = None, real_cond: Any = None
    ) -> LossDict:
        """The critic's loss on generator samples ``x`` (detached inside): DSM, plus any GAN term."""
        ...

    def dsm_loss(self, x: Tensor, fake: Any, cond: Any = None) -> Tensor:
        """The method's own denoising-score-matching loss alone; Degradation Recording uses it."""
        ...

    def critic_parameters(self) -> Iterable[nn.Parameter]:
        """Trainable parameters the method owns besides the fake score (a GAN head), or none."""
        ...

    def on_generator_step(self) -> Any:
        """Called once after each generator update (``generator_step`` does it); DisBack moves its
        target here. A no-op for the base methods."""
        ...


def check_roles(target: Any, fake: Any) -> None:
    """A generator loss's ``target`` and ``fake`` must be denoisers ``D(x_t, sigma, cond)``."""
    check_denoiser(target, "target")
    check_denoiser(fake, "fake")


class DSMFakeScore:
    """Shared critic side of methods whose fake score is trained by plain DSM.

    ``fake_score_loss = fake_loss_scale * mean_batch(DSM per sample)``; no real data is used.
    Subclasses set ``self.dsm`` (a :class:`~disback_core.losses.DSMLoss`) and ``self.fake_loss_scale``.
    """

    dsm: DSMLoss
    fake_loss_scale: float = 1.0

    def dsm_loss(self, x: Tensor, fake: Any, cond: Any = None) -> Tensor:
        return self.fake_loss_scale * self.dsm(fake, x.detach(), cond).mean()

    def fake_score_loss(
        self, x: Tensor, fake: Any, cond: Any = None, real: Tensor | None = None, real_cond: Any = None
    ) -> LossDict:
        loss = self.dsm_loss(x, fake, cond)
        return {"loss": loss, "dsm": loss.detach()}

    def critic_parameters(self) -> list[nn.Parameter]:
        return []

    def on_generator_step(self) -> None:
        return None
