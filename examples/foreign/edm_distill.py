"""The EDM-fork structure that Diff-Instruct and SiD build on, with SiD's training loop.

Three EDM denoisers, all called ``D(x, sigma, class_labels)``:

* ``net``: the pretrained teacher (the "true score"), frozen;
* ``fake_score = copy.deepcopy(net).train().requires_grad_(True)``: trained by EDM denoising score matching
  on generator samples;
* ``G = copy.deepcopy(net).train().requires_grad_(True)``: the one-step generator
  ``G(z) = G(init_sigma * z, init_sigma * ones, labels)``.

    python examples/foreign/edm_distill.py
"""
from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import Tensor, nn

try:
    from .edm_networks import tiny_edm
except ImportError:  # run as a script
    from edm_networks import tiny_edm

P_MEAN, P_STD, SIGMA_DATA = -1.2, 1.2, 0.5  # EDM's training noise distribution


def sample_sigma(batch_size: int, device: torch.device | str = 'cpu') -> Tensor:
    """EDM's log-normal noise levels, ``[N, 1, 1, 1]``."""
    return (torch.randn([batch_size, 1, 1, 1], device=device) * P_STD + P_MEAN).exp()


def dsm_loss(net: nn.Module, x0: Tensor, labels: Tensor | None) -> Tensor:
    """EDM denoising score matching (``EDMLoss``): summed over pixels, averaged over the batch."""
    sigma = sample_sigma(x0.shape[0], x0.device)
    weight = (sigma ** 2 + SIGMA_DATA ** 2) / (sigma * SIGMA_DATA) ** 2
    D_yn = net(x0 + torch.randn_like(x0) * sigma, sigma, labels)
    return (weight * (D_yn - x0) ** 2).sum(dim=[1, 2, 3]).mean()


def pretrain(net: nn.Module, images: Tensor, *, steps: int = 200, batch_size: int = 32, lr: float = 2e-3,
             seed: int = 0) -> nn.Module:
    """Stand-in for loading a pretrained teacher: a short EDM training run of ``net`` on ``images``."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for _ in range(steps):
        loss = dsm_loss(net, images[torch.randint(0, len(images), (batch_size,))], None)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net.eval().requires_grad_(False)


def generate(G: nn.Module, z: Tensor, labels: Tensor | None, init_sigma: float = 2.5) -> Tensor:
    """One-step generation: the denoiser evaluated at ``init_sigma * z``, ``sigma = init_sigma``."""
    return G(init_sigma * z, init_sigma * torch.ones(z.shape[0], device=z.device), labels)


def _sanitize_and_clip(params: Iterable[nn.Parameter], max_value: float = 1.0) -> None:
    """SiD's gradient hygiene: NaN/inf gradients to finite values, then clip by value."""
    params = [p for p in params if p.grad is not None]
    for p in params:
        torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)
    torch.nn.utils.clip_grad_value_(params, max_value)


def sid_loop(net: nn.Module, *, iterations: int, batch_size: int = 16, alpha: float = 1.2,
             init_sigma: float = 2.5, lr: float = 1e-5, seed: int = 0,
             label_dim: int = 0) -> dict[str, float]:
    """Score identity Distillation (SiD) of ``net``: fake-score phase then generator phase, each iteration.

    Returns the last losses: ``loss_fake_score`` and ``loss_G``.
    """
    torch.manual_seed(seed)
    true_score = net.eval().requires_grad_(False)
    fake_score = copy.deepcopy(net).train().requires_grad_(True)
    G = copy.deepcopy(net).train().requires_grad_(True)
    fake_score_optimizer = torch.optim.Adam(fake_score.parameters(), lr=lr, betas=(0.0, 0.999), eps=1e-8)
    g_optimizer = torch.optim.Adam(G.parameters(), lr=lr, betas=(0.0, 0.999), eps=1e-8)
    shape = [batch_size, net.img_channels, net.img_resolution, net.img_resolution]
    eye = torch.eye(label_dim)
    losses: dict[str, float] = {}
    for _ in range(iterations):
        labels = eye[torch.randint(0, label_dim, (batch_size,))] if label_dim else None

        # ---- Update the fake score network on (detached) generator samples.
        G.eval().requires_grad_(False)
        fake_score.train().requires_grad_(True)
        with torch.no_grad():
            images = generate(G, torch.randn(shape), labels, init_sigma)
        loss = dsm_loss(fake_score, images, labels)
        fake_score_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        _sanitize_and_clip(fake_score.parameters())
        fake_score_optimizer.step()
        losses['loss_fake_score'] = loss.item()

        # ---- Update the one-step generator with the SiD loss (gradient flows through both score nets).
        fake_score.eval().requires_grad_(False)
        G.train().requires_grad_(True)
        images = generate(G, torch.randn(shape), labels, init_sigma)
        sigma = sample_sigma(batch_size).clip(0.002, 80)
        x_t = images + sigma * torch.randn_like(images)
        y_real = true_score(x_t, sigma, labels)
        y_fake = fake_score(x_t, sigma, labels)
        keep = ~(images.isnan() | y_real.isnan() | y_fake.isnan()).flatten(1).any(1)
        images, y_real, y_fake = images[keep], y_real[keep], y_fake[keep]
        with torch.no_grad():
            weight_factor = (images - y_real).abs().mean(dim=[1, 2, 3], keepdim=True).clip(min=1e-5)
        loss = (y_real - y_fake) * ((y_real - images) - alpha * (y_real - y_fake)) / weight_factor
        loss = loss.sum(dim=[1, 2, 3]).mean()
        g_optimizer.zero_grad(set_to_none=True)
        if keep.any():
            loss.backward()
            _sanitize_and_clip(G.parameters())
            g_optimizer.step()
        losses['loss_G'] = loss.item()
    return losses


if __name__ == '__main__':
    torch.set_num_threads(1)
    torch.manual_seed(0)
    teacher = tiny_edm(label_dim=4)
    print({k: round(v, 4) for k, v in sid_loop(teacher, iterations=5, label_dim=4).items()})
