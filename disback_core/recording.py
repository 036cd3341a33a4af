"""Degradation Recording (DisBack, Zhang et al. 2025, Alg. 1).

Starting from a copy of the teacher, a *degrading* score is fitted by the base method's own DSM
loss to samples of the frozen initial generator ``G0``; a node is taken every ``interval`` steps.
The path runs from the teacher (node 0) to a score that fits ``G0`` (node N).

Three node modes:

- ``"lora"``: the degrading score is itself a LoRA on the frozen teacher; nodes are exact and small.
- ``"svd"``: the weights of the LoRA-targeted layers are fine-tuned at full rank (biases, norms
  and embeddings stay the teacher's: a node cannot hold them); each node is compressed to the LoRA
  rank by a truncated SVD of its weight deltas (errors in ``trajectory.meta["svd_error"]`` and
  ``["svd_output_error"]``).
- ``"full"``: full fine-tuning, full nodes (the reference's format, for comparison).
"""
from __future__ import annotations

import copy
import logging
import math
import time
from typing import Any, Callable

import torch
from torch import nn

from .denoisers import freeze, pad_dims, trainable_copy
from .lora import LoraSpec, inject_lora, lora_layers, lora_state, svd_lora
from .protocol import ScoreDistiller
from .step import Batch
from .trajectory import Probe, Trajectory

__all__ = ["record_degradation", "MODES"]

log = logging.getLogger(__name__)
MODES = ("lora", "svd", "full")


def _make_probe(teacher: nn.Module, generator: Callable, batch: Batch, size: int
                ) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """Generator samples noised at geometrically spaced sigmas in [0.05, 20] (within the teacher's
    ``sigma_min``/``sigma_max`` if it declares them, as a DDPM-schedule model does); fixed for the run."""
    z = batch.z[:size]
    cond = batch.cond[:size] if isinstance(batch.cond, torch.Tensor) else None
    with torch.no_grad():
        x = generator(z, cond)
    n = x.shape[0]
    lo = max(0.05, float(getattr(teacher, "sigma_min", 0.0)) * 1.01)
    hi = min(20.0, float(getattr(teacher, "sigma_max", math.inf)) * 0.99)
    sigma = torch.logspace(math.log10(lo), math.log10(hi), n, device=x.device)
    gen = torch.Generator(device="cpu").manual_seed(1234)
    noise = torch.randn(x.shape, generator=gen).to(x.device, x.dtype)
    return x + pad_dims(sigma, x) * noise, sigma, cond


def record_degradation(teacher: nn.Module, generator: Callable, method: ScoreDistiller,
                       sample: Callable[[], Batch], *, steps: int, interval: int, lr: float = 1e-4,
                       optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None,
                       mode: str = "lora", lora: LoraSpec | None = None, merge: bool = True,
                       probe_size: int = 16, max_grad_norm: float | None = None,
                       progress: bool = False) -> Trajectory:
    """Record the degradation path of ``teacher`` toward the frozen generator ``generator`` (G0).

    Args:
        teacher: the frozen teacher denoiser; it is not modified.
        generator: G0, called as ``generator(z, cond)`` under ``no_grad``; it is not updated.
        method: the base method; its :meth:`dsm_loss` (its own fake-score loss) trains the degrading score.
        sample: returns a :class:`~disback_core.step.Batch` (``z`` and ``cond``) per step.
        steps, interval: ``steps // interval`` nodes, one every ``interval`` steps (Alg. 1's N1 and
            its saving interval).
        lr / optimizer: Adam with ``lr`` unless a factory ``optimizer(params)`` is given.
        mode: ``"lora"``, ``"svd"`` or ``"full"`` (see the module docstring).
        lora: rank, alpha and target modules for ``"lora"`` / ``"svd"`` (default rank 8, all
            Linear/Conv2d layers, or the usual set for diffusers UNets).
        merge: passed to the :class:`Trajectory` (merged or unmerged targets).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if interval < 1 or steps < interval:
        raise ValueError(f"need 1 <= interval <= steps, got interval={interval}, steps={steps}")
    spec = (lora or LoraSpec()).resolved(teacher) if mode in ("lora", "svd") else None
    freeze(teacher)
    if mode == "lora":
        degrading = inject_lora(copy.deepcopy(teacher), spec)
        degrading.train()
    else:
        degrading = trainable_copy(teacher)
    svd_work = inject_lora(copy.deepcopy(teacher), spec) if mode == "svd" else None
    if svd_work is not None:
        # Train only what a node can hold, so that the SVD error is the whole approximation error
        # (on the digits UNet, free biases and norms alone left an 18-28% output error at exact rank).
        keep = {f"{name}.weight" for name, _ in lora_layers(svd_work)}
        for name, p in degrading.named_parameters():
            p.requires_grad_(name in keep)
    params = [p for p in degrading.parameters() if p.requires_grad]
    opt = optimizer(params) if optimizer is not None else torch.optim.Adam(params, lr=lr)
    base_weights = {k: v.detach() for k, v in teacher.named_parameters()}

    first = sample()
    px, psigma, pcond = _make_probe(teacher, generator, first, probe_size)
    with torch.no_grad():
        outputs = [teacher(px, psigma, pcond).detach().cpu()]
    nodes, node_steps, losses, svd_err, svd_out_err = [], [], [], [], []
    running, t0 = 0.0, time.perf_counter()
    it = range(1, steps + 1)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=f"degradation recording ({mode})", leave=False)
    for i in it:
        batch = first if i == 1 else sample()
        with torch.no_grad():
            x = generator(batch.z, batch.cond)
        loss = method.dsm_loss(x, degrading, batch.cond)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        running += float(loss.detach())
        if i % interval:
            continue
        losses.append(running / interval)
        running = 0.0
        with torch.no_grad():
            full_out = degrading(px, psigma, pcond).detach().cpu()
        if mode == "lora":
            nodes.append(lora_state(degrading))
            outputs.append(full_out)
        elif mode == "full":
            nodes.append({k: v.detach().to("cpu").clone() for k, v in degrading.state_dict().items()})
            outputs.append(full_out)
        else:
            node, err = svd_lora(svd_work, base_weights, dict(degrading.named_parameters()))
            nodes.append(node)
            with torch.no_grad():
                out = svd_work(px, psigma, pcond).detach().cpu()
            outputs.append(out)
            svd_err.append(err)
            svd_out_err.append(float((out - full_out).norm() / (full_out - outputs[0]).norm().clamp_min(1e-12)))
        node_steps.append(i)
        log.info("degradation node %d at step %d: DSM loss %.4g", len(nodes), i, losses[-1])
    meta = {"method": type(method).__name__, "mode": mode, "steps": steps, "interval": interval,
            "dsm_loss": losses, "seconds": time.perf_counter() - t0}
    if mode == "svd":
        meta["svd_error"] = svd_err  # relative Frobenius error of the weight deltas
        meta["svd_output_error"] = svd_out_err  # ||node_svd - node_full|| / ||node_full - teacher|| on the probe
    probe = Probe(px.detach().cpu(), psigma.detach().cpu(), None if pcond is None else pcond.detach().cpu(), outputs)
    return Trajectory(teacher, nodes, kind="full" if mode == "full" else "lora", lora=spec, steps=node_steps,
                      merge=merge, probe=probe, meta=meta)
