"""Every score model as one callable: ``D(x_t, sigma, cond=None) -> x0``.

The convention is EDM / k-diffusion's: ``x_t = x0 + sigma * eps`` and ``D`` returns its estimate
of ``x0``; the score is ``(D(x_t, sigma) - x_t) / sigma**2``. Thin wrappers adapt other
parametrisations to it without copying the models:

- :class:`EDMPrecond`: a raw network ``F(c_in x, c_noise, cond)`` with EDM preconditioning
  (Karras et al. 2022, Eq. 7 and Table 1).
- :class:`DiffusersDenoiser`: a diffusers eps-, v- or x0-prediction model with its DDPM
  schedule (``alphas_cumprod``), in the variance-exploding frame ``x_t = x_vp / sqrt(abar)``.
- :class:`CFGDenoiser`: classifier-free guidance, for a teacher.
- :class:`OneStepGenerator`: ``G(z) = D(noise_scale * z, sigma_init)`` (``noise_scale = sigma_init``
  unless given), a one-step generator made from a copy of the teacher; :func:`first_step` is that
  first call, shared by every few-step sampler, and with ``sigma_init = inf`` it is
  ``D.from_noise(z)`` (a flow-matching model started from pure noise).
"""

from __future__ import annotations

import copy
import inspect
import math
import numbers
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

__all__ = [
    "Denoiser",
    "EDMPrecond",
    "DiffusersDenoiser",
    "CFGDenoiser",
    "OneStepGenerator",
    "check_start",
    "first_step",
    "first_noise",
    "timestep_generator",
    "make_generator",
    "trainable_copy",
    "freeze",
    "check_sample",
    "as_sigma",
    "pad_dims",
    "cat_cond",
    "map_cond",
    "flatten_cond",
    "unflatten_cond",
    "cond_rows",
    "PREDICTION_TYPES",
    "Unconditional",
    "check_denoiser",
    "takes_args",
]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@runtime_checkable
class Denoiser(Protocol):
    """Anything called as ``D(x_t, sigma, cond=None) -> x0`` with ``x_t = x0 + sigma * eps``."""

    def __call__(self, x: Tensor, sigma: Tensor, cond: Any = None) -> Tensor: ...


# ---------------------------------------------------------------------------------------------
# Argument checks shared by every wrapper and loss.


def check_sample(x: Any, name: str = "x") -> Tensor:
    """Return ``x`` if it is a floating tensor with a batch dimension; raise naming ``name``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.ndim < 2:
        raise ValueError(f"{name} must have shape [batch, ...] with at least 2 dimensions, got shape {tuple(x.shape)}")
    return x


def as_sigma(sigma: Any, x: Tensor, name: str = "sigma") -> Tensor:
    """Broadcast ``sigma`` (a number, a 0-d tensor or a ``[batch]`` tensor) to shape ``[batch]``.

    Raises ``ValueError`` naming ``name`` when a value is not finite or not > 0, or when the
    shape does not match the batch of ``x``.
    """
    batch = x.shape[0]
    if isinstance(sigma, Tensor) and sigma.device.type == "meta":
        raise ValueError(f"{name} is on the meta device (no data)")
    try:
        s = torch.as_tensor(sigma, device=x.device)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"{name} must be a number or a tensor of numbers, got {type(sigma).__name__}: {e}") from None
    if not s.is_floating_point():
        s = s.to(torch.float32)
    if s.ndim == 0:
        s = s.expand(batch)
    elif s.ndim > 1:
        # Accept [B, 1, 1, ...] as produced by EDM-style code.
        if s.shape[0] != batch or any(d != 1 for d in s.shape[1:]):
            raise ValueError(
                f"{name} must be a scalar or have shape [{batch}] (or [{batch}, 1, ...]), got shape {tuple(s.shape)}"
            )
        s = s.reshape(batch)
    elif s.shape[0] != batch:
        if s.shape[0] == 1:
            s = s.expand(batch)
        else:
            raise ValueError(f"{name} has {s.shape[0]} values but the batch has {batch} samples")
    if not torch.isfinite(s).all():
        raise ValueError(f"{name} must be finite, got {s.tolist()[:8]}")
    if (s <= 0).any():
        raise ValueError(f"{name} must be > 0, got min {s.min().item():.6g}")
    return s


def pad_dims(v: Tensor, x: Tensor) -> Tensor:
    """View a ``[batch]`` tensor as ``[batch, 1, ..., 1]`` so it broadcasts against ``x``."""
    return v.reshape(v.shape[0], *([1] * (x.ndim - 1)))


def cat_cond(a: Any, b: Any) -> Any:
    """Concatenate two conditionings along the batch: tensors, dicts of tensors, or ``None``."""
    if a is None and b is None:
        return None
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return torch.cat([a, b])
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        if set(a) != set(b):
            raise ValueError(f"conditioning dicts have different keys: {sorted(a)} vs {sorted(b)}")
        return {k: cat_cond(a[k], b[k]) for k in a}
    raise TypeError(f"cannot batch conditionings of types {type(a).__name__} and {type(b).__name__}")


def map_cond(fn: Any, cond: Any) -> Any:
    """Apply ``fn`` to every tensor of a conditioning: a tensor, a (nested) dict of tensors (SDXL's
    ``{"encoder_hidden_states": ..., "added_cond_kwargs": {"text_embeds": ..., "time_ids": ...}}``),
    or ``None``."""
    if cond is None:
        return None
    if isinstance(cond, Tensor):
        return fn(cond)
    if isinstance(cond, Mapping):
        return {k: map_cond(fn, v) for k, v in cond.items()}
    raise TypeError(f"a conditioning must be a tensor, a dict of tensors or None, got {type(cond).__name__}")


def flatten_cond(cond: Any, prefix: str = "cond") -> dict[str, Tensor]:
    """A conditioning as flat tensors: ``{prefix: t}`` for a tensor, ``{prefix.k1.k2: t}`` for dicts
    (keys may not contain "."); :func:`unflatten_cond` inverts it."""
    if cond is None:
        return {}
    if isinstance(cond, Tensor):
        return {prefix: cond}
    if not isinstance(cond, Mapping):
        raise TypeError(f"a conditioning must be a tensor, a dict of tensors or None, got {type(cond).__name__}")
    out: dict[str, Tensor] = {}
    for k, v in cond.items():
        if not isinstance(k, str) or not k or "." in k:
            raise ValueError(f"conditioning key {k!r} must be a non-empty string without '.'")
        out.update(flatten_cond(v, f"{prefix}.{k}"))
    return out


def unflatten_cond(tensors: Mapping[str, Tensor], prefix: str = "cond") -> Any:
    """The conditioning :func:`flatten_cond` flattened (None if there is none)."""
    if prefix in tensors:
        return tensors[prefix]
    out: dict[str, Any] = {}
    for key in sorted(k for k in tensors if k.startswith(prefix + ".")):
        node = out
        *path, leaf = key[len(prefix) + 1 :].split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[leaf] = tensors[key]
    return out or None


def cond_rows(cond: Any) -> set[int]:
    """The first-dimension sizes of a conditioning's tensors (0-d tensors count as 0)."""
    rows: set[int] = set()
    map_cond(lambda t: rows.add(int(t.shape[0]) if t.ndim else 0), cond)
    return rows


def freeze(module: nn.Module) -> nn.Module:
    """Turn off gradients for every parameter and switch to eval mode; returns ``module``.

    Gradients still flow *through* a frozen module with respect to its input (SiD needs that).
    """
    module.requires_grad_(False)
    module.eval()
    return module


# ---------------------------------------------------------------------------------------------
# EDM preconditioning.


class EDMPrecond(nn.Module):
    """EDM preconditioning (Karras et al. 2022, Eq. 7, Table 1) around a raw network.

    ``D(x, sigma) = c_skip x + c_out F(c_in x, c_noise, cond)`` with
    ``c_skip = sd^2 / (sigma^2 + sd^2)``, ``c_out = sigma sd / sqrt(sigma^2 + sd^2)``,
    ``c_in = 1 / sqrt(sigma^2 + sd^2)``, ``c_noise = ln(sigma) / 4``.

    ``net`` is any module called as ``net(x_in, c_noise, cond)`` with ``c_noise`` of shape
    ``[batch]``; preconditioning stays separate from the architecture.
    """

    def __init__(self, net: nn.Module, sigma_data: float = 0.5):
        super().__init__()
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
        self.net = net
        self.sigma_data = float(sigma_data)

    def forward(self, x: Tensor, sigma: Any, cond: Any = None) -> Tensor:
        check_sample(x, "x")
        s = as_sigma(sigma, x).to(torch.float32)
        sd = self.sigma_data
        c_skip = sd**2 / (s**2 + sd**2)
        c_out = s * sd / (s**2 + sd**2).sqrt()
        c_in = 1.0 / (s**2 + sd**2).sqrt()
        c_noise = s.log() / 4
        xf = x.to(torch.float32)
        f = self.net(pad_dims(c_in, x) * xf, c_noise, cond)
        if f.shape != x.shape:
            raise ValueError(f"net returned shape {tuple(f.shape)} for input shape {tuple(x.shape)}")
        return (pad_dims(c_skip, x) * xf + pad_dims(c_out, x) * f.to(torch.float32)).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# diffusers models with a DDPM schedule.


def _class_names(model: Any) -> set[str]:
    return {c.__name__ for c in type(model).__mro__}


def _has_cross_attention(model: nn.Module) -> bool:
    """Whether a diffusers UNet has a cross-attention layer (one that reads ``encoder_hidden_states``)."""
    return any(getattr(m, "is_cross_attention", False) is True for m in model.modules())


def _text_dim(config: Any) -> tuple[str, int] | None:
    """``(config field, width)`` a UNet2DConditionModel's ``encoder_hidden_states`` must have in its
    last dimension, or None where it is not one number (per-block widths, image projections)."""
    hid_type, hid_dim = getattr(config, "encoder_hid_dim_type", None), getattr(config, "encoder_hid_dim", None)
    if hid_type is None and hid_dim is None:
        field, want = "cross_attention_dim", getattr(config, "cross_attention_dim", None)
    elif hid_type in (None, "text_proj", "text_image_proj"):  # projected by encoder_hid_proj first
        field, want = "encoder_hid_dim", hid_dim
    else:
        return None
    if isinstance(want, (list, tuple)):
        want = want[0] if want and all(w == want[0] for w in want) else None
    return (field, int(want)) if isinstance(want, int) and not isinstance(want, bool) else None


def _rows(name: str, v: Tensor, batch: int) -> None:
    if v.ndim == 0 or v.shape[0] != batch:
        rows = "no batch dimension" if v.ndim == 0 else f"{v.shape[0]} rows"
        raise ValueError(f"{name} has {rows} (shape {tuple(v.shape)}) but the batch has {batch} samples")


def _check_class_labels(model: nn.Module, name: str, v: Any, batch: int) -> None:
    if not isinstance(v, Tensor):
        raise TypeError(f"{name} (class labels) must be a tensor, got {type(v).__name__}")
    table = getattr(model, "class_embedding", None)
    if not isinstance(table, nn.Embedding):  # timestep / identity / projection embeddings take floats
        _rows(name, v, batch)
        return
    n = int(getattr(model.config, "num_class_embeds", None) or table.num_embeddings)
    if v.is_floating_point() or v.is_complex() or v.dtype == torch.bool:
        raise TypeError(
            f"{name} (class labels) has dtype {v.dtype}, but the model's class embedding is a table of "
            f"config.num_class_embeds = {n} classes: pass integer labels in 0..{n - 1} (e.g. labels.long())"
        )
    if v.ndim != 1:
        raise ValueError(
            f"{name} (class labels) has shape {tuple(v.shape)}: expected [batch] = [{batch}], one label per sample"
        )
    _rows(f"{name} (class labels)", v, batch)
    if v.numel() and bool(((v < 0) | (v >= n)).any()):
        raise ValueError(
            f"{name} (class labels) holds values {int(v.min())}..{int(v.max())}, but the model's "
            f"config.num_class_embeds is {n}: expected integer labels in 0..{n - 1}"
        )


def _check_sdxl(model: nn.Module, name: str, v: Any, batch: int) -> None:
    """SDXL's ``added_cond_kwargs``: ``text_embeds [B, Dt]`` and ``time_ids [B, n]`` must give
    ``Dt + n * config.addition_time_embed_dim == config.projection_class_embeddings_input_dim`` (the
    input width of ``add_embedding``). Other ``addition_embed_type`` values (Kandinsky's image
    embeddings) are left to diffusers: their widths come from several config fields per type."""
    config: Any = getattr(model, "config", None)
    if not isinstance(v, Mapping):
        raise TypeError(
            f"{name} must be a dict {{'text_embeds': [batch, D], 'time_ids': [batch, 6]}} (the model's "
            f"config.addition_embed_type is 'text_time'), got {type(v).__name__}"
        )
    for key in ("text_embeds", "time_ids"):
        t = v.get(key)
        if not isinstance(t, Tensor):
            raise ValueError(
                f"{name} has no tensor {key!r}: the model's config.addition_embed_type is 'text_time' (SDXL), "
                "which needs {'text_embeds': [batch, D], 'time_ids': [batch, 6]}"
            )
        if t.ndim != 2:
            raise ValueError(f"{name}[{key!r}] has shape {tuple(t.shape)}: expected [batch, features]")
        _rows(f"{name}[{key!r}]", t, batch)
    text, ids = v["text_embeds"], v["time_ids"]
    per_id = getattr(config, "addition_time_embed_dim", None)
    want = getattr(config, "projection_class_embeddings_input_dim", None)
    if not isinstance(per_id, int) or not isinstance(want, int):
        return
    got = text.shape[-1] + ids.shape[-1] * per_id
    if got != want:
        raise ValueError(
            f"{name}: text_embeds {tuple(text.shape)} and time_ids {tuple(ids.shape)} give {text.shape[-1]} + "
            f"{ids.shape[-1]} x config.addition_time_embed_dim ({per_id}) = {got} features, but the model's "
            f"config.projection_class_embeddings_input_dim is {want}: expected text_embeds "
            f"[batch, {want - ids.shape[-1] * per_id}] beside these time_ids"
        )


def _unet_kind(model: Any) -> str | None:
    """``"condition"`` for a diffusers UNet2DConditionModel, ``"plain"`` for a UNet2DModel, else None."""
    classes = _class_names(model)
    if "UNet2DConditionModel" in classes:
        return "condition"
    return "plain" if "UNet2DModel" in classes else None


def _check_unet_cond(
    model: nn.Module, kwargs: Mapping[str, Any], batch: int, names: Mapping[str, str], text_ok: bool
) -> None:
    """Check a diffusers UNet's condition keywords against its config before the call (the model's
    own errors are matrix-shape mismatches deep inside it). ``names`` maps each keyword to what the
    user passed it as (``"cond"`` or ``"cond['key']"``); ``text_ok``: the model has cross-attention.
    A condition the model does not use (no class embedding, no cross-attention, no added embedding)
    is refused: diffusers would drop it silently or fail."""
    cls = type(model).__name__
    config: Any = getattr(model, "config", None)
    class_ok = getattr(model, "class_embedding", None) is not None
    added = getattr(config, "addition_embed_type", None)
    uses = {
        "encoder_hidden_states": text_ok or added in ("text", "text_image"),
        "class_labels": class_ok,
        "added_cond_kwargs": added is not None,
    }
    given = {k: v for k, v in kwargs.items() if k in uses and v is not None}
    unused = [k for k in given if not uses[k]]
    if unused:
        key = unused[0]
        if not any(uses.values()):
            raise ValueError(
                f"{names.get(key, key)} was given, but the model ({cls}) is unconditional: no class embedding "
                "(config.num_class_embeds and config.class_embed_type are None) and no cross-attention, so "
                "the condition would be dropped; pass cond=None, or wrap a conditional model"
            )
        what = {
            "encoder_hidden_states": "it has no cross-attention layer",
            "class_labels": "it has no class embedding (config.num_class_embeds and config.class_embed_type are None)",
            "added_cond_kwargs": "its config.addition_embed_type is None",
        }[key]
        raise ValueError(
            f"{names.get(key, key)} was given as {key!r}, but the model ({cls}) does not use {key!r}: {what}, "
            "so it would be dropped"
        )
    if text_ok:
        dim = _text_dim(config)
        v = given.get("encoder_hidden_states")
        if v is None:
            shape = f"[batch, tokens, {dim[1]}]" if dim else "[batch, tokens, dim]"
            where = "as cond" if names.get("encoder_hidden_states") == "cond" else "in a dict cond"
            raise ValueError(
                f"the model ({cls}) has cross-attention: pass its text condition (encoder_hidden_states) "
                f"{shape} {where}"
            )
        name = names.get("encoder_hidden_states", "encoder_hidden_states")
        if not isinstance(v, Tensor):
            raise TypeError(f"{name} (the text condition) must be a tensor, got {type(v).__name__}")
        if dim is not None and (v.ndim != 3 or v.shape[-1] != dim[1]):
            raise ValueError(
                f"{name} has shape {tuple(v.shape)}, but the model's config.{dim[0]} is {dim[1]}: "
                f"expected [batch, tokens, {dim[1]}]"
            )
        _rows(name, v, batch)
    if class_ok:
        if "class_labels" not in given:
            n = getattr(config, "num_class_embeds", None)
            what = f"config.num_class_embeds = {n}" if n else f"config.class_embed_type = {config.class_embed_type!r}"
            where = (
                "as cond"
                if names.get("class_labels") == "cond" or not text_ok
                else "in a dict cond, under 'class_labels'"
            )
            raise ValueError(f"the model ({cls}) is class-conditional ({what}): pass its class labels [batch] {where}")
        _check_class_labels(model, names.get("class_labels", "class_labels"), given["class_labels"], batch)
    if added == "text_time":
        v = given.get("added_cond_kwargs")
        if v is None:
            raise ValueError(
                f"the model ({cls}) has config.addition_embed_type 'text_time' (SDXL): pass cond as a dict with "
                "'added_cond_kwargs': {'text_embeds': [batch, D], 'time_ids': [batch, 6]}"
            )
        _check_sdxl(model, names.get("added_cond_kwargs", "added_cond_kwargs"), v, batch)


def _unet_cond_kwarg(model: nn.Module) -> str:
    """Which keyword a tensor conditioning goes to for a diffusers UNet."""
    try:
        from diffusers import UNet2DConditionModel, UNet2DModel
    except ImportError:  # pragma: no cover - diffusers is a dependency
        return "class_labels"
    if isinstance(model, UNet2DConditionModel):
        return "encoder_hidden_states"
    if isinstance(model, UNet2DModel):
        return "class_labels"
    return "encoder_hidden_states" if hasattr(getattr(model, "config", None), "cross_attention_dim") else "class_labels"


class DiffusersDenoiser(nn.Module):
    """A diffusers model (``UNet2DModel``, ``UNet2DConditionModel`` or alike) as ``D(x_t, sigma, cond)``.

    The model was trained on ``x_vp = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` at integer
    timesteps ``t``. With ``sigma_t = sqrt((1 - abar_t) / abar_t)`` and ``x_t = x_vp / sqrt(abar_t)``
    (so ``x_t = x0 + sigma_t eps``), the wrapper returns

    - ``epsilon``:      ``D = x_t - sigma * eps_hat``
    - ``v_prediction``: ``D = x_t / (1 + sigma^2) - sigma / sqrt(1 + sigma^2) * v_hat``
    - ``sample``:       ``D = x0_hat``

    computed in float64 (``1 / sqrt(abar)`` reaches ~150 at t = 999 of the linear schedule).
    A sigma maps to a timestep by interpolating ``log sigma_t`` (``timestep="interp"``, a
    fractional timestep as in k-diffusion) or to the nearest one (``"nearest"``). A sigma outside
    the schedule's range is an error unless ``clamp=True``.

    Args:
        model: the diffusers model; its output's first element (or ``.sample``) is the prediction.
        alphas_cumprod: the training schedule's ``abar_t``, shape ``[T]``; or pass ``scheduler``.
        prediction_type: one of ``epsilon``, ``v_prediction``, ``sample``. Required unless the
            scheduler's config declares it (there is no silent default).
        cond_kwarg: the model keyword a tensor ``cond`` goes to; by default
            ``encoder_hidden_states`` for ``UNet2DConditionModel`` and ``class_labels`` otherwise.
            A dict ``cond`` is passed as keyword arguments.
    """

    log_sigmas: Tensor  # buffer [T], float64: log sigma_t of each integer timestep

    def __init__(
        self,
        model: nn.Module,
        alphas_cumprod: Tensor | None = None,
        prediction_type: str | None = None,
        *,
        scheduler: Any = None,
        timestep: str = "interp",
        clamp: bool = False,
        cond_kwarg: str | None = None,
    ):
        super().__init__()
        if alphas_cumprod is None:
            if scheduler is None:
                raise ValueError("pass alphas_cumprod or scheduler")
            if not hasattr(scheduler, "alphas_cumprod"):
                flow = type(scheduler).__name__.startswith("FlowMatch")
                raise ValueError(
                    f"scheduler {type(scheduler).__name__} has no alphas_cumprod; "
                    + (
                        "it is a flow-matching scheduler: wrap the model with disback_core.FlowMatchDenoiser(model, scheduler)"
                        if flow
                        else "pass a DDPM-family scheduler or alphas_cumprod directly"
                    )
                )
            alphas_cumprod = torch.as_tensor(scheduler.alphas_cumprod)
        if prediction_type is None and scheduler is not None:
            prediction_type = getattr(getattr(scheduler, "config", None), "prediction_type", None)
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be declared as one of {PREDICTION_TYPES}, got {prediction_type!r}")
        if timestep not in ("interp", "nearest"):
            raise ValueError(f"timestep must be 'interp' or 'nearest', got {timestep!r}")
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
        if ac.numel() < 2 or not torch.isfinite(ac).all() or (ac <= 0).any() or (ac >= 1).any():
            raise ValueError("alphas_cumprod must hold at least 2 values, each in (0, 1)")
        sig = ((1 - ac) / ac).sqrt()
        if not (sig[1:] > sig[:-1]).all():
            raise ValueError("alphas_cumprod must be strictly decreasing in t")
        self.model = model
        self.prediction_type = prediction_type
        self.timestep = timestep
        self.clamp = clamp
        self.cond_kwarg = cond_kwarg or _unet_cond_kwarg(model)
        # diffusers UNets: the condition is checked against the config at each call (_check_unet_cond)
        self._unet = _unet_kind(model)
        self._cross_attention = self._unet == "condition" and _has_cross_attention(model)
        self.register_buffer("log_sigmas", sig.log(), persistent=False)

    @property
    def sigma_min(self) -> float:
        return float(self.log_sigmas[0].exp())

    @property
    def sigma_max(self) -> float:
        return float(self.log_sigmas[-1].exp())

    def t_to_sigma(self, t: Tensor) -> Tensor:
        """Sigma of (possibly fractional) timesteps, by interpolation of ``log sigma_t``; float64."""
        t = torch.as_tensor(t, dtype=torch.float64, device=self.log_sigmas.device)
        lo = t.floor().long().clamp(0, len(self.log_sigmas) - 1)
        hi = (lo + 1).clamp(max=len(self.log_sigmas) - 1)
        w = t - lo.to(torch.float64)
        return ((1 - w) * self.log_sigmas[lo] + w * self.log_sigmas[hi]).exp()

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """Timestep of each sigma (float64): interpolated in ``log sigma`` or the nearest one."""
        ls = torch.as_tensor(sigma, dtype=torch.float64, device=self.log_sigmas.device).log()
        lmin, lmax = self.log_sigmas[0], self.log_sigmas[-1]
        tol = 1e-6
        if not self.clamp and ((ls < lmin - tol).any() or (ls > lmax + tol).any()):
            raise ValueError(
                f"sigma outside the schedule's range [{self.sigma_min:.6g}, {self.sigma_max:.6g}]: "
                f"got min {ls.min().exp().item():.6g}, max {ls.max().exp().item():.6g}; "
                "pass clamp=True to use the nearest end of the schedule"
            )
        ls = ls.clamp(lmin, lmax)
        if self.timestep == "nearest":
            return (ls[:, None] - self.log_sigmas[None]).abs().argmin(dim=1).to(torch.float64)
        idx = torch.searchsorted(self.log_sigmas, ls.contiguous()).clamp(1, len(self.log_sigmas) - 1)
        lo, hi = self.log_sigmas[idx - 1], self.log_sigmas[idx]
        return (idx - 1).to(torch.float64) + (ls - lo) / (hi - lo)

    def _call_model(self, x_in: Tensor, t: Tensor, cond: Any) -> Tensor:
        kwargs: dict[str, Any] = {}
        names: dict[str, str] = {self.cond_kwarg: "cond"}
        if isinstance(cond, Mapping):
            kwargs.update(cond)
            names = {k: f"cond[{k!r}]" for k in cond}
        elif cond is not None:
            kwargs[self.cond_kwarg] = cond
        if self._unet is not None:
            _check_unet_cond(self.model, kwargs, x_in.shape[0], names, self._cross_attention)
        if self._unet == "condition":
            kwargs.setdefault("encoder_hidden_states", None)  # a positional argument, unused without cross-attention
        out = self.model(x_in, t, return_dict=False, **kwargs)
        return out[0] if isinstance(out, (tuple, list)) else getattr(out, "sample", out)

    def forward(self, x: Tensor, sigma: Any, cond: Any = None) -> Tensor:
        check_sample(x, "x")
        s64 = as_sigma(sigma, x).to(torch.float64)
        t = self.sigma_to_t(s64)
        if self.timestep == "nearest":
            t_model = t.long()
        else:
            t_model = t.to(torch.float32)
        x64 = x.to(torch.float64)
        s = pad_dims(s64, x)
        c_in = 1.0 / (1.0 + s**2).sqrt()  # = sqrt(abar): x_vp = sqrt(abar) * x_t
        dtype = next(iter(self.model.parameters()), x).dtype
        pred = self._call_model((c_in * x64).to(dtype), t_model, cond).to(torch.float64)
        if pred.shape != x.shape:
            raise ValueError(f"model returned shape {tuple(pred.shape)} for input shape {tuple(x.shape)}")
        if self.prediction_type == "epsilon":
            d = x64 - s * pred
        elif self.prediction_type == "v_prediction":
            d = x64 * c_in**2 - s * c_in * pred
        else:
            d = pred
        return d.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Guidance and generators.


class CFGDenoiser(nn.Module):
    """Classifier-free guidance: ``D = D(x, s, uncond) + scale * (D(x, s, cond) - D(x, s, uncond))``.

    Equal to guidance on eps (``eps_u + w (eps_c - eps_u)``) because ``D = x - sigma eps`` is
    affine in eps. Both branches run as one batch. Meant for the teacher (DMD2 guides the
    teacher only, never the fake score). ``uncond`` is the unconditional input for one sample
    (e.g. the null class label or the empty-prompt embedding) and is broadcast to the batch.

    Checked here, not at the first call: ``denoiser`` callable as ``D(x, sigma, cond)``, ``scale``
    a finite real number (not a bool), ``uncond`` a tensor or a (nested) dict of tensors.
    """

    def __init__(self, denoiser: nn.Module, scale: float, uncond: Any):
        super().__init__()
        check_denoiser(denoiser, "denoiser")
        self.denoiser = denoiser
        self.scale = _real(scale, "scale")
        self.uncond = _check_uncond(uncond, "uncond")

    def _uncond_like(self, cond: Any) -> Any:
        return _uncond_like(self.uncond, cond, "uncond")

    def forward(self, x: Tensor, sigma: Any, cond: Any = None) -> Tensor:
        check_sample(x, "x")
        if cond is None:
            raise ValueError("CFGDenoiser needs cond (the conditional input); got None")
        s = as_sigma(sigma, x)
        both = self.denoiser(torch.cat([x, x]), torch.cat([s, s]), cat_cond(self._uncond_like(cond), cond))
        d_u, d_c = both.chunk(2)
        return d_u + self.scale * (d_c - d_u)


def _real(v: Any, name: str) -> float:
    """``v`` as a float if it is a finite real number (a bool, string or multi-element tensor is refused)."""
    if isinstance(v, Tensor) and v.numel() == 1 and not v.dtype.is_complex and v.dtype != torch.bool:
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(v).__name__}: {v!r}"[:200])
    f = float(v)
    if not math.isfinite(f):
        raise ValueError(f"{name} must be finite, got {f}")
    return f


_UNCOND = "the null condition for one sample, e.g. the null class label or the empty-prompt embedding"


def _check_uncond(u: Any, name: str) -> Any:
    """A CFG ``uncond``: a tensor or a non-empty (nested) dict of tensors; returned unchanged."""
    if isinstance(u, Mapping):
        if not u:
            raise ValueError(f"{name} is an empty dict; it must be {_UNCOND} (a dict cond's uncond has its keys)")
        for k, v in u.items():
            _check_uncond(v, f"{name}[{k!r}]")
        return u
    if isinstance(u, int) and not isinstance(u, bool):  # a null class label given as a plain int
        return torch.tensor(u)
    if not isinstance(u, Tensor):
        raise TypeError(
            f"{name} must be {_UNCOND}: an int class label, a tensor (e.g. torch.tensor(1000) or text_encoder(['']) [tokens, dim]) "
            f"or a dict of tensors for a dict cond; got {type(u).__name__}"
        )
    return u


def _uncond_like(u: Any, cond: Any, name: str) -> Any:
    """``u`` broadcast to ``cond``'s batch, key by key for (nested) dict conditionings."""
    if isinstance(cond, Mapping):
        if not isinstance(u, Mapping) or set(u) != set(cond):
            raise TypeError(
                f"cond is a dict with keys {sorted(cond)}, so {name} must be a dict with the same keys, "
                f"got {sorted(u) if isinstance(u, Mapping) else type(u).__name__}"
            )
        return {k: _uncond_like(u[k], cond[k], f"{name}[{k!r}]") for k in cond}
    return _broadcast_like(u, cond, name)


def _broadcast_like(u: Any, c: Any, name: str) -> Tensor:
    u = torch.as_tensor(u, device=c.device, dtype=c.dtype)
    if u.shape == c.shape:
        return u
    if u.shape == c.shape[1:] or (u.ndim == c.ndim and u.shape[0] == 1):
        return u.expand_as(c) if u.ndim == c.ndim else u.unsqueeze(0).expand_as(c)
    raise ValueError(f"{name} of shape {tuple(u.shape)} does not match cond of shape {tuple(c.shape)}")


def check_start(denoiser: Any, sigma0: float, noise_scale: float | None = None, *, name: str = "sigma_init") -> float:
    """Check a student's first noise level and return the scale its noise ``z`` is multiplied by.

    ``sigma0`` (named ``name`` in errors) must be > 0 and finite, or ``math.inf`` for a start from
    pure noise, which needs a ``denoiser`` with a callable ``from_noise(z, cond)`` (the x0 prediction
    at flow time t = 1, sigma = inf in the library's VE frame). ``noise_scale`` must be finite and
    > 0 when given; the returned scale is ``noise_scale``, ``sigma0`` when it is None, and 1.0 at
    ``sigma0 = inf``, where no scale applies (:func:`first_step` calls ``from_noise(z)``) and a given
    ``noise_scale`` is ignored.
    """
    s0 = _number(sigma0, name)
    ns = None if noise_scale is None else _number(noise_scale, "noise_scale")
    if ns is not None and not (math.isfinite(ns) and ns > 0):
        raise ValueError(f"noise_scale must be finite and > 0, got {noise_scale}")
    if s0 == math.inf:
        _from_noise(denoiser, name)
        return 1.0
    if not (math.isfinite(s0) and s0 > 0):
        raise ValueError(f"{name} must be finite and > 0 (or math.inf with a from_noise denoiser), got {sigma0}")
    return s0 if ns is None else ns


def _number(v: Any, name: str) -> float:
    if isinstance(v, (bool, str, bytes)):
        raise TypeError(f"{name} must be a number, got {type(v).__name__}")
    try:
        return float(v)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name} must be a number, got {type(v).__name__}") from None


def _from_noise(denoiser: Any, name: str = "sigma_init") -> Any:
    fn = getattr(denoiser, "from_noise", None)
    if not callable(fn):
        raise ValueError(
            f"{name} is inf (a start from pure noise), but the denoiser {type(denoiser).__name__} cannot start "
            "from pure noise: it has no from_noise(z, cond) method (a flow-matching denoiser has one); "
            "use a finite sigma"
        )
    return fn


def first_step(denoiser: Any, z: Tensor, sigma0: float, noise_scale: float, cond: Any = None) -> Tensor:
    """A student's first call, the x0 from its noise ``z``: ``D(noise_scale * z, sigma0, cond)``, or
    ``D.from_noise(z, cond)`` at ``sigma0 = inf`` (``noise_scale`` unused there).

    Every student starts here: :class:`OneStepGenerator`, :class:`~disback_core.fewstep.MultiStepGenerator`,
    :func:`~disback_core.fewstep.sample_fewstep` and :func:`~disback_core.guidance.distillation_pp_sample`;
    ``noise_scale`` is the one :func:`check_start` returned.
    """
    if sigma0 == math.inf:
        return _from_noise(denoiser)(z, cond)
    # sigma as a [batch] float32 tensor: NVlabs' EDMPrecond calls sigma.to(...), a float would fail
    sigma = torch.full((z.shape[0],), sigma0, device=z.device, dtype=torch.float32)
    return denoiser(noise_scale * z, sigma, cond)


def first_noise(z: Tensor, x0: Tensor, sigma0: float, noise_scale: float) -> Tensor:
    """The noise the first step implies, ``eps = (x - x0) / sigma0`` with the real first input
    ``x = noise_scale * z``: the deterministic (DDIM-style) sampler continues with
    ``x_1 = x0 + sigma_1 eps``.

    At ``sigma0 = inf`` it is ``z``: the limit of ``(noise_scale z - x0) / sigma0`` as ``sigma0 -> inf``
    with ``noise_scale / sigma0 -> 1`` (VE: ``noise_scale = sigma``; VP seen in the VE frame:
    ``sqrt(1 + sigma^2)``; flow matching: ``1 + sigma``, since ``x_VE = x_flow / (1 - t)`` and
    ``sigma = t / (1 - t)``) and ``x0`` bounded, so ``x0 / sigma0 -> 0``.
    """
    if sigma0 == math.inf:
        return z
    return (noise_scale * z - x0) / sigma0


class OneStepGenerator(nn.Module):
    """A one-step generator ``G(z, cond) = D(noise_scale * z, sigma_init, cond)``, ``noise_scale =
    sigma_init`` unless given (the call is :func:`first_step`).

    Initialised from a copy of the teacher, it starts as the teacher's one-step denoise from pure
    noise (DMD2-EDM and GDD use ``sigma_init = 80``, SiD 2.5, Diff-Instruct small values).

    Args:
        denoiser: the trainable ``D(x_t, sigma, cond)``.
        sigma_init: the noise level of the call, > 0 and finite; or ``math.inf`` for a flow-matching
            denoiser with ``from_noise(z, cond)`` (flow time t = 1): then ``G(z) = D.from_noise(z, cond)``.
        noise_scale: keyword-only, what ``z`` is multiplied by: ``sigma_init`` by default (``x_t =
            sigma z``, the EDM convention), ``sqrt(1 + sigma^2)`` for a DMD2-style diffusers
            generator fed raw noise at a fixed timestep (:func:`timestep_generator`). Ignored (stored
            as 1.0) at ``sigma_init = inf``.
    """

    def __init__(self, denoiser: nn.Module, sigma_init: float, *, noise_scale: float | None = None):
        super().__init__()
        self.noise_scale = check_start(denoiser, sigma_init, noise_scale, name="sigma_init")
        self.denoiser = denoiser
        self.sigma_init = float(sigma_init)

    def forward(self, z: Tensor, cond: Any = None) -> Tensor:
        check_sample(z, "z")
        return first_step(self.denoiser, z, self.sigma_init, self.noise_scale, cond)


def timestep_generator(
    model: nn.Module,
    timestep: float,
    alphas_cumprod: Tensor | None = None,
    prediction_type: str | None = None,
    *,
    scheduler: Any = None,
) -> OneStepGenerator:
    """A diffusers model used DMD2-style as a one-step generator: ``unet(z, timestep)`` on raw noise
    ``z`` at one fixed timestep, its x0 the sample (DMD2's and DisBack's SDXL generators: 399; DMD2's
    SD-1.5: 999). In the library's convention that is ``D(sqrt(1 + sigma^2) z, sigma)`` with
    ``sigma = sigma_t``, since ``x_t = x_vp / sqrt(abar_t)``; the schedule is passed as to
    :class:`DiffusersDenoiser`."""
    d = DiffusersDenoiser(model, alphas_cumprod, prediction_type, scheduler=scheduler)
    last = len(d.log_sigmas) - 1
    if isinstance(timestep, bool) or not isinstance(timestep, (int, float)) or not 0 <= timestep <= last:
        raise ValueError(f"timestep must be a number in the schedule's 0..{last}, got {timestep!r}")
    sigma = float(d.t_to_sigma(torch.tensor([float(timestep)]))[0])
    return OneStepGenerator(d, sigma, noise_scale=math.sqrt(1.0 + sigma * sigma))


def takes_args(fn: Any, n: int) -> bool:
    """Whether ``fn`` (a function or a module's ``forward``) accepts ``n`` positional arguments."""
    target = fn.forward if isinstance(fn, nn.Module) else fn
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):  # builtins without a signature: assume they do
        return True
    try:
        sig.bind(*([None] * n))
    except TypeError:
        return False
    return True


def check_denoiser(net: Any, name: str) -> Any:
    """Refuse, at once and with what to pass, a ``net`` that cannot be called as ``D(x_t, sigma, cond)``."""
    if not callable(net):
        raise TypeError(f"{name} must be a denoiser called as D(x_t, sigma, cond) -> x0, got {type(net).__name__}")
    raw = _raw_diffusers_wrapper(net)
    if raw is not None:
        raise TypeError(
            f"{name} is a raw diffusers {type(net).__name__}, called (sample, timestep, ...) in its own units; "
            f"the library calls D(x_t, sigma, cond) -> x0: wrap it, {raw}"
        )
    if not takes_args(net, 3):
        if takes_args(net, 2):
            raise TypeError(
                f"{name} ({type(net).__name__}) takes (x, sigma) but the library calls D(x_t, sigma, cond); "
                f"wrap it: disback_core.Unconditional({name})"
            )
        raise TypeError(f"{name} ({type(net).__name__}) cannot be called as D(x_t, sigma, cond) -> x0")
    return net


def _raw_diffusers_wrapper(net: Any) -> str | None:
    """The wrapper to use when ``net`` is a raw diffusers model (by class name), else ``None``."""
    for cls in type(net).__mro__:
        if cls.__name__ in (
            "SD3Transformer2DModel",
            "FluxTransformer2DModel",
            "SanaTransformer2DModel",
            "WanTransformer3DModel",
        ):
            return "disback_core.FlowMatchDenoiser(model, scheduler)"
        if cls.__name__ in ("UNet2DModel", "UNet2DConditionModel"):
            return "disback_core.DiffusersDenoiser(model, scheduler=ddpm_scheduler)"
    return None


class Unconditional(nn.Module):
    """A 2-argument network ``D(x, sigma)`` under the library's ``D(x, sigma, cond)`` call; a
    ``cond`` other than None is an error (it would be dropped silently otherwise)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: Tensor, sigma: Any, cond: Any = None) -> Tensor:
        if cond is not None:
            raise ValueError(f"{type(self.net).__name__} is unconditional (D(x, sigma)); got a cond")
        return self.net(x, sigma)


def trainable_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` with every parameter trainable, in train mode (e.g. the fake score)."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"expected a torch.nn.Module (the teacher), got {type(module).__name__}")
    m = copy.deepcopy(module)
    m.requires_grad_(True)
    m.train()
    return m


def make_generator(teacher: nn.Module, sigma_init: float) -> OneStepGenerator:
    """A trainable :class:`OneStepGenerator` from a deep copy of ``teacher`` (which is untouched)."""
    return OneStepGenerator(trainable_copy(teacher), sigma_init)
