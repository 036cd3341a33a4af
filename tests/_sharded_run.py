"""A tiny run for the sharded-state tests: the same objects plain (world size 1) or FSDP2-sharded
(``fully_shard`` on CPU over a DeviceMesh), a training step whose data depends only on the step,
and the whole state gathered to full tensors for bit-exact comparisons. Used by
``tests/test_sharded_state.py``, ``tests/_sharded_kill.py`` and ``benchmarks/kill_sharded.py``."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

LR, BETAS = 1e-2, (0.9, 0.99)
CFG: dict[str, Any] = {"run": "sharded-test", "lr": LR, "betas": BETAS}


class Net(nn.Module):
    """Three layers and a buffer; ``c`` has one output row, so its shard on rank 1 of 2 is empty."""

    def __init__(self, width: int = 16, pad: int = 0):
        super().__init__()
        self.a = nn.Linear(6, width)
        self.b = nn.Linear(width, 5)
        self.c = nn.Linear(5, 1)
        self.pad: nn.Linear | None = nn.Linear(pad, pad, bias=False) if pad else None  # a save takes measurable time
        self.count: Tensor
        self.register_buffer("count", torch.arange(3.0))

    def forward(self, x: Tensor) -> Tensor:
        y = self.c(torch.tanh(self.b(torch.tanh(self.a(x))))) + 0.01 * self.count.sum()
        pad = self.pad
        if pad is not None:
            y = y + 1e-3 * pad(x.new_ones(1, pad.in_features)).mean()
        return y


def build(seed: int = 0, width: int = 16, mesh: Any = None, pad: int = 0, device: str = "cpu") -> dict[str, Any]:
    """The run's objects; with ``mesh``, ``net`` is sharded with FSDP2 (``head`` stays plain,
    replicated: every rank computes the same gradients for it)."""
    torch.manual_seed(seed)
    net = Net(width, pad).to(device)
    head = nn.Linear(1, 2).to(device)
    if mesh is not None:
        from torch.distributed.fsdp import fully_shard

        blocks: list[nn.Module] = [net.a, net.b, net.c, *([net.pad] if net.pad is not None else [])]
        for block in blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(net, mesh=mesh)
    adam = torch.optim.Adam(net.parameters(), lr=LR, betas=BETAS)
    sgd = torch.optim.SGD(head.parameters(), lr=1e-2, momentum=0.9)
    return {
        "modules": {"net": net, "head": head},
        "optimizers": {"adam": adam, "sgd": sgd},
        "schedulers": {"lr": torch.optim.lr_scheduler.StepLR(adam, step_size=2, gamma=0.5)},
    }


def kw(o: dict[str, Any]) -> dict[str, Any]:
    return {k: o[k] for k in ("modules", "optimizers", "schedulers")}


def train_step(o: dict[str, Any], k: int) -> None:
    """Step ``k``: its data depends only on ``k`` (the same on every rank and at every world size)."""
    net, head = o["modules"]["net"], o["modules"]["head"]
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(1000 + k)).to(o["modules"]["head"].weight.device)
    y = net(x)
    loss = (y - 0.5).pow(2).mean() + head(y).pow(2).mean()
    for opt in o["optimizers"].values():
        opt.zero_grad(set_to_none=True)
    loss.backward()
    for opt in o["optimizers"].values():
        opt.step()
    o["schedulers"]["lr"].step()


def _full(t: Any) -> Any:
    if hasattr(t, "full_tensor"):
        return t.full_tensor().detach().clone()  # a collective: every rank calls it
    return t.detach().clone() if isinstance(t, Tensor) else t


def full_state(o: dict[str, Any]) -> dict[str, Tensor]:
    """Every tensor of the state as a full tensor (weights, buffers, optimizer states, learning rates)."""
    out: dict[str, Tensor] = {}
    for name, m in o["modules"].items():
        for k, v in m.state_dict().items():
            out[f"{name}.{k}"] = _full(v)
    for name, opt in o["optimizers"].items():
        sd = opt.state_dict()
        for i, st in sorted(sd["state"].items()):
            for k, v in sorted(st.items()):
                out[f"{name}.{i}.{k}"] = _full(v) if isinstance(v, Tensor) else torch.tensor(v)
        for j, g in enumerate(sd["param_groups"]):
            out[f"{name}.group{j}.lr"] = torch.tensor(float(g["lr"]), dtype=torch.float64)
    return out


def differences(a: dict[str, Tensor], b: dict[str, Tensor]) -> list[str]:
    """Keys where two full states differ (names, dtypes, shapes or any bit)."""
    out = sorted(set(a) ^ set(b))
    for k in sorted(set(a) & set(b)):
        x, y = a[k], b[k]
        if (
            x.dtype != y.dtype
            or x.shape != y.shape
            or not torch.equal(x.view(-1).view(torch.uint8), y.view(-1).view(torch.uint8))
        ):
            out.append(k)
    return out
