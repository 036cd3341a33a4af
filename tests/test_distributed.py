"""DisBack under DDP: 2 CPU processes on the gloo backend (torch.multiprocessing spawn)."""
import copy
import hashlib
import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from disback_core import Backtrack, Batch, FixedInterval, LoraSpec, edm_mlp, freeze, make_generator, record_degradation
from disback_core.adapters import DMD2
from disback_core.distributed import (
    allreduce_grads,
    any_rank,
    check_same_on_all_ranks,
    gather_strings,
    max_over_ranks,
    share_trajectory,
)

WORLD = 2


def _nodes_hash(traj):
    h = hashlib.sha256()
    for node in traj.nodes:
        for k in sorted(node):
            h.update(k.encode() + node[k].numpy().tobytes())
    return h.hexdigest()


def _worker(rank, tmp):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        teacher = freeze(edm_mlp(2, sigma_data=1.0, width=32, depth=2))
        method = DMD2(sigma_data=1.0)
        gen = make_generator(teacher, 80.0)
        g0 = copy.deepcopy(gen).requires_grad_(False)
        data = torch.Generator().manual_seed(100 + rank)  # each rank its own data
        sample = lambda: Batch(torch.randn(32, 2, generator=data))  # noqa: E731

        # Degradation Recording with DDP-averaged gradients; rank 0 writes, every rank loads.
        traj = record_degradation(teacher, g0, method, sample, steps=8, nodes=4, lr=1e-2, lora=LoraSpec(rank=2),
                                  seed=rank, wrap=DDP)
        same_nodes = len(set(gather_strings(_nodes_hash(traj)))) == 1
        shared = share_trajectory(traj if rank == 0 else None, tmp / "path", teacher)
        verify = max(shared.verify())

        # Backtracking: DDP generator and fake score; the generator loss reads the fake unwrapped.
        bt = Backtrack(method, shared, FixedInterval(2))
        fake = bt.initial_fake()
        gen_ddp, fake_ddp = DDP(gen), DDP(fake)
        go = torch.optim.Adam(gen.parameters(), 1e-3)
        fo = torch.optim.Adam(fake.parameters(), 1e-3)
        same = []
        for _ in range(8):
            with torch.no_grad():
                x = gen(sample().z)
            fo.zero_grad()
            bt.fake_score_loss(x, fake_ddp)["loss"].backward()
            fo.step()
            go.zero_grad()
            out = bt.generator_loss(gen_ddp(sample().z), bt.target, fake)
            out["loss"].backward(inputs=list(gen.parameters()))
            go.step()
            bt.on_generator_step()
            same.append(check_same_on_all_ranks(gen, fake))

        # Gradients equal the single-process gradient on the concatenated batch.
        torch.manual_seed(1)
        g1 = make_generator(teacher, 80.0)
        ref = copy.deepcopy(g1)
        zs = [torch.randn(16, 2, generator=torch.Generator().manual_seed(200 + r)) for r in range(WORLD)]
        ddp1 = DDP(g1)
        torch.manual_seed(300 + rank)
        method.generator_loss(ddp1(zs[rank]), teacher, fake)["loss"].backward()
        diff = 0.0
        if rank == 0:
            for r in range(WORLD):  # the mean loss over both halves, with each rank's noise
                torch.manual_seed(300 + r)
                (method.generator_loss(ref(zs[r]), teacher, fake)["loss"] / WORLD).backward()
            diff = max(float((a.grad - b.grad).abs().max()) for a, b in zip(g1.parameters(), ref.parameters()))
            scale = max(float(b.grad.abs().max()) for b in ref.parameters())

        # allreduce_grads averages parameters no DDP wrapper owns.
        p = torch.nn.Parameter(torch.zeros(3))
        p.grad = torch.full((3,), float(rank))
        allreduce_grads([p])
        any_flags = [any_rank(rank == 1), any_rank(False)]  # one rank's bad loss: every rank skips
        maxima = max_over_ranks([float(rank), -float(rank), 2.5]) + max_over_ranks([rank, -rank], torch.int64)
        if rank == 0:
            (tmp / "result.json").write_text(json.dumps({
                "same_nodes": same_nodes, "verify": verify, "same": same, "switches": bt.switches,
                "grad_diff": diff, "grad_scale": scale, "allreduce": p.grad.tolist(),
                "any_rank": any_flags, "maxima": maxima}))
    finally:
        dist.destroy_process_group()


def test_ddp_recording_backtracking_and_gradients(tmp_path):
    mp.spawn(_worker, args=(tmp_path,), nprocs=WORLD, join=True)
    r = json.loads((tmp_path / "result.json").read_text())
    print("ddp", r)
    assert r["same_nodes"]  # DDP averaged the degrading score's gradients: one path on every rank
    assert r["verify"] < 1e-5  # every rank's loaded path reproduces rank 0's recorded probe outputs
    assert all(r["same"]) and len(r["same"]) == 8  # generator and fake identical on both ranks after every step
    assert [n for _, n in r["switches"]] == [3, 2, 1, 0]
    assert r["grad_diff"] <= 1e-6 * max(1.0, r["grad_scale"]), r
    assert r["allreduce"] == [0.5, 0.5, 0.5] and r["any_rank"] == [True, False]
    assert r["maxima"] == [1.0, 0.0, 2.5, 1, 0]  # the max over 2 ranks, and (negated) the min


def _fsdp_worker(rank, tmp):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=WORLD)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (WORLD,))
        torch.manual_seed(0)
        teacher = freeze(edm_mlp(2, sigma_data=1.0, width=32, depth=2))
        method = DMD2(sigma_data=1.0)
        traj = record_degradation(teacher, make_generator(teacher, 80.0).requires_grad_(False), method,
                                  lambda: Batch(torch.randn(32, 2)), steps=4, nodes=2, lr=1e-2, lora=LoraSpec(rank=2),
                                  seed=0)
        bt = Backtrack(method, traj, FixedInterval(1))
        fake = bt.initial_fake().requires_grad_(False)
        gen = make_generator(teacher, 80.0)
        ref = copy.deepcopy(gen)
        for block in gen.denoiser.net.blocks:  # shard the generator (FSDP2); teacher and path stay whole
            fully_shard(block, mesh=mesh)
        fully_shard(gen, mesh=mesh)
        zs = [torch.randn(16, 2, generator=torch.Generator().manual_seed(200 + r)) for r in range(WORLD)]
        torch.manual_seed(300 + rank)
        bt.generator_loss(gen(zs[rank]), bt.target, fake)["loss"].backward()
        for r in range(WORLD):
            torch.manual_seed(300 + r)
            (bt.generator_loss(ref(zs[r]), bt.target, fake)["loss"] / WORLD).backward()
        diff = max(float((a.grad.full_tensor() - b.grad).abs().max()) for a, b in zip(gen.parameters(), ref.parameters()))
        if rank == 0:
            (tmp / "fsdp.json").write_text(json.dumps({"grad_diff": diff}))
    finally:
        dist.destroy_process_group()


def test_fsdp2_sharded_generator_gradients_match(tmp_path):
    mp.spawn(_fsdp_worker, args=(tmp_path,), nprocs=WORLD, join=True)
    r = json.loads((tmp_path / "fsdp.json").read_text())
    print("fsdp2", r)
    assert r["grad_diff"] <= 1e-6, r


# ---------------------------------------------------------------- DegradationRecorder in a user's own loop

REC_STEPS, REC_NODES, BATCH = 6, 3, 16


def _batches(r):
    """Rank r's data for every step: clean samples, noise and sigmas (a fixed stream per rank)."""
    g = torch.Generator().manual_seed(100 + r)
    out = []
    for _ in range(REC_STEPS):
        x0 = torch.randn(BATCH, 2, generator=g) * 0.5 + 1.0
        out.append((x0, torch.randn(BATCH, 2, generator=g), torch.exp(torch.randn(BATCH, generator=g) - 0.5)))
    return out


def _dsm(net, batch):
    x0, noise, sigma = batch
    return ((net(x0 + sigma[:, None] * noise, sigma, None) - x0) ** 2).mean()


def _flat(nodes):
    return torch.cat([n[k].reshape(-1) for n in nodes for k in sorted(n)])


def _recorder_worker(rank, tmp):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=WORLD)
    from disback_core import DegradationRecorder, FixedInterval, Trajectory, attach

    try:
        torch.manual_seed(0)
        teacher = freeze(edm_mlp(2, sigma_data=1.0, width=32, depth=2))
        mine = _batches(rank)
        lora = LoraSpec(rank=2, target_modules=("inp", "fc1", "fc2"))  # named: no diffusers import for defaults
        kw = dict(steps=REC_STEPS, nodes=REC_NODES, lr=1e-2, lora=lora, probe=mine[0][0][:8])
        out = {}

        def run(rec, loss_module=None, own_optimizer=False):
            net = loss_module or rec.wrapped
            opt = torch.optim.Adam(rec.parameters(), lr=rec.lr) if own_optimizer else None
            grads = None
            for b in mine:
                if opt is None:
                    rec.update(_dsm(net, b))
                else:  # the user's own optimizer, then rec.step(): averaged by the optimizer's step pre-hook
                    opt.zero_grad(set_to_none=True)
                    _dsm(net, b).backward()
                    opt.step()
                    rec.step()
                if grads is None:  # the first step's gradient, as the optimizer used it
                    grads = torch.cat([p.grad.reshape(-1) for p in rec.parameters()]).clone()
            return grads, rec.trajectory()

        # A: the recorder averages (no DDP); each rank starts its LoRA slot from its own RNG (rank 0's wins).
        torch.manual_seed(rank)
        rec_a = DegradationRecorder(teacher, copy.deepcopy(teacher), **kw)
        averaging = rec_a.averaging()
        grads_a, traj_a = run(rec_a)
        nodes_a = _flat(traj_a.nodes)
        out["same_nodes"] = len(set(gather_strings(_nodes_hash(traj_a)))) == 1
        out["same_grads"] = len(set(gather_strings(hashlib.sha256(grads_a.numpy().tobytes()).hexdigest()))) == 1

        # B: wrap=DDP (the recorder wraps rec.module after the slot is on it); C: the user's own DDP(rec.module)
        # built after the recorder, with average_grads=False; E: the user's own optimizer and rec.step().
        torch.manual_seed(rank)
        rec_b = DegradationRecorder(teacher, copy.deepcopy(teacher), wrap=DDP, **kw)
        out["b_averaging"] = rec_b.averaging()
        _, traj_b = run(rec_b)
        torch.manual_seed(rank)
        rec_c = DegradationRecorder(teacher, copy.deepcopy(teacher), average_grads=False, **kw)
        _, traj_c = run(rec_c, loss_module=DDP(rec_c.module))
        torch.manual_seed(rank)
        rec_e = DegradationRecorder(teacher, copy.deepcopy(teacher), **kw)
        grads_e, traj_e = run(rec_e, own_optimizer=True)
        out["ddp_diff"] = [float((_flat(t.nodes) - nodes_a).abs().max()) for t in (traj_b, traj_c, traj_e)]
        out["own_optimizer_grad_diff"] = float((grads_e - grads_a).abs().max())

        # Full mode: a module that is already a DDP wrapper (DDP averages) gives the recorder-averaged path.
        fkw = {**kw, "mode": "full", "lora": None}
        rec_f1 = DegradationRecorder(teacher, DDP(copy.deepcopy(teacher).requires_grad_(True)), **fkw)
        out["full_ddp_averaging"] = rec_f1.averaging()
        _, traj_f1 = run(rec_f1)
        _, traj_f2 = run(DegradationRecorder(teacher, copy.deepcopy(teacher).requires_grad_(True), **fkw))
        out["full_diff"] = float((_flat(traj_f1.nodes) - _flat(traj_f2.nodes)).abs().max())
        out["full_same"] = len(set(gather_strings(_nodes_hash(traj_f1)))) == 1
        try:  # a DDP built before the LoRA slot exists is refused, with the order to follow
            DegradationRecorder(teacher, DDP(copy.deepcopy(teacher).requires_grad_(True)), **kw)
            out["lora_ddp_refused"] = ""
        except ValueError as e:
            out["lora_ddp_refused"] = str(e)

        # Save: rank 0 writes, every rank loads it and checks its own nodes and its own probe outputs.
        folder = rec_a.save(tmp / "path")
        loaded = Trajectory.load(folder, teacher)
        out["verify"] = max(loaded.verify())
        out["own_probe_saved"] = torch.equal(loaded.probe.x, traj_a.probe.x)  # True on rank 0 only

        # Un-averaged: each rank records its own path; save and attach refuse on every rank.
        torch.manual_seed(rank)
        rec_u = DegradationRecorder(teacher, copy.deepcopy(teacher), average_grads=False, **kw)
        _, traj_u = run(rec_u)
        out["unaveraged_same"] = len(set(gather_strings(_nodes_hash(traj_u)))) == 1
        try:
            rec_u.save(tmp / "bad")
            out["save_refused"] = ""
        except RuntimeError as e:
            out["save_refused"] = str(e)
        try:
            attach(copy.deepcopy(teacher), traj_u, FixedInterval(1))
            out["attach_refused"] = ""
        except RuntimeError as e:
            out["attach_refused"] = str(e)
        att = attach(copy.deepcopy(teacher), traj_a, FixedInterval(1))  # one path (probes differ per rank)
        out["attach_node"] = att.node
        att.detach()

        # Rank 0: a single-process reference on the concatenated batch (both ranks' data), from rank 0's slot.
        if rank == 0:
            torch.manual_seed(0)
            rec_r = DegradationRecorder(teacher, copy.deepcopy(teacher), average_grads=False, **kw)
            theirs = _batches(1)
            grads_r = None
            for b0, b1 in zip(mine, theirs):
                rec_r.update(_dsm(rec_r.module, tuple(torch.cat([a, b]) for a, b in zip(b0, b1))))
                if grads_r is None:
                    grads_r = torch.cat([p.grad.reshape(-1) for p in rec_r.parameters()]).clone()
            traj_r = rec_r.trajectory()
            out["ref_grad_diff"] = float((grads_r - grads_a).abs().max())
            out["ref_grad_scale"] = float(grads_r.abs().max())
            out["ref_node_diff"] = float((_flat(traj_r.nodes) - nodes_a).abs().max())
            out["unaveraged_diff"] = float((_flat(traj_u.nodes) - nodes_a).abs().max())
        out["averaging"] = averaging
        (tmp / f"rec{rank}.json").write_text(json.dumps(out))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def recorder_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("recorder")
    mp.spawn(_recorder_worker, args=(tmp,), nprocs=WORLD, join=True)
    return [json.loads((tmp / f"rec{r}.json").read_text()) for r in range(WORLD)]


def test_recorder_averages_gradients_over_ranks(recorder_results):
    r0, r1 = recorder_results
    print("recorder", r0)
    assert r0["averaging"] and r1["averaging"]  # automatic under a process group of 2 ranks, no DDP
    assert r0["same_nodes"] and r0["same_grads"]  # one path on both ranks although each saw its own data
    # ... the path of one process on the concatenated batch (both ranks' data), from rank 0's LoRA slot
    assert r0["ref_grad_diff"] <= 1e-6 * max(1.0, r0["ref_grad_scale"]), r0
    assert r0["ref_node_diff"] <= 1e-5, r0
    assert r0["own_optimizer_grad_diff"] == 0.0  # the user's own optimizer: averaged by its step pre-hook
    assert not r0["unaveraged_same"] and r0["unaveraged_diff"] > 1e-3  # averaging off: each rank its own path


def test_recorder_ddp_routes_give_the_same_path(recorder_results):
    r0, r1 = recorder_results
    assert not r0["b_averaging"] and not r0["full_ddp_averaging"]  # DDP averages: the recorder does not
    assert max(r0["ddp_diff"] + r1["ddp_diff"]) <= 1e-6, (r0["ddp_diff"], r1["ddp_diff"])  # wrap=DDP, DDP(rec.module), own optimizer
    assert r0["full_same"] and r0["full_diff"] <= 1e-6 and r1["full_diff"] <= 1e-6  # a DDP module in "full" mode
    assert "built before the recorder put its LoRA slot" in r0["lora_ddp_refused"]
    assert "DDP(rec.module) after the recorder" in r0["lora_ddp_refused"]


def test_recorder_save_is_checked_on_every_rank(recorder_results):
    r0, r1 = recorder_results
    assert r0["verify"] < 1e-5 and r1["verify"] < 1e-5  # every rank loads the written path and it verifies
    assert r0["own_probe_saved"] and not r1["own_probe_saved"]  # rank 1 checked it on its own probe
    for r in (r0, r1):  # un-averaged paths: a clear error on every rank, naming the ranks
        assert "is not the one every rank recorded" in r["save_refused"], r["save_refused"]
        assert "rank 1: its node 1 differs from rank 0's" in r["save_refused"]


def test_attach_refuses_ranks_holding_different_paths(recorder_results):
    r0, r1 = recorder_results
    for r in (r0, r1):
        assert "attach: ranks [1] hold another trajectory than rank 0" in r["attach_refused"], r["attach_refused"]
        assert r["attach_node"] == REC_NODES - 1  # the shared path attaches on every rank


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_wrap_dmd2_distributed_example_under_torchrun(tmp_path):
    """The DMD2 loop under ``torchrun --nproc_per_node 2`` (gloo): one recorded path shared and
    checked on both ranks, every switch, node 0 bit-exact, both ranks' models identical; 10 lines change."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    examples = Path(__file__).resolve().parents[1] / "examples"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(examples / "wrap_dmd2_distributed.py"), "--iterations", "25", "--record-steps", "10",
           "--teacher-steps", "20", "--out", str(tmp_path / "path")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    r = json.loads(line.removeprefix("RESULT "))
    print("example", r)
    assert r["world_size"] == 2 and r["nodes"] == 5
    assert [n for _, n in r["switches"]] == [4, 3, 2, 1, 0]
    assert r["node0_exact"] and r["same_on_all_ranks"] and r["max_switch_error"] < 1e-5
    assert (tmp_path / "path" / "manifest.json").is_file()

    sys.path.insert(0, str(examples))
    try:
        from show_diff import changed_lines, load_example

        mod = load_example("wrap_dmd2_distributed")
        _, added, _ = changed_lines(mod.PLAIN, mod.DISBACK)
    finally:
        sys.path.remove(str(examples))
    assert added <= 10
