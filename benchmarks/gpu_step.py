"""DMD2 step time and peak memory at the size users train: plain vs DisBack with attached LoRA nodes.

A random-weight ``UNet2DConditionModel`` (the SD-1.5 config, or ``tiny`` for CPU checks) is the
teacher (a ``DiffusersDenoiser``, eps prediction, SD's scaled-linear schedule). The generator is a
copy run DMD2-style on raw noise at timestep 999 (``timestep_generator``), the fake score another
copy; text conditions are random 77 x 768 states (the config's ``cross_attention_dim``), the
teacher guided with CFG (scale 1.75) against a zero "empty prompt". One iteration =
``train_step(DMD2(critic_steps=5), reuse_samples=True)``: 5 fake-score updates, 1 generator update.

- ``plain``: the teacher is the target;
- ``disback``: a path of random LoRA nodes (the LCM-LoRA target set, rank 16) attached in place to
  the teacher (``attach``), the node moved after every generator update (``FixedInterval(1)``), so
  every iteration pays one switch; its latency is timed separately too.

Options: ``--dtype bfloat16`` casts the three networks (the optimizers then hold bf16 states, as a
pure-bf16 run would), ``--autocast`` runs the losses under ``torch.autocast(bfloat16)`` with fp32
weights instead, ``--compile`` wraps the three networks in ``torch.compile``.

    python benchmarks/gpu_step.py --config sd15 --device cuda --dtype bfloat16 --batch 2 --out benchmarks/results/gpu_step.json
    python benchmarks/gpu_step.py --config tiny --device cpu --iterations 2      # the CPU check (a test runs it)
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from switch_latency import CONFIGS  # noqa: E402

from disback_core import (  # noqa: E402
    Batch,
    CFGDenoiser,
    DiffusersDenoiser,
    FixedInterval,
    KarrasIndexSigma,
    LoraSpec,
    Trajectory,
    attach,
    lora_targets,
    timestep_generator,
    train_step,
)
from disback_core.adapters import DMD2  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def build(config: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> dict[str, Any]:
    from diffusers import DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**CONFIGS[config]).to(device)
    if dtype != torch.float32:
        unet = unet.to(dtype)
    unet = unet.eval().requires_grad_(False)
    sch = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    teacher = DiffusersDenoiser(unet, scheduler=sch)
    return {"unet": unet, "teacher": teacher, "scheduler": sch}


def run(config: str = "tiny", device: str = "cpu", dtype: str = "float32", batch: int = 2, iterations: int = 3,
        warmup: int = 1, autocast: bool = False, compile: bool = False, nodes: int = 4, rank: int = 16,
        cfg_scale: float = 1.75) -> dict[str, Any]:
    dev, dt = torch.device(device), getattr(torch, dtype)
    cfg = CONFIGS[config]
    res: dict[str, Any] = {"config": config, "device": device, "dtype": dtype, "batch": batch, "iterations": iterations,
                           "autocast": autocast, "compile": compile, "torch": torch.__version__,
                           "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None}
    size, ch, ctx = cfg["sample_size"], cfg["in_channels"], cfg["cross_attention_dim"]
    tokens = 77 if config == "sd15" else 5
    g = torch.Generator(device="cpu").manual_seed(0)
    prompts = torch.randn(16, tokens, ctx, generator=g)

    def next_batch() -> Batch:
        idx = torch.randint(0, len(prompts), (batch,), generator=g)
        return Batch(torch.randn(batch, ch, size, size, generator=g).to(dev, dt), prompts[idx].to(dev, dt))

    for variant in ("plain", "disback"):
        parts = build(config, dev, dt)
        unet, teacher, sch = parts["unet"], parts["teacher"], parts["scheduler"]
        gen = timestep_generator(copy.deepcopy(unet).requires_grad_(True), 999, scheduler=sch)
        fake = DiffusersDenoiser(copy.deepcopy(unet).requires_grad_(True), scheduler=sch)
        r = {"sigma_min": teacher.sigma_min * 1.001, "sigma_max": teacher.sigma_max * 0.999}
        method = DMD2(KarrasIndexSigma(index_min=20, index_max=980, **r), sigma_data=1.0,
                      fake_sigma_sampler=KarrasIndexSigma(**r), critic_steps=5)
        att = None
        if variant == "disback":
            spec = LoraSpec(rank=rank).resolved(unet)
            targets = lora_targets(unet, spec)
            pg = torch.Generator().manual_seed(1)
            path = [{k: 1e-3 * torch.randn(s, generator=pg) for t in targets
                     for k, s in ((f"{t.name}.lora_A.weight", t.a_shape), (f"{t.name}.lora_B.weight", t.b_shape))}
                    for _ in range(nodes)]
            t0 = time.perf_counter()
            att = attach(unet, Trajectory(unet, path, kind="lora", lora=spec), FixedInterval(1), start=nodes - 1)
            _sync(dev)
            res["attach_s"] = time.perf_counter() - t0
            res["lora_layers"] = len(targets)
        target = CFGDenoiser(teacher, cfg_scale, torch.zeros(tokens, ctx, device=dev, dtype=dt))
        nets = (gen, fake, target)
        if compile:
            gen, fake, target = (torch.compile(n) for n in nets)  # type: ignore[assignment]
        g_opt = torch.optim.AdamW([p for p in gen.parameters() if p.requires_grad], lr=1e-6, weight_decay=0.01)
        f_opt = torch.optim.AdamW([p for p in fake.parameters() if p.requires_grad], lr=1e-6, weight_decay=0.01)
        amp = torch.autocast(dev.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        times = []
        for i in range(warmup + iterations):
            _sync(dev)
            t0 = time.perf_counter()
            with amp:
                train_step(method, gen, fake, target, g_opt, f_opt, next_batch, max_grad_norm=10.0, reuse_samples=True)
            if att is not None:
                att.step()
            _sync(dev)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        res[variant] = {"step_s_median": statistics.median(times), "step_s_min": min(times),
                        "peak_memory_gib": _peak(dev)}
        if att is not None:
            sw = []
            for k in [(nodes - 1 - i) % (nodes + 1) for i in range(2 * nodes)]:
                _sync(dev)
                t0 = time.perf_counter()
                att.set_node(k)
                _sync(dev)
                sw.append(time.perf_counter() - t0)
            res["switch_s_median"] = statistics.median(sw)
            att.detach()
        del gen, fake, target, g_opt, f_opt, parts, unet, teacher
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    res["disback_over_plain"] = res["disback"]["step_s_median"] / res["plain"]["step_s_median"]
    return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--autocast", action="store_true", help="bf16 autocast around the losses (fp32 weights)")
    p.add_argument("--compile", action="store_true", help="torch.compile the generator, fake score and target")
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    res = run(a.config, a.device, a.dtype, a.batch, a.iterations, a.warmup, a.autocast, a.compile, a.nodes)
    print(json.dumps(res, indent=2))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2, sort_keys=True) + "\n")
    return res


if __name__ == "__main__":
    main()
