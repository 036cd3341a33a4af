"""DisBack in a DMD2 loop for a flow-matching transformer (SD3) that calls the raw diffusers model.

    python examples/wrap_flow_loop.py              # plain, then with DisBack, a tiny SD3Transformer2DModel
    python examples/show_diff.py wrap_flow_loop    # the diff against the user's loop

The user's code is ``examples/foreign/flow_dmd.py`` (FastGen / diffusers-SD3-script style, no
library): raw ``transformer(hidden_states=x_t, timestep=1000 * t, encoder_hidden_states=...,
pooled_projections=..., return_dict=False)[0]`` velocity calls on ``x_t = (1 - t) x0 + t eps``, its
own flow-matching fake-score loss at logit-normal times, a one-step generator from ``t = 1``, DMD2's
generator loss with the ``abs_mean`` normaliser and a guided teacher. DisBack does not convert that
code to the library's ``D(x, sigma, cond)`` frame (no ``FlowMatchDenoiser``):

1. Degradation Recording runs the user's own ``fake_score_loss`` on ``rec.module`` (the user's
   ``fake_transformer`` with a LoRA slot) at the samples of the frozen initial generator; the probe is
   a batch of the loss's own inputs ``(x_t, 1000 t, condition)``, run by :func:`sd3_call`, the
   transformer's own keyword call.
2. ``attach`` writes the LoRA nodes into the user's ``real_transformer`` in place (node N-1 down to
   the teacher, so the guided teacher is guided at every node) and loads node N into
   ``fake_transformer``; ``att.step()`` after each generator update moves it by the schedule.

The three traps, avoided here: the recording loss is computed on ``rec.module``; ``attach`` comes
after the generator was copied from the teacher (a copy made later would start from node N-1); and
``attach`` is given a schedule (without one the teacher never comes back: node N-1 for the whole run).
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import SD3Transformer2DModel
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from foreign.flow_dmd import (  # noqa: E402
    dmd2_flow_loop,
    fake_score_loss,
    forward_process,
    logit_normal_t,
    null_condition,
    one_step,
    predict_x0,
    random_prompts,
    sample_condition,
    tiny_sd3,
)
from show_diff import summary  # noqa: E402

from disback_core import DegradationRecorder, FixedInterval, attach  # noqa: E402


def sd3_call(transformer: SD3Transformer2DModel, x_t: Tensor, timestep: Tensor, condition: dict[str, Tensor]) -> Tensor:
    """How the probe runs the raw transformer: its own keyword call (``timestep`` in 0..1000, ``condition``
    its conditioning keywords), returning the velocity."""
    return transformer(hidden_states=x_t, timestep=timestep, **condition, return_dict=False)[0]


def dmd2_flow_loop_disback(real_transformer: SD3Transformer2DModel, *, iterations: int, batch_size: int = 4,
                   lr: float = 1e-4, guidance_scale: float = 4.5, student_update_freq: int = 2,
                   max_grad_norm: float = 1.0, seed: int = 0, record_steps: int = 100, nodes: int = 5, every: int = 4) -> dict[str, float]:
    """DMD2 for a rectified-flow transformer, one-step generator from pure noise. Returns the last losses."""
    torch.manual_seed(seed)
    real_transformer.requires_grad_(False)
    generator = copy.deepcopy(real_transformer).requires_grad_(True)
    fake_transformer = copy.deepcopy(real_transformer).requires_grad_(True)
    prompts = random_prompts(real_transformer, 64, seed)
    negative = null_condition(prompts, batch_size)
    cfg = real_transformer.config
    shape = (batch_size, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    rec = DegradationRecorder(real_transformer, fake_transformer, steps=record_steps, nodes=nodes, lr=lr, call=sd3_call)
    for _ in range(record_steps):
        condition, eps, t = sample_condition(prompts, batch_size), torch.randn(shape), logit_normal_t(batch_size)
        with torch.no_grad():
            x0 = one_step(generator, torch.randn(shape), condition)
        rec.update(fake_score_loss(rec.module, x0, eps, t, condition), probe=(forward_process(x0, eps, t), t * 1000, condition))
    att = attach(real_transformer, rec.trajectory(), FixedInterval(every), fake=fake_transformer, call=sd3_call)
    optimizer_g = torch.optim.AdamW(generator.parameters(), lr=lr, weight_decay=0.01)
    optimizer_fake = torch.optim.AdamW(fake_transformer.parameters(), lr=lr, weight_decay=0.01)
    losses: dict[str, float] = {}
    for step in range(iterations):
        condition = sample_condition(prompts, batch_size)
        z, eps, t = torch.randn(shape), torch.randn(shape), logit_normal_t(batch_size)
        if step % student_update_freq == 0:
            # generator turn: one step from noise, then DMD2's distribution matching in x0 space
            x0 = one_step(generator, z, condition)
            with torch.no_grad():
                x_t = forward_process(x0, eps, t)
                pred_fake = predict_x0(fake_transformer, x_t, t, condition)
                pred_real = predict_x0(real_transformer, x_t, t, condition)
                pred_uncond = predict_x0(real_transformer, x_t, t, negative)
                pred_real = pred_real + (guidance_scale - 1) * (pred_real - pred_uncond)
                normalizer = (x0 - pred_real).abs().mean(dim=[1, 2, 3], keepdim=True)
                grad = torch.nan_to_num((pred_fake - pred_real) / normalizer)
            loss_dm = 0.5 * F.mse_loss(x0, (x0 - grad).detach())
            optimizer_g.zero_grad()
            loss_dm.backward()
            torch.nn.utils.clip_grad_norm_(generator.parameters(), max_grad_norm)
            optimizer_g.step()
            att.step()
            losses["loss_dm"] = loss_dm.item()
        else:
            # fake-score turn: flow matching on the generator's detached samples
            with torch.no_grad():
                x0 = one_step(generator, z, condition)
            loss_fake = fake_score_loss(fake_transformer, x0, eps, t, condition)
            optimizer_fake.zero_grad()
            loss_fake.backward()
            torch.nn.utils.clip_grad_norm_(fake_transformer.parameters(), max_grad_norm)
            optimizer_fake.step()
            losses["loss_fake"] = loss_fake.item()
    return {**losses, "attachment": att}


PLAIN, DISBACK = dmd2_flow_loop, dmd2_flow_loop_disback


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--record-steps", type=int, default=100)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    teacher = tiny_sd3(0)  # the user's pretrained transformer (random weights here)
    original = {k: v.clone() for k, v in teacher.state_dict().items()}
    plain = dmd2_flow_loop(copy.deepcopy(teacher), iterations=args.iterations)
    every = max(1, args.iterations // 2 // 10 // 4)  # a tenth of the generator updates on the 4 degraded targets
    out = dmd2_flow_loop_disback(teacher, iterations=args.iterations, record_steps=args.record_steps,
                                 nodes=5, every=every)
    return summary("DMD2 flow (SD3)", plain, out, out.pop("attachment"), teacher, original)


if __name__ == "__main__":
    main()
