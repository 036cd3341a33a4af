"""A GAN realism head on a denoiser's intermediate features (DMD2's classifier branch).

DMD2 (Yin et al. 2024, Sec. 4.3) attaches a small classifier to the fake score's bottleneck and
feeds it diffusion-GAN-noised real and generated samples. Here the bottleneck is read with a
forward hook on a named submodule, so any denoiser works without changing its code.

Features may be images ``[B, C, H, W]`` (a UNet's mid block), vectors ``[B, C]`` or token
sequences ``[B, N, C]`` (a transformer block of SD3, FLUX, SANA, Wan; video models too, as their
blocks hold flattened tokens). A block that returns a tuple needs ``output_index``: diffusers'
SD3 ``JointTransformerBlock`` and FLUX ``FluxTransformerBlock`` / ``FluxSingleTransformerBlock``
return ``(encoder_hidden_states, hidden_states)``, so the image stream is ``output_index=1``.
:func:`default_feature_module` picks the bottleneck/middle block per architecture.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .denoisers import check_sample, pad_dims
from .sigmas import KarrasIndexSigma, SigmaSampler

__all__ = ["GANHead", "capture_features", "default_feature_module"]


class _Captured(Exception):
    """Raised by the hook to skip the rest of the forward once the features are read."""


def _describe(v: Any) -> str:
    return f"tensor {tuple(v.shape)}" if isinstance(v, Tensor) else type(v).__name__


def _select(out: Any, module_name: str, output_index: int | None) -> Tensor:
    """The feature tensor of a submodule's output: the tensor itself, or element ``output_index`` of a tuple."""
    if isinstance(out, Tensor):
        if output_index is not None:
            raise ValueError(
                f"feature_module {module_name!r} returns one tensor of shape {tuple(out.shape)}, not a tuple; "
                f"drop output_index={output_index}"
            )
        return out
    if isinstance(out, (tuple, list)):
        elements = ", ".join(f"[{i}] {_describe(v)}" for i, v in enumerate(out))
        if output_index is None:
            raise ValueError(
                f"feature_module {module_name!r} returns a {type(out).__name__} of {len(out)} ({elements}); "
                "choose the image-token stream with output_index= (diffusers' SD3/FLUX joint blocks return "
                "(encoder_hidden_states, hidden_states): output_index=1)"
            )
        if not -len(out) <= output_index < len(out) or not isinstance(out[output_index], Tensor):
            raise ValueError(
                f"output_index={output_index} of feature_module {module_name!r} is not a tensor; its output: {elements}"
            )
        return out[output_index]
    raise ValueError(f"feature_module {module_name!r} returns a {type(out).__name__}, not a tensor or a tuple")


def capture_features(
    denoiser: nn.Module,
    module_name: str,
    x: Tensor,
    sigma: Tensor,
    cond: Any = None,
    stop_early: bool = True,
    output_index: int | None = None,
) -> Tensor:
    """Run ``denoiser(x, sigma, cond)`` and return the output of its submodule ``module_name``.

    A submodule returning a tuple needs ``output_index`` (the element to read; without it a
    ``ValueError`` lists the elements' shapes), one returning a tensor must not get one. With
    ``stop_early`` the forward stops right after that submodule (the decoder half of a UNet, the
    later transformer blocks are not run). The graph wrt ``x`` and the parameters up to the
    features is kept.
    """
    try:
        sub = denoiser.get_submodule(module_name)
    except AttributeError as e:
        raise ValueError(f"feature_module {module_name!r} is not a submodule of {type(denoiser).__name__}") from e
    store: dict[str, Tensor] = {}

    def hook(_m, _inp, out):
        store["f"] = _select(out, module_name, output_index)
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


def _class(name: str) -> Any:
    """The diffusers class ``name``, or ``None`` without diffusers or in an older one (typed Any:
    diffusers shows type checkers torch-less dummy classes)."""
    try:
        import diffusers

        return getattr(diffusers, name)
    except (ImportError, AttributeError, RuntimeError):  # pragma: no cover
        return None


def _middle(model: nn.Module) -> tuple[str, int | None] | None:
    """``(block name, output_index)`` of the default feature inside ``model`` if it is a known network."""
    for cls, blocks in (("SanaTransformer2DModel", "transformer_blocks"), ("WanTransformer3DModel", "blocks")):
        c = _class(cls)
        if c is not None and isinstance(model, c):
            return f"{blocks}.{len(getattr(model, blocks)) // 2}", None
    c = _class("SD3Transformer2DModel")
    if c is not None and isinstance(model, c):
        return f"transformer_blocks.{len(model.transformer_blocks) // 2}", 1
    c = _class("FluxTransformer2DModel")
    if c is not None and isinstance(model, c):
        n_dual, n_single = len(model.transformer_blocks), len(model.single_transformer_blocks)
        i = (n_dual + n_single) // 2
        return (f"transformer_blocks.{i}" if i < n_dual else f"single_transformer_blocks.{i - n_dual}"), 1
    for cls in ("UNet2DModel", "UNet2DConditionModel"):
        c = _class(cls)
        if c is not None and isinstance(model, c) and getattr(model, "mid_block", None) is not None:
            return "mid_block", None
    return None


def default_feature_module(model: nn.Module) -> tuple[str, int | None]:
    """``(feature_module, output_index)`` of the default GAN feature for ``model`` (or the first
    network it contains, in module order; names are relative to ``model``):

    - diffusers ``UNet2DModel`` / ``UNet2DConditionModel``: ``mid_block``, the bottleneck DMD2's
      classifier reads;
    - ``SD3Transformer2DModel``: ``transformer_blocks.{n // 2}``, image stream ``1``;
    - ``FluxTransformer2DModel``: the middle of its dual-stream then single-stream blocks
      (``i = (n_dual + n_single) // 2``; for FLUX.1's 19 + 38 that is ``single_transformer_blocks.9``),
      image stream ``1`` (both block kinds return ``(encoder_hidden_states, hidden_states)``);
    - ``SanaTransformer2DModel``: ``transformer_blocks.{n // 2}``; ``WanTransformer3DModel``:
      ``blocks.{n // 2}`` (tensors of image/video tokens ``[B, N, C]``, no index).

    Raises ``ValueError`` for any other architecture (pass ``feature_module`` yourself).
    """
    for name, m in model.named_modules():
        found = _middle(m)
        if found is not None:
            return (f"{name}.{found[0]}" if name else found[0]), found[1]
    raise ValueError(
        f"no default GAN feature module for {type(model).__name__} (known: diffusers UNet2DModel / "
        "UNet2DConditionModel with a mid block, SD3, FLUX, SANA, Wan transformers); pass feature_module="
    )


class GANHead(nn.Module):
    """Realism logits from a denoiser's features at a diffusion-GAN noise level.

    ``logits(D, x, cond)``: ``sigma ~ sigma_sampler``, ``x_t = x + sigma n``, features of ``D`` at
    ``feature_module`` (element ``output_index`` of a tuple output) on ``(x_t, sigma, cond)``, then
    ``head(features) -> [batch]``. DMD2 samples sigma uniformly over the 1000-level Karras grid
    (the default here).
    """

    def __init__(
        self,
        feature_module: str,
        head: nn.Module,
        sigma_sampler: SigmaSampler | None = None,
        output_index: int | None = None,
    ):
        super().__init__()
        self.feature_module = feature_module
        self.output_index = output_index
        self.head = head
        self.sigma_sampler = sigma_sampler or KarrasIndexSigma()

    def features(self, denoiser: nn.Module, x_t: Tensor, sigma: Tensor, cond: Any = None) -> Tensor:
        """The features this head reads: :func:`capture_features` at its module and output index."""
        return capture_features(denoiser, self.feature_module, x_t, sigma, cond, output_index=self.output_index)

    def logits(self, denoiser: nn.Module, x: Tensor, cond: Any = None) -> Tensor:
        check_sample(x, "x")
        sigma = self.sigma_sampler(x.shape[0], device=x.device)
        x_t = x + pad_dims(sigma, x) * torch.randn_like(x)
        feats = self.features(denoiser, x_t, sigma, cond)
        return self.head(feats.float()).reshape(x.shape[0])

    @classmethod
    def build(
        cls,
        denoiser: nn.Module,
        feature_module: str | None,
        example_x: Tensor,
        cond: Any = None,
        sigma_sampler: SigmaSampler | None = None,
        hidden: int | None = None,
        *,
        output_index: int | None = None,
    ) -> GANHead:
        """Probe the feature shape on ``example_x`` and build a matching head.

        ``feature_module=None`` takes :func:`default_feature_module` (module and output index;
        an explicit ``output_index`` overrides the latter). Image features ``[B, C, H, W]``: conv
        4x4/2 + GroupNorm + SiLU while H > 2, then a 1x1 conv to one channel and a spatial mean
        (DMD2's branch, scaled down). Token features ``[B, N, C]``: per token Linear(C, h) +
        LayerNorm + SiLU + Linear(h, 1), then the mean over tokens (the same per-position logit
        and average, on tokens). Vector features ``[B, C]``: Linear + SiLU + Linear. ``hidden``
        defaults to C.
        """
        if feature_module is None:
            feature_module, default_index = default_feature_module(denoiser)
            output_index = default_index if output_index is None else output_index
        with torch.no_grad():
            sigma = torch.ones(example_x.shape[0], device=example_x.device)
            f = capture_features(denoiser, feature_module, example_x, sigma, cond, output_index=output_index)
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
        elif f.ndim == 3:
            h = hidden or f.shape[-1]
            head = nn.Sequential(nn.Linear(f.shape[-1], h), nn.LayerNorm(h), nn.SiLU(), nn.Linear(h, 1), _Mean(1))
        elif f.ndim == 2:
            h = hidden or f.shape[1]
            head = nn.Sequential(nn.Linear(f.shape[1], h), nn.SiLU(), nn.Linear(h, 1))
        else:
            raise ValueError(
                f"features of {feature_module!r} have shape {tuple(f.shape)}; expected [B,C,H,W], tokens [B,N,C] or [B,C]"
            )
        return cls(feature_module, head.to(example_x.device), sigma_sampler, output_index)


class _Mean(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(self.dim)
