"""Tiny random diffusers flow-matching transformers (no hub access), for tests.

Each ``tiny_*()`` returns ``(model, make_kwargs)``: the model in eval mode, built from a config in
the style of diffusers' own model tests, and ``make_kwargs(batch, seed=0)``, the keyword arguments
of one forward call (``hidden_states``, ``timestep`` and the conditioning), drawn from ``seed``.
``model(**make_kwargs(2)).sample`` has the shape of ``hidden_states``. The image/video sample shape
of each model is ``SAMPLE_SHAPES[name]``. Construction and a forward take milliseconds on one core.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

KwargsFn = Callable[..., dict[str, Any]]

SAMPLE_SHAPES = {
    "sd3": (4, 8, 8),  # latents [C, H, W]; patch 2: 16 image tokens
    "flux": (16, 16),  # FLUX takes packed latents [N, C]: 16 tokens of 16 channels (4-ch latents, 2x2 packed)
    "sana": (4, 8, 8),  # patch 1: 64 image tokens
    "wan": (4, 2, 8, 8),  # video latents [C, F, H, W]; patch (1, 2, 2): 32 tokens
}


def _randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g)


def tiny_sd3(num_layers: int = 2) -> tuple[nn.Module, KwargsFn]:
    """``SD3Transformer2DModel`` with inner dim 16 (2 heads of 8), text tokens of width 16."""
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=num_layers, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8,
        out_channels=4, pos_embed_max_size=16,
    ).eval()

    def make_kwargs(batch: int, seed: int = 0) -> dict[str, Any]:
        g = torch.Generator().manual_seed(seed)
        return {
            "hidden_states": _randn(g, batch, *SAMPLE_SHAPES["sd3"]),
            "encoder_hidden_states": _randn(g, batch, 5, 16),
            "pooled_projections": _randn(g, batch, 8),
            "timestep": torch.rand(batch, generator=g) * 1000,
        }

    return model, make_kwargs


def tiny_flux(guidance: bool = False) -> tuple[nn.Module, KwargsFn]:
    """``FluxTransformer2DModel`` with one dual-stream and one single-stream block, inner dim 16."""
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8, axes_dims_rope=(2, 2, 4),
        guidance_embeds=guidance,
    ).eval()
    n_img, n_txt = SAMPLE_SHAPES["flux"][0], 5
    img_ids = torch.zeros(n_img, 3)
    img_ids[:, 1] = torch.arange(n_img) // 4  # a 4x4 grid of packed latent patches
    img_ids[:, 2] = torch.arange(n_img) % 4

    def make_kwargs(batch: int, seed: int = 0) -> dict[str, Any]:
        g = torch.Generator().manual_seed(seed)
        kw = {
            "hidden_states": _randn(g, batch, *SAMPLE_SHAPES["flux"]),
            "encoder_hidden_states": _randn(g, batch, n_txt, 16),
            "pooled_projections": _randn(g, batch, 8),
            "timestep": torch.rand(batch, generator=g),  # FLUX takes t in [0, 1] (it multiplies by 1000)
            "img_ids": img_ids.clone(),
            "txt_ids": torch.zeros(n_txt, 3),
        }
        if guidance:
            kw["guidance"] = torch.full((batch,), 3.5)
        return kw

    return model, make_kwargs


def tiny_sana(num_layers: int = 2) -> tuple[nn.Module, KwargsFn]:
    """``SanaTransformer2DModel`` (linear self-attention, cross-attention, GLUMBConv feed-forward), inner dim 8."""
    from diffusers import SanaTransformer2DModel

    model = SanaTransformer2DModel(
        patch_size=1, in_channels=4, out_channels=4, num_layers=num_layers, attention_head_dim=4,
        num_attention_heads=2, num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8,
        caption_channels=8, sample_size=8,
    ).eval()

    def make_kwargs(batch: int, seed: int = 0) -> dict[str, Any]:
        g = torch.Generator().manual_seed(seed)
        return {
            "hidden_states": _randn(g, batch, *SAMPLE_SHAPES["sana"]),
            "encoder_hidden_states": _randn(g, batch, 5, 8),
            "timestep": torch.rand(batch, generator=g) * 1000,
        }

    return model, make_kwargs


def tiny_wan(num_layers: int = 2, image_dim: int | None = None) -> tuple[nn.Module, KwargsFn]:
    """``WanTransformer3DModel`` (text-to-video; ``image_dim`` adds the I2V image cross-attention), inner dim 24."""
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=256, ffn_dim=32, num_layers=num_layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32, image_dim=image_dim,
        added_kv_proj_dim=24 if image_dim else None,
    ).eval()

    def make_kwargs(batch: int, seed: int = 0) -> dict[str, Any]:
        g = torch.Generator().manual_seed(seed)
        kw = {
            "hidden_states": _randn(g, batch, *SAMPLE_SHAPES["wan"]),
            "encoder_hidden_states": _randn(g, batch, 6, 16),
            "timestep": torch.rand(batch, generator=g) * 1000,
        }
        if image_dim:
            kw["encoder_hidden_states_image"] = _randn(g, batch, 3, image_dim)
        return kw

    return model, make_kwargs


TINY = {"sd3": tiny_sd3, "flux": tiny_flux, "sana": tiny_sana, "wan": tiny_wan}
