"""Conditional models end to end: an SDXL-style UNet (text states + added_cond_kwargs) and a
class-conditional net through recording, backtracking with teacher CFG at every node, the probe
(dict conditions saved and verified), export and one-step sampling."""
from __future__ import annotations

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from disback_core import (
    Backtrack,
    Batch,
    CFGDenoiser,
    DiffusersDenoiser,
    FixedInterval,
    KarrasIndexSigma,
    LoraSpec,
    Trajectory,
    export_generator,
    load_generator,
    make_generator,
    record_degradation,
    train_step,
    trainable_copy,
)
from disback_core.adapters import DMD2
from disback_core.denoisers import cat_cond, flatten_cond, map_cond, unflatten_cond

B = 4


def _sdxl_teacher() -> DiffusersDenoiser:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=4, in_channels=2, out_channels=2, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4, addition_embed_type="text_time",
        addition_time_embed_dim=4, projection_class_embeddings_input_dim=8 + 6 * 4)
    sch = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    return DiffusersDenoiser(unet.eval().requires_grad_(False), scheduler=sch)


PROMPTS = torch.randn(6, 3, 16, generator=torch.Generator().manual_seed(1))  # fixed "prompt" embeddings
POOLED = torch.randn(6, 8, generator=torch.Generator().manual_seed(2))
TIME_IDS = torch.tensor([4.0, 4.0, 0.0, 0.0, 4.0, 4.0])
UNCOND = {"encoder_hidden_states": torch.zeros(3, 16),
          "added_cond_kwargs": {"text_embeds": torch.zeros(8), "time_ids": TIME_IDS}}


def _cond(idx: torch.Tensor) -> dict:
    return {"encoder_hidden_states": PROMPTS[idx],
            "added_cond_kwargs": {"text_embeds": POOLED[idx], "time_ids": TIME_IDS.expand(len(idx), 6)}}


def _sampler(g: torch.Generator):
    def sample() -> Batch:
        idx = torch.randint(0, len(PROMPTS), (B,), generator=g)
        return Batch(torch.randn(B, 2, 4, 4, generator=g), _cond(idx))
    return sample


def _dmd2(teacher: DiffusersDenoiser, **kw) -> DMD2:
    """DMD2 with its Karras grids on the diffusers schedule's sigma range (the default grid reaches 0.002)."""
    r = {"sigma_min": teacher.sigma_min * 1.001, "sigma_max": teacher.sigma_max * 0.999}
    return DMD2(KarrasIndexSigma(index_min=20, index_max=980, **r), sigma_data=1.0,
                fake_sigma_sampler=KarrasIndexSigma(**r), **kw)


def test_cond_trees_flatten_and_batch():
    c = _cond(torch.tensor([0, 1]))
    flat = flatten_cond(c)
    assert sorted(flat) == ["cond.added_cond_kwargs.text_embeds", "cond.added_cond_kwargs.time_ids",
                            "cond.encoder_hidden_states"]
    back = unflatten_cond(flat)
    assert torch.equal(back["added_cond_kwargs"]["time_ids"], c["added_cond_kwargs"]["time_ids"])
    assert torch.equal(map_cond(lambda t: t[:1], c)["encoder_hidden_states"], PROMPTS[:1])
    assert cat_cond(c, c)["added_cond_kwargs"]["text_embeds"].shape == (4, 8)
    flat = flatten_cond(torch.ones(2))
    assert list(flat) == ["cond"] and torch.equal(flat["cond"], torch.ones(2)) and unflatten_cond({}) is None


def test_cfg_with_sdxl_dict_conditions_is_the_guided_combination():
    teacher = _sdxl_teacher()
    cfg = CFGDenoiser(teacher, 3.0, UNCOND)
    x, sigma, c = torch.randn(B, 2, 4, 4), torch.full((B,), 2.0), _cond(torch.arange(B))
    u = {"encoder_hidden_states": torch.zeros(B, 3, 16),
         "added_cond_kwargs": {"text_embeds": torch.zeros(B, 8), "time_ids": TIME_IDS.expand(B, 6)}}
    with torch.no_grad():
        d_u, d_c = teacher(x, sigma, u), teacher(x, sigma, c)
        assert torch.allclose(cfg(x, sigma, c), d_u + 3.0 * (d_c - d_u), atol=1e-5)


def test_sdxl_style_disback_records_backtracks_with_cfg_saves_the_dict_probe_and_exports(tmp_path):
    teacher = _sdxl_teacher()
    generator = make_generator(teacher, 10.0)
    g = torch.Generator().manual_seed(0)
    sample = _sampler(g)
    traj = record_degradation(teacher, generator, _dmd2(teacher), sample, steps=6, interval=3,
                              lora=LoraSpec(rank=2), lr=1e-2, probe_size=3, seed=0)
    assert traj.last == 2 and isinstance(traj.probe.cond, dict)
    assert traj.probe.cond["added_cond_kwargs"]["text_embeds"].shape == (3, 8)
    assert max(traj.verify()) < 1e-5  # the nodes under their dict conditions
    traj.save(tmp_path / "path")
    loaded = Trajectory.load(tmp_path / "path", teacher)
    assert torch.equal(loaded.probe.cond["added_cond_kwargs"]["time_ids"], traj.probe.cond["added_cond_kwargs"]["time_ids"])
    assert max(loaded.verify()) < 1e-5
    # backtracking: the guided target at each node is CFG of that node
    method = Backtrack(_dmd2(teacher, critic_steps=1), loaded, FixedInterval(2),
                       guidance=lambda t: CFGDenoiser(t, 2.0, UNCOND))
    fake = method.initial_fake()
    g_opt = torch.optim.SGD(generator.parameters(), 1e-4)
    f_opt = torch.optim.SGD(fake.parameters(), 1e-4)
    x, sigma, c = torch.randn(2, 2, 4, 4), torch.full((2,), 1.5), _cond(torch.tensor([3, 4]))
    nodes_seen = []
    for _ in range(4):
        k = method.node
        with torch.no_grad():
            want = CFGDenoiser(loaded.target(k), 2.0, UNCOND)(x, sigma, c)
            assert torch.allclose(method.target(x, sigma, c), want, atol=1e-6)
        nodes_seen.append(k)
        logs = train_step(method, generator, fake, method.target, g_opt, f_opt, sample)
        assert all(torch.isfinite(torch.tensor(v)) for v in logs.values())
    assert nodes_seen == [1, 1, 0, 0]  # the fake starts at node 2, the target one node before it
    # the trained conditional generator exported and sampled in one step
    z = torch.randn(2, 2, 4, 4)
    with torch.no_grad():
        ref = generator(z, c)
        out = export_generator(generator, tmp_path / "gen")
        assert torch.equal(load_generator(out)(z, c), ref)


def test_class_conditional_probe_keeps_its_labels(tmp_path):
    from disback_core import edm_mlp

    torch.manual_seed(0)
    teacher = edm_mlp(2, sigma_data=1.0, width=16, depth=1, num_classes=3).requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    sample = lambda: Batch(torch.randn(8, 2, generator=g), torch.randint(0, 3, (8,), generator=g))  # noqa: E731
    traj = record_degradation(teacher, make_generator(teacher, 80.0), DMD2(sigma_data=1.0), sample, steps=4,
                              interval=2, lora=LoraSpec(rank=2), lr=1e-2, probe_size=5, seed=0)
    assert traj.probe.cond.dtype == torch.int64 and traj.probe.cond.shape == (5,)
    traj.save(tmp_path / "p")
    loaded = Trajectory.load(tmp_path / "p", teacher)
    assert torch.equal(loaded.probe.cond, traj.probe.cond) and max(loaded.verify()) < 1e-5
    # with another label the outputs differ: the probe really runs the conditional path
    other = trainable_copy(teacher)
    with torch.no_grad():
        p = loaded.probe
        assert not torch.allclose(other(p.x, p.sigma, (p.cond + 1) % 3), p.outputs[0])
