"""The DMD2 EDM reference structure (tianweiy/DMD2 ``main/edm/``), on a tiny EDM network.

Three pieces, as in that code base:

* ``EDMGuidance``: the frozen teacher ``real_unet``, the trainable fake score ``fake_unet`` (a copy of it),
  the Karras sigma table and the optional GAN head ``cls_pred_branch``; it computes every loss and calls
  ``self.real_unet(noisy, sigma, labels)`` / ``self.fake_unet(...)`` directly;
* ``EDMUniModel``: the one-step generator ``feedforward_model`` (another copy) plus the guidance model,
  with a single ``forward`` that serves the generator turn and the guidance turn;
* ``train_dmd2``: the trainer loop of ``train_edm.py`` (generator every ``dfake_gen_update_ratio``-th step,
  guidance every step).

    python examples/foreign/dmd2_edm.py
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:
    from .edm_networks import UNetBlock, tiny_edm
except ImportError:  # run as a script
    from edm_networks import UNetBlock, tiny_edm


def get_sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """Karras et al. noise levels, ``n`` of them from ``sigma_max`` down to ``sigma_min``."""
    ramp = torch.linspace(0, 1, n)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def toy_images(n: int, seed: int = 0, return_labels: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """``n`` 2-channel 8x8 "images" in about [-1, 1]: one of 4 fixed patterns each, plus noise (std 0.05).

    With ``return_labels`` also returns the pattern index (``[n]`` long), usable as a class label.
    """
    yy, xx = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing='ij')
    stripes_h = (yy % 2) * 1.6 - 0.8
    stripes_v = (xx % 2) * 1.6 - 0.8
    checker = ((xx + yy) % 2) * 1.6 - 0.8
    blob = 1.6 * torch.exp(-((xx - 3.5) ** 2 + (yy - 3.5) ** 2) / 6.0) - 0.8
    ramp = (xx + yy) / 14.0 * 1.6 - 0.8
    protos = torch.stack([
        torch.stack([stripes_h, torch.full_like(xx, 0.5)]),
        torch.stack([stripes_v, torch.full_like(xx, -0.5)]),
        torch.stack([checker, blob]),
        torch.stack([blob, ramp]),
    ])
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, len(protos), (n,), generator=gen)
    images = (protos[labels] + 0.05 * torch.randn(n, 2, 8, 8, generator=gen)).clamp(-1, 1)
    return (images, labels) if return_labels else images


class EDMGuidance(nn.Module):
    """Teacher, fake score and GAN head of DMD2, with the distribution-matching and critic losses."""

    def __init__(self, teacher: nn.Module, *, sigma_min: float = 0.002, sigma_max: float = 80.0,
                 sigma_data: float = 0.5, rho: float = 7.0, num_train_timesteps: int = 1000,
                 min_step_percent: float = 0.02, max_step_percent: float = 0.98,
                 dfake_gen_update_ratio: int = 5, real_guidance_scale: float = 1.0,
                 gan_classifier: bool = True, diffusion_gan: bool = False,
                 diffusion_gan_max_timestep: int = 0) -> None:
        super().__init__()
        self.real_unet = teacher
        self.real_unet.requires_grad_(False)
        self.fake_unet = copy.deepcopy(self.real_unet)
        self.fake_unet.requires_grad_(True)

        self.sigma_data = sigma_data
        self.sigma_max = sigma_max
        self.sigma_min = sigma_min
        self.rho = rho
        self.dfake_gen_update_ratio = dfake_gen_update_ratio
        self.real_guidance_scale = real_guidance_scale
        self.gan_classifier = gan_classifier
        self.diffusion_gan = diffusion_gan
        self.diffusion_gan_max_timestep = diffusion_gan_max_timestep

        if self.gan_classifier:
            channels = self._bottleneck_block().out_channels
            groups = math.gcd(32, channels)
            self.cls_pred_branch = nn.Sequential(
                nn.Conv2d(channels, channels, kernel_size=4, stride=2, padding=1),  # 4x4 -> 2x2
                nn.GroupNorm(num_groups=groups, num_channels=channels),
                nn.SiLU(),
                nn.AdaptiveAvgPool2d(1),                                             # 2x2 -> 1x1
                nn.Conv2d(channels, 1, kernel_size=1),
            )
            self.cls_pred_branch.requires_grad_(True)

        self.num_train_timesteps = num_train_timesteps
        # small sigma first, large sigma later (index 0 is the cleanest level)
        karras_sigmas = get_sigmas_karras(num_train_timesteps, sigma_min, sigma_max, rho).flip(dims=[0])
        self.register_buffer('karras_sigmas', karras_sigmas)
        self.min_step = int(min_step_percent * num_train_timesteps)
        self.max_step = int(max_step_percent * num_train_timesteps)

    def _bottleneck_block(self) -> UNetBlock:
        """The deepest encoder block of the fake score's SongUNet (its output feeds the GAN head)."""
        return list(self.fake_unet.model.enc.values())[-1]

    def compute_distribution_matching_loss(self, latents: Tensor, labels: Tensor | None) -> tuple[dict, dict]:
        original_latents = latents
        batch_size = latents.shape[0]
        with torch.no_grad():
            timesteps = torch.randint(self.min_step, min(self.max_step + 1, self.num_train_timesteps),
                                      [batch_size, 1, 1, 1], device=latents.device, dtype=torch.long)
            noise = torch.randn_like(latents)
            timestep_sigma = self.karras_sigmas[timesteps]
            noisy_latents = latents + timestep_sigma.reshape(-1, 1, 1, 1) * noise

            pred_real_image = self.real_unet(noisy_latents, timestep_sigma, labels)
            if self.real_guidance_scale != 1.0 and labels is not None:
                uncond = self.real_unet(noisy_latents, timestep_sigma, torch.zeros_like(labels))
                pred_real_image = uncond + self.real_guidance_scale * (pred_real_image - uncond)
            pred_fake_image = self.fake_unet(noisy_latents, timestep_sigma, labels)

            p_real = latents - pred_real_image
            p_fake = latents - pred_fake_image
            weight_factor = torch.abs(p_real).mean(dim=[1, 2, 3], keepdim=True)
            grad = (p_real - p_fake) / weight_factor
            grad = torch.nan_to_num(grad)

        # the gradient of this loss w.r.t. latents is exactly `grad` (the score-distillation trick)
        loss = 0.5 * F.mse_loss(original_latents, (original_latents - grad).detach(), reduction='mean')
        loss_dict = {'loss_dm': loss}
        dm_log_dict = {
            'dmtrain_noisy_latents': noisy_latents.detach(),
            'dmtrain_pred_real_image': pred_real_image.detach(),
            'dmtrain_pred_fake_image': pred_fake_image.detach(),
            'dmtrain_grad': grad.detach(),
            'dmtrain_gradient_norm': torch.norm(grad).item(),
            'dmtrain_timesteps': timesteps.detach(),
        }
        return loss_dict, dm_log_dict

    def compute_loss_fake(self, latents: Tensor, labels: Tensor | None) -> tuple[dict, dict]:
        batch_size = latents.shape[0]
        latents = latents.detach()  # no gradient to the generator
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, self.num_train_timesteps, [batch_size, 1, 1, 1], device=latents.device,
                                  dtype=torch.long)
        timestep_sigma = self.karras_sigmas[timesteps]
        noisy_latents = latents + timestep_sigma.reshape(-1, 1, 1, 1) * noise

        fake_x0_pred = self.fake_unet(noisy_latents, timestep_sigma, labels)
        snrs = timestep_sigma ** -2
        weights = snrs + 1.0 / self.sigma_data ** 2  # Karras weighting
        loss_fake = torch.mean(weights * (fake_x0_pred - latents) ** 2)

        loss_dict = {'loss_fake_mean': loss_fake}
        fake_log_dict = {
            'faketrain_latents': latents.detach(),
            'faketrain_noisy_latents': noisy_latents.detach(),
            'faketrain_x0_pred': fake_x0_pred.detach(),
        }
        return loss_dict, fake_log_dict

    def compute_cls_logits(self, image: Tensor, label: Tensor | None) -> Tensor:
        """Realism logits ``[N, 1]`` from the fake score's bottleneck features."""
        if self.diffusion_gan:
            timesteps = torch.randint(0, self.diffusion_gan_max_timestep, [image.shape[0]],
                                      device=image.device, dtype=torch.long)
            timestep_sigma = self.karras_sigmas[timesteps]
            image = image + timestep_sigma.reshape(-1, 1, 1, 1) * torch.randn_like(image)
        else:
            timesteps = torch.zeros([image.shape[0]], dtype=torch.long, device=image.device)
            timestep_sigma = self.karras_sigmas[timesteps]

        features = {}
        grab = self._bottleneck_block().register_forward_hook(lambda mod, inp, out: features.update(rep=out))
        try:
            self.fake_unet(image, timestep_sigma, label)
        finally:
            grab.remove()
        rep = features['rep'].float()
        return self.cls_pred_branch(rep).squeeze(dim=[2, 3])

    def compute_generator_clean_cls_loss(self, fake_image: Tensor, fake_labels: Tensor | None) -> dict:
        pred_realism_on_fake_with_grad = self.compute_cls_logits(image=fake_image, label=fake_labels)
        return {'gen_cls_loss': F.softplus(-pred_realism_on_fake_with_grad).mean()}

    def compute_guidance_clean_cls_loss(self, real_image: Tensor, fake_image: Tensor,
                                        real_label: Tensor | None,
                                        fake_label: Tensor | None) -> tuple[dict, dict]:
        pred_realism_on_real = self.compute_cls_logits(real_image.detach(), real_label)
        pred_realism_on_fake = self.compute_cls_logits(fake_image.detach(), fake_label)
        classification_loss = F.softplus(pred_realism_on_fake) + F.softplus(-pred_realism_on_real)
        log_dict = {
            'pred_realism_on_real': torch.sigmoid(pred_realism_on_real).squeeze(dim=1).detach(),
            'pred_realism_on_fake': torch.sigmoid(pred_realism_on_fake).squeeze(dim=1).detach(),
        }
        return {'guidance_cls_loss': classification_loss.mean()}, log_dict

    def generator_forward(self, image: Tensor, labels: Tensor | None) -> tuple[dict, dict]:
        loss_dict, log_dict = self.compute_distribution_matching_loss(image, labels)
        if self.gan_classifier:
            loss_dict.update(self.compute_generator_clean_cls_loss(image, labels))
        return loss_dict, log_dict

    def guidance_forward(self, image: Tensor, labels: Tensor | None,
                         real_train_dict: dict | None = None) -> tuple[dict, dict]:
        loss_dict, log_dict = self.compute_loss_fake(image, labels)
        if self.gan_classifier and real_train_dict is not None:
            cls_loss_dict, cls_log_dict = self.compute_guidance_clean_cls_loss(
                real_image=real_train_dict['real_image'], fake_image=image,
                real_label=real_train_dict['real_label'], fake_label=labels)
            loss_dict.update(cls_loss_dict)
            log_dict.update(cls_log_dict)
        return loss_dict, log_dict

    def forward(self, generator_turn: bool = False, guidance_turn: bool = False,
                generator_data_dict: dict | None = None,
                guidance_data_dict: dict | None = None) -> tuple[dict, dict]:
        if generator_turn:
            data = generator_data_dict
            return self.generator_forward(image=data['image'], labels=data['label'])
        if guidance_turn:
            data = guidance_data_dict
            return self.guidance_forward(image=data['image'], labels=data['label'],
                                         real_train_dict=data['real_train_dict'])
        raise NotImplementedError


class EDMUniModel(nn.Module):
    """Generator (``feedforward_model``) and ``guidance_model`` behind one ``forward``, as DMD2 wraps them."""

    def __init__(self, teacher: nn.Module, *, conditioning_sigma: float = 80.0, gan_classifier: bool = True,
                 **guidance_kwargs) -> None:
        super().__init__()
        self.guidance_model = EDMGuidance(teacher, gan_classifier=gan_classifier, **guidance_kwargs)
        self.guidance_min_step = self.guidance_model.min_step
        self.guidance_max_step = self.guidance_model.max_step
        # the generator starts as a copy of the fake score, i.e. of the teacher
        self.feedforward_model = copy.deepcopy(self.guidance_model.fake_unet)
        self.feedforward_model.requires_grad_(True)
        self.conditioning_sigma = conditioning_sigma
        self.num_train_timesteps = self.guidance_model.num_train_timesteps

    def forward(self, scaled_noisy_image: Tensor, timestep_sigma: Tensor, labels: Tensor | None,
                real_train_dict: dict | None = None, compute_generator_gradient: bool = False,
                generator_turn: bool = False, guidance_turn: bool = False,
                guidance_data_dict: dict | None = None) -> tuple[dict, dict]:
        assert generator_turn != guidance_turn
        if guidance_turn:
            assert guidance_data_dict is not None
            return self.guidance_model(guidance_turn=True, guidance_data_dict=guidance_data_dict)

        if compute_generator_gradient:
            generated_image = self.feedforward_model(scaled_noisy_image, timestep_sigma, labels)
            generator_data_dict = {'image': generated_image, 'label': labels,
                                   'real_train_dict': real_train_dict}
            # no gradient for the guidance model on this turn (avoids side effects in the GAN loss)
            self.guidance_model.requires_grad_(False)
            loss_dict, log_dict = self.guidance_model(generator_turn=True,
                                                      generator_data_dict=generator_data_dict)
            self.guidance_model.requires_grad_(True)
        else:
            with torch.no_grad():
                generated_image = self.feedforward_model(scaled_noisy_image, timestep_sigma, labels)
            loss_dict, log_dict = {}, {}

        log_dict['generated_image'] = generated_image.detach()
        log_dict['guidance_data_dict'] = {
            'image': generated_image.detach(),
            'label': labels.detach() if labels is not None else None,
            'real_train_dict': real_train_dict,
        }
        return loss_dict, log_dict


def train_dmd2(model: EDMUniModel, *, iterations: int, batch_size: int = 16, real_data: Tensor | None = None,
               lr_generator: float = 2e-6, lr_guidance: float = 2e-6, dfake_gen_update_ratio: int = 5,
               conditioning_sigma: float = 80.0, label_dim: int = 0, seed: int = 0,
               on_generator_step: Callable[[int], None] | None = None, real_labels: Tensor | None = None,
               gen_cls_loss_weight: float = 3e-3, cls_loss_weight: float = 1e-2, max_grad_norm: float = 10.0,
               betas: tuple[float, float] = (0.9, 0.999)) -> dict[str, float]:
    """DMD2's ``Trainer.train_one_step`` in a loop; returns the last value of every loss.

    ``real_data`` (``[M, C, H, W]``; with integer ``real_labels`` ``[M]`` when ``label_dim``) feeds the GAN
    critic; without it the guidance turn trains the fake score only. ``on_generator_step(step)`` runs right
    after each generator update.
    """
    torch.manual_seed(seed)
    net = model.feedforward_model
    shape = (batch_size, net.img_channels, net.img_resolution, net.img_resolution)
    eye_matrix = torch.eye(label_dim)
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


if __name__ == '__main__':
    torch.set_num_threads(1)
    torch.manual_seed(0)
    images, classes = toy_images(256, seed=0, return_labels=True)
    uni = EDMUniModel(tiny_edm(label_dim=4), real_guidance_scale=2.0)
    final = train_dmd2(uni, iterations=6, real_data=images, real_labels=classes, label_dim=4,
                       on_generator_step=lambda step: print(f'generator step at iteration {step}'))
    print({k: f'{v:.4g}' for k, v in final.items()})
