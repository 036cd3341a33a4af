"""Memory each role of a DisBack run takes, counted from the SD-1.5 and SDXL UNet configs (empty
weights, no download): the teacher, the generator and the fake score (trainable: fp32 weights,
fp32 gradients, two AdamW moments), the LoRA path, and the in-place attachment's copy of the
original weights of the layers it touches.

    python benchmarks/memory.py --out benchmarks/results/memory.json
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from storage import SD15, SDXL  # noqa: E402

from disback_core import LoraSpec, lora_targets  # noqa: E402
from disback_core.lora import lora_template  # noqa: E402
from disback_core.storage import write_json  # noqa: E402

GB = 1e9


def roles(name: str, config: dict, *, rank: int = 16, nodes: int = 10, world: int = 8) -> dict:
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        unet = UNet2DConditionModel(**config)
    params = sum(p.numel() for p in unet.parameters())
    spec = LoraSpec(rank=rank)
    lora = sum(math.prod(s) for s in lora_template(unet, spec).values())
    touched = sum(math.prod(t.weight_shape) for t in lora_targets(unet, spec))
    trainable = params * (4 + 4 + 8)  # fp32 weights + fp32 grads + AdamW exp_avg, exp_avg_sq
    return {
        "model": name, "params": params, "lora_rank": rank, "nodes": nodes, "lora_params_per_node": lora,
        "touched_weight_params": touched,
        "teacher_bf16_GB": params * 2 / GB, "teacher_fp32_GB": params * 4 / GB,
        "generator_trainable_GB_per_rank_ddp": trainable / GB,
        "fake_trainable_GB_per_rank_ddp": trainable / GB,
        f"generator_trainable_GB_per_rank_fsdp{world}": trainable / world / GB,
        "lora_path_fp32_GB": nodes * lora * 4 / GB,
        "attach_originals_bf16_GB_cpu": touched * 2 / GB,
        "attach_originals_fp32_GB_cpu": touched * 4 / GB,
        "full_path_bf16_GB": nodes * params * 2 / GB,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--out")
    args = ap.parse_args()
    rows = [roles("SD-1.5", SD15), roles("SDXL", SDXL)]
    for r in rows:
        print(f"{r['model']}: {r['params'] / 1e9:.3f}B params; teacher {r['teacher_bf16_GB']:.2f} GB bf16; generator and "
              f"fake {r['generator_trainable_GB_per_rank_ddp']:.1f} GB each per rank (DDP), "
              f"{r['generator_trainable_GB_per_rank_fsdp8']:.2f} GB (FSDP2, 8 ranks); LoRA path "
              f"({r['nodes']} nodes, rank {r['lora_rank']}) {r['lora_path_fp32_GB']:.2f} GB fp32; attach originals "
              f"{r['attach_originals_bf16_GB_cpu']:.2f} GB bf16 (CPU); full path {r['full_path_bf16_GB']:.1f} GB")
    if args.out:
        write_json(args.out, {"command": "python benchmarks/memory.py --out " + args.out, "rows": rows})


if __name__ == "__main__":
    main()
