"""DMD2's EDM trainer under torchrun (tianweiy/DMD2 ``main/edm/train_edm.py`` with accelerate's DDP).

As in that code base, the unified model itself is not wrapped: ``accelerator.prepare`` wraps its two
sub-networks, the generator ``feedforward_model`` and the ``guidance_model`` (whose frozen ``real_unet``
DDP leaves alone: it registers only the parameters that require a gradient), and every rank seeds
its own noise and real batches (``set_seed(seed + process_index)``). Here DDP is built directly.

    torchrun --nproc_per_node 2 examples/foreign/dmd2_edm_ddp.py
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel as DDP

try:
    from .dmd2_edm import EDMUniModel, toy_images
    from .edm_networks import tiny_edm
except ImportError:  # run as a script
    from dmd2_edm import EDMUniModel, toy_images
    from edm_networks import tiny_edm


def train_dmd2_ddp(model: EDMUniModel, *, iterations: int, batch_size: int = 8, real_data: Tensor | None = None,
                   lr_generator: float = 2e-6, lr_guidance: float = 2e-6, dfake_gen_update_ratio: int = 5,
                   conditioning_sigma: float = 80.0, seed: int = 0,
                   on_generator_step: Callable[[int], None] | None = None,
                   gen_cls_loss_weight: float = 3e-3, cls_loss_weight: float = 1e-2, max_grad_norm: float = 10.0,
                   betas: tuple[float, float] = (0.9, 0.999)) -> dict[str, float]:
    """DMD2's ``Trainer.train_one_step`` in a loop on every rank (unconditional); returns the last
    value of every loss. ``batch_size`` is per rank; ``real_data`` (``[M, C, H, W]``) feeds the GAN
    critic (each rank draws its own batches). ``on_generator_step(step)`` runs after each generator
    update. The generator turn runs the guidance model under ``no_sync``: its parameters are frozen
    for that turn, so its DDP has nothing to reduce."""
    torch.manual_seed(seed + dist.get_rank())  # each rank its own noise and real batches
    net = model.feedforward_model
    shape = (batch_size, net.img_channels, net.img_resolution, net.img_resolution)
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


if __name__ == '__main__':
    torch.set_num_threads(1)
    dist.init_process_group('gloo')
    try:
        uni = EDMUniModel(tiny_edm(seed=0))
        final = train_dmd2_ddp(uni, iterations=6, real_data=toy_images(256, seed=0))
        if dist.get_rank() == 0:
            print({k: f'{v:.4g}' for k, v in final.items()})
    finally:
        dist.destroy_process_group()
