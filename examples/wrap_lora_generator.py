"""DisBack in a one-base diffusers DMD2-LoRA script: the generator is a peft adapter on the teacher's own
UNet, the teacher is that UNet with the adapter disabled, and the path is served as a second adapter.

    python examples/wrap_lora_generator.py            # plain, then with DisBack, a tiny UNet2DConditionModel
    python examples/show_diff.py wrap_lora_generator  # the diff against the user's loop

The user's code is ``examples/foreign/diffusers_lora_one_base.py``, the layout of diffusers' LCM-LoRA
scripts: ONE base ``unet``; the generator ``unet.add_adapter(LoraConfig(...))``; the teacher
``unet.disable_adapters(); unet(...); unet.enable_adapters()`` with CFG; DMD2's fake score a full
copy. ``attach`` cannot run there (it writes node weights into the base, which is the generator's base
too); :class:`~disback_core.shared_base.SharedBasePath` serves node k as a second peft adapter on the
same ``unet`` instead (no copy of the base: the path costs one node's LoRA factors on the device):

1. Degradation Recording runs the script's inline fake-score loss on ``rec.module`` (the user's
   ``fake_unet`` with a LoRA slot) at the generator's samples; the teacher is ``bare_view(unet)``, the
   base's own tensors without the adapters (no copy), and the probe runs by the "diffusers-unet" call.
2. ``path(...)`` is the teacher's call inside ``path.target()``: node k's adapter alone (node 0: every
   adapter disabled, the base bit for bit), replacing ``disable_adapters()`` / ``enable_adapters()``;
   outside it the generator's adapter runs exactly as before. ``path.step()`` after each generator
   update moves the target; ``fake=fake_unet`` starts the fake score at node N.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from peft import LoraConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from foreign.diffusers_lora_one_base import dmd2_lora_one_base_loop  # noqa: E402
from foreign.diffusers_t2i import _x0_from_eps, random_prompts, tiny_scheduler, tiny_unet  # noqa: E402

from show_diff import summary  # noqa: E402

from disback_core import DegradationRecorder, FixedInterval  # noqa: E402
from disback_core.shared_base import SharedBasePath, bare_view  # noqa: E402


def dmd2_lora_one_base_loop_disback(unet: UNet2DConditionModel, scheduler: DDPMScheduler, *, iterations: int,
                            batch_size: int = 4, guidance_scale: float = 4.5, conditioning_timestep: int = 999,
                            lr: float = 1e-4, rank: int = 4, seed: int = 0, record_steps: int = 100, nodes: int = 5, every: int = 10) -> dict[str, float]:
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
    rec = DegradationRecorder(bare_view(unet), fake_unet, steps=record_steps, nodes=nodes, lr=lr, call="diffusers-unet")
    for _ in range(record_steps):
        ehs = prompt_embeds[torch.randint(0, len(prompt_embeds), (batch_size,))]
        z, t_gen = torch.randn(batch_size, num_ch, size, size), torch.full((batch_size,), conditioning_timestep)
        with torch.no_grad():
            x0 = _x0_from_eps(z, unet(z, t_gen, encoder_hidden_states=ehs).sample, alphas_cumprod, t_gen)
        noise, t_fake = torch.randn_like(x0), torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,))
        noisy_fake = scheduler.add_noise(x0, noise, t_fake)
        loss_fake = F.mse_loss(rec.module(noisy_fake, t_fake, encoder_hidden_states=ehs).sample, noise)
        rec.update(loss_fake, probe=(noisy_fake, t_fake, ehs))
    path = SharedBasePath(unet, rec.trajectory(), FixedInterval(every), fake=fake_unet)
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
            eps_uncond, eps_cond = path(torch.cat([noisy] * 2), torch.cat([timesteps] * 2),
                                        encoder_hidden_states=ehs).sample.chunk(2)
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
        path.step()

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
    return {**losses, "attachment": path}


PLAIN, DISBACK = dmd2_lora_one_base_loop, dmd2_lora_one_base_loop_disback


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--iterations", type=int, default=60)
    ap.add_argument("--record-steps", type=int, default=40)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    unet, scheduler = tiny_unet(0), tiny_scheduler()
    original = {k: v.clone() for k, v in unet.state_dict().items()}  # the base: the teacher's weights
    plain = dmd2_lora_one_base_loop(copy.deepcopy(unet), scheduler, iterations=args.iterations)
    every = max(1, args.iterations // 10 // 4)  # a tenth of the generator updates on the 4 degraded targets
    out = dmd2_lora_one_base_loop_disback(unet, scheduler, iterations=args.iterations,
                                          record_steps=args.record_steps, nodes=5, every=every)
    # the teacher is the base with its adapters off: its weights were never written
    return summary("DMD2-LoRA (one base)", plain, out, out.pop("attachment"), bare_view(unet), original)


if __name__ == "__main__":
    main()
