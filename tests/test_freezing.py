"""GDD-I freezing rule (disback_core.freezing): exact frozen module sets and hand-counted fractions."""
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_unet2d, tiny_unet2d_condition

from disback_core import FreezeReport, apply_freezing, freeze_modules, gddi_frozen_modules
from disback_core.denoisers import EDMPrecond, make_generator
from disback_core.nets import UNetNet, edm_mlp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "foreign"))
from edm_networks import tiny_edm  # noqa: E402


def conv3(cin, cout):
    return cout * cin * 9 + cout


def linear(i, o):
    return o * i + o


def test_unet2d_exact_frozen_set_and_fraction():
    unet = tiny_unet2d()  # channels (8, 16), in/out 2, attention in down_blocks.1, up_blocks.0, mid_block
    expected = [
        "down_blocks.0.resnets.0.conv1", "down_blocks.0.resnets.0.conv2", "down_blocks.0.downsamplers.0.conv",
        "down_blocks.1.attentions.0.to_out.0", "down_blocks.1.resnets.0.conv1", "down_blocks.1.resnets.0.conv2",
        "up_blocks.0.attentions.0.to_out.0", "up_blocks.0.attentions.1.to_out.0",
        "up_blocks.0.resnets.0.conv1", "up_blocks.0.resnets.0.conv2", "up_blocks.0.resnets.1.conv1",
        "up_blocks.0.resnets.1.conv2", "up_blocks.0.upsamplers.0.conv",
        "up_blocks.1.resnets.0.conv1", "up_blocks.1.resnets.0.conv2", "up_blocks.1.resnets.1.conv1",
        "up_blocks.1.resnets.1.conv2",
        "mid_block.attentions.0.to_out.0", "mid_block.resnets.0.conv1", "mid_block.resnets.0.conv2",
        "mid_block.resnets.1.conv1", "mid_block.resnets.1.conv2",
    ]
    assert sorted(gddi_frozen_modules(unet)) == sorted(expected)
    frozen = (3 * conv3(8, 8)  # down0: conv1, conv2, downsampler
              + linear(16, 16) + conv3(8, 16) + conv3(16, 16)  # down1: attention out, conv1, conv2
              + 2 * linear(16, 16) + conv3(32, 16) + conv3(24, 16) + 3 * conv3(16, 16)  # up0 (+ upsampler)
              + conv3(24, 8) + conv3(16, 8) + 2 * conv3(8, 8)  # up1
              + linear(16, 16) + 4 * conv3(16, 16))  # mid
    total = sum(p.numel() for p in unet.parameters())
    rep = apply_freezing(unet, "gddi")
    assert (rep.frozen_params, rep.total_params) == (frozen, total) == (34728, 45114)
    assert rep.fraction == pytest.approx(frozen / total)
    # exactly those parameters are frozen; 1x1 skips, qkv, norms, time_emb_proj, conv_in/out still train
    for name, p in unet.named_parameters():
        assert p.requires_grad == (name.rsplit(".", 1)[0] not in expected), name
    for keep in ("conv_in", "conv_out", "time_embedding.linear_1", "down_blocks.1.resnets.0.conv_shortcut",
                 "down_blocks.1.attentions.0.to_q", "down_blocks.0.resnets.0.time_emb_proj",
                 "down_blocks.0.resnets.0.norm1"):
        assert all(p.requires_grad for p in unet.get_submodule(keep).parameters()), keep


def test_unet2d_condition_freezes_self_and_cross_attention_out_but_not_ff():
    unet = tiny_unet2d_condition()
    names = gddi_frozen_modules(unet)
    tb = "down_blocks.0.attentions.0.transformer_blocks.0"
    assert f"{tb}.attn1.to_out.0" in names and f"{tb}.attn2.to_out.0" in names
    assert not any(".ff." in n or "proj_in" in n or "proj_out" in n or "to_q" in n for n in names)
    transformers = [f"{b}.attentions.{i}.transformer_blocks.0" for b, i in
                    [("down_blocks.0", 0), ("up_blocks.1", 0), ("up_blocks.1", 1)]]
    attn_out = [f"{t}.{a}.to_out.0" for t in transformers for a in ("attn1", "attn2")]
    attn_out.append("mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0")
    attn_out.append("mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0")
    convs = [n for n in names if n not in attn_out]
    assert sorted(n for n in names if n in attn_out) == sorted(attn_out)
    assert all(n.rsplit(".", 1)[-1] in ("conv1", "conv2", "conv") for n in convs)
    rep = apply_freezing(unet)
    # 3x3 convs: the same resnet/resampler layout as UNet2DModel's (channels 8, 16); 8 attention outs of 8x8 or 16x16
    convs_numel = (3 * conv3(8, 8) + conv3(8, 16) + conv3(16, 16) + conv3(32, 16) + conv3(24, 16) + 3 * conv3(16, 16)
                   + conv3(24, 8) + conv3(16, 8) + 2 * conv3(8, 8) + 4 * conv3(16, 16))
    attn_numel = 6 * linear(8, 8) + 2 * linear(16, 16)
    assert rep.frozen_params == convs_numel + attn_numel == 34616
    assert rep.total_params == 51394 and rep.fraction == pytest.approx(34616 / 51394)


def test_edm_songunet_rule():
    net = tiny_edm()
    names = gddi_frozen_modules(net)
    blocks = ["enc.8x8_block0", "enc.4x4_down", "enc.4x4_block0", "dec.4x4_in0", "dec.4x4_in1", "dec.4x4_block0",
              "dec.4x4_block1", "dec.8x8_up", "dec.8x8_block0", "dec.8x8_block1"]
    attn = ["enc.4x4_block0", "dec.4x4_in0", "dec.4x4_block1"]
    expected = [f"model.{b}.{c}" for b in blocks for c in ("conv0", "conv1")] + [f"model.{b}.proj" for b in attn]
    assert sorted(names) == sorted(expected)
    assert not any(n.endswith((".skip", ".qkv", ".affine")) or "aux_conv" in n or "8x8_conv" in n for n in names)
    by_hand = sum(net.get_submodule(n).weight.numel() + net.get_submodule(n).bias.numel() for n in expected)
    rep = apply_freezing(net)
    assert rep.frozen_params == by_hand == 148832
    assert rep.total_params == sum(p.numel() for p in net.parameters()) == 189058
    assert not any(p.requires_grad for n in expected for p in net.get_submodule(n).parameters())
    assert net.model.enc["8x8_conv"].weight.requires_grad and net.model.enc["4x4_block0"].qkv.weight.requires_grad


def test_wrapped_generator_names_are_prefixed_and_frozen_weights_stay_put():
    torch.manual_seed(0)
    g = make_generator(EDMPrecond(UNetNet(tiny_unet2d())), 80.0)
    rep = apply_freezing(g, "gddi")
    assert rep.frozen_modules[0].startswith("denoiser.net.unet.") and rep.fraction == pytest.approx(34728 / 45114)
    frozen = {n: p.detach().clone() for n, p in g.named_parameters() if not p.requires_grad}
    train = {n: p.detach().clone() for n, p in g.named_parameters() if p.requires_grad}
    opt = torch.optim.Adam([p for p in g.parameters() if p.requires_grad], 1e-2)
    g(torch.randn(4, 2, 8, 8)).square().mean().backward()
    opt.step()
    after = dict(g.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in frozen.items())
    assert any(not torch.equal(after[n], v) for n, v in train.items())


def test_unknown_architecture_custom_rule_and_errors():
    mlp = edm_mlp(2)
    with pytest.raises(ValueError, match="rule="):
        apply_freezing(mlp, "gddi")
    with pytest.raises(ValueError, match="unknown freezing rule"):
        apply_freezing(mlp, "nope")
    none = apply_freezing(mlp, "none")
    assert none.frozen_params == 0 and none.fraction == 0.0 and all(p.requires_grad for p in mlp.parameters())
    rep = apply_freezing(mlp, lambda m: ["net.inp"])
    assert isinstance(rep, FreezeReport) and rep.frozen_modules == ["net.inp"]
    assert rep.frozen_params == linear(2, 128) and not mlp.net.inp.weight.requires_grad
    with pytest.raises(ValueError, match="not a submodule"):
        freeze_modules(mlp, ["net.nope"])


def test_runspec_freeze_field_defaults_keep_stored_runs_reusable():
    from disback_core.bench.runner import RunSpec

    spec = RunSpec(problem="digits", freeze="none").to_json()
    stored = {k: v for k, v in spec.items() if k != "freeze"}  # a run stored before the field existed
    assert {**RunSpec().to_json(), **stored} == spec and RunSpec().freeze == "none"


class _TinyImages:
    """A Problem stand-in for run_one: a random-weight EDM UNet teacher on 1x8x8 'images'."""

    def __new__(cls):
        from disback_core.bench.problems import Problem
        from disback_core.denoisers import freeze

        class P(Problem):
            def real(self, n, g):
                return torch.randn(n, 1, 8, 8, generator=g).tanh(), None

            def evaluate(self, samples, cond=None):
                return {"fd": float(samples.square().mean())}

        torch.manual_seed(0)
        teacher = freeze(EDMPrecond(UNetNet(tiny_unet2d(in_channels=1, out_channels=1))))
        return P("tiny", teacher, 0.5, (1, 8, 8), "fd", eval_samples=16)


@pytest.mark.parametrize("adapter", ["gdd", "dmd2"])
def test_runner_freezes_before_the_optimizer_for_any_adapter(adapter):
    from disback_core.bench.runner import RunSpec, run_one

    problem = _TinyImages()
    spec = RunSpec(problem="tiny", adapter=adapter, iterations=2, batch=4, eval_every=2, freeze="gddi")
    r = run_one(problem, spec, seed=0)
    rep = apply_freezing(make_generator(problem.teacher, 80.0), "gddi")
    assert (r["frozen_params"], r["frozen_fraction"]) == (rep.frozen_params, rep.fraction) and rep.fraction > 0.7
    frozen = set(rep.frozen_modules)
    teacher = {f"denoiser.{k}": v for k, v in problem.teacher.state_dict().items()}
    for k, v in r["_weights"].items():
        if k.rsplit(".", 1)[0] in frozen:
            assert torch.equal(v, teacher[k]), k  # frozen: exactly the teacher's weights after training
    assert any(not torch.equal(v, teacher[k]) for k, v in r["_weights"].items() if k.rsplit(".", 1)[0] not in frozen)
    real = 4 if adapter == "gdd" else 0
    assert r["images_per_iteration"] == {"real": real, "generated": 4 * (2 if adapter == "gdd" else 6)}
