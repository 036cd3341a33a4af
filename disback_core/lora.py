"""peft glue for trajectory nodes: inject a LoRA slot, read and write a node, merge it, SVD-compress.

A node is the state of one LoRA adapter as peft's ``get_peft_model_state_dict`` returns it (adapter
name stripped), so any node loads into any slot. peft's low-level API (``inject_adapter_in_model``,
``set_peft_model_state_dict``, ``LoraLayer.get_delta_weight``) works on every ``nn.Module``:
plain MLPs, EDM networks and diffusers UNets alike.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Mapping

import torch
from torch import Tensor, nn

__all__ = ["LoraSpec", "ADAPTER", "default_target_modules", "inject_lora", "lora_layers", "lora_state",
           "load_lora_state", "merge_lora_into", "svd_lora", "lora_numel"]

ADAPTER = "disback"

UNET2D_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "conv_shortcut", "time_emb_proj")
UNET2D_CONDITION_TARGETS = UNET2D_TARGETS + ("proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")


def default_target_modules(model: nn.Module) -> list[str]:
    """LoRA targets: the usual diffusers UNet layers (attention, resnet convs, time projections; the
    LCM-LoRA set for ``UNet2DConditionModel``), or every ``Linear``/``Conv2d`` of any other model."""
    try:
        from diffusers import UNet2DConditionModel, UNet2DModel
    except ImportError:  # pragma: no cover
        UNet2DConditionModel = UNet2DModel = ()  # type: ignore[assignment]
    for m in model.modules():
        if isinstance(m, UNet2DConditionModel):
            return list(UNET2D_CONDITION_TARGETS)
        if isinstance(m, UNet2DModel):
            return list(UNET2D_TARGETS)
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and n]
    if not names:
        raise ValueError(f"{type(model).__name__} has no Linear or Conv2d layer to put LoRA on; pass target_modules")
    return names


@dataclass(frozen=True)
class LoraSpec:
    """LoRA configuration of a trajectory: rank, alpha (default: alpha = rank, scale 1) and targets
    (default: :func:`default_target_modules`)."""

    rank: int = 8
    alpha: float | None = None
    target_modules: tuple[str, ...] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # further LoraConfig fields, JSON-serialisable

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")

    def resolved(self, model: nn.Module) -> "LoraSpec":
        targets = tuple(self.target_modules) if self.target_modules else tuple(default_target_modules(model))
        return LoraSpec(self.rank, float(self.alpha if self.alpha is not None else self.rank), targets, dict(self.extra))

    def to_config(self, model: nn.Module):
        from peft import LoraConfig

        s = self.resolved(model)
        return LoraConfig(r=s.rank, lora_alpha=s.alpha, target_modules=list(s.target_modules),
                          lora_dropout=0.0, bias="none", **s.extra)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules) if self.target_modules else None
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "LoraSpec":
        unknown = set(d) - {"rank", "alpha", "target_modules", "extra"}
        if unknown:
            raise ValueError(f"unknown LoRA spec fields {sorted(unknown)}")
        tm = d.get("target_modules")
        return cls(int(d["rank"]), d.get("alpha"), tuple(tm) if tm else None, dict(d.get("extra") or {}))


def inject_lora(model: nn.Module, spec: LoraSpec) -> nn.Module:
    """Add one LoRA slot (adapter ``ADAPTER``) to ``model`` in place; B = 0, so outputs are unchanged.

    Only the LoRA weights are trainable afterwards (peft freezes the base layers it wraps; the rest
    is frozen here too).
    """
    from peft import inject_adapter_in_model

    config = spec.to_config(model)
    model.requires_grad_(False)
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)  # peft raises if no module matches
    return model


def lora_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer

    for name, m in model.named_modules():
        if isinstance(m, LoraLayer):
            yield name, m


def lora_state(model: nn.Module) -> dict[str, Tensor]:
    """The LoRA slot's weights as a detached CPU copy (peft's key format, adapter name stripped)."""
    from peft import get_peft_model_state_dict

    sd = get_peft_model_state_dict(model, adapter_name=ADAPTER)
    return {k: v.detach().to("cpu").clone() for k, v in sd.items()}


def load_lora_state(model: nn.Module, state: Mapping[str, Tensor], source: str = "node") -> None:
    """Write a node into the LoRA slot, refusing any missing, unexpected or mis-shaped key.

    (The reference DisBack code loaded a state dict with ``strict=False`` whose keys matched
    nothing, so its target never changed; here a mismatch is an error that names the key.)
    """
    from peft import set_peft_model_state_dict

    template = lora_state_template(model)
    missing = sorted(set(template) - set(state))
    unexpected = sorted(set(state) - set(template))
    if missing or unexpected:
        raise ValueError(f"{source} does not fit this model's LoRA slot: "
                         f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                         f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
    for k, v in template.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise ValueError(f"{source}: {k} has shape {tuple(state[k].shape)}, the slot expects {tuple(v.shape)}")
    result = set_peft_model_state_dict(model, dict(state), adapter_name=ADAPTER)
    left = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if left:  # pragma: no cover - guarded above; kept as a second line of defence
        raise ValueError(f"{source}: peft did not load {left[:3]}")


def lora_state_template(model: nn.Module) -> dict[str, Tensor]:
    """Shapes of the LoRA slot (no copy)."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model, adapter_name=ADAPTER)


def merge_lora_into(work: nn.Module, base: nn.Module) -> None:
    """Set every LoRA-wrapped weight of ``work`` to ``W_base + delta`` and disable the adapters.

    ``base`` is the untouched teacher: weights are rebuilt from it at each call, never unmerged,
    so repeated switches do not drift. The forward of ``work`` then costs what the teacher's does.
    """
    base_params = dict(base.named_parameters())
    with torch.no_grad():
        for name, layer in lora_layers(work):
            w0 = base_params[f"{name}.weight"]
            layer.get_base_layer().weight.copy_(w0 + layer.get_delta_weight(ADAPTER).to(w0.dtype))
            layer.enable_adapters(False)
    work.requires_grad_(False)


def unmerge_lora(work: nn.Module, base: nn.Module) -> None:
    """Restore the teacher's weights under every LoRA layer and enable the adapters (unmerged forward)."""
    base_params = dict(base.named_parameters())
    with torch.no_grad():
        for name, layer in lora_layers(work):
            layer.get_base_layer().weight.copy_(base_params[f"{name}.weight"])
            layer.enable_adapters(True)
    work.requires_grad_(False)  # enable_adapters makes the slot trainable; a target stays frozen


def svd_lora(work: nn.Module, base_weights: Mapping[str, Tensor], tuned: Mapping[str, Tensor]
             ) -> tuple[dict[str, Tensor], float]:
    """Compress a full fine-tune into the LoRA slot of ``work`` by truncated SVD of each weight delta.

    For every LoRA-wrapped layer ``L``: ``delta = W_tuned - W_base`` reshaped to ``[out, in * k * k]``,
    ``delta ~ U_r S_r V_r^T``; ``lora_B = U_r S_r^(1/2) / scale``, ``lora_A = S_r^(1/2) V_r^T``.
    Returns the node (peft key format) and the relative Frobenius error
    ``||delta - delta_r|| / ||delta||`` over all wrapped layers together. Changes outside the
    wrapped layers (biases, norms) are not represented.
    """
    err2, tot2 = 0.0, 0.0
    with torch.no_grad():
        for name, layer in lora_layers(work):
            key = f"{name}.weight"
            delta = (tuned[key].double() - base_weights[key].double())
            a = layer.lora_A[ADAPTER].weight
            b = layer.lora_B[ADAPTER].weight
            r, scale = a.shape[0], layer.scaling[ADAPTER]
            u, s, vh = torch.linalg.svd(delta.reshape(delta.shape[0], -1), full_matrices=False)
            u, s, vh = u[:, :r], s[:r], vh[:r]
            if s.numel() < r:  # rank above min(out, in): pad with zero components
                pad = r - s.numel()
                u = torch.cat([u, u.new_zeros(u.shape[0], pad)], 1)
                vh = torch.cat([vh, vh.new_zeros(pad, vh.shape[1])], 0)
                s = torch.cat([s, s.new_zeros(pad)])
            root = s.sqrt()
            b.copy_(((u * root) / scale).reshape(b.shape).to(b.dtype))
            a.copy_((root[:, None] * vh).reshape(a.shape).to(a.dtype))
            approx = (u * s) @ vh
            err2 += float(((delta.reshape(approx.shape) - approx) ** 2).sum())
            tot2 += float((delta**2).sum())
    return lora_state(work), (err2 / tot2) ** 0.5 if tot2 > 0 else 0.0


def lora_numel(state: Mapping[str, Tensor]) -> int:
    return sum(v.numel() for v in state.values())
