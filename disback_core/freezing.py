"""Freezing rules for one-step generators, e.g. GDD-I's (Zheng & Yang 2024, "D2O-F").

GDD-I freezes the *3x3 convolutions and the attention output projections of every UNet block*
(about 84% of an EDM DDPM++ UNet's parameters) and trains the rest: GroupNorms, the embedding
affine of each block, attention qkv, 1x1 skip convolutions, the noise/label mapping MLP and the
first and last convolutions. The reference selected layers by fragile name substrings; here the
rule is explicit and keyed on module *classes*, and :func:`gddi_frozen_modules` lists the exact
modules so the choice can be inspected (and tested).

The rule per architecture (anything else raises; pass your own ``rule`` callable):

- diffusers ``UNet2DModel`` / ``UNet2DConditionModel``: in every ``ResnetBlock2D`` its 3x3
  ``conv1`` and ``conv2``; every ``Downsample2D`` / ``Upsample2D`` 3x3 ``conv`` (in EDM-style
  nets resampling happens inside the block's own 3x3 conv, which is frozen, so the diffusers
  resamplers are frozen too); in every ``Attention`` its output projection ``to_out.0``. In
  ``UNet2DConditionModel`` transformer blocks that covers ``attn1`` *and* ``attn2`` (self- and
  cross-attention output projections); the feed-forward ``ff``, ``proj_in`` / ``proj_out`` and
  the LayerNorms stay trainable (they are neither 3x3 convs nor attention output projections,
  like qkv in EDM). ``conv_in``, ``conv_out``, ``time_embedding``, ``time_emb_proj``,
  ``conv_shortcut`` and class embeddings stay trainable.
- diffusers flow-matching transformers ``SD3Transformer2DModel``, ``FluxTransformer2DModel``,
  ``SanaTransformer2DModel``, ``WanTransformer3DModel`` (GDD-I defines no transformer rule; this is
  our analogue). Inside every transformer block (``JointTransformerBlock``,
  ``FluxTransformerBlock``, ``FluxSingleTransformerBlock``, ``SanaTransformerBlock``,
  ``WanTransformerBlock``): every attention module's (diffusers ``Attention`` or an
  ``AttentionModuleMixin`` such as ``FluxAttention`` / ``WanAttention``) output projections
  ``to_out.0`` and, in joint attention, ``to_add_out``; every feed-forward (``FeedForward``: ``ff``,
  ``ff_context``, Wan's ``ffn``; SANA's ``GLUMBConv`` ``ff``, with its depthwise 3x3 conv); in a
  FLUX single-stream block, whose attention has no output projection, its MLP ``proj_mlp`` and
  fused attention/MLP output projection ``proj_out``. Trainable stay: q/k/v and the added (context)
  q/k/v projections, the qk norms, the AdaLN modulation (``norm1.linear``, ``norm1_context.linear``,
  ``norm.linear``, ``scale_shift_table``, ``time_embed.linear``), all embedders
  (time/text/guidance, ``context_embedder``, ``x_embedder``, caption projection, Wan's image
  embedder and its ``ff``), the patch embedding, ``norm_out`` and the final ``proj_out``.
  Reasoning: a transformer has no 3x3 convolutions; the per-token channel transforms that carry
  the features are the feed-forwards and the attention output projections, which together hold
  most of a block's weights (8d^2 + d^2 of a stream's 12d^2 at MLP ratio 4), like the UNet's 3x3
  convs. GDD-I keeps qkv trainable and freezes the attention output, so we do the same; and it
  trains each block's embedding affine (the per-block timestep modulation), whose transformer
  counterpart is AdaLN, and the first/last layers, i.e. the patch embedding and ``proj_out`` here.
  The rule is by module class, not name; FeedForwards outside blocks (Wan's I2V image embedder)
  are not frozen.
- NVlabs-EDM-style ``SongUNet`` / ``DhariwalUNet`` (recognised by class name, as NVlabs' code is
  not an installable package): in every ``UNetBlock`` its 3x3 ``conv0`` and ``conv1`` and, with
  attention, its output projection ``proj``; ``affine``, ``skip``, ``qkv``, the norms, the mapping
  layers and the first/last (``*_conv``, ``*_aux_conv``) convolutions stay trainable.

:func:`apply_freezing` works on any module that contains one of those networks (a
:class:`~disback_core.denoisers.OneStepGenerator` around an EDM-preconditioned UNet, say), so it
combines with any method (GDD, DMD2, SiD, ...).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

__all__ = ["FreezeReport", "gddi_frozen_modules", "freeze_modules", "apply_freezing", "FREEZE_RULES"]

_EDM_NETS = ("SongUNet", "DhariwalUNet")


@dataclass
class FreezeReport:
    """What :func:`freeze_modules` / :func:`apply_freezing` froze: exact module names and parameter counts."""

    rule: str
    frozen_modules: list[str] = field(default_factory=list)
    frozen_params: int = 0
    total_params: int = 0

    @property
    def fraction(self) -> float:
        """Frozen share of all parameters of the model."""
        return self.frozen_params / self.total_params if self.total_params else 0.0

    @property
    def trainable_params(self) -> int:
        return self.total_params - self.frozen_params

    def to_json(self) -> dict[str, object]:
        return {
            "rule": self.rule,
            "frozen_modules": list(self.frozen_modules),
            "frozen_params": self.frozen_params,
            "total_params": self.total_params,
            "fraction": self.fraction,
        }


def _diffusers_classes() -> tuple[Any, Any, Any, Any]:
    """(UNet classes, resampler classes, ResnetBlock2D, Attention), empty without diffusers (typed Any:
    diffusers shows type checkers torch-less dummy classes)."""
    try:
        from diffusers import UNet2DConditionModel, UNet2DModel
        from diffusers.models.attention_processor import Attention
        from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
    except ImportError:  # pragma: no cover
        return (), (), None, None
    return (UNet2DModel, UNet2DConditionModel), (Downsample2D, Upsample2D), ResnetBlock2D, Attention


def _diffusers_class(module: str, name: str) -> Any:
    """``diffusers.<module>.<name>``, or ``None`` without diffusers or in an older one (typed Any, as above)."""
    try:
        return getattr(importlib.import_module(f"diffusers.{module}"), name)
    except (ImportError, AttributeError, RuntimeError):  # pragma: no cover
        return None


def _present(*classes: Any) -> tuple[Any, ...]:
    return tuple(c for c in classes if c is not None)


def _transformer_nets() -> tuple[Any, ...]:
    return _present(
        *(
            _diffusers_class("models", n)
            for n in (
                "SD3Transformer2DModel",
                "FluxTransformer2DModel",
                "SanaTransformer2DModel",
                "WanTransformer3DModel",
            )
        )
    )


def _weight_holder(m: nn.Module | None) -> bool:
    return isinstance(getattr(m, "weight", None), nn.Parameter)


def _transformer_rule(net: nn.Module, prefix: str) -> list[str]:
    tf = "models.transformers"
    blocks = _present(
        _diffusers_class("models.attention", "JointTransformerBlock"),
        _diffusers_class(f"{tf}.transformer_flux", "FluxTransformerBlock"),
        _diffusers_class(f"{tf}.sana_transformer", "SanaTransformerBlock"),
        _diffusers_class(f"{tf}.transformer_wan", "WanTransformerBlock"),
    )
    flux_single = _present(_diffusers_class(f"{tf}.transformer_flux", "FluxSingleTransformerBlock"))
    attention = _present(
        _diffusers_class("models.attention_processor", "Attention"),
        _diffusers_class("models.attention", "AttentionModuleMixin"),
    )
    feed_forward = _present(
        _diffusers_class("models.attention", "FeedForward"),
        _diffusers_class(f"{tf}.sana_transformer", "GLUMBConv"),
    )
    out: list[str] = []
    for name, block in net.named_modules():
        if not isinstance(block, blocks + flux_single):
            continue
        full = _join(prefix, name)
        for sub_name, m in block.named_modules():
            if attention and isinstance(m, attention):
                for proj in ("to_out.0", "to_add_out"):
                    try:
                        layer = m.get_submodule(proj)
                    except AttributeError:
                        continue
                    if _weight_holder(layer):
                        out.append(f"{_join(full, sub_name)}.{proj}")
            elif feed_forward and isinstance(m, feed_forward):
                out.append(_join(full, sub_name))
        if flux_single and isinstance(block, flux_single):
            out += [f"{full}.{c}" for c in ("proj_mlp", "proj_out")]
    return out


def _is_3x3_conv(m: nn.Module | None) -> bool:
    """A 3x3 convolution: ``nn.Conv2d`` or any layer (NVlabs' ``Conv2d``) with a 4-D ``weight`` of kernel 3x3."""
    w = getattr(m, "weight", None)
    return w is not None and getattr(w, "ndim", 0) == 4 and tuple(w.shape[-2:]) == (3, 3)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _diffusers_rule(net: nn.Module, prefix: str) -> list[str]:
    _, resamplers, resnet, attention = _diffusers_classes()
    out: list[str] = []
    for name, m in net.named_modules():
        full = _join(prefix, name)
        if resnet is not None and isinstance(m, resnet):
            out += [f"{full}.{c}" for c in ("conv1", "conv2") if _is_3x3_conv(getattr(m, c, None))]
        elif resamplers and isinstance(m, resamplers) and _is_3x3_conv(getattr(m, "conv", None)):
            out.append(f"{full}.conv")
        elif attention is not None and isinstance(m, attention):
            out.append(f"{full}.to_out.0")
    return out


def _edm_rule(net: nn.Module, prefix: str) -> list[str]:
    out: list[str] = []
    for name, m in net.named_modules():
        if type(m).__name__ != "UNetBlock":
            continue
        full = _join(prefix, name)
        out += [f"{full}.{c}" for c in ("conv0", "conv1") if _is_3x3_conv(getattr(m, c, None))]
        if getattr(m, "num_heads", 0) and getattr(m, "proj", None) is not None:
            out.append(f"{full}.proj")
    return out


def gddi_frozen_modules(model: nn.Module) -> list[str]:
    """The exact module names (as in ``model.named_modules()``) that GDD-I freezes in ``model``.

    ``model`` is, or contains, a diffusers ``UNet2DModel`` / ``UNet2DConditionModel``, an SD3 /
    FLUX / SANA / Wan transformer or an NVlabs-EDM-style ``SongUNet`` / ``DhariwalUNet``; see the
    module docstring for the rules.
    Raises ``ValueError`` for any other architecture.
    """
    unets, *_ = _diffusers_classes()
    transformers = _transformer_nets()
    out: list[str] = []
    found: list[str] = []
    for name, m in model.named_modules():
        if any(name == f or name.startswith(f + ".") for f in found):
            continue  # inside a network already handled
        if unets and isinstance(m, unets):
            out += _diffusers_rule(m, name)
        elif transformers and isinstance(m, transformers):
            out += _transformer_rule(m, name)
        elif type(m).__name__ in _EDM_NETS:
            out += _edm_rule(m, name)
        else:
            continue
        found.append(name)
    if not found:
        raise ValueError(
            f"GDD-I freezing knows diffusers UNet2DModel / UNet2DConditionModel, the SD3 / FLUX / SANA / Wan "
            f"transformers and NVlabs EDM SongUNet / DhariwalUNet; {type(model).__name__} contains none of them. Pass "
            f"rule=<callable(model) -> list of module names> or call freeze_modules(model, names)"
        )
    return out


FREEZE_RULES: dict[str, Callable[[nn.Module], list[str]]] = {"gddi": gddi_frozen_modules}


def freeze_modules(model: nn.Module, names: Iterable[str], *, rule: str = "custom") -> FreezeReport:
    """Turn off gradients of every parameter of the named submodules (in place); report what was frozen.

    A parameter shared by several modules counts once. Unknown names raise ``ValueError``.
    """
    names = list(dict.fromkeys(names))
    frozen: dict[int, int] = {}
    for n in names:
        try:
            sub = model.get_submodule(n)
        except AttributeError as e:
            raise ValueError(f"{n!r} is not a submodule of {type(model).__name__}") from e
        for p in sub.parameters():
            p.requires_grad_(False)
            frozen[id(p)] = p.numel()
    total = sum(p.numel() for p in model.parameters())
    return FreezeReport(rule, names, sum(frozen.values()), total)


def apply_freezing(model: nn.Module, rule: str | Callable[[nn.Module], list[str]] = "gddi") -> FreezeReport:
    """Freeze ``model`` by a named rule (``"gddi"``; ``"none"`` freezes nothing) or a callable
    ``rule(model) -> module names``. Call it before building the optimizer (or build the
    optimizer from the parameters that still require grad)."""
    if rule == "none":
        return FreezeReport("none", [], 0, sum(p.numel() for p in model.parameters()))
    if isinstance(rule, str):
        if rule not in FREEZE_RULES:
            raise ValueError(f"unknown freezing rule {rule!r}; known: {['none', *FREEZE_RULES]} or a callable")
        return freeze_modules(model, FREEZE_RULES[rule](model), rule=rule)
    return freeze_modules(model, rule(model), rule=getattr(rule, "__name__", "custom"))
