"""DisBack under DDP: 2 CPU processes on the gloo backend (torch.multiprocessing spawn)."""
import copy
import hashlib
import json

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from disback_core import Backtrack, Batch, FixedInterval, LoraSpec, edm_mlp, freeze, make_generator, record_degradation
from disback_core.adapters import DMD2
from disback_core.distributed import allreduce_grads, any_rank, check_same_on_all_ranks, gather_strings, share_trajectory

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
        if rank == 0:
            (tmp / "result.json").write_text(json.dumps({
                "same_nodes": same_nodes, "verify": verify, "same": same, "switches": bt.switches,
                "grad_diff": diff, "grad_scale": scale, "allreduce": p.grad.tolist(),
                "any_rank": any_flags}))
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
