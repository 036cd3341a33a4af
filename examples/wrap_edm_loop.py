"""DisBack in an EDM-fork SiD loop (the structure Diff-Instruct and SiD build on): nine lines change.

    python examples/wrap_edm_loop.py                  # plain SiD, then SiD + DisBack, tiny models
    python examples/show_diff.py wrap_edm_loop        # the diff against the user's loop

The user's code is ``examples/foreign/edm_distill.py``: an NVlabs-style ``EDMPrecond`` teacher
called as ``net(x, sigma, class_labels)`` whose layers are custom ``Conv2d``/``Linear`` classes
(weights as plain ``nn.Parameter``s, ``torch.nn.functional`` calls), a fake score and a one-step
generator that are deep copies of it, and SiD's loop. :func:`sid_loop_disback` is that loop with
DisBack: LoRA nodes on the custom layers (the library's parametrized delta; peft refuses them),
recorded with the user's own ``dsm_loss``, then ``attach`` on the user's ``true_score``.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from foreign.dmd2_edm import toy_images  # noqa: E402
from foreign.edm_distill import _sanitize_and_clip, dsm_loss, generate, pretrain, sample_sigma, sid_loop  # noqa: E402,F401
from foreign.edm_networks import tiny_edm  # noqa: E402

from show_diff import summary  # noqa: E402

from disback_core import DegradationRecorder, FixedInterval, attach, lora_targets  # noqa: E402


def sid_loop_disback(net: nn.Module, *, iterations: int, batch_size: int = 16, alpha: float = 1.2,
             init_sigma: float = 2.5, lr: float = 1e-5, seed: int = 0,
             label_dim: int = 0, record_steps: int = 100, nodes: int = 5, every: int = 10) -> dict[str, float]:
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
    rec = DegradationRecorder(true_score, fake_score, steps=record_steps, nodes=nodes, lr=lr)
    for _ in range(record_steps):
        with torch.no_grad():
            images = generate(G, torch.randn(shape), None, init_sigma)
        rec.update(dsm_loss(rec.module, images, None), probe=images)
    att = attach(true_score, rec.trajectory(), FixedInterval(every), fake=fake_score)
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
        att.step()
        losses['loss_G'] = loss.item()
    return {**losses, "attachment": att}


PLAIN, DISBACK = sid_loop, sid_loop_disback


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--iterations", type=int, default=100)
    ap.add_argument("--record-steps", type=int, default=60)
    ap.add_argument("--teacher-steps", type=int, default=100)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    teacher = pretrain(tiny_edm(seed=0), toy_images(512, seed=0), steps=args.teacher_steps)
    original = {k: v.clone() for k, v in teacher.state_dict().items()}
    targets = lora_targets(teacher)
    print(f"LoRA targets: {len(targets)} custom layers ({sorted({t.layer for t in targets})}), backends "
          f"{sorted({t.backend for t in targets})}")
    kw = dict(iterations=args.iterations, lr=1e-4)
    plain = sid_loop(copy.deepcopy(teacher), **kw)
    every = max(1, args.iterations // 10 // 4)  # a tenth of the generator updates on the 4 degraded targets
    out = sid_loop_disback(teacher, record_steps=args.record_steps, nodes=5, every=every, **kw)
    return summary("SiD", plain, out, out.pop("attachment"), teacher, original)


if __name__ == "__main__":
    main()
