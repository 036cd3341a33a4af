"""The distilled generator as a model folder you can ship: export, verified load, checkpoints.

:func:`export_generator` writes a one-step generator (a :class:`~disback_core.denoisers.OneStepGenerator`
made by this library, or a raw diffusers UNet trained DMD2-style at a fixed timestep) or a K-step
student (:class:`~disback_core.fewstep.MultiStepGenerator`) as a folder.
For a diffusers model the folder is a ``save_pretrained`` folder (``UNet2DConditionModel.from_pretrained(folder)``
loads it) with two files of ours beside the model's own (a flow transformer's: the note alone, see below)::

    config.json                           the model's diffusers config (ConfigMixin.to_json_string)
    diffusion_pytorch_model.safetensors   the weights, every LoRA merged in (lora.merged_state_dict)
    disback_schedule.safetensors          log sigma_t of the training schedule (float64), for the wrapper
    disback_generator.json                how to sample: sigma_init (and a K-step student's sigmas),
                                          the timestep(s), the noise scale (what z is multiplied by),
                                          the prediction type; the sha256 of every file; your metadata;
                                          a digest of all of it

Any other generator (an EDM network, an MLP) is written as ``model.safetensors`` plus the note;
loading it needs the module to load into (``load_generator(folder, model=...)``), because a
class is never constructed from a file.

A student that starts from pure noise (``sigma_init = inf``, a flow-matching denoiser with
``from_noise``) has no finite first sigma, and JSON has no inf: its note says so explicitly,
``"start": "pure_noise"`` with ``"sigma_init": null``, ``"sigmas": [null, s_1, ...]`` and
``"noise_scale": 1.0`` (unused there). The field ``start`` is absent from every other note (a
finite start, as in notes written before it existed). Such an export is a ``diffusers-flow``
export (below) or a ``module`` export, whose loading needs a ``model=`` with a callable
``from_noise``; a DDPM-family (UNet) diffusers folder has no timestep for it and is refused.

A generator over a :class:`~disback_core.flow.FlowMatchDenoiser` of a diffusers flow transformer
(``SD3Transformer2DModel``, ``FluxTransformer2DModel``, ``SanaTransformer2DModel``,
``WanTransformer3DModel``): one-step at ``t = 1`` or ``t < 1``, or a K-step student, is a
``save_pretrained`` folder of the transformer (``config.json``, ``diffusion_pytorch_model.safetensors``,
no schedule file: a flow model has none) with ``"kind": "diffusers-flow"`` and a ``flow`` field::

    t             flow times t_i = sigma_i / (1 + sigma_i), 1.0 for a pure-noise start: the
                  pipeline's ``sigmas=`` (already shifted: the scheduler must not shift them again)
    timesteps     the scheduler's timesteps, 1000 t_i
    latent_scale  what the pipeline's ``latents`` are: latent_scale * z (noise_scale / (1 + sigma_0);
                  1 for a pure-noise start and for flow_generator's t < 1)
    scheduler     {"class": "FlowMatchEulerDiscreteScheduler", "shift": 1.0, "use_dynamic_shifting": false}:
                  diffusers' set_timesteps shifts custom sigmas by the scheduler's own shift, so the
                  pipeline must sample with shift 1 and the t list above
    shift, dynamic_shift, time_scale, cond_kwarg, guidance
                  the FlowMatchDenoiser's settings (the shift of the training schedule, FLUX's
                  resolution-dependent shift, the model's timestep per unit t, where a tensor cond
                  goes, FLUX's embedded guidance), with which :func:`load_generator` rebuilds it

Sampled with ``FlowMatchEulerDiscreteScheduler(shift=1.0)`` and ``sigmas=t`` (``num_inference_steps=1``
for ``t = [1.0]``), ``latents=latent_scale * z`` and no CFG, a diffusers pipeline gives the
generator's ``G(z)`` (one step) or ``sample_fewstep(G, z, noise="deterministic")`` (K steps: Euler on
a flow is the deterministic DDIM-style update). The denoiser's ``extras`` are call-time arguments,
not part of the model: a denoiser with extras is refused (pass them in ``cond``).

:func:`load_generator` checks the note and every file (size, sha256, header) before any tensor
is allocated, and returns a ``OneStepGenerator`` (or ``MultiStepGenerator``) whose outputs equal the
exported one's bit for bit. A diffusers folder's model is built first on the meta device, so a
config asking for a model the weights do not fit is refused without allocating it
(:func:`_build_and_load`).

Sampling the exported UNet in a diffusers pipeline: call it at ``diffusers.timestep`` on latents
``diffusers.latent_scale * randn`` (``latent_scale = noise_scale / sqrt(1 + sigma_init^2)``; 1 for
a DMD2-style generator fed raw noise, as DMD2's and DisBack's SDXL releases are, with
``LCMScheduler`` and ``timesteps=[399]``), and take the scheduler's x0.

Saves are atomic: the new folder is written beside the old one and switched in
(:func:`~disback_core.storage.switch_folder`); where a crash between its two renames left the
previous complete export beside the folder, :func:`load_generator` reads it (and the next export
puts it back first). No pickle: :func:`load_checkpoint` reads a legacy ``.bin``
with ``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from .denoisers import DiffusersDenoiser, OneStepGenerator, timestep_generator
from .fewstep import MultiStepGenerator, check_sigmas
from .flow import FLOW_ARCHS, FlowMatchDenoiser
from .lora import merged_state_dict
from .storage import (
    StorageError,
    atomic_write_bytes,
    body_digest,
    check_digest,
    check_fields,
    check_file_table,
    check_format,
    exchange_folders,
    file_entry,
    fsync_dir,
    is_number,
    json_bytes,
    load_tensors,
    loadable,
    new_folder_beside,
    read_json,
    read_tensor_header,
    recover_folder,
    remove_stale_beside,
    save_tensors,
    switch_folder,
    tensors_misfit,
    verify_file,
)

__all__ = ["export_generator", "load_generator", "read_export_note", "load_checkpoint", "NOTE_NAME"]

log = logging.getLogger(__name__)

FORMAT = "disback-generator"
VERSION = 1
NOTE_NAME = "disback_generator.json"
CONFIG_NAME = "config.json"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
SCHEDULE_NAME = "disback_schedule.safetensors"
MODULE_WEIGHTS = "model.safetensors"
DIFFUSERS, FLOW, MODULE = "diffusers", "diffusers-flow", "module"  # the kinds of export
# How a pipeline samples a flow export: diffusers' FlowMatchEulerDiscreteScheduler.set_timesteps shifts
# custom sigmas by the scheduler's own shift; the note's t list is already shifted, so the shift is 1.
PIPELINE_SCHEDULER: dict[str, Any] = {
    "class": "FlowMatchEulerDiscreteScheduler",
    "shift": 1.0,
    "use_dynamic_shifting": False,
}


# --------------------------------------------------------------------------- what a generator is


def _unwrap(m: Any) -> Any:
    """Look through DDP / FSDP-style wrappers (``.module``) and ``torch.compile`` (``._orig_mod``)."""
    for _ in range(8):
        inner = getattr(m, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(m, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return m
        m = inner
    return m


def _is_diffusers_model(m: Any) -> bool:
    from diffusers import ModelMixin

    return isinstance(m, ModelMixin)


def _is_flow_transformer(m: Any) -> bool:
    """Whether ``m`` is one of diffusers' flow transformer classes (:data:`~disback_core.flow.FLOW_ARCHS`)
    itself, the class a ``diffusers-flow`` export is rebuilt as (a subclass is exported as a module)."""
    name = type(m).__name__
    if name not in FLOW_ARCHS:
        return False
    import diffusers

    return getattr(diffusers, name, None) is type(m)


Wrapper = DiffusersDenoiser | FlowMatchDenoiser


def _wrapped(d: Any, sampling: dict[str, Any]) -> tuple[nn.Module, dict[str, Any], Wrapper | None]:
    """(model to save, sampling, wrapper) for a generator's denoiser ``d``: a diffusers folder for a
    :class:`DiffusersDenoiser` of a diffusers model (a finite start) or a :class:`FlowMatchDenoiser`
    of a flow transformer (any start), else the denoiser itself as a module."""
    if isinstance(d, DiffusersDenoiser) and _is_diffusers_model(_unwrap(d.model)):
        return _unwrap(d.model), _finite_start(sampling, d), d
    if isinstance(d, FlowMatchDenoiser) and _is_flow_transformer(_unwrap(d.model)):
        if d.extras:
            raise ValueError(
                f"the FlowMatchDenoiser has extras {sorted(d.extras)}: they are call-time arguments, not part of "
                "the model, and are not exported; build the denoiser without extras (pass them in cond)"
            )
        return _unwrap(d.model), sampling, d
    return d, sampling, None


def _describe(
    generator: Any,
    *,
    timestep: float | None,
    scheduler: Any,
    alphas_cumprod: Tensor | None,
    prediction_type: str | None,
) -> tuple[nn.Module, dict[str, Any], Wrapper | None]:
    """(model to save, sampling fields of the note, the diffusers wrapper or None)."""
    g = _unwrap(generator)
    if isinstance(g, (OneStepGenerator, MultiStepGenerator)):
        if timestep is not None or scheduler is not None or alphas_cumprod is not None:
            raise ValueError(
                "timestep, scheduler and alphas_cumprod are for a raw diffusers model; "
                f"a {type(g).__name__} already carries its sigmas and schedule"
            )
        sampling: dict[str, Any] = {"sigma_init": g.sigma_init, "noise_scale": g.noise_scale}
        if isinstance(g, MultiStepGenerator):  # a K-step student: its sigmas go into the note
            sampling["sigmas"] = list(g.sigmas)
        return _wrapped(_unwrap(g.denoiser), sampling)
    if _is_diffusers_model(g):
        if timestep is None:
            raise ValueError(
                f"generator is a raw {type(g).__name__}: pass timestep= (the fixed timestep it is "
                "trained at, e.g. 399 or 999) and scheduler= (or alphas_cumprod= and prediction_type=)"
            )
        tg = timestep_generator(g, timestep, alphas_cumprod, prediction_type, scheduler=scheduler)
        return g, {"sigma_init": tg.sigma_init, "noise_scale": tg.noise_scale}, cast(DiffusersDenoiser, tg.denoiser)
    raise TypeError(f"generator must be a OneStepGenerator or a diffusers model, got {type(generator).__name__}")


def _finite_start(sampling: dict[str, Any], d: nn.Module) -> dict[str, Any]:
    """A DDPM-family diffusers export needs a finite first sigma (its timestep): refuse a pure-noise start."""
    if sampling["sigma_init"] == math.inf:
        raise ValueError(
            f"a generator over a {type(d).__name__} that starts from pure noise (sigma_init = inf) has no "
            "timestep of its DDPM schedule for its first step; it cannot be exported as a diffusers folder "
            "(a FlowMatchDenoiser of a flow transformer can: a 'diffusers-flow' export starts at t = 1)"
        )
    return sampling


PURE_NOISE = "pure_noise"


def _sampling_note(sampling: Mapping[str, Any]) -> dict[str, Any]:
    """The note's sampling fields; a pure-noise start as JSON (no inf): ``start: "pure_noise"``,
    ``sigma_init: null``, ``sigmas[0]: null``, ``noise_scale: 1.0``."""
    sigmas = list(sampling.get("sigmas", [sampling["sigma_init"]]))
    if sampling["sigma_init"] != math.inf:
        return {"sigma_init": sampling["sigma_init"], "noise_scale": sampling["noise_scale"], "sigmas": sigmas}
    return {"start": PURE_NOISE, "sigma_init": None, "noise_scale": 1.0, "sigmas": [None, *sigmas[1:]]}


def _flow_times(sigmas: list[float]) -> list[float]:
    """Flow times ``t = sigma / (1 + sigma)`` of VE sigmas (``inf``, a pure-noise start, is 1.0)."""
    return [1.0 if s == math.inf else s / (1.0 + s) for s in sigmas]


def _latent_scale(sigma0: float, noise_scale: float) -> float:
    """What the pipeline's latents are times ``z``: ``x_flow = noise_scale z / (1 + sigma_0)`` (1 at ``inf``)."""
    return 1.0 if sigma0 == math.inf else noise_scale / (1.0 + sigma0)


def _flow_fields(d: FlowMatchDenoiser, note: Mapping[str, Any]) -> dict[str, Any]:
    """The ``flow`` field of a ``diffusers-flow`` note (see the module docstring)."""
    sig = _note_sigmas(note)
    t = _flow_times(sig)
    return {
        "t": t,
        "timesteps": [1000.0 * v for v in t],
        "latent_scale": _latent_scale(sig[0], note["noise_scale"]),
        "scheduler": dict(PIPELINE_SCHEDULER),
        "shift": d.shift,
        "dynamic_shift": None if d.dynamic_shift is None else dict(d.dynamic_shift),
        "time_scale": d.time_scale,
        "cond_kwarg": d.cond_kwarg,
        "guidance": d.guidance,
    }


# --------------------------------------------------------------------------- export


def _check_metadata(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping) or not all(isinstance(k, str) for k in metadata):
        raise TypeError("metadata must be a dict with string keys")
    return json.loads(json_bytes(dict(metadata), "metadata", allow_nan=False))  # as a reader sees it


def _is_ours(folder: Path) -> bool:
    try:
        note = read_json(folder / NOTE_NAME, "export note")
    except StorageError:
        return False
    return isinstance(note, dict) and note.get("format") == FORMAT


_exchange = exchange_folders  # how the switch swaps folders (tests take the two-rename path by replacing it)


def export_generator(
    generator: nn.Module,
    folder: str | os.PathLike,
    *,
    timestep: float | None = None,
    scheduler: Any = None,
    alphas_cumprod: Tensor | None = None,
    prediction_type: str | None = None,
    dtype: torch.dtype | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``generator`` as a model folder (layout in the module docstring); returns the folder.

    Args:
        generator: a :class:`OneStepGenerator` or a :class:`~disback_core.fewstep.MultiStepGenerator`
            (over a :class:`DiffusersDenoiser` for a diffusers folder, a
            :class:`~disback_core.flow.FlowMatchDenoiser` of SD3/FLUX/SANA/Wan for a
            ``diffusers-flow`` folder, or any denoiser; its ``noise_scale`` and sigmas go into the
            note, a pure-noise start as described in the module docstring), or a raw diffusers
            model trained at a fixed ``timestep``.
        timestep, scheduler, alphas_cumprod, prediction_type: for a raw diffusers model only: the
            timestep it generates at and its DDPM schedule (as :class:`DiffusersDenoiser` takes them).
        dtype: cast floating weights to this dtype (e.g. ``torch.float16`` for a release).
        metadata: JSON-serialisable notes stored in ``disback_generator.json``.

    The same generator always gives the same bytes. ``folder`` may not exist, be empty, or hold an
    earlier export (replaced atomically); anything else is refused, nothing is overwritten.
    """
    folder = Path(folder)
    meta = _check_metadata(metadata)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    prev = recover_folder(folder, _is_ours)  # an earlier export interrupted between two renames
    if prev is not None:
        log.warning("restored the previous export %s from %s (an export was interrupted)", folder, prev.name)
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise FileExistsError(f"export folder {folder} exists and is not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not _is_ours(folder):
        raise FileExistsError(
            f"export folder {folder} exists, is not empty and holds no {NOTE_NAME}: "
            "it is not an export of this library; choose another folder"
        )
    model, sampling, wrapper = _describe(
        generator,
        timestep=timestep,
        scheduler=scheduler,
        alphas_cumprod=alphas_cumprod,
        prediction_type=prediction_type,
    )
    state = merged_state_dict(model)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    note: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "class": type(model).__name__,
        **_sampling_note(sampling),
        "metadata": meta,
    }
    contents: dict[str, Any] = {}  # file name -> bytes, or (tensors, safetensors metadata)
    if wrapper is not None:
        contents[CONFIG_NAME] = model.to_json_string().encode()  # type: ignore[operator]
    contents[MODULE_WEIGHTS if wrapper is None else DIFFUSERS_WEIGHTS] = (state, {"format": "pt"})
    if wrapper is None:
        note["kind"] = MODULE
    elif isinstance(wrapper, FlowMatchDenoiser):  # checked as the loader checks it, before anything is written
        note["kind"], note["flow"] = FLOW, _flow_fields(wrapper, note)
        try:
            _check_flow(note, Path(folder) / NOTE_NAME)
        except StorageError as e:
            raise ValueError(f"cannot export this flow generator: {e}") from None
    else:
        ts = wrapper.sigma_to_t(torch.tensor(note["sigmas"], dtype=torch.float64)).tolist()
        note["kind"] = DIFFUSERS
        note["diffusers"] = {
            "timestep": ts[0],
            "timesteps": ts,
            "latent_scale": sampling["noise_scale"] / math.sqrt(1.0 + sampling["sigma_init"] ** 2),
            "prediction_type": wrapper.prediction_type,
            "timestep_mode": wrapper.timestep,
            "clamp": wrapper.clamp,
            "cond_kwarg": wrapper.cond_kwarg,
        }
        contents[SCHEDULE_NAME] = ({"log_sigmas": wrapper.log_sigmas.detach().cpu()}, None)
    new = new_folder_beside(folder)
    try:
        note["files"] = {}
        for name, c in contents.items():
            path = new / name
            sha = atomic_write_bytes(path, c, False) if isinstance(c, bytes) else save_tensors(path, c[0], c[1], False)
            note["files"][name] = file_entry(path, sha, "bytes")
        note["digest"] = body_digest(note)
        data = loadable(json_bytes(note, "the export note", allow_nan=False), "the export note", new)
        atomic_write_bytes(new / NOTE_NAME, data, sync_dir=False)
        fsync_dir(new)  # every file of the new export is durable before the switch
        switch_folder(new, folder, _exchange)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    remove_stale_beside(folder)
    return folder


def _check_template(model: nn.Module, state: Mapping[str, Tensor], source: str) -> None:
    """The weights must fit the model (a plain, LoRA-free instance): :func:`~disback_core.storage.tensors_misfit`."""
    if problem := tensors_misfit(state, merged_state_dict(model)):
        raise StorageError(f"{source}: the weights do not fit {type(model).__name__}: {problem}")


# --------------------------------------------------------------------------- load


_NOTE_KEYS = {
    "format",
    "version",
    "class",
    "kind",
    "sigma_init",
    "noise_scale",
    "sigmas",
    "metadata",
    "files",
    "digest",
}
_DIFFUSERS_KEYS = {"timestep", "timesteps", "latent_scale", "prediction_type", "timestep_mode", "clamp", "cond_kwarg"}
_FLOW_KEYS = {
    "t",
    "timesteps",
    "latent_scale",
    "scheduler",
    "shift",
    "dynamic_shift",
    "time_scale",
    "cond_kwarg",
    "guidance",
}
_DYNAMIC_SHIFT_KEYS = {"base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len", "time_shift_type"}
_FILES = {
    DIFFUSERS: {CONFIG_NAME, DIFFUSERS_WEIGHTS, SCHEDULE_NAME},
    FLOW: {CONFIG_NAME, DIFFUSERS_WEIGHTS},
    MODULE: {MODULE_WEIGHTS},
}


def _positive(note: Mapping[str, Any], key: str, path: Path) -> float:
    v = note.get(key)
    if not is_number(v) or v <= 0:
        raise StorageError(f"export note {path}: {key} must be a finite number > 0, got {v!r}")
    return float(v)


def _check_start(note: Mapping[str, Any], path: Path) -> None:
    """sigma_init, noise_scale and sigmas: numbers (a finite start), or exactly the pure-noise form."""
    where = f"export note {path}"
    sig = note["sigmas"]
    pure = "start" in note
    if pure:
        if not isinstance(note["start"], str) or note["start"] != PURE_NOISE:
            raise StorageError(f"{where}: start must be {PURE_NOISE!r} (or absent), got {note['start']!r}")
        if note["sigma_init"] is not None:
            raise StorageError(f"{where}: a pure-noise start has sigma_init null, got {note['sigma_init']!r}")
        if _positive(note, "noise_scale", path) != 1.0:
            raise StorageError(f"{where}: a pure-noise start has noise_scale 1.0, got {note['noise_scale']!r}")
        if note["kind"] not in (MODULE, FLOW):
            raise StorageError(
                f"{where}: a pure-noise start is a {MODULE!r} or {FLOW!r} export, got kind {note['kind']!r}"
            )
        if not isinstance(sig, list) or not sig or sig[0] is not None:
            raise StorageError(f"{where}: a pure-noise start's sigmas must be a list starting with null")
        rest = sig[1:]
    else:
        _positive(note, "sigma_init", path)
        _positive(note, "noise_scale", path)
        if not isinstance(sig, list) or not sig or sig[0] != note["sigma_init"]:
            raise StorageError(f"{where}: sigmas must be a list of numbers starting at sigma_init")
        rest = sig
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in rest):
        raise StorageError(f"{where}: sigmas must be a list of numbers starting at sigma_init")
    try:
        check_sigmas(_note_sigmas(note), "sigmas", allow_inf_first=pure)  # finite, > 0, strictly decreasing
    except (TypeError, ValueError) as e:
        raise StorageError(f"{where}: {e}") from None


def _numbers_match(got: Any, want: list[float], abs_tol: float = 1e-12) -> bool:
    """``got`` is a list of finite numbers equal to ``want`` (computed from the sigmas) to 1e-9."""
    return (
        isinstance(got, list)
        and len(got) == len(want)
        and all(is_number(a) and math.isclose(a, b, rel_tol=1e-9, abs_tol=abs_tol) for a, b in zip(got, want))
    )


def _same_json(a: Any, b: Any) -> bool:
    """Equal as JSON, types included (``1`` is not ``1.0``, ``0`` is not ``false``)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _check_flow(note: Mapping[str, Any], path: Path) -> None:
    """The ``flow`` field of a ``diffusers-flow`` note: every field's type and range, and the pipeline
    facts (t, timesteps, latent_scale) consistent with the note's sigmas and noise_scale."""
    where = f"export note {path}"
    f = check_fields(note.get("flow"), _FLOW_KEYS, where, "flow")
    sig = _note_sigmas(note)
    t = _flow_times(sig)
    if not _numbers_match(f["t"], t):
        raise StorageError(f"{where}: flow.t must be the sigmas' flow times sigma / (1 + sigma), {t}")
    if not _numbers_match(f["timesteps"], [1000.0 * v for v in t]):
        raise StorageError(f"{where}: flow.timesteps must be 1000 * flow.t")
    if not _numbers_match([f["latent_scale"]], [_latent_scale(sig[0], note["noise_scale"])]):
        raise StorageError(f"{where}: flow.latent_scale {f['latent_scale']!r} is not noise_scale / (1 + sigma_init)")
    if not _same_json(f["scheduler"], PIPELINE_SCHEDULER):
        raise StorageError(f"{where}: flow.scheduler must be {json.dumps(PIPELINE_SCHEDULER)}")
    for key in ("shift", "time_scale"):
        if not is_number(f[key]) or f[key] <= 0:
            raise StorageError(f"{where}: flow.{key} must be a finite number > 0, got {f[key]!r}")
    if not isinstance(f["cond_kwarg"], str) or not f["cond_kwarg"].isidentifier():
        raise StorageError(f"{where}: flow.cond_kwarg {f['cond_kwarg']!r} is not a keyword name")
    if f["guidance"] is not None and not is_number(f["guidance"]):
        raise StorageError(f"{where}: flow.guidance must be null or a finite number, got {f['guidance']!r}")
    ds = f["dynamic_shift"]
    if ds is None:
        return
    if not isinstance(ds, dict) or not set(ds) <= _DYNAMIC_SHIFT_KEYS:
        raise StorageError(f"{where}: flow.dynamic_shift must be null or an object of {sorted(_DYNAMIC_SHIFT_KEYS)}")
    bad = [k for k in ("base_shift", "max_shift") if k in ds and not is_number(ds[k])]
    bad += [k for k in ("base_image_seq_len", "max_image_seq_len") if k in ds and not (is_number(ds[k]) and ds[k] > 0)]
    if ds.get("time_shift_type", "exponential") not in ("exponential", "linear"):
        bad.append("time_shift_type")
    if bad:
        raise StorageError(f"{where}: flow.dynamic_shift has bad values for {bad}")
    if ds.get("base_image_seq_len", 256) == ds.get("max_image_seq_len", 4096):
        raise StorageError(f"{where}: flow.dynamic_shift's base and max image_seq_len are equal")
    if f["shift"] != 1.0:
        raise StorageError(f"{where}: flow.shift is unused with a dynamic shift and must be 1.0")


def _note_sigmas(note: Mapping[str, Any]) -> list[float]:
    """The note's sigmas as numbers: the pure-noise start's null first sigma is ``math.inf``."""
    sig = list(note["sigmas"])
    if "start" in note:
        sig[0] = math.inf
    return sig


def _where(folder: Path) -> Path:
    """The folder to read: ``folder``, or the previous complete export of an interrupted switch."""
    if folder.is_dir() and not folder.is_symlink():
        return folder
    if folder.is_symlink():
        raise StorageError(f"export folder {folder} is a symlink; pass the folder itself")
    if not folder.exists():
        prev = recover_folder(folder, _is_ours, restore=False)
        if prev is None:
            raise StorageError(f"export folder {folder} does not exist")
        log.warning("export folder %s is missing (an export was interrupted); reading %s", folder, prev.name)
        return prev
    raise StorageError(f"export folder {folder} is not a folder")


def read_export_note(folder: str | os.PathLike) -> dict[str, Any]:
    """The checked ``disback_generator.json`` of an export (every field's type and range)."""
    return _read_note(Path(folder))[1]


def _read_note(folder: Path) -> tuple[Path, dict[str, Any]]:
    root = _where(folder)
    path = root / NOTE_NAME
    where = f"export note {path}"
    note = read_json(path, "export note")
    check_format(note, where, FORMAT, (VERSION,), "note")
    if set(note) - {"diffusers", "flow", "start"} != _NOTE_KEYS:
        raise StorageError(f"{where}: fields {sorted(set(note))} are not {sorted(_NOTE_KEYS)}")
    check_digest(note, where)
    kind = note["kind"]
    expected = _FILES.get(kind) if isinstance(kind, str) else None
    if expected is None:
        raise StorageError(f"{where}: kind {kind!r} is not one of {sorted(_FILES)}")
    if not isinstance(note["class"], str) or not note["class"].isidentifier():
        raise StorageError(f"{where}: class {note['class']!r} is not a class name")
    if kind == FLOW and note["class"] not in FLOW_ARCHS:
        raise StorageError(
            f"{where}: class {note['class']!r} is not a flow transformer class; a {FLOW!r} export "
            f"holds one of {', '.join(FLOW_ARCHS)}"
        )
    _check_start(note, path)
    if not isinstance(note["metadata"], dict):
        raise StorageError(f"{where}: metadata must be an object")
    check_file_table(note["files"], expected, where, "bytes")
    for field, its_kind in (("diffusers", DIFFUSERS), ("flow", FLOW)):
        if field in note and kind != its_kind:
            raise StorageError(f"{where}: a {kind!r} export has no {field} field")
    if kind == FLOW:
        _check_flow(note, path)
    if kind == DIFFUSERS:
        d = check_fields(note.get("diffusers"), _DIFFUSERS_KEYS, where, "diffusers")
        if (
            d["timestep_mode"] not in ("interp", "nearest")
            or not isinstance(d["clamp"], bool)
            or not isinstance(d["cond_kwarg"], str)
            or not isinstance(d["prediction_type"], str)
        ):
            raise StorageError(f"{where}: diffusers fields have wrong types or values")
    return root, note


def _sized(root: Path, note: Mapping[str, Any], name: str) -> tuple[Path, str, int]:
    """(path, sha256, size) of a listed file, which must be a regular file of exactly that size."""
    entry = note["files"][name]
    path = verify_file(root / name, None, entry["bytes"], "export file", "the note says")
    return path, entry["sha256"], entry["bytes"]


# Buffers a model computes when it is built (rotary frequencies: Wan's rope.freqs_cos/sin) are not in
# its weights file: they are made for real when the model is materialised. A config that asks for more
# of them than this (or than the weights file holds, if that is more) is refused before they are made.
MAX_UNSAVED_BUFFER_BYTES = 256 << 20


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Build modules with every parameter on the meta device and every buffer real (what
    ``accelerate.init_empty_weights()`` does): a parameter is moved to meta as it is registered, so
    its initialisation runs on meta, and ``load_state_dict(..., assign=True)`` then puts the loaded
    tensors in. Buffers computed in ``__init__`` and not saved (non-persistent) stay correct.
    Patches ``nn.Module.register_parameter`` while it is active (do not build modules in another
    thread meanwhile)."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        p = module._parameters[name]
        if p is not None and not p.is_meta:
            module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign, assignment]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def _build(cls: Any, config: Mapping[str, Any], cfg_path: Path, *, everything_on_meta: bool) -> nn.Module:
    """``cls.from_config(config)`` without allocating its parameters: all of it on the meta device
    (``everything_on_meta``; buffers too), or its parameters only (:func:`_parameters_on_meta`)."""
    try:
        with torch.device("meta") if everything_on_meta else _parameters_on_meta():
            return cast(nn.Module, cls.from_config(config))
    except Exception as e:  # diffusers' own checks of a config (group counts, block types, ...)
        raise StorageError(
            f"model config {cfg_path}: {cls.__name__} cannot be built from it: {type(e).__name__}: {str(e)[:300]}"
        ) from None


def _build_and_load(cls: Any, config: Mapping[str, Any], cfg_path: Path, path: Path, sha: str, size: int) -> nn.Module:
    """The diffusers model of ``config`` with the weights of ``path``, checked before it is allocated.

    1. The model is built on the meta device (no memory; if a class cannot be built there, with its
       parameters alone on meta); 2. the weights file's header (read without its data) must give
       exactly its keys and shapes, floating where the model's are, and the buffers the model makes
       but does not save must be small; 3. only then are the weights read (sha256 checked first),
       the model built with its parameters on meta and the loaded tensors assigned to it.
    A file that fails a check of step 2 is refused for its sha256 first if it was modified.
    """
    try:
        meta = _build(cls, config, cfg_path, everything_on_meta=True)
    except StorageError:
        meta = _build(cls, config, cfg_path, everything_on_meta=False)  # a class that cannot be built on meta
    try:
        infos, _ = read_tensor_header(path)
        header = {k: torch.empty(i.shape, dtype=i.torch_dtype, device="meta") for k, i in infos.items()}
        _check_template(meta, header, str(path))
        target = _load_dtype(meta, header, path)
        saved = set(meta.state_dict())
        unsaved = sum(b.numel() * b.element_size() for n, b in meta.named_buffers() if n not in saved)
        if unsaved > max(size, MAX_UNSAVED_BUFFER_BYTES):
            raise StorageError(
                f"model config {cfg_path}: {cls.__name__} would compute {unsaved} bytes of buffers that are not "
                f"in the weights {path} ({size} bytes): refused"
            )
    except StorageError:
        verify_file(path, sha, size, "weights", "the note says")  # a modified file: say so, not what it lacks
        raise
    del meta, header
    state = load_tensors(path, sha256=sha, max_bytes=size)
    if {k: (i.torch_dtype, i.shape) for k, i in infos.items()} != {
        k: (v.dtype, tuple(v.shape)) for k, v in state.items()
    }:
        raise StorageError(f"weights {path} changed while they were read")
    net = _build(cls, config, cfg_path, everything_on_meta=False)
    try:
        net.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:  # checked above; never a bare RuntimeError from a file
        raise StorageError(f"weights {path} do not load into {cls.__name__}: {str(e)[:300]}") from None
    if target is not None:
        net.to(target)
    if any(t.is_meta for t in (*net.parameters(), *net.buffers())):
        raise StorageError(f"weights {path} leave tensors of {cls.__name__} unset")
    return net


def _load_dtype(model: nn.Module, state: Mapping[str, Tensor], path: Path) -> torch.dtype | None:
    """The dtype the model is cast to for ``state`` (a file in one floating dtype other than the
    model's: run it as exported, e.g. fp16), or None; mixed dtypes the model would not have are refused."""
    dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
    current = {p.dtype for p in model.parameters() if p.is_floating_point()}
    target = next(iter(dtypes)) if len(dtypes) == 1 and current != dtypes else None
    now = {
        k: target if target is not None and v.is_floating_point() else v.dtype for k, v in model.state_dict().items()
    }
    cast_ = sorted(k for k, v in state.items() if v.dtype != now[k])
    if cast_:  # mixed precisions in the file that the model does not have: never cast silently
        k = cast_[0]
        raise StorageError(
            f"weights {path}: {len(cast_)} tensors differ in dtype from the model after loading "
            f"(e.g. {k}: {state[k].dtype} vs {now[k]})"
        )
    return target


def _load_weights(model: nn.Module, path: Path, sha: str, size: int) -> None:
    state = load_tensors(path, sha256=sha, max_bytes=size)
    _check_template(model, state, str(path))
    target = _load_dtype(model, state, path)
    if target is not None:  # exported in one dtype (e.g. fp16): run in it, as exported
        model.to(target)
    model.load_state_dict(state, strict=True)


def load_generator(
    folder: str | os.PathLike, *, model: nn.Module | None = None, device: str | torch.device = "cpu"
) -> OneStepGenerator | MultiStepGenerator:
    """Load an export as a :class:`OneStepGenerator`, or a :class:`~disback_core.fewstep.MultiStepGenerator`
    for a K-step student (its ``sigmas`` and ``noise_scale``; sample it with ``sample_fewstep``), in
    eval mode, no gradients. A pure-noise start (``sigma_init = inf``) needs a ``model=`` with a
    callable ``from_noise``.

    A diffusers export builds its model from ``config.json`` (the class must be a diffusers model
    class; for a ``diffusers-flow`` export one of the four flow transformers, wrapped in a
    :class:`~disback_core.flow.FlowMatchDenoiser` with the note's settings); a ``module`` export
    needs ``model=``, a module of the exported architecture, into which the weights are loaded.
    Every file is verified first (see the module docstring); any problem is a
    :class:`~disback_core.storage.StorageError` naming the file.
    """
    root, note = _read_note(Path(folder))
    if note["kind"] == MODULE:
        if model is None:
            raise ValueError(
                f"export {folder} holds a {note['class']} (kind 'module'): pass model=, a module of "
                "that architecture to load the weights into"
            )
        if "start" in note and not callable(getattr(model, "from_noise", None)):
            raise StorageError(
                f"export note {root / NOTE_NAME}: the generator starts from pure noise (sigma_init = inf), but "
                f"model {type(model).__name__} has no from_noise(z, cond) method: it cannot start from pure noise"
            )
        _load_weights(model, *_sized(root, note, MODULE_WEIGHTS))
        denoiser: nn.Module = model
    else:
        if model is not None:
            raise ValueError(
                f"export {folder} is a diffusers folder; its model is built from {CONFIG_NAME}, do not pass model="
            )
        import diffusers

        cfg_path, cfg_sha, _ = _sized(root, note, CONFIG_NAME)
        config = read_json(cfg_path, "model config", sha256=cfg_sha)  # its size is checked already
        cls = getattr(diffusers, note["class"], None)
        if not isinstance(config, dict) or config.get("_class_name") != note["class"]:
            raise StorageError(f"model config {cfg_path}: _class_name is not {note['class']!r}")
        if not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin)):
            raise StorageError(f"export note {root / NOTE_NAME}: {note['class']!r} is not a diffusers model class")
        net = _build_and_load(cls, config, cfg_path, *_sized(root, note, DIFFUSERS_WEIGHTS))
        if note["kind"] == FLOW:
            denoiser = _flow_denoiser(net, note["flow"], root)
        else:
            denoiser = _ddpm_denoiser(net, root, note)
    sigmas = _note_sigmas(note)
    gen: OneStepGenerator | MultiStepGenerator
    try:
        if len(sigmas) > 1:
            gen = MultiStepGenerator(denoiser, sigmas, noise_scale=note["noise_scale"])
        else:
            gen = OneStepGenerator(denoiser, sigmas[0], noise_scale=note["noise_scale"])
    except (TypeError, ValueError) as e:  # checked above already; never a bare ValueError from a file
        raise StorageError(f"export note {root / NOTE_NAME}: {e}") from None
    return gen.to(device).eval().requires_grad_(False)


def _flow_denoiser(net: nn.Module, f: Mapping[str, Any], root: Path) -> FlowMatchDenoiser:
    """The FlowMatchDenoiser a ``diffusers-flow`` note describes (its ``flow`` field checked already)."""
    try:
        return FlowMatchDenoiser(
            net,
            shift=None if f["dynamic_shift"] is not None else f["shift"],
            dynamic_shift=f["dynamic_shift"],
            time_scale=f["time_scale"],
            cond_kwarg=f["cond_kwarg"],
            guidance=f["guidance"],
        )
    except (TypeError, ValueError) as e:  # e.g. a FLUX model with guidance_embeds and no guidance
        raise StorageError(f"export note {root / NOTE_NAME}: the flow settings do not fit the model: {e}") from None


def _ddpm_denoiser(net: nn.Module, root: Path, note: Mapping[str, Any]) -> DiffusersDenoiser:
    """The DiffusersDenoiser a ``diffusers`` note and its schedule file describe, checked against the note."""
    sch_path, sch_sha, sch_size = _sized(root, note, SCHEDULE_NAME)
    sched = load_tensors(sch_path, sha256=sch_sha, max_bytes=sch_size)
    ls = sched.get("log_sigmas")
    if set(sched) != {"log_sigmas"} or ls is None or ls.dtype != torch.float64 or ls.ndim != 1 or len(ls) < 2:
        raise StorageError(f"schedule {sch_path}: must hold one float64 vector 'log_sigmas' of >= 2 values")
    d = note["diffusers"]
    try:
        wrapper = DiffusersDenoiser(
            net,
            1.0 / (1.0 + (2 * ls).exp()),
            d["prediction_type"],
            timestep=d["timestep_mode"],
            clamp=d["clamp"],
            cond_kwarg=d["cond_kwarg"],
        )
    except ValueError as e:
        raise StorageError(f"export {root}: {e}") from None
    wrapper.log_sigmas.copy_(ls)  # exactly the exported schedule (no exp/log round trip)
    try:
        ts = wrapper.sigma_to_t(torch.tensor(note["sigmas"], dtype=torch.float64)).tolist()
    except ValueError as e:
        raise StorageError(f"export note {root / NOTE_NAME}: the sigmas do not fit the schedule: {e}") from None
    if not _numbers_match(d["timesteps"], ts, abs_tol=1e-9):
        raise StorageError(f"export note {root / NOTE_NAME}: diffusers.timesteps do not match the sigmas")
    scale = note["noise_scale"] / math.sqrt(1.0 + note["sigma_init"] ** 2)
    for key, want in (("timestep", ts[0]), ("latent_scale", scale)):  # what a pipeline user reads must agree
        if not _numbers_match([d[key]], [want], abs_tol=1e-9):
            raise StorageError(
                f"export note {root / NOTE_NAME}: diffusers.{key} is {d[key]!r}, but sigma_init and "
                f"noise_scale give {want!r}"
            )
    return wrapper


# --------------------------------------------------------------------------- released checkpoints


def load_checkpoint(model: nn.Module, path: str | os.PathLike, *, key_prefix: str = "") -> nn.Module:
    """Load a released state dict (``.safetensors``, or a legacy ``.bin``/``.pt``/``.pth`` read with
    ``torch.load(weights_only=True)``, which cannot run code) into ``model``, strictly: every key and
    shape must fit, or a :class:`~disback_core.storage.StorageError` names the file and what differs.
    ``key_prefix`` is stripped from every key first (e.g. ``"module."`` of a DDP save)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        state = load_tensors(path)
    elif suffix in (".bin", ".pt", ".pth"):
        if not path.is_file() or path.is_symlink():
            raise StorageError(f"checkpoint {path} is missing or not a regular file")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # UnpicklingError for anything but tensors and containers, or a torn file
            raise StorageError(f"checkpoint {path} cannot be read as a weights-only state dict: {e}") from None
        if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()
        ):
            raise StorageError(f"checkpoint {path} is not a flat state dict of tensors")
    else:
        raise StorageError(
            f"checkpoint {path}: unknown file type {suffix!r} (expected .safetensors, .bin, .pt or .pth)"
        )
    if key_prefix:
        state = {k[len(key_prefix) :] if k.startswith(key_prefix) else k: v for k, v in state.items()}
    _check_template(model, state, str(path))
    with torch.no_grad():
        for k, v in model.state_dict().items():
            v.copy_(state[k])
    return model
