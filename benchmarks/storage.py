"""Bytes of a DisBack path stored as LoRA nodes against full nodes.

Measured on disk for the built-in problems (a recorded 5-node path, saved both ways), and counted
for SD-1.5 and SDXL UNets built from their published configs with empty weights (no download):
the LoRA slot with the project's default targets for ``UNet2DConditionModel``. Also the error of
node mode ``svd`` (the LoRA-targeted weights fine-tuned at full rank, each node compressed to
rank r) at the runner's degradation
settings.

    python benchmarks/storage.py --out benchmarks/results/storage.json
"""
from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import torch

from disback_core import LoraSpec, make_generator, record_degradation
from disback_core.adapters import DMD2
from disback_core.bench.problems import get_problem
from disback_core.lora import default_target_modules, lora_template
from disback_core.storage import write_json

SD15 = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8)
SDXL = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
            cross_attention_dim=2048, attention_head_dim=(5, 10, 20), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)


def folder_bytes(path: Path, pattern: str = "node-*.safetensors") -> int:
    return sum(p.stat().st_size for p in path.glob(pattern))


def measured(problem_name: str, nodes: int = 5, rank: int = 8) -> dict:
    problem = get_problem(problem_name)
    g = torch.Generator().manual_seed(0)
    nb = lambda: problem.batch(16, g)  # noqa: E731
    gen = make_generator(problem.teacher, 80.0).requires_grad_(False)
    kw = dict(steps=nodes, interval=1, lr=1e-4, probe_size=4)
    out = {"problem": problem_name, "nodes": nodes, "rank": rank,
           "teacher_params": sum(p.numel() for p in problem.teacher.parameters())}
    with tempfile.TemporaryDirectory() as d:
        for mode in ("lora", "full"):
            traj = record_degradation(problem.teacher, gen, DMD2(sigma_data=problem.sigma_data), nb, mode=mode,
                                      lora=LoraSpec(rank=rank), **kw)
            traj.save(Path(d) / mode)
            out[f"{mode}_bytes"] = folder_bytes(Path(d) / mode)
            out[f"{mode}_params_per_node"] = sum(t.numel() for t in traj.nodes[0].values())
    out["ratio"] = out["lora_bytes"] / out["full_bytes"]
    return out


def svd_error(problem_name: str, ranks=(2, 8, 32), steps: int = 500, nodes: int = 5) -> dict:
    """Relative error of rank-r SVD nodes at the benchmark runner's degradation settings (DMD2)."""
    problem = get_problem(problem_name)
    out = {"problem": problem_name, "steps": steps, "nodes": nodes, "ranks": {}}
    for r in ranks:
        g = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        gen = make_generator(problem.teacher, 80.0).requires_grad_(False)
        traj = record_degradation(problem.teacher, gen, DMD2(sigma_data=problem.sigma_data), lambda: problem.batch(256, g),
                                  steps=steps, interval=steps // nodes, lr=1e-4, mode="svd", lora=LoraSpec(rank=r))
        out["ranks"][str(r)] = {"weight_delta_error": traj.meta["svd_error"], "output_error": traj.meta["svd_output_error"]}
    return out


def counted(name: str, config: dict, ranks=(16, 64)) -> dict:
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        unet = UNet2DConditionModel(**config)
    total = sum(p.numel() for p in unet.parameters())
    row = {"model": name, "params": total, "targets": default_target_modules(unet)}
    for r in ranks:
        n = sum(math.prod(s) for s in lora_template(unet, LoraSpec(rank=r)).values())
        row[f"rank{r}_params"] = n
        row[f"rank{r}_share"] = n / total
        row[f"rank{r}_10_nodes_bf16_GB"] = 10 * n * 2 / 1e9
    row["full_10_nodes_bf16_GB"] = 10 * total * 2 / 1e9
    return row


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False)
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = [measured("toy2d"), measured("digits")]
    for r in rows:
        print(f"{r['problem']:7s} teacher {r['teacher_params']:,} params: 5 LoRA nodes {r['lora_bytes']:,} B, "
              f"5 full nodes {r['full_bytes']:,} B, ratio {r['ratio']:.4f}")
    big = [counted("SD-1.5 UNet", SD15), counted("SDXL UNet", SDXL)]
    for r in big:
        print(f"{r['model']}: {r['params']/1e9:.3f}B params; rank 16 {r['rank16_params']/1e6:.1f}M "
              f"({100*r['rank16_share']:.2f}%), rank 64 {r['rank64_params']/1e6:.1f}M ({100*r['rank64_share']:.2f}%); "
              f"10 nodes bf16: LoRA r16 {r['rank16_10_nodes_bf16_GB']:.2f} GB vs full {r['full_10_nodes_bf16_GB']:.1f} GB")
    svd = [svd_error("toy2d"), svd_error("digits")]
    for r in svd:
        for rank, e in r["ranks"].items():
            print(f"{r['problem']:7s} SVD rank {rank:>2s}: weight-delta error per node "
                  f"{' '.join(f'{v:.3f}' for v in e['weight_delta_error'])}; output error "
                  f"{' '.join(f'{v:.3f}' for v in e['output_error'])}")
    write_json(args.out, {"measured": rows, "counted": big, "svd": svd})


if __name__ == "__main__":
    main()
