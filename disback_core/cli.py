"""The ``disback`` console script."""
from __future__ import annotations

import argparse
import logging
import sys

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    import torch

    from .analytic import GaussianMixtureDenoiser
    from .bench.metrics import sliced_wasserstein
    from .denoisers import OneStepGenerator
    from .nets import edm_mlp
    from .step import Batch, critic_step, train_step
    from .adapters import DMD2, DiffInstruct, SiD  # type: ignore[attr-defined]
    import math

    torch.manual_seed(args.seed)
    ang = torch.arange(8) * 2 * math.pi / 8
    teacher = GaussianMixtureDenoiser(torch.stack([2 * ang.cos(), 2 * ang.sin()], 1), 0.1)
    method = {"dmd2": DMD2, "di": DiffInstruct, "sid": SiD}[args.adapter](sigma_data=1.0)
    gen = OneStepGenerator(edm_mlp(2, sigma_data=1.0, width=64, depth=2), 80.0)
    fake = edm_mlp(2, sigma_data=1.0, width=64, depth=2)
    go = torch.optim.Adam(gen.parameters(), 1e-3, betas=(0.0, 0.999))
    fo = torch.optim.Adam(fake.parameters(), 1e-3, betas=(0.0, 0.999))
    batch = lambda: Batch(torch.randn(256, 2))  # noqa: E731
    data, _ = teacher.sample(4000)
    z = torch.randn(4000, 2)
    for _ in range(200):
        critic_step(method, gen, fake, fo, batch())
    with torch.no_grad():
        before = sliced_wasserstein(gen(z), data)
    for _ in range(args.iterations):
        train_step(method, gen, fake, teacher, go, fo, batch)
    with torch.no_grad():
        after = sliced_wasserstein(gen(z), data)
    print(f"{args.adapter}: sliced W2 to the data before {before:.3f}, after {args.iterations} generator steps {after:.3f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="disback", description="Distribution Backtracking for one-step diffusion distillation")
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="distil a built-in problem and report the distance to the data")
    d.add_argument("--adapter", choices=["dmd2", "di", "sid"], default="dmd2")
    d.add_argument("--iterations", type=int, default=400)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
