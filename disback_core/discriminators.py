"""Discriminators for GAN-only distillation (GDD, :mod:`disback_core.adapters.gdd`).

A discriminator is any module called as ``D(x, cond=None) -> logits`` of shape ``[batch]`` or
``[batch, K]`` (K heads or positions; the GAN losses average over every element). Three kinds:

- :class:`MultiScaleDiscriminator`: a small trainable conv net applied to the image and to its
  2x average-pooled copies down to ``min_size``, each scale giving a map of patch logits. GDD's
  reference uses projected-GAN heads on frozen pretrained backbones (EfficientNet, DeiT); those
  cannot be downloaded offline, so this is the default and a pretrained extractor is pluggable.
- :class:`MLPDiscriminator`: for vector data ``[batch, dim]`` (the 2D toy).
- :class:`TeacherFeatureDiscriminator`: a trainable :class:`~disback_core.gan.GANHead` on the
  frozen teacher's own encoder features (read with :func:`~disback_core.gan.capture_features`),
  at a diffusion-GAN noise level.

All of them optionally take integer class labels (projection discriminator, Miyato & Koyama
2018: ``logit += <embed(y), pooled features>``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .denoisers import check_sample, pad_dims
from .gan import GANHead
from .sigmas import SigmaSampler

__all__ = [
    "minibatch_std",
    "MultiScaleDiscriminator",
    "MLPDiscriminator",
    "TeacherFeatureDiscriminator",
    "default_discriminator",
]


def _labels(cond: Any, batch: int, num_classes: int, owner: str) -> Tensor | None:
    """Integer labels ``[batch]`` for the projection term, or None for an unconditional discriminator."""
    if num_classes == 0:
        return None
    if not isinstance(cond, Tensor) or cond.is_floating_point() or cond.shape != (batch,):
        raise ValueError(
            f"{owner} with num_classes={num_classes} needs integer class labels of shape [{batch}] as cond, "
            f"got {type(cond).__name__ if not isinstance(cond, Tensor) else tuple(cond.shape)}"
        )
    return cond.long()


def minibatch_std(h: Tensor, group: int) -> Tensor:
    """StyleGAN's minibatch standard deviation (Karras et al. 2018, Sec. 3): one channel ``[N, 1, H, W]``
    holding, per group of ``gcd(N, group)`` samples, the mean over features of their standard deviation.
    It lets the discriminator see a batch's diversity, which counters mode collapse."""
    n, c, hh, ww = h.shape
    g = math.gcd(n, group)
    y = h.float().reshape(g, n // g, c, hh, ww)
    y = ((y - y.mean(0)).square().mean(0) + 1e-8).sqrt().mean((1, 2, 3))
    return y.reshape(1, n // g, 1, 1, 1).expand(g, n // g, 1, hh, ww).reshape(n, 1, hh, ww).to(h.dtype)


class _Scale(nn.Module):
    """One scale: conv3x3 + LeakyReLU, then conv4x4/2 + LeakyReLU while the side exceeds 4, then (with
    ``mbstd_group``) the minibatch-std channel, conv3x3 + LeakyReLU and a 1x1 conv to one logit per
    position. No normalisation layers (R1 and batch statistics do not mix)."""

    def __init__(self, channels: int, size: int, width: int, mbstd_group: int = 4):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 3, padding=1), nn.LeakyReLU(0.2)]
        ch = width
        while size > 4:
            layers += [nn.Conv2d(ch, 2 * ch, 4, 2, 1), nn.LeakyReLU(0.2)]
            ch, size = 2 * ch, size // 2
        self.body = nn.Sequential(*layers)
        self.mbstd_group = mbstd_group
        self.final = nn.Sequential(nn.Conv2d(ch + (1 if mbstd_group else 0), ch, 3, padding=1), nn.LeakyReLU(0.2))
        self.out = nn.Conv2d(ch, 1, 1)
        self.features = ch

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.body(x)
        if self.mbstd_group:
            h = torch.cat([h, minibatch_std(h, self.mbstd_group)], 1)
        h = self.final(h)
        return self.out(h).flatten(1), h.mean((2, 3))


class MultiScaleDiscriminator(nn.Module):
    """Patch logits at several image scales: ``D(x, cond) -> [batch, K]``.

    Scale ``s`` sees ``avg_pool2d(x, 2**s)`` while its side stays >= ``min_size``; each scale has
    its own conv stack (see :class:`_Scale`), and the logits of all scales are concatenated.
    ``mbstd_group``: group size of the minibatch-std channel (:func:`minibatch_std`; 0 = none).
    """

    def __init__(
        self,
        channels: int,
        size: int,
        *,
        width: int = 32,
        min_size: int = 4,
        num_classes: int = 0,
        mbstd_group: int = 4,
    ):
        super().__init__()
        if size < min_size:
            raise ValueError(f"image side {size} is below min_size {min_size}")
        self.scales = nn.ModuleList()
        s = size
        feats: list[int] = []
        while s >= min_size:
            sc = _Scale(channels, s, width, mbstd_group)
            self.scales.append(sc)
            feats.append(sc.features)
            s //= 2
        self.num_classes = num_classes
        self.embed = nn.ModuleList(nn.Embedding(num_classes, f) for f in feats) if num_classes else None

    def forward(self, x: Tensor, cond: Any = None) -> Tensor:
        check_sample(x, "x")
        y = _labels(cond, x.shape[0], self.num_classes, type(self).__name__)
        out = []
        for i, scale in enumerate(self.scales):
            logits, feats = scale(F.avg_pool2d(x, 2**i) if i else x)
            if y is not None and self.embed is not None:
                logits = logits + (self.embed[i](y) * feats).sum(1, keepdim=True)
            out.append(logits)
        return torch.cat(out, 1)


class MLPDiscriminator(nn.Module):
    """``D(x, cond) -> [batch]`` for vector data: Linear + LeakyReLU(0.2), ``depth`` times, then Linear."""

    def __init__(self, dim: int, *, width: int = 128, depth: int = 3, num_classes: int = 0):
        super().__init__()
        layers: list[nn.Module] = []
        d = dim
        for _ in range(depth):
            layers += [nn.Linear(d, width), nn.LeakyReLU(0.2)]
            d = width
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(d, 1)
        self.num_classes = num_classes
        self.embed = nn.Embedding(num_classes, d) if num_classes else None

    def forward(self, x: Tensor, cond: Any = None) -> Tensor:
        check_sample(x, "x")
        y = _labels(cond, x.shape[0], self.num_classes, type(self).__name__)
        h = self.body(x.flatten(1))
        logits = self.out(h).squeeze(1)
        if y is not None and self.embed is not None:
            logits = logits + (self.embed(y) * h).sum(1)
        return logits


class TeacherFeatureDiscriminator(nn.Module):
    """A trainable head on the frozen teacher's features: ``D(x, cond) = head(F_teacher(x + sigma n, sigma))``.

    ``sigma ~ head.sigma_sampler`` (diffusion-GAN noise; pass e.g. ``KarrasIndexSigma(index_min=900)``
    for low noise). The teacher is held outside this module's parameters and ``state_dict`` (it is
    frozen and stored elsewhere); only the head trains. Gradients flow through the teacher wrt ``x``,
    so the generator loss and R1 work (attention runs on the math SDPA kernel, which has a double
    backward; R1 then costs a second-order pass through the teacher's encoder).
    """

    def __init__(self, teacher: nn.Module, head: GANHead):
        super().__init__()
        self._teacher = [teacher]  # a list: not registered, so neither trained nor saved with the head
        self.head = head

    @property
    def teacher(self) -> nn.Module:
        return self._teacher[0]

    @classmethod
    def build(
        cls,
        teacher: nn.Module,
        feature_module: str,
        example_x: Tensor,
        cond: Any = None,
        *,
        sigma_sampler: SigmaSampler | None = None,
        hidden: int | None = None,
        output_index: int | None = None,
    ) -> TeacherFeatureDiscriminator:
        """Probe the features of ``feature_module`` on ``example_x`` and build a matching head
        (``output_index``: the element of a tuple output, e.g. 1 for SD3/FLUX blocks' image stream)."""
        head = GANHead.build(teacher, feature_module, example_x, cond, sigma_sampler, hidden, output_index=output_index)
        return cls(teacher, head)

    def forward(self, x: Tensor, cond: Any = None) -> Tensor:
        check_sample(x, "x")
        sigma = self.head.sigma_sampler(x.shape[0], device=x.device)
        x_t = x + pad_dims(sigma, x) * torch.randn_like(x)
        # the math attention kernel: R1 differentiates twice, and the fused CPU/flash kernels have no double backward
        with sdpa_kernel([SDPBackend.MATH]):
            feats = self.head.features(self.teacher, x_t, sigma, cond)
        return self.head.head(feats.float()).reshape(x.shape[0])


def default_discriminator(example_x: Tensor, *, num_classes: int = 0, width: int | None = None) -> nn.Module:
    """The default trainable discriminator for samples shaped like ``example_x``: a
    :class:`MultiScaleDiscriminator` for images ``[B, C, H, W]`` (width 32), an
    :class:`MLPDiscriminator` for vectors ``[B, D]`` (width 128)."""
    check_sample(example_x, "example_x")
    if example_x.ndim == 4:
        return MultiScaleDiscriminator(
            example_x.shape[1], min(example_x.shape[2:]), width=width or 32, num_classes=num_classes
        ).to(example_x.device)
    if example_x.ndim == 2:
        return MLPDiscriminator(example_x.shape[1], width=width or 128, num_classes=num_classes).to(example_x.device)
    raise ValueError(
        f"no default discriminator for samples of shape {tuple(example_x.shape)}; pass your own D(x, cond)"
    )
