"""Every ```python block of README.md runs as written.

The blocks are read from README.md on each run and executed unmodified (``exec``), in README order, with
the working directory in ``tmp_path`` (what they save goes there). A block refers to the user's own
objects (``my_teacher``, ``labels()``, ``iterations``, ``noise``, ...): the block's setup below defines
exactly those, as tiny versions, and nothing the library or an import should provide. Blocks that
continue an earlier one (the DisBack block after the base loop) share its namespace: a *chain*.

- A block that uses a name neither it, its chain nor its setup defines fails, naming the block's first
  line and the name.
- A block no setup recognises fails: "new README block: add a setup for it in tests/test_readme.py".
"""

from __future__ import annotations

import copy
import re
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)


@dataclass
class Block:
    index: int  # 1-based, among the README's python blocks
    line: int  # README line of the block's first code line
    code: str

    @property
    def first_line(self) -> str:
        return next((ln.strip() for ln in self.code.splitlines() if ln.strip()), "")

    def __str__(self) -> str:
        return f"README python block {self.index} (line {self.line}: {self.first_line!r})"


def readme_blocks() -> list[Block]:
    """The ```python blocks of README.md, in order (read afresh on every call)."""
    text = README.read_text(encoding="utf-8")
    return [Block(i, text.count("\n", 0, m.start(1)) + 1, m.group(1)) for i, m in enumerate(BLOCK.finditer(text), 1)]


# --------------------------------------------------------------------------- the user's own objects, tiny


class TinyNet(nn.Module):
    """A raw EDM network ``F(x_in, c_noise, class_labels)`` of per-pixel linear layers (any image size,
    cheap enough for the README's 1000 recording steps); ``EDMPrecond`` makes it a denoiser."""

    def __init__(self, channels: int = 3, width: int = 4, num_classes: int = 10):
        super().__init__()
        self.inp = nn.Linear(channels, width)
        self.emb = nn.Embedding(num_classes, width)
        self.out = nn.Linear(width, channels)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, class_labels: Any = None) -> torch.Tensor:
        h = self.inp(x.movedim(1, -1)) + c_noise.reshape(-1, 1, 1, 1)
        if class_labels is not None:
            h = h + self.emb(class_labels)[:, None, None, :]
        return self.out(nn.functional.silu(h)).movedim(-1, 1)


def _batch_size(block: Block) -> int:
    m = re.search(r"torch\.randn\((\d+),", block.code)
    if m is None:
        pytest.fail(f"{block}: no `torch.randn(batch, ...)` to size labels() by; update its setup")
    return int(m.group(1))


def setup_base_loop(ns: dict[str, Any], block: Block) -> dict[str, Any]:
    from disback_core import EDMPrecond

    n = _batch_size(block)
    return {
        "my_teacher": EDMPrecond(TinyNet()),  # class-conditional EDM denoiser D(x, sigma, labels)
        "labels": lambda: torch.randint(0, 10, (n,)),
        "iterations": 2,
    }


def setup_disback(ns: dict[str, Any], block: Block) -> dict[str, Any]:
    return {}  # continues the base loop: teacher, generator, method, next_batch, g_opt, iterations


def setup_by_hand(ns: dict[str, Any], block: Block) -> dict[str, Any]:
    return {
        "z": torch.randn(4, 3, 32, 32),
        "cond": torch.randint(0, 10, (4,)),
        "target": ns.get("teacher"),  # the plain loop's target
        "real_images": torch.randn(4, 3, 32, 32),
        "real_labels": torch.randint(0, 10, (4,)),
    }


def setup_attach(ns: dict[str, Any], block: Block) -> dict[str, Any]:
    from conftest import CustomEDM  # NVlabs-EDM-style layers, called net(x, sigma, class_labels)

    from disback_core import freeze

    real_unet = freeze(CustomEDM(channels=3, width=4))  # DMD2's frozen teacher, the module its code calls

    def my_fake_score_loss(net: nn.Module, x0: torch.Tensor) -> torch.Tensor:  # the user's DSM loss
        sigma = (torch.randn(x0.shape[0]) * 1.2 - 1.2).exp()
        x_t = x0 + sigma[:, None, None, None] * torch.randn_like(x0)
        return ((net(x_t, sigma, None) - x0) ** 2).mean()

    return {
        "teacher": real_unet,
        "real_unet": real_unet,
        "fake_unet": copy.deepcopy(real_unet).requires_grad_(True),
        "fake_lr": 1e-4,
        "generator": freeze(copy.deepcopy(real_unet)),  # G0, initialised from the teacher
        "noise": 80.0 * torch.randn(4, 3, 8, 8),
        "sigma": torch.full((4,), 80.0),
        "labels": None,
        "my_fake_score_loss": my_fake_score_loss,
    }


def setup_export(ns: dict[str, Any], block: Block) -> dict[str, Any]:
    from conftest import tiny_unet2d_condition
    from diffusers import DDPMScheduler

    from disback_core import DiffusersDenoiser, freeze, make_generator

    unet = tiny_unet2d_condition(in_channels=4, out_channels=4)  # latents, text states of width 12
    teacher = freeze(DiffusersDenoiser(unet, scheduler=DDPMScheduler()))
    return {"generator": make_generator(teacher, sigma_init=80.0), "cond": torch.randn(16, 5, 12)}


def setup_flow(ns: dict[str, Any], block: Block) -> dict[str, Any]:
    return {}  # self-contained: build_model("tiny-sd3")


def setup_fewstep(ns: dict[str, Any], block: Block) -> dict[str, Any]:
    return {"z": torch.randn(2, 3, 32, 32), "cond": torch.randint(0, 10, (2,))}  # teacher: the base loop's


@dataclass
class Setup:
    marker: str  # a line (or part of one) only this README block has
    chain: str  # blocks of one chain share a namespace, in README order
    fresh: bool  # starts its chain's namespace (otherwise continues it)
    make: Callable[[dict[str, Any], Block], dict[str, Any]]


SETUPS = [
    Setup("generator = make_generator(teacher, sigma_init=80.0)", "loop", True, setup_base_loop),
    Setup("traj = record_degradation(teacher, generator, method, next_batch", "loop", False, setup_disback),
    Setup("out = method.generator_loss(x, target, fake, cond)", "loop", False, setup_by_hand),
    Setup("rec = DegradationRecorder(teacher, fake_unet", "attach", True, setup_attach),
    Setup('export_generator(generator, "out/onestep"', "export", True, setup_export),
    Setup("teacher = freeze(FlowMatchDenoiser(transformer", "flow", True, setup_flow),
    Setup("generator = make_fewstep_generator(teacher", "loop", False, setup_fewstep),
]
CHAINS = list(dict.fromkeys(s.chain for s in SETUPS))


def setup_for(block: Block) -> Setup:
    found = [s for s in SETUPS if s.marker in block.code]
    if not found:
        pytest.fail(f"{block}: new README block: add a setup for it in tests/test_readme.py")
    if len(found) > 1:
        pytest.fail(f"{block} matches several setups ({[s.marker for s in found]}): make the markers distinctive")
    return found[0]


def run_block(block: Block, ns: dict[str, Any]) -> None:
    """``exec`` the block unmodified; its line numbers are README's (tracebacks point into README.md)."""
    code = compile("\n" * (block.line - 1) + block.code, str(README), "exec")
    try:
        exec(code, ns)
    except NameError as err:
        frames = traceback.extract_tb(err.__traceback__)
        if not frames or frames[-1].filename != str(README):
            raise  # raised inside the library: a bug, not the README's
        missing = (err.name, frames[-1].lineno)
    else:
        return
    pytest.fail(
        f"{block} uses the name {missing[0]!r} (README line {missing[1]}), which neither the block, "
        f"the blocks it continues, nor its setup in tests/test_readme.py defines",
        pytrace=False,
    )


# --------------------------------------------------------------------------- tests


def test_every_python_block_has_exactly_one_setup():
    blocks = readme_blocks()
    assert blocks, "README.md has no ```python block"
    for b in blocks:
        setup_for(b)
    unused = [s.marker for s in SETUPS if not any(s.marker in b.code for b in blocks)]
    assert not unused, f"setups for blocks no longer in README.md (remove them): {unused}"


@pytest.mark.parametrize("chain", CHAINS)
def test_readme_blocks_run(chain, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # traj.save("path/"), export_generator(..., "out/onestep") land here
    ns: dict[str, Any] = {}
    ran = []
    for block in readme_blocks():
        setup = setup_for(block)
        if setup.chain != chain:
            continue
        if setup.fresh:
            ns = {"__name__": f"readme_block_{block.index}"}
        t0 = time.perf_counter()
        given = setup.make(ns, block)
        ns.update(given)
        run_block(block, ns)
        ran.append(block.index)
        print(f"{block}: setup {sorted(given) or '-'}, {time.perf_counter() - t0:.2f} s")
    assert ran, f"no README block in chain {chain!r}"
