"""The wiring for a diffusers text-to-image loop (SD/SDXL-style eps UNet, DDPM schedule, CFG teacher).

    python examples/diffusers_text_to_image.py

Runs on a tiny ``UNet2DConditionModel`` with random weights built from a config (this project never
downloads weights): it shows the calls, not image quality. With a real pipeline, pass
``pipe.unet`` and ``pipe.scheduler`` and real prompt embeddings instead.
"""
from __future__ import annotations

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from disback_core import (Backtrack, Batch, CFGDenoiser, DiffusersDenoiser, FixedInterval, KarrasIndexSigma, LoraSpec,
                          freeze, make_generator, record_degradation, train_step)
from disback_core.adapters import DMD2


def main(iterations: int = 4) -> dict[str, float]:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=24,
                                attention_head_dim=4, norm_num_groups=8)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, prediction_type="epsilon")
    raw = freeze(DiffusersDenoiser(unet, scheduler=scheduler))           # eps UNet as D(x_t, sigma, text)
    null_text = torch.zeros(3, 24)                                       # the empty prompt's embedding
    guided = lambda d: CFGDenoiser(d, scale=8.0, uncond=null_text)       # noqa: E731  teacher CFG only
    sigma_init = float(raw.t_to_sigma(torch.tensor(399.0)))              # DMD2-SDXL starts at t = 399
    generator = make_generator(raw, sigma_init)                          # no CFG in the generator
    # DMD2's sigma grid, limited to the range of the SD schedule (sigma 0.029 .. 14.6).
    lo, hi = raw.sigma_min * 1.001, raw.sigma_max * 0.999
    method = DMD2(sigma_sampler=KarrasIndexSigma(sigma_min=lo, sigma_max=hi, index_min=20, index_max=980),
                  fake_sigma_sampler=KarrasIndexSigma(sigma_min=lo, sigma_max=hi))
    next_batch = lambda: Batch(torch.randn(2, 4, 8, 8), cond=torch.randn(2, 3, 24))  # noqa: E731
    traj = record_degradation(raw, generator, method, next_batch, steps=4, interval=2, lr=1e-4,
                              lora=LoraSpec(rank=4), probe_size=2)       # LoRA on attention, ff, convs
    bt = Backtrack(method, traj, FixedInterval(every=1), guidance=guided)
    fake = bt.initial_fake()
    g_opt = torch.optim.AdamW(generator.parameters(), 1e-6, weight_decay=0.01)
    f_opt = torch.optim.AdamW(fake.parameters(), 1e-6, weight_decay=0.01)
    for _ in range(iterations):
        logs = train_step(bt, generator, fake, bt.target, g_opt, f_opt, next_batch)
    print(f"sigma_init {sigma_init:.3f}, LoRA targets {traj.lora.target_modules}")
    print(f"target switches (iteration, node): {bt.switches}; last logs {logs}")
    return logs


if __name__ == "__main__":
    main()
