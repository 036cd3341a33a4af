"""A diffusers DMD2-LoRA script on ONE base UNet: the layout of diffusers' LCM-LoRA scripts.

The memory-saving layout of LoRA distillation on one GPU (``train_lcm_distill_lora_sd(xl).py``):

* one frozen base ``unet``; the generator is a peft LoRA adapter on it (``unet.add_adapter``), run
  once at ``conditioning_timestep`` from pure noise;
* the teacher is the same ``unet`` with the adapter disabled (``unet.disable_adapters()`` ...
  ``unet.enable_adapters()``, as the LCM-LoRA scripts do), used with classifier-free guidance;
* the fake score is a full trainable copy of the base (DMD2), trained by eps-prediction DSM.

Random weights and random "text embeddings": this shows the calls, not image quality.

    python examples/foreign/diffusers_lora_one_base.py
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from peft import LoraConfig

try:
    from .diffusers_t2i import _x0_from_eps, random_prompts, tiny_scheduler, tiny_unet
except ImportError:  # run as a script
    from diffusers_t2i import _x0_from_eps, random_prompts, tiny_scheduler, tiny_unet


def dmd2_lora_one_base_loop(unet: UNet2DConditionModel, scheduler: DDPMScheduler, *, iterations: int,
                            batch_size: int = 4, guidance_scale: float = 4.5, conditioning_timestep: int = 999,
                            lr: float = 1e-4, rank: int = 4, seed: int = 0) -> dict[str, float]:
    """DMD2 with a LoRA generator on the teacher's own UNet: one fake-score update per generator update."""
    torch.manual_seed(seed)
    unet.requires_grad_(False)
    fake_unet = copy.deepcopy(unet).requires_grad_(True)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    lora_layers = [p for p in unet.parameters() if p.requires_grad]
    optimizer_g = torch.optim.AdamW(lora_layers, lr=lr)
    optimizer_fake = torch.optim.AdamW(fake_unet.parameters(), lr=lr)
    alphas_cumprod = scheduler.alphas_cumprod
    prompt_embeds, uncond_embeds = random_prompts(64, seed)
    num_ch, size = unet.config.in_channels, unet.config.sample_size
    losses: dict[str, float] = {}
    for _ in range(iterations):
        encoder_hidden_states = prompt_embeds[torch.randint(0, len(prompt_embeds), (batch_size,))]
        # one-step generation from pure noise at the conditioning timestep (the adapter is active)
        z = torch.randn(batch_size, num_ch, size, size)
        t_gen = torch.full((batch_size,), conditioning_timestep, dtype=torch.long)
        eps_hat = unet(z, t_gen, encoder_hidden_states=encoder_hidden_states).sample
        x0 = _x0_from_eps(z, eps_hat, alphas_cumprod, t_gen)

        # distribution matching loss: teacher (the base, adapter disabled; with CFG) vs fake score
        timesteps = torch.randint(20, 981, (batch_size,), dtype=torch.long)
        with torch.no_grad():
            noisy = scheduler.add_noise(x0, torch.randn_like(x0), timesteps)
            ehs = torch.cat([uncond_embeds.expand(batch_size, -1, -1), encoder_hidden_states])
            unet.disable_adapters()
            eps_uncond, eps_cond = unet(torch.cat([noisy] * 2), torch.cat([timesteps] * 2),
                                        encoder_hidden_states=ehs).sample.chunk(2)
            unet.enable_adapters()
            eps_real = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
            eps_fake = fake_unet(noisy, timesteps, encoder_hidden_states=encoder_hidden_states).sample
            pred_real = _x0_from_eps(noisy, eps_real, alphas_cumprod, timesteps)
            pred_fake = _x0_from_eps(noisy, eps_fake, alphas_cumprod, timesteps)
            normalizer = (x0 - pred_real).abs().mean(dim=[1, 2, 3], keepdim=True)
            grad = torch.nan_to_num(((x0 - pred_real) - (x0 - pred_fake)) / normalizer)
        loss_dm = 0.5 * F.mse_loss(x0, (x0 - grad).detach())
        optimizer_g.zero_grad()
        loss_dm.backward()
        torch.nn.utils.clip_grad_norm_(lora_layers, 1.0)
        optimizer_g.step()

        # fake score: eps-prediction DSM on the detached generator samples
        noise = torch.randn_like(x0)
        t_fake = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), dtype=torch.long)
        noisy_fake = scheduler.add_noise(x0.detach(), noise, t_fake)
        eps_pred = fake_unet(noisy_fake, t_fake, encoder_hidden_states=encoder_hidden_states).sample
        loss_fake = F.mse_loss(eps_pred, noise)
        optimizer_fake.zero_grad()
        loss_fake.backward()
        torch.nn.utils.clip_grad_norm_(fake_unet.parameters(), 1.0)
        optimizer_fake.step()
        losses.update(loss_dm=loss_dm.item(), loss_fake=loss_fake.item())
    return losses


if __name__ == "__main__":
    torch.set_num_threads(1)
    print({k: round(v, 4) for k, v in dmd2_lora_one_base_loop(tiny_unet(0), tiny_scheduler(), iterations=3).items()})
