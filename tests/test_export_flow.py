"""Flow transformers (SD3, FLUX, SANA, Wan) exported as diffusers folders ("diffusers-flow") and
sampled through diffusers' own pipelines; the meta-device build that refuses a huge config first.

    python -m pytest -p no:cacheprovider tests/test_export_flow.py -s   # prints the pipeline errors
"""

from __future__ import annotations

import copy
import json
import math
import resource
import shutil
import time
from pathlib import Path

import diffusers
import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline
from peft import LoraConfig
from test_loader_fuzz import HEADER_FORGERIES, WRONG, Case, _join, _paths, _set, _split, run_case

from disback_core import MultiStepGenerator, OneStepGenerator, StorageError, export_generator, load_generator
from disback_core import export as export_mod
from disback_core.export import read_export_note
from disback_core.flow import FlowMatchDenoiser, flow_generator
from disback_core.lora import merged_state_dict
from disback_core.presets import TINY_PRESETS, build_model, example_cond, sample_shape
from disback_core.storage import body_digest, sha256_bytes

ARCHS = ["tiny-sd3", "tiny-flux", "tiny-sana", "tiny-wan"]
FLOW_FILES = ["config.json", "diffusion_pytorch_model.safetensors", "disback_generator.json"]
NOTE = "disback_generator.json"
ERRORS: dict[str, float] = {}  # the pipeline comparisons' max errors, printed with -s


def _denoiser(preset: str | dict, seed: int = 0, **kw) -> FlowMatchDenoiser:
    model = build_model(preset, seed=seed).eval()
    if "shift" not in kw and "dynamic_shift" not in kw and "scheduler" not in kw:
        kw["shift"] = 3.0  # SD3's training shift: the students' sigmas are shifted
    return FlowMatchDenoiser(model, kw.pop("scheduler", None), **kw)


def _generators(d: FlowMatchDenoiser) -> dict[str, OneStepGenerator | MultiStepGenerator]:
    """One step from pure noise (t = 1), one step at t = 0.7, and a 3-step student from t = 1."""
    return {
        "t1": flow_generator(d),
        "t0.7": flow_generator(d, 0.7),
        "k3": MultiStepGenerator(d, d.sigmas(3)),
    }


def _inputs(model, batch: int = 2):
    g = torch.Generator().manual_seed(1)
    return torch.randn(sample_shape(model, batch), generator=g), example_cond(model, batch, generator=g)


def _same_outputs(a, b, z, cond) -> bool:
    with torch.no_grad():
        if isinstance(a, MultiStepGenerator):
            return all(
                torch.equal(
                    a.sample(z, cond, noise=n, generator=torch.Generator().manual_seed(4)),
                    b.sample(z, cond, noise=n, generator=torch.Generator().manual_seed(4)),
                )
                for n in ("fresh", "deterministic")
            )
        return torch.equal(a(z, cond), b(z, cond))


def _edit_note(folder: Path, fn, digest: bool = True) -> None:
    p = folder / NOTE
    note = json.loads(p.read_text())
    fn(note)
    if digest:
        note["digest"] = body_digest(note)
    p.write_text(json.dumps(note))


def _rehash(folder: Path, name: str, data: bytes) -> None:
    """Write ``data`` as ``name`` and rewrite its sha256 and size in the note (and the digest): a forgery."""
    (folder / name).write_bytes(data)
    _edit_note(folder, lambda n: n["files"][name].update(sha256=sha256_bytes(data), bytes=len(data)))


def _edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    _rehash(folder, "config.json", json.dumps(cfg).encode())


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("preset", ARCHS)
def test_flow_exports_round_trip_bit_exactly_and_from_pretrained_loads_them(tmp_path, preset):
    d = _denoiser(preset)
    z, cond = _inputs(d.model)
    cls = getattr(diffusers, type(d.model).__name__)
    for name, gen in _generators(d).items():
        out = export_generator(gen, tmp_path / name, metadata={"steps": 10})
        assert sorted(p.name for p in out.iterdir()) == FLOW_FILES
        note = read_export_note(out)
        assert note["kind"] == "diffusers-flow" and note["class"] == cls.__name__ and "diffusers" not in note
        f = note["flow"]
        sig = gen.sigmas if isinstance(gen, MultiStepGenerator) else (gen.sigma_init,)
        want_t = [1.0 if s == math.inf else s / (1 + s) for s in sig]
        assert f["t"] == want_t and f["timesteps"] == [1000 * t for t in want_t]
        assert f["scheduler"] == {
            "class": "FlowMatchEulerDiscreteScheduler",
            "shift": 1.0,
            "use_dynamic_shifting": False,
        }
        assert f["shift"] == 3.0 and f["dynamic_shift"] is None and f["time_scale"] == d.time_scale
        assert f["cond_kwarg"] == d.cond_kwarg and f["guidance"] is None
        assert f["latent_scale"] == pytest.approx(1.0, abs=1e-15)  # flow_generator feeds x_flow = z
        if name == "t0.7":
            assert "start" not in note and note["sigma_init"] == pytest.approx(0.7 / 0.3)
            assert f["t"] == [pytest.approx(0.7, abs=1e-15)]
        else:
            assert note["start"] == "pure_noise" and note["sigmas"][0] is None and f["t"][0] == 1.0
        loaded = load_generator(out)
        assert type(loaded) is type(gen) and isinstance(loaded.denoiser, FlowMatchDenoiser)
        assert type(loaded.denoiser.model) is cls and not loaded.training
        assert loaded.denoiser.shift == d.shift and loaded.denoiser.time_scale == d.time_scale
        assert _same_outputs(gen, loaded, z, cond), (preset, name)
        # diffusers' own loader reads the folder: the transformer's weights are the generator's
        fp = cls.from_pretrained(out)
        ref = merged_state_dict(d.model)
        assert set(fp.state_dict()) == set(ref) and all(torch.equal(v, ref[k]) for k, v in fp.state_dict().items())
    # an export of the load is the same bytes
    k3 = tmp_path / "k3"
    again = export_generator(load_generator(k3), tmp_path / "again", metadata={"steps": 10})
    assert all((k3 / n).read_bytes() == (again / n).read_bytes() for n in FLOW_FILES)


def test_a_lora_is_merged_into_the_exported_transformer(tmp_path):
    d = _denoiser("tiny-sd3")
    plain = copy.deepcopy(d.model.state_dict())
    d.model.add_adapter(LoraConfig(r=2, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_v"]))
    for n, p in d.model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    gen = MultiStepGenerator(d, d.sigmas(2))
    z, cond = _inputs(d.model)
    out = export_generator(gen, tmp_path / "lora")
    fp = diffusers.SD3Transformer2DModel.from_pretrained(out)
    merged = merged_state_dict(d.model)
    assert set(fp.state_dict()) == set(plain) and all(torch.equal(v, merged[k]) for k, v in fp.state_dict().items())
    assert any(not torch.equal(merged[k], plain[k]) for k in plain)  # the adapter changed some weights
    with torch.no_grad():
        a = gen.sample(z, cond, noise="deterministic")
        b = load_generator(out).sample(z, cond, noise="deterministic")
    assert (a - b).abs().max() < 1e-5


def test_the_flow_settings_round_trip(tmp_path):
    """FLUX's dynamic shift and embedded guidance, a custom time_scale and cond_kwarg come back as exported."""
    flux_cfg = dict(TINY_PRESETS["tiny-flux"], guidance_embeds=True)
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    d = _denoiser(flux_cfg, scheduler=sched, guidance=3.5)
    z, cond = _inputs(d.model)
    gen = MultiStepGenerator(d, d.sigmas(3, z))  # shifted by e^mu for this resolution
    note = read_export_note(export_generator(gen, tmp_path / "flux"))
    f = note["flow"]
    assert f["dynamic_shift"] == d.dynamic_shift and f["shift"] == 1.0 and f["guidance"] == 3.5
    assert f["t"][1] == pytest.approx(d.shift_factor(z) * (2 / 3) / (1 + (d.shift_factor(z) - 1) * (2 / 3)))
    loaded = load_generator(tmp_path / "flux")
    ld = loaded.denoiser
    assert ld.dynamic_shift == d.dynamic_shift and ld.guidance == 3.5 and ld.sigmas(3, z) == gen.sigmas
    assert _same_outputs(gen, loaded, z, cond)
    d2 = _denoiser("tiny-sana", time_scale=500.0, cond_kwarg="encoder_hidden_states")
    out = export_generator(flow_generator(d2, 0.5), tmp_path / "sana")
    assert read_export_note(out)["flow"]["time_scale"] == 500.0 and load_generator(out).denoiser.time_scale == 500.0
    # a guidance-distilled FLUX whose note lost its guidance cannot be rebuilt
    _edit_note(tmp_path / "flux", lambda n: n["flow"].update(guidance=None))
    with pytest.raises(StorageError, match="flow settings do not fit the model.*guidance"):
        load_generator(tmp_path / "flux")


# --------------------------------------------------------------------------- diffusers pipelines


def _tiny_vae(latent_channels: int) -> AutoencoderKL:
    """A random 2-block VAE (scale factor 2); output_type="latent" never runs it."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8),
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=16,
    )


def _scheduler(note: dict) -> FlowMatchEulerDiscreteScheduler:
    s = note["flow"]["scheduler"]
    assert s["class"] == "FlowMatchEulerDiscreteScheduler"
    return FlowMatchEulerDiscreteScheduler(shift=s["shift"], use_dynamic_shifting=s["use_dynamic_shifting"])


def _pipeline_sample(folder: Path, z: torch.Tensor, cond: dict, scheduler=None) -> torch.Tensor:
    """Sample the export through diffusers' pipeline, offline (no text encoders: embeddings passed in):
    the transformer from_pretrained(folder), the note's scheduler, sigmas and latent scale."""
    note = read_export_note(folder)
    f = note["flow"]
    cls = getattr(diffusers, note["class"])
    transformer = cls.from_pretrained(folder).eval()
    sch = scheduler or _scheduler(note)
    steps = {"num_inference_steps": 1} if f["t"] == [1.0] else {"sigmas": f["t"]}
    latents = f["latent_scale"] * z
    b, c, h, w = z.shape
    size = dict(height=2 * h, width=2 * w)  # pixels, for the tiny VAE's scale factor 2
    if cls is diffusers.SD3Transformer2DModel:
        pipe = StableDiffusion3Pipeline(
            transformer=transformer,
            scheduler=sch,
            vae=_tiny_vae(c),
            text_encoder=None,
            tokenizer=None,
            text_encoder_2=None,
            tokenizer_2=None,
            text_encoder_3=None,
            tokenizer_3=None,
        )
    else:
        pipe = FluxPipeline(
            transformer=transformer,
            scheduler=sch,
            vae=_tiny_vae(c),
            text_encoder=None,
            tokenizer=None,
            text_encoder_2=None,
            tokenizer_2=None,
        )
        latents = pipe._pack_latents(latents, b, c, h, w)  # the pipeline takes FLUX latents packed 2x2
    pipe.set_progress_bar_config(disable=True)
    guidance = f["guidance"] if f["guidance"] is not None else 0.0  # SD3: <= 1 is no CFG; FLUX: embedded
    with torch.no_grad():
        out = pipe(
            prompt_embeds=cond["encoder_hidden_states"],
            pooled_prompt_embeds=cond["pooled_projections"],
            guidance_scale=guidance,
            latents=latents,
            output_type="latent",
            **size,
            **steps,
        ).images
    if isinstance(pipe, FluxPipeline):
        out = pipe._unpack_latents(out, size["height"], size["width"], pipe.vae_scale_factor)
        assert out.shape == z.shape
    return out


PIPELINE_CASES = [("tiny-sd3", {}), ("tiny-flux", {}), ("tiny-flux", {"guidance": 3.5, "dynamic": True})]


@pytest.mark.parametrize("preset,how", PIPELINE_CASES, ids=["sd3", "flux", "flux-guidance-dynamic-shift"])
def test_the_pipeline_samples_the_export_as_the_generator_does(tmp_path, preset, how):
    """One step: the pipeline's output equals G(z); K steps with sigmas = the note's t: it equals
    sample_fewstep(G, z, noise="deterministic") (Euler on a flow is the DDIM-style update), within 1e-5."""
    if how:
        cfg = dict(TINY_PRESETS[preset], guidance_embeds=True)
        sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
        d = _denoiser(cfg, scheduler=sched, guidance=how["guidance"])
    else:
        d = _denoiser(preset)
    z, cond = _inputs(d.model)
    gens = {
        "t1": flow_generator(d),
        "t0.7": flow_generator(d, 0.7),
        "t0.6-scaled": OneStepGenerator(d, 1.5, noise_scale=4.0),  # latent_scale 4 / 2.5
        "k4": MultiStepGenerator(d, d.sigmas(4, z)),
    }
    for name, gen in gens.items():
        out = export_generator(gen, tmp_path / name)
        with torch.no_grad():
            want = gen.sample(z, cond, noise="deterministic") if isinstance(gen, MultiStepGenerator) else gen(z, cond)
        got = _pipeline_sample(out, z, cond)
        err = float((got.double() - want.double()).abs().max())
        ERRORS[f"{preset}{'+' + '+'.join(how) if how else ''}/{name}"] = err
        print(f"\npipeline {preset} {how or ''} {name}: max |pipeline - generator| = {err:.2e}")
        assert err < 1e-5, (name, err)
    # the shift of the note's scheduler matters: sampled with SD3's default shift 3, the t list is shifted again
    shifted = _pipeline_sample(tmp_path / "k4", z, cond, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    with torch.no_grad():
        assert (shifted - gens["k4"].sample(z, cond, noise="deterministic")).abs().max() > 1e-3


# --------------------------------------------------------------------------- refusals


def test_what_a_flow_export_refuses(tmp_path):
    d = _denoiser("tiny-sd3")
    # extras are call-time arguments, not part of the model
    with_extras = FlowMatchDenoiser(d.model, shift=3.0, extras={"joint_attention_kwargs": None})
    with pytest.raises(ValueError, match="extras"):
        export_generator(flow_generator(with_extras), tmp_path / "x")
    assert not (tmp_path / "x").exists()
    pristine = export_generator(MultiStepGenerator(d, d.sigmas(3)), tmp_path / "p")

    def case(name, edit):
        folder = tmp_path / name
        shutil.copytree(pristine, folder)
        edit(folder)
        return folder

    cases = {
        # another class than the four flow transformers, named in the note and the config alike
        "unet-class": (
            lambda f: (
                _edit_config(f, _class_name="UNet2DConditionModel"),
                _edit_note(f, lambda n: n.update({"class": "UNet2DConditionModel"})),
            ),
            "'UNet2DConditionModel' is not a flow transformer class",
        ),
        "config-class": (lambda f: _edit_config(f, _class_name="SanaTransformer2DModel"), "_class_name is not"),
        "os-class": (lambda f: _edit_note(f, lambda n: n.update({"class": "system"})), "'system' is not a flow"),
        # what a pipeline user reads must agree with the sigmas
        "t-edited": (lambda f: _edit_note(f, lambda n: n["flow"]["t"].__setitem__(1, 0.8)), "flow.t"),
        "timesteps-edited": (
            lambda f: _edit_note(f, lambda n: n["flow"]["timesteps"].__setitem__(0, 999.0)),
            "flow.timesteps",
        ),
        "latent-scale": (lambda f: _edit_note(f, lambda n: n["flow"].update(latent_scale=2.0)), "latent_scale"),
        "scheduler-shift-3": (
            lambda f: _edit_note(f, lambda n: n["flow"]["scheduler"].update(shift=3.0)),
            "flow.scheduler",
        ),
        "scheduler-shift-int": (
            lambda f: _edit_note(f, lambda n: n["flow"]["scheduler"].update(shift=1)),
            "flow.scheduler",
        ),
        "kind-diffusers": (lambda f: _edit_note(f, lambda n: n.update(kind="diffusers")), "pure-noise start"),
        "kind-module": (lambda f: _edit_note(f, lambda n: n.update(kind="module")), "files must be exactly"),
        "no-flow": (lambda f: _edit_note(f, lambda n: n.pop("flow")), "flow must hold"),
        "diffusers-field": (lambda f: _edit_note(f, lambda n: n.update(diffusers={})), "has no diffusers field"),
        "dynamic-bad": (
            lambda f: _edit_note(f, lambda n: n["flow"].update(dynamic_shift={"time_shift_type": "x"})),
            "dynamic_shift",
        ),
        "dynamic-with-shift": (lambda f: _edit_note(f, lambda n: n["flow"].update(dynamic_shift={})), "flow.shift"),
        "weights-of-flux": (
            lambda f: _rehash(
                f,
                "diffusion_pytorch_model.safetensors",
                (tmp_path / "flux" / "diffusion_pytorch_model.safetensors").read_bytes(),
            ),
            "do not fit SD3Transformer2DModel",
        ),
    }
    export_generator(flow_generator(_denoiser("tiny-flux")), tmp_path / "flux")
    for name, (edit, match) in cases.items():
        folder = case(name, edit)
        with pytest.raises(StorageError, match=match) as e:
            load_generator(folder)
        assert str(folder) in str(e.value), name


def _flow_pristines(root: Path) -> dict[str, Path]:
    """An SD3 K-step student from pure noise, and a FLUX one-step at t < 1 with a dynamic shift."""
    d = _denoiser("tiny-sd3")
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    flux = _denoiser("tiny-flux", scheduler=sched)
    return {
        "sd3": export_generator(MultiStepGenerator(d, d.sigmas(3)), root / "sd3"),
        "flux": export_generator(flow_generator(flux, 0.7), root / "flux"),
    }


def _flow_cases(pristine: Path) -> list[Case]:
    note = json.loads((pristine / NOTE).read_text())
    cases = []
    for path in _paths(note):
        if path == ("digest",) or path[0] == "files":  # the files' hashes: tests/test_loader_fuzz.py
            continue
        label = ".".join(map(str, path))
        cases.append(Case(f"{label}/removed", lambda f, p=path: _edit_note(f, lambda n: _set(n, p, None, True)), True))
        cases.append(Case(f"{label}/digest-kept", lambda f, p=path: _edit_note(f, lambda n: _set(n, p, "x"), False)))
        for v in WRONG:
            cases.append(
                Case(
                    f"{label}={v!r:.16}",
                    lambda f, p=path, v=v: _edit_note(f, lambda n: _set(n, p, copy.deepcopy(v))),
                    True,
                )
            )
    for fname, forge in HEADER_FORGERIES.items():

        def mutate(f: Path, forge=forge):
            h, body = _split((f / "diffusion_pytorch_model.safetensors").read_bytes())
            data = forge(h, body)
            if data is None:
                return "SKIP"
            _rehash(f, "diffusion_pytorch_model.safetensors", data)

        cases.append(Case(f"weights/forged-{fname}", mutate, True))
    for key, value in (
        ("_class_name", "UNet2DConditionModel"),
        ("_class_name", "FluxTransformer2DModel"),
        ("num_layers", 3),
        ("in_channels", 8),
        ("patch_size", 4),
        ("num_attention_heads", 4096),
    ):
        cases.append(Case(f"config/{key}={value!r}", lambda f, k=key, v=value: _edit_config(f, **{k: v}), True))
    cases.append(Case("config/not-json", lambda f: _rehash(f, "config.json", b"{" * 50), True))
    cases.append(
        Case("weights/empty-header", lambda f: _rehash(f, "diffusion_pytorch_model.safetensors", _join({}, b"")), True)
    )
    return cases


def test_every_field_of_a_flow_note_is_checked(tmp_path):
    """Every note field removed or set to a wrong value (hashes rewritten, so it reaches the checks),
    and forged weights headers and configs: a StorageError naming the folder, or a valid load."""
    torch.set_num_threads(1)
    z = {}
    for name, pristine in _flow_pristines(tmp_path / "pristine").items():
        gen = load_generator(pristine)
        x, c = _inputs(gen.denoiser.model)
        with torch.no_grad():
            z[name] = (
                x,
                c,
                gen.sample(x, c, noise="deterministic") if isinstance(gen, MultiStepGenerator) else gen(x, c),
            )

        def load(folder, ref, name=name):
            g = load_generator(folder)
            x, c, want = z[name]
            with torch.no_grad():
                got = g.sample(x, c, noise="deterministic") if isinstance(g, MultiStepGenerator) else g(x, c)
            return torch.equal(got, want)

        cases = _flow_cases(pristine)
        outcomes = {"refused": 0, "VALID": 0, "SKIP": 0}
        failures = []
        for case in cases:
            res = run_case(case, pristine, tmp_path / "work", load, {})
            if res in (None, "VALID", "SKIP"):
                outcomes["refused" if res is None else res] += 1
            else:
                failures.append(res)
        print(f"\nflow note fuzz {name}: {len(cases)} cases, {outcomes}")
        assert not failures, "\n".join(failures[:30])
        assert outcomes["refused"] >= 0.85 * len(cases) and len(cases) >= 250


# --------------------------------------------------------------------------- build before you allocate


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


@pytest.mark.parametrize(
    "preset,changes,match",
    [
        # ~16 G parameters (64 GB) and a 1024^2-position embedding buffer (68 GB): the weights do not fit it
        ("tiny-sd3", dict(num_attention_heads=64, attention_head_dim=256, pos_embed_max_size=1024), "do not fit"),
        ("tiny-flux", dict(num_attention_heads=64, attention_head_dim=128, num_single_layers=40), "do not fit"),
        # rotary frequencies for 10^7 positions (~2 GB), computed at build time and not in the weights
        ("tiny-wan", dict(rope_max_seq_len=10**7), "buffers that are not in the weights"),
    ],
)
def test_a_config_asking_for_a_huge_model_is_refused_before_it_is_allocated(tmp_path, preset, changes, match):
    out = export_generator(flow_generator(_denoiser(preset)), tmp_path / "g")
    _edit_config(out, **changes)
    before, t0 = _peak_rss_mb(), time.perf_counter()
    with pytest.raises(StorageError, match=match) as e:
        load_generator(out)
    took, grew = time.perf_counter() - t0, _peak_rss_mb() - before
    print(f"\n{preset} {changes}: refused in {took:.2f} s, peak RSS +{grew:.0f} MB")
    assert str(out) in str(e.value)
    assert took < 10 and grew < 200, (took, grew)


def test_the_materialised_model_computes_its_unsaved_buffers(tmp_path, monkeypatch):
    """Wan's rotary frequencies are not in the weights: the model is materialised with real buffers
    (a meta model's to_empty would leave them uninitialised), and its parameters are never built on CPU."""
    d = _denoiser("tiny-wan")
    out = export_generator(flow_generator(d), tmp_path / "wan")
    built = []
    real = export_mod._build

    def spy(cls, config, cfg_path, *, everything_on_meta):
        net = real(cls, config, cfg_path, everything_on_meta=everything_on_meta)
        built.append(
            (everything_on_meta, all(p.is_meta for p in net.parameters()), any(b.is_meta for b in net.buffers()))
        )
        return net

    monkeypatch.setattr(export_mod, "_build", spy)
    loaded = load_generator(out)
    assert built == [(True, True, True), (False, True, False)]  # checked on meta, then parameters on meta only
    own = dict(d.model.named_buffers())
    assert {n for n, _ in loaded.denoiser.model.named_buffers()} == set(own) and set(own) - set(d.model.state_dict())
    assert all(torch.equal(b, own[n]) for n, b in loaded.denoiser.model.named_buffers())
    assert not any(t.is_meta for t in loaded.state_dict().values())
