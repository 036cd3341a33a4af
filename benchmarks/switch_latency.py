"""Switch latency of an in-place attachment: how long writing node k into the user's own UNet takes.

A random-weight ``UNet2DConditionModel`` (a tiny config and the SD-1.5 config) carries a path of
random LoRA nodes (the LCM-LoRA target set, rank 16); ``attach`` is timed once (copy of the
touched layers' originals, weight checks), then ``set_node`` over many switches, and node 0 is
checked bit-exact against the weights before attaching.

    python benchmarks/switch_latency.py --out benchmarks/results/switch_latency.json
    python benchmarks/switch_latency.py --configs tiny --dtypes float32 bfloat16
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import torch

from disback_core import LoraSpec, Trajectory, attach, lora_targets
from disback_core.storage import write_json

CONFIGS = {
    "tiny": dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=12, attention_head_dim=4,
                 norm_num_groups=4),
    "sd15": dict(sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
                 layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                   "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
}


def measure(config: str, dtype: torch.dtype, nodes: int, rank: int, switches: int) -> dict:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    t0 = time.perf_counter()
    unet = UNet2DConditionModel(**CONFIGS[config]).to(dtype).eval().requires_grad_(False)
    build = time.perf_counter() - t0
    spec = LoraSpec(rank=rank).resolved(unet)
    targets = lora_targets(unet, spec)
    g = torch.Generator().manual_seed(1)
    path = [{k: 1e-3 * torch.randn(s, generator=g)
             for t in targets for k, s in ((f"{t.name}.lora_A.weight", t.a_shape), (f"{t.name}.lora_B.weight", t.b_shape))}
            for _ in range(nodes)]
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    t0 = time.perf_counter()
    traj = Trajectory(unet, path, kind="lora", lora=spec)
    t_traj = time.perf_counter() - t0
    t0 = time.perf_counter()
    att = attach(unet, traj, "manual", start=nodes)
    t_attach = time.perf_counter() - t0
    times = []
    order = [(nodes - 1 - i) % (nodes + 1) for i in range(switches)]
    for k in order:
        t0 = time.perf_counter()
        att.set_node(k)
        times.append(time.perf_counter() - t0)
    att.set_node(0)
    exact = all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())
    att.detach()
    touched = sum(int(torch.tensor(t.weight_shape).prod()) for t in targets)
    return {"config": config, "dtype": str(dtype).removeprefix("torch."), "params": sum(p.numel() for p in unet.parameters()),
            "lora_layers": len(targets), "touched_weights": touched, "rank": rank, "nodes": nodes,
            "build_s": build, "trajectory_s": t_traj, "attach_s": t_attach, "switches": switches,
            "switch_median_s": statistics.median(times), "switch_min_s": min(times), "switch_max_s": max(times),
            "node0_bit_exact_after_switches": exact}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--configs", nargs="+", default=["tiny", "sd15"], choices=sorted(CONFIGS))
    ap.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--nodes", type=int, default=5)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--switches", type=int, default=0, help="default: 100 (tiny), 12 (sd15)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for config in args.configs:
        for dt in args.dtypes:
            n = args.switches or (100 if config == "tiny" else 12)
            r = measure(config, getattr(torch, dt), args.nodes, args.rank, n)
            rows.append(r)
            print(f"{config:5s} {r['dtype']:8s} {r['params'] / 1e6:8.1f}M params, {r['lora_layers']} LoRA layers: "
                  f"attach {r['attach_s']:.3f} s, switch median {r['switch_median_s'] * 1e3:.1f} ms "
                  f"(min {r['switch_min_s'] * 1e3:.1f}, max {r['switch_max_s'] * 1e3:.1f}), "
                  f"node 0 bit-exact: {r['node0_bit_exact_after_switches']}", flush=True)
    if args.out:
        write_json(args.out, {"command": "python benchmarks/switch_latency.py " + " ".join(sys.argv[1:] if argv is None else argv),
                              "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), "
                                         f"torch {torch.__version__}, CPU", "rows": rows})
    return rows


if __name__ == "__main__":
    main()
