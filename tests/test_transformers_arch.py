"""Architecture-aware defaults for diffusers flow-matching transformers (SD3, FLUX, SANA, Wan):
LoRA target sets, the DMD2 GAN head on token features, and the GDD-I freezing rule."""
import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_unet2d
from tiny_transformers import TINY, tiny_flux, tiny_wan
from torch import nn

from disback_core import LoraSpec, apply_freezing, gddi_frozen_modules, lora_targets
from disback_core.adapters import DMD2
from disback_core.gan import GANHead, capture_features, default_feature_module
from disback_core.lora import (FLUX_TARGETS, SANA_FF_TARGETS, SANA_TARGETS, SD3_FF_TARGETS, SD3_TARGETS,
                               WAN_FF_TARGETS, WAN_TARGETS, default_target_modules, inject_lora, lora_parameters)
from disback_core.nets import edm_mlp

ATTN_SD3 = ["to_q", "to_k", "to_v", "add_k_proj", "add_v_proj", "add_q_proj", "to_out.0"]  # module order
EXPECTED_TARGETS = {
    # train_dreambooth_lora_sd3.py's attention set; the last block (context_pre_only) has no to_add_out
    "sd3": [f"transformer_blocks.0.attn.{n}" for n in ATTN_SD3 + ["to_add_out"]]
    + [f"transformer_blocks.1.attn.{n}" for n in ATTN_SD3],
    # train_dreambooth_lora_flux.py's set: dual-stream attention + both feed-forwards, single-stream q/k/v
    "flux": [f"transformer_blocks.0.attn.{n}" for n in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj",
                                                         "add_k_proj", "add_v_proj", "to_add_out")]
    + [f"transformer_blocks.0.{f}.{n}" for f in ("ff", "ff_context") for n in ("net.0.proj", "net.2")]
    + [f"single_transformer_blocks.0.attn.{n}" for n in ("to_q", "to_k", "to_v")],
    "sana": [f"transformer_blocks.{b}.{a}.{n}" for b in (0, 1) for a in ("attn1", "attn2")
             for n in ("to_q", "to_k", "to_v", "to_out.0")],
    "wan": [f"blocks.{b}.{a}.{n}" for b in (0, 1) for a in ("attn1", "attn2") for n in ("to_q", "to_k", "to_v", "to_out.0")],
}
CONSTANTS = {"sd3": SD3_TARGETS, "flux": FLUX_TARGETS, "sana": SANA_TARGETS, "wan": WAN_TARGETS}
FORBIDDEN = ("norm", "embed", "pos_embed", "proj_out", "patch", "time", "context_embedder", "x_embedder", "caption")


def linear(i, o, bias=True):
    return o * i + (o if bias else 0)


class D(nn.Module):
    """A test-local flow-matching denoiser wrapper D(x, sigma, cond): calls the transformer at
    t = sigma / (1 + sigma) (FLUX takes t in [0, 1], the others 1000 t); cond holds the other kwargs."""

    def __init__(self, model, arch):
        super().__init__()
        self.model, self.scale = model, 1.0 if arch == "flux" else 1000.0

    def forward(self, x, sigma, cond):
        t = sigma / (1 + sigma)
        return self.model(hidden_states=x, timestep=t * self.scale, **cond).sample


def _split(kw):
    x = kw.pop("hidden_states")
    kw.pop("timestep")
    return x, kw


# --------------------------------------------------------------------------- 1. LoRA target sets


@pytest.mark.parametrize("arch", ["sd3", "flux", "sana", "wan"])
def test_default_lora_targets_are_the_scripts_attention_sets(arch):
    model, _ = TINY[arch]()
    assert default_target_modules(model) == list(CONSTANTS[arch])
    names = [t.name for t in lora_targets(model)]
    assert names == EXPECTED_TARGETS[arch]
    assert len(names) == {"sd3": 15, "flux": 15, "sana": 16, "wan": 16}[arch]
    assert not any(f in n for n in names for f in FORBIDDEN)
    assert {t.backend for t in lora_targets(model)} == {"peft"}
    # a wrapper finds the same set under its prefix
    assert [t.name for t in lora_targets(D(model, arch))] == [f"model.{n}" for n in names]


def test_feed_forward_options_and_wan_image_context():
    sd3, _ = TINY["sd3"]()
    ff = [t.name for t in lora_targets(sd3, LoraSpec(target_modules=SD3_TARGETS + SD3_FF_TARGETS))]
    assert len(ff) == 15 + 6 and ff[8:12] == ["transformer_blocks.0.ff.net.0.proj", "transformer_blocks.0.ff.net.2",
                                              "transformer_blocks.0.ff_context.net.0.proj",
                                              "transformer_blocks.0.ff_context.net.2"]
    assert ff[-2:] == ["transformer_blocks.1.ff.net.0.proj", "transformer_blocks.1.ff.net.2"]  # no ff_context in the last
    sana, _ = TINY["sana"]()
    rows = {t.name: t for t in lora_targets(sana, LoraSpec(rank=2, target_modules=SANA_TARGETS + SANA_FF_TARGETS))}
    assert len(rows) == 16 + 6
    depth = rows["transformer_blocks.0.ff.conv_depth"]  # depthwise 3x3 (groups 40): the delta backend
    assert (depth.backend, depth.weight_shape, depth.a_shape, depth.b_shape) == ("delta", (40, 1, 3, 3), (2, 9), (40, 2))
    assert rows["transformer_blocks.0.ff.conv_inverted"].backend == "peft"
    wan, _ = TINY["wan"]()
    wff = [t.name for t in lora_targets(wan, LoraSpec(target_modules=WAN_TARGETS + WAN_FF_TARGETS))]
    assert len(wff) == 20 and wff[8:10] == ["blocks.0.ffn.net.0.proj", "blocks.0.ffn.net.2"]
    i2v, _ = tiny_wan(image_dim=12)  # image-conditioned: attn2's add_k_proj / add_v_proj join; the embedder's ff does not
    names = [t.name for t in lora_targets(i2v)]
    assert len(names) == 20 and names[8:10] == ["blocks.0.attn2.add_k_proj", "blocks.0.attn2.add_v_proj"]
    names = [t.name for t in lora_targets(i2v, LoraSpec(target_modules=WAN_TARGETS + WAN_FF_TARGETS))]
    assert len(names) == 24 and not any("image_embedder" in n for n in names)


def test_a_spec_selecting_nothing_names_target_modules():
    model, _ = TINY["sd3"]()
    with pytest.raises(ValueError, match=r"target_modules \('attn1.to_q',\) match no layer"):
        lora_targets(model, LoraSpec(target_modules=("attn1.to_q",)))  # Sana/Wan names on SD3


@pytest.mark.parametrize("arch", ["sd3", "flux", "sana", "wan"])
def test_inject_lora_and_forward(arch):
    torch.manual_seed(0)
    model, make_kwargs = TINY[arch]()
    targets = CONSTANTS[arch] + {"sd3": SD3_FF_TARGETS, "sana": SANA_FF_TARGETS, "wan": WAN_FF_TARGETS}.get(arch, ())
    spec = LoraSpec(rank=2, target_modules=targets)
    slot = inject_lora(copy.deepcopy(model), spec)
    kw = make_kwargs(2)
    with torch.no_grad():
        base = model(**kw).sample
        assert torch.equal(slot(**kw).sample, base)  # B = 0: the slot starts as the model, bit for bit
    params = lora_parameters(slot)
    assert len(params) == 2 * len(lora_targets(model, spec))
    assert {id(p) for p in slot.parameters() if p.requires_grad} == set(map(id, params))  # only the factors train
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    out = slot(**kw).sample
    assert out.shape == base.shape and not torch.allclose(out, base)
    out.square().mean().backward()
    dead = [n for n, p in slot.named_parameters() if p.requires_grad and not p.grad.abs().sum() > 0]
    # SD3's last block (context_pre_only) drops the text stream after attention, so its text queries
    # (add_q_proj, in the SD3 script's set) cannot reach the output; every other factor gets a gradient
    assert dead == ([f"transformer_blocks.1.attn.add_q_proj.lora_{f}.disback.weight" for f in "AB"]
                    if arch == "sd3" else [])


# --------------------------------------------------------------------------- 2. GAN head on tokens


def test_default_feature_module_per_architecture():
    expected = {"sd3": ("model.transformer_blocks.1", 1), "flux": ("model.single_transformer_blocks.0", 1),
                "sana": ("model.transformer_blocks.1", None), "wan": ("model.blocks.1", None)}
    for arch, want in expected.items():
        assert default_feature_module(D(TINY[arch]()[0], arch)) == want
    from diffusers import FluxTransformer2DModel

    flux1 = FluxTransformer2DModel(in_channels=4, num_layers=19, num_single_layers=38, attention_head_dim=4,
                                   num_attention_heads=1, joint_attention_dim=4, pooled_projection_dim=4,
                                   axes_dims_rope=(0, 2, 2))  # FLUX.1's block counts: the middle of 57 blocks
    assert default_feature_module(flux1) == ("single_transformer_blocks.9", 1)
    assert default_feature_module(tiny_unet2d()) == ("mid_block", None)
    with pytest.raises(ValueError, match="pass feature_module="):
        default_feature_module(edm_mlp(2))


# (image tokens, channels) the head must see: the image stream, never the 5 text tokens
TOKENS = {"sd3": (16, 16), "flux": (16, 16), "sana": (64, 8), "wan": (32, 24)}
# a parameter of the chosen block, and one after it (not run: the forward stops at the features)
BLOCK_PARAM = {"sd3": "transformer_blocks.1.attn.to_q.weight", "flux": "single_transformer_blocks.0.attn.to_q.weight",
               "sana": "transformer_blocks.1.attn1.to_q.weight", "wan": "blocks.1.attn1.to_q.weight"}


@pytest.mark.parametrize("arch", ["sd3", "flux", "sana", "wan"])
def test_gan_head_reads_image_tokens_and_trains(arch):
    torch.manual_seed(0)
    model, make_kwargs = TINY[arch]()
    fake = D(model, arch)
    x, cond = _split(make_kwargs(3))
    head = GANHead.build(fake, None, x, cond)
    name, index = default_feature_module(fake)
    assert (head.feature_module, head.output_index) == (name, index)
    feats = head.features(fake, x, torch.ones(3), cond)
    assert feats.shape == (3, *TOKENS[arch])
    lin = head.head[0]
    assert isinstance(lin, nn.Linear) and (lin.in_features, lin.out_features) == (TOKENS[arch][1],) * 2
    logits = head.logits(fake, x, cond)
    assert logits.shape == (3,) and torch.isfinite(logits).all()
    logits.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    params = dict(model.named_parameters())
    assert params[BLOCK_PARAM[arch]].grad.abs().sum() > 0
    assert params["proj_out.weight"].grad is None  # stopped right after the block


def test_dmd2_with_a_gan_head_on_sd3_and_flux():
    for arch in ("sd3", "flux"):
        torch.manual_seed(0)
        model, make_kwargs = TINY[arch]()
        fake = D(model, arch)
        x, cond = _split(make_kwargs(2))
        real, real_cond = _split(make_kwargs(2, seed=1))
        head = GANHead.build(fake, None, x, cond)
        m = DMD2(gan_head=head)
        torch.manual_seed(4)
        out = m.fake_score_loss(x, fake, cond, real=real, real_cond=real_cond)
        torch.manual_seed(4)
        dsm = m.dsm_loss(x, fake, cond)
        lr, lf = head.logits(fake, real, real_cond), head.logits(fake, x, cond)
        gan = F.softplus(lf).mean() + F.softplus(-lr).mean()
        torch.testing.assert_close(out["loss"], dsm + 1e-2 * gan)
        out["loss"].backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.critic_parameters())
        assert dict(model.named_parameters())["transformer_blocks.0.attn.add_q_proj.weight"].grad.abs().sum() > 0


def test_tuple_outputs_need_an_explicit_index():
    model, make_kwargs = TINY["sd3"]()
    fake = D(model, "sd3")
    x, cond = _split(make_kwargs(2))
    s = torch.ones(2)
    with pytest.raises(ValueError, match=r"tuple of 2 \(\[0\] tensor \(2, 5, 16\), \[1\] tensor \(2, 16, 16\)\).*output_index=1"):
        capture_features(fake, "model.transformer_blocks.0", x, s, cond)
    with pytest.raises(ValueError, match=r"\[0\] NoneType, \[1\] tensor \(2, 16, 16\)"):  # the last block: no text stream
        GANHead.build(fake, "model.transformer_blocks.1", x, cond)
    with pytest.raises(ValueError, match="output_index=0 .* is not a tensor"):
        capture_features(fake, "model.transformer_blocks.1", x, s, cond, output_index=0)
    with pytest.raises(ValueError, match="output_index=2 .* is not a tensor"):
        capture_features(fake, "model.transformer_blocks.0", x, s, cond, output_index=2)
    text = capture_features(fake, "model.transformer_blocks.0", x, s, cond, output_index=0)
    assert text.shape == (2, 5, 16)  # an explicit index reads either stream
    head = GANHead.build(fake, "model.transformer_blocks.0", x, cond, output_index=1)
    assert head.output_index == 1 and head.logits(fake, x, cond).shape == (2,)
    sana, make_sana = TINY["sana"]()
    xs, cs = _split(make_sana(2))
    with pytest.raises(ValueError, match="returns one tensor of shape \\(2, 64, 8\\), not a tuple; drop output_index=1"):
        capture_features(D(sana, "sana"), "model.transformer_blocks.0", xs, s, cs, output_index=1)


# --------------------------------------------------------------------------- 3. GDD-I freezing


FF = linear(16, 64) + linear(64, 16)  # FeedForward(16) of SD3/FLUX: 2128 parameters
EXPECTED_FROZEN = {
    "sd3": (["transformer_blocks.0.attn.to_out.0", "transformer_blocks.0.attn.to_add_out", "transformer_blocks.0.ff",
             "transformer_blocks.0.ff_context", "transformer_blocks.1.attn.to_out.0", "transformer_blocks.1.ff"],
            3 * linear(16, 16) + 3 * FF, 22064),
    "flux": (["transformer_blocks.0.attn.to_out.0", "transformer_blocks.0.attn.to_add_out", "transformer_blocks.0.ff",
              "transformer_blocks.0.ff_context", "single_transformer_blocks.0.proj_mlp",
              "single_transformer_blocks.0.proj_out"],
             2 * linear(16, 16) + 2 * FF + linear(16, 64) + linear(80, 16), 19920),
    "sana": ([f"transformer_blocks.{b}.{n}" for b in (0, 1) for n in ("attn1.to_out.0", "attn2.to_out.0", "ff")],
             2 * (2 * linear(8, 8) + linear(8, 40) + (40 * 9 + 40) + linear(20, 8, bias=False)), 5844),
    "wan": ([f"blocks.{b}.{n}" for b in (0, 1) for n in ("attn1.to_out.0", "attn2.to_out.0", "ffn")],
            2 * (2 * linear(24, 24) + linear(24, 32) + linear(32, 24)), 25592),
}


@pytest.mark.parametrize("arch", ["sd3", "flux", "sana", "wan"])
def test_gddi_freezes_attention_outputs_and_feed_forwards(arch):
    model, make_kwargs = TINY[arch]()
    names, frozen, total = EXPECTED_FROZEN[arch]
    assert gddi_frozen_modules(model) == names
    rep = apply_freezing(model, "gddi")
    assert (rep.frozen_modules, rep.frozen_params, rep.total_params) == (names, frozen, total)
    assert rep.fraction == pytest.approx(frozen / total)
    assert frozen == {"sd3": 7200, "flux": 7184, "sana": 2128, "wan": 5584}[arch]
    for n, p in model.named_parameters():
        assert p.requires_grad == (not any(n.startswith(f + ".") for f in names)), n
    # q/k/v, AdaLN modulation, embedders, patch embedding and proj_out still train
    keep = {"sd3": ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_q_proj",
                    "transformer_blocks.0.norm1.linear", "transformer_blocks.1.norm1_context.linear", "pos_embed.proj",
                    "context_embedder", "time_text_embed.timestep_embedder.linear_1", "norm_out.linear", "proj_out"],
            "flux": ["single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.norm.linear", "x_embedder",
                     "transformer_blocks.0.attn.add_k_proj", "proj_out"],
            "sana": ["transformer_blocks.0.attn2.to_k", "time_embed.linear", "patch_embed.proj", "proj_out"],
            "wan": ["blocks.0.attn2.to_v", "condition_embedder.time_proj", "patch_embedding", "proj_out"]}[arch]
    for k in keep:
        assert all(p.requires_grad for p in model.get_submodule(k).parameters()), k
    x, cond = _split(make_kwargs(2))
    D(model, arch)(x, torch.ones(2), cond).square().mean().backward()  # the frozen model still trains the rest
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)


def test_gddi_on_a_wrapped_i2v_wan_keeps_the_image_embedder():
    model, _ = tiny_wan(image_dim=12)
    names = gddi_frozen_modules(D(model, "wan"))
    assert names == [f"model.blocks.{b}.{n}" for b in (0, 1) for n in ("attn1.to_out.0", "attn2.to_out.0", "ffn")]
    guided, _ = tiny_flux(guidance=True)
    assert gddi_frozen_modules(guided) == EXPECTED_FROZEN["flux"][0]
