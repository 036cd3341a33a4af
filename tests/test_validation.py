"""The input-validation audit of the public API: one row per check, each a bad call that must fail
with the documented exception naming the argument. The same rows (by id) form the table in
docs/RELIABILITY.md ("Input validation"); a test keeps the two in step."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import tiny_unet2d, tiny_unet2d_condition

import disback_core as D
from disback_core.adapters import DMD2, DiffInstruct, SiD

torch.manual_seed(0)
NET = D.edm_mlp(2, width=8, depth=1)
X = torch.randn(4, 2)
ONES = torch.ones(4)
GEN = D.make_generator(NET, 80.0)
SGD = lambda: torch.optim.SGD(NET.parameters(), 0.1)  # noqa: E731
ABAR = torch.linspace(0.99, 0.01, 10)


UX = torch.randn(2, 2, 8, 8)


def _unet(cond=False, **kw):
    from diffusers import DDPMScheduler

    return D.DiffusersDenoiser((tiny_unet2d_condition if cond else tiny_unet2d)(**kw), scheduler=DDPMScheduler())


def _sdxl_width(tmp):
    d = _unet(True, addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=34)
    added = {"text_embeds": torch.zeros(2, 12), "time_ids": torch.zeros(2, 6)}
    return d(UX, 1.0, {"encoder_hidden_states": torch.zeros(2, 5, 12), "added_cond_kwargs": added})


def _record_on_another_bf16_teacher(tmp):
    teacher = D.edm_mlp(2, width=8, depth=1).to(torch.bfloat16)
    return D.DegradationRecorder(teacher, D.edm_mlp(2, width=8, depth=1), interval=1)


def _attach_cast_and_changed(tmp):
    net = D.edm_mlp(2, width=8, depth=1)
    traj = D.Trajectory(net, [D.trainable_copy(net)], kind="full")
    net.to(torch.bfloat16)
    with torch.no_grad():
        next(net.parameters()).add_(1.0)
    return D.attach(net, traj, "manual")


def _raw_unet_export(tmp):
    return D.export_generator(tiny_unet2d(), tmp / "e")


def _export_into_foreign(tmp):
    (tmp / "f").mkdir()
    (tmp / "f" / "a.txt").write_text("x")
    return D.export_generator(GEN, tmp / "f")


# id, what is checked, call (gets a tmp folder), exception, message pattern
ROWS = [
    # samples, sigmas, conditions (every denoiser call: check_sample, as_sigma)
    ("x-dtype", "x is a floating tensor", lambda t: NET(torch.ones(4, 2, dtype=torch.long), ONES), TypeError, "x must be a floating"),
    ("x-batch-dim", "x has a batch dimension", lambda t: NET(torch.tensor(1.0), torch.ones(1)), ValueError, r"x must have shape \[batch"),
    ("sigma-positive", "sigma > 0", lambda t: NET(X, -ONES), ValueError, "sigma must be > 0"),
    ("sigma-finite", "sigma finite", lambda t: NET(X, ONES * float("nan")), ValueError, "sigma must be finite"),
    ("sigma-batch", "sigma has one value per sample", lambda t: NET(X, torch.ones(3)), ValueError, "sigma has 3 values"),
    ("sigma-type", "sigma is a number or tensor", lambda t: NET(X, "a"), TypeError, "sigma must be a number"),
    ("sigma-meta", "sigma holds data", lambda t: NET(X, torch.ones(4, device="meta")), ValueError, "meta device"),
    ("edm-sigma-data", "EDMPrecond sigma_data > 0", lambda t: D.EDMPrecond(NET.net, sigma_data=0), ValueError, "sigma_data must be > 0"),
    ("diffusers-prediction", "DiffusersDenoiser prediction_type declared", lambda t: D.DiffusersDenoiser(NET, ABAR, "foo"), ValueError, "prediction_type"),
    ("diffusers-schedule", "alphas_cumprod in (0, 1), decreasing", lambda t: D.DiffusersDenoiser(NET, ABAR.flip(0), "epsilon"), ValueError, "strictly decreasing"),
    ("diffusers-sigma-range", "sigma inside the schedule (or clamp=True)", lambda t: D.DiffusersDenoiser(NET, ABAR, "epsilon")(X, ONES * 1e4), ValueError, "outside the schedule"),
    ("cfg-scale", "CFG scale finite", lambda t: D.CFGDenoiser(NET, float("nan"), torch.zeros(1)), ValueError, "scale must be finite"),
    ("cfg-scale-type", "CFG scale a real number, at construction", lambda t: D.CFGDenoiser(NET, True, torch.zeros(1)), TypeError, "scale must be a real number"),
    ("cfg-uncond-type", "CFG uncond a tensor or dict of tensors, at construction", lambda t: D.CFGDenoiser(NET, 4.5, None), TypeError, "uncond must be the null condition for one sample"),
    ("cfg-denoiser", "CFG wraps a D(x, sigma, cond) denoiser", lambda t: D.CFGDenoiser("teacher", 4.5, torch.zeros(1)), TypeError, "denoiser must be a denoiser"),
    ("cfg-cond", "CFG needs a cond", lambda t: D.CFGDenoiser(NET, 2.0, torch.zeros(1))(X, ONES), ValueError, "needs cond"),
    ("cfg-uncond-shape", "uncond fits cond", lambda t: D.CFGDenoiser(NET, 2.0, torch.zeros(3))(X, ONES, torch.zeros(4, 5)), ValueError, "uncond of shape"),
    ("cfg-dict-cond", "dict cond needs dict uncond", lambda t: D.CFGDenoiser(NET, 2.0, torch.zeros(1))(X, ONES, {"a": torch.zeros(4)}), TypeError, "uncond must be a dict"),
    ("unet-text-width", "a text cond's width is config.cross_attention_dim", lambda t: _unet(True, cross_attention_dim=32)(UX, 1.0, torch.zeros(2, 7, 16)), ValueError, r"config\.cross_attention_dim is 32: expected \[batch, tokens, 32\]"),
    ("unet-cond-rows", "a UNet cond has one row per sample", lambda t: _unet(True)(UX, 1.0, torch.zeros(3, 5, 12)), ValueError, "cond has 3 rows"),
    ("unet-class-dtype", "class labels are integers", lambda t: _unet(num_class_embeds=10)(UX, 1.0, torch.ones(2)), TypeError, r"config\.num_class_embeds = 10 classes: pass integer labels"),
    ("unet-class-range", "class labels in 0..num_class_embeds-1", lambda t: _unet(num_class_embeds=10)(UX, 1.0, torch.tensor([0, 10])), ValueError, r"config\.num_class_embeds is 10: expected integer labels in 0\.\.9"),
    ("unet-unconditional", "no cond for an unconditional UNet", lambda t: _unet()(UX, 1.0, torch.tensor([0, 1])), ValueError, "is unconditional"),
    ("unet-sdxl-width", "SDXL added_cond_kwargs fit projection_class_embeddings_input_dim", _sdxl_width, ValueError, r"config\.projection_class_embeddings_input_dim is 34"),
    ("two-arg-net", "a D(x, sigma) net is named, with the fix", lambda t: D.check_denoiser(lambda x, s: x, "teacher"), TypeError, "Unconditional"),
    ("unconditional-cond", "Unconditional refuses a cond", lambda t: D.Unconditional(NET)(X, ONES, torch.zeros(4)), ValueError, "unconditional"),
    ("generator-sigma", "sigma_init finite and > 0", lambda t: D.OneStepGenerator(NET, 0.0), ValueError, "sigma_init must be finite"),
    ("generator-noise-scale", "noise_scale finite and > 0", lambda t: D.OneStepGenerator(NET, 1.0, noise_scale=-1.0), ValueError, "noise_scale"),
    ("teacher-module", "make_generator takes a module", lambda t: D.make_generator("x", 80.0), TypeError, "torch.nn.Module"),
    ("generator-cond", "a 1-argument generator gets no cond", lambda t: D.call_generator(lambda z: z, X, torch.zeros(4)), TypeError, "takes only z"),
    ("timestep-range", "timestep_generator timestep in the schedule", lambda t: D.timestep_generator(NET, 5000, ABAR, "epsilon"), ValueError, "timestep must be a number"),
    # sigma samplers and losses
    ("lognormal-std", "LogNormalSigma p_std > 0", lambda t: D.LogNormalSigma(-1.2, -1.0), ValueError, "p_std must be > 0"),
    ("sampler-n", "a sampler's n >= 1", lambda t: D.LogNormalSigma()(0), ValueError, "n must be >= 1"),
    ("karras-index", "0 <= index_min <= index_max < num", lambda t: D.KarrasIndexSigma(index_min=980, index_max=20), ValueError, "index_min"),
    ("karras-range", "0 < sigma_min < sigma_max", lambda t: D.karras_sigmas(10, sigma_min=80, sigma_max=0.002), ValueError, "sigma_min"),
    ("dsm-sigma-data", "DSMLoss sigma_data > 0", lambda t: D.DSMLoss(D.LogNormalSigma(), 0.0), ValueError, "sigma_data must be > 0"),
    ("dsm-reduction", "DSMLoss reduction is mean or sum", lambda t: D.DSMLoss(reduction="max"), ValueError, "reduction"),
    ("dsm-noise-shape", "DSM noise has x's shape", lambda t: D.DSMLoss()(NET, X, noise=torch.randn(3, 2)), ValueError, "noise has shape"),
    ("dsm-sigma", "DSM sigma > 0", lambda t: D.DSMLoss()(NET, X, sigma=-ONES), ValueError, "sigma must be > 0"),
    ("normaliser-shape", "normaliser inputs match", lambda t: D.abs_mean_normaliser(X, torch.randn(3, 2)), ValueError, "d_real has shape"),
    ("r1-grad", "R1 input requires grad", lambda t: D.r1_penalty(ONES, X), ValueError, "require grad"),
    ("finite-loss", "non-finite loss inputs are named", lambda t: D.check_finite("DMD2", x=X * float("inf")), FloatingPointError, "non-finite values .* in x"),
    # methods
    ("method-critic-steps", "critic_steps >= 1", lambda t: DMD2(critic_steps=0), ValueError, "critic_steps must be >= 1"),
    ("method-sigma-data", "sigma_data > 0", lambda t: DiffInstruct(sigma_data=0), ValueError, "sigma_data must be > 0"),
    ("method-weights", "GAN weights finite and >= 0", lambda t: DMD2(gan_generator_weight=float("nan")), ValueError, "gan_generator_weight must be finite"),
    ("sid-alpha", "SiD alpha finite", lambda t: SiD(alpha=float("nan")), ValueError, "alpha must be finite"),
    ("method-target", "target and fake are denoisers", lambda t: DMD2().generator_loss(X, 3, NET), TypeError, "target must be a denoiser"),
    ("method-x", "generator samples are floating", lambda t: SiD().generator_loss(torch.ones(4, 2, dtype=torch.long), NET, NET), TypeError, "x must be a floating"),
    ("batch-type", "a sampler returns a Batch, z or (z, cond)", lambda t: D.train_step(DMD2(), GEN, NET, NET, SGD(), SGD(), lambda: "x"), TypeError, "next_batch"),
    ("guard-policy", "NonFiniteGuard policy", lambda t: D.NonFiniteGuard(policy="ignore"), ValueError, "policy must be one of"),
    ("divergence-factor", "DivergenceMonitor factor > 1", lambda t: D.DivergenceMonitor(factor=-1), ValueError, "factor must be finite and > 1"),
    # LoRA, recording, trajectories, schedules, attach
    ("lora-rank", "LoRA rank >= 1", lambda t: D.LoraSpec(rank=0), ValueError, "rank must be >= 1"),
    ("lora-alpha", "LoRA alpha finite and > 0", lambda t: D.LoraSpec(rank=2, alpha=float("nan")), ValueError, "alpha must be finite"),
    ("lora-targets-type", "target_modules are names", lambda t: D.LoraSpec(rank=2, target_modules=(1, 2)), ValueError, "target_modules must be non-empty strings"),
    ("lora-targets-match", "target_modules match a layer", lambda t: D.lora_targets(NET, D.LoraSpec(rank=2, target_modules=("nope",))), ValueError, "match no layer"),
    ("record-steps", "1 <= interval <= steps", lambda t: D.record_degradation(NET, GEN, DMD2(), lambda: D.Batch(X), steps=2, interval=5), ValueError, "interval <= steps"),
    ("record-mode", "node mode is lora, svd or full", lambda t: D.record_degradation(NET, GEN, DMD2(), lambda: D.Batch(X), steps=2, interval=1, mode="foo"), ValueError, "mode must be one of"),
    ("record-dtype", "a module in another dtype is a cast of the teacher", _record_on_another_bf16_teacher, ValueError, r"even compared in bfloat16 \(module float32, teacher bfloat16\)"),
    ("trajectory-nodes", "a trajectory has nodes", lambda t: D.Trajectory(NET, [], kind="full"), ValueError, "at least one degraded node"),
    ("trajectory-kind", "node kind is lora or full", lambda t: D.Trajectory(NET, [NET], kind="weird"), ValueError, "kind must be one of"),
    ("schedule-every", "FixedInterval every >= 1", lambda t: D.FixedInterval(0), ValueError, "every must be >= 1"),
    ("schedule-ratio", "AdaptiveGap ratio in (0, 1)", lambda t: D.AdaptiveGap(ratio=2.0), ValueError, "ratio must be in"),
    ("backtrack-method", "Backtrack wraps a method", lambda t: D.Backtrack(None, D.Trajectory(NET, [D.trainable_copy(NET)], kind="full"), D.FixedInterval(1)), TypeError, "method"),
    ("attach-trajectory", "attach takes a Trajectory", lambda t: D.attach(NET, "traj"), TypeError, "trajectory must be a Trajectory"),
    ("attach-teacher-cast", "a teacher cast since recording is only a cast", _attach_cast_and_changed, ValueError, "bfloat16 now, float32 when recorded"),
    # state and export
    ("state-step", "save_state step in 0..999999999", lambda t: D.save_state(t / "s", step=-1, modules={"m": NET}, config={}), ValueError, "step must be an integer"),
    ("state-modules", "save_state modules are modules", lambda t: D.save_state(t / "s", step=1, modules={"m": 3}, config={}), TypeError, "modules\\['m'\\] is a int"),
    ("state-missing", "load_state folder exists", lambda t: D.load_state(t / "none", modules={"m": NET}, config={}), D.StorageError, "does not exist"),
    ("export-kind", "export takes a generator or a diffusers model", lambda t: D.export_generator(torch.nn.Linear(2, 2), t / "e"), TypeError, "OneStepGenerator or a diffusers model"),
    ("export-timestep", "a raw UNet export needs its timestep", _raw_unet_export, ValueError, "timestep="),
    ("export-foreign-folder", "an export never overwrites a folder not ours", _export_into_foreign, FileExistsError, "not an export of this library"),
    ("export-metadata", "metadata is JSON without NaN", lambda t: D.export_generator(GEN, t / "e", metadata={"x": float("nan")}), ValueError, "JSON-serialisable"),
    ("load-generator-module", "a module export needs model=", lambda t: D.load_generator(D.export_generator(GEN, t / "e")), ValueError, "pass model="),
    ("checkpoint-type", "checkpoint file type is known", lambda t: D.load_checkpoint(NET, t / "x.ckpt"), D.StorageError, "unknown file type"),
]


@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_is_refused_naming_the_argument(row, tmp_path):
    _, _, call, exc, pattern = row
    with pytest.raises(exc, match=pattern):
        call(tmp_path)


def test_the_audit_table_in_the_docs_lists_every_check():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "RELIABILITY.md").read_text()
    section = doc.split("## Input validation", 1)[1].split("\n## ", 1)[0]
    documented = re.findall(r"^\| `([a-z0-9-]+)` \|", section, re.M)
    ids = [r[0] for r in ROWS]
    assert len(set(ids)) == len(ids)
    assert sorted(documented) == sorted(ids), (sorted(set(ids) - set(documented)), sorted(set(documented) - set(ids)))
