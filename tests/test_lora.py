"""LoRA slots on any layer with a weight: peft for torch's Linear/Conv, a parametrized delta elsewhere."""
import copy

import pytest
import torch
from torch import nn

from conftest import CustomConv2d, CustomEDM, CustomLinear, tiny_unet2d, tiny_unet2d_condition
from disback_core import LoraSpec, lora_targets
from disback_core.lora import (EDM_TARGETS, UNET2D_CONDITION_TARGETS, default_target_modules, inject_lora,
                               lora_parameters, lora_state, lora_template, load_lora_state, node_weight, remove_lora,
                               svd_lora)


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 5)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.grouped = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.custom = CustomLinear(6, 7)
        self.cconv = CustomConv2d(3, 4)
        self.emb = nn.Embedding(10, 6)
        self.norm = nn.LayerNorm(6)

    def forward(self, x, img):
        h = self.custom(self.norm(self.lin(x) @ torch.ones(5, 6)))
        return h.sum() + self.grouped(self.conv(img) + self.cconv(img)).sum()


def _randomise(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_listing_shows_backends_and_factor_shapes():
    rows = {t.name: t for t in lora_targets(Mixed())}
    assert set(rows) == {"lin", "conv", "grouped", "custom", "cconv"}  # embeddings and norms are left out
    assert (rows["lin"].backend, rows["lin"].a_shape, rows["lin"].b_shape) == ("peft", (8, 6), (5, 8))
    assert (rows["conv"].backend, rows["conv"].a_shape, rows["conv"].b_shape) == ("peft", (8, 3, 3, 3), (4, 8, 1, 1))
    assert (rows["grouped"].backend, rows["grouped"].a_shape) == ("delta", (8, 2 * 9))  # groups != 1: not peft's
    assert (rows["custom"].backend, rows["custom"].layer, rows["custom"].b_shape) == ("delta", "CustomLinear", (7, 8))
    assert rows["cconv"].a_shape == (8, 27) and rows["cconv"].numel == 8 * 27 + 4 * 8
    only = lora_targets(Mixed(), LoraSpec(rank=2, target_modules=r"c.*"))  # a regex, as in peft
    assert [t.name for t in only] == ["conv", "custom", "cconv"]


def test_default_targets_for_diffusers_and_edm_unets():
    assert default_target_modules(tiny_unet2d_condition()) == list(UNET2D_CONDITION_TARGETS)

    class UNetBlock(nn.Module):  # recognised by class name, as NVlabs' SongUNet/DhariwalUNet blocks
        def __init__(self):
            super().__init__()
            self.conv0, self.affine, self.norm0 = CustomConv2d(2, 2), CustomLinear(4, 2), nn.GroupNorm(1, 2)

    assert default_target_modules(nn.Sequential(UNetBlock())) == list(EDM_TARGETS)
    names = [t.name for t in lora_targets(nn.Sequential(UNetBlock()))]
    assert names == ["0.conv0", "0.affine"]


def test_every_backend_computes_peft_s_delta():
    """node_weight(W, node) = W + scale * B @ A equals what each slot computes in its forward."""
    torch.manual_seed(0)
    m = Mixed()
    spec = LoraSpec(rank=3, alpha=6.0).resolved(m)
    slot = inject_lora(copy.deepcopy(m), spec)
    _randomise(slot)
    node = lora_state(slot)
    assert set(node) == set(lora_template(m, spec))
    assert all(tuple(v.shape) == s for (k, v), s in zip(sorted(node.items()), [lora_template(m, spec)[k] for k in sorted(node)]))
    base = dict(m.named_parameters())
    for layer in spec.target_modules:
        got = node_weight(base[f"{layer}.weight"], node, layer, spec.scale)
        module = slot.get_submodule(layer)
        if hasattr(module, "get_delta_weight"):  # peft computes its own delta
            want = module.get_base_layer().weight + module.get_delta_weight("disback")
        else:  # the parametrized delta: the weight the layer's forward reads
            want = module.weight
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_custom_layer_slot_trains_and_merges_like_the_recorded_module():
    torch.manual_seed(0)
    net = CustomEDM()
    spec = LoraSpec(rank=2).resolved(net)
    assert {t.backend for t in lora_targets(net, spec)} == {"delta"}
    slot = inject_lora(copy.deepcopy(net), spec)
    x, s = torch.randn(4, 2, 8, 8), torch.rand(4) + 0.1
    with torch.no_grad():
        assert torch.equal(slot(x, s), net(x, s))  # B = 0: the slot starts as the teacher
    assert [n for n, p in slot.named_parameters() if p.requires_grad] == [
        "conv0.parametrizations.weight.0.lora_A", "conv0.parametrizations.weight.0.lora_B",
        "affine.parametrizations.weight.0.lora_A", "affine.parametrizations.weight.0.lora_B",
        "conv1.parametrizations.weight.0.lora_A", "conv1.parametrizations.weight.0.lora_B"]
    opt = torch.optim.Adam(lora_parameters(slot), 1e-2)
    for _ in range(5):
        opt.zero_grad()
        ((slot(x, s) - x) ** 2).mean().backward()
        opt.step()
    node = lora_state(slot)
    merged = copy.deepcopy(net)
    with torch.no_grad():
        for layer in spec.target_modules:
            w = merged.get_submodule(layer).weight
            w.copy_(node_weight(w, node, layer, spec.scale))
        torch.testing.assert_close(merged(x, s), slot(x, s), rtol=0, atol=1e-6)
        assert not torch.allclose(merged(x, s), net(x, s))
    other = inject_lora(copy.deepcopy(net), spec)
    load_lora_state(other, node)
    with torch.no_grad():
        assert torch.equal(other(x, s), slot(x, s))


def test_remove_lora_restores_the_plain_module():
    torch.manual_seed(0)
    m = Mixed()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    types = {n: type(x) for n, x in m.named_modules()}
    params = [(n, id(p)) for n, p in m.named_parameters()]
    inject_lora(m, LoraSpec(rank=2))
    _randomise(m)
    remove_lora(m)
    assert {n: type(x) for n, x in m.named_modules()} == types
    assert [(n, id(p)) for n, p in m.named_parameters()] == params  # same objects, same order: optimizers fit
    after = m.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_svd_of_a_custom_layer_fine_tune_is_exact_at_full_rank():
    torch.manual_seed(0)
    net = CustomEDM()
    tuned = copy.deepcopy(net)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.01 * torch.randn_like(p))
    spec = LoraSpec(rank=72).resolved(net)  # >= min(out, fan_in) of every target
    targets = lora_targets(net, spec)
    node, err = svd_lora(targets, dict(net.named_parameters()), dict(tuned.named_parameters()), spec.scale)
    assert err < 1e-6
    for t in targets:
        w = node_weight(net.get_submodule(t.name).weight, node, t.name, spec.scale)
        torch.testing.assert_close(w, tuned.get_submodule(t.name).weight, rtol=0, atol=1e-6)
    _, err2 = svd_lora(lora_targets(net, LoraSpec(rank=1)), dict(net.named_parameters()),
                       dict(tuned.named_parameters()), 1.0)
    assert 0.1 < err2 < 1


def test_lora_spec_refuses_bad_values():
    for bad in (0, -1, True, 2.5, 1 << 20):
        with pytest.raises(ValueError, match="rank"):
            LoraSpec(rank=bad)
    for bad in (float("nan"), 0.0, -4.0, float("inf")):
        with pytest.raises(ValueError, match="alpha"):
            LoraSpec(rank=2, alpha=bad)
    with pytest.raises(ValueError, match="target_modules"):
        LoraSpec(target_modules=("",))
    with pytest.raises(ValueError, match="unsupported LoRA spec extras"):
        LoraSpec.from_json({"rank": 2, "extra": {"alpha_pattern": {"lin": 99}}})
    with pytest.raises(ValueError, match="target_modules must be a list"):
        LoraSpec.from_json({"rank": 2, "target_modules": 7})
    assert LoraSpec(rank=4, alpha=8, use_rslora=True).scale == 8 / 2
    spec = LoraSpec(rank=4, alpha=8.0, target_modules=("lin",))
    assert LoraSpec.from_json(spec.to_json()) == spec
    with pytest.raises(ValueError, match="already has a LoRA slot"):
        inject_lora(inject_lora(Mixed(), LoraSpec(rank=2)), LoraSpec(rank=2))
    with pytest.raises(ValueError, match="has no floating weight"):
        lora_targets(Mixed(), LoraSpec(target_modules=("norm",)))
