"""Export of distilled generators, verified loads, released checkpoints, the SDXL inference example."""

import copy
import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import crashing_at, tiny_unet2d, tiny_unet2d_condition
from diffusers import DDPMScheduler, UNet2DConditionModel
from peft import LoraConfig

from disback_core import (
    DiffusersDenoiser,
    LoraSpec,
    OneStepGenerator,
    StorageError,
    edm_mlp,
    export_generator,
    load_checkpoint,
    load_generator,
    read_export_note,
    timestep_generator,
)
from disback_core import export as export_mod
from disback_core.lora import inject_lora, lora_parameters, merged_state_dict
from disback_core.storage import body_digest, save_tensors

ROOT = Path(__file__).resolve().parents[1]
DIFFUSERS_FILES = [
    "config.json",
    "diffusion_pytorch_model.safetensors",
    "disback_generator.json",
    "disback_schedule.safetensors",
]


def _digests(folder):
    return {f: hashlib.sha256((folder / f).read_bytes()).hexdigest() for f in sorted(os.listdir(folder))}


def _unet_generator(sigma=14.0, seed=0):
    torch.manual_seed(seed)
    return OneStepGenerator(DiffusersDenoiser(tiny_unet2d_condition(), scheduler=DDPMScheduler()), sigma)


def _inputs(n=3):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 2, 8, 8, generator=g), torch.randn(n, 5, 12, generator=g)


def test_diffusers_export_round_trip_is_bit_exact_and_from_pretrained_loads_it(tmp_path):
    gen = _unet_generator()
    z, c = _inputs()
    with torch.no_grad():
        ref = gen(z, c)
    out = export_generator(gen, tmp_path / "g", metadata={"steps": 100, "method": "dmd2+disback"})
    assert sorted(os.listdir(out)) == DIFFUSERS_FILES
    note = read_export_note(out)
    assert note["kind"] == "diffusers" and note["class"] == "UNet2DConditionModel"
    assert note["sigma_init"] == 14.0 and note["noise_scale"] == 14.0 and note["metadata"]["steps"] == 100
    # the timestep is the schedule's timestep of sigma_init, the latent scale sigma / sqrt(1 + sigma^2)
    assert float(
        gen.denoiser.t_to_sigma(torch.tensor([note["diffusers"]["timestep"]], dtype=torch.float64))[0]
    ) == pytest.approx(14.0, rel=1e-9)
    assert note["diffusers"]["latent_scale"] == pytest.approx(14.0 / (1 + 14.0**2) ** 0.5, rel=1e-12)
    loaded = load_generator(out)
    with torch.no_grad():
        assert torch.equal(loaded(z, c), ref)
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    unet = UNet2DConditionModel.from_pretrained(out)  # diffusers' own loader reads the folder
    sd = gen.denoiser.model.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in unet.state_dict().items()) and set(unet.state_dict()) == set(sd)


def test_exports_are_byte_reproducible(tmp_path):
    gen = _unet_generator()
    a = _digests(export_generator(gen, tmp_path / "a"))
    assert _digests(export_generator(gen, tmp_path / "a")) == a  # re-export over itself
    assert _digests(export_generator(load_generator(tmp_path / "a"), tmp_path / "b")) == a  # export of the load
    assert [p.name for p in tmp_path.iterdir()] != [] and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("how", ["diffusers-add_adapter", "library-peft"])
def test_lora_is_merged_into_the_exported_weights(tmp_path, how):
    gen = _unet_generator()
    unet = gen.denoiser.model
    name = next(n for n, _ in unet.named_modules() if n.endswith("attn1.to_q"))
    plain = copy.deepcopy(unet).state_dict()
    if how == "diffusers-add_adapter":
        unet.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=["to_q", "to_v"]))
        for n, p in unet.named_parameters():
            if "lora_B" in n:  # B starts at zero; a trained adapter's is not
                torch.nn.init.normal_(p, std=0.1)
        adapter = "default"
    else:
        inject_lora(unet, LoraSpec(rank=4, alpha=8, target_modules=(name,)))
        for p in lora_parameters(unet):
            torch.nn.init.normal_(p, std=0.1)
        adapter = "disback"
    layer = unet.get_submodule(name)
    a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    z, c = _inputs()
    with torch.no_grad():
        ref = gen(z, c)
    merged = merged_state_dict(unet)
    assert not any("lora_" in k or "base_layer" in k for k in merged) and set(merged) == set(plain)
    assert torch.allclose(merged[name + ".weight"], plain[name + ".weight"] + 2.0 * b @ a, atol=1e-6)  # alpha/r = 2
    assert not torch.equal(merged[name + ".weight"], plain[name + ".weight"])
    with torch.no_grad():
        got = load_generator(export_generator(gen, tmp_path / "g"))(z, c)
    assert torch.allclose(got, ref, atol=1e-5)


def test_merged_state_dict_of_the_delta_backend_is_the_parametrized_weight():
    from conftest import CustomEDM

    torch.manual_seed(0)
    net = CustomEDM()
    plain = copy.deepcopy(net).state_dict()
    inject_lora(net, LoraSpec(rank=2, alpha=4, target_modules=("conv0", "affine")))
    for p in lora_parameters(net):
        torch.nn.init.normal_(p, std=0.1)
    merged = merged_state_dict(net)
    assert set(merged) == set(plain)
    for layer in ("conv0", "affine"):
        d = net.get_submodule(layer).parametrizations.weight[0]
        w = plain[layer + ".weight"]
        assert torch.equal(
            merged[layer + ".weight"], (w.float() + 2.0 * (d.lora_B @ d.lora_A).reshape(w.shape)).to(w.dtype)
        )
    assert torch.equal(merged["conv1.weight"], plain["conv1.weight"])


def test_raw_dmd2_style_unet_exports_with_its_timestep(tmp_path):
    torch.manual_seed(0)
    unet, sch = tiny_unet2d_condition(), DDPMScheduler()
    z, c = _inputs()
    with pytest.raises(ValueError, match="timestep="):
        export_generator(unet, tmp_path / "x")
    out = export_generator(unet, tmp_path / "g", timestep=399, scheduler=sch)
    note = read_export_note(out)
    assert note["diffusers"]["timestep"] == pytest.approx(399.0, abs=1e-9)
    assert note["diffusers"]["latent_scale"] == pytest.approx(1.0, abs=1e-12)  # fed raw noise
    gen = load_generator(out)
    ab = sch.alphas_cumprod[399].double()
    with torch.no_grad():
        eps = unet(z, torch.full((3,), 399), encoder_hidden_states=c).sample.double()
        x0 = (z.double() - (1 - ab).sqrt() * eps) / ab.sqrt()  # DMD2's x0 from the raw call
        assert torch.allclose(gen(z, c).double(), x0, atol=1e-4)
        assert torch.equal(gen(z, c), timestep_generator(unet, 399, scheduler=sch)(z, c))


def test_a_few_step_student_exports_its_sigmas_and_samples_bit_exactly(tmp_path):
    from disback_core import MultiStepGenerator, sample_fewstep

    torch.manual_seed(0)
    d = DiffusersDenoiser(tiny_unet2d_condition(), scheduler=DDPMScheduler())
    student = MultiStepGenerator(d, [14.0, 2.0, 0.3])
    out = export_generator(student, tmp_path / "k3")
    note = read_export_note(out)
    assert note["sigmas"] == [14.0, 2.0, 0.3] and len(note["diffusers"]["timesteps"]) == 3
    for t, s in zip(note["diffusers"]["timesteps"], note["sigmas"]):
        assert float(d.t_to_sigma(torch.tensor([t], dtype=torch.float64))[0]) == pytest.approx(s, rel=1e-9)
    loaded = load_generator(out)
    assert isinstance(loaded, MultiStepGenerator) and loaded.sigmas == student.sigmas
    z, c = _inputs()
    with torch.no_grad():
        a = sample_fewstep(student, z, c, generator=torch.Generator().manual_seed(5))
        b = sample_fewstep(loaded, z, c, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert read_export_note(export_generator(_unet_generator(), tmp_path / "k1"))["sigmas"] == [14.0]
    _edit_note(out, lambda n: n.update(sigmas=[14.0, 3.0, 3.0]))
    with pytest.raises(StorageError, match="strictly decreasing"):
        load_generator(out)


def test_module_export_needs_the_architecture_and_round_trips(tmp_path):
    torch.manual_seed(0)
    gen = OneStepGenerator(edm_mlp(dim=2, width=16, depth=2), 2.5)
    out = export_generator(gen, tmp_path / "m")
    assert sorted(os.listdir(out)) == ["disback_generator.json", "model.safetensors"]
    with pytest.raises(ValueError, match="pass model="):
        load_generator(out)
    torch.manual_seed(5)
    loaded = load_generator(out, model=edm_mlp(dim=2, width=16, depth=2))
    z = torch.randn(7, 2)
    with torch.no_grad():
        assert torch.equal(loaded(z), gen(z))
    with pytest.raises(StorageError, match="do not fit"):
        load_generator(out, model=edm_mlp(dim=2, width=8, depth=2))


def test_export_refuses_a_folder_that_is_not_ours_and_touches_nothing(tmp_path):
    folder = tmp_path / "work"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an export of this library"):
        export_generator(_unet_generator(), folder)
    assert os.listdir(folder) == ["notes.txt"] and (folder / "notes.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        export_generator(_unet_generator(), tmp_path / "file")
    with pytest.raises(TypeError, match="OneStepGenerator or a diffusers model"):
        export_generator(torch.nn.Linear(2, 2), tmp_path / "lin")
    with pytest.raises(ValueError, match="JSON-serialisable"):
        export_generator(_unet_generator(), tmp_path / "m", metadata={"x": float("nan")})


def _edit_note(folder, fn, digest=True):
    """Edit the note; with ``digest``, rewrite its digest too (a deliberate forgery reaches the field checks)."""
    p = folder / "disback_generator.json"
    note = json.loads(p.read_text())
    fn(note)
    if digest:
        note["digest"] = body_digest(note)
    p.write_text(json.dumps(note))


@pytest.mark.parametrize(
    "case,match",
    [
        ("flip-weights", "sha256"),
        ("truncate-weights", "bytes, the note says"),
        ("edit-config", "bytes, the note says|sha256"),
        ("sigma-nan", "sigma_init"),
        ("edited-keeping-the-digest", "digest"),
        ("sigma-string", "sigma_init"),
        ("class-os", "not a diffusers model class|_class_name"),
        ("extra-file-entry", "files must be exactly"),
        ("drop-schedule", "files must be exactly"),
        ("version-2", "version"),
        ("symlink-weights", "symlink"),
        ("kind-pickle", "kind"),
        ("note-missing", "missing"),
    ],
)
def test_tampered_exports_are_refused_naming_the_file(tmp_path, case, match):
    out = export_generator(_unet_generator(), tmp_path / "g")
    w = out / "diffusion_pytorch_model.safetensors"
    if case == "flip-weights":
        data = bytearray(w.read_bytes())
        data[-5] ^= 0xFF
        w.write_bytes(bytes(data))
    elif case == "truncate-weights":
        w.write_bytes(w.read_bytes()[:-100])
    elif case == "edit-config":
        cfg = json.loads((out / "config.json").read_text())
        cfg["block_out_channels"] = [16, 32]
        (out / "config.json").write_text(json.dumps(cfg))
    elif case == "sigma-nan":
        _edit_note(out, lambda n: n.update(sigma_init=float("nan")))
    elif case == "edited-keeping-the-digest":
        _edit_note(out, lambda n: n.update(sigma_init=10.0), digest=False)
    elif case == "sigma-string":
        _edit_note(out, lambda n: n.update(sigma_init="14"))
    elif case == "class-os":
        _edit_note(out, lambda n: n.update({"class": "DiffusionPipeline"}))
    elif case == "extra-file-entry":
        _edit_note(out, lambda n: n["files"].update({"../x": n["files"]["config.json"]}))
    elif case == "drop-schedule":
        _edit_note(out, lambda n: n["files"].pop("disback_schedule.safetensors"))
    elif case == "version-2":
        _edit_note(out, lambda n: n.update(version=2))
    elif case == "symlink-weights":
        target = tmp_path / "elsewhere.safetensors"
        target.write_bytes(w.read_bytes())
        w.unlink()
        w.symlink_to(target)
    elif case == "kind-pickle":
        _edit_note(out, lambda n: n.update(kind="pickle"))
    elif case == "note-missing":
        (out / "disback_generator.json").unlink()
    with pytest.raises(StorageError, match=match) as e:
        load_generator(out)
    assert str(out) in str(e.value)


def test_an_interrupted_two_rename_switch_keeps_the_previous_export(tmp_path, monkeypatch):
    """Where RENAME_EXCHANGE is missing, a crash between the two renames leaves the old export
    under a hidden name: it is loaded from there, and the next export puts it back first."""
    folder = tmp_path / "g"
    old = _unet_generator(seed=0)
    export_generator(old, folder)
    z, c = _inputs()
    with torch.no_grad():
        want = old(z, c)
    monkeypatch.setattr(export_mod, "_exchange", lambda a, b: False)
    real_rename, calls = os.rename, []

    def crash_on_second(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise KeyboardInterrupt("killed between the renames")
        real_rename(src, dst)

    monkeypatch.setattr(export_mod.os, "rename", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        export_generator(_unet_generator(seed=1), folder)
    monkeypatch.setattr(export_mod.os, "rename", real_rename)
    assert not folder.exists()
    with torch.no_grad():
        assert torch.equal(load_generator(folder)(z, c), want)
    export_generator(_unet_generator(seed=2), folder)  # recovers, then replaces
    assert sorted(os.listdir(folder)) == DIFFUSERS_FILES and [p.name for p in tmp_path.iterdir()] == ["g"]


_CRASH_POINTS = ["atomic_write_bytes", "save_tensors", "fsync_dir", "_exchange"]


def _export_crashing_at(k: int, gen, folder: Path, exchange: bool) -> bool:
    """Export in a forked child that dies (``os._exit``: no cleanup, like SIGKILL) just before its
    k-th file-system operation; returns whether the export completed first."""
    missing = [n for n in _CRASH_POINTS if not hasattr(export_mod, n)]
    assert not missing, f"crash points {missing} are gone from disback_core.export: update _CRASH_POINTS"
    if not exchange:  # the fallback switch: two renames (patched before the crash points wrap it)
        real = export_mod._exchange
        export_mod._exchange = lambda a, b: False
    targets = [(export_mod, n) for n in _CRASH_POINTS] + [
        (export_mod.os, "rename"),
        (export_mod.os, "replace"),
        (export_mod.shutil, "rmtree"),
    ]
    try:
        return crashing_at(k, targets, lambda: export_generator(gen, folder))
    finally:
        if not exchange:
            export_mod._exchange = real


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize("exchange", [True, False], ids=["rename-exchange", "two-renames"])
def test_a_crash_at_every_point_of_a_re_export_leaves_the_old_or_the_new_export(tmp_path, exchange):
    """A crash before each file-system operation of a re-export: the folder (or, between the two
    renames of the fallback switch, the previous export beside it) loads and verifies as the old
    or the new generator, and the next export cleans up. SIGKILLs at random times:
    ``benchmarks/fault_injection.py --kind export``."""
    old, new = _unet_generator(seed=0), _unet_generator(seed=1)
    template = tmp_path / "template"
    export_generator(old, template)
    z, c = _inputs(2)
    with torch.no_grad():
        want_old, want_new = old(z, c), new(z, c)
    completed, k = False, 0
    while not completed:
        k += 1
        root = tmp_path / f"crash-{k}"
        root.mkdir()
        shutil.copytree(template, root / "g")
        completed = _export_crashing_at(k, new, root / "g", exchange)
        with torch.no_grad():
            got = load_generator(root / "g")(z, c)
        is_old, is_new = torch.equal(got, want_old), torch.equal(got, want_new)
        assert is_old or is_new, k
        assert is_new or not completed, k
        export_generator(new, root / "g")  # the next export recovers and leaves nothing behind
        assert [p.name for p in root.iterdir()] == ["g"] and sorted(os.listdir(root / "g")) == DIFFUSERS_FILES
    assert k > 6  # every operation of a save was a crash point


# --------------------------------------------------------------------------- released checkpoints


def test_load_checkpoint_reads_safetensors_and_weights_only_bin_strictly(tmp_path):
    torch.manual_seed(0)
    src = tiny_unet2d()
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    save_tensors(tmp_path / "u.safetensors", sd)
    torch.save(sd, tmp_path / "u.bin")
    torch.save({"module." + k: v for k, v in sd.items()}, tmp_path / "ddp.bin")
    for name, prefix in (("u.safetensors", ""), ("u.bin", ""), ("ddp.bin", "module.")):
        torch.manual_seed(1)
        dst = load_checkpoint(tiny_unet2d(), tmp_path / name, key_prefix=prefix)
        assert all(torch.equal(v, sd[k]) for k, v in dst.state_dict().items())
    with pytest.raises(StorageError, match=r"u\.bin.*do not fit UNet2DModel.*shapes differ"):
        load_checkpoint(tiny_unet2d(block_out_channels=(8, 32)), tmp_path / "u.bin")
    with pytest.raises(StorageError, match=r"ddp\.bin.*keys missing"):
        load_checkpoint(tiny_unet2d(), tmp_path / "ddp.bin")
    torch.save({"w": torch.zeros(1), "f": os.system}, tmp_path / "evil.bin")  # a pickled callable
    with pytest.raises(StorageError, match="weights-only"):
        load_checkpoint(tiny_unet2d(), tmp_path / "evil.bin")
    (tmp_path / "u.ckpt").write_bytes(b"x")
    with pytest.raises(StorageError, match="unknown file type"):
        load_checkpoint(tiny_unet2d(), tmp_path / "u.ckpt")


# --------------------------------------------------------------------------- examples/sdxl_inference.py


def _tiny_sdxl(folder: Path) -> None:
    """A random SDXL-layout pipeline (two CLIP text encoders, text_time UNet, VAE), saved offline."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    (folder / "tok").mkdir(parents=True)
    (folder / "tok" / "vocab.json").write_text(json.dumps(vocab))
    (folder / "tok" / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "tok" / "vocab.json"), str(folder / "tok" / "merges.txt"), model_max_length=16)
    tcfg = dict(
        vocab_size=len(vocab),
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=16,
        projection_dim=8,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=2,
        norm_num_groups=4,
        addition_embed_type="text_time",
        addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=8 + 6 * 4,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    )
    sch = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1
    )
    StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(CLIPTextConfig(**tcfg)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**tcfg)),
        tokenizer=tok,
        tokenizer_2=tok,
        unet=unet,
        scheduler=sch,
    ).save_pretrained(folder / "base")


def _example():
    spec = importlib.util.spec_from_file_location("sdxl_inference", ROOT / "examples" / "sdxl_inference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_sdxl_inference_example_loads_the_released_unet_and_samples_at_399(tmp_path, fmt):
    _tiny_sdxl(tmp_path)
    ex = _example()
    torch.manual_seed(3)  # "the released UNet": other weights than the base's
    released = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(tmp_path / "base", subfolder="unet"))
    sd = {k: v.clone() for k, v in released.state_dict().items()}
    ckpt = tmp_path / f"disback_sdxl.{fmt}"
    save_tensors(ckpt, sd) if fmt == "safetensors" else torch.save(sd, ckpt)
    pipe = ex.load_pipeline(tmp_path / "base", ckpt, dtype=torch.float32)
    assert type(pipe.scheduler).__name__ == "LCMScheduler"
    assert all(torch.equal(v, sd[k]) for k, v in pipe.unet.state_dict().items())
    seen = []
    h = pipe.unet.register_forward_pre_hook(lambda m, args: seen.append(int(args[1].flatten()[0])))
    imgs = ex.generate(pipe, "a cat", output_type="pt", height=16, width=16)
    h.remove()
    assert seen == [399] and imgs.shape == (1, 3, 16, 16) and torch.isfinite(imgs).all()
    # the same UNet as the library's one-step generator: x0 of one raw-noise call at t = 399
    gen = ex.as_generator(pipe)
    z = torch.randn(1, 4, 2, 2)
    cond = {
        "encoder_hidden_states": torch.randn(1, 3, 16),
        "added_cond_kwargs": {"text_embeds": torch.randn(1, 8), "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]])},
    }
    ab = pipe.scheduler.alphas_cumprod[399].double()
    with torch.no_grad():
        eps = pipe.unet(z, 399, **cond).sample.double()
        assert torch.allclose(gen(z, cond).double(), (z.double() - (1 - ab).sqrt() * eps) / ab.sqrt(), atol=1e-4)
    bad = tmp_path / "bad.safetensors"
    save_tensors(bad, {k: v for k, v in list(sd.items())[:-1]})
    with pytest.raises(StorageError, match="bad.safetensors.*keys missing"):
        ex.load_pipeline(tmp_path / "base", bad, dtype=torch.float32)


def test_copy_of_generator_export_is_independent(tmp_path):
    """Export reads the weights; training on after an export does not change the folder."""
    gen = _unet_generator()
    a = _digests(export_generator(gen, tmp_path / "g"))
    with torch.no_grad():
        next(gen.parameters()).add_(1.0)
    assert _digests(tmp_path / "g") == a
    assert _digests(export_generator(copy.deepcopy(gen), tmp_path / "g")) != a


# --------------------------------------------------------------------------- noise_scale and pure-noise starts


def test_a_few_step_students_noise_scale_round_trips(tmp_path):
    import math

    from disback_core import MultiStepGenerator, sample_fewstep

    torch.manual_seed(0)
    d = DiffusersDenoiser(tiny_unet2d_condition(), scheduler=DDPMScheduler())
    s0 = 14.0
    ns = math.sqrt(1 + s0 * s0)  # a DMD2-style student fed raw noise
    student = MultiStepGenerator(d, [s0, 2.0, 0.3], noise_scale=ns)
    note = read_export_note(export_generator(student, tmp_path / "k3"))
    assert note["noise_scale"] == ns and note["sigmas"] == [s0, 2.0, 0.3] and "start" not in note
    assert note["diffusers"]["latent_scale"] == pytest.approx(1.0, abs=1e-12)  # raw noise into the UNet
    loaded = load_generator(tmp_path / "k3")
    assert isinstance(loaded, MultiStepGenerator) and loaded.noise_scale == ns and loaded.sigmas == student.sigmas
    z, c = _inputs()
    with torch.no_grad():
        for noise in ("fresh", "deterministic"):
            a = sample_fewstep(student, z, c, noise=noise, generator=torch.Generator().manual_seed(5))
            b = sample_fewstep(loaded, z, c, noise=noise, generator=torch.Generator().manual_seed(5))
            assert torch.equal(a, b)
        assert torch.equal(loaded.sample(z, c, noise="deterministic"), a)
        # K = 1 loads as the OneStepGenerator it equals
        one = load_generator(export_generator(MultiStepGenerator(d, [s0], noise_scale=ns), tmp_path / "k1"))
        assert isinstance(one, OneStepGenerator) and one.noise_scale == ns
        assert torch.equal(one(z, c), OneStepGenerator(d, s0, noise_scale=ns)(z, c))
    # a module export keeps it too
    torch.manual_seed(1)
    net = edm_mlp(dim=2, width=16, depth=2)
    out = export_generator(MultiStepGenerator(net, [80.0, 1.0], noise_scale=3.0), tmp_path / "m")
    loaded = load_generator(out, model=edm_mlp(dim=2, width=16, depth=2))
    assert loaded.noise_scale == 3.0
    z = torch.randn(5, 2)
    with torch.no_grad():
        assert torch.equal(
            sample_fewstep(loaded, z, noise="deterministic"),
            sample_fewstep(MultiStepGenerator(net, [80.0, 1.0], noise_scale=3.0), z, noise="deterministic"),
        )
    _edit_note(out, lambda n: n.update(noise_scale=0.0))
    with pytest.raises(StorageError, match="noise_scale"):
        load_generator(out, model=edm_mlp(dim=2, width=16, depth=2))


class _NoFromNoise(torch.nn.Module):
    """LinearFlow's weights, without from_noise."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(0.0))

    def forward(self, x, sigma, cond=None):
        return self.a * x


def test_a_pure_noise_student_exports_explicitly_and_round_trips(tmp_path):
    from test_fewstep import INF, LinearFlow

    from disback_core import MultiStepGenerator, sample_fewstep

    student = MultiStepGenerator(LinearFlow(0.5), [INF, 2.0, 0.5])
    out = export_generator(student, tmp_path / "k3")
    text = (out / "disback_generator.json").read_text()
    assert "Infinity" not in text and "NaN" not in text
    note = read_export_note(out)
    assert note["start"] == "pure_noise" and note["sigma_init"] is None and note["noise_scale"] == 1.0
    assert note["sigmas"] == [None, 2.0, 0.5] and note["kind"] == "module"
    loaded = load_generator(out, model=LinearFlow(0.1))
    assert isinstance(loaded, MultiStepGenerator) and loaded.sigmas == (INF, 2.0, 0.5) and loaded.noise_scale == 1.0
    z = torch.randn(6, 2)
    with torch.no_grad():
        for noise in ("fresh", "deterministic"):
            a = sample_fewstep(student, z, noise=noise, generator=torch.Generator().manual_seed(2))
            assert torch.equal(sample_fewstep(loaded, z, noise=noise, generator=torch.Generator().manual_seed(2)), a)
        one = OneStepGenerator(LinearFlow(0.5), INF)
        out1 = export_generator(one, tmp_path / "k1")
        assert read_export_note(out1)["sigmas"] == [None]
        back = load_generator(out1, model=LinearFlow(0.1))
        assert isinstance(back, OneStepGenerator) and back.sigma_init == INF and torch.equal(back(z), 0.5 * z)
    # loading into a model that cannot start from pure noise is refused, naming the note
    with pytest.raises(StorageError, match="cannot start from pure noise") as e:
        load_generator(out, model=_NoFromNoise())
    assert str(out) in str(e.value)

    # a diffusers folder has no timestep for sigma = inf: refused before anything is written
    class FlowishDiffusers(DiffusersDenoiser):
        def from_noise(self, z, cond=None):
            return z

    torch.manual_seed(0)
    flowish = OneStepGenerator(FlowishDiffusers(tiny_unet2d_condition(), scheduler=DDPMScheduler()), INF)
    with pytest.raises(ValueError, match="pure noise.*cannot be exported as a diffusers folder"):
        export_generator(flowish, tmp_path / "d")
    assert not (tmp_path / "d").exists()


_WRONG = [
    None,
    True,
    False,
    0,
    -1,
    1.5,
    float("nan"),
    float("inf"),
    2**80,
    "",
    "x",
    "sigma",
    [],
    [1],
    [None],
    {},
    {"a": 1},
]


def test_a_pure_noise_note_is_checked_strictly(tmp_path):
    """Every field of the pure-noise form set to a wrong value (the digest rewritten, so the value
    reaches the checks) is a StorageError naming the folder; so is that form on a finite start."""
    from test_fewstep import INF, LinearFlow

    from disback_core import MultiStepGenerator

    pristine = export_generator(MultiStepGenerator(LinearFlow(0.5), [INF, 2.0, 0.5]), tmp_path / "p")
    cases = [
        (key, v)
        for key in ("start", "sigma_init", "noise_scale", "sigmas", "kind")
        for v in _WRONG
        if (key, v) not in (("sigma_init", None), ("sigmas", [None]))
    ]  # the pristine value; a valid one-step note
    cases += [
        ("sigmas", [None, 2.0, 2.0]),
        ("sigmas", [None, 2.0, "0.5"]),
        ("sigmas", [3.0, 2.0, 0.5]),
        ("sigmas", [None, None, 0.5]),
        ("sigma_init", 3.0),
        ("noise_scale", 2.0),
        ("start", "PURE_NOISE"),
    ]
    for i, (key, v) in enumerate(cases):
        folder = tmp_path / f"c{i}"
        shutil.copytree(pristine, folder)
        _edit_note(folder, lambda n, key=key, v=v: n.update({key: copy.deepcopy(v)}))
        with pytest.raises(StorageError) as e:
            load_generator(folder, model=LinearFlow(0.1))
        assert str(folder) in str(e.value), (key, v, str(e.value))
    folder = tmp_path / "one"  # a forgery that is a valid note: the one-step pure-noise generator
    shutil.copytree(pristine, folder)
    _edit_note(folder, lambda n: n.update(sigmas=[None]))
    one = load_generator(folder, model=LinearFlow(0.1))
    assert isinstance(one, OneStepGenerator) and one.sigma_init == INF
    folder = tmp_path / "removed"
    shutil.copytree(pristine, folder)
    _edit_note(folder, lambda n: n.pop("start"))
    with pytest.raises(StorageError, match="sigma_init must be a finite number"):
        load_generator(folder, model=LinearFlow(0.1))
    # the pure-noise form on a finite-start note, and a finite note keeps refusing null
    finite = export_generator(OneStepGenerator(edm_mlp(dim=2, width=16, depth=2), 2.5), tmp_path / "f")
    for edit, match in (
        (lambda n: n.update(start="pure_noise"), "sigma_init null"),
        (lambda n: n.update(sigma_init=None, sigmas=[None]), "sigma_init must be a finite number"),
    ):
        _edit_note(finite, edit)
        with pytest.raises(StorageError, match=match):
            load_generator(finite, model=edm_mlp(dim=2, width=16, depth=2))
        export_generator(OneStepGenerator(edm_mlp(dim=2, width=16, depth=2), 2.5), finite)


# --------------------------------------------------------------------------- build before you allocate


def test_a_config_asking_for_a_huge_unet_is_refused_before_it_is_allocated(tmp_path):
    """block_out_channels [4096, 4096] would be a 5.7 G-parameter (21 GiB) UNet: built on the meta
    device and checked against the weights file's header, it is refused without being allocated
    (the former load built it first: 92 s and +21.6 GB peak RSS)."""
    import resource
    import time

    out = export_generator(_unet_generator(), tmp_path / "g")
    cfg = json.loads((out / "config.json").read_text())
    cfg["block_out_channels"] = [4096, 4096]
    data = json.dumps(cfg).encode()
    (out / "config.json").write_bytes(data)
    _edit_note(
        out, lambda n: n["files"]["config.json"].update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    )
    before, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
    with pytest.raises(StorageError, match="diffusion_pytorch_model.safetensors.*do not fit UNet2DConditionModel"):
        load_generator(out)
    took = time.perf_counter() - t0
    grew_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert took < 10 and grew_mb < 200, (took, grew_mb)


def test_a_half_precision_export_loads_in_half_precision(tmp_path):
    """The weights are assigned into a model built with its parameters on the meta device; a file in
    one floating dtype other than the model's runs in it, buffers included, as exported."""
    gen = _unet_generator()
    out = export_generator(gen, tmp_path / "h", dtype=torch.float16)
    loaded = load_generator(out)
    sd = loaded.denoiser.model.state_dict()
    want = {k: v.half() if v.is_floating_point() else v for k, v in gen.denoiser.model.state_dict().items()}
    assert set(sd) == set(want) and all(v.dtype == want[k].dtype and torch.equal(v, want[k]) for k, v in sd.items())
    assert all(p.dtype == torch.float16 for p in loaded.denoiser.model.parameters())
    assert not any(t.is_meta for t in loaded.state_dict().values())
