"""Small reference networks for tests, examples and the built-in problems.

Raw networks ``F(x_in, c_noise, cond)`` meant to sit inside :class:`~disback_core.denoisers.EDMPrecond`:

- :class:`MLPNet`: residual MLP for low-dimensional data (the 2D toy);
- :class:`UNetNet`: a diffusers ``UNet2DModel`` / ``UNet2DConditionModel`` called with EDM's
  ``c_noise`` as its (scaled, continuous) timestep.

Users bring their own networks; these exist so the project never downloads weights.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .checks import check_number
from .denoisers import EDMPrecond, _unet_cond_kwarg

__all__ = ["MLPNet", "UNetNet", "edm_mlp", "edm_unet", "edm_unet_text", "sinusoidal_embedding"]


def sinusoidal_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Transformer-style sin/cos embedding of a ``[batch]`` tensor, shape ``[batch, dim]``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=1)


class _ResBlock(nn.Module):
    def __init__(self, width: int, emb: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width)
        self.emb = nn.Linear(emb, width)
        self.fc2 = nn.Linear(width, width)
        self.act = nn.SiLU()

    def forward(self, h: Tensor, e: Tensor) -> Tensor:
        y = self.fc1(self.act(self.norm(h))) + self.emb(e)
        return h + self.fc2(self.act(y))


class MLPNet(nn.Module):
    """Residual MLP ``F(x, c_noise, cond)`` with a sinusoidal noise embedding.

    ``num_classes > 0`` adds a class embedding; class index ``num_classes`` is the null
    (unconditional) label for classifier-free guidance. Blocks are ``blocks.0`` ... ``blocks.{depth-1}``
    (a GAN head can read one of them).
    """

    def __init__(
        self,
        dim: int = 2,
        width: int = 128,
        depth: int = 3,
        emb_dim: int = 64,
        num_classes: int = 0,
        noise_scale: float = 250.0,
    ):
        super().__init__()
        for name, v, low in (
            ("dim", dim, 1),
            ("width", width, 1),
            ("depth", depth, 0),
            ("emb_dim", emb_dim, 2),
            ("num_classes", num_classes, 0),
        ):
            check_number(name, v, low=low, integer=True)
        self.dim, self.emb_dim, self.num_classes, self.noise_scale = dim, emb_dim, num_classes, noise_scale
        self.inp = nn.Linear(dim, width)
        self.emb = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes > 0 else None
        self.blocks = nn.ModuleList(_ResBlock(width, emb_dim) for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(width), nn.SiLU(), nn.Linear(width, dim))

    def forward(self, x: Tensor, c_noise: Tensor, cond: Any = None) -> Tensor:
        e = sinusoidal_embedding(c_noise * self.noise_scale, self.emb_dim)
        if self.class_emb is not None:
            labels = (
                torch.full((x.shape[0],), self.num_classes, device=x.device, dtype=torch.long) if cond is None else cond
            )
            e = e + self.class_emb(labels.long())
        elif cond is not None:
            raise ValueError("cond given to an unconditional MLPNet (num_classes=0)")
        e = self.emb(e)
        h = self.inp(x)
        for blk in self.blocks:
            h = blk(h, e)
        return self.out(h)


class UNetNet(nn.Module):
    """A diffusers UNet as a raw EDM network: ``unet(x_in, noise_scale * c_noise, cond).sample``.

    A tensor ``cond`` goes to ``class_labels`` for ``UNet2DModel`` and to ``encoder_hidden_states``
    for ``UNet2DConditionModel``; a dict is passed as keyword arguments.
    """

    def __init__(self, unet: nn.Module, noise_scale: float = 250.0, cond_kwarg: str | None = None):
        super().__init__()
        self.unet = unet
        self.noise_scale = noise_scale
        self.cond_kwarg = cond_kwarg or _unet_cond_kwarg(unet)

    def forward(self, x: Tensor, c_noise: Tensor, cond: Any = None) -> Tensor:
        kwargs: dict[str, Any] = {}
        if isinstance(cond, Mapping):
            kwargs.update(cond)
        elif cond is not None:
            kwargs[self.cond_kwarg] = cond
        return self.unet(x, c_noise * self.noise_scale, return_dict=False, **kwargs)[0]


def edm_mlp(dim: int = 2, sigma_data: float = 0.5, **kwargs: Any) -> EDMPrecond:
    """An EDM-preconditioned :class:`MLPNet` denoiser."""
    return EDMPrecond(MLPNet(dim=dim, **kwargs), sigma_data=sigma_data)


def _block_types(n: int, attn: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """diffusers block types for ``n`` levels: plain blocks, the deepest down block and the first up
    block of kind ``attn`` ("Attn", "CrossAttn", or "" for none)."""
    down = ["DownBlock2D"] * n
    up = ["UpBlock2D"] * n
    down[-1], up[0] = f"{attn}DownBlock2D", f"{attn}UpBlock2D"
    return tuple(down), tuple(up)


def edm_unet(
    sample_size: int = 8,
    channels: int = 1,
    num_classes: int = 0,
    sigma_data: float = 0.5,
    block_out_channels: tuple[int, ...] = (32, 64, 64),
    layers_per_block: int = 1,
    attention: bool = True,
    norm_num_groups: int = 8,
    **unet_kwargs: Any,
) -> EDMPrecond:
    """An EDM-preconditioned diffusers ``UNet2DModel`` built from a small config (random weights).

    ``num_classes > 0`` adds a class embedding with ``num_classes + 1`` entries (the last is the
    null label for classifier-free guidance). The last down block carries attention if ``attention``.
    """
    from diffusers import UNet2DModel

    down, up = _block_types(len(block_out_channels), "Attn" if attention else "")
    unet = UNet2DModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        down_block_types=down,
        up_block_types=up,
        norm_num_groups=norm_num_groups,
        num_class_embeds=(num_classes + 1) if num_classes > 0 else None,
        **unet_kwargs,
    )
    # diffusers' __init__ shows type checkers its torch-less dummy UNet2DModel (not an nn.Module)
    return EDMPrecond(UNetNet(unet), sigma_data=sigma_data)  # type: ignore[arg-type]


def edm_unet_text(
    sample_size: int = 8,
    channels: int = 1,
    cross_attention_dim: int = 16,
    sigma_data: float = 0.5,
    block_out_channels: tuple[int, ...] = (32, 64, 64),
    layers_per_block: int = 1,
    norm_num_groups: int = 8,
    attention_head_dim: int = 4,
    **unet_kwargs: Any,
) -> EDMPrecond:
    """An EDM-preconditioned diffusers ``UNet2DConditionModel``: text-like conditioning, a cond of
    shape ``[batch, tokens, cross_attention_dim]`` read by cross-attention in the last down block and
    the first up block (a small stand-in for a text-to-image UNet; random weights)."""
    from diffusers import UNet2DConditionModel

    down, up = _block_types(len(block_out_channels), "CrossAttn")
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        down_block_types=down,
        up_block_types=up,
        norm_num_groups=norm_num_groups,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=attention_head_dim,
        **unet_kwargs,
    )
    return EDMPrecond(UNetNet(unet), sigma_data=sigma_data)  # type: ignore[arg-type]
