"""LoRA slots and nodes on any layer that owns a ``weight`` parameter.

A node holds two factors per target layer ``L`` (weight ``W``, ``out = W.shape[0]``), under the
keys ``L.lora_A.weight`` and ``L.lora_B.weight``; the layer's weight at that node is

    W_k = W + scale * (B.reshape(out, r) @ A.reshape(r, -1)).reshape(W.shape)

with ``scale = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA, Kalajdzievski 2023), as peft defines
it. Two backends fill the same key format behind one :class:`LoraSpec`:

- **peft** (``inject_adapter_in_model``) for ``nn.Linear`` and ungrouped ``nn.Conv1d/2d/3d``:
  A is peft's ``[r, in]`` / ``[r, in, *kernel]``, B ``[out, r]`` / ``[out, r, 1, ...]``;
- **delta**, a thin ``torch.nn.utils.parametrize`` term ``W + scale * B @ A``, for every other
  layer with a floating ``weight`` of ndim >= 2: NVlabs EDM's own ``Conv2d``/``Linear`` (weights as
  plain parameters, ``torch.nn.functional`` calls), grouped convolutions, custom modules.
  A is ``[r, W[0].numel()]``, B ``[out, r]``.

:func:`node_weight` computes ``W_k`` from a node without any slot (fp32 arithmetic, cast once):
merged targets and in-place attachment (:mod:`disback_core.attach`) use it.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

if TYPE_CHECKING:
    from peft.tuners.lora import LoraLayer

__all__ = [
    "LoraSpec",
    "LoraTarget",
    "ADAPTER",
    "default_target_modules",
    "lora_targets",
    "inject_lora",
    "remove_lora",
    "lora_parameters",
    "lora_state",
    "load_lora_state",
    "lora_template",
    "node_layers",
    "node_weight",
    "write_node_weight_",
    "svd_lora",
    "lora_numel",
    "merged_state_dict",
    "EDM_TARGETS",
    "UNET2D_TARGETS",
    "UNET2D_CONDITION_TARGETS",
    "SD3_TARGETS",
    "SD3_FF_TARGETS",
    "FLUX_TARGETS",
    "SANA_TARGETS",
    "SANA_FF_TARGETS",
    "WAN_TARGETS",
    "WAN_FF_TARGETS",
]

ADAPTER = "disback"

UNET2D_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "conv_shortcut", "time_emb_proj")
UNET2D_CONDITION_TARGETS = UNET2D_TARGETS + ("proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
# NVlabs EDM's SongUNet / DhariwalUNet blocks (UNetBlock): resnet convs, the embedding's affine
# projection, the skip conv and attention, i.e. the analogue of diffusers' set above.
EDM_TARGETS = ("conv0", "conv1", "affine", "skip", "qkv", "proj")
_EDM_CLASSES = ("SongUNet", "DhariwalUNet", "UNetBlock")

# Flow-matching transformers (diffusers). Each set holds the attention projections (to_q, to_k, to_v,
# to_out.0) and, where the block has them, the added/context-stream projections; the feed-forward
# only where diffusers' own LoRA script trains it. Never AdaLN modulation (norm1.linear, ...),
# embedders, the patch embedding or proj_out. Add a *_FF_TARGETS tuple for the feed-forward:
# LoraSpec(target_modules=SD3_TARGETS + SD3_FF_TARGETS).
# SD3: the default --lora_layers of diffusers' examples/dreambooth/train_dreambooth_lora_sd3.py
# (joint attention of every JointTransformerBlock; the last block has no to_add_out).
SD3_TARGETS = (
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "attn.to_k",
    "attn.to_out.0",
    "attn.to_q",
    "attn.to_v",
)
# SD3 feed-forward (image and context streams), which that script leaves out by default.
SD3_FF_TARGETS = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
# FLUX: the default target_modules of train_dreambooth_lora_flux.py: joint attention and both
# feed-forwards of the dual-stream blocks; q/k/v of the single-stream blocks (whose attention has no
# to_out: their MLP proj_mlp and fused output proj_out are left out, as by that script).
FLUX_TARGETS = (
    "attn.to_k",
    "attn.to_q",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
)
# SANA: train_dreambooth_lora_sana.py's to_k/to_q/to_v (self-attention attn1 and cross-attention
# attn2) plus to_out.0, the attention set of the others; no feed-forward, as that script.
SANA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")
# SANA feed-forward (GLUMBConv): 1x1 convs and the depthwise 3x3 (grouped: the delta backend).
SANA_FF_TARGETS = ("ff.conv_inverted", "ff.conv_depth", "ff.conv_point")
# Wan: HF finetrainers' Wan LoRA recipe "blocks.*(to_q|to_k|to_v|to_out.0)" (diffusers has no Wan
# LoRA script): self-attention attn1 and text cross-attention attn2, plus the I2V image-context
# projections of attn2 (add_k_proj, add_v_proj; only in image-conditioned models).
WAN_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj")
# Wan feed-forward (ffn of every block; not the I2V image embedder's ff).
WAN_FF_TARGETS = ("ffn.net.0.proj", "ffn.net.2")
_TRANSFORMER_TARGETS = {
    "SD3Transformer2DModel": SD3_TARGETS,
    "FluxTransformer2DModel": FLUX_TARGETS,
    "SanaTransformer2DModel": SANA_TARGETS,
    "WanTransformer3DModel": WAN_TARGETS,
}
_PEFT_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_A, _B = ".lora_A.weight", ".lora_B.weight"


def _parametrizations(m: nn.Module, name: str) -> parametrize.ParametrizationList:
    """``m.parametrizations[name]`` of a module parametrized on ``name`` (``Module.__getattr__`` is typed
    loosely, so the type checker cannot see what ``register_parametrization`` put there)."""
    return cast(parametrize.ParametrizationList, cast(nn.ModuleDict, m.parametrizations)[name])


def _weight_of(m: nn.Module) -> Tensor | None:
    """The layer's own ``weight`` parameter (original one if parametrized), if it is a matrix or kernel."""
    w: Tensor | None
    if parametrize.is_parametrized(m, "weight"):
        w = _parametrizations(m, "weight").original
    else:
        w = m._parameters.get("weight")
    if isinstance(w, Tensor) and w.is_floating_point() and w.ndim >= 2:
        return w
    return None


def _candidates(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, m in model.named_modules():
        if name and _weight_of(m) is not None and "lora_" not in name and not _is_peft_layer(m):
            yield name, m


def _is_peft_layer(m: nn.Module) -> bool:
    if "peft" not in sys.modules:  # no peft layer exists before peft is imported (importing it takes seconds)
        return False
    from peft.tuners.lora import LoraLayer

    return isinstance(m, LoraLayer)


def _transformer_classes() -> list[tuple[Any, tuple[str, ...]]]:
    """(diffusers class, its target set) for the flow-matching transformers this diffusers has."""
    if "diffusers" not in sys.modules:  # no diffusers model exists before diffusers is imported
        return []
    try:
        import diffusers
    except ImportError:  # pragma: no cover
        return []
    out = []
    for name, targets in _TRANSFORMER_TARGETS.items():
        try:
            out.append((getattr(diffusers, name), targets))
        except (AttributeError, ImportError, RuntimeError):  # pragma: no cover - an older diffusers
            continue
    return out


def default_target_modules(model: nn.Module) -> list[str]:
    """Default LoRA targets: the usual diffusers UNet sets (the LCM-LoRA set for
    ``UNet2DConditionModel``), :data:`SD3_TARGETS` / :data:`FLUX_TARGETS` / :data:`SANA_TARGETS` /
    :data:`WAN_TARGETS` for diffusers' ``SD3Transformer2DModel`` / ``FluxTransformer2DModel`` /
    ``SanaTransformer2DModel`` / ``WanTransformer3DModel`` (attention projections, after diffusers'
    LoRA scripts; see the comments on each constant), :data:`EDM_TARGETS` for NVlabs EDM UNets
    (recognised by their class names ``SongUNet``/``DhariwalUNet``/``UNetBlock``), else every layer
    with a weight matrix or kernel except embeddings (lookup tables, which LoRA sets leave out).
    The first recognised network in module order decides."""
    try:
        if "diffusers" not in sys.modules:  # no diffusers model exists before diffusers is imported
            raise ImportError
        from diffusers import UNet2DConditionModel, UNet2DModel
    except ImportError:
        UNet2DConditionModel = UNet2DModel = ()  # type: ignore[assignment,misc]
    transformers = _transformer_classes()
    for m in model.modules():
        if isinstance(m, UNet2DConditionModel):
            return list(UNET2D_CONDITION_TARGETS)
        if isinstance(m, UNet2DModel):
            return list(UNET2D_TARGETS)
        for cls, targets in transformers:
            if isinstance(m, cls):
                return list(targets)
        if type(m).__name__ in _EDM_CLASSES:
            return list(EDM_TARGETS)
    names = [n for n, m in _candidates(model) if not isinstance(m, nn.Embedding)]
    if not names:
        raise ValueError(
            f"{type(model).__name__} has no layer with a weight matrix to put LoRA on; pass target_modules"
        )
    return names


def _check_number(name: str, v: Any, *, integer: bool = False) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
        raise ValueError(f"LoRA {name} must be {'an integer' if integer else 'a number'}, got {v!r}")
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"LoRA {name} must be finite and > 0, got {v!r}")


@dataclass(frozen=True)
class LoraSpec:
    """LoRA configuration of a trajectory.

    Args:
        rank: r (Hu et al. 2021, Eq. 3); ``rank >= 1``.
        alpha: the scale numerator; default ``alpha = rank`` (scale 1).
        target_modules: layer names, each matching a layer whose name equals it or ends with
            ``"." + name`` (peft's rule), or one regular expression matched against the full name;
            default :func:`default_target_modules`. :meth:`resolved` turns it into exact names.
        use_rslora: scale ``alpha / sqrt(r)`` (rsLoRA) instead of ``alpha / r``.
    """

    rank: int = 8
    alpha: float | None = None
    target_modules: tuple[str, ...] | str | None = None
    use_rslora: bool = False

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank!r}")
        if self.rank > 1 << 16:
            raise ValueError(f"rank {self.rank} is absurd (> 65536)")
        if self.alpha is not None:
            _check_number("alpha", self.alpha)
        if not isinstance(self.use_rslora, bool):
            raise ValueError(f"use_rslora must be a bool, got {self.use_rslora!r}")
        tm = self.target_modules
        if tm is not None and not isinstance(tm, str):
            tm = tuple(tm)
            if not tm or not all(isinstance(t, str) and t for t in tm):
                raise ValueError(f"target_modules must be non-empty strings, got {self.target_modules!r}")
            object.__setattr__(self, "target_modules", tm)

    @property
    def scale(self) -> float:
        a = float(self.alpha if self.alpha is not None else self.rank)
        return a / math.sqrt(self.rank) if self.use_rslora else a / self.rank

    def resolved(self, model: nn.Module) -> LoraSpec:
        """The same spec with exact target names for ``model`` and an explicit alpha."""
        names = tuple(t.name for t in lora_targets(model, self))
        return LoraSpec(self.rank, float(self.alpha if self.alpha is not None else self.rank), names, self.use_rslora)

    def to_json(self) -> dict[str, Any]:
        tm = self.target_modules
        return {
            "rank": self.rank,
            "alpha": self.alpha,
            "use_rslora": self.use_rslora,
            "target_modules": list(tm) if isinstance(tm, tuple) else tm,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> LoraSpec:
        if not isinstance(d, Mapping):
            raise ValueError(f"a LoRA spec must be a JSON object, got {type(d).__name__}")
        unknown = set(d) - {"rank", "alpha", "target_modules", "use_rslora", "extra"}
        if unknown:
            raise ValueError(f"unknown LoRA spec fields {sorted(unknown)}")
        extra = d.get("extra") or {}  # format 1 kept further peft fields here; only rsLoRA is meaningful
        if not isinstance(extra, Mapping) or set(extra) - {"use_rslora"}:
            raise ValueError(f"unsupported LoRA spec extras {extra!r}")
        tm = d.get("target_modules")
        if tm is not None and not isinstance(tm, (list, str)):
            raise ValueError(f"target_modules must be a list of names, got {type(tm).__name__}")
        # values from a file: __post_init__ checks each one's type and range
        fields: list[Any] = [
            d.get("rank"),
            d.get("alpha"),
            tuple(tm) if isinstance(tm, list) else tm,
            d.get("use_rslora", extra.get("use_rslora", False)),
        ]
        return cls(*fields)


@dataclass(frozen=True)
class LoraTarget:
    """One layer a spec selects: its name, class, weight shape, backend and factor shapes."""

    name: str
    layer: str
    weight_shape: tuple[int, ...]
    backend: str  # "peft" or "delta"
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.a_shape) + math.prod(self.b_shape)


def _backend(m: nn.Module) -> str:
    if isinstance(m, _PEFT_TYPES) and getattr(m, "groups", 1) == 1 and not parametrize.is_parametrized(m):
        return "peft"
    return "delta"


def _target(name: str, m: nn.Module, r: int) -> LoraTarget:
    w = _weight_of(m)
    assert w is not None
    shape, backend = tuple(w.shape), _backend(m)
    a: tuple[int, ...]
    b: tuple[int, ...]
    if backend == "peft" and isinstance(m, nn.Linear):
        a, b = (r, m.in_features), (m.out_features, r)
    elif backend == "peft":
        conv = cast("nn.Conv1d | nn.Conv2d | nn.Conv3d", m)  # _backend: a peft layer that is not Linear
        a, b = (r, conv.in_channels, *conv.kernel_size), (conv.out_channels, r, *([1] * len(conv.kernel_size)))
    else:
        a, b = (r, math.prod(shape[1:])), (shape[0], r)
    return LoraTarget(name, type(m).__name__, shape, backend, a, b)


def _matches(name: str, targets: tuple[str, ...] | str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def lora_targets(model: nn.Module, spec: LoraSpec | None = None) -> list[LoraTarget]:
    """The layers ``spec`` selects in ``model`` (default spec: rank 8, default targets), in module
    order: the listing function to check a spec before recording."""
    spec = spec or LoraSpec()
    targets = spec.target_modules if spec.target_modules is not None else tuple(default_target_modules(model))
    out = []
    for name, m in model.named_modules():
        if not name or "lora_" in name or not _matches(name, targets):
            continue
        if _is_peft_layer(m):
            raise ValueError(f"layer {name!r} already carries a peft LoRA slot")
        if _weight_of(m) is None:
            if isinstance(targets, tuple) and name in targets:  # named exactly, so it must be usable
                raise ValueError(
                    f"target {name!r} ({type(m).__name__}) has no floating weight of ndim >= 2 to put LoRA on"
                )
            continue
        out.append(_target(name, m, spec.rank))
    if not out:
        raise ValueError(
            f"target_modules {targets!r} match no layer with a weight in {type(model).__name__}; "
            "list the layers with disback_core.lora_targets(model, LoraSpec(target_modules=...))"
        )
    return out


# --------------------------------------------------------------------------- the delta backend


class _DeltaLoRA(nn.Module):
    """``W -> W + scale * (B @ A).reshape(W.shape)``, registered with ``torch.nn.utils.parametrize``.

    Factors are fp32 (like peft's autocast adapters); the sum is cast once to ``W``'s dtype."""

    order: list[str]  # the layer's parameter names before injection, set by inject_lora for remove_lora

    def __init__(self, weight: Tensor, rank: int, scale: float):
        super().__init__()
        out, fan_in = weight.shape[0], weight[0].numel()
        self.lora_A = nn.Parameter(torch.empty(rank, fan_in, device=weight.device, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # peft's default init of A
        self.lora_B = nn.Parameter(torch.zeros(out, rank, device=weight.device, dtype=torch.float32))
        self.scale = scale
        self.enabled = True

    def forward(self, w: Tensor) -> Tensor:
        if not self.enabled:
            return w
        return (w.float() + self.scale * (self.lora_B @ self.lora_A).reshape(w.shape)).to(w.dtype)


def _delta_slots(model: nn.Module) -> Iterator[tuple[str, _DeltaLoRA]]:
    for name, m in model.named_modules():
        if parametrize.is_parametrized(m, "weight"):
            for p in _parametrizations(m, "weight"):
                if isinstance(p, _DeltaLoRA):
                    yield name, p


def _peft_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, m in model.named_modules():
        if _is_peft_layer(m):
            yield name, m


def has_lora(model: nn.Module) -> bool:
    return any(True for _ in _peft_layers(model)) or any(True for _ in _delta_slots(model))


def inject_lora(model: nn.Module, spec: LoraSpec) -> nn.Module:
    """Add one LoRA slot to ``model`` in place; B = 0, so outputs are unchanged.

    Every parameter of ``model`` is frozen; only the slot's factors are trainable afterwards
    (:func:`lora_parameters`). Raises if ``model`` already has a slot.
    """
    if has_lora(model):
        raise ValueError(f"{type(model).__name__} already has a LoRA slot")
    targets = lora_targets(model, spec)
    model.requires_grad_(False)
    peft_names = [t.name for t in targets if t.backend == "peft"]
    # remove_lora leaves no trace behind. The ignore: torch types Module.__setattr__'s value as
    # Tensor | Module, but a module takes any attribute.
    model._disback_had_peft_config = hasattr(model, "peft_config")  # type: ignore[assignment]
    if peft_names:
        from peft import LoraConfig, inject_adapter_in_model

        # peft annotates lora_alpha as int but only divides by it (scaling = lora_alpha / r): a float is right
        alpha = float(spec.alpha if spec.alpha is not None else spec.rank)
        cfg = LoraConfig(
            r=spec.rank,
            lora_alpha=alpha,  # type: ignore[arg-type]
            target_modules=peft_names,
            lora_dropout=0.0,
            bias="none",
            use_rslora=spec.use_rslora,
        )
        inject_adapter_in_model(cfg, model, adapter_name=ADAPTER)
    for t in targets:
        if t.backend == "delta":
            layer = model.get_submodule(t.name)
            weight = _weight_of(layer)
            if weight is None:  # lora_targets kept only layers with a weight
                raise RuntimeError(f"LoRA target {t.name!r} has no floating weight of ndim >= 2 any more")
            delta = _DeltaLoRA(weight, spec.rank, spec.scale)
            delta.order = list(layer._parameters)  # restored by remove_lora: the user's parameter order
            parametrize.register_parametrization(layer, "weight", delta, unsafe=True)
    for p in lora_parameters(model):
        p.requires_grad_(True)
    return model


def remove_lora(model: nn.Module) -> nn.Module:
    """Take the slot out again: every layer is its plain base layer with its original weight."""
    for name, m in list(_peft_layers(model)):
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, cast("LoraLayer", m).get_base_layer())
    if not model.__dict__.pop("_disback_had_peft_config", True) and "peft_config" in model.__dict__:
        del model.__dict__["peft_config"]  # set by peft's injection on this model
    for name, delta in list(_delta_slots(model)):
        layer = model.get_submodule(name)
        parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
        params = dict(layer._parameters)
        layer._parameters.clear()
        layer._parameters.update({k: params[k] for k in delta.order if k in params})
        layer._parameters.update(params)  # anything else keeps its place after them
    return model


def merged_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``model``'s state dict with every LoRA merged into its layer's weight, under the plain
    layer's keys (``<layer>.weight``, no ``base_layer``, ``lora_`` or ``parametrizations`` keys):
    what the model would hold had it been trained without adapters. Covers peft layers (this
    library's slots, ``unet.add_adapter(...)``, ``inject_adapter_in_model``: the active, unmerged
    adapters are added) and the delta backend. Tensors are detached; merged weights are new tensors,
    the rest are the model's own."""
    merged: dict[str, Tensor] = {}
    with torch.no_grad():
        for name, m in _peft_layers(model):
            layer: Any = m  # a peft LoraLayer subclass (Linear, Conv2d, ...): get_delta_weight is theirs
            w = cast(Tensor, layer.get_base_layer().weight).detach()
            if not layer.disable_adapters and not layer.merged:
                delta = sum(
                    (layer.get_delta_weight(a).float() for a in layer.active_adapters if a in layer.lora_A),
                    torch.zeros((), device=w.device),
                )
                w = (w.float() + delta).to(w.dtype)
            merged[name + ".weight"] = w
        for name, _ in _delta_slots(model):
            merged[name + ".weight"] = cast(Tensor, model.get_submodule(name).weight).detach()
    out: dict[str, Tensor] = {}
    for key, v in model.state_dict().items():
        parts = key.split(".")
        if any(p.startswith("lora_") for p in parts):
            continue
        if "parametrizations" in parts:  # <layer>.parametrizations.weight.original
            i = parts.index("parametrizations")
            key = ".".join(parts[:i] + [parts[i + 1]])
        key = key.replace(".base_layer.", ".")
        out[key] = merged.get(key, v.detach())
    return out


def set_lora_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch the slot on (unmerged forward) or off (the base weights alone); never changes requires_grad."""
    for _, m in _peft_layers(model):
        flags = [p.requires_grad for p in m.parameters()]
        cast("LoraLayer", m).enable_adapters(enabled)  # peft makes the adapter trainable here; put the flags back
        for p, f in zip(m.parameters(), flags):
            p.requires_grad_(f)
    for _, d in _delta_slots(model):
        d.enabled = enabled


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The slot's trainable factors (peft's and the delta backend's)."""
    out = [p for _, m in _peft_layers(model) for n, p in m.named_parameters() if "lora_" in n]
    out += [p for _, d in _delta_slots(model) for p in (d.lora_A, d.lora_B)]
    return out


def _slot_tensors(model: nn.Module) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    if any(True for _ in _peft_layers(model)):
        from peft import get_peft_model_state_dict

        out.update(get_peft_model_state_dict(model, adapter_name=ADAPTER))
    for name, d in _delta_slots(model):
        out[name + _A], out[name + _B] = d.lora_A, d.lora_B
    return out


def lora_state(model: nn.Module) -> dict[str, Tensor]:
    """The slot's factors as a detached CPU copy, keys ``<layer>.lora_A.weight`` / ``.lora_B.weight``."""
    return {k: v.detach().to("cpu").clone() for k, v in _slot_tensors(model).items()}


def lora_template(model: nn.Module, spec: LoraSpec) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a node for ``spec`` on ``model``, computed from the layers (no slot built)."""
    out: dict[str, tuple[int, ...]] = {}
    for t in lora_targets(model, spec):
        out[t.name + _A], out[t.name + _B] = t.a_shape, t.b_shape
    return out


def check_node(state: Mapping[str, Tensor], template: Mapping[str, tuple[int, ...]], source: str) -> None:
    """Refuse a node with any missing, unexpected, mis-shaped or non-float key, naming the first one.

    (The reference DisBack code loaded a state dict with ``strict=False`` whose keys matched
    nothing, so its target never changed; here a mismatch is an error that names the key.)
    """
    missing = sorted(set(template) - set(state))
    unexpected = sorted(set(state) - set(template))
    if missing or unexpected:
        raise ValueError(
            f"{source} does not fit this model's LoRA slot: "
            f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
        )
    for k, shape in template.items():
        v = state[k]
        if tuple(v.shape) != tuple(shape):
            raise ValueError(f"{source}: {k} has shape {tuple(v.shape)}, the slot expects {tuple(shape)}")
        if not v.is_floating_point():
            raise ValueError(f"{source}: {k} has dtype {v.dtype}, expected a floating dtype")


def load_lora_state(model: nn.Module, state: Mapping[str, Tensor], source: str = "node") -> None:
    """Write a node into the LoRA slot, refusing any missing, unexpected or mis-shaped key."""
    slot = _slot_tensors(model)
    check_node(state, {k: tuple(v.shape) for k, v in slot.items()}, source)
    with torch.no_grad():
        for k, v in slot.items():
            v.copy_(state[k])


def node_layers(state: Mapping[str, Tensor]) -> list[str]:
    """The layer names a LoRA node touches, in sorted order."""
    return sorted(k[: -len(_A)] for k in state if k.endswith(_A))


def _factors(state: Mapping[str, Tensor], layer: str, device: torch.device) -> tuple[Tensor, Tensor]:
    a = state[layer + _A].to(device, torch.float32)
    b = state[layer + _B].to(device, torch.float32)
    return b.reshape(b.shape[0], -1), a.reshape(a.shape[0], -1)


def add_node_(w: Tensor, state: Mapping[str, Tensor], layer: str, scale: float) -> Tensor:
    """``w += scale * B @ A`` in place, for a contiguous fp32 weight ``w`` (one fused ``addmm_``)."""
    b, a = _factors(state, layer, w.device)
    w.view(w.shape[0], -1).addmm_(b, a, alpha=scale)
    return w


def node_weight(base: Tensor, state: Mapping[str, Tensor], layer: str, scale: float) -> Tensor:
    """``W + scale * B @ A`` for ``layer`` of a node, on ``base``'s device: fp32 sum, cast once to its dtype."""
    return add_node_(base.to(torch.float32, copy=True).contiguous(), state, layer, scale).to(base.dtype)


def write_node_weight_(dst: Tensor, base: Tensor, state: Mapping[str, Tensor], layer: str, scale: float) -> None:
    """``dst.copy_(node_weight(base, ...))``, without temporaries when ``dst`` is contiguous fp32
    (bit-identical either way)."""
    if dst.dtype == torch.float32 and dst.is_contiguous():
        dst.copy_(base)
        add_node_(dst, state, layer, scale)
    else:
        dst.copy_(node_weight(base, state, layer, scale))


def svd_lora(
    targets: Sequence[LoraTarget], base_weights: Mapping[str, Tensor], tuned: Mapping[str, Tensor], scale: float
) -> tuple[dict[str, Tensor], float]:
    """Compress a full fine-tune into a LoRA node by truncated SVD of each target's weight delta.

    For every target ``L``: ``delta = W_tuned - W_base`` reshaped to ``[out, -1]``,
    ``delta ~ U_r S_r V_r^T``; ``B = U_r S_r^(1/2) / scale``, ``A = S_r^(1/2) V_r^T`` (in the
    target's factor shapes). Returns the node (CPU, fp32) and the relative Frobenius error
    ``||delta - delta_r|| / ||delta||`` over all targets together. Changes outside the targets
    (biases, norms) are not represented.
    """
    err2, tot2, node = 0.0, 0.0, {}
    with torch.no_grad():
        for t in targets:
            key = f"{t.name}.weight"
            delta = tuned[key].double() - base_weights[key].to(tuned[key].device).double()
            r = t.a_shape[0]
            u, s, vh = torch.linalg.svd(delta.reshape(delta.shape[0], -1), full_matrices=False)
            u, s, vh = u[:, :r], s[:r], vh[:r]
            if s.numel() < r:  # rank above min(out, in): pad with zero components
                pad = r - s.numel()
                u = torch.cat([u, u.new_zeros(u.shape[0], pad)], 1)
                vh = torch.cat([vh, vh.new_zeros(pad, vh.shape[1])], 0)
                s = torch.cat([s, s.new_zeros(pad)])
            root = s.sqrt()
            # contiguous, as a loaded node is: LAPACK's column-major u would round the B @ A product
            # differently from the same node after a save and load
            node[t.name + _B] = ((u * root) / scale).reshape(t.b_shape).float().cpu().contiguous()
            node[t.name + _A] = (root[:, None] * vh).reshape(t.a_shape).float().cpu().contiguous()
            approx = (u * s) @ vh
            err2 += float(((delta.reshape(approx.shape) - approx) ** 2).sum())
            tot2 += float((delta**2).sum())
    return node, (err2 / tot2) ** 0.5 if tot2 > 0 else 0.0


def lora_numel(state: Mapping[str, Tensor]) -> int:
    return sum(v.numel() for v in state.values())
