"""Offline, seeded sample-quality metrics.

All functions take CPU or GPU tensors, compute in float64 on the CPU and return plain Python
numbers (or dicts of them). The only random one, :func:`sliced_wasserstein`, draws from its own
generator seeded by ``seed``; the others are deterministic functions of their inputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "sliced_wasserstein",
    "energy_distance",
    "mode_stats",
    "frechet_distance",
    "precision_recall",
    "class_coverage",
]

# Rows per block in the chunked pairwise computations: a block of distances is
# ``_CHUNK_ELEMS`` float64 values (64 MiB) at most.
_CHUNK_ELEMS = 1 << 23


def _points(x: Any, name: str, min_rows: int = 1) -> Tensor:
    """``x`` as a float64 CPU tensor ``[n, d]``; ValueError naming ``name`` otherwise."""
    if not isinstance(x, Tensor):
        x = torch.as_tensor(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape [n, d], got {tuple(x.shape)}")
    if x.shape[0] < min_rows or x.shape[1] == 0:
        raise ValueError(f"{name} must have at least {min_rows} point(s) of dimension >= 1, got {tuple(x.shape)}")
    x = x.detach().to("cpu", torch.float64)
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def _same_dim(a: Tensor, b: Tensor, na: str, nb: str) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{na} and {nb} must have the same dimension, got {a.shape[1]} and {b.shape[1]}")


def _row_blocks(a: Tensor, b: Tensor, fn: Callable[[int, Tensor], None]) -> None:
    """Call ``fn(start, cdist(a[start:stop], b))`` for row blocks of ``a`` (bounded memory)."""
    rows = max(1, _CHUNK_ELEMS // max(1, b.shape[0]))
    for start in range(0, a.shape[0], rows):
        # the direct (non-matmul) form: exact zeros on the diagonal, no cancellation error
        fn(start, torch.cdist(a[start : start + rows], b, compute_mode="donot_use_mm_for_euclid_dist"))


def _mean_distance(a: Tensor, b: Tensor, exclude_diagonal: bool) -> float:
    """Mean Euclidean distance over pairs ``(a_i, b_j)``; with ``exclude_diagonal`` (a is b), i != j."""
    total = torch.zeros((), dtype=torch.float64)

    def add(start: int, d: Tensor) -> None:
        nonlocal total
        total = total + d.sum()  # diagonal entries of cdist(a, a) are exactly 0: nothing to remove

    _row_blocks(a, b, add)
    pairs = a.shape[0] * (b.shape[0] - 1) if exclude_diagonal else a.shape[0] * b.shape[0]
    return float(total) / pairs


def sliced_wasserstein(a: Tensor, b: Tensor, projections: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance between two equal-size point sets ``[n, d]``.

    ``sqrt(mean_theta W2^2(a.theta, b.theta))`` over ``projections`` random unit directions drawn
    from a generator seeded with ``seed`` (so the value is deterministic).
    """
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b must be [n, d] with the same d, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"a and b must have the same number of points, got {a.shape[0]} and {b.shape[0]}")
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(a.shape[1], projections, generator=g, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    pa = (a.double().cpu() @ theta).sort(0).values
    pb = (b.double().cpu() @ theta).sort(0).values
    return float(((pa - pb) ** 2).mean().sqrt())


def energy_distance(a: Tensor, b: Tensor, unbiased: bool = True) -> float:
    """Squared energy distance ``D^2 = 2 E|X-Y| - E|X-X'| - E|Y-Y'|`` between point sets ``[n, d]``.

    Szekely & Rizzo, "Energy statistics: A class of statistics based on distances", J. Stat.
    Plan. Inference 143 (2013). This is the *squared* distance (no square root); it is zero
    iff the two distributions are equal. ``E|X-Y|`` is the mean over all ``n_a * n_b`` cross
    pairs. With ``unbiased=True`` (default) the within-set terms are U-statistics (mean over
    ``i != j``), which makes the estimate unbiased for the population value but lets it go
    slightly negative, by about ``-2 E|X-X'| / n``, when the two sets come from one
    distribution (and for ``a`` compared with itself). ``unbiased=False`` uses V-statistics
    (diagonal included): then the estimate is >= 0 and exactly 0 for identical sets.
    Needs at least 2 points per set.
    """
    a, b = _points(a, "a", 2), _points(b, "b", 2)
    _same_dim(a, b, "a", "b")
    xy = _mean_distance(a, b, exclude_diagonal=False)
    xx = _mean_distance(a, a, exclude_diagonal=unbiased)
    yy = _mean_distance(b, b, exclude_diagonal=unbiased)
    return 2.0 * xy - xx - yy


def mode_stats(samples: Tensor, means: Tensor, threshold: float, min_count: int | None = None) -> dict[str, Any]:
    """Mode precision and coverage of 2D-toy samples against the mixture's component means.

    Each sample is assigned to its nearest mode (Euclidean); it is *precise* when that
    distance is ``<= threshold`` (e.g. 3 component standard deviations). Returns
    ``precision`` = precise samples / all samples; ``modes_hit`` = number of modes with at
    least ``min_count`` precise samples; ``coverage`` = ``modes_hit / K``; plus ``counts``
    (precise samples per mode) and the ``min_count`` used. Default ``min_count`` is
    ``max(1, ceil(0.1 * n / K))``: a mode counts as hit when it holds at least 10% of the
    share it would get under a uniform mixture, so a handful of stray samples near a dropped
    mode does not count as covering it.
    """
    x = _points(samples, "samples")
    mu = _points(means, "means")
    _same_dim(x, mu, "samples", "means")
    try:
        threshold = float(threshold)
    except (TypeError, ValueError):
        raise ValueError(f"threshold must be a positive finite number, got {threshold!r}") from None
    if not (math.isfinite(threshold) and threshold > 0):
        raise ValueError(f"threshold must be a positive finite number, got {threshold!r}")
    n, k = x.shape[0], mu.shape[0]
    if min_count is None:
        min_count = max(1, math.ceil(0.1 * n / k))
    if int(min_count) < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count!r}")
    min_count = int(min_count)
    dist, idx = torch.cdist(x, mu).min(dim=1)
    precise = dist <= threshold
    counts = torch.bincount(idx[precise], minlength=k)
    hit = int((counts >= min_count).sum())
    return {
        "precision": float(precise.double().mean()),
        "coverage": hit / k,
        "modes_hit": hit,
        "counts": counts.tolist(),
        "min_count": min_count,
    }


def _sqrt_psd(s: Tensor) -> Tensor:
    """Symmetric square root of a symmetric PSD matrix (eigh, tiny negative eigenvalues clamped)."""
    s = 0.5 * (s + s.T)
    w, v = torch.linalg.eigh(s)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance(feats_a: Tensor, feats_b: Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets ``[n, F]``.

    ``||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2})`` (Dowson & Landau 1982; the FID of
    Heusel et al., "GANs trained by a two time-scale update rule...", NeurIPS 2017), with
    sample means and unbiased (``n - 1``) covariances in float64. The trace of the matrix
    square root is computed stably as ``sum sqrt(eig(S_a^{1/2} S_b S_a^{1/2}))``: that matrix is
    symmetric PSD and has the same eigenvalues as ``S_a S_b``; tiny negative eigenvalues from
    round-off are clamped to 0, so singular covariances (dead features) are fine. The result is
    clamped at 0 (it can only be negative through round-off).
    """
    a = _points(feats_a, "feats_a", 2)
    b = _points(feats_b, "feats_b", 2)
    _same_dim(a, b, "feats_a", "feats_b")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a = torch.cov(a.T).reshape(a.shape[1], a.shape[1])
    s_b = torch.cov(b.T).reshape(b.shape[1], b.shape[1])
    r = _sqrt_psd(s_a)
    m = r @ s_b @ r
    tr_sqrt = torch.linalg.eigvalsh(0.5 * (m + m.T)).clamp_min(0).sqrt().sum()
    fd = (mu_a - mu_b).pow(2).sum() + torch.trace(s_a) + torch.trace(s_b) - 2.0 * tr_sqrt
    return max(0.0, float(fd))


def _kth_nn_radius(x: Tensor, k: int) -> Tensor:
    """Distance from each row of ``x`` to its ``k``-th nearest other row."""
    out = torch.empty(x.shape[0], dtype=torch.float64)

    def take(start: int, d: Tensor) -> None:
        # k + 1 smallest includes the point itself at distance 0
        out[start : start + d.shape[0]] = d.topk(k + 1, dim=1, largest=False).values[:, k]

    _row_blocks(x, x, take)
    return out


def _inside_fraction(query: Tensor, ref: Tensor, radius: Tensor) -> float:
    """Fraction of ``query`` rows within ``radius[j]`` of at least one ``ref[j]``."""
    inside = torch.zeros(query.shape[0], dtype=torch.bool)

    def mark(start: int, d: Tensor) -> None:
        inside[start : start + d.shape[0]] = (d <= radius[None, :]).any(dim=1)

    _row_blocks(query, ref, mark)
    return float(inside.double().mean())


def precision_recall(real_feats: Tensor, fake_feats: Tensor, k: int = 3) -> dict[str, float]:
    """Improved precision and recall (Kynkaanniemi et al., NeurIPS 2019) with k-NN manifolds.

    The manifold of a set is the union of balls around its points, each with radius the
    distance to that point's ``k``-th nearest neighbour within the set. ``precision`` =
    fraction of fake samples inside the real manifold; ``recall`` = fraction of real samples
    inside the fake manifold. Distances use ``torch.cdist`` in row blocks (memory bounded).
    """
    real = _points(real_feats, "real_feats")
    fake = _points(fake_feats, "fake_feats")
    _same_dim(real, fake, "real_feats", "fake_feats")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    for name, x in (("real_feats", real), ("fake_feats", fake)):
        if x.shape[0] <= k:
            raise ValueError(f"{name} needs more than k={k} points, got {x.shape[0]}")
    r_real, r_fake = _kth_nn_radius(real, k), _kth_nn_radius(fake, k)
    return {
        "precision": _inside_fraction(fake, real, r_real),
        "recall": _inside_fraction(real, fake, r_fake),
    }


def class_coverage(pred_labels: Tensor, num_classes: int, min_fraction: float | None = None) -> dict[str, Any]:
    """Class coverage and normalised entropy of predicted labels (mode-collapse check).

    ``coverage`` = fraction of the ``num_classes`` classes that receive at least
    ``min_fraction`` of all predicted labels; default ``min_fraction = 0.25 / num_classes``
    (a quarter of the uniform share). ``entropy`` = ``H(p) / log(num_classes)`` of the
    predicted class histogram ``p`` (1 = uniform, 0 = a single class; 1 when num_classes = 1).
    Also returns ``classes_hit`` and the ``histogram`` (counts per class).
    """
    y = torch.as_tensor(pred_labels).detach().cpu()
    if y.ndim != 1 or y.numel() == 0:
        raise ValueError(f"pred_labels must be a non-empty 1-D tensor, got shape {tuple(y.shape)}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"pred_labels must hold integer labels, got dtype {y.dtype}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    y = y.long()
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise ValueError(f"pred_labels must lie in [0, {num_classes}), got range [{int(y.min())}, {int(y.max())}]")
    if min_fraction is None:
        min_fraction = 0.25 / num_classes
    if not (0 < min_fraction <= 1):
        raise ValueError(f"min_fraction must lie in (0, 1], got {min_fraction!r}")
    counts = torch.bincount(y, minlength=num_classes)
    p = counts.double() / y.numel()
    need = math.ceil(min_fraction * y.numel() - 1e-9)  # integer count, immune to float round-off
    hit = int((counts >= need).sum())
    nz = p[p > 0]
    h = float(-(nz * nz.log()).sum())
    return {
        "coverage": hit / num_classes,
        "classes_hit": hit,
        "entropy": h / math.log(num_classes) if num_classes > 1 else 1.0,
        "histogram": counts.tolist(),
        "min_fraction": float(min_fraction),
    }
