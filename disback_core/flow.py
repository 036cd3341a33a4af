"""Flow-matching transformers (SD3/3.5, FLUX, SANA, Wan) as ``D(x_t, sigma, cond) -> x0``.

A rectified-flow model is trained on ``x_t = (1 - t) x0 + t eps`` to predict the velocity
``v = eps - x0`` (Esser et al. 2024, SD3, Eq. 1-3; Liu et al. 2023). Dividing by ``1 - t`` gives
the library's variance-exploding frame ``x = x0 + sigma eps`` exactly, with

    sigma = t / (1 - t),   t = sigma / (1 + sigma),   x_flow = x / (1 + sigma),

and the model's own x0 is ``x0 = x_flow - t v`` (also diffusers' Euler step to ``t = 0``).
:class:`FlowMatchDenoiser` does that conversion in float64 around one keyword call of the model.
``t = 1`` (pure noise) is ``sigma = inf``: :meth:`FlowMatchDenoiser.from_noise` evaluates it
exactly, and generators whose first noise level is ``math.inf`` start there (their input is then
exactly the noise ``z``).

Timestep shift. Every shift diffusers' flow schedulers apply is a *constant factor on sigma*:
SD3's static ``t' = s t / (1 + (s - 1) t)`` is ``sigma' = s sigma``; FLUX's resolution-dependent
exponential shift ``t' = e^mu / (e^mu + (1/t - 1))`` is ``sigma' = e^mu sigma``; the linear one is
``sigma' = mu sigma``. So a shifted schedule is :func:`flow_sigmas` with ``shift``, and a shifted
noise distribution is a sampler of :mod:`disback_core.sigmas` (:class:`~disback_core.sigmas.
LogitNormalSigma`, :class:`~disback_core.sigmas.UniformTimeSigma`) with ``shift``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .checks import check_number
from .denoisers import OneStepGenerator, as_sigma, check_sample, pad_dims, trainable_copy

__all__ = [
    "FlowMatchDenoiser",
    "FlowArch",
    "FLOW_ARCHS",
    "flow_arch",
    "is_flow_scheduler",
    "flow_sigmas",
    "flow_shift",
    "flux_mu",
    "pack_latents",
    "unpack_latents",
    "flux_image_ids",
    "sigma_to_t",
    "t_to_sigma",
    "flow_generator",
    "make_flow_generator",
]


def sigma_to_t(sigma: Tensor) -> Tensor:
    """Flow time of a VE noise level, ``t = sigma / (1 + sigma)`` (``inf`` maps to 1)."""
    return torch.where(torch.isinf(sigma), torch.ones_like(sigma), sigma / (1 + sigma))


def t_to_sigma(t: Tensor) -> Tensor:
    """VE noise level of a flow time, ``sigma = t / (1 - t)`` (``t = 1`` maps to ``inf``)."""
    return t / (1 - t)


@dataclass(frozen=True)
class FlowArch:
    """How one diffusers transformer class is called (its ``forward`` keywords and units).

    Attributes:
        name: short name (``"sd3"``, ``"flux"``, ``"sana"``, ``"wan"``).
        time_scale: the model's ``timestep`` is ``time_scale * t`` (SD3, SANA, Wan: 1000, their
            pipelines pass the scheduler's 0..1000 timesteps; FLUX: 1, its pipeline passes
            ``timestep / 1000`` and the model multiplies by 1000 inside).
        tensor_cond: the keyword a tensor ``cond`` goes to.
        required: keywords the model cannot run without (in ``cond`` or ``extras``).
        cond_dims: ``(keyword, config field)``: the keyword's last dimension must equal the field.
        sample_ndim: the sample's number of dimensions (FLUX also takes 4-D latents, packed 2x2).
        channels_field: the config field the sample's channels must equal.
    """

    name: str
    time_scale: float
    tensor_cond: str
    required: tuple[str, ...]
    cond_dims: tuple[tuple[str, str], ...]
    sample_ndim: int
    channels_field: str = "in_channels"


FLOW_ARCHS: dict[str, FlowArch] = {
    "SD3Transformer2DModel": FlowArch(
        "sd3",
        1000.0,
        "encoder_hidden_states",
        ("encoder_hidden_states", "pooled_projections"),
        (("encoder_hidden_states", "joint_attention_dim"), ("pooled_projections", "pooled_projection_dim")),
        4,
    ),
    "FluxTransformer2DModel": FlowArch(
        "flux",
        1.0,
        "encoder_hidden_states",
        ("encoder_hidden_states", "pooled_projections"),
        (("encoder_hidden_states", "joint_attention_dim"), ("pooled_projections", "pooled_projection_dim")),
        3,
    ),
    "SanaTransformer2DModel": FlowArch(
        "sana",
        1000.0,
        "encoder_hidden_states",
        ("encoder_hidden_states",),
        (("encoder_hidden_states", "caption_channels"),),
        4,
    ),
    "WanTransformer3DModel": FlowArch(
        "wan", 1000.0, "encoder_hidden_states", ("encoder_hidden_states",), (("encoder_hidden_states", "text_dim"),), 5
    ),
}


def flow_arch(model: nn.Module) -> FlowArch | None:
    """The :class:`FlowArch` of a diffusers transformer, by class (or a subclass), else ``None``."""
    for cls in type(model).__mro__:
        if cls.__name__ in FLOW_ARCHS:
            return FLOW_ARCHS[cls.__name__]
    return None


def is_flow_scheduler(scheduler: Any) -> bool:
    """Whether ``scheduler`` is a diffusers flow-matching scheduler (``FlowMatch*``; no ``alphas_cumprod``)."""
    return type(scheduler).__name__.startswith("FlowMatch") and not hasattr(scheduler, "alphas_cumprod")


def flux_mu(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """FLUX's resolution-dependent shift parameter: ``mu`` linear in the number of image tokens,
    ``base_shift`` at ``base_seq_len``, ``max_shift`` at ``max_seq_len`` (diffusers' ``calculate_shift``)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + base_shift - m * base_seq_len


def flow_shift(shift: float | None = None, *, mu: float | None = None, time_shift_type: str = "exponential") -> float:
    """The factor a flow timestep shift multiplies sigma by: ``shift`` (SD3's static shift), or
    ``e^mu`` (``time_shift_type="exponential"``, FLUX) / ``mu`` (``"linear"``) for a dynamic one.
    Exact for diffusers' shifts with exponent 1 (see the module docstring)."""
    if (shift is None) == (mu is None):
        raise ValueError("pass exactly one of shift (static) and mu (dynamic)")
    if shift is not None:
        return check_number("shift", shift, low=0.0, low_open=True)
    m = check_number("mu", mu)
    if time_shift_type == "exponential":
        return math.exp(m)
    if time_shift_type == "linear":
        return check_number("mu", m, low=0.0, low_open=True)
    raise ValueError(f"time_shift_type must be 'exponential' or 'linear', got {time_shift_type!r}")


def flow_sigmas(steps: int, *, shift: float = 1.0, t_max: float = 1.0) -> tuple[float, ...]:
    """``steps`` flow timesteps uniform from ``t_max`` down (without the end at 0), shifted, as sigmas.

    ``t_i = t_max (1 - i / K)``, ``sigma_i = shift * t_i / (1 - t_i)``; ``t_max = 1`` makes the first
    sigma ``math.inf`` (the generator's input is exactly the noise). ``K = 4`` gives the flow
    analogue of DMD2's ``999, 749, 499, 249``: ``t = 1, 0.75, 0.5, 0.25``.
    """
    if not (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1):
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    check_number("t_max", t_max, low=0.0, high=1.0, low_open=True)
    check_number("shift", shift, low=0.0, low_open=True)
    out = []
    for i in range(steps):
        t = t_max * (1 - i / steps)
        out.append(math.inf if t >= 1.0 else shift * t / (1 - t))
    return tuple(out)


def pack_latents(x: Tensor) -> Tensor:
    """FLUX's 2x2 packing: ``[B, C, H, W] -> [B, (H/2)(W/2), 4C]`` (diffusers' ``_pack_latents``)."""
    b, c, h, w = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"FLUX latents need an even height and width to pack 2x2, got shape {tuple(x.shape)}")
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: Tensor, height: int, width: int) -> Tensor:
    """The inverse of :func:`pack_latents` for latents of ``height x width``."""
    b, n, c4 = tokens.shape
    x = tokens.view(b, height // 2, width // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, height, width)


def flux_image_ids(height: int, width: int, device: Any = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """FLUX's image position ids for packed ``height x width`` latents: ``[(H/2)(W/2), 3]`` rows ``(0, i, j)``."""
    h, w = height // 2, width // 2
    ids = torch.zeros(h, w, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(h, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(w, device=device, dtype=dtype)[None, :]
    return ids.reshape(h * w, 3)


_KNOWN = ", ".join(FLOW_ARCHS)


class FlowMatchDenoiser(nn.Module):
    """A velocity-predicting flow-matching model as ``D(x, sigma, cond) -> x0`` (exact; float64).

    ``D(x, sigma) = x_flow - t v(x_flow, t)`` with ``t = sigma / (1 + sigma)`` and ``x_flow = x / (1 +
    sigma)``. The model is called by keyword (``hidden_states``, ``timestep`` and the condition's
    keywords), its first output taken as ``v``.

    - SD3 / SD3.5: ``cond = {"encoder_hidden_states": [B, T, joint_attention_dim],
      "pooled_projections": [B, pooled_projection_dim]}``; ``timestep = 1000 t``.
    - FLUX: 4-D latents ``[B, C, H, W]`` are packed 2x2 for the model and unpacked after (or pass packed
      ``[B, N, 4C]`` tokens with ``extras={"img_ids": ...}``); ``img_ids``/``txt_ids`` are made when not
      given; ``guidance=3.5`` for guidance-distilled (``guidance_embeds``) models; ``timestep = t``.
    - SANA: ``cond = [B, T, caption_channels]`` (or a dict with ``encoder_attention_mask``);
      ``timestep = 1000 t * config.timestep_scale``.
    - Wan 2.x: 5-D video latents ``[B, C, F, H, W]``, ``cond = [B, T, text_dim]``; ``timestep = 1000 t``.

    Args:
        model: the transformer (any of :data:`FLOW_ARCHS`, or another velocity model with
            ``time_scale`` and ``cond_kwarg`` given).
        scheduler: a diffusers flow scheduler (``FlowMatchEulerDiscreteScheduler``); its ``shift`` and
            dynamic-shift settings become :meth:`shift_factor`'s. A DDPM-family scheduler is refused.
        shift: the static timestep shift (SD3: 3.0) when no scheduler is given; default 1.
        dynamic_shift: FLUX's resolution-dependent shift instead of a static one: ``{"base_shift":
            0.5, "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096,
            "time_shift_type": "exponential"}`` (any subset).
        time_scale: the model's timestep per unit of flow time (default from the architecture).
        cond_kwarg: where a tensor ``cond`` goes (default from the architecture).
        guidance: FLUX's embedded guidance scale, required when the model has ``guidance_embeds``.
        extras: batch-independent keyword arguments passed on every call (ids, attention kwargs).
    """

    def __init__(
        self,
        model: nn.Module,
        scheduler: Any = None,
        *,
        shift: float | None = None,
        dynamic_shift: Mapping[str, Any] | None = None,
        time_scale: float | None = None,
        cond_kwarg: str | None = None,
        guidance: float | None = None,
        extras: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module (the flow transformer), got {type(model).__name__}")
        self.model = model
        self.arch = flow_arch(model)
        config = getattr(model, "config", None)
        if self.arch is None and (time_scale is None or cond_kwarg is None):
            raise ValueError(
                f"model class {type(model).__name__} is not a known flow transformer ({_KNOWN}); "
                "pass time_scale= (its timestep per unit of flow time) and cond_kwarg= to call it"
            )
        scale = self.arch.time_scale if self.arch is not None else 1.0
        if self.arch is not None and self.arch.name == "sana":
            scale *= float(getattr(config, "timestep_scale", 1.0))
        self.time_scale = check_number(
            "time_scale", time_scale if time_scale is not None else scale, low=0.0, low_open=True
        )
        self.cond_kwarg = cond_kwarg or (self.arch.tensor_cond if self.arch else "encoder_hidden_states")

        self.dynamic_shift: dict[str, Any] | None = None
        self.shift = 1.0
        if scheduler is not None:
            if not is_flow_scheduler(scheduler):
                raise ValueError(
                    f"scheduler {type(scheduler).__name__} is not a flow-matching scheduler "
                    "(FlowMatchEulerDiscreteScheduler and alike); for a DDPM-family model use DiffusersDenoiser"
                )
            if shift is not None or dynamic_shift is not None:
                raise ValueError("pass the shift through the scheduler or through shift=/dynamic_shift=, not both")
            cfg = scheduler.config
            if getattr(cfg, "use_dynamic_shifting", False):
                dynamic_shift = {
                    k: getattr(cfg, k)
                    for k in ("base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len", "time_shift_type")
                    if getattr(cfg, k, None) is not None
                }
            else:
                shift = float(getattr(cfg, "shift", 1.0))
        if dynamic_shift is not None:
            allowed = {"base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len", "time_shift_type"}
            unknown = set(dynamic_shift) - allowed
            if unknown:
                raise ValueError(f"dynamic_shift has unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")
            self.dynamic_shift = dict(dynamic_shift)
        elif shift is not None:
            self.shift = check_number("shift", shift, low=0.0, low_open=True)

        has_guidance = bool(getattr(config, "guidance_embeds", False))
        if self.arch is not None and self.arch.name == "flux":
            if has_guidance and guidance is None:
                raise ValueError(
                    "this FLUX model embeds the guidance scale (config.guidance_embeds): pass guidance= (e.g. 3.5)"
                )
            if not has_guidance and guidance is not None:
                raise ValueError("guidance= is for guidance-distilled FLUX models; config.guidance_embeds is False")
        self.guidance = None if guidance is None else check_number("guidance", guidance)
        self.extras = dict(extras or {})

    # -- shift -------------------------------------------------------------------------------

    def image_seq_len(self, x: Tensor) -> int:
        """The number of image tokens the model sees for a sample ``x`` (for FLUX's dynamic shift)."""
        if x.ndim == 3:
            return int(x.shape[1])
        patch = getattr(getattr(self.model, "config", None), "patch_size", 1)
        p = patch[-1] if isinstance(patch, (tuple, list)) else patch
        if self.arch is not None and self.arch.name == "flux":
            p = 2  # the 2x2 packing
        n = 1
        for d in x.shape[2:]:
            n *= max(int(d) // int(p), 1)
        return n

    def shift_factor(self, x: Tensor | None = None) -> float:
        """The factor the schedule's shift multiplies sigma by (static ``shift``, or ``e^mu`` for the
        sample size of ``x`` under a dynamic shift)."""
        if self.dynamic_shift is None:
            return self.shift
        if x is None:
            raise ValueError("a dynamic (resolution-dependent) shift needs the sample x to compute mu")
        d = self.dynamic_shift
        mu = flux_mu(
            self.image_seq_len(x),
            d.get("base_image_seq_len", 256),
            d.get("max_image_seq_len", 4096),
            d.get("base_shift", 0.5),
            d.get("max_shift", 1.15),
        )
        return flow_shift(mu=mu, time_shift_type=d.get("time_shift_type", "exponential"))

    def sigmas(self, steps: int, x: Tensor | None = None) -> tuple[float, ...]:
        """:func:`flow_sigmas` with this model's shift: a K-step student's (or a sampler's) noise levels."""
        return flow_sigmas(steps, shift=self.shift_factor(x))

    # -- the call ----------------------------------------------------------------------------

    def _check_cond(self, kwargs: Mapping[str, Any], batch: int) -> None:
        config = getattr(self.model, "config", None)
        if self.arch is None:
            return
        for key in self.arch.required:
            if key not in kwargs:
                raise ValueError(
                    f"{type(self.model).__name__} needs {key!r}: pass cond as a dict with it "
                    f"(a tensor cond goes to {self.cond_kwarg!r}) or put a batch-independent one in extras"
                )
        for key, field in self.arch.cond_dims:
            v = kwargs.get(key)
            want = getattr(config, field, None)
            if isinstance(v, Tensor) and want is not None and (v.ndim < 2 or v.shape[-1] != want):
                raise ValueError(
                    f"cond {key!r} has shape {tuple(v.shape)}, but the model's config.{field} is {want}: "
                    f"expected [batch, ..., {want}]"
                )
            if isinstance(v, Tensor) and key not in self.extras and v.shape[0] != batch:
                raise ValueError(f"cond {key!r} has {v.shape[0]} rows but the batch has {batch} samples")

    def _check_sample(self, x: Tensor) -> None:
        if self.arch is None:
            return
        config = getattr(self.model, "config", None)
        want = getattr(config, self.arch.channels_field, None)
        flux4d = self.arch.name == "flux" and x.ndim == 4
        if x.ndim != self.arch.sample_ndim and not flux4d:
            raise ValueError(
                f"x has shape {tuple(x.shape)}; {type(self.model).__name__} takes {self.arch.sample_ndim}-d samples"
                + (" (or 4-d latents, packed 2x2 here)" if self.arch.name == "flux" else "")
            )
        got = x.shape[1] * 4 if flux4d else (x.shape[-1] if x.ndim == 3 else x.shape[1])
        if want is not None and got != want:
            raise ValueError(
                f"x has shape {tuple(x.shape)}: {'4 x channels' if flux4d else 'channels'} = {got}, "
                f"but the model's config.{self.arch.channels_field} is {want}"
            )

    def velocity(self, x_flow: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        """The model's velocity ``v(x_flow, t)`` (model dtype in, float64 out) for flow times ``t`` [B]."""
        kwargs: dict[str, Any] = dict(self.extras)
        if isinstance(cond, Mapping):
            kwargs.update(cond)
        elif cond is not None:
            kwargs[self.cond_kwarg] = cond
        self._check_cond(kwargs, x_flow.shape[0])
        self._check_sample(x_flow)
        dtype = next(iter(self.model.parameters()), x_flow).dtype
        h = x_flow.to(dtype)
        unpack: tuple[int, int] | None = None
        if self.arch is not None and self.arch.name == "flux":
            if h.ndim == 4:
                height, width = int(h.shape[-2]), int(h.shape[-1])
                unpack = (height, width)
                h = pack_latents(h)
                kwargs.setdefault("img_ids", flux_image_ids(height, width, device=h.device, dtype=dtype))
            elif "img_ids" not in kwargs:
                raise ValueError("packed FLUX tokens need img_ids in extras (or pass 4-d latents to pack here)")
            if "txt_ids" not in kwargs:
                text = kwargs["encoder_hidden_states"]
                kwargs["txt_ids"] = torch.zeros(text.shape[-2], 3, device=h.device, dtype=dtype)
            if self.guidance is not None and "guidance" not in kwargs:
                kwargs["guidance"] = torch.full((h.shape[0],), self.guidance, device=h.device, dtype=torch.float32)
        timestep = (t * self.time_scale).to(torch.float32)
        out = self.model(hidden_states=h, timestep=timestep, return_dict=False, **kwargs)
        v = out[0] if isinstance(out, (tuple, list)) else getattr(out, "sample", out)
        if unpack is not None:
            v = unpack_latents(v, *unpack)
        if v.shape != x_flow.shape:
            raise ValueError(f"model returned shape {tuple(v.shape)} for input shape {tuple(x_flow.shape)}")
        return v.to(torch.float64)

    def flow_x0(self, x_flow: Tensor, t: Any, cond: Any = None) -> Tensor:
        """x0 from a sample in the flow frame, ``x_flow = (1 - t) x0 + t eps``: ``x_flow - t v``.
        ``t`` is a number or a ``[batch]`` tensor in ``(0, 1]``."""
        check_sample(x_flow, "x_flow")
        tt = torch.as_tensor(t, dtype=torch.float64, device=x_flow.device)
        tt = tt.expand(x_flow.shape[0]) if tt.ndim == 0 else tt.reshape(-1)
        if tt.shape[0] != x_flow.shape[0] or not ((tt > 0) & (tt <= 1)).all():
            raise ValueError(f"t must be a number or a [{x_flow.shape[0]}] tensor in (0, 1], got {tt.tolist()[:8]}")
        xf = x_flow.to(torch.float64)
        v = self.velocity(x_flow, tt, cond)
        return (xf - pad_dims(tt, xf) * v).to(x_flow.dtype)

    def from_noise(self, z: Tensor, cond: Any = None) -> Tensor:
        """x0 from pure noise (``t = 1``, ``sigma = inf``): ``z - v(z, 1)``; a generator's first step."""
        return self.flow_x0(z, 1.0, cond)

    def forward(self, x: Tensor, sigma: Any, cond: Any = None) -> Tensor:
        check_sample(x, "x")
        s = as_sigma(sigma, x).to(torch.float64)
        t = s / (1 + s)
        xf = x.to(torch.float64) / pad_dims(1 + s, x)
        v = self.velocity(xf, t, cond)
        return (xf - pad_dims(t, xf) * v).to(x.dtype)


def flow_generator(denoiser: nn.Module, t: float = 1.0) -> OneStepGenerator:
    """A one-step generator whose input is exactly the noise at flow time ``t``: ``G(z) = x0(z, t)``.

    ``t = 1`` (the default; FastGen's and SANA-Sprint's one-step students) calls ``denoiser.from_noise``
    (``sigma_init = inf``); ``t < 1`` is ``D((1 + sigma) z, sigma)`` with ``sigma = t / (1 - t)``, i.e.
    ``x_flow = z``. ``denoiser`` is the trainable copy (a :class:`FlowMatchDenoiser`)."""
    check_number("t", t, low=0.0, high=1.0, low_open=True)
    if t >= 1.0:
        return OneStepGenerator(denoiser, math.inf)
    sigma = t / (1 - t)
    return OneStepGenerator(denoiser, sigma, noise_scale=1 + sigma)


def make_flow_generator(teacher: nn.Module, t: float = 1.0) -> OneStepGenerator:
    """A trainable :func:`flow_generator` from a deep copy of ``teacher`` (which is untouched)."""
    return flow_generator(trainable_copy(teacher), t)
