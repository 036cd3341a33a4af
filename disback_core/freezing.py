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
- NVlabs-EDM-style ``SongUNet`` / ``DhariwalUNet`` (recognised by class name, as NVlabs' code is
  not an installable package): in every ``UNetBlock`` its 3x3 ``conv0`` and ``conv1`` and, with
  attention, its output projection ``proj``; ``affine``, ``skip``, ``qkv``, the norms, the mapping
  layers and the first/last (``*_conv``, ``*_aux_conv``) convolutions stay trainable.

:func:`apply_freezing` works on any module that contains one of those networks (a
:class:`~disback_core.denoisers.OneStepGenerator` around an EDM-preconditioned UNet, say), so it
combines with any method (GDD, DMD2, SiD, ...).
"""

from __future__ import annotations

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

    ``model`` is, or contains, a diffusers ``UNet2DModel`` / ``UNet2DConditionModel`` or an
    NVlabs-EDM-style ``SongUNet`` / ``DhariwalUNet``; see the module docstring for the rule.
    Raises ``ValueError`` for any other architecture.
    """
    unets, *_ = _diffusers_classes()
    out: list[str] = []
    found: list[str] = []
    for name, m in model.named_modules():
        if any(name == f or name.startswith(f + ".") for f in found):
            continue  # inside a network already handled
        if unets and isinstance(m, unets):
            out += _diffusers_rule(m, name)
        elif type(m).__name__ in _EDM_NETS:
            out += _edm_rule(m, name)
        else:
            continue
        found.append(name)
    if not found:
        raise ValueError(
            f"GDD-I freezing knows diffusers UNet2DModel / UNet2DConditionModel and NVlabs EDM "
            f"SongUNet / DhariwalUNet; {type(model).__name__} contains none of them. Pass "
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
