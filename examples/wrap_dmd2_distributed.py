"""DisBack in DMD2's own EDM trainer under torchrun: the loop stays the user's, ten lines change.

    torchrun --nproc_per_node 2 examples/wrap_dmd2_distributed.py   # 2 CPU processes (gloo), tiny models
    python examples/show_diff.py wrap_dmd2_distributed               # the diff against the user's loop

The user's code is ``examples/foreign/dmd2_edm_ddp.py``: DMD2's structure (a guidance module holding a
frozen ``real_unet``, a trainable ``fake_unet`` and a GAN head; a generator copied from the fake score)
trained on every rank with its own noise, the generator and the guidance model wrapped by DDP as
``accelerator.prepare`` wraps them. :func:`train_dmd2_ddp_disback` is that loop with DisBack added:

1. Degradation Recording with the user's own fake-score loss on the bare ``fake_unet``, before the
   user's DDP wrap (the recorder puts a LoRA slot on the module; a DDP built first would not know
   it). Each rank records from its own G0 samples; the recorder starts every rank from rank 0's
   slot and averages the slot's gradients over ranks, so all ranks record one path.
2. ``rec.save(path)``: rank 0 writes the path; every rank loads it and checks it against its own
   recording (its nodes and its own probe outputs); ranks that differ are an error on every rank.
3. ``attach`` (which refuses ranks that hold different paths) writes the nodes into the user's
   ``real_unet`` in place and node N into ``fake_unet``; ``att.step()`` after each generator update.
   The user's DDP wrap comes after, unchanged.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parent))
from foreign.dmd2_edm import EDMUniModel, toy_images  # noqa: E402  (the user's codebase)
from foreign.dmd2_edm_ddp import train_dmd2_ddp  # noqa: E402
from foreign.edm_distill import pretrain  # noqa: E402
from foreign.edm_networks import tiny_edm  # noqa: E402
from show_diff import summary  # noqa: E402

from disback_core import DegradationRecorder, FixedInterval, attach  # noqa: E402
from disback_core.distributed import check_same_on_all_ranks  # noqa: E402


def train_dmd2_ddp_disback(model: EDMUniModel, *, iterations: int, batch_size: int = 8, real_data: Tensor | None = None,
                   lr_generator: float = 2e-6, lr_guidance: float = 2e-6, dfake_gen_update_ratio: int = 5,
                   conditioning_sigma: float = 80.0, seed: int = 0,
                   on_generator_step: Callable[[int], None] | None = None,
                   gen_cls_loss_weight: float = 3e-3, cls_loss_weight: float = 1e-2, max_grad_norm: float = 10.0,
                   betas: tuple[float, float] = (0.9, 0.999), record_steps: int = 100, nodes: int = 5, every: int = 4, path: str = "disback_path") -> dict[str, float]:
    """DMD2's ``Trainer.train_one_step`` in a loop on every rank (unconditional); returns the last
    value of every loss. ``batch_size`` is per rank; ``real_data`` (``[M, C, H, W]``) feeds the GAN
    critic (each rank draws its own batches). ``on_generator_step(step)`` runs after each generator
    update. The generator turn runs the guidance model under ``no_sync``: its parameters are frozen
    for that turn, so its DDP has nothing to reduce."""
    torch.manual_seed(seed + dist.get_rank())  # each rank its own noise and real batches
    net = model.feedforward_model
    shape = (batch_size, net.img_channels, net.img_resolution, net.img_resolution)
    gm = model.guidance_model
    rec = DegradationRecorder(gm.real_unet, gm.fake_unet, steps=record_steps, nodes=nodes, lr=lr_guidance)
    for _ in range(record_steps):
        with torch.no_grad():
            fakes = net(torch.randn(shape) * conditioning_sigma, torch.ones(batch_size) * conditioning_sigma, None)
        rec.update(gm.compute_loss_fake(fakes, None)[0]['loss_fake_mean'], probe=fakes)
    rec.save(path)
    att = model.attachment = attach(gm.real_unet, rec.trajectory(), FixedInterval(every), fake=gm.fake_unet)
    model.feedforward_model, model.guidance_model = DDP(net), DDP(model.guidance_model)  # accelerator.prepare
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
            real_train_dict = {'real_image': real_data[idx], 'real_label': None}
        scaled_noise = torch.randn(shape) * conditioning_sigma
        timestep_sigma = torch.ones(batch_size) * conditioning_sigma
        COMPUTE_GENERATOR_GRADIENT = step % dfake_gen_update_ratio == 0

        with model.guidance_model.no_sync():
            generator_loss_dict, generator_log_dict = model(
                scaled_noise, timestep_sigma, None, real_train_dict=real_train_dict,
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
            scaled_noise, timestep_sigma, None, real_train_dict=real_train_dict,
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


PLAIN, DISBACK = train_dmd2_ddp, train_dmd2_ddp_disback


def _shared_folder(out: str | None) -> str:
    """``out``, or a fresh temporary folder made by rank 0 and named to every rank."""
    if out is not None:
        return out
    name = [tempfile.mkdtemp(prefix="disback-dmd2-ddp-") if dist.get_rank() == 0 else ""]
    dist.broadcast_object_list(name, src=0)
    return os.path.join(name[0], "path")


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--iterations", type=int, default=100)
    ap.add_argument("--record-steps", type=int, default=60)
    ap.add_argument("--teacher-steps", type=int, default=100)
    ap.add_argument("--out", default=None, help="the folder the path is written to (default: a temporary one)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo")  # torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...)
    try:
        rank = dist.get_rank()
        images = toy_images(512, seed=0)
        teacher = pretrain(tiny_edm(seed=0), images, steps=args.teacher_steps)  # the same teacher on every rank
        original = {k: v.clone() for k, v in teacher.state_dict().items()}
        kw = dict(iterations=args.iterations, real_data=images, lr_generator=1e-4, lr_guidance=1e-4)
        plain = train_dmd2_ddp(EDMUniModel(copy.deepcopy(teacher)), **kw)
        model = EDMUniModel(teacher)
        switch_errors: list[tuple[int, float]] = []
        every = max(1, args.iterations // 5 // 10 // 4)  # a tenth of the generator updates on the 4 degraded targets
        path = _shared_folder(args.out)
        disback = train_dmd2_ddp_disback(model, record_steps=args.record_steps, nodes=5, every=every, path=path,
                                         on_generator_step=lambda s: switch_errors.append((model.attachment.node,
                                                                                          model.attachment.verify())),
                                         **kw)
        same = check_same_on_all_ranks(model.feedforward_model, model.guidance_model)  # collective
        result: dict[str, object] = {}
        if rank == 0:
            att = model.attachment
            out = summary("DMD2 (DDP)", plain, disback, att, model.guidance_model.module.real_unet, original)
            result = {"world_size": dist.get_world_size(), "switches": att.switches, "node0_exact": out["node0_exact"],
                      "same_on_all_ranks": same, "max_switch_error": max(e for _, e in switch_errors),
                      "nodes": att.trajectory.last}
            print("RESULT " + json.dumps(result), flush=True)
        dist.barrier()
        if args.out is None and rank == 0:  # the temporary folder of the path
            shutil.rmtree(os.path.dirname(path))
        return result
    finally:
        if started:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
