"""GDD / GDD-I (Zheng & Yang 2024, "Diffusion Models Are Innate One-Step Generators"; later D2O / D2O-F).

One-step generation by an *exclusive distributional* loss: a GAN against real data and nothing
else. The teacher is never queried during training; it only provides the generator's weights.

Generator: a copy of the EDM teacher run at ``sigma_init = 80``, ``x = G(z) = D_teacher(80 z, 80)``,
so it starts as the teacher's one-step denoise. Losses (non-saturating GAN, Goodfellow et al.
2014, with R1 of Mescheder et al. 2018 and StyleGAN2's lazy regularisation)::

    L_G = mean softplus(-D(G(z)))
    L_D = mean softplus(D(G(z).detach())) + mean softplus(-D(x_real))
          + [every r1_interval-th D step]  r1_interval * gamma / 2 * mean_i ||grad_x D(x_real_i)||^2

One D step per G step. GDD-I additionally freezes the 3x3 convolutions and the attention output
projections of every UNet block (about 84% of the parameters): see
:func:`disback_core.freezing.apply_freezing` (``rule="gddi"``), which any method can use.

Paper settings: Adam betas (0, 0.99), lr 1e-4 for G and D, batch 256, R1 gamma 1e-4 every 16
iterations, sigma_init 80; discriminator: projected-GAN heads on frozen pretrained backbones.
Reported FID (one step, ~5M training images, vs ~400M for SiD): CIFAR-10 1.54 (GDD-I;
GDD 1.66), AFHQv2 64 1.23, FFHQ 64 0.85, ImageNet 64 1.16.

Departure from the reference: its discriminator uses frozen pretrained backbones, which a library
cannot download offline. The default here (:class:`~disback_core.discriminators.MultiScaleDiscriminator`)
is small and trained from scratch, with StyleGAN's minibatch-std channel: without it GDD collapsed
to one or two digit classes on the 8x8 digits problem (FD 686 -> 892 in 400 iterations, class
coverage 0.2), with it FD fell to 40 in 300 iterations.

Roles with :func:`~disback_core.step.train_step`: the **discriminator takes the fake-score slot**
and ``target`` is ignored (pass None)::

    method = GDD()
    disc = default_discriminator(real_example)
    g_opt = torch.optim.Adam(generator.parameters(), 1e-4, betas=(0.0, 0.99))
    d_opt = torch.optim.Adam(disc.parameters(), 1e-4, betas=(0.0, 0.99))
    logs = train_step(method, generator, disc, None, g_opt, d_opt, next_batch)  # batches carry real

In your own loop call ``method.generator_loss(G(z), None, disc)`` and
``method.fake_score_loss(G(z).detach(), disc, real=x_real)``; one ``fake_score_loss`` call is one
D step for the lazy R1 schedule (save ``method.state_dict()`` with your checkpoint).

DisBack does not apply: it replaces the *target* score with recorded degraded nodes, and GDD has
no target and no DSM (:meth:`GDD.dsm_loss` raises, so Degradation Recording fails clearly, and
:meth:`GDD.generator_loss` rejects a trajectory target).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from disback_core.denoisers import check_sample
from disback_core.discriminators import default_discriminator
from disback_core.losses import check_finite, gan_discriminator_loss, gan_generator_loss, r1_penalty
from disback_core.protocol import LossDict
from disback_core.trajectory import TrajectoryTarget

__all__ = ["GDD"]


class GDD:
    """GDD's GAN-only losses; implements ``ScoreDistiller`` with the discriminator as ``fake``.

    Args:
        gamma: R1 weight for data at EDM's scale (``sigma_data = 0.5``, images in [-1, 1]); R1
            has units of 1/x^2, so the weight used is ``gamma * (sigma_data / 0.5)**2``.
        r1_interval: lazy regularisation: R1 is added on every ``r1_interval``-th D step (the
            16th, 32nd, ... call of :meth:`fake_score_loss`) with weight ``r1_interval * gamma / 2``;
            ``0`` turns R1 off.
        sigma_data: the data's standard deviation (scales ``gamma`` only).
        critic_steps: D steps per G step (GDD: 1).
    """

    needs_real = True  # the runner draws real data for every batch

    def __init__(self, *, gamma: float = 1e-4, r1_interval: int = 16, sigma_data: float = 0.5, critic_steps: int = 1):
        if gamma < 0 or r1_interval < 0:
            raise ValueError(f"gamma and r1_interval must be >= 0, got {gamma} and {r1_interval}")
        self.gamma = float(gamma) * (float(sigma_data) / 0.5) ** 2
        self.r1_interval = int(r1_interval)
        self.critic_steps = critic_steps
        self.d_steps = 0  # fake_score_loss calls so far; drives the lazy R1 schedule

    @staticmethod
    def discriminator_for(example_x: Tensor, example_cond: Any = None, *, width: int | None = None) -> nn.Module:
        """The default discriminator (:func:`~disback_core.discriminators.default_discriminator`) for
        samples like ``example_x``; integer ``example_cond`` labels make it a projection discriminator
        over ``max(label) + 1`` classes (pass every label that can occur, e.g. the evaluation labels)."""
        n = (
            int(example_cond.max()) + 1
            if isinstance(example_cond, Tensor) and not example_cond.is_floating_point()
            else 0
        )
        return default_discriminator(example_x, num_classes=n, width=width)

    def r1_due(self, step: int | None = None) -> bool:
        """Whether D step ``step`` (1-based; default: the next one) carries the lazy R1 term."""
        step = self.d_steps + 1 if step is None else step
        return self.r1_interval > 0 and self.gamma > 0 and step % self.r1_interval == 0

    def generator_loss(self, x: Tensor, target: Any, fake: Any, cond: Any = None) -> LossDict:
        """``mean softplus(-D(x))``; ``target`` is ignored (GDD queries no teacher), ``fake`` is D."""
        check_sample(x, "x")
        if isinstance(target, TrajectoryTarget) or isinstance(getattr(target, "denoiser", None), TrajectoryTarget):
            raise TypeError("GDD has no target score, so DisBack (Backtrack) cannot act on it; use GDD alone")
        logits = fake(x, cond)
        check_finite("GDD generator loss", x=x, logits=logits)
        loss = gan_generator_loss(logits)
        return {"loss": loss, "gan": loss.detach(), "logit_fake": logits.detach().mean()}

    def fake_score_loss(
        self, x: Tensor, fake: Any, cond: Any = None, real: Tensor | None = None, real_cond: Any = None
    ) -> LossDict:
        """D loss on detached ``x`` vs ``real``, plus the lazy R1 on ``real`` when due; one call = one D step."""
        if real is None:
            raise ValueError(
                "GDD's discriminator loss needs real data: pass real= (and real_cond= if conditional); "
                "with train_step, next_batch() must return Batch(z, cond, real=..., real_cond=...)"
            )
        check_sample(real, "real")
        self.d_steps += 1
        r1_now = self.r1_due(self.d_steps)
        real_in = real.detach().requires_grad_(r1_now)
        logits_real = fake(real_in, real_cond)
        logits_fake = fake(x.detach(), cond)
        check_finite("GDD discriminator loss", real_logits=logits_real, fake_logits=logits_fake)
        d = gan_discriminator_loss(logits_real, logits_fake)
        out = {
            "loss": d,
            "gan": d.detach(),
            "logit_real": logits_real.detach().mean(),
            "logit_fake": logits_fake.detach().mean(),
        }
        if r1_now:
            r1 = r1_penalty(logits_real, real_in)
            out["loss"] = d + self.r1_interval * self.gamma / 2 * r1
            out["r1"] = r1.detach()
        return out

    def dsm_loss(self, x: Tensor, fake: Any, cond: Any = None) -> Tensor:
        raise NotImplementedError(
            "GDD trains no score model: it has no DSM loss, so DisBack's Degradation "
            "Recording (and Backtrack) do not apply to it"
        )

    def critic_parameters(self) -> list[nn.Parameter]:
        return []  # the discriminator is the fake-score role: its optimizer holds its parameters

    def on_generator_step(self) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        """The lazy-R1 counter, for an exact resume."""
        return {"d_steps": self.d_steps}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.d_steps = int(d["d_steps"])
