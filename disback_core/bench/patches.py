"""``patches``: 16x16 RGB patches of the two photographs bundled with scikit-learn.

A larger real-image problem than the 8x8 digits: 3 x 16 x 16 = 768 dimensions of natural-image
statistics (edges, textures, smooth gradients), offline (``sklearn.datasets.load_sample_images``:
``china.jpg`` and ``flower.jpg``, 427 x 640 x 3 each, no download).

Data. A patch is any 16x16 crop of either photograph (every position, both photographs: 2 x 412 x
625 = 515,000 positions), pixels scaled from 0..255 to [-1, 1] as ``x / 127.5 - 1``, no flips (the
photographs' orientation is part of the data). The split is over positions: a fixed seeded random
set of :data:`N_TEST` = 4,096 positions (``randperm`` with seed :data:`SPLIT_SEED`) is the held-out
test set, the metric's reference; the teacher, the feature network and the methods' real batches
draw uniformly from the other 510,904 (:func:`draw_patches`). Test patches overlap training patches
(a one-pixel shift is another position): the split keeps the two sets exact draws of one
distribution, which the benchmark needs (its floor is the held-out line). A spatial hold-out was
measured and rejected: holding out the right quarter of each region, the Frechet distance of
training draws to the held-out strip was 106 against 5.8 between two draws of the strip: the split,
not the model, would have set the floor. Each patch has a region label: which photograph and which
cell of a 4 x 4 grid over it holds the patch's centre (32 classes).

Teacher (:data:`TEACHER_CONFIG`). An EDM-preconditioned (``sigma_data = 0.5``) diffusers
``UNet2DModel`` as the digits teacher's (:func:`~disback_core.nets.edm_unet`), unconditional, at
16x16 with 3 channels: block channels (16, 32, 32), one layer per block, self-attention at the
4x4 level, 8 norm groups; 281k parameters. Trained as the digits teacher
(:func:`~disback_core.bench.problems.train_teacher`): DSM with EDM's noise distribution
(log sigma ~ N(-1.2, 1.2^2)) and EDM's weighting, summed over pixels; Adam at 1e-3, batch 64,
4,000 steps, 200 warm-up steps and cosine decay, one thread, seeded; cached
(``patches-teacher-<hash>`` beside the other teachers). Measured: 531 CPU seconds (8.9 minutes) on
one thread (1,056 s of wall clock on two cores shared with other jobs), held-out DSM 1137 ->
130. A wider net, channels (32, 32, 32) for 3,000 steps (598 CPU s), reached a lower DSM (122) but
not a better sampler (Heun FD 198 against 174), at 1.5x the cost of every distillation step.

Feature network (:func:`patches_classifier`). The digits classifier's CNN
(:class:`~disback_core.bench.digits.DigitsClassifier`) for RGB 16x16 and 32 classes (width 32,
64 SiLU features), trained to tell the region of a patch: AdamW 2e-3, weight decay 1e-4, batch 64
of fresh training draws, 4,000 steps, cosine decay, one thread (the digits classifier's loop,
:func:`~disback_core.bench.digits.fit_classifier`); cached as ``patches-classifier-<hash>``.
Measured: region accuracy 0.828 on the test set (0.833 on training draws; chance 1/32), 87 CPU
seconds. Its penultimate features play the role of Inception features.

Metrics (lower ``fd`` is better). ``fd``: the Frechet distance of the samples' features to the
4,096 test patches' (:func:`~disback_core.bench.metrics.frechet_distance`), as ``digits``;
``precision`` / ``recall``: k-NN manifolds (k = 3) in the same features; ``region_coverage``: the
fraction of the 32 regions that receive at least a quarter of their uniform share of the samples'
predicted regions (a mode-dropping check, as ``class_coverage`` on digits). Reference lines
(:meth:`Problem.references`): held-out data (2,000 training draws with a fixed seed against the test
set), the teacher's EDM Heun sampler (18 steps) and its one-step output, on the same fixed 2,000
evaluation inputs. Measured FD: held-out data 10.0, teacher multi-step 173.6, teacher one-step at
sigma 80 (DMD2's generator start) 2857; the Heun samples look like the data (sky, foliage, water,
petals) with some speckle in the textures; the one-step output is grey-brown mean colour with
noise.

Distillation settings mirror ``digits``' (``disback bench`` defaults: 600 generator iterations,
batch 64, learning rate 5e-5, evaluation every 50, 300 degradation steps; the methods at their
paper settings). ``--student fresh`` re-initialises the teacher's architecture, ``small`` is the
same UNet at channels (8, 16, 16); ``--critic-steps``, ``--fake-lr-scale`` and ``--init-generator``
are the runner's, as for every problem. Measured cost (one thread): DMD2 (5 critic steps) 1.19 CPU
s per generator iteration, about 2.8x digits'; DisBack's recording (300 steps, 5 LoRA nodes) 78 CPU
s. A 100-iteration smoke (DMD2, seed 0): FD 2857 -> 547 (base), 511 (DisBack).
"""

from __future__ import annotations

import functools
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..denoisers import freeze
from ..losses import DSMLoss
from ..nets import edm_unet
from ..sigmas import LogNormalSigma
from .cache import cached_model
from .digits import DigitsClassifier, _batched, fit_classifier
from .metrics import class_coverage, frechet_distance, precision_recall
from .problems import Problem, train_teacher

__all__ = [
    "Patches",
    "load_photos",
    "patch_split",
    "crop_patches",
    "draw_patches",
    "test_patches",
    "patches_classifier",
    "patch_features",
    "predict_regions",
    "TEACHER_CONFIG",
]

log = logging.getLogger(__name__)

PHOTOS = ("china.jpg", "flower.jpg")
PATCH = 16  # patch side (pixels)
GRID = 4  # regions per side of each photograph: 2 x 4 x 4 = 32 region labels
NUM_CLASSES = len(PHOTOS) * GRID * GRID
N_TEST = 4096  # held-out positions: the metric's reference set
SPLIT_SEED = 2024
IMAGE_SHAPE = (3, PATCH, PATCH)
TEACHER_CONFIG: dict[str, Any] = {
    "block_out_channels": [16, 32, 32],
    "attention": True,
    "sigma_data": 0.5,
    "lr": 1e-3,
    "batch": 64,
    "p_mean": -1.2,
    "p_std": 1.2,
}
TEACHER_STEPS = 4000
SMALL_CHANNELS = (8, 16, 16)


@functools.lru_cache(maxsize=1)
def load_photos() -> Tensor:
    """The two photographs as one float32 tensor ``[2, H, W, 3]`` in [-1, 1] (``x / 127.5 - 1``),
    ``china.jpg`` first. Loaded once per process and shared: treat it as read-only."""
    from sklearn.datasets import load_sample_images

    data = load_sample_images()
    by_name = {Path(f).name: img for f, img in zip(data.filenames, data.images)}
    return torch.stack([torch.as_tensor(by_name[n].copy(), dtype=torch.float32) / 127.5 - 1.0 for n in PHOTOS])


def _positions() -> tuple[int, int, int]:
    """``(photographs, rows, columns)`` of valid patch positions (top-left corners)."""
    p, h, w, _ = load_photos().shape
    return p, h - PATCH + 1, w - PATCH + 1


@functools.lru_cache(maxsize=1)
def patch_split() -> tuple[Tensor, Tensor]:
    """``(train, test)`` patch positions (flat indices over photograph, row, column): a fixed random
    set of :data:`N_TEST` positions (``randperm`` seeded with :data:`SPLIT_SEED`, in that random order)
    is the test set, every other position (sorted) the training set."""
    p, nh, nw = _positions()
    perm = torch.randperm(p * nh * nw, generator=torch.Generator().manual_seed(SPLIT_SEED))
    return perm[N_TEST:].sort().values, perm[:N_TEST].clone()


def crop_patches(positions: Tensor) -> tuple[Tensor, Tensor]:
    """The patches at flat ``positions`` ``[n]``: ``(x [n, 3, 16, 16] in [-1, 1], region [n])``; a
    patch's region is ``photograph * 16 + 4 * grid row + grid column`` of its centre pixel."""
    photos = load_photos()
    _, h, w, _ = photos.shape
    _, nh, nw = _positions()
    k = positions.long()
    photo, rem = k // (nh * nw), k % (nh * nw)
    top, left = rem // nw, rem % nw
    rows = top[:, None] + torch.arange(PATCH)
    cols = left[:, None] + torch.arange(PATCH)
    x = photos[photo[:, None, None], rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()
    centre = PATCH // 2
    region = photo * GRID * GRID + ((top + centre) * GRID // h) * GRID + (left + centre) * GRID // w
    return x, region


def draw_patches(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """``n`` training patches and their regions, positions drawn uniformly (with replacement) from
    the training positions with ``g``."""
    train, _ = patch_split()
    return crop_patches(train[torch.randint(0, len(train), (n,), generator=g)])


def test_patches() -> tuple[Tensor, Tensor]:
    """The :data:`N_TEST` held-out patches and their regions (fixed)."""
    return crop_patches(patch_split()[1])


def patches_classifier(
    cache_dir: str | os.PathLike | None = None,
    steps: int = 4000,
    batch_size: int = 64,
    lr: float = 2e-3,
    weight_decay: float = 1e-4,
    width: int = 32,
    feature_dim: int = 64,
    seed: int = 0,
) -> tuple[DigitsClassifier, dict[str, Any]]:
    """The region classifier (the FD's feature network), trained once on fresh training draws and
    cached as ``"patches-classifier"``; ``info`` has ``test_accuracy`` (the test set),
    ``train_accuracy`` (4,096 training draws), ``final_loss`` and ``train_seconds``. Eval mode, no
    gradients."""
    cfg = {
        "recipe": 1,
        "seed": seed,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": weight_decay,
        "width": width,
        "feature_dim": feature_dim,
        "split": {"photos": list(PHOTOS), "patch": PATCH, "grid": GRID, "test": N_TEST, "seed": SPLIT_SEED},
    }

    def build() -> DigitsClassifier:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return DigitsClassifier(width, feature_dim, NUM_CLASSES, in_channels=3, image_size=PATCH)

    def train(model: nn.Module) -> dict[str, Any]:
        g = torch.Generator().manual_seed(seed)
        t0, c0 = time.perf_counter(), time.process_time()
        losses = fit_classifier(model, lambda: draw_patches(batch_size, g), steps, lr, weight_decay)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        x_te, y_te = test_patches()
        x_tr, y_tr = draw_patches(N_TEST, torch.Generator().manual_seed(seed + 1))
        tail = losses[-min(50, steps) :]
        facts = {
            "test_accuracy": _accuracy(model, x_te, y_te),
            "train_accuracy": _accuracy(model, x_tr, y_tr),
            "final_loss": sum(tail) / len(tail),
            "train_seconds": seconds,
            "train_cpu_seconds": cpu,
            "steps": steps,
        }
        log.info(
            "patches classifier: test accuracy %.4f after %d steps in %.1fs", facts["test_accuracy"], steps, seconds
        )
        return facts

    model, info = cached_model("patches-classifier", cfg, build, train, cache_dir=cache_dir)
    model.eval().requires_grad_(False)
    return model, info  # type: ignore[return-value]


@torch.no_grad()
def _accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    return float((predict_regions(model, x) == y).double().mean())


def _check(x: Tensor) -> None:
    if not isinstance(x, Tensor) or x.ndim != 4 or tuple(x.shape[1:]) != IMAGE_SHAPE or x.shape[0] == 0:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"patches must be a non-empty tensor of shape [N, 3, 16, 16], got {shape}")


@torch.no_grad()
def patch_features(classifier: DigitsClassifier, x: Tensor, batch_size: int = 512) -> Tensor:
    """Penultimate features ``[N, 64]`` of patches ``[N, 3, 16, 16]`` (batched, no grad)."""
    _check(x)
    return _batched(classifier, x, batch_size, classifier.features)


@torch.no_grad()
def predict_regions(classifier: nn.Module, x: Tensor, batch_size: int = 512) -> Tensor:
    """Predicted regions ``[N]`` (argmax of the classifier's logits)."""
    _check(x)
    return _batched(classifier, x, batch_size, classifier).argmax(dim=1)


class Patches(Problem):
    """Unconditional 16x16 RGB patches of scikit-learn's two sample photographs (module docstring).

    ``teacher_steps`` / ``classifier_steps``: the training budgets (smaller ones for quick checks;
    the caches key on them)."""

    def __init__(
        self,
        cache_dir=None,
        teacher_steps: int = TEACHER_STEPS,
        seed: int = 0,
        eval_samples: int = 2000,
        progress: bool = False,
        classifier_steps: int = 4000,
    ):
        cfg: dict[str, Any] = {
            **TEACHER_CONFIG,
            "steps": teacher_steps,
            "seed": seed,
            "data": {"photos": list(PHOTOS), "patch": PATCH, "test": N_TEST, "split_seed": SPLIT_SEED},
            "recipe": 1,
        }

        def build(channels: tuple[int, ...] = tuple(cfg["block_out_channels"])) -> nn.Module:
            return edm_unet(
                PATCH, 3, sigma_data=cfg["sigma_data"], block_out_channels=channels, attention=cfg["attention"]
            )

        def build_seeded() -> nn.Module:
            torch.manual_seed(seed)
            return build()

        def train(m: nn.Module) -> dict[str, Any]:
            dsm = DSMLoss(LogNormalSigma(cfg["p_mean"], cfg["p_std"]), cfg["sigma_data"], reduction="sum")
            c0 = time.process_time()
            facts = train_teacher(
                m,
                lambda g: (draw_patches(cfg["batch"], g)[0], None),
                steps=cfg["steps"],
                lr=cfg["lr"],
                dsm=dsm,
                seed=seed,
                progress=progress,
            )
            # CPU seconds too: one thread, so they are what an idle core's wall clock shows
            return {**facts, "train_cpu_seconds": time.process_time() - c0}

        self._builders = {"fresh": build, "small": lambda: build(SMALL_CHANNELS)}
        teacher, info = cached_model("patches-teacher", cfg, build_seeded, train, cache_dir)
        self.classifier, clf_info = patches_classifier(cache_dir, steps=classifier_steps)
        info = {**info, "classifier_test_accuracy": clf_info["test_accuracy"]}
        self.x_test, self.y_test = test_patches()
        self._ref_feats = patch_features(self.classifier, self.x_test)
        super().__init__("patches", freeze(teacher), cfg["sigma_data"], IMAGE_SHAPE, "fd", info, eval_samples)

    def _student_builders(self) -> dict[str, Any]:
        return self._builders

    def real(self, n: int, g: torch.Generator) -> tuple[Tensor, None]:
        return draw_patches(n, g)[0], None

    def heldout_data(self) -> tuple[Tensor, None]:
        """``eval_samples`` training draws (fixed seed): the floor a generator of the training
        distribution reaches with as many samples as it is evaluated on."""
        return draw_patches(self.eval_samples, torch.Generator().manual_seed(SPLIT_SEED + 1))[0], None

    @torch.no_grad()
    def evaluate(self, samples: Tensor, cond: Tensor | None = None) -> dict[str, float]:
        s = samples.detach().float().cpu().clamp(-1, 1)
        feats = patch_features(self.classifier, s)
        pr = precision_recall(self._ref_feats, feats, k=3)
        pred = predict_regions(self.classifier, s)
        return {
            "fd": frechet_distance(feats, self._ref_feats),
            "precision": pr["precision"],
            "recall": pr["recall"],
            "region_coverage": float(class_coverage(pred, NUM_CLASSES)["coverage"]),
        }

    @torch.no_grad()
    def distance(self, a: Tensor, b: Tensor) -> float:
        """Frechet distance between two sample sets in the region classifier's features."""
        fa, fb = (patch_features(self.classifier, t.detach().float().cpu().clamp(-1, 1)) for t in (a, b))
        return frechet_distance(fa, fb)

    def save_samples(self, samples: Tensor, path, title: str = "", cond: Tensor | None = None) -> None:
        """The first 64 samples as an 8 x 8 grid of patches (one-pixel white separators)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        s = samples.detach().float().cpu().clamp(-1, 1)[:64]
        step = PATCH + 1
        grid = torch.ones(3, 8 * step + 1, 8 * step + 1)
        for i in range(s.shape[0]):
            r, c = divmod(i, 8)
            grid[:, 1 + step * r : 1 + step * r + PATCH, 1 + step * c : 1 + step * c + PATCH] = s[i]
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.imshow(((grid + 1) / 2).permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.axis("off"), ax.set_title(title, fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
