"""The 8x8 digits problem's data and feature classifier (offline: scikit-learn's bundled digits).

:func:`load_digits_split` gives a fixed, stratified train/test split of the 1,797 images of
``sklearn.datasets.load_digits`` scaled to [-1, 1]. :class:`DigitsClassifier` is a small CNN
trained once on the train split (:func:`digits_classifier`, through the train-once cache); its
penultimate activations (:func:`digit_features`) play the role of Inception features for the
Frechet distance and precision/recall, and its predictions (:func:`predict_labels`) feed the
class-coverage metric.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cache import cached_model

__all__ = [
    "load_digits_split",
    "DigitsClassifier",
    "digits_classifier",
    "digit_features",
    "predict_labels",
    "fit_classifier",
]

log = logging.getLogger(__name__)

NUM_CLASSES = 10
IMAGE_SHAPE = (1, 8, 8)
# Bump when the training recipe changes in a way the config below does not capture.
RECIPE_VERSION = 1  # AdamW + cosine LR + random shifts, one thread, SiLU feature layer


def load_digits_split(seed: int = 0, test_fraction: float = 0.3) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_train, y_train, x_test, y_test)`` from scikit-learn's bundled 8x8 digits (no download).

    Images are kept at 8x8 and scaled from 0..16 to [-1, 1] as ``x / 8 - 1``: float32
    ``[N, 1, 8, 8]``; labels int64 ``[N]``. The split is stratified by label and fixed by
    ``seed`` (``train_test_split(..., stratify=y, random_state=seed)``).
    """
    if not (0.0 < test_fraction < 1.0):
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction!r}")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x, y = data.images, data.target
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, stratify=y, random_state=seed)

    def images(a: Any) -> Tensor:
        return (torch.as_tensor(a, dtype=torch.float32) / 8.0 - 1.0).reshape(-1, *IMAGE_SHAPE).contiguous()

    def labels(a: Any) -> Tensor:
        return torch.as_tensor(a, dtype=torch.int64).contiguous()

    return images(x_tr), labels(y_tr), images(x_te), labels(y_te)


class DigitsClassifier(nn.Module):
    """Small CNN for ``[N, 1, 8, 8]`` digits in [-1, 1].

    conv3x3(1->c) ReLU, conv3x3(c->c) ReLU, maxpool2 (8->4), conv3x3(c->2c) ReLU, maxpool2
    (4->2), flatten (2c*4), linear -> ``feature_dim`` SiLU (the features), linear -> 10 logits.
    ``in_channels`` / ``image_size`` / ``num_classes`` give the same net for other images
    (``patches``: RGB 16x16, 32 classes; the flattened size is ``2c * (image_size / 4)^2``).
    The feature layer uses SiLU rather than ReLU: with ReLU about half of the 64 units die in
    training, leaving constant features (a singular covariance) for the Frechet distance.
    """

    def __init__(
        self,
        width: int = 32,
        feature_dim: int = 64,
        num_classes: int = NUM_CLASSES,
        in_channels: int = 1,
        image_size: int = 8,
    ):
        super().__init__()
        if image_size % 4:
            raise ValueError(f"image_size must be a multiple of 4 (two 2x poolings), got {image_size}")
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * width * (image_size // 4) ** 2, feature_dim),
            nn.SiLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)
        self.feature_dim = feature_dim

    def features(self, x: Tensor) -> Tensor:
        """Penultimate activations ``[N, feature_dim]`` (the input of the final linear layer)."""
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits ``[N, num_classes]``."""
        return self.head(self.body(x))


def _check_images(x: Tensor, name: str = "x") -> None:
    if not isinstance(x, Tensor) or x.ndim != 4 or tuple(x.shape[1:]) != IMAGE_SHAPE:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a tensor of shape [N, 1, 8, 8], got {shape}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty")


def _random_shift(x: Tensor, max_shift: int, g: torch.Generator) -> Tensor:
    """Translate each image by a random integer offset in ``[-max_shift, max_shift]^2``, padding
    with the background value -1 (data augmentation)."""
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    p = max_shift
    padded = F.pad(x, (p, p, p, p), value=-1.0)
    dy = torch.randint(0, 2 * p + 1, (n,), generator=g)
    dx = torch.randint(0, 2 * p + 1, (n,), generator=g)
    rows = (dy[:, None] + torch.arange(h)[None])[:, None, :, None].expand(n, 1, h, w + 2 * p)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w)[None])[:, None, None, :].expand(n, 1, h, w)
    return out.gather(3, cols)


@torch.no_grad()
def _accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    return float((predict_labels(model, x) == y).double().mean())


def _train(model: DigitsClassifier, cfg: dict[str, Any]) -> dict[str, Any]:
    """Deterministic training on the train split: AdamW, cosine LR, fixed shuffles and shifts.

    Runs on one intra-op thread (restored afterwards): this tiny net gains nothing from more,
    one thread gives the same bits whatever the core count, and it cannot be slowed to a crawl by
    thread oversubscription when other processes share the cores.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_loop(model, cfg)
    finally:
        torch.set_num_threads(threads)


def _train_loop(model: DigitsClassifier, cfg: dict[str, Any]) -> dict[str, Any]:
    x_tr, y_tr, x_te, y_te = load_digits_split(cfg["split_seed"], cfg["test_fraction"])
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(cfg["seed"])
    bs = cfg["batch_size"]
    order, pos = torch.randperm(len(x_tr), generator=g), 0

    def batch() -> tuple[Tensor, Tensor]:
        nonlocal order, pos
        if pos + bs > len(order):  # new epoch: a fresh permutation from the seeded generator
            order, pos = torch.randperm(len(x_tr), generator=g), 0
        idx = order[pos : pos + bs]
        pos += bs
        return _random_shift(x_tr[idx], cfg["max_shift"], g), y_tr[idx]

    losses = fit_classifier(model, batch, cfg["steps"], cfg["lr"], cfg["weight_decay"])
    seconds = time.perf_counter() - t0
    tail = losses[-max(1, min(50, cfg["steps"])) :]
    facts = {
        "test_accuracy": _accuracy(model, x_te, y_te),
        "train_accuracy": _accuracy(model, x_tr, y_tr),
        "final_loss": sum(tail) / len(tail),
        "train_seconds": seconds,
        "steps": cfg["steps"],
        "n_train": len(x_tr),
        "n_test": len(x_te),
    }
    log.info(
        "digits classifier: test accuracy %.4f after %d steps in %.1fs", facts["test_accuracy"], cfg["steps"], seconds
    )
    return facts


def fit_classifier(
    model: nn.Module, batch: Callable[[], tuple[Tensor, Tensor]], steps: int, lr: float, weight_decay: float
) -> list[float]:
    """Cross-entropy training of ``model`` on ``steps`` batches ``batch() -> (x, labels)``: AdamW,
    cosine learning-rate decay to 0, no warm-up; the model is left in eval mode. Returns the
    per-step losses. Deterministic when ``batch`` is (it draws from its own seeded generator); runs
    on one intra-op thread (restored afterwards), so the bits do not depend on the core count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * s / steps)))
        losses = []
        model.train()
        for _ in range(steps):
            xb, yb = batch()
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.detach().item())
        model.eval()
    finally:
        torch.set_num_threads(threads)
    return losses


def digits_classifier(
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
    steps: int = 1500,
    batch_size: int = 64,
    lr: float = 2e-3,
    weight_decay: float = 1e-4,
    max_shift: int = 1,
    width: int = 32,
    feature_dim: int = 64,
    split_seed: int = 0,
    test_fraction: float = 0.3,
) -> tuple[DigitsClassifier, dict[str, Any]]:
    """The trained digits classifier and its training facts, trained once and cached.

    Trains on the train split of ``load_digits_split(split_seed, test_fraction)`` only, with
    init from ``torch.manual_seed(seed)`` (the caller's global RNG state is restored) and batch
    order / random shifts of up to ``max_shift`` pixels from a ``torch.Generator`` seeded with
    ``seed``. Goes through :func:`disback_core.bench.cache.cached_model` under the name
    ``"digits-classifier"``, keyed by every hyperparameter. ``info`` has ``test_accuracy``
    (held-out split), ``train_accuracy``, ``final_loss`` (mean of the last 50 steps),
    ``train_seconds``, ``cached`` and ``path``. The model is returned in eval mode with
    ``requires_grad`` off.
    """
    if steps < 1 or batch_size < 1 or max_shift < 0:
        raise ValueError(f"need steps >= 1, batch_size >= 1, max_shift >= 0; got {steps}, {batch_size}, {max_shift}")
    cfg = {
        "recipe": RECIPE_VERSION,
        "seed": seed,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": weight_decay,
        "max_shift": max_shift,
        "width": width,
        "feature_dim": feature_dim,
        "split_seed": split_seed,
        "test_fraction": test_fraction,
    }

    def build() -> DigitsClassifier:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return DigitsClassifier(width=width, feature_dim=feature_dim)

    def train(model: nn.Module) -> dict[str, Any]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return _train(model, cfg)  # type: ignore[arg-type]

    model, info = cached_model("digits-classifier", cfg, build, train, cache_dir=cache_dir)
    model.eval().requires_grad_(False)
    return model, info  # type: ignore[return-value]


@torch.no_grad()
def digit_features(classifier: DigitsClassifier, x: Tensor, batch_size: int = 512) -> Tensor:
    """Penultimate features ``[N, F]`` of ``x`` ``[N, 1, 8, 8]`` (eval mode, no grad, batched).

    Computed on the classifier's device; returned as float32 on the same device as ``x``.
    """
    _check_images(x)
    return _batched(classifier, x, batch_size, classifier.features)


@torch.no_grad()
def predict_labels(classifier: nn.Module, x: Tensor, batch_size: int = 512) -> Tensor:
    """Predicted classes (argmax of the logits), int64 ``[N]`` on the device of ``x``."""
    _check_images(x)
    return _batched(classifier, x, batch_size, classifier).argmax(dim=1)


def _batched(model: nn.Module, x: Tensor, batch_size: int, fn: Any) -> Tensor:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    was_training = model.training
    model.eval()
    try:
        p = next(model.parameters())
        outs = [
            fn(x[i : i + batch_size].to(p.device, p.dtype)).float().to(x.device) for i in range(0, len(x), batch_size)
        ]
    finally:
        model.train(was_training)
    return torch.cat(outs)
