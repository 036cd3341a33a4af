"""A DMD2-style one-step distillation loop for a flow-matching transformer (SD3), without any library.

Written the way NVlabs FastGen's ``DMD2Model`` or a diffusers SD3 training script writes it:

* the teacher ``real_transformer`` is a raw diffusers ``SD3Transformer2DModel``, called with its own
  keywords, ``transformer(hidden_states=x_t, timestep=1000 * t, encoder_hidden_states=...,
  pooled_projections=..., return_dict=False)[0]``, which is the velocity ``v = eps - x0`` of the
  rectified flow ``x_t = (1 - t) x0 + t eps``; its x0 is ``x_t - t v``; it is frozen and guided (CFG);
* the generator is a trainable copy run once from pure noise at ``t = 1``: ``x0 = z - v_G(z, 1)``;
* the fake score ``fake_transformer`` is a trainable copy trained by the flow-matching loss
  ``mse(v_fake, eps - x0)`` at logit-normal times (SD3's and FastGen's critic loss) on the
  generator's samples;
* the generator loss is DMD2's, ``0.5 mse(x0, x0 - grad)`` with ``grad = (x0_fake - x0_real) /
  mean|x0 - x0_real|`` (the ``abs_mean`` normaliser), written inline;
* generator and fake-score updates alternate (FastGen's ``student_update_freq``).

Random weights and random "prompt embeddings": this shows the calls, not image quality.

    python examples/foreign/flow_dmd.py
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from diffusers import SD3Transformer2DModel
from torch import Tensor

# A tiny random SD3 config (8x8 latents, 2 joint blocks); a real run loads
# SD3Transformer2DModel.from_pretrained("stabilityai/stable-diffusion-3.5-medium", subfolder="transformer").
TINY_SD3 = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
                num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8,
                pos_embed_max_size=16)
SEQ_LEN = 5


def tiny_sd3(seed: int = 0) -> SD3Transformer2DModel:
    """The teacher: a random-weight ``SD3Transformer2DModel`` of :data:`TINY_SD3`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SD3Transformer2DModel(**TINY_SD3)


def random_prompts(transformer: SD3Transformer2DModel, n: int, seed: int = 0) -> dict[str, Tensor]:
    """``n`` random "prompts": T5/CLIP-like token states and pooled CLIP projections."""
    gen = torch.Generator().manual_seed(seed)
    cfg = transformer.config
    return {"encoder_hidden_states": torch.randn(n, SEQ_LEN, cfg.joint_attention_dim, generator=gen),
            "pooled_projections": torch.randn(n, cfg.pooled_projection_dim, generator=gen)}


def sample_condition(prompts: dict[str, Tensor], batch_size: int) -> dict[str, Tensor]:
    """A batch of prompts drawn at random: the transformer's conditioning keywords."""
    idx = torch.randint(0, len(prompts["pooled_projections"]), (batch_size,))
    return {k: v[idx] for k, v in prompts.items()}


def null_condition(prompts: dict[str, Tensor], batch_size: int) -> dict[str, Tensor]:
    """The empty prompt's embeddings (zeros here), for classifier-free guidance."""
    return {k: torch.zeros(batch_size, *v.shape[1:]) for k, v in prompts.items()}


def logit_normal_t(batch_size: int, mean: float = 0.0, std: float = 1.0) -> Tensor:
    """SD3's logit-normal training times ``t = sigmoid(N(mean, std^2))`` in (0, 1)."""
    return torch.sigmoid(mean + std * torch.randn(batch_size))


def forward_process(x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    """The rectified flow's noisy sample ``x_t = (1 - t) x0 + t eps``."""
    t = t.view(-1, 1, 1, 1)
    return (1 - t) * x0 + t * eps


def velocity(transformer: SD3Transformer2DModel, x_t: Tensor, t: Tensor, condition: dict[str, Tensor]) -> Tensor:
    """The transformer's velocity at flow time ``t`` (its ``timestep`` is ``1000 t``, as in the SD3 pipeline)."""
    return transformer(hidden_states=x_t, timestep=t * 1000, **condition, return_dict=False)[0]


def predict_x0(transformer: SD3Transformer2DModel, x_t: Tensor, t: Tensor, condition: dict[str, Tensor]) -> Tensor:
    """The transformer's clean-sample prediction ``x0 = x_t - t v``."""
    return x_t - t.view(-1, 1, 1, 1) * velocity(transformer, x_t, t, condition)


def one_step(generator: SD3Transformer2DModel, z: Tensor, condition: dict[str, Tensor]) -> Tensor:
    """One-step generation from pure noise at ``t = 1``: ``x0 = z - v_G(z, 1)``."""
    return predict_x0(generator, z, torch.ones(z.shape[0]), condition)


def fake_score_loss(fake_transformer: SD3Transformer2DModel, x0: Tensor, eps: Tensor, t: Tensor,
                    condition: dict[str, Tensor]) -> Tensor:
    """The critic's flow-matching loss on generator samples ``x0``: ``mse(v_fake(x_t, t), eps - x0)``."""
    v_fake = velocity(fake_transformer, forward_process(x0, eps, t), t, condition)
    return F.mse_loss(v_fake, eps - x0)


def dmd2_flow_loop(real_transformer: SD3Transformer2DModel, *, iterations: int, batch_size: int = 4,
                   lr: float = 1e-4, guidance_scale: float = 4.5, student_update_freq: int = 2,
                   max_grad_norm: float = 1.0, seed: int = 0) -> dict[str, float]:
    """DMD2 for a rectified-flow transformer, one-step generator from pure noise. Returns the last losses."""
    torch.manual_seed(seed)
    real_transformer.requires_grad_(False)
    generator = copy.deepcopy(real_transformer).requires_grad_(True)
    fake_transformer = copy.deepcopy(real_transformer).requires_grad_(True)
    prompts = random_prompts(real_transformer, 64, seed)
    negative = null_condition(prompts, batch_size)
    cfg = real_transformer.config
    shape = (batch_size, cfg.in_channels, cfg.sample_size, cfg.sample_size)
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
    return losses


if __name__ == "__main__":
    torch.set_num_threads(1)
    print({k: round(v, 4) for k, v in dmd2_flow_loop(tiny_sd3(0), iterations=4).items()})
