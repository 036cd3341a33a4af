"""``digits-flow``: the 8x8 digits distilled from a rectified-flow transformer (SD3's architecture).

The teacher is a diffusers ``SD3Transformer2DModel`` (MMDiT: joint attention over image and text
tokens, AdaLN from the timestep and a pooled projection) of a small config, trained on the digits
with SD3's rectified-flow recipe and exposed to the bench as ``FlowMatchDenoiser(model,
FlowMatchEulerDiscreteScheduler(shift=SHIFT))``, ``D(x, sigma, cond) -> x0`` in the library's VE
frame (:mod:`disback_core.flow`).

Model (:data:`MODEL_CONFIG`): 8x8, 1 channel, patch size 2 (16 image tokens), 2 joint blocks of
width 64 (2 heads of 32), sincos position embeddings. Conditioning as ``digits-text``: each class
is a fixed random "prompt" of 4 states of dimension 16 (seed 2024; ``encoder_hidden_states``), the
null class the empty prompt (zeros, 10% label dropout in training: classifier-free guidance works).
SD3 also reads a pooled text vector; this problem has no pooled encoder, so ``pooled_projections``
is a fixed zero vector ``[1, 8]`` passed in ``extras`` (broadcast over the batch): the class reaches
the model through the prompt tokens alone.

Teacher training: the velocity loss ``||v_hat - (eps - x0)||^2`` (mean over pixels), written as the
library's DSM on x0 with :func:`~disback_core.sigmas.flow_weight`, with SD3's logit-normal flow
times ``logit t ~ N(0, 1)`` (Esser et al. 2024, Sec. 3.1) times the scheduler's shift. The shift is
1: SD3 trains at its base resolution without one and shifts up for larger images; 8x8 is far below
any base resolution. Adam at 1e-3, batch 128, linear warm-up and cosine decay
(:func:`~disback_core.bench.problems.train_teacher`), one thread, cached in ``~/.cache/disback``.

References: the teacher's multi-step samples are the flow Euler sampler from pure noise
(``FlowMatchEulerDiscreteScheduler``'s, :data:`EULER_STEPS` steps): the library's
``sample_fewstep(teacher, z, c, sigmas=flow_sigmas(N, shift), noise="deterministic")`` is exactly
that sampler. The teacher's one-step output is ``x0`` at ``t = 1``: ``z - v(z, 1)``.

The generator is :func:`~disback_core.flow.make_flow_generator`'s: a copy of the teacher fed exactly
the noise at ``t = 1`` (``sigma_init = inf``), for every adapter (the adapters' EDM ``sigma_init``
values do not apply to a flow model: ``sigma z`` at a finite sigma is not a point of the flow's
path).

Distillation noise levels (:meth:`DigitsFlow.method_kwargs`). The methods keep their losses and
their paper optimisers; where a paper samples noise levels, the flow problem samples the flow
analogue, with the teacher's shift:

- where the paper draws *uniformly over the timestep grid*, uniform flow times over the same
  fraction of it (:class:`~disback_core.sigmas.UniformTimeSigma`): DMD2's generator, indices
  20..980 of 1000, is ``t ~ U(0.02, 0.98)``, its fake score, all of 0..999, ``t ~ U(0.001, 0.999)``;
  SiD's generator, ``u ~ U(0, 0.8)`` along
  the Karras ramp (tmax = 800 of 1000), is ``t ~ U(0.001, 0.8)``;
- where the paper draws from *the teacher's training distribution* (Diff-Instruct's generator; the
  fake score of Diff-Instruct and SiD: EDM's log-normal), the flow teacher's training distribution,
  ``logit t ~ N(0, 1)`` (:class:`~disback_core.sigmas.LogitNormalSigma`).

The fake score is trained with the flow-matching (velocity) loss, i.e. the DSM with
:func:`~disback_core.sigmas.flow_weight` (:meth:`DigitsFlow.fake_dsm_weight`), keeping each
method's reduction (DMD2 mean, SiD and Diff-Instruct sum over pixels). Why: the fake score is a
copy of the teacher and tracks the generator's distribution the way the teacher was fitted to the
data, and flow-model DMD2 implementations train their critic so (FastVideo's DMD2 for Wan builds
the critic's loss as a flow-matching loss on the student's samples;
``fastvideo/distillation/doc/methods/distribution_matching/dmd2.md``). EDM's weight ``(sigma^2 + sd^2) / (sigma sd)^2`` would instead
weight the velocity error by ``t^2 (sigma^2 + sd^2) / (sigma sd)^2``, which vanishes at small ``t``
relative to the teacher's own loss. Degradation Recording trains its LoRA nodes with the same loss
(``method.dsm_loss``), so the path's nodes are flow models of the same kind.
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
from torch import Tensor, nn

from ..denoisers import OneStepGenerator, freeze
from ..flow import FlowMatchDenoiser, flow_sigmas
from ..losses import DSMLoss
from ..sigmas import LogitNormalSigma, UniformTimeSigma, flow_weight
from .cache import cached_model
from .problems import Digits, Problem, train_teacher

__all__ = ["DigitsFlow", "MODEL_CONFIG", "SHIFT", "EULER_STEPS", "flow_teacher"]

SHIFT = 1.0  # the scheduler's static timestep shift (a factor on sigma)
EULER_STEPS = 32  # the teacher's reference sampler: flow Euler steps from pure noise
POOLED_DIM = 8
MODEL_CONFIG: dict[str, Any] = {
    "sample_size": 8,
    "patch_size": 2,
    "in_channels": 1,
    "out_channels": 1,
    "num_layers": 2,
    "attention_head_dim": 32,
    "num_attention_heads": 2,
    "joint_attention_dim": Digits.PROMPT_DIM,
    "caption_projection_dim": 64,  # = heads x head dim (the context stream's width)
    "pooled_projection_dim": POOLED_DIM,
    "pos_embed_max_size": 8,
}
SMALL_CONFIG: dict[str, Any] = {
    **MODEL_CONFIG,
    "num_layers": 1,
    "attention_head_dim": 16,
    "caption_projection_dim": 32,
}


def flow_teacher(config: dict[str, Any] | None = None, shift: float = SHIFT) -> FlowMatchDenoiser:
    """A (random) ``SD3Transformer2DModel`` of ``config`` wrapped as the problem's denoiser."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    model = cast(nn.Module, SD3Transformer2DModel(**(config or MODEL_CONFIG)))
    return FlowMatchDenoiser(
        model,
        FlowMatchEulerDiscreteScheduler(shift=shift),
        extras={"pooled_projections": torch.zeros(1, POOLED_DIM)},
    )


class DigitsFlow(Digits):
    """Class-conditional 8x8 digits with a rectified-flow SD3 transformer teacher (``digits-flow``;
    see the module docstring for the design). Data, prompts, metrics (Frechet distance on the digits
    classifier's features, precision/recall, class coverage, label accuracy) are ``digits-text``'s."""

    REFERENCE_SAMPLER = f"flow Euler, {EULER_STEPS} steps"

    def __init__(
        self,
        cache_dir=None,
        teacher_steps: int = 4000,
        seed: int = 0,
        eval_samples: int = 2000,
        progress: bool = False,
    ):
        from .digits import digit_features, digits_classifier, load_digits_split

        self.conditional = True
        self.text = True
        pg = torch.Generator().manual_seed(2024)  # the same prompts as digits-text
        self.prompts = torch.cat(
            [
                torch.randn(10, self.PROMPT_TOKENS, self.PROMPT_DIM, generator=pg),
                torch.zeros(1, self.PROMPT_TOKENS, self.PROMPT_DIM),
            ]
        )
        self.x_train, self.y_train, self.x_test, self.y_test = load_digits_split()
        self.shift = SHIFT
        cfg: dict[str, Any] = {
            "model": {"class": "SD3Transformer2DModel", **MODEL_CONFIG},
            "pooled": "zeros",
            "prompts": {"tokens": self.PROMPT_TOKENS, "dim": self.PROMPT_DIM, "prompt_seed": 2024},
            "loss": "velocity",
            "t": {"dist": "logit_normal", "mean": 0.0, "std": 1.0},
            "shift": self.shift,
            "steps": teacher_steps,
            "lr": 1e-3,
            "batch": 128,
            "label_dropout": 0.1,
            "seed": seed,
            "recipe": 1,
        }
        sigma_data = 0.5  # unused by the flow losses; the methods' constructors take it

        def build(config: dict[str, Any] = MODEL_CONFIG) -> nn.Module:
            return flow_teacher(config, self.shift)

        def build_seeded() -> nn.Module:
            torch.manual_seed(seed)
            return build()

        def data(g: torch.Generator) -> tuple[Tensor, Tensor]:
            idx = torch.randint(0, len(self.x_train), (cfg["batch"],), generator=g)
            y = self.y_train[idx].clone()
            y[torch.rand(cfg["batch"], generator=g) < cfg["label_dropout"]] = self.NULL
            return self.x_train[idx], self._encode(y)

        def train(m: nn.Module) -> dict[str, Any]:
            t = cfg["t"]
            dsm = DSMLoss(LogitNormalSigma(t["mean"], t["std"], self.shift), sigma_data, "mean", weight=flow_weight)
            return train_teacher(m, data, steps=cfg["steps"], lr=cfg["lr"], dsm=dsm, seed=seed, progress=progress)

        self._builders = {"fresh": build, "small": lambda: build(SMALL_CONFIG)}
        teacher, info = cached_model("digits-flow-teacher", cfg, build_seeded, train, cache_dir)
        self.classifier, clf_info = digits_classifier(cache_dir)
        info = {**info, "classifier_test_accuracy": clf_info["test_accuracy"]}
        self._features = digit_features
        self._ref_feats = digit_features(self.classifier, self.x_test)
        Problem.__init__(self, "digits-flow", freeze(teacher), sigma_data, (1, 8, 8), "fd", info, eval_samples)

    # -- what the flow problem changes in a run -------------------------------------------------

    def generator_sigma_init(self, paper_value: float) -> float:
        """``math.inf`` for every adapter: the generator is fed exactly the noise at ``t = 1``."""
        return math.inf

    def student_sigmas(self, steps: int, sigma_init: float) -> tuple[float, ...]:
        """A K-step student's noise levels: ``flow_sigmas(K, shift)`` (``t = 1, (K-1)/K, ..``)."""
        if sigma_init != math.inf:
            raise ValueError(f"digits-flow students start from pure noise (sigma_init = inf), got {sigma_init}")
        return flow_sigmas(steps, shift=self.shift)

    def method_kwargs(self, adapter: str) -> dict[str, Any]:
        """Flow-time noise samplers for the adapter's method (module docstring)."""
        s = self.shift
        teacher_dist = LogitNormalSigma(0.0, 1.0, s)
        if adapter == "dmd2":
            return {
                "sigma_sampler": UniformTimeSigma(0.02, 0.98, s),
                "fake_sigma_sampler": UniformTimeSigma(1e-3, 0.999, s),
            }
        if adapter == "sid":
            return {"sigma_sampler": UniformTimeSigma(1e-3, 0.8, s), "fake_sigma_sampler": teacher_dist}
        if adapter == "di":
            return {"sigma_sampler": teacher_dist, "fake_sigma_sampler": teacher_dist}
        return {}

    def fake_dsm_weight(self):
        """The fake score's (and the recording's) DSM weight: the flow-matching velocity loss."""
        return flow_weight

    @torch.no_grad()
    def references(self, sigma_init: float) -> dict[str, dict[str, float]]:
        """The teacher's flow Euler samples (:data:`EULER_STEPS` steps from pure noise), its one-step
        output at ``sigma_init`` (``t = 1`` for ``inf``: ``z - v(z, 1)``) and held-out real data."""
        from ..fewstep import sample_fewstep

        z, c = self.eval_inputs()
        sig = flow_sigmas(EULER_STEPS, shift=self.shift)
        multi = sample_fewstep(self.teacher, z, c, sigmas=sig, noise="deterministic")
        one = OneStepGenerator(self.teacher, sigma_init)(z, c)
        return {
            "teacher_multistep": self.evaluate(multi, c),
            "teacher_onestep": self.evaluate(one, c),
            "data": self.evaluate(*self.heldout_data()),
        }
