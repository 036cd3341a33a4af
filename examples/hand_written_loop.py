"""Each adapter called from a hand-written loop (no helper), on the built-in 2D problem.

    python examples/hand_written_loop.py --iterations 300

The three calls a loop needs are ``method.fake_score_loss`` (the critic), ``method.generator_loss``
(the generator, given the target and the fake score) and ``method.on_generator_step()``.
"""
from __future__ import annotations

import argparse

import torch

from disback_core import make_generator, trainable_copy
from disback_core.adapters import DMD2, DiffInstruct, SiD
from disback_core.bench.metrics import sliced_wasserstein
from disback_core.bench.problems import get_problem


def distil(method, problem, sigma_init: float, iterations: int, batch: int = 256, lr: float = 1e-4) -> tuple[float, float]:
    teacher = problem.teacher                      # frozen D(x_t, sigma, cond) -> x0
    generator = make_generator(teacher, sigma_init)  # G(z) = D(sigma_init z, sigma_init), trainable
    fake = trainable_copy(teacher)                 # the online critic starts as the teacher
    g_opt = torch.optim.Adam(generator.parameters(), lr, betas=(0.0, 0.999))
    f_opt = torch.optim.Adam([*fake.parameters(), *method.critic_parameters()], lr, betas=(0.0, 0.999))
    z_eval = torch.randn(4000, 2)
    data = problem.heldout_data()[0]
    before = sliced_wasserstein(generator(z_eval).detach(), data)
    for _ in range(iterations):
        for _ in range(method.critic_steps):       # DMD2: 5 critic updates per generator update
            with torch.no_grad():
                x = generator(torch.randn(batch, 2))
            loss = method.fake_score_loss(x, fake)["loss"]
            f_opt.zero_grad()
            loss.backward()
            f_opt.step()
        x = generator(torch.randn(batch, 2))
        loss = method.generator_loss(x, teacher, fake)["loss"]
        g_opt.zero_grad()
        loss.backward(inputs=list(generator.parameters()))  # leave the fake score's gradients alone
        g_opt.step()
        method.on_generator_step()
    return before, sliced_wasserstein(generator(z_eval).detach(), data)


def main(argv: list[str] | None = None) -> dict[str, tuple[float, float]]:
    ap = argparse.ArgumentParser(allow_abbrev=False)
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--cache-dir")
    ap.add_argument("--teacher-steps", type=int, default=8000)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    problem = get_problem("toy2d", args.cache_dir, teacher_steps=args.teacher_steps)
    sd = problem.sigma_data
    out = {}
    for name, method, sigma_init in [("DiffInstruct", DiffInstruct(sigma_data=sd), 1.0),
                                     ("DMD2", DMD2(sigma_data=sd), 80.0),
                                     ("SiD", SiD(alpha=1.2, sigma_data=sd), 2.5)]:
        before, after = distil(method, problem, sigma_init, args.iterations)
        out[name] = (before, after)
        print(f"{name:12s} sliced W2 to data: {before:.3f} -> {after:.3f} after {args.iterations} generator updates")
    return out


if __name__ == "__main__":
    main()
