"""Built-in distillation problems with teachers the project trains itself (offline, cached).

- ``toy2d``: 8 Gaussians (std 0.1) on a ring of radius 2; an EDM-preconditioned residual MLP teacher
  trained with more weight on large sigmas (log sigma ~ N(-0.5, 1.5^2)).
- ``toy2d-edm``: the same data, the teacher trained with EDM's default noise distribution (log sigma
  ~ N(-1.2, 1.2^2), as real image teachers are), whose scores at large sigmas are less reliable.
- ``grid25``: a harder multi-modal target: 25 Gaussians (std 0.05) on a 5x5 grid with unequal
  weights (1 to 25, shuffled), the teacher trained with EDM's default noise distribution; a one-step
  generator tends to drop the light modes (``mode_coverage``).
- ``digits``: scikit-learn's 8x8 digits (kept at 8x8: native resolution, no interpolation, and 4x
  cheaper than 16x16 on CPU, which is what bounds every benchmark here); an EDM-preconditioned
  diffusers ``UNet2DModel`` teacher, class-conditional with a null label (10% label dropout), so
  one teacher serves the conditional problem (``digits-cond``) and the unconditional one
  (``digits``: every sample gets the null label).
- ``digits-flow``: the same digits and prompts as ``digits-text``, the teacher a rectified-flow
  diffusers ``SD3Transformer2DModel`` (velocity loss, logit-normal times) behind ``FlowMatchDenoiser``,
  the generator fed the noise at ``t = 1``, the methods given flow-time noise samplers and the
  flow-matching fake-score loss (:mod:`.digits_flow`).
- ``patches``: 16x16 RGB patches of scikit-learn's two sample photographs, an unconditional
  EDM-preconditioned ``UNet2DModel`` teacher, Frechet distance on a region classifier's features
  (:mod:`.patches`).

Each problem evaluates samples with offline metrics against fixed held-out data and reports the
teacher's multi-step (EDM Heun, 18 steps; flow Euler for ``digits-flow``) and one-step values as
reference lines.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..analytic import GaussianMixtureDenoiser
from ..denoisers import freeze
from ..fewstep import fewstep_sigmas
from ..losses import DSMLoss
from ..nets import edm_mlp, edm_unet, edm_unet_text
from ..sampling import edm_sampler
from ..sigmas import LogNormalSigma
from ..step import Batch
from .cache import cached_model
from .metrics import class_coverage, energy_distance, frechet_distance, mode_stats, precision_recall, sliced_wasserstein

__all__ = ["Problem", "Toy2D", "Digits", "get_problem", "PROBLEMS", "train_teacher"]

log = logging.getLogger(__name__)
PROBLEMS = ("toy2d", "toy2d-edm", "grid25", "digits", "digits-cond", "digits-text", "digits-flow", "patches")
STUDENTS = ("copy", "fresh", "small")  # the generator's start: the teacher's weights, re-initialised, a smaller net
CONDITIONAL = ("digits-cond", "digits-text", "digits-flow")  # the problems with an unconditional input (teacher CFG)


def train_teacher(
    model: nn.Module, data_fn, steps: int, lr: float, dsm: DSMLoss, seed: int, warmup: int = 200, progress: bool = False
) -> dict[str, Any]:
    """Train a denoiser by DSM with Adam, linear warm-up and cosine decay; single-threaded and
    seeded, so the weights are reproducible. ``data_fn(generator) -> (x, cond)``.

    Reports the DSM loss on a fixed held-out draw (8 batches, fixed sigmas and noise) before and
    after training, so "the loss falls" is measured without the noise of single batches.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g = torch.Generator().manual_seed(seed)
        probe_g = torch.Generator().manual_seed(seed + 1)
        probe = []
        for _ in range(8):
            x, c = data_fn(probe_g)
            probe.append(
                (x, c, dsm.sigma_sampler(x.shape[0], generator=probe_g), torch.randn(x.shape, generator=probe_g))
            )

        @torch.no_grad()
        def probe_loss() -> float:
            return statistics.fmean(float(dsm(model, x, c, sigma=s, noise=n).mean()) for x, c, s, n in probe)

        before = probe_loss()
        opt = torch.optim.Adam(model.parameters(), lr)
        t0 = time.perf_counter()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            it = range(steps)
            if progress:
                from tqdm.auto import tqdm

                it = tqdm(it, desc="teacher training (once; cached)", leave=False)
            for i in it:
                for pg in opt.param_groups:
                    pg["lr"] = lr * min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * i / steps))
                x, c = data_fn(g)
                sigma = dsm.sigma_sampler(x.shape[0], generator=g)
                noise = torch.randn(x.shape, generator=g)
                loss = dsm(model, x, c, sigma=sigma, noise=noise).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        seconds = time.perf_counter() - t0
        after = probe_loss()
    finally:
        torch.set_num_threads(threads)
    return {"steps": steps, "heldout_dsm_before": before, "heldout_dsm_after": after, "train_seconds": seconds}


@dataclass
class Problem:
    """A distillation problem: a frozen teacher, how to draw generator inputs and real data, and
    how to score samples. Subclasses fill in the data and the metrics."""

    name: str
    teacher: nn.Module
    sigma_data: float
    sample_shape: tuple[int, ...]
    primary: str  # the metric on curves and in summaries (lower is better)
    teacher_info: dict[str, Any] = field(default_factory=dict)
    eval_samples: int = 2000

    # how the teacher's multi-step reference samples are drawn (reports name it)
    REFERENCE_SAMPLER = "EDM Heun, 18 steps"

    def cond(self, n: int, g: torch.Generator) -> Tensor | None:
        return None

    # -- what a problem may change in a run (the defaults are the EDM problems': the papers' settings)

    def generator_sigma_init(self, paper_value: float) -> float:
        """The generator's first noise level for an adapter whose paper value is ``paper_value``
        (a flow problem: ``math.inf``, the generator fed the noise at ``t = 1``)."""
        return paper_value

    def student_sigmas(self, steps: int, sigma_init: float) -> tuple[float, ...]:
        """A K-step student's noise levels from ``sigma_init`` (default: K points on the Karras ramp)."""
        return fewstep_sigmas(steps, sigma_max=sigma_init)

    def method_kwargs(self, adapter: str) -> dict[str, Any]:
        """Constructor keywords for the adapter's method (e.g. noise samplers); ``{}``: the paper's."""
        return {}

    def fake_dsm_weight(self) -> Callable[[Tensor, float], Tensor] | None:
        """The DSM weight of the fake score's (and the recording's) loss, or None for the method's own (EDM)."""
        return None

    def student_net(self, kind: str, seed: int) -> nn.Module:
        """A denoiser for the generator that is not a copy of the teacher: ``"fresh"`` (the teacher's
        architecture, newly initialised from ``seed``) or ``"small"`` (a smaller network, newly
        initialised). The fake score and the path stay on the teacher's architecture."""
        builders = self._student_builders()
        if kind not in builders:
            raise ValueError(f"student: {self.name!r} offers {sorted(builders)}, got {kind!r}")
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return builders[kind]()

    def _student_builders(self) -> dict[str, Any]:
        return {}

    def uncond(self) -> Any:
        """The unconditional input classifier-free guidance contrasts with, or None (no CFG possible)."""
        return None

    def batch(self, n: int, g: torch.Generator, with_real: bool = False) -> Batch:
        z = torch.randn(n, *self.sample_shape, generator=g)
        b = Batch(z, self.cond(n, g))
        if with_real:
            b.real, b.real_cond = self.real(n, g)
        return b

    def eval_inputs(self, n: int | None = None, seed: int = 12345) -> tuple[Tensor, Tensor | None]:
        """Fixed evaluation noise and conditions (the same for every run, so curves compare)."""
        g = torch.Generator().manual_seed(seed)
        b = self.batch(n or self.eval_samples, g)
        return b.z, b.cond

    def real(self, n: int, g: torch.Generator) -> tuple[Tensor, Any]:
        raise NotImplementedError

    def evaluate(self, samples: Tensor, cond: Tensor | None = None) -> dict[str, float]:
        raise NotImplementedError

    def distance(self, a: Tensor, b: Tensor) -> float:
        """The primary metric's distance between two sample sets (e.g. a path node's and the teacher's)."""
        raise NotImplementedError

    @torch.no_grad()
    def references(self, sigma_init: float) -> dict[str, dict[str, float]]:
        """Metrics of the teacher's multi-step samples (EDM Heun, 18 steps, 35 evaluations), of its
        one-step output ``D(sigma_init z, sigma_init)`` on the fixed evaluation inputs, and of held-out
        real data (the floor a perfect generator would reach with this many samples)."""
        z, c = self.eval_inputs()
        multi = edm_sampler(self.teacher, z, c, steps=18)
        one = self.teacher(sigma_init * z, sigma_init, c)
        return {
            "teacher_multistep": self.evaluate(multi, c),
            "teacher_onestep": self.evaluate(one, c),
            "data": self.evaluate(*self.heldout_data()),
        }

    def heldout_data(self) -> tuple[Tensor, Tensor | None]:
        """Real samples not used as the metric's reference set."""
        raise NotImplementedError

    def save_samples(
        self, samples: Tensor, path: str | os.PathLike, title: str = "", cond: Tensor | None = None
    ) -> None:
        raise NotImplementedError


class Toy2D(Problem):
    """A 2D Gaussian mixture. ``layout="ring8"``: 8 Gaussians (std 0.1) on a ring of radius 2
    (per-dimension data std about 1.42); ``"grid25"``: 25 Gaussians (std 0.05) on the grid
    {-2..2}^2 with weights 1..25 (shuffled, seeded) over 325. ``p_mean`` / ``p_std``: the teacher's
    training noise distribution, log sigma ~ N(p_mean, p_std^2)."""

    LAYOUTS = ("ring8", "grid25")

    def __init__(
        self,
        cache_dir=None,
        teacher_steps: int = 8000,
        seed: int = 0,
        eval_samples: int = 4000,
        progress: bool = False,
        *,
        layout: str = "ring8",
        p_mean: float = -0.5,
        p_std: float = 1.5,
        name: str = "toy2d",
    ):
        if layout not in self.LAYOUTS:
            raise ValueError(f"layout must be one of {self.LAYOUTS}, got {layout!r}")
        self.layout = layout
        if layout == "ring8":
            ang = torch.arange(8, dtype=torch.float64) * 2 * math.pi / 8
            self.means = torch.stack([2 * ang.cos(), 2 * ang.sin()], 1)
            self.std = 0.1
            self.weights = torch.full((8,), 1 / 8, dtype=torch.float64)
        else:
            axis = torch.arange(-2, 3, dtype=torch.float64)
            self.means = torch.cartesian_prod(axis, axis)
            self.std = 0.05
            w = torch.arange(1, 26, dtype=torch.float64)[
                torch.randperm(25, generator=torch.Generator().manual_seed(25))
            ]
            self.weights = w / w.sum()
        self.mixture = GaussianMixtureDenoiser(self.means, self.std, self.weights)
        cfg: dict[str, Any] = {
            "width": 128,
            "depth": 3,
            "sigma_data": 1.4,
            "steps": teacher_steps,
            "lr": 1e-3,
            "batch": 512,
            "p_mean": p_mean,
            "p_std": p_std,
            "seed": seed,
            "recipe": 1,
        }
        if layout != "ring8":  # the ring's cache key predates layouts and stays as it was
            cfg["layout"] = layout

        def build(width: int = cfg["width"], depth: int = cfg["depth"]) -> nn.Module:
            return edm_mlp(2, sigma_data=cfg["sigma_data"], width=width, depth=depth)

        def build_seeded() -> nn.Module:
            torch.manual_seed(seed)
            return build()

        def train(m: nn.Module) -> dict[str, Any]:
            dsm = DSMLoss(LogNormalSigma(cfg["p_mean"], cfg["p_std"]), cfg["sigma_data"], reduction="sum")
            return train_teacher(
                m,
                lambda g: (self._draw(cfg["batch"], g), None),
                steps=cfg["steps"],
                lr=cfg["lr"],
                dsm=dsm,
                seed=seed,
                progress=progress,
            )

        self._builders = {"fresh": build, "small": lambda: build(width=64, depth=2)}
        teacher, info = cached_model(f"{name}-teacher", cfg, build_seeded, train, cache_dir)
        super().__init__(name, freeze(teacher), cfg["sigma_data"], (2,), "sw", info, eval_samples)
        self._ref_data = self._draw(eval_samples, torch.Generator().manual_seed(999))

    def _student_builders(self) -> dict[str, Any]:
        return self._builders

    def _draw(self, n: int, g: torch.Generator) -> Tensor:
        k = (
            torch.randint(0, 8, (n,), generator=g)  # equal weights: the ring's draws as they always were
            if self.layout == "ring8"
            else torch.multinomial(self.weights, n, replacement=True, generator=g)
        )
        return (self.means[k] + self.std * torch.randn(n, 2, generator=g, dtype=torch.float64)).float()

    def real(self, n: int, g: torch.Generator) -> tuple[Tensor, Any]:
        return self._draw(n, g), None

    def heldout_data(self) -> tuple[Tensor, None]:
        return self._draw(self.eval_samples, torch.Generator().manual_seed(2024)), None

    def evaluate(self, samples: Tensor, cond: Tensor | None = None) -> dict[str, float]:
        s = samples.detach().float().cpu()
        ref = self._ref_data[: s.shape[0]]
        modes = mode_stats(s, self.means.float(), threshold=3 * self.std)
        return {
            "sw": sliced_wasserstein(s, ref),
            "energy": energy_distance(s, ref),
            "mode_coverage": float(modes["coverage"]),
            "precision": float(modes["precision"]),
        }

    def distance(self, a: Tensor, b: Tensor) -> float:
        """Sliced W2 between two sample sets."""
        return sliced_wasserstein(a.detach().float().cpu(), b.detach().float().cpu())

    def save_samples(self, samples: Tensor, path, title: str = "", cond: Tensor | None = None) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        s = samples.detach().float().cpu()[:2000]
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.scatter(self._ref_data[:2000, 0], self._ref_data[:2000, 1], s=2, c="0.8", label="data")
        ax.scatter(s[:, 0], s[:, 1], s=2, c="C0", label="samples")
        ax.set_xlim(-3.2, 3.2)
        ax.set_ylim(-3.2, 3.2)
        ax.set_aspect("equal")
        ax.set_title(title, fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


class Digits(Problem):
    """scikit-learn's 8x8 digits in [-1, 1]; ``conditional`` draws class labels, otherwise the null label.

    ``text``: the text-conditional variant (``digits-text``): each class has a fixed random "prompt"
    (``PROMPT_TOKENS x PROMPT_DIM`` states, seeded), the null class the empty prompt (zeros), and the
    teacher is a ``UNet2DConditionModel`` reading them by cross-attention, as a text-to-image UNet
    reads its encoder's states."""

    NULL = 10
    PROMPT_TOKENS, PROMPT_DIM = 4, 16

    def __init__(
        self,
        conditional: bool = False,
        cache_dir=None,
        teacher_steps: int = 4000,
        seed: int = 0,
        eval_samples: int = 2000,
        progress: bool = False,
        text: bool = False,
    ):
        from .digits import digit_features, digits_classifier, load_digits_split

        self.conditional = conditional or text
        self.text = text
        pg = torch.Generator().manual_seed(2024)
        self.prompts = torch.cat(
            [
                torch.randn(10, self.PROMPT_TOKENS, self.PROMPT_DIM, generator=pg),
                torch.zeros(1, self.PROMPT_TOKENS, self.PROMPT_DIM),
            ]
        )

        self.x_train, self.y_train, self.x_test, self.y_test = load_digits_split()
        cfg: dict[str, Any] = {
            "block_out_channels": [16, 32, 32],
            "attention": True,
            "sigma_data": 0.5,
            "steps": teacher_steps,
            "lr": 1e-3,
            "batch": 128,
            "label_dropout": 0.1,
            "p_mean": -1.2,
            "p_std": 1.2,
            "seed": seed,
            "recipe": 1,
        }
        if text:
            cfg["text"] = {"tokens": self.PROMPT_TOKENS, "dim": self.PROMPT_DIM, "prompt_seed": 2024}

        def build(channels: tuple[int, ...] = tuple(cfg["block_out_channels"])) -> nn.Module:
            if text:
                return edm_unet_text(
                    8, 1, cross_attention_dim=self.PROMPT_DIM, sigma_data=cfg["sigma_data"], block_out_channels=channels
                )
            return edm_unet(
                8,
                1,
                num_classes=10,
                sigma_data=cfg["sigma_data"],
                block_out_channels=channels,
                attention=cfg["attention"],
            )

        def build_seeded() -> nn.Module:
            torch.manual_seed(seed)
            return build()

        def data(g: torch.Generator) -> tuple[Tensor, Tensor]:
            idx = torch.randint(0, len(self.x_train), (cfg["batch"],), generator=g)
            y = self.y_train[idx].clone()
            y[torch.rand(cfg["batch"], generator=g) < cfg["label_dropout"]] = self.NULL
            return self.x_train[idx], self._encode(y)

        def train(m: nn.Module) -> dict[str, Any]:
            dsm = DSMLoss(LogNormalSigma(cfg["p_mean"], cfg["p_std"]), cfg["sigma_data"], reduction="sum")
            return train_teacher(m, data, steps=cfg["steps"], lr=cfg["lr"], dsm=dsm, seed=seed, progress=progress)

        self._builders = {"fresh": build, "small": lambda: build((8, 16, 16))}
        teacher, info = cached_model(
            "digits-text-teacher" if text else "digits-teacher", cfg, build_seeded, train, cache_dir
        )
        self.classifier, clf_info = digits_classifier(cache_dir)
        info = {**info, "classifier_test_accuracy": clf_info["test_accuracy"]}
        self._features = digit_features
        self._ref_feats = digit_features(self.classifier, self.x_test)
        name = "digits-text" if text else "digits-cond" if conditional else "digits"
        super().__init__(name, freeze(teacher), cfg["sigma_data"], (1, 8, 8), "fd", info, eval_samples)

    def _student_builders(self) -> dict[str, Any]:
        return self._builders

    def uncond(self) -> Tensor:
        """The null label, or the empty prompt (``text``)."""
        return self.prompts[self.NULL] if self.text else torch.tensor(self.NULL)

    def _encode(self, labels: Tensor) -> Tensor:
        """The model's conditioning for class labels: the labels, or their prompts (``text``)."""
        return self.prompts[labels] if self.text else labels

    def labels_of(self, cond: Tensor) -> Tensor:
        """Class labels of a conditioning (the nearest prompt for ``text``)."""
        if not self.text:
            return cond
        d = (cond.flatten(1)[:, None, :] - self.prompts[:10].flatten(1)[None]).pow(2).sum(-1)
        return d.argmin(1)

    def cond(self, n: int, g: torch.Generator) -> Tensor:
        if self.conditional:
            return self._encode(torch.randint(0, 10, (n,), generator=g))
        return torch.full((n,), self.NULL, dtype=torch.long)

    def eval_inputs(self, n: int | None = None, seed: int = 12345) -> tuple[Tensor, Tensor]:
        n = n or self.eval_samples
        z = torch.randn(n, *self.sample_shape, generator=torch.Generator().manual_seed(seed))
        c = self._encode(torch.arange(n) % 10) if self.conditional else torch.full((n,), self.NULL, dtype=torch.long)
        return z, c

    def real(self, n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        idx = torch.randint(0, len(self.x_train), (n,), generator=g)
        return self.x_train[idx], (self._encode(self.y_train[idx]) if self.conditional else torch.full((n,), self.NULL))

    def heldout_data(self) -> tuple[Tensor, Tensor]:
        return self.x_train, self._encode(self.y_train)  # the metric's reference set is the test split

    @torch.no_grad()
    def evaluate(self, samples: Tensor, cond: Tensor | None = None) -> dict[str, float]:
        from .digits import predict_labels

        s = samples.detach().float().cpu().clamp(-1, 1)
        feats = self._features(self.classifier, s)
        pr = precision_recall(self._ref_feats, feats, k=3)
        pred = predict_labels(self.classifier, s)
        out = {
            "fd": frechet_distance(feats, self._ref_feats),
            "precision": pr["precision"],
            "recall": pr["recall"],
            "class_coverage": float(class_coverage(pred, 10)["coverage"]),
        }
        if self.conditional and cond is not None:
            out["label_accuracy"] = float((pred == self.labels_of(cond.cpu())).double().mean())
        return out

    @torch.no_grad()
    def distance(self, a: Tensor, b: Tensor) -> float:
        """Frechet distance between two sample sets in the digits classifier's features."""
        fa, fb = (self._features(self.classifier, t.detach().float().cpu().clamp(-1, 1)) for t in (a, b))
        return frechet_distance(fa, fb)

    def save_samples(self, samples: Tensor, path, title: str = "", cond: Tensor | None = None) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        s = samples.detach().float().cpu().clamp(-1, 1)[:100, 0]
        grid = -torch.ones(10 * 9 + 1, 10 * 9 + 1)  # white separators
        for i in range(s.shape[0]):
            r, c = divmod(i, 10)
            grid[1 + 9 * r : 9 + 9 * r, 1 + 9 * c : 9 + 9 * c] = s[i]
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.imshow(-grid.numpy(), cmap="gray", vmin=-1, vmax=1)
        ax.axis("off"), ax.set_title(title, fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def get_problem(name: str, cache_dir=None, **kwargs: Any) -> Problem:
    """``toy2d``, ``toy2d-edm``, ``grid25``, ``digits`` (unconditional), ``digits-cond`` (class labels),
    ``digits-text`` (prompts), ``digits-flow`` (prompts, a rectified-flow SD3 transformer teacher) or
    ``patches`` (16x16 RGB photograph patches)."""
    if name == "toy2d":
        return Toy2D(cache_dir, **kwargs)
    if name == "toy2d-edm":
        return Toy2D(cache_dir, p_mean=-1.2, p_std=1.2, name=name, **kwargs)
    if name == "grid25":
        return Toy2D(cache_dir, layout="grid25", p_mean=-1.2, p_std=1.2, name=name, **kwargs)
    if name in ("digits", "digits-cond", "digits-text"):
        return Digits(conditional=name == "digits-cond", text=name == "digits-text", cache_dir=cache_dir, **kwargs)
    if name == "digits-flow":
        from .digits_flow import DigitsFlow

        return DigitsFlow(cache_dir, **kwargs)
    if name == "patches":
        from .patches import Patches

        return Patches(cache_dir, **kwargs)
    raise ValueError(f"unknown problem {name!r}; choose one of {PROBLEMS}")
