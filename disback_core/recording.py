"""Degradation Recording (DisBack, Zhang et al. 2025, Alg. 1).

Starting from a copy of the teacher, a *degrading* score is fitted by the base method's own DSM
loss to samples of the frozen initial generator ``G0``; a node is taken every ``interval`` steps.
The path runs from the teacher (node 0) to a score that fits ``G0`` (node N).

Two entry points, one implementation:

- :class:`DegradationRecorder`: for a loop with its own fake-score loss. The user trains the
  recorder's ``module`` (their copy of the teacher, with a LoRA slot or full weights) with their
  own loss and optimizer and calls ``recorder.step()`` after each update.
- :func:`record_degradation`: the same loop for the library's adapters (``method.dsm_loss``).

Under ``torch.distributed`` (torchrun, accelerate) both average the degrading score's gradients
over ranks, so every rank records one path from its own data (see :class:`DegradationRecorder`,
"Distributed"), and :meth:`DegradationRecorder.save` writes it once and checks it on every rank.

Three node modes:

- ``"lora"``: the degrading score is a LoRA slot on the frozen teacher weights; nodes are exact and small.
- ``"svd"``: the degrading score is fine-tuned at full rank; each node is compressed to the LoRA
  rank by a truncated SVD of the target layers' weight deltas (errors in
  ``trajectory.meta["svd_error"]`` and ``["svd_output_error"]``). :func:`record_degradation`
  trains only the weights a node can hold.
- ``"full"``: full fine-tuning, full nodes (the reference's format; issue-tracker measurements
  found full paths degrade much faster than LoRA ones at the same learning rate).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypedDict

import torch
from torch import Tensor, nn

from .checks import check_number
from .denoisers import check_denoiser, cond_rows, freeze, map_cond, pad_dims, takes_args
from .distributed import allreduce_grads, broadcast_parameters, share_trajectory, world_size
from .lora import (
    LoraSpec,
    inject_lora,
    lora_parameters,
    lora_state,
    lora_targets,
    node_layers,
    node_weight,
    remove_lora,
    svd_lora,
    write_node_weight_,
)
from .step import as_batch, call_generator
from .storage import lowest_float_dtype, tensors_fingerprint
from .trajectory import DEFAULT_CALL, Probe, Trajectory, _deepcopy_quietly, _state, resolve_call

__all__ = [
    "record_degradation",
    "DegradationRecorder",
    "probe_inputs",
    "probe_inputs_raw",
    "MODES",
    "DEGRADATION_LR_SCALE",
    "resolve_lr_scale",
]

log = logging.getLogger(__name__)
MODES = ("lora", "svd", "full")


def probe_inputs(
    x0: Tensor, cond: Any = None, *, sigma_min: float = 0.05, sigma_max: float = 20.0, seed: int = 1234
) -> tuple[Tensor, Tensor, Any]:
    """Fixed probe inputs from clean samples ``x0`` (of G0): ``x0 + sigma * noise`` at geometrically
    spaced sigmas in ``[sigma_min, sigma_max]`` (one per sample), with seeded noise."""
    n = x0.shape[0]
    sigma = torch.logspace(math.log10(sigma_min), math.log10(sigma_max), n, device=x0.device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn(x0.shape, generator=gen).to(x0.device, x0.dtype)
    return x0 + pad_dims(sigma, x0) * noise, sigma, cond


def probe_inputs_raw(
    model: nn.Module,
    x0: Tensor,
    cond: Any = None,
    scheduler: Any = None,
    *,
    t_min: float = 0.05,
    t_max: float = 0.95,
    time_scale: float | None = None,
    seed: int = 1234,
) -> tuple[Tensor, Tensor, Any]:
    """Fixed probe inputs ``(x_t, timestep, cond)`` in a raw diffusers model's own units, to record it
    with its own call convention (``DegradationRecorder(model, ..., call="flow-transformer" or
    "diffusers-unet", probe=probe_inputs_raw(model, x0, cond, scheduler))``). One noise level per
    sample, evenly spaced in ``[t_min, t_max]`` (fractions of the schedule), seeded noise:

    - a flow transformer (SD3, FLUX, SANA, Wan; or a ``FlowMatch*`` scheduler): flow time ``t``,
      ``x_t = (1 - t) x0 + t eps``, ``timestep = time_scale * t`` (``1000 t`` for SD3 and Wan, ``t``
      for FLUX, ``1000 t * timestep_scale`` for SANA; ``time_scale=`` for another model);
    - a DDPM-family scheduler (with ``alphas_cumprod``): integer timesteps ``round(f (T - 1))``,
      ``x_t = sqrt(abar) x0 + sqrt(1 - abar) eps`` (as ``scheduler.add_noise``, in float64).

    Timesteps are returned as float32 (integer values exact), which every convention saves and loads.
    ``x0`` is in the layout the model takes (FLUX: packed tokens, with ``img_ids``/``txt_ids`` in ``cond``
    repeated per sample, ``[B, N, 3]``).
    """
    from .flow import flow_arch, is_flow_scheduler

    if not isinstance(x0, Tensor) or x0.ndim < 2:
        raise ValueError(f"x0 must be a batch of samples [B, ...], got {getattr(x0, 'shape', x0)!r}")
    if not 0.0 <= t_min <= t_max <= 1.0:
        raise ValueError(f"need 0 <= t_min <= t_max <= 1, got t_min={t_min}, t_max={t_max}")
    n = x0.shape[0]
    frac = torch.linspace(t_min, t_max, n, dtype=torch.float64) if n > 1 else torch.tensor([(t_min + t_max) / 2])
    gen = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn(x0.shape, generator=gen, dtype=torch.float32).to(x0.device, torch.float64)
    x64 = x0.detach().to(torch.float64)
    arch = flow_arch(model)
    if arch is not None or time_scale is not None or (scheduler is not None and is_flow_scheduler(scheduler)):
        if time_scale is None:
            if arch is None:
                raise ValueError(f"{type(model).__name__} is not a known flow transformer: pass time_scale=")
            time_scale = arch.time_scale
            if arch.name == "sana":
                time_scale *= float(getattr(getattr(model, "config", None), "timestep_scale", 1.0))
        t = frac.clamp(1e-6, 1.0).to(x0.device)
        x = (1 - pad_dims(t, x64)) * x64 + pad_dims(t, x64) * noise
        return x.to(x0.dtype), (t * time_scale).to(torch.float32), cond
    abar = getattr(scheduler, "alphas_cumprod", None)
    if abar is None:
        raise ValueError(
            "scheduler must be a diffusers DDPM-family scheduler (with alphas_cumprod) for a UNet, or a "
            f"FlowMatch scheduler for a flow transformer; got {type(scheduler).__name__}"
        )
    abar = torch.as_tensor(abar, dtype=torch.float64)
    idx = (frac * (len(abar) - 1)).round().long()
    a = abar[idx].to(x0.device)
    x = pad_dims(a.sqrt(), x64) * x64 + pad_dims((1 - a).sqrt(), x64) * noise
    return x.to(x0.dtype), idx.to(x0.device, torch.float32), cond


def _run(module: nn.Module, call: Callable[..., Tensor], probe: tuple[Tensor, Tensor, Any]) -> Tensor:
    """The module's probe output, in eval mode for this call only (dropout off), then modes restored."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.no_grad():
            return call(module, *probe).detach().float().cpu()
    finally:
        for m, training in modes:
            m.train(training)


# The measured default (docs/WHEN_DISBACK_HELPS.md, benchmarks/path_shape.py): LoRA nodes are recorded at
# 3x the fake score's learning rate, full and SVD nodes at 1x. At 1x a rank-8 LoRA path moves only 28% of
# the way to G0; at 3x it matches full fine-tuning node by node, and on the 5-seed regime table it is never
# worse than the base beyond the spread (the paper's 1x path is, on toy2d and grid25).
DEGRADATION_LR_SCALE = {"lora": 3.0, "svd": 1.0, "full": 1.0}


def resolve_lr_scale(mode: str, scale: float | None = None) -> float:
    """The recording learning rate's factor over the fake score's: ``scale``, or the measured default
    for ``mode`` (:data:`DEGRADATION_LR_SCALE`: 3 for LoRA nodes, 1 for full and SVD nodes)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if scale is None:
        return DEGRADATION_LR_SCALE[mode]
    return check_number("degradation_lr_scale", scale, low=0.0, low_open=True)


class DegradationRecorder:
    """Degradation Recording driven by the user's own fake-score loss.

    Example (the user's DSM loss and optimizer; G0 = their initial generator, not updated)::

        rec = DegradationRecorder(teacher, fake_copy, steps=1000, nodes=10, mode="lora", lr=1e-4)
        for _ in range(1000):
            with torch.no_grad():
                x0 = g0(torch.randn(...))
            rec.update(my_dsm_loss(rec.module, x0), probe=x0)   # or: your optimizer, then rec.step()
        trajectory = rec.trajectory()          # or rec.save(folder)

    Args:
        teacher: node 0 (not modified).
        module: the degrading score: the user's copy of the teacher (it must hold the teacher's
            weights at the start, in any dtype: compared in the less precise one, so an fp32 copy
            beside a bf16 teacher cast from it fits, DMD2's SD layout); default a private copy. In
            ``"lora"`` mode a LoRA slot is put on it in place (its other weights frozen meanwhile) and
            taken off again by :meth:`trajectory`, which restores its ``requires_grad`` flags; in
            ``"full"``/``"svd"`` mode it is trained as it is.
        interval: a node every ``interval`` steps; or give ``steps`` and ``nodes`` (interval ``steps // nodes``,
            at most ``nodes`` nodes).
        mode: ``"lora"``, ``"svd"`` or ``"full"``.
        lora: rank, alpha and targets (default rank 8, :func:`~disback_core.lora.default_target_modules`).
        probe: clean G0 samples ``x0`` (noised by :func:`probe_inputs`), or ready inputs ``(x, sigma, cond)``
            for ``call`` (for a raw diffusers model, :func:`probe_inputs_raw`); each node's outputs on
            it are recorded for :meth:`Trajectory.verify`.
        call: how to run a module on the probe, saved by name with the trajectory: a registered
            convention (:func:`~disback_core.trajectory.register_call`): ``"denoiser"`` (default,
            ``module(x, sigma, cond)``), ``"diffusers-unet"`` (``m(x, t, encoder_hidden_states=c).sample``
            for a raw UNet), ``"flow-transformer"`` (``m(hidden_states=x, timestep=t, **c)`` for a raw
            SD3/FLUX/SANA/Wan transformer); or a function ``fn(module, x, sigma, cond)``.
        call_name: the name a function ``call`` is saved under (registered to it in this process;
            register it in the loading process too). Without it an unregistered function is saved as
            ``"custom"``, and verifying the loaded path needs it again (``verify(call=fn)``).
        lr: your fake score's learning rate; :meth:`update`'s Adam trains at ``degradation_lr_scale * lr``.
        degradation_lr_scale: the recording learning rate over ``lr``; default the measured one,
            :data:`DEGRADATION_LR_SCALE` (3 for LoRA nodes, 1 for full and SVD nodes: at 1x a LoRA path
            moves only 28% of the way to G0, at 3x it matches full fine-tuning node by node;
            docs/WHEN_DISBACK_HELPS.md). ``1`` is the paper's path.
        optimizer / max_grad_norm: a factory ``optimizer(params)`` replacing that Adam (then set its
            learning rate yourself), and gradient clipping; unused if you step your own optimizer and
            call :meth:`step`.

        average_grads: average the trainable parameters' gradients over ranks under
            ``torch.distributed`` (see "Distributed"). ``None`` (default): when a process group with
            more than one rank is initialised and no ``DistributedDataParallel`` wrapper averages them
            (``module`` is not one and ``wrap`` did not make one); ``False``: never (e.g. you wrap
            ``DDP(rec.module)`` yourself after constructing the recorder); ``True``: always there.
        wrap: applied once to the degrading score after the LoRA slot is put on it, e.g.
            ``DistributedDataParallel`` (or ``functools.partial(DDP, device_ids=[local_rank])``); the
            result is :attr:`wrapped`: compute the recording loss with it. A DDP result averages the
            gradients itself, so the recorder does not.

    Precision: each node's probe outputs are computed in the teacher's own dtypes, by a copy of the
    teacher holding the node as :meth:`Trajectory.target` will (with an fp32 ``module`` beside a bf16
    teacher, the module's own fp32 outputs could not be reproduced from the bf16 teacher's weights).

    Distributed (torchrun, accelerate; every rank runs the same loop on its own data): the ranks
    must record one path, so the degrading score's gradients are averaged over ranks before each
    optimizer step, as DDP would:

    - by default the recorder does it itself: it sets every rank's trainable parameters to rank 0's
      when it is made (a LoRA slot is initialised from each rank's own RNG), and averages the
      gradients in :meth:`update` after ``backward`` (before clipping and the step). If you step
      your own optimizer (then :meth:`step`), the gradients are averaged when that optimizer steps
      (a step pre-hook on the optimizer holding :meth:`parameters`, until :meth:`trajectory`); to
      clip them averaged, call :meth:`average_gradients` after ``backward`` and before clipping.
      Your loss code calls the bare module (``rec.module``), as DMD2's ``compute_loss_fake``
      calls its ``fake_unet``;
    - or DDP does it: ``wrap=DistributedDataParallel`` (the recorder wraps ``rec.module`` after
      the LoRA slot is on it; compute the loss with ``rec.wrapped``), or build
      ``DDP(rec.module)`` yourself *after* the recorder (the recorder puts the slot on first: a DDP
      registers the parameters that require a gradient when it is built) and pass
      ``average_grads=False``. A ``module`` that is already a DDP wrapper is accepted in
      ``"full"`` and ``"svd"`` mode (its parameters stay as they are; ``rec.module`` is the module
      inside, ``rec.wrapped`` the wrapper) and refused in ``"lora"`` mode, where it would neither
      see the slot nor get gradients for the weights it registered. After :meth:`trajectory` a
      wrapper built around the LoRA slot is stale (the slot is gone): build a new DDP for training.

    :meth:`save` then writes the path on rank 0 and checks it on every rank (its own nodes and
    probe outputs, :func:`~disback_core.distributed.share_trajectory`), and
    :func:`~disback_core.attach.attach` refuses ranks that hold different paths.

    The recording loss must be computed with :attr:`module` (the degrading copy): :meth:`update`
    refuses a loss that gives its trainable parameters no gradient, and a node equal to the previous
    one (the module did not move) is an error, since such a path silently holds only the teacher.
    """

    def __init__(
        self,
        teacher: nn.Module,
        module: nn.Module | None = None,
        *,
        interval: int | None = None,
        steps: int | None = None,
        nodes: int | None = None,
        mode: str = "lora",
        lora: LoraSpec | None = None,
        probe: Tensor | tuple[Tensor, Any, Any] | None = None,
        call: str | Callable[..., Tensor] = DEFAULT_CALL,
        call_name: str | None = None,
        merge: bool = True,
        lr: float = 1e-4,
        degradation_lr_scale: float | None = None,
        optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None,
        max_grad_norm: float | None = None,
        average_grads: bool | None = None,
        wrap: Callable[[nn.Module], nn.Module] | None = None,
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if average_grads not in (None, True, False):
            raise TypeError(f"average_grads must be None (automatic), True or False, got {average_grads!r}")
        if wrap is not None and not callable(wrap):
            raise TypeError(f"wrap must be a function module -> wrapped module (e.g. DDP), got {wrap!r}")
        if optimizer is not None and degradation_lr_scale is not None:
            raise ValueError(
                "degradation_lr_scale scales the recorder's own Adam; with optimizer= set the learning rate in your factory"
            )
        check_number("lr", lr, low=0.0, low_open=True)
        self.lr_scale = resolve_lr_scale(mode, degradation_lr_scale) if optimizer is None else 1.0
        self.lr = lr * self.lr_scale
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be an nn.Module, got {type(teacher).__name__}")
        self.interval, self.max_nodes = _interval(interval, steps, nodes)
        self.call_name, fn = resolve_call(call, call_name)
        self.call: Callable[..., Tensor] = fn
        self.teacher, self.mode, self.merge = teacher, mode, merge
        self._make_optimizer = optimizer or (lambda params: torch.optim.Adam(params, lr=self.lr))
        self.max_grad_norm = max_grad_norm
        self.optimizer: torch.optim.Optimizer | None = None  # made by the first update()
        self.spec = (lora or LoraSpec()).resolved(teacher) if mode in ("lora", "svd") else None
        self.owned = module is None
        given_wrapper: nn.Module | None = None
        if module is not None and _is_ddp(module):
            if wrap is not None:
                raise ValueError(
                    "module is already a DistributedDataParallel wrapper: pass wrap= or a wrapper, not both"
                )
            if mode == "lora":
                raise ValueError(
                    "module is a DistributedDataParallel wrapper built before the recorder put its LoRA slot on "
                    "the module: DDP registers the parameters that require a gradient when it is built, so it "
                    "would not average the slot's factors and would wait for gradients of the frozen weights. "
                    "Pass the bare module (the recorder averages the gradients over ranks itself), or "
                    "wrap=DistributedDataParallel (it wraps rec.module after the slot is on it; compute the loss "
                    "with rec.wrapped), or build DDP(rec.module) after the recorder with average_grads=False"
                )
            inner = module.module
            if not isinstance(inner, nn.Module):
                raise TypeError(f"the DDP wrapper holds no module ({type(inner).__name__})")
            given_wrapper, module = module, inner
        if module is None:
            module = copy.deepcopy(teacher).train()
            module.requires_grad_(True)
        elif module is teacher:
            raise ValueError(
                "module must be a copy of the teacher (e.g. copy.deepcopy(teacher)), not the teacher itself"
            )
        else:
            _check_same_weights(module, teacher)
        self.module: nn.Module = module
        self._flags = [(p, p.requires_grad) for p in module.parameters()]
        # A module in other dtypes than the teacher's (fp32 beside a bf16 teacher): node outputs are
        # recorded by a copy of the teacher holding the node in the teacher's precision (_precise_work).
        self._cast = _dtypes(module) != _dtypes(teacher)
        # Low-precision teacher (bf16/fp16): the module's output with an unmerged LoRA slot is not what the
        # target computes with the node written into the weights; record what the target will compute.
        self._precise = self._cast or any(
            d.is_floating_point and d not in (torch.float32, torch.float64) for d in _dtypes(teacher).values()
        )
        self._work: nn.Module | None = None
        self._svd_base: dict[str, Tensor] | None = None
        if mode == "lora":
            inject_lora(module, self._lora_spec())
        elif mode == "svd":
            self._targets = lora_targets(teacher, self.spec)
            self._svd_work = freeze(copy.deepcopy(teacher))
            if self._cast:  # the deltas are taken against the module's own start, not the cast teacher
                start = _state(module)
                self._svd_base = {
                    f"{t.name}.weight": start[f"{t.name}.weight"].detach().to("cpu", copy=True) for t in self._targets
                }
            if self.owned:  # train only what a node can hold, so the SVD error is the whole error
                keep = {f"{t.name}.weight" for t in self._targets}
                for name, p in module.named_parameters():
                    p.requires_grad_(name in keep)
        self.probe: tuple[Tensor, Tensor, Any] | None = None
        self.outputs: list[Tensor] = []
        self._last_out: Tensor | None = None  # the module's own output at the last node (has it moved?)
        self.nodes: list[dict[str, Tensor]] = []
        self.node_steps: list[int] = []
        self.svd_error: list[float] = []
        self.svd_output_error: list[float] = []
        self.steps_done = 0
        self._finished: Trajectory | None = None
        self._t0 = time.perf_counter()
        if not self.parameters():  # else the first update() fails inside torch ("empty parameter list")
            raise ValueError(
                f"module has no trainable parameters for a {mode!r} recording: every parameter has "
                "requires_grad=False (a copy of a frozen teacher?). Call module.requires_grad_(True) first"
            )
        # Distributed: the module the loss is computed with, whether a DDP wrapper averages its
        # gradients, and whether they were averaged since the last optimizer step.
        self.wrapped: nn.Module = given_wrapper if given_wrapper is not None else (wrap(module) if wrap else module)
        self._ddp = _is_ddp(self.wrapped)
        self.average_grads = average_grads
        self._averaged = False
        self._hook: Any = None
        if self.averaging():
            broadcast_parameters(self.parameters())  # one start on every rank (DDP does the same when built)
            self._hook = _register_step_hook(self)
        if probe is not None:
            self.set_probe(probe)

    def averaging(self) -> bool:
        """Whether the recorder averages the gradients over ranks now: more than one rank, and
        ``average_grads`` True, or None with no DDP wrapper (:attr:`wrapped`) doing it."""
        if self.average_grads is False or world_size() < 2:
            return False
        return self.average_grads is True or not self._ddp

    def average_gradients(self) -> None:
        """Average the trainable parameters' gradients over ranks now (when :meth:`averaging`), once
        per optimizer step: :meth:`update` calls it after ``backward``; with your own optimizer, call
        it after ``backward`` if you clip the gradients, else the optimizer's step does it. A
        parameter without a gradient on every rank is left alone. Collective: every rank calls it."""
        if self._averaged or not self.averaging():
            return
        allreduce_grads(self.parameters(), only_present=True)
        self._averaged = True

    def _before_step(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer step pre-hook: average this recorder's gradients before an optimizer that
        holds its parameters steps, unless done already since the last :meth:`step`."""
        if self._averaged or optimizer is self.optimizer or not self.averaging():
            return
        mine = {id(p) for p in self.parameters()}
        if any(id(p) in mine for group in optimizer.param_groups for p in group["params"]):
            self.average_gradients()

    def set_probe(self, probe: Tensor | tuple[Tensor, Any, Any]) -> None:
        """Set the probe (see ``probe`` above) before the first node; records the teacher's outputs on it."""
        if self.nodes:
            raise RuntimeError("set the probe before the first node is taken")
        inputs = _probe(probe, self.teacher)
        self.probe = inputs
        if inputs is None:
            raise TypeError("probe must be clean samples x0 (a tensor) or a tuple (x, sigma, cond), not None")
        self.outputs = [_run(self.teacher, self.call, inputs)]
        self._last_out = _run(self.module, self.call, inputs) if self._cast else self.outputs[0]

    def _lora_spec(self) -> LoraSpec:
        """The resolved LoRA spec of a ``"lora"``/``"svd"`` recorder (``__init__`` sets it for those modes)."""
        if self.spec is None:
            raise RuntimeError(f"a {self.mode!r} recorder has no LoRA spec (DegradationRecorder.spec is None)")
        return self.spec

    def parameters(self) -> list[nn.Parameter]:
        """What to optimise: the LoRA factors (``"lora"``) or the module's trainable parameters."""
        if self.mode == "lora":
            return lora_parameters(self.module)
        return [p for p in self.module.parameters() if p.requires_grad]

    def update(self, loss: Tensor, probe: Tensor | tuple[Tensor, Any, Any] | None = None) -> bool:
        """One optimizer step of the degrading score on the user's ``loss`` (computed with
        :attr:`module`), with the recorder's own optimizer (Adam at ``lr`` unless ``optimizer=``),
        then :meth:`step`. Returns True when a node was taken."""
        if self.optimizer is None:
            self.optimizer = self._make_optimizer(self.parameters())
        self.optimizer.zero_grad(set_to_none=True)
        self._averaged = False
        if not isinstance(loss, Tensor) or not loss.requires_grad:
            raise ValueError(
                "the recording loss has no gradient: compute it with rec.module (the degrading copy), "
                "e.g. rec.update(my_fake_score_loss(rec.module, x0))"
            )
        loss.backward()
        if not any(p.grad is not None and bool(p.grad.ne(0).any()) for p in self.parameters()):
            raise ValueError(
                "the recording loss gives rec.module's trainable parameters no gradient: compute it with "
                "rec.module (the degrading copy), not with another module (e.g. your own fake score when the "
                "recorder made its own copy, or the teacher); otherwise every node would be the teacher"
            )
        self.average_gradients()  # under torch.distributed: one gradient on every rank, before clipping
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.parameters(), self.max_grad_norm)
        self.optimizer.step()
        return self.step(probe)

    def step(self, probe: Tensor | tuple[Tensor, Any, Any] | None = None) -> bool:
        """Count one optimizer step of the degrading score; take a node every ``interval`` steps.
        ``probe``: while no probe is set, this step's G0 samples ``x0`` (or ready inputs
        ``(x, sigma, cond)``) become the probe. Returns True when a node was taken."""
        if self._finished is not None:
            raise RuntimeError("this recorder has finished (trajectory() was called); make a new one")
        self._averaged = False  # the next optimizer step needs its gradients averaged again
        if probe is not None and self.probe is None and not self.nodes:
            self.set_probe(probe[:16] if isinstance(probe, Tensor) else probe)
        self.steps_done += 1
        if self.steps_done % self.interval or (self.max_nodes is not None and len(self.nodes) >= self.max_nodes):
            return False
        self.snapshot()
        return True

    def snapshot(self) -> None:
        """Take a node now (``step`` does it every ``interval`` steps)."""
        probe = self.probe
        out = _run(self.module, self.call, probe) if probe is not None else None
        previous = self._last_out
        if out is not None and previous is not None and torch.equal(out, previous):
            raise RuntimeError(
                f"degradation node {len(self.nodes) + 1} gives exactly the outputs of the node before it: "
                "rec.module did not move. Train rec.module itself (rec.update(loss on rec.module), or step "
                "an optimizer over rec.parameters() and call rec.step())"
            )
        self._last_out = out
        if self.mode == "lora":
            self.nodes.append(lora_state(self.module))
        elif self.mode == "full":
            self.nodes.append({k: v.detach().to("cpu").clone() for k, v in self.module.state_dict().items()})
        else:
            base = _state(self.teacher)
            scale = self._lora_spec().scale
            node, err = svd_lora(self._targets, self._svd_base or base, _state(self.module), scale)
            self.nodes.append(node)
            self.svd_error.append(err)
            work = _state(self._svd_work)
            with torch.no_grad():
                for t in self._targets:
                    key = f"{t.name}.weight"
                    work[key].copy_(node_weight(base[key], node, t.name, scale))
            if out is not None and probe is not None:  # out is None exactly when there is no probe
                full_out = out
                out = _run(self._svd_work, self.call, probe)
                self.svd_output_error.append(
                    float((out - full_out).norm() / (full_out - self.outputs[0]).norm().clamp_min(1e-12))
                )
        if out is not None and probe is not None and self._precise and self.mode != "svd":
            out = _run(self._precise_work(self.nodes[-1]), self.call, probe)
        if out is not None:
            self.outputs.append(out)
        self.node_steps.append(self.steps_done)
        log.info("degradation node %d at step %d", len(self.nodes), self.steps_done)

    def _precise_work(self, node: dict[str, Tensor]) -> nn.Module:
        """A copy of the teacher (its dtypes, sharing the tensors a node leaves alone) holding ``node``,
        written as :meth:`Trajectory.write` writes it: the node in the teacher's own precision."""
        base = _state(self.teacher)
        if self.mode == "lora":
            scale = self._lora_spec().scale
            touched = {f"{layer}.weight" for layer in node_layers(node)}
        else:
            touched = set(base)
        if self._work is None:
            memo = {id(t): t for n, t in base.items() if n not in touched}
            self._work = _deepcopy_quietly(self.teacher, memo).eval()
        work = _state(self._work)
        with torch.no_grad():
            for name in touched:
                b = base[name].to(work[name].device, work[name].dtype)
                if self.mode == "lora":
                    write_node_weight_(work[name], b, node, name[: -len(".weight")], scale)
                else:
                    work[name].copy_(node[name])
        return self._work

    def trajectory(self, meta: dict[str, Any] | None = None) -> Trajectory:
        """Finish: the recorded path (node 0 = teacher). In ``"lora"`` mode the slot is taken off the
        module and its ``requires_grad`` flags restored. Calling it again returns the same path."""
        if self._finished is not None:
            return self._finished
        if not self.nodes:
            raise ValueError(f"no node recorded yet: {self.steps_done} steps done, a node every {self.interval}")
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.mode == "lora":
            remove_lora(self.module)
        for p, flag in self._flags:
            p.requires_grad_(flag)
        info = {
            "mode": self.mode,
            "steps": self.steps_done,
            "interval": self.interval,
            "seconds": time.perf_counter() - self._t0,
            **(meta or {}),
        }
        if self.mode == "svd":
            info["svd_error"] = self.svd_error  # relative Frobenius error of the weight deltas
            info["svd_output_error"] = self.svd_output_error  # ||svd - full|| / ||full - teacher|| on the probe
        probe = None
        if self.probe is not None:
            x, sigma, cond = self.probe
            probe = Probe(
                x.detach().cpu(),
                torch.as_tensor(sigma).detach().cpu(),
                map_cond(lambda t: t.detach().cpu(), cond),
                self.outputs,
            )
        self._finished = Trajectory(
            self.teacher,
            self.nodes,
            kind="full" if self.mode == "full" else "lora",
            lora=self.spec,
            steps=self.node_steps,
            merge=self.merge,
            probe=probe,
            meta=info,
            call=self.call,
            call_name=self.call_name,
        )
        return self._finished

    def save(self, path: str | os.PathLike, *, rtol: float | None = None) -> Path:
        """Finish and write the trajectory folder (verified on load by :meth:`Trajectory.load`).

        Under ``torch.distributed`` with more than one rank (collective: every rank calls it with the
        same ``path``, on a file system they share): rank 0 writes, all ranks wait, then every rank
        loads the folder and checks it against its own recording: the same nodes, and its own probe
        outputs reproduced on its own probe inputs (within ``rtol``); the manifest's sha256 and the
        teacher's fingerprint are compared across ranks. Any mismatch is a ``RuntimeError`` on every
        rank, naming the ranks (:func:`~disback_core.distributed.share_trajectory`)."""
        trajectory = self.trajectory()
        if world_size() < 2:
            return trajectory.save(path)
        share_trajectory(trajectory, path, self.teacher, merge=self.merge, call=self.call, rtol=rtol)
        return Path(path)


def _is_ddp(module: Any) -> bool:
    """A ``DistributedDataParallel`` wrapper (which averages its parameters' gradients itself)."""
    return isinstance(module, torch.nn.parallel.DistributedDataParallel)


def _register_step_hook(recorder: DegradationRecorder) -> Any:
    """A global optimizer step pre-hook averaging ``recorder``'s gradients before a user's optimizer
    over its parameters steps (it holds the recorder weakly; :meth:`trajectory` removes it)."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    ref = weakref.ref(recorder)
    handles: list[Any] = []

    def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        rec = ref()
        if rec is None:  # the recorder is gone unfinished: nothing left to average
            handles[0].remove()
            return
        rec._before_step(optimizer)

    handles.append(register_optimizer_step_pre_hook(hook))
    return handles[0]


def _interval(interval: int | None, steps: int | None, nodes: int | None) -> tuple[int, int | None]:
    if interval is not None:
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"interval must be an integer >= 1, got {interval!r}")
        if steps is not None and steps < interval:
            raise ValueError(f"need 1 <= interval <= steps, got interval={interval}, steps={steps}")
        return interval, nodes
    if steps is None or nodes is None:
        raise ValueError("give interval=, or steps= and nodes= (a node every steps // nodes steps)")
    if not (isinstance(steps, int) and isinstance(nodes, int)) or nodes < 1 or steps < nodes:
        raise ValueError(f"need integers 1 <= nodes <= steps, got steps={steps!r}, nodes={nodes!r}")
    return steps // nodes, nodes


def _dtypes(module: nn.Module) -> dict[str, torch.dtype]:
    return {k: v.dtype for k, v in module.state_dict().items()}


def _check_same_weights(module: nn.Module, teacher: nn.Module) -> None:
    """``module`` holds the teacher's weights, compared in the less precise of their dtypes (the
    fp32 weights a bf16 teacher was cast from fit it: DMD2's SD layout)."""
    a, b = module.state_dict(), teacher.state_dict()
    if set(a) != set(b):
        diff = sorted(set(a) ^ set(b))
        raise ValueError(f"module must be a copy of the teacher; their tensors differ, e.g. {diff[:3]}")
    dtype = lowest_float_dtype({f"{i}": t for i, t in enumerate([*a.values(), *b.values()])})
    if tensors_fingerprint(a, dtype) != tensors_fingerprint(b, dtype):
        da, db = lowest_float_dtype(a), lowest_float_dtype(b)
        if da == db:
            raise ValueError("module must start as a copy of the teacher, but its weights differ from the teacher's")
        name = str(dtype).removeprefix("torch.")
        raise ValueError(
            f"module must start as a copy of the teacher, but its weights differ from the teacher's even "
            f"compared in {name} (module {str(da).removeprefix('torch.')}, teacher "
            f"{str(db).removeprefix('torch.')}): it is not a cast of the same weights. Pass the "
            "teacher the module was copied from, or a copy of the teacher cast to the dtype you train in "
            "(e.g. copy.deepcopy(teacher).float())"
        )


def _probe(probe: Any, teacher: nn.Module) -> tuple[Tensor, Tensor, Any] | None:
    if probe is None:
        return None
    if isinstance(probe, Tensor):
        return probe_inputs(probe.detach(), **_sigma_range(teacher))
    if not (isinstance(probe, (tuple, list)) and len(probe) == 3 and isinstance(probe[0], Tensor)):
        raise TypeError("probe must be clean samples x0 (a tensor) or a tuple (x, sigma, cond)")
    x, sigma, cond = probe
    sigma = torch.as_tensor(sigma, device=x.device)
    if sigma.ndim != 1 or sigma.shape[0] != x.shape[0]:
        raise ValueError(f"probe sigma must have shape [{x.shape[0]}] (one per sample), got {tuple(sigma.shape)}")
    if cond is not None and cond_rows(cond) != {x.shape[0]}:
        raise ValueError(
            f"probe cond must be a tensor, or a dict of tensors, with {x.shape[0]} rows (one per "
            f"sample) in every tensor; got rows {sorted(cond_rows(cond))}"
        )
    return x.detach(), sigma, cond


def _loss_fn(method: Any) -> Callable[[nn.Module, Tensor, Any], Tensor]:
    """The degrading score's loss: ``method.dsm_loss`` of a ScoreDistiller, or a callable
    ``loss(net, x0, cond)`` / ``loss(net, x0)``."""
    if callable(getattr(method, "dsm_loss", None)):
        return lambda net, x, cond: method.dsm_loss(x, net, cond)
    if callable(method):
        if takes_args(method, 3):
            return lambda net, x, cond: method(net, x, cond)
        if takes_args(method, 2):

            def two(net: nn.Module, x: Tensor, cond: Any) -> Tensor:
                if cond is not None:
                    raise ValueError("the loss takes (net, x0) but the batch has a cond")
                return method(net, x)

            return two
    raise TypeError(
        f"method must be a ScoreDistiller (with dsm_loss) or a loss callable loss(net, x0[, cond]); "
        f"got {type(method).__name__}"
    )


def record_degradation(
    teacher: nn.Module,
    generator: Callable[..., Tensor],
    method: Any,
    sample: Callable[[], Any],
    *,
    steps: int,
    interval: int | None = None,
    nodes: int | None = None,
    lr: float = 1e-4,
    degradation_lr_scale: float | None = None,
    optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None,
    mode: str = "lora",
    lora: LoraSpec | None = None,
    merge: bool = True,
    probe_size: int = 16,
    max_grad_norm: float | None = None,
    seed: int | None = None,
    wrap: Callable[[nn.Module], nn.Module] | None = None,
    progress: bool = False,
) -> Trajectory:
    """Record the degradation path of ``teacher`` toward the frozen generator ``generator`` (G0).

    Args:
        teacher: the teacher denoiser ``D(x_t, sigma, cond)``; frozen here, not modified.
        generator: G0, called as ``generator(z, cond)`` (or ``generator(z)``) under ``no_grad``; not updated.
        method: the base method (its :meth:`dsm_loss`, its own fake-score loss, trains the degrading
            score), or a loss callable ``loss(net, x0, cond)`` / ``loss(net, x0)``.
        sample: returns a :class:`~disback_core.step.Batch`, a noise tensor ``z``, or ``(z, cond)``.
        steps: Alg. 1's N1; ``interval`` (its saving interval) or ``nodes`` (interval ``steps // nodes``).
        lr: the fake score's learning rate; the recording's Adam trains at ``degradation_lr_scale * lr``.
        degradation_lr_scale: default the measured :data:`DEGRADATION_LR_SCALE` (3 for LoRA nodes, 1
            for full and SVD nodes); ``1`` records the paper's path.
        optimizer: a factory ``optimizer(params)`` replacing that Adam (its learning rate is yours).
        mode: ``"lora"``, ``"svd"`` or ``"full"`` (see the module docstring).
        lora: rank, alpha and target modules for ``"lora"`` / ``"svd"``.
        merge: passed to the :class:`Trajectory` (merged or unmerged targets).
        seed: seeds the recording's randomness (sigmas, noise) without touching the caller's RNG state.
        wrap: applied once to the degrading score before training, e.g. ``DistributedDataParallel``
            so that its gradients are averaged over ranks; without a DDP wrapper the recorder averages
            them itself under ``torch.distributed`` (:class:`DegradationRecorder`, "Distributed"). Then
            :func:`~disback_core.distributed.share_trajectory`.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if interval is None and nodes is None:
        raise ValueError("give interval= or nodes=")
    if not callable(generator):
        raise TypeError(f"generator must be callable as generator(z, cond), got {type(generator).__name__}")
    check_denoiser(teacher, "teacher")
    loss_fn = _loss_fn(method)
    freeze(teacher)
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices, enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        rec = DegradationRecorder(
            teacher,
            None,
            interval=interval,
            steps=steps,
            nodes=nodes,
            mode=mode,
            lora=lora,
            merge=merge,
            lr=lr,
            degradation_lr_scale=degradation_lr_scale,
            optimizer=optimizer,
            max_grad_norm=max_grad_norm,
            wrap=wrap,
        )
        first = as_batch(sample())
        cond = map_cond(lambda t: t[:probe_size], first.cond)
        with torch.no_grad():
            x0 = call_generator(generator, first.z[:probe_size], cond)
        rec.set_probe(probe_inputs(x0, cond, **_sigma_range(teacher)))
        degrading = rec.wrapped
        losses, running = [], 0.0
        it = range(1, steps + 1)
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(it, desc=f"degradation recording ({mode})", leave=False)
        for i in it:
            batch = first if i == 1 else as_batch(sample())
            with torch.no_grad():
                x = call_generator(generator, batch.z, batch.cond)
            loss = loss_fn(degrading, x, batch.cond)
            running += float(loss.detach())
            if rec.update(loss):
                losses.append(running / rec.interval)
            if i % rec.interval == 0:
                running = 0.0
    return rec.trajectory(
        {"method": type(method).__name__, "steps": steps, "dsm_loss": losses, "lr": rec.lr, "lr_scale": rec.lr_scale}
    )


class _SigmaRange(TypedDict):
    sigma_min: float
    sigma_max: float


def _sigma_range(teacher: nn.Module) -> _SigmaRange:
    """Probe sigmas in [0.05, 20], within the teacher's ``sigma_min``/``sigma_max`` if it declares them
    (as a DDPM-schedule model does)."""
    return {
        "sigma_min": max(0.05, float(getattr(teacher, "sigma_min", 0.0)) * 1.01),
        "sigma_max": min(20.0, float(getattr(teacher, "sigma_max", math.inf)) * 0.99),
    }
