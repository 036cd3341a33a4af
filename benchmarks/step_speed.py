"""Iteration time of the library's DMD2 against DMD2's own trainer, at equal work, on CPU.

DMD2's ``train_one_step`` loop (the port in ``examples/foreign/dmd2_edm.py``: five iterations of
a generator forward, one generator update per five, and a fake-score update on each iteration's
generator samples) against ``train_step(DMD2(critic_steps=5), ...)`` on the same NVlabs-style
network (``tiny_edm``), fp32, no GAN term, AdamW (0.9, 0.999), wd 0.01, gradient clipping at 10.
One cycle = 5 critic updates + 1 generator update. Variants of the library step:

- ``library``: critic updates first, each on a fresh generator forward (6 forwards per cycle);
- ``library-reuse``: ``reuse_samples=True``, DMD2's order (5 forwards per cycle, as DMD2);
- ``library-reuse-foreach`` / ``library-reuse-fused``: the same with ``AdamW(foreach=True)`` /
  ``AdamW(fused=True)`` (DMD2's trainer keeps torch's default, the per-tensor loop on CPU).

The variants run interleaved, round by round, in one process with one thread, so other load on
the machine hits all alike; CPU seconds of the process are reported (and wall seconds).

    python benchmarks/step_speed.py --batch 4 16 --rounds 15 --out benchmarks/results/step_speed.json
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from foreign.dmd2_edm import EDMUniModel, train_dmd2  # noqa: E402
from foreign.edm_networks import tiny_edm  # noqa: E402

from disback_core import Batch, OneStepGenerator, train_step  # noqa: E402
from disback_core.adapters import DMD2  # noqa: E402


def dmd2_cycle(batch: int) -> Callable[[], None]:
    uni = EDMUniModel(tiny_edm(), gan_classifier=False)
    return lambda: train_dmd2(uni, iterations=5, batch_size=batch, lr_generator=1e-5, lr_guidance=1e-5)


def library_cycle(batch: int, reuse: bool, impl: str | None) -> Callable[[], None]:
    teacher = tiny_edm().requires_grad_(False)
    gen = OneStepGenerator(copy.deepcopy(teacher).requires_grad_(True), 80.0)
    fake = copy.deepcopy(teacher).requires_grad_(True)
    kw: dict[str, Any] = {"lr": 1e-5, "betas": (0.9, 0.999), "weight_decay": 0.01}
    if impl is not None:  # "foreach" or "fused" (torch's multi-tensor / fused AdamW kernels)
        kw[impl] = True
    g_opt = torch.optim.AdamW(gen.parameters(), **kw)
    f_opt = torch.optim.AdamW(fake.parameters(), **kw)
    method = DMD2(sigma_data=0.5, critic_steps=5)
    shape = (batch, 2, 8, 8)
    nb = lambda: Batch(torch.randn(shape))  # noqa: E731
    return lambda: train_step(method, gen, fake, teacher, g_opt, f_opt, nb, max_grad_norm=10.0, reuse_samples=reuse)


def measure(batch: int, rounds: int, warmup: int = 2) -> dict[str, Any]:
    torch.manual_seed(0)
    runs = {"dmd2": dmd2_cycle(batch), "library": library_cycle(batch, False, None),
            "library-reuse": library_cycle(batch, True, None),
            "library-reuse-foreach": library_cycle(batch, True, "foreach"),
            "library-reuse-fused": library_cycle(batch, True, "fused")}
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    wall: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(warmup + rounds):
        for name, fn in runs.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            if r >= warmup:
                cpu[name].append(time.process_time() - c0)
                wall[name].append(time.perf_counter() - t0)
    base = statistics.median(cpu["dmd2"])
    return {"batch": batch, "rounds": rounds,
            "cpu_s_per_cycle": {k: statistics.median(v) for k, v in cpu.items()},
            "wall_s_per_cycle": {k: statistics.median(v) for k, v in wall.items()},
            "ratio_to_dmd2_cpu": {k: statistics.median(v) / base for k, v in cpu.items()},
            "cpu_iqr": {k: [statistics.quantiles(v, n=4)[0], statistics.quantiles(v, n=4)[2]] for k, v in cpu.items()}}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--batch", type=int, nargs="+", default=[4, 16])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    res = {"command": "python benchmarks/step_speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "torch": torch.__version__, "threads": 1, "results": [measure(b, a.rounds) for b in a.batch]}
    for r in res["results"]:
        print(f"batch {r['batch']}: " + ", ".join(f"{k} {v * 1e3:.1f} ms ({r['ratio_to_dmd2_cpu'][k]:.3f}x)"
                                                   for k, v in r["cpu_s_per_cycle"].items()))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2, sort_keys=True) + "\n")
    return res


if __name__ == "__main__":
    main()
