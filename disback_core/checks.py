"""Argument checks at the public boundary: one implementation, each error naming the argument.

Used by the constructors and functions of the core and the adapters (the audit table is in
``docs/RELIABILITY.md``; each row has its test in ``tests/test_validation.py``).
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

__all__ = ["check_number", "check_same_shape"]


def check_number(
    name: str,
    v: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    integer: bool = False,
) -> float:
    """``v`` as a float if it is a finite real number (an int with ``integer``) in the range;
    ``low_open`` excludes ``low``. Raises ``TypeError`` / ``ValueError`` naming ``name``."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
        raise TypeError(f"{name} must be {'an integer' if integer else 'a number'}, got {v!r}")
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    if low is not None and (v < low or (low_open and v == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {v}")
    if high is not None and v > high:
        raise ValueError(f"{name} must be <= {high}, got {v}")
    return float(v)


def check_same_shape(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    """Raise ``ValueError`` naming both when two tensors that must match element-wise do not."""
    if a.shape != b.shape:
        raise ValueError(
            f"{name_b} has shape {tuple(b.shape)} but {name_a} has shape {tuple(a.shape)}; they must match"
        )
