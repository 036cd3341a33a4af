"""Memory per role of DisBack in the one-base LoRA layout (diffusers' LCM-LoRA scripts, DMD2's
``--generator_lora``): the path served as a second peft adapter on the base (``SharedBasePath``) against
the in-place route (``attach``: a full teacher copy, plus the attachment's copy of the touched originals).

Counted from the configs on the meta device (no allocation, no download): SD-1.5 and SDXL UNets
(``UNet2DConditionModel``) and an SD3-medium-size ``SD3Transformer2DModel``; rank-16 LoRA on the
library's default targets (the LCM-LoRA set for UNets, ``SD3_TARGETS`` for SD3) for the generator's
adapter and for the path, 10 nodes. Weights and optimizer state only (no activations). Also the FLOPs
of one teacher forward (one sample, native latent size) with the path as an unmerged adapter, against
the merged weights an attached copy holds (counted with ``FlopCounterMode`` on the meta device).

    python benchmarks/memory_shared_base.py --out benchmarks/results/memory_shared_base.json
"""
from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from storage import SD15, SDXL  # noqa: E402

from disback_core import LoraSpec, lora_targets  # noqa: E402
from disback_core.lora import lora_template  # noqa: E402
from disback_core.storage import write_json  # noqa: E402

GB = 1e9
# SD3-medium's transformer config (stabilityai/stable-diffusion-3-medium-diffusers, transformer/config.json)
SD3_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                  num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)
TRAINABLE = 4 + 4 + 8  # bytes per trainable parameter: fp32 weight, fp32 gradient, AdamW exp_avg and exp_avg_sq


def build(cls_name: str, config: dict):
    import diffusers
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=True):
        return getattr(diffusers, cls_name)(**config)


def _inputs(model) -> tuple[tuple, dict]:
    """Meta-device inputs of one sample at the model's native latent size (77 text tokens, SD3: 154)."""
    cfg, meta = model.config, torch.device("meta")
    size = cfg.sample_size
    if type(model).__name__ == "SD3Transformer2DModel":
        return (), dict(hidden_states=torch.empty(1, cfg.in_channels, size, size, device=meta),
                        timestep=torch.ones(1, device=meta),
                        encoder_hidden_states=torch.empty(1, 154, cfg.joint_attention_dim, device=meta),
                        pooled_projections=torch.empty(1, cfg.pooled_projection_dim, device=meta))
    kw: dict = dict(encoder_hidden_states=torch.empty(1, 77, cfg.cross_attention_dim, device=meta))
    if cfg.addition_embed_type == "text_time":
        n_text = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kw["added_cond_kwargs"] = {"text_embeds": torch.empty(1, n_text, device=meta),
                                   "time_ids": torch.empty(1, 6, device=meta)}
    return (torch.empty(1, cfg.in_channels, size, size, device=meta), torch.ones(1, device=meta)), kw


def forward_flops(model) -> int:
    """FLOPs of one forward (one sample), counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    args, kw = _inputs(model)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(*args, **kw)
    return counter.get_total_flops()


def unmerged_overhead(cls_name: str, config: dict, spec: LoraSpec) -> tuple[int, int]:
    """FLOPs of the teacher's forward alone and with the path as an unmerged rank-r adapter on every target
    (what a forward inside ``path.target()`` costs; a merged copy costs the first)."""
    from peft import LoraConfig, inject_adapter_in_model

    model = build(cls_name, config)
    names = [t.name for t in lora_targets(model, spec)]
    plain = forward_flops(model)
    with torch.device("meta"):
        inject_adapter_in_model(LoraConfig(r=spec.rank, lora_alpha=spec.rank, init_lora_weights=False,
                                           target_modules="(?:" + "|".join(map(re.escape, names)) + ")"),
                                model, adapter_name="disback_path", low_cpu_mem_usage=True)
    return plain, forward_flops(model)


def roles(name: str, cls_name: str, config: dict, *, rank: int = 16, nodes: int = 10) -> dict:
    model = build(cls_name, config)
    assert all(t.device.type == "meta" for t in (*model.parameters(), *model.buffers()))  # nothing allocated
    params = sum(p.numel() for p in model.parameters())
    spec = LoraSpec(rank=rank)
    lora = sum(math.prod(s) for s in lora_template(model, spec).values())  # one node = one rank-16 adapter
    targets = lora_targets(model, spec)
    touched = sum(math.prod(t.weight_shape) for t in targets)
    g = {
        "base_bf16": params * 2,
        "generator_adapter_fp32_grads_adamw": lora * TRAINABLE,
        "fake_full_copy_fp32_grads_adamw": params * TRAINABLE,
        "fake_lora_adapter_fp32_grads_adamw": lora * TRAINABLE,
        "path_adapter_one_node_fp32": lora * 4,
        "teacher_copy_bf16": params * 2,
    }
    cpu = {
        "path_nodes_fp32": nodes * lora * 4,
        "attach_originals_bf16": touched * 2,
    }
    plain = g["base_bf16"] + g["generator_adapter_fp32_grads_adamw"]
    flops, flops_adapter = unmerged_overhead(cls_name, config, spec)
    out = {
        "model": name, "class": cls_name, "params": params, "lora_rank": rank, "nodes": nodes,
        "lora_targets": len(targets), "lora_params_per_node": lora, "touched_weight_params": touched,
        "gpu_GB": {k: v / GB for k, v in g.items()}, "cpu_GB": {k: v / GB for k, v in cpu.items()},
        "teacher_forward_GFLOP": flops / 1e9, "teacher_forward_with_path_adapter_GFLOP": flops_adapter / 1e9,
        "path_adapter_flops_overhead": flops_adapter / flops - 1,
    }
    for fake in ("full", "lora"):
        f = g[f"fake_{'full_copy' if fake == 'full' else 'lora_adapter'}_fp32_grads_adamw"]
        out[f"fake_{fake}"] = {
            "no_disback_gpu_GB": (plain + f) / GB,
            "shared_base_gpu_GB": (plain + f + g["path_adapter_one_node_fp32"]) / GB,
            "shared_base_cpu_GB": cpu["path_nodes_fp32"] / GB,
            "attach_gpu_GB": (plain + f + g["teacher_copy_bf16"]) / GB,
            "attach_cpu_GB": (cpu["path_nodes_fp32"] + cpu["attach_originals_bf16"]) / GB,
        }
    return out


def table(rows: list[dict]) -> str:
    head = "| | " + " | ".join(f"{r['model']} ({r['params'] / 1e9:.2f}B)" for r in rows) + " |"
    lines = [head, "|---|" + "---|" * len(rows)]

    def row(label, fn):
        lines.append(f"| {label} | " + " | ".join(fn(r) for r in rows) + " |")

    row("LoRA targets / params per node (rank 16)", lambda r: f"{r['lora_targets']} / {r['lora_params_per_node'] / 1e6:.1f}M")
    row("base, bf16 (GPU)", lambda r: f"{r['gpu_GB']['base_bf16']:.2f} GB")
    row("generator adapter, fp32 + grads + AdamW (GPU)", lambda r: f"{r['gpu_GB']['generator_adapter_fp32_grads_adamw']:.3f} GB")
    row("fake score, full copy, fp32 + grads + AdamW (GPU)", lambda r: f"{r['gpu_GB']['fake_full_copy_fp32_grads_adamw']:.2f} GB")
    row("fake score as a LoRA adapter, fp32 + grads + AdamW (GPU)", lambda r: f"{r['gpu_GB']['fake_lora_adapter_fp32_grads_adamw']:.3f} GB")
    row("**path as a second adapter**: one node's factors, fp32 (GPU)", lambda r: f"**{r['gpu_GB']['path_adapter_one_node_fp32']:.3f} GB**")
    row("path nodes, 10 x rank 16, fp32 (CPU, both routes)", lambda r: f"{r['cpu_GB']['path_nodes_fp32']:.2f} GB")
    row("attach route: teacher copy, bf16 (GPU)", lambda r: f"{r['gpu_GB']['teacher_copy_bf16']:.2f} GB")
    row("attach route: attachment's originals, bf16 (CPU)", lambda r: f"{r['cpu_GB']['attach_originals_bf16']:.2f} GB")
    for fake, label in (("full", "full-copy fake"), ("lora", "LoRA fake")):
        row(f"GPU total, {label}: no DisBack / shared base / attach",
            lambda r, f=fake: f"{r[f'fake_{f}']['no_disback_gpu_GB']:.2f} / {r[f'fake_{f}']['shared_base_gpu_GB']:.2f} / "
                              f"{r[f'fake_{f}']['attach_gpu_GB']:.2f} GB")
    row("teacher forward FLOPs: path as an unmerged adapter vs a merged copy (attach)",
        lambda r: f"+{100 * r['path_adapter_flops_overhead']:.1f}%")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--out", default="benchmarks/results/memory_shared_base.json")
    args = ap.parse_args()
    rows = [roles("SD-1.5 UNet", "UNet2DConditionModel", SD15), roles("SDXL UNet", "UNet2DConditionModel", SDXL),
            roles("SD3-medium transformer", "SD3Transformer2DModel", SD3_MEDIUM)]
    text = table(rows)
    print(text)
    write_json(args.out, {"command": "python benchmarks/memory_shared_base.py --out " + args.out, "rows": rows,
                          "table": text})


if __name__ == "__main__":
    main()
