"""Print what DisBack changes in a user's loop: the diff between their function and the DisBack one.

    python examples/show_diff.py wrap_dmd2_loop      # or wrap_edm_loop, wrap_diffusers_lora

Each ``wrap_*`` example names its pair as ``PLAIN`` (the user's loop, in ``examples/foreign/``) and
``DISBACK`` (the same loop with DisBack). A changed line is a line added or rewritten; blank lines
and comments are not counted.
"""
from __future__ import annotations

import difflib
import importlib.util
import inspect
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

HERE = Path(__file__).resolve().parent


def load_example(name: str) -> ModuleType:
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))  # so an example can import foreign.*
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def summary(label: str, plain: dict, disback: dict, att: Any, module: Any, original: dict) -> dict[str, object]:
    """Print both runs' last losses and the switches; check the user's teacher is back at its
    original weights bit-exactly (node 0). Returns what the tests read."""
    import torch

    exact = all(torch.equal(v, original[k]) for k, v in module.state_dict().items())
    print(f"{label:22s} losses {({k: round(v, 4) for k, v in plain.items()})}")
    print(f"{label + ' + DisBack':22s} losses {({k: round(v, 4) for k, v in disback.items()})}")
    print(f"switches (generator update, node): {att.switches}; teacher back bit-exactly: {exact}")
    return {"plain": plain, "disback": disback, "switches": att.switches, "node0_exact": exact, "attachment": att}


def _body(fn: Callable) -> list[str]:
    lines = inspect.getsource(fn).splitlines()
    return [ln for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def changed_lines(plain: Callable, disback: Callable) -> tuple[str, int, int]:
    """The unified diff of two functions' sources (function names equalised) and the numbers of
    added and removed lines."""
    a = [ln.replace(f"def {plain.__name__}(", "def train(") for ln in _body(plain)]
    b = [ln.replace(f"def {disback.__name__}(", "def train(") for ln in _body(disback)]
    diff = list(difflib.unified_diff(a, b, "user's loop", "with DisBack", lineterm="", n=1))
    added = sum(1 for ln in diff if ln.startswith("+") and not ln.startswith("+++"))
    removed = sum(1 for ln in diff if ln.startswith("-") and not ln.startswith("---"))
    return "\n".join(diff), added, removed


if __name__ == "__main__":
    mod = load_example(sys.argv[1] if len(sys.argv) > 1 else "wrap_dmd2_loop")
    text, added, removed = changed_lines(mod.PLAIN, mod.DISBACK)
    print(text)
    print(f"\n{added} lines added or rewritten, {removed} removed")
