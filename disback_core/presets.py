"""Diffusers model classes the library knows, their tiny random presets, and conditions that fit them.

:func:`build_model` makes a model from a config dict (its ``_class_name`` names the class) or a local
``save_pretrained`` folder, for the classes in :data:`MODEL_CLASSES`; an unknown class is refused
by name. :data:`TINY_PRESETS` are random-weight configs of each class, a few thousand parameters,
for tests, examples and ``disback train --model tiny-sd3`` (nothing is downloaded).
:func:`example_cond` draws a random condition of the shape a model's config expects.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "MODEL_CLASSES",
    "FLOW_CLASSES",
    "TINY_PRESETS",
    "build_model",
    "example_cond",
    "model_class",
    "sample_shape",
    "spec_class_name",
]

FLOW_CLASSES = ("SD3Transformer2DModel", "FluxTransformer2DModel", "SanaTransformer2DModel", "WanTransformer3DModel")
MODEL_CLASSES = ("UNet2DModel", "UNet2DConditionModel", *FLOW_CLASSES)

_ATTN = dict(attention_head_dim=8, num_attention_heads=2)
TINY_PRESETS: dict[str, dict[str, Any]] = {
    "tiny-class": dict(
        _class_name="UNet2DModel",
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        num_class_embeds=11,
    ),
    "tiny-text": dict(
        _class_name="UNet2DConditionModel",
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    ),
    "tiny-sd3": dict(
        _class_name="SD3Transformer2DModel",
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pooled_projection_dim=8,
        pos_embed_max_size=16,
        **_ATTN,
    ),
    "tiny-flux": dict(
        _class_name="FluxTransformer2DModel",
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        joint_attention_dim=16,
        pooled_projection_dim=8,
        axes_dims_rope=(2, 2, 4),
        guidance_embeds=False,
        **_ATTN,
    ),
    "tiny-sana": dict(
        _class_name="SanaTransformer2DModel",
        sample_size=8,
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        num_cross_attention_heads=2,
        cross_attention_head_dim=8,
        cross_attention_dim=16,
        caption_channels=16,
        **_ATTN,
    ),
    "tiny-wan": dict(
        _class_name="WanTransformer3DModel",
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=256,
        ffn_dim=32,
        num_layers=1,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    ),
}


def model_class(name: str) -> type[nn.Module]:
    """The diffusers class called ``name``, if the library knows it (:data:`MODEL_CLASSES`)."""
    if name not in MODEL_CLASSES:
        raise ValueError(f"model class {name!r} is not supported; the library knows {', '.join(MODEL_CLASSES)}")
    import diffusers

    return getattr(diffusers, name)


def build_model(spec: str | Path | dict[str, Any], *, seed: int | None = 0) -> nn.Module:
    """A diffusers model from a preset name (:data:`TINY_PRESETS`), a config dict with ``_class_name``,
    or a local ``save_pretrained`` folder (its ``config.json`` names the class; weights loaded when
    present, a random model of that config otherwise). Random weights are drawn with ``seed``."""
    if isinstance(spec, dict):
        cfg = dict(spec)
    elif isinstance(spec, str) and spec in TINY_PRESETS:
        cfg = dict(TINY_PRESETS[spec])
    else:
        folder = Path(spec)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(_not_found(spec))
        name = json.loads((folder / "config.json").read_text()).get("_class_name")
        if not isinstance(name, str):
            raise ValueError(f"{folder / 'config.json'}: no _class_name; cannot tell which model class to build")
        cls = model_class(name)
        if any((folder / w).is_file() for w in ("diffusion_pytorch_model.safetensors", "model.safetensors")) or any(
            folder.glob("diffusion_pytorch_model*.safetensors")
        ):
            return cls.from_pretrained(folder, use_safetensors=True)  # type: ignore[attr-defined]
        cfg = cls.load_config(folder)  # type: ignore[attr-defined]
    name = cfg.pop("_class_name", None)
    if not isinstance(name, str):
        raise ValueError(f"a model config needs _class_name (one of {', '.join(MODEL_CLASSES)})")
    cls = model_class(name)
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(**cfg)
    return cls(**cfg)


def _not_found(spec: str | Path) -> str:
    close = difflib.get_close_matches(str(spec), TINY_PRESETS, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{spec}: neither a preset ({', '.join(TINY_PRESETS)}) nor a model folder with config.json{hint}"


def spec_class_name(spec: str | Path | dict[str, Any]) -> str:
    """The class :func:`build_model` would build for ``spec``, checked, without building anything:
    a preset's or a config's ``_class_name``, or the one in a folder's ``config.json``. Raises what
    :func:`build_model` raises for a bad spec (an unknown preset or folder, an unknown class)."""
    if isinstance(spec, dict):
        name = spec.get("_class_name")
    elif isinstance(spec, str) and spec in TINY_PRESETS:
        name = TINY_PRESETS[spec]["_class_name"]
    else:
        path = Path(spec) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(_not_found(spec))
        name = json.loads(path.read_text()).get("_class_name")
        if not isinstance(name, str):
            raise ValueError(f"{path}: no _class_name; cannot tell which model class to build")
    if not isinstance(name, str):
        raise ValueError(f"a model config needs _class_name (one of {', '.join(MODEL_CLASSES)})")
    if name not in MODEL_CLASSES:
        raise ValueError(f"model class {name!r} is not supported; the library knows {', '.join(MODEL_CLASSES)}")
    return name


def example_cond(model: nn.Module, batch: int, *, tokens: int = 5, generator: torch.Generator | None = None) -> Any:
    """A random condition that fits ``model``'s config: text states (and SD3/FLUX pooled projections),
    class labels for a class-conditional ``UNet2DModel``, ``None`` for an unconditional one."""
    cfg: Any = getattr(model, "config", None)
    name = type(model).__name__

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    if name in ("SD3Transformer2DModel", "FluxTransformer2DModel"):
        return {
            "encoder_hidden_states": randn(batch, tokens, cfg.joint_attention_dim),
            "pooled_projections": randn(batch, cfg.pooled_projection_dim),
        }
    if name == "SanaTransformer2DModel":
        return randn(batch, tokens, cfg.caption_channels)
    if name == "WanTransformer3DModel":
        return randn(batch, tokens, cfg.text_dim)
    if name == "UNet2DConditionModel":
        return randn(batch, tokens, cfg.cross_attention_dim)
    if name == "UNet2DModel":
        n = getattr(cfg, "num_class_embeds", None)
        return None if n is None else torch.randint(n, (batch,), generator=generator)
    raise ValueError(f"model class {name!r} is not supported; the library knows {', '.join(MODEL_CLASSES)}")


def sample_shape(model: nn.Module, batch: int, *, frames: int = 3) -> tuple[int, ...]:
    """The shape of a batch of samples (latents) for ``model``'s config: ``[B, C, H, W]``
    (FLUX: 4-d latents with ``C = in_channels / 4``, packed by the wrapper), Wan ``[B, C, F, H, W]``."""
    cfg: Any = getattr(model, "config", None)
    name = type(model).__name__
    size = int(getattr(cfg, "sample_size", 8) or 8)
    if isinstance(getattr(cfg, "sample_size", None), (tuple, list)):
        size = int(cfg.sample_size[0])
    if name == "FluxTransformer2DModel":
        return (batch, cfg.in_channels // 4, size, size)
    if name == "WanTransformer3DModel":
        return (batch, cfg.in_channels, frames, size, size)
    return (batch, cfg.in_channels, size, size)
