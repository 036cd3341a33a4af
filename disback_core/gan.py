"""A GAN realism head on a denoiser's intermediate features (DMD2's classifier branch).

DMD2 (Yin et al. 2024, Sec. 4.3) attaches a small classifier to the fake score's bottleneck and
feeds it diffusion-GAN-noised real and generated samples. Here the bottleneck is read with a
forward hook on a named submodule, so any denoiser works without changing its code.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .denoisers import check_sample, pad_dims
from .sigmas import KarrasIndexSigma, SigmaSampler

__all__ = ["GANHead", "capture_features"]


class _Captured(Exception):
    """Raised by the hook to skip the rest of the forward once the features are read."""


def capture_features(
    denoiser: nn.Module, module_name: str, x: Tensor, sigma: Tensor, cond: Any = None, stop_early: bool = True
) -> Tensor:
    """Run ``denoiser(x, sigma, cond)`` and return the output of its submodule ``module_name``.

    With ``stop_early`` the forward stops right after that submodule (the decoder half of a UNet
    is not run). The graph wrt ``x`` and the parameters up to the features is kept.
    """
    try:
        sub = denoiser.get_submodule(module_name)
    except AttributeError as e:
        raise ValueError(f"feature_module {module_name!r} is not a submodule of {type(denoiser).__name__}") from e
    store: dict[str, Tensor] = {}

    def hook(_m, _inp, out):
        store["f"] = out[0] if isinstance(out, (tuple, list)) else out
        if stop_early:
            raise _Captured

    handle = sub.register_forward_hook(hook)
    try:
        denoiser(x, sigma, cond)
    except _Captured:
        pass
    finally:
        handle.remove()
    if "f" not in store:
        raise RuntimeError(f"feature_module {module_name!r} was not called during the forward pass")
    return store["f"]


class GANHead(nn.Module):
    """Realism logits from a denoiser's features at a diffusion-GAN noise level.

    ``logits(D, x, cond)``: ``sigma ~ sigma_sampler``, ``x_t = x + sigma n``, features of ``D`` at
    ``feature_module`` on ``(x_t, sigma, cond)``, then ``head(features) -> [batch]``. DMD2 samples
    sigma uniformly over the 1000-level Karras grid (the default here).
    """

    def __init__(self, feature_module: str, head: nn.Module, sigma_sampler: SigmaSampler | None = None):
        super().__init__()
        self.feature_module = feature_module
        self.head = head
        self.sigma_sampler = sigma_sampler or KarrasIndexSigma()

    def logits(self, denoiser: nn.Module, x: Tensor, cond: Any = None) -> Tensor:
        check_sample(x, "x")
        sigma = self.sigma_sampler(x.shape[0], device=x.device)
        x_t = x + pad_dims(sigma, x) * torch.randn_like(x)
        feats = capture_features(denoiser, self.feature_module, x_t, sigma, cond)
        return self.head(feats.float()).reshape(x.shape[0])

    @classmethod
    def build(
        cls,
        denoiser: nn.Module,
        feature_module: str,
        example_x: Tensor,
        cond: Any = None,
        sigma_sampler: SigmaSampler | None = None,
        hidden: int | None = None,
    ) -> GANHead:
        """Probe the feature shape on ``example_x`` and build a matching head.

        Image features ``[B, C, H, W]``: conv 4x4/2 + GroupNorm + SiLU while H > 2, then a 1x1 conv
        to one channel and a spatial mean (DMD2's branch, scaled down). Vector features ``[B, C]``:
        Linear + SiLU + Linear.
        """
        with torch.no_grad():
            sigma = torch.ones(example_x.shape[0], device=example_x.device)
            f = capture_features(denoiser, feature_module, example_x, sigma, cond)
        if f.ndim == 4:
            c = f.shape[1]
            h = hidden or c
            layers: list[nn.Module] = []
            size, ch = f.shape[-1], c
            while size > 2:
                layers += [
                    nn.Conv2d(ch, h, 4, 2, 1),
                    nn.GroupNorm(min(32, h) if h % min(32, h) == 0 else 1, h),
                    nn.SiLU(),
                ]
                ch, size = h, size // 2
            layers += [nn.Conv2d(ch, 1, 1), nn.Flatten(2), _Mean(-1)]
            head = nn.Sequential(*layers)
        elif f.ndim == 2:
            h = hidden or f.shape[1]
            head = nn.Sequential(nn.Linear(f.shape[1], h), nn.SiLU(), nn.Linear(h, 1))
        else:
            raise ValueError(f"features of {feature_module!r} have shape {tuple(f.shape)}; expected [B,C,H,W] or [B,C]")
        return cls(feature_module, head.to(example_x.device), sigma_sampler)


class _Mean(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(self.dim)
