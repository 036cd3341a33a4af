"""DisBack in DMD2's own EDM training loop: the loop stays the user's, ten lines change.

    python examples/wrap_dmd2_loop.py                 # plain DMD2, then DMD2 + DisBack, tiny models
    python examples/show_diff.py wrap_dmd2_loop       # the diff against the user's loop

The user's code is ``examples/foreign/dmd2_edm.py``: DMD2's structure (a guidance module holding a
frozen ``real_unet`` that its losses call directly, a trainable ``fake_unet`` and a GAN classifier
on its bottleneck; a unified model whose generator is a copy of the fake score; two-time-scale
turns) on NVlabs-style EDM networks whose layers are custom ``Conv2d``/``Linear`` classes.
:func:`train_dmd2_disback` is that trainer's loop with DisBack added:

1. Degradation Recording with the user's own fake-score loss (``compute_loss_fake``): a LoRA slot
   on the user's ``fake_unet`` is fitted to the frozen initial generator's samples; a node every
   ``record_steps // nodes`` steps.
2. ``attach`` writes the path's nodes into the user's ``real_unet`` in place (from node N-1 toward
   the teacher) and loads node N into the user's ``fake_unet``; ``att.step()`` after each
   generator update moves the node by the schedule.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from foreign.dmd2_edm import EDMUniModel, toy_images, train_dmd2  # noqa: E402  (the user's codebase)
from foreign.edm_distill import pretrain  # noqa: E402
from foreign.edm_networks import tiny_edm  # noqa: E402

from show_diff import summary  # noqa: E402

from disback_core import DegradationRecorder, FixedInterval, attach  # noqa: E402


def train_dmd2_disback(model: EDMUniModel, *, iterations: int, batch_size: int = 16, real_data: Tensor | None = None,
               lr_generator: float = 2e-6, lr_guidance: float = 2e-6, dfake_gen_update_ratio: int = 5,
               conditioning_sigma: float = 80.0, label_dim: int = 0, seed: int = 0,
               on_generator_step: Callable[[int], None] | None = None, real_labels: Tensor | None = None,
               gen_cls_loss_weight: float = 3e-3, cls_loss_weight: float = 1e-2, max_grad_norm: float = 10.0,
               betas: tuple[float, float] = (0.9, 0.999), record_steps: int = 100, nodes: int = 5, every: int = 4) -> dict[str, float]:
    """DMD2's ``Trainer.train_one_step`` in a loop; returns the last value of every loss.

    ``real_data`` (``[M, C, H, W]``; with integer ``real_labels`` ``[M]`` when ``label_dim``) feeds the GAN
    critic; without it the guidance turn trains the fake score only. ``on_generator_step(step)`` runs right
    after each generator update.
    """
    torch.manual_seed(seed)
    net = model.feedforward_model
    shape = (batch_size, net.img_channels, net.img_resolution, net.img_resolution)
    eye_matrix = torch.eye(label_dim)
    gm = model.guidance_model
    rec = DegradationRecorder(gm.real_unet, gm.fake_unet, steps=record_steps, nodes=nodes, lr=lr_guidance)
    for _ in range(record_steps):
        with torch.no_grad():
            fakes = net(torch.randn(shape) * conditioning_sigma, torch.ones(batch_size) * conditioning_sigma, None)
        rec.update(gm.compute_loss_fake(fakes, None)[0]['loss_fake_mean'], probe=fakes)
    att = model.attachment = attach(gm.real_unet, rec.trajectory(), FixedInterval(every), fake=gm.fake_unet)
    guidance_params = [p for p in model.guidance_model.parameters() if p.requires_grad]
    generator_params = [p for p in model.feedforward_model.parameters() if p.requires_grad]
    optimizer_guidance = torch.optim.AdamW(guidance_params, lr=lr_guidance, betas=betas, weight_decay=0.01)
    optimizer_generator = torch.optim.AdamW(generator_params, lr=lr_generator, betas=betas, weight_decay=0.01)
    losses: dict[str, float] = {}
    for step in range(iterations):
        model.train()
        real_train_dict = None
        if real_data is not None:
            idx = torch.randint(0, len(real_data), (batch_size,))
            real_label = eye_matrix[real_labels[idx]] if label_dim else None
            real_train_dict = {'real_image': real_data[idx], 'real_label': real_label}
        scaled_noise = torch.randn(shape) * conditioning_sigma
        timestep_sigma = torch.ones(batch_size) * conditioning_sigma
        labels = eye_matrix[torch.randint(0, label_dim, (batch_size,))] if label_dim else None
        COMPUTE_GENERATOR_GRADIENT = step % dfake_gen_update_ratio == 0

        generator_loss_dict, generator_log_dict = model(
            scaled_noise, timestep_sigma, labels, real_train_dict=real_train_dict,
            compute_generator_gradient=COMPUTE_GENERATOR_GRADIENT, generator_turn=True, guidance_turn=False)
        if COMPUTE_GENERATOR_GRADIENT:
            generator_loss = generator_loss_dict['loss_dm']
            if 'gen_cls_loss' in generator_loss_dict:
                generator_loss = generator_loss + generator_loss_dict['gen_cls_loss'] * gen_cls_loss_weight
            generator_loss.backward()
            torch.nn.utils.clip_grad_norm_(model.feedforward_model.parameters(), max_grad_norm)
            optimizer_generator.step()
            optimizer_generator.zero_grad()
            optimizer_guidance.zero_grad()
            att.step()
            if on_generator_step is not None:
                on_generator_step(step)

        guidance_loss_dict, guidance_log_dict = model(
            scaled_noise, timestep_sigma, labels, real_train_dict=real_train_dict,
            compute_generator_gradient=False, generator_turn=False, guidance_turn=True,
            guidance_data_dict=generator_log_dict['guidance_data_dict'])
        guidance_loss = guidance_loss_dict['loss_fake_mean']
        if 'guidance_cls_loss' in guidance_loss_dict:
            guidance_loss = guidance_loss + guidance_loss_dict['guidance_cls_loss'] * cls_loss_weight
        guidance_loss.backward()
        torch.nn.utils.clip_grad_norm_(model.guidance_model.parameters(), max_grad_norm)
        optimizer_guidance.step()
        optimizer_guidance.zero_grad()
        optimizer_generator.zero_grad()

        losses.update({k: v.item() for k, v in {**generator_loss_dict, **guidance_loss_dict}.items()})
    return losses


PLAIN, DISBACK = train_dmd2, train_dmd2_disback


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--iterations", type=int, default=100)
    ap.add_argument("--record-steps", type=int, default=60)
    ap.add_argument("--teacher-steps", type=int, default=100)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    images = toy_images(512, seed=0)
    teacher = pretrain(tiny_edm(seed=0), images, steps=args.teacher_steps)  # the user's pretrained teacher
    original = {k: v.clone() for k, v in teacher.state_dict().items()}
    kw = dict(iterations=args.iterations, real_data=images, lr_generator=1e-4, lr_guidance=1e-4)
    plain = train_dmd2(EDMUniModel(copy.deepcopy(teacher)), **kw)
    model = EDMUniModel(teacher)
    switch_errors: list[tuple[int, float]] = []
    every = max(1, args.iterations // 5 // 10 // 4)  # a tenth of the generator updates on the 4 degraded targets
    disback = train_dmd2_disback(model, record_steps=args.record_steps, nodes=5, every=every,
                                 on_generator_step=lambda s: switch_errors.append((model.attachment.node,
                                                                                   model.attachment.verify())), **kw)
    out = summary("DMD2", plain, disback, model.attachment, model.guidance_model.real_unet, original)
    print(f"max probe error of the teacher module at each generator update: {max(e for _, e in switch_errors):.2e}")
    return {**out, "errors": switch_errors}


if __name__ == "__main__":
    main()
