"""Interpolated targets (a real-valued position on the path) and the budget-aware schedules."""
import copy
import math

import pytest
import torch

from disback_core import (AdaptiveGap, Backtrack, Batch, Budgeted, FixedInterval, LinearPath, LoraSpec, NodeCursor,
                          TeacherOnly, attach, edm_mlp, freeze, make_generator, record_degradation, target_at,
                          train_step, write_position)
from disback_core.adapters import DMD2
from disback_core.lora import node_weight


def _teacher(seed=0):
    torch.manual_seed(seed)
    return freeze(edm_mlp(2, sigma_data=1.0, width=32, depth=2))


def _record(teacher, mode="lora", merge=True):
    return record_degradation(teacher, make_generator(teacher, 80.0), DMD2(sigma_data=1.0),
                              lambda: Batch(torch.randn(64, 2)), steps=12, interval=3, lr=1e-2, mode=mode,
                              lora=LoraSpec(rank=4), merge=merge)


def _weights(traj, k):
    return {n: t.detach().clone() for n, t in traj.materialize(k).state_dict().items()}


@pytest.mark.parametrize("mode", ["lora", "svd", "full"])
def test_a_position_between_nodes_is_the_weighted_merge_of_their_weights(mode):
    t = _teacher()
    traj = _record(t, mode)
    for p in (0.25, 1.5, 2.75, 3.9):
        k, w = math.floor(p), p - math.floor(p)
        lo, hi = _weights(traj, k), _weights(traj, k + 1)
        out = {n: torch.empty_like(v) for n, v in lo.items() if n in traj.layers()}
        write_position(traj, out, p)
        for n, v in out.items():
            torch.testing.assert_close(v, (1 - w) * lo[n] + w * hi[n], rtol=0, atol=1e-6)
        # and the running target computes with exactly those weights
        work = target_at(traj, p)
        for n, v in out.items():
            assert torch.equal(work.state_dict()[n], v)


def test_a_lora_position_merges_the_two_deltas():
    """W + scale ((1 - w) B_k A_k + w B_{k+1} A_{k+1}), from the stored factors."""
    t = _teacher()
    traj = _record(t, "lora")
    base = t.state_dict()
    scale = traj.lora.scale
    name = traj.layers()[0]
    layer = name[: -len(".weight")]
    a_key, b_key = layer + ".lora_A.weight", layer + ".lora_B.weight"
    delta = [(n[b_key].double() @ n[a_key].double()).reshape(base[name].shape) for n in traj.nodes[1:3]]
    expect = base[name].double() + scale * (0.7 * delta[0] + 0.3 * delta[1])
    out = {name: torch.empty_like(base[name])}
    write_position(traj, out, 2.3, names=[name])  # nodes 2 (weight 0.7) and 3 (weight 0.3)
    torch.testing.assert_close(out[name].double(), expect, rtol=0, atol=1e-6)
    assert torch.equal(node_weight(base[name], traj.nodes[1], layer, scale), _weights(traj, 2)[name])


def test_integer_positions_are_the_nodes_bit_for_bit():
    t = _teacher()
    traj = _record(t)
    x, s = torch.randn(16, 2), torch.rand(16) * 3 + 0.1
    with torch.no_grad():
        ref = [traj.materialize(k)(x, s) for k in range(traj.last + 1)]
        target_at(traj, 1.5)  # leave the working copy between nodes
        for k in range(traj.last + 1):
            assert torch.equal(target_at(traj, float(k))(x, s), ref[k])
        assert target_at(traj, 0.0) is t


def test_bad_positions_and_unmerged_targets_are_refused():
    t = _teacher()
    traj = _record(t)
    for bad in (-0.1, traj.last + 0.5, float("nan")):
        with pytest.raises(ValueError, match="position must be in"):
            target_at(traj, bad)
    with pytest.raises(TypeError, match="position must be a number"):
        target_at(traj, "1.5")
    unmerged = _record(t, merge=False)
    with pytest.raises(ValueError, match="merged LoRA targets"):
        target_at(unmerged, 1.5)


def test_linear_path_moves_continuously_and_reaches_the_teacher_on_budget():
    cur = NodeCursor(4, LinearPath(100, share=0.2))  # 20 updates from node 4 to the teacher
    positions = [cur.step() for _ in range(30)]
    assert positions[0] == pytest.approx(4 * (1 - 1 / 20)) and positions[9] == pytest.approx(2.0)
    assert positions[19] == 0.0 and positions[20:] == [None] * 10
    assert cur.position == 0.0 and cur.node == 0
    # a switch is recorded when ceil(position) changes (3.8 still mixes in node 4)
    assert cur.switches == [(0, 4), (5, 3), (10, 2), (15, 1), (20, 0)]
    every = NodeCursor(4, LinearPath(100, share=0.2, every=5))
    moves = [every.step() for _ in range(20)]
    assert [m for m in moves if m is not None] == [3.0, 2.0, 1.0, 0.0]


def test_budgeted_cannot_stall_when_the_gap_never_falls():
    """A constant score gap never satisfies AdaptiveGap; the deadlines still move the target."""
    total, share = 200, 0.25
    cur = NodeCursor(4, Budgeted(total, share))
    for _ in range(total):
        cur.step(stat=1.0)
    assert cur.node == 0
    deadlines = [math.ceil(j * share * total / 4) for j in (1, 2, 3, 4)]
    assert [s for s, _ in cur.switches[1:]] == deadlines == [13, 25, 38, 50]
    # the unbudgeted rule stalls on the first node for its max_steps
    stall = NodeCursor(4, AdaptiveGap(max_steps=1000))
    for _ in range(total):
        stall.step(stat=1.0)
    assert stall.node == 4


def test_budgeted_moves_early_when_the_gap_closes():
    cur = NodeCursor(3, Budgeted(1000, 0.3, AdaptiveGap(ratio=0.5, warmup=2, decay=0.0, min_steps=3)))
    gap = 1.0
    for _ in range(40):
        cur.step(stat=gap)
        gap *= 0.7  # halves within a few updates of every switch (warmup resets the reference)
        if cur.switches[-1][0] == cur.generator_steps:
            gap = 1.0
    assert cur.node == 0 and cur.switches[-1][0] < 30 < 100  # far before the first deadline (100)
    state = cur.state_dict()
    clone = NodeCursor(3, Budgeted(1000, 0.3, AdaptiveGap(ratio=0.5, warmup=2, decay=0.0, min_steps=3)))
    clone.load_state_dict(copy.deepcopy(state))
    assert clone.state_dict() == state


def test_schedule_arguments_are_checked():
    for bad in (dict(total_steps=0), dict(total_steps=1.5), dict(total_steps=10, share=1.0)):
        with pytest.raises(ValueError, match="total_steps|share"):
            LinearPath(**bad)
        with pytest.raises(ValueError, match="total_steps|share"):
            Budgeted(**bad)
    with pytest.raises(ValueError, match="every"):
        LinearPath(10, every=0)
    with pytest.raises(TypeError, match="rule must be a schedule"):
        Budgeted(10, rule=object())
    with pytest.raises(RuntimeError, match="NodeCursor"):
        Budgeted(10).advance(1, 1.0)
    assert NodeCursor(2, TeacherOnly()).step() is None


def test_backtrack_and_attach_follow_the_interpolated_position_and_resume():
    t = _teacher()
    traj = _record(t)
    method = Backtrack(DMD2(sigma_data=1.0, critic_steps=1), traj, LinearPath(8, share=0.5))
    gen, fake = make_generator(t, 80.0), method.initial_fake()
    g_opt, f_opt = torch.optim.Adam(gen.parameters(), 1e-3), torch.optim.Adam(fake.parameters(), 1e-3)
    x, s = torch.randn(16, 2), torch.rand(16) * 3 + 0.1
    for i in range(1, 5):
        train_step(method, gen, fake, method.target, g_opt, f_opt, lambda: Batch(torch.randn(32, 2)))
        assert method.position == pytest.approx(3 * (1 - i / 4))
        with torch.no_grad():
            expect = copy.deepcopy(t)
            write_position(traj, dict(expect.state_dict(keep_vars=True)), method.position)
            assert torch.equal(method.target(x, s), expect(x, s))
    assert method.node == 0 and [n for _, n in method.switches] == [3, 2, 1, 0]
    # an attachment writes the same weights into the user's own module, and resumes between nodes
    user = copy.deepcopy(t)
    att = attach(user, traj, LinearPath(8, share=0.5))
    att.step()
    assert att.position == pytest.approx(2.25) and att.node == 3
    with torch.no_grad():
        assert torch.equal(user(x, s), target_at(traj, 2.25)(x, s))
    state = att.state_dict()
    att.detach()
    again = attach(user, traj, LinearPath(8, share=0.5))
    again.load_state_dict(state)
    with torch.no_grad():
        assert again.position == 2.25 and torch.equal(user(x, s), target_at(traj, 2.25)(x, s))
    again.detach()
    assert all(torch.equal(a, b) for a, b in zip(user.state_dict().values(), t.state_dict().values()))
    with pytest.raises(ValueError, match="does not lie on node"):
        NodeCursor(3, FixedInterval(1)).load_state_dict({**state, "node": 1})
