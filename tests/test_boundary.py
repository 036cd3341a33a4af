"""What users get wrong at the public API's boundary, refused with the config field or dtype named,
and the layouts that must work accepted with real values: conditions against a diffusers UNet's
config, CFGDenoiser's arguments at construction, bf16/fp32 teachers and copies (DMD2's SD layout),
and verification of low-precision attachments in their own precision."""
import copy

import numpy as np
import pytest
import torch
from conftest import tiny_unet2d, tiny_unet2d_condition
from diffusers import DDPMScheduler

from disback_core import (CFGDenoiser, DegradationRecorder, DiffusersDenoiser, FixedInterval, LoraSpec, Trajectory,
                          attach)
from disback_core.lora import node_weight
from disback_core.trajectory import probe_error

X = torch.randn(2, 2, 8, 8)


def _wrap(unet):
    return DiffusersDenoiser(unet, scheduler=DDPMScheduler(), clamp=True)


def _raw(d, x, sigma, **kwargs):
    """What DiffusersDenoiser must compute (eps prediction), from a direct call of its UNet."""
    s = torch.full((x.shape[0],), float(sigma), dtype=torch.float64)
    t = d.sigma_to_t(s).to(torch.float32)
    c_in = (1 / (1 + s**2).sqrt())[:, None, None, None]
    with torch.no_grad():
        eps = d.model((c_in * x.double()).float(), t, **kwargs).sample.double()
    return (x.double() - s[:, None, None, None] * eps).float()


# --------------------------------------------------------------------------- 1. conditions vs the config


def test_a_text_condition_is_checked_against_cross_attention_dim():
    torch.manual_seed(0)
    d = _wrap(tiny_unet2d_condition(cross_attention_dim=32))
    with pytest.raises(ValueError, match=r"^cond has shape \(2, 7, 16\), but the model's config\.cross_attention_dim "
                                         r"is 32: expected \[batch, tokens, 32\]$"):
        d(X, 1.0, torch.randn(2, 7, 16))
    with pytest.raises(ValueError, match=r"cond\['encoder_hidden_states'\] has shape \(2, 32\), but the model's "
                                         r"config\.cross_attention_dim is 32"):
        d(X, 1.0, {"encoder_hidden_states": torch.randn(2, 32)})
    with pytest.raises(ValueError, match=r"cond has 3 rows \(shape \(3, 7, 32\)\) but the batch has 2 samples"):
        d(X, 1.0, torch.randn(3, 7, 32))
    with pytest.raises(ValueError, match=r"has cross-attention: pass its text condition \(encoder_hidden_states\) "
                                         r"\[batch, tokens, 32\] as cond"):
        d(X, 1.0)
    c = torch.randn(2, 7, 32)  # accepted: the UNet's own result, as a tensor or a dict cond
    want = _raw(d, X, 1.0, encoder_hidden_states=c)
    with torch.no_grad():
        assert torch.allclose(d(X, 1.0, c), want, atol=1e-5)
        assert torch.equal(d(X, 1.0, c), d(X, 1.0, {"encoder_hidden_states": c}))
        # CFG doubles the batch: uncond [tokens, dim] broadcast, both halves checked as one batch
        null = torch.zeros(7, 32)
        u, cc = d(X, 1.0, null.expand(2, 7, 32)), d(X, 1.0, c)
        assert torch.allclose(CFGDenoiser(d, 3.0, null)(X, 1.0, c), u + 3.0 * (cc - u), atol=1e-5)


def test_class_labels_must_be_integers_in_num_class_embeds():
    torch.manual_seed(0)
    d = _wrap(tiny_unet2d(num_class_embeds=10))
    with pytest.raises(TypeError, match=r"cond \(class labels\) has dtype torch\.float32, but the model's class "
                                        r"embedding is a table of config\.num_class_embeds = 10 classes: pass integer "
                                        r"labels in 0\.\.9 \(e\.g\. labels\.long\(\)\)"):
        d(X, 1.0, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"cond \(class labels\) holds values 1\.\.10, but the model's "
                                         r"config\.num_class_embeds is 10: expected integer labels in 0\.\.9"):
        d(X, 1.0, torch.tensor([1, 10]))
    with pytest.raises(ValueError, match=r"holds values -1\.\.3"):
        d(X, 1.0, torch.tensor([3, -1]))
    with pytest.raises(ValueError, match=r"cond \(class labels\) has shape \(\): expected \[batch\] = \[2\]"):
        d(X, 1.0, torch.tensor(3))  # would broadcast silently over the batch
    with pytest.raises(ValueError, match=r"cond \(class labels\) has 3 rows \(shape \(3,\)\) but the batch has 2"):
        d(X, 1.0, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"class-conditional \(config\.num_class_embeds = 10\): pass its class "
                                         r"labels \[batch\] as cond"):
        d(X, 1.0)
    labels = torch.tensor([0, 9])  # accepted: int64 and int32, the UNet's own result, labels matter
    with torch.no_grad():
        out = d(X, 1.0, labels)
        assert torch.allclose(out, _raw(d, X, 1.0, class_labels=labels), atol=1e-5)
        assert torch.equal(out, d(X, 1.0, labels.int()))
        assert not torch.allclose(out, d(X, 1.0, torch.tensor([1, 8])))


def test_a_condition_for_an_unconditional_unet_is_refused_not_dropped():
    torch.manual_seed(0)
    plain = _wrap(tiny_unet2d())
    with pytest.raises(ValueError, match=r"cond was given, but the model \(UNet2DModel\) is unconditional: no class "
                                         r"embedding \(config\.num_class_embeds and config\.class_embed_type are "
                                         r"None\) and no cross-attention, so the condition would be dropped"):
        plain(X, 1.0, torch.tensor([1, 2]))
    no_attn = _wrap(tiny_unet2d_condition(down_block_types=("DownBlock2D", "DownBlock2D"),
                                          up_block_types=("UpBlock2D", "UpBlock2D"), mid_block_type=None))
    with pytest.raises(ValueError, match=r"UNet2DConditionModel\) is unconditional"):
        no_attn(X, 1.0, torch.randn(2, 5, 12))  # diffusers reads it nowhere: it was dropped silently
    with torch.no_grad():  # accepted without a cond (its encoder_hidden_states argument filled with None)
        assert torch.allclose(no_attn(X, 1.0), _raw(no_attn, X, 1.0, encoder_hidden_states=None), atol=1e-5)
        assert torch.allclose(plain(X, 1.0), _raw(plain, X, 1.0), atol=1e-5)
    # a text UNet with a class embedding: labels that are not used by it are named by their key
    text_only = _wrap(tiny_unet2d_condition())
    with pytest.raises(ValueError, match=r"cond\['class_labels'\] was given as 'class_labels', but the model "
                                         r"\(UNet2DConditionModel\) does not use 'class_labels': it has no class "
                                         r"embedding"):
        text_only(X, 1.0, {"encoder_hidden_states": torch.randn(2, 5, 12), "class_labels": torch.tensor([0, 1])})


def test_sdxl_added_cond_kwargs_are_checked_against_projection_class_embeddings_input_dim():
    torch.manual_seed(0)
    unet = tiny_unet2d_condition(addition_embed_type="text_time", addition_time_embed_dim=4,
                                 projection_class_embeddings_input_dim=10 + 6 * 4)
    d = _wrap(unet)
    text = torch.randn(2, 5, 12)

    def cond(width=10, ids=6, rows=2):
        return {"encoder_hidden_states": text,
                "added_cond_kwargs": {"text_embeds": torch.randn(rows, width), "time_ids": torch.randn(rows, ids)}}

    with pytest.raises(ValueError, match=r"cond\['added_cond_kwargs'\]: text_embeds \(2, 12\) and time_ids \(2, 6\) "
                                         r"give 12 \+ 6 x config\.addition_time_embed_dim \(4\) = 36 features, but "
                                         r"the model's config\.projection_class_embeddings_input_dim is 34: expected "
                                         r"text_embeds \[batch, 10\]"):
        d(X, 1.0, cond(width=12))
    with pytest.raises(ValueError, match=r"cond\['added_cond_kwargs'\]\['time_ids'\] has 3 rows"):
        d(X, 1.0, {**cond(), "added_cond_kwargs": {"text_embeds": torch.randn(2, 10), "time_ids": torch.randn(3, 6)}})
    with pytest.raises(ValueError, match=r"config\.addition_embed_type 'text_time' \(SDXL\): pass cond as a dict "
                                         r"with 'added_cond_kwargs'"):
        d(X, 1.0, text)
    with pytest.raises(ValueError, match=r"has no tensor 'time_ids'"):
        d(X, 1.0, {"encoder_hidden_states": text, "added_cond_kwargs": {"text_embeds": torch.randn(2, 10)}})
    good = cond()  # accepted: the UNet's own result
    with torch.no_grad():
        assert torch.allclose(d(X, 1.0, good), _raw(d, X, 1.0, **good), atol=1e-5)


# --------------------------------------------------------------------------- 2. CFGDenoiser at construction


def test_cfg_arguments_are_checked_at_construction():
    torch.manual_seed(0)
    d = _wrap(tiny_unet2d(num_class_embeds=4))
    with pytest.raises(TypeError, match=r"^uncond must be the null condition for one sample, e\.g\. the null class "
                                        r"label or the empty-prompt embedding: an int class label, a tensor .* got NoneType$"):
        CFGDenoiser(d, 4.5, None)  # used to fail at the first call: "must be real number, not NoneType"
    x = torch.randn(2, 2, 8, 8)
    labels = torch.tensor([0, 2])
    assert torch.equal(CFGDenoiser(d, 2.0, 3)(x, 1.0, labels), CFGDenoiser(d, 2.0, torch.tensor(3))(x, 1.0, labels))
    with pytest.raises(TypeError, match=r"uncond\['added_cond_kwargs'\]\['time_ids'\] must be the null condition"):
        CFGDenoiser(d, 4.5, {"encoder_hidden_states": torch.zeros(3, 4),
                             "added_cond_kwargs": {"text_embeds": torch.zeros(8), "time_ids": None}})
    with pytest.raises(ValueError, match=r"uncond is an empty dict"):
        CFGDenoiser(d, 4.5, {})
    with pytest.raises(TypeError, match=r"scale must be a real number, got bool"):
        CFGDenoiser(d, True, torch.tensor(3))
    with pytest.raises(TypeError, match=r"scale must be a real number, got str"):
        CFGDenoiser(d, "4.5", torch.tensor(3))
    with pytest.raises(ValueError, match=r"scale must be finite, got inf"):
        CFGDenoiser(d, float("inf"), torch.tensor(3))
    with pytest.raises(TypeError, match=r"denoiser must be a denoiser called as D\(x_t, sigma, cond\)"):
        CFGDenoiser("teacher", 4.5, torch.tensor(3))
    with pytest.raises(TypeError, match=r"denoiser is a raw diffusers UNet2DModel.*DiffusersDenoiser"):
        CFGDenoiser(d.model, 4.5, torch.tensor(3))
    # accepted: numpy and 0-d tensor scales are plain floats; the null label is broadcast per sample
    labels = torch.tensor([0, 2])
    with torch.no_grad():
        u, c = d(X, 1.0, torch.tensor([3, 3])), d(X, 1.0, labels)
        for scale in (2.5, np.float32(2.5), torch.tensor(2.5)):
            g = CFGDenoiser(d, scale, torch.tensor(3))
            assert type(g.scale) is float and g.scale == 2.5
            assert torch.allclose(g(X, 1.0, labels), u + 2.5 * (c - u), atol=1e-5)


# --------------------------------------------------------------------------- 3. bf16 teacher, fp32 copy


def _loss(net, x0):
    sigma = (torch.randn(x0.shape[0]) * 1.2).exp().clamp(0.1, 50)
    return ((net(x0 + sigma[:, None, None, None] * torch.randn_like(x0), sigma) - x0) ** 2).mean()


def _record(teacher, module=None, lr=1e-4, steps=6, nodes=3):
    torch.manual_seed(1)
    rec = DegradationRecorder(teacher, module, steps=steps, nodes=nodes, lr=lr, lora=LoraSpec(rank=2),
                              probe=torch.randn(6, 2, 8, 8))
    for _ in range(steps):
        rec.update(_loss(rec.module, torch.randn(8, 2, 8, 8)))
    return rec.trajectory()


def _snapshot(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _errors(att, n):
    return [att.verify(j) for j in range(n + 1)]


def _tells_its_node_apart(att, n):
    errs = _errors(att, n)
    own = errs[att.node]
    others = [e for j, e in enumerate(errs) if j != att.node]
    return own < 0.1 * min(others), errs


def test_dmd2_layout_records_on_the_fp32_copy_against_the_bf16_teacher():
    """DMD2's SD layout: real_unet in bf16, fake_unet in fp32, both from the same weights."""
    torch.manual_seed(0)
    fp32 = _wrap(tiny_unet2d())
    real = copy.deepcopy(fp32).to(torch.bfloat16)
    fake = copy.deepcopy(fp32)
    fake_start = _snapshot(fake)
    traj = _record(real, fake)  # used to fail: "its weights differ from the teacher's"
    assert traj.teacher is real and traj.probe_dtype == torch.bfloat16
    # the probe outputs are the bf16 teacher's, holding each node: reproduced exactly, and distinct
    assert traj.verify() == [0.0] * 4
    outs = traj.probe.outputs
    assert min(float((outs[k] - outs[j]).abs().max()) for k in range(4) for j in range(k)) > 1e-2
    assert all(torch.equal(v, fake_start[k]) for k, v in fake.state_dict().items())  # the slot is gone again
    original = _snapshot(real)
    att = attach(real, traj, FixedInterval(1), fake=fake)
    # the fp32 fake holds node N on its own fp32 weights (as the recording module did), not on the bf16
    # teacher's rounded ones
    touched = set(traj.layers())
    for name, v in fake.state_dict().items():
        want = (node_weight(fake_start[name], traj.nodes[-1], name[: -len(".weight")], traj.lora.scale)
                if name in touched else fake_start[name])
        assert v.dtype == torch.float32 and torch.equal(v, want), name
    while True:
        ok, errs = _tells_its_node_apart(att, traj.last)
        assert errs[att.node] == 0.0 and ok, (att.node, errs)
        if att.node == 0:
            break
        att.step()
    assert all(torch.equal(v, original[k]) for k, v in real.state_dict().items())


def test_a_teacher_cast_to_bf16_after_recording_attaches():
    """The path recorded on the fp32 real_unet; the training run casts it to bf16 in place."""
    torch.manual_seed(0)
    unet = tiny_unet2d()
    teacher = _wrap(unet)
    traj = _record(teacher)
    assert traj.probe_dtype == torch.float32
    unet.to(torch.bfloat16)
    original = _snapshot(unet)
    att = attach(unet, traj, FixedInterval(1))  # used to fail: "the trajectory's teacher changed since ..."
    assert att.prefix == "model."
    while True:
        ok, errs = _tells_its_node_apart(att, traj.last)
        assert ok, (att.node, errs)
        if att.node == 0:
            break
        att.step()
    assert all(torch.equal(v, original[k]) for k, v in unet.state_dict().items())
    assert traj.verify() == [0.0] * 4  # the working copies, each against its node written in bf16
    att.detach()


def test_a_dtype_difference_that_is_not_only_a_cast_names_both_dtypes():
    torch.manual_seed(0)
    teacher = _wrap(tiny_unet2d())
    other = _wrap(tiny_unet2d())  # another model, in fp32
    real = copy.deepcopy(teacher).to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"weights differ from the teacher's even compared in bfloat16 \(module "
                                         r"float32, teacher bfloat16\): it is not a cast of the same weights\. Pass "
                                         r"the teacher the module was copied from"):
        DegradationRecorder(real, other, interval=2)
    with pytest.raises(ValueError, match=r"^module must start as a copy of the teacher, but its weights differ from "
                                         r"the teacher's$"):
        DegradationRecorder(teacher, other, interval=2)
    traj = _record(teacher)
    with pytest.raises(ValueError, match=r"Their dtypes differ \(module bfloat16, the trajectory's teacher float32\), "
                                         r"but they differ even compared in bfloat16"):
        attach(copy.deepcopy(other).to(torch.bfloat16), traj, "manual")
    teacher.to(torch.bfloat16)
    with torch.no_grad():
        teacher.model.conv_in.bias.add_(0.5)  # cast *and* changed
    with pytest.raises(ValueError, match=r"its weights are bfloat16 now, float32 when recorded, and they differ from "
                                         r"the recorded weights even cast to bfloat16"):
        attach(teacher, traj, "manual")
    with torch.no_grad():
        teacher.model.conv_in.bias.sub_(0.5)
    teacher.to(torch.float64)
    with pytest.raises(ValueError, match=r"cast from float32 \(as recorded\) to float64, a dtype whose fingerprint "
                                         r"the trajectory does not keep"):
        attach(teacher, traj, "manual")


# --------------------------------------------------------------------------- 4. verified in their own precision


def test_a_bf16_attachment_verifies_near_zero_at_its_node_and_clearly_not_at_the_others(tmp_path):
    torch.manual_seed(0)
    teacher = _wrap(tiny_unet2d())
    traj = _record(teacher)  # fp32, small steps: the nodes differ by less than bf16 rounding moves the outputs
    user = copy.deepcopy(teacher).to(torch.bfloat16)
    original = _snapshot(user)
    att = attach(user, traj, FixedInterval(1))
    while True:
        ok, errs = _tells_its_node_apart(att, traj.last)
        assert ok, (att.node, errs)
        # the recorded fp32 outputs are further from any bf16 run than the nodes are from each other
        assert min(probe_error(user, traj.probe, j) for j in range(traj.last + 1)) > max(
            float((traj.probe.outputs[j] - traj.probe.outputs[0]).abs().max()) for j in range(traj.last + 1))
        if att.node == 0:
            break
        att.step()
    assert all(torch.equal(v, original[k]) for k, v in user.state_dict().items())
    att.detach()
    # saved in fp32, loaded onto the bf16 teacher: the recorded precision comes from the manifest
    traj.save(tmp_path / "p")
    loaded = Trajectory.load(tmp_path / "p", user)
    assert loaded.probe_dtype == torch.float32 and loaded.verify() == [0.0] * 4
    att = attach(user, loaded, "manual", start=loaded.last)
    for k in range(loaded.last, -1, -1):
        att.set_node(k)
        ok, errs = _tells_its_node_apart(att, loaded.last)
        assert ok, (k, errs)
    att.detach()
    # in fp32 nothing changes: the recorded outputs are the reference
    att = attach(copy.deepcopy(teacher), traj, "manual", start=traj.last)
    assert att.verify() < 1e-4 and att.verify(0) > 1e-2
    att.detach()
