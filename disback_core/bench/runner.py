"""Benchmark runner: base method vs DisBack on a built-in problem, several seeds, JSON + PNG.

One run = one :class:`RunSpec` and one seed. The runner builds the generator (a copy of the
teacher run one-step at the adapter's ``sigma_init``, or where the problem sets one, its own: ``inf`` for
the flow problem, whose generator is fed the noise at ``t = 1``) and the fake score (a copy of the teacher;
with DisBack, the most degraded node), trains with :func:`~disback_core.step.train_step`, and
evaluates on fixed inputs every ``eval_every`` generator iterations. Seconds count training only
(evaluation excluded); a DisBack run starts its clock with the degradation recording. Both wall
seconds and the process's CPU seconds are recorded: with one torch thread per process, CPU
seconds are what the wall clock shows on an idle core and are not inflated by other processes,
so benchmarks that run side by side compare on them.

JSON schema (``results.json``, ``"schema": "disback-benchmark/1"``)::

    {"schema", "command", "problem", "primary", "teacher": {..., "cache_key"}, "references": {sigma_init: {
       "teacher_multistep": {metric: value}, "teacher_onestep": {...}}},
     "reference_sampler": how the teacher's multi-step samples were drawn (e.g. "EDM Heun, 18 steps"),
     "runs": [{"label", "seed", "spec": {...}, "degradation_seconds", "switches": [[iteration, node]],
               "svd_output_error": [per node] or null (node_mode "svd" only: see record_degradation),
               "student_sigmas": [the K-step student's sigmas; [sigma_init] for one step],
               "divergence": null, or when the primary metric first rose above 10x its best so far (DivergenceMonitor),
               "evals": [{"iteration", "seconds", "cpu_seconds", "metrics": {metric: value},
                          "logs": {train_step log: mean since the previous evaluation}}],
               "final": {metric: value}, "seconds_per_iteration", "cpu_seconds_per_iteration", "threads",
               "frozen_fraction", "frozen_params", "images_per_iteration": {"real", "generated"}}],
     "summary": {label: {"final": {metric: {"mean", "std", "min", "max", "per_seed"}},
                         "iterations_to_base_final", "ratio_iterations", "seconds_to_base_final",
                         "ratio_seconds", "cpu_seconds_to_base_final", "ratio_cpu_seconds",
                         "seconds_per_iteration", "overhead_per_iteration", "cpu_overhead_per_iteration"}}}

While a bench runs, the file holds ``"partial": true`` and the runs so far, without ``"summary"``.

``final`` is the mean over the last 20% of evaluations (one-step generators oscillate). The
``*_to_base_final`` fields give the first evaluation at which the seed-mean curve, averaged over
the same trailing window as ``final``, reaches the base method's mean final value of the primary
metric (so the base reaches it at its last evaluation at the latest); the ratios divide by the
same quantity for the base run.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..backtracking import AdaptiveGap, Backtrack, Budgeted, FixedInterval, LinearPath
from ..denoisers import CFGDenoiser, OneStepGenerator, trainable_copy
from ..export import load_checkpoint
from ..faults import DivergenceMonitor
from ..fewstep import MultiStepGenerator, sample_fewstep
from ..freezing import apply_freezing
from ..lora import LoraSpec
from ..recording import record_degradation, resolve_lr_scale
from ..step import train_step
from ..storage import read_json, save_tensors, write_json
from .problems import Problem, get_problem

__all__ = [
    "RunSpec",
    "ADAPTERS",
    "run_one",
    "make_method",
    "record_path",
    "make_student",
    "compare",
    "summarise",
    "plot_curves",
]

SCHEMA = "disback-benchmark/1"
log = logging.getLogger(__name__)


def _adapters() -> dict[str, dict[str, Any]]:
    from ..adapters import DMD2, GDD, DiffInstruct, SiD

    # Paper settings per method: generator sigma_init and Adam betas / weight decay.
    return {
        "dmd2": {"cls": DMD2, "sigma_init": 80.0, "betas": (0.9, 0.999), "weight_decay": 0.01, "max_grad_norm": 10.0},
        "di": {
            "cls": DiffInstruct,
            "sigma_init": 1.0,
            "betas": (0.0, 0.999),
            "weight_decay": 0.0,
            "max_grad_norm": None,
        },
        "sid": {"cls": SiD, "sigma_init": 2.5, "betas": (0.0, 0.999), "weight_decay": 0.0, "max_grad_norm": None},
        # GDD: GAN only against real data; the discriminator takes the fake-score slot (make_fake)
        "gdd": {
            "cls": GDD,
            "sigma_init": 80.0,
            "betas": (0.0, 0.99),
            "weight_decay": 0.0,
            "max_grad_norm": None,
            "make_fake": lambda problem: GDD.discriminator_for(*problem.eval_inputs(64)),
        },
    }


ADAPTERS = ("dmd2", "di", "sid", "gdd")


@dataclass
class RunSpec:
    """One configuration; base and DisBack share everything but the ``disback`` fields."""

    label: str = "base"
    problem: str = "toy2d"
    adapter: str = "dmd2"
    iterations: int = 1000
    batch: int = 256
    lr: float = 1e-4  # generator and fake score (and degradation) alike
    eval_every: int = 50
    sigma_init: float | None = None  # default: the adapter's paper value
    disback: bool = False
    nodes: int = 5
    degradation_steps: int = 500
    node_mode: str = "lora"
    rank: int = 8
    # "fixed" (the paper's) | "linear" (interpolated targets, LinearPath) | "budget" (Budgeted score-gap rule)
    # | "adaptive" (AdaptiveGap, no budget) | "warm_start" (fake from node N, target = teacher)
    schedule: str = "fixed"
    share: float = 0.1  # fixed schedule: share of iterations spent on degraded targets
    adaptive_ratio: float = 0.5
    merge: bool = True
    # K-step student (DMD2 Sec. 4.5; 1 = the one-step generator): sigmas = fewstep_sigmas(K, sigma_max=sigma_init),
    # K points uniform on the Karras ramp, the analogue of DMD2's SDXL timesteps 999, 749, 499, 249
    student_steps: int = 1
    cfg_scale: float = (
        0.0  # teacher classifier-free guidance (0: none), at every node too (DMD2 guides the teacher only)
    )
    freeze: str = "none"  # generator freezing rule before the optimizer is built: "none" | "gddi" (freezing.py)
    # regimes (issue: where DisBack helps); base and DisBack alike
    student: str = "copy"  # generator net: the teacher's "copy" | "fresh" (re-initialised) | "small" net
    fake_lr_scale: float = 1.0  # fake-score learning rate = lr * fake_lr_scale (a slow critic: < 1)
    critic_steps: int = 0  # fake-score updates per generator update (0: the adapter's default, DMD2 5)
    init_generator: str = ""  # start the generator from these weights (safetensors), e.g. a distilled one
    # DisBack: recording learning rate = lr * this. None (the default): 3 for LoRA nodes, whose path then
    # matches full fine-tuning's node by node (benchmarks/path_shape.py), 1 for full and SVD nodes
    # (docs/WHEN_DISBACK_HELPS.md: the measured default)
    degradation_lr_scale: float | None = None
    # DisBack: where the fake score starts: "node" (node N, the paper's Alg. 1) | "teacher" (a copy of the
    # teacher, as the base; the path's targets alone: the SiD question of docs/WHEN_DISBACK_HELPS.md)
    fake_start: str = "node"

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_DEFAULT_SPEC = RunSpec().to_json()
# Fields whose default changed: what a stored spec without them ran with (so --resume never reuses it wrongly)
_ABSENT_MEANT = {"degradation_lr_scale": 1.0}


def degradation_lr(spec: RunSpec) -> float:
    """The recording learning rate of a DisBack run: ``lr * degradation_lr_scale``, the library's
    measured default by node mode when unset (:data:`~disback_core.recording.DEGRADATION_LR_SCALE`)."""
    return spec.lr * resolve_lr_scale(spec.node_mode, spec.degradation_lr_scale)


def same_spec(stored: dict[str, Any], want: dict[str, Any]) -> bool:
    """Whether a stored run's spec is the requested one: fields it lacks take the value they had when
    it ran (``_ABSENT_MEANT``) or the current default."""
    return {**_DEFAULT_SPEC, **_ABSENT_MEANT, **stored} == want


def weights_name(label: str, seed: int) -> str:
    """The file (in the results folder) holding a run's trained generator weights (safetensors)."""
    return f"generator-{label}-seed{seed}.safetensors"


def _optim(params, spec: RunSpec, a: dict[str, Any], scale: float = 1.0) -> torch.optim.Optimizer:
    lr = spec.lr * scale
    if a["weight_decay"]:
        return torch.optim.AdamW(params, lr=lr, betas=a["betas"], weight_decay=a["weight_decay"])
    return torch.optim.Adam(params, lr=lr, betas=a["betas"])


def make_student(problem: Problem, spec: RunSpec, sigma_init: float, sigmas: tuple[float, ...], seed: int):
    """The generator: the teacher's copy (or ``spec.student``'s net), one-step or K-step, optionally
    loaded from ``spec.init_generator``."""
    if spec.student == "copy":
        net = trainable_copy(problem.teacher)
    else:
        net = problem.student_net(spec.student, seed + 104729).requires_grad_(True).train()
    generator: torch.nn.Module = (
        OneStepGenerator(net, sigma_init)
        if spec.student_steps == 1
        else MultiStepGenerator(net, sigmas, generator=torch.Generator().manual_seed(seed + 7919))
    )
    if spec.init_generator:
        load_checkpoint(generator, spec.init_generator)
    return generator


@torch.no_grad()
def _generate(
    generator: torch.nn.Module, z: torch.Tensor, cond: torch.Tensor | None, chunk: int = 1000
) -> torch.Tensor:
    parts = range(0, z.shape[0], chunk)
    if isinstance(generator, MultiStepGenerator):  # all K steps, with the same fresh noise at every evaluation
        g = torch.Generator(device=z.device).manual_seed(4321)
        return torch.cat(
            [
                sample_fewstep(generator, z[i : i + chunk], None if cond is None else cond[i : i + chunk], generator=g)
                for i in parts
            ]
        )
    return torch.cat([generator(z[i : i + chunk], None if cond is None else cond[i : i + chunk]) for i in parts])


def make_method(problem: Problem, spec: RunSpec) -> Any:
    """The adapter's method at its paper settings, with the problem's noise samplers and fake-score
    DSM weight where the problem sets them (:meth:`Problem.method_kwargs`, :meth:`Problem.fake_dsm_weight`)."""
    a = _adapters()[spec.adapter]
    kwargs = {
        **problem.method_kwargs(spec.adapter),
        **({"critic_steps": spec.critic_steps} if spec.critic_steps else {}),
    }
    method = a["cls"](sigma_data=problem.sigma_data, **kwargs)
    weight = problem.fake_dsm_weight()
    if weight is not None:
        dsm = getattr(method, "dsm", None)
        if dsm is None:
            raise ValueError(
                f"problem {problem.name!r} sets the fake score's DSM weight, but {spec.adapter} has no DSM"
            )
        dsm.weight = weight
    return method


def record_path(
    problem: Problem,
    spec: RunSpec,
    generator: torch.nn.Module,
    method: Any,
    next_batch: Callable,
    progress: bool = False,
):
    """Degradation Recording as a DisBack run does it: ``spec.nodes`` nodes over
    ``spec.degradation_steps`` DSM steps toward a frozen copy of ``generator`` (G0)."""
    frozen_g0 = copy.deepcopy(generator).requires_grad_(False)
    interval = max(1, spec.degradation_steps // spec.nodes)
    return record_degradation(
        problem.teacher,
        frozen_g0,
        method,
        next_batch,
        steps=interval * spec.nodes,
        interval=interval,
        lr=spec.lr,
        degradation_lr_scale=spec.degradation_lr_scale,
        mode=spec.node_mode,
        lora=LoraSpec(rank=spec.rank),
        merge=spec.merge,
        progress=progress,
    )


def run_one(
    problem: Problem,
    spec: RunSpec,
    seed: int,
    progress: bool = False,
    track: Callable[[str, int, dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Train one generator and return its curve (see the module docstring for the fields).

    ``track(run_name, iteration, scalars)`` receives every evaluation (see :mod:`.tracking`)."""
    a = _adapters()[spec.adapter]
    sigma_init = spec.sigma_init or problem.generator_sigma_init(a["sigma_init"])
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    method = make_method(problem, spec)
    student_sigmas = problem.student_sigmas(spec.student_steps, sigma_init)
    generator = make_student(problem, spec, sigma_init, student_sigmas, seed)
    if spec.fake_start not in ("node", "teacher"):
        raise ValueError(f"fake_start must be 'node' or 'teacher', got {spec.fake_start!r}")
    if spec.disback and spec.adapter == "gdd":
        raise ValueError(
            "DisBack does not apply to gdd: GDD has no target score and no DSM to record or backtrack; "
            "use the 'base' variant"
        )
    freeze_report = apply_freezing(generator, spec.freeze)
    needs_real = getattr(method, "needs_real", False) or getattr(method, "gan_head", None) is not None
    next_batch: Callable = lambda: problem.batch(spec.batch, g, with_real=needs_real)  # noqa: E731
    degradation_seconds, degradation_cpu, switches, svd_output_error = 0.0, 0.0, [], None
    target: Any = problem.teacher
    guidance: Callable[[torch.nn.Module], torch.nn.Module] | None = None
    if spec.cfg_scale:
        uncond = problem.uncond()
        if uncond is None:
            raise ValueError(f"cfg_scale: problem {problem.name!r} has no unconditional input for guidance")
        guidance = lambda t: CFGDenoiser(t, spec.cfg_scale, uncond)  # noqa: E731 - the teacher and every node
        target = guidance(problem.teacher)
    if spec.disback:
        t0, c0 = time.perf_counter(), time.process_time()
        traj = record_path(problem, spec, generator, method, next_batch, progress)
        svd_output_error = traj.meta.get("svd_output_error")
        if spec.schedule == "fixed":
            schedule = FixedInterval.from_share(spec.iterations, traj.last, spec.share)
            method = Backtrack(method, traj, schedule, guidance=guidance)
        elif spec.schedule == "adaptive":
            method = Backtrack(method, traj, AdaptiveGap(ratio=spec.adaptive_ratio), guidance=guidance)
        elif spec.schedule == "budget":
            rule = AdaptiveGap(ratio=spec.adaptive_ratio, warmup=3, min_steps=5, max_steps=spec.iterations)
            method = Backtrack(method, traj, Budgeted(spec.iterations, spec.share, rule), guidance=guidance)
        elif spec.schedule == "linear":
            method = Backtrack(method, traj, LinearPath(spec.iterations, spec.share), guidance=guidance)
        elif spec.schedule == "warm_start":
            method = Backtrack(method, traj, FixedInterval(1), start=0, guidance=guidance)
        else:
            raise ValueError(f"unknown schedule {spec.schedule!r}")
        fake = method.initial_fake() if spec.fake_start == "node" else trainable_copy(problem.teacher)
        target = method.target
        degradation_seconds, degradation_cpu = time.perf_counter() - t0, time.process_time() - c0
    else:
        fake = a["make_fake"](problem) if "make_fake" in a else trainable_copy(problem.teacher)
    g_opt = _optim([p for p in generator.parameters() if p.requires_grad], spec, a)
    f_opt = _optim([*fake.parameters(), *method.critic_parameters()], spec, a, spec.fake_lr_scale)
    z_eval, c_eval = problem.eval_inputs()

    def evaluate(it: int) -> dict[str, Any]:
        e: dict[str, Any] = {
            "iteration": it,
            "seconds": degradation_seconds + train_seconds,
            "cpu_seconds": degradation_cpu + train_cpu,
            "metrics": problem.evaluate(_generate(generator, z_eval, c_eval), c_eval),
            # training statistics averaged since the previous evaluation (the candidates for an adaptive rule)
            "logs": {k: statistics.fmean(v) for k, v in since.items()},
        }
        since.clear()
        log.info("%s seed %d it %d: %s", spec.label, seed, it, {k: round(v, 4) for k, v in e["metrics"].items()})
        if monitor.update(e["metrics"][problem.primary]) and not divergence:
            divergence.append(f"iteration {it}: {monitor.report}")
            log.warning(
                "%s seed %d: the generator is diverging (%s at iteration %d)", spec.label, seed, monitor.report, it
            )
        if track is not None:
            track(f"{spec.adapter}-{spec.label}-seed{seed}", it, {**e["metrics"], "cpu_seconds": e["cpu_seconds"]})
        return e

    train_seconds = train_cpu = 0.0
    since: dict[str, list[float]] = {}
    # a primary metric 10x above its best so far (or non-finite), after two evaluations, is reported
    monitor = DivergenceMonitor(factor=10.0, warmup=2)
    divergence: list[str] = []
    evals = [evaluate(0)]
    it_range = range(1, spec.iterations + 1)
    if progress:
        from tqdm.auto import tqdm

        it_range = tqdm(it_range, desc=f"{spec.label} seed {seed}", leave=False)
    for it in it_range:
        t0, c0 = time.perf_counter(), time.process_time()
        logs = train_step(method, generator, fake, target, g_opt, f_opt, next_batch, max_grad_norm=a["max_grad_norm"])
        train_seconds += time.perf_counter() - t0
        train_cpu += time.process_time() - c0
        for k, v in logs.items():
            since.setdefault(k, []).append(v)
        if it % spec.eval_every == 0 or it == spec.iterations:
            evals.append(evaluate(it))
    if spec.disback:
        switches = [list(s) for s in method.switches]
    tail = evals[1:][-_final_window(len(evals) - 1) :]
    final = {k: statistics.fmean(e["metrics"][k] for e in tail) for k in tail[0]["metrics"]}
    samples = _generate(generator, z_eval[:1000], None if c_eval is None else c_eval[:1000])
    return {
        "label": spec.label,
        "seed": seed,
        "spec": spec.to_json(),
        "sigma_init": sigma_init,
        "degradation_seconds": degradation_seconds,
        "degradation_cpu_seconds": degradation_cpu,
        "switches": switches,
        "svd_output_error": svd_output_error,
        "evals": evals,
        "final": final,
        "threads": torch.get_num_threads(),
        "seconds_per_iteration": train_seconds / spec.iterations,
        "cpu_seconds_per_iteration": train_cpu / spec.iterations,
        "_samples": samples,
        "_cond": c_eval,
        "student_sigmas": list(student_sigmas),
        "divergence": divergence[0] if divergence else None,
        "frozen_fraction": freeze_report.fraction,
        "frozen_params": freeze_report.frozen_params,
        # per generator iteration: real images the critic consumed, generator samples drawn
        "images_per_iteration": {
            "real": spec.batch * method.critic_steps if needs_real else 0,
            "generated": spec.batch * (method.critic_steps + 1),
        },
        "_weights": {k: v.detach().cpu().contiguous() for k, v in generator.state_dict().items()},
    }


def _mean_curve(runs: list[dict[str, Any]], key: str, x: str) -> tuple[list[float], list[float]]:
    xs = [statistics.fmean(r["evals"][i][x] for r in runs) for i in range(len(runs[0]["evals"]))]
    ys = [statistics.fmean(r["evals"][i]["metrics"][key] for r in runs) for i in range(len(runs[0]["evals"]))]
    return xs, ys


def _final_window(n_evals: int) -> int:
    """How many of ``n_evals`` evaluations (after the initial one) the final value averages: the last 20%."""
    return max(1, math.ceil(0.2 * n_evals))


def _first_reach(xs: list[float], ys: list[float], level: float, window: int) -> float | None:
    """First x at which the trailing mean of ``window`` values (after the initial one) is <= level."""
    for i in range(window, len(ys)):
        if statistics.fmean(ys[i - window + 1 : i + 1]) <= level * (1 + 1e-12):
            return xs[i]
    return None


def _area(run: dict[str, Any], key: str) -> float:
    """The curve's mean over the run's iterations (trapezoids; the area under it over its length): a
    measure that also ranks runs that oscillate or never settle, where "time to the base's final
    value" can be met by chance."""
    xs = [e["iteration"] for e in run["evals"]]
    ys = [e["metrics"][key] for e in run["evals"]]
    if len(xs) < 2 or xs[-1] == xs[0]:
        return ys[-1]
    return sum((xs[i + 1] - xs[i]) * (ys[i] + ys[i + 1]) / 2 for i in range(len(xs) - 1)) / (xs[-1] - xs[0])


def _at_budget(run: dict[str, Any], key: str, x: str, budget: float) -> float | None:
    """The run's value at equal compute: the metric averaged, as a final value is, over the trailing
    window of evaluations that ends at its last one within ``budget`` (of ``x``: CPU or wall seconds,
    Degradation Recording included). For the base at its own budget this is its final value."""
    evals = run["evals"]
    n = sum(1 for e in evals if e[x] <= budget * (1 + 1e-9))
    w = _final_window(len(evals) - 1)
    if n <= w:  # not even a window of evaluations (after the initial one) within the budget
        return None
    return statistics.fmean(e["metrics"][key] for e in evals[n - w : n])


def _spread(v: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0}


def summarise(runs: list[dict[str, Any]], primary: str, base_label: str = "base") -> dict[str, Any]:
    """Per label: final metrics over seeds (mean, std, min, max), the area under the primary metric's
    curve, its value at the base's compute budget and the time to the base's final value."""
    labels = list(dict.fromkeys(r["label"] for r in runs))
    by = {lab: [r for r in runs if r["label"] == lab] for lab in labels}
    out: dict[str, Any] = {}
    for lab, rs in by.items():
        final = {}
        for k in rs[0]["final"]:
            v = [r["final"][k] for r in rs]
            final[k] = {
                "mean": statistics.fmean(v),
                "std": statistics.stdev(v) if len(v) > 1 else 0.0,
                "min": min(v),
                "max": max(v),
                "per_seed": v,
            }
        out[lab] = {
            "final": final,
            "seeds": [r["seed"] for r in rs],
            "seconds_per_iteration": statistics.fmean(r["seconds_per_iteration"] for r in rs),
            "degradation_seconds": statistics.fmean(r["degradation_seconds"] for r in rs),
        }
        if all("cpu_seconds_per_iteration" in r for r in rs):
            out[lab]["cpu_seconds_per_iteration"] = statistics.fmean(r["cpu_seconds_per_iteration"] for r in rs)
        out[lab]["auc"] = _spread([_area(r, primary) for r in rs])
    if base_label in by:
        x = "cpu_seconds" if all("cpu_seconds" in e for r in runs for e in r["evals"]) else "seconds"
        # each seed against the same seed's base budget (the mean budget where the base lacks that seed)
        budgets = {r["seed"]: r["evals"][-1][x] for r in by[base_label]}
        mean_budget = statistics.fmean(budgets.values())
        base_auc = out[base_label]["auc"]["mean"]
        for lab, rs in by.items():
            at = [_at_budget(r, primary, x, budgets.get(r["seed"], mean_budget)) for r in rs]
            out[lab]["at_base_budget"] = None if None in at else _spread([a for a in at if a is not None])
            out[lab]["budget"] = {"of": x, "seconds": mean_budget}
            out[lab]["ratio_auc"] = out[lab]["auc"]["mean"] / base_auc if base_auc else None
        level = out[base_label]["final"][primary]["mean"]
        w = _final_window(len(by[base_label][0]["evals"]) - 1)
        ref_it = _first_reach(*_mean_curve(by[base_label], primary, "iteration"), level, w)
        ref_s = _first_reach(*_mean_curve(by[base_label], primary, "seconds"), level, w)
        has_cpu = all("cpu_seconds" in e for r in runs for e in r["evals"])
        ref_c = _first_reach(*_mean_curve(by[base_label], primary, "cpu_seconds"), level, w) if has_cpu else None
        base_spi = out[base_label]["seconds_per_iteration"]
        ratio = lambda a, b: (a / b) if a is not None and b else None  # noqa: E731
        for lab, rs in by.items():
            it = _first_reach(*_mean_curve(rs, primary, "iteration"), level, w)
            sec = _first_reach(*_mean_curve(rs, primary, "seconds"), level, w)
            out[lab].update(
                {
                    "iterations_to_base_final": it,
                    "seconds_to_base_final": sec,
                    "ratio_iterations": ratio(it, ref_it),
                    "ratio_seconds": ratio(sec, ref_s),
                    "overhead_per_iteration": out[lab]["seconds_per_iteration"] / base_spi,
                }
            )
            if has_cpu:
                cpu = _first_reach(*_mean_curve(rs, primary, "cpu_seconds"), level, w)
                out[lab].update(
                    {
                        "cpu_seconds_to_base_final": cpu,
                        "ratio_cpu_seconds": ratio(cpu, ref_c),
                        "cpu_overhead_per_iteration": out[lab]["cpu_seconds_per_iteration"]
                        / out[base_label]["cpu_seconds_per_iteration"],
                    }
                )
    return out


def plot_curves(result: dict[str, Any], path: str | Path, metric: str | None = None) -> None:
    """Metric vs generator iterations and vs wall seconds: seed mean, min-max band, reference lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = metric or result["primary"]
    runs = result["runs"]
    labels = list(dict.fromkeys(r["label"] for r in runs))
    time_key = "cpu_seconds" if all("cpu_seconds" in e for r in runs for e in r["evals"]) else "seconds"
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, x in zip(axes, ("iteration", time_key)):
        for i, lab in enumerate(labels):
            rs = [r for r in runs if r["label"] == lab]
            n = min(len(r["evals"]) for r in rs)
            xs = [statistics.fmean(r["evals"][j][x] for r in rs) for j in range(n)]
            ys = [[r["evals"][j]["metrics"][metric] for r in rs] for j in range(n)]
            ax.plot(xs, [statistics.fmean(y) for y in ys], color=f"C{i}", label=f"{lab} ({len(rs)} seeds)")
            ax.fill_between(xs, [min(y) for y in ys], [max(y) for y in ys], color=f"C{i}", alpha=0.2)
        for j, (si, refs) in enumerate(sorted(result["references"].items())):
            ax.axhline(
                refs["teacher_multistep"][metric],
                color="k",
                ls="--",
                lw=0.8,
                label="teacher multi-step" if j == 0 else None,
            )
            ax.axhline(
                refs["teacher_onestep"][metric], color="0.5", ls=":", lw=0.8, label=f"teacher one-step (sigma {si})"
            )
            if j == 0 and "data" in refs:
                ax.axhline(max(refs["data"][metric], 1e-6), color="g", ls="-.", lw=0.8, label="held-out data")
        ax.set_xlabel(
            "generator iterations"
            if x == "iteration"
            else f"{'CPU' if x == 'cpu_seconds' else 'wall'} seconds of training (DisBack incl. recording)"
        )
        ax.set_ylabel(metric)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{result['problem']}: {metric} (lower is better; band = min..max over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _portable(info: dict[str, Any]) -> dict[str, Any]:
    """Teacher facts without this machine's cache path (results are committed and shared)."""
    out = {k: v for k, v in info.items() if k != "path"}
    if "path" in info:
        out["cache_key"] = Path(info["path"]).name
    return out


def _stored(path: Path, problem: str) -> tuple[dict[tuple[str, int], dict[str, Any]], list[str]]:
    """Runs of an earlier ``results.json`` (complete or partial) of the same problem, by (label, seed),
    and the commands that made them (its ``command`` after its ``earlier_commands``)."""
    if not path.is_file():
        return {}, []
    res = read_json(path, "benchmark results")
    if res.get("schema") != SCHEMA or res.get("problem") != problem:
        raise ValueError(
            f"--resume: {path} holds {res.get('schema')!r} results for problem {res.get('problem')!r}, "
            f"not {SCHEMA!r} for {problem!r}; choose another --out"
        )
    commands = [c for c in [*res.get("earlier_commands", []), res.get("command")] if isinstance(c, str) and c]
    return {(r["label"], r["seed"]): r for r in res.get("runs", [])}, commands


def compare(
    specs: list[RunSpec],
    seeds: list[int],
    out_dir: str | Path,
    command: str = "",
    progress: bool = True,
    problem: Problem | None = None,
    cache_dir=None,
    track: Callable[[str, int, dict[str, float]], None] | None = None,
    resume: bool = False,
    save_weights: bool = True,
) -> dict[str, Any]:
    """Run every spec for every seed on one problem; write results.json, curves and sample PNGs.

    ``results.json`` is rewritten after every run (with ``"partial": true`` until the end), so an
    interrupted benchmark loses at most one run. With ``resume``, runs stored there whose label,
    seed and spec equal the requested ones are reused instead of rerun (a stored spec lacking a
    newer RunSpec field is compared with the value it ran with: :func:`same_spec`). With ``save_weights``, each new
    run's generator is saved as ``generator-LABEL-seedS.safetensors`` (for ``disback guide``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = {s.problem for s in specs}
    if len(names) != 1:
        raise ValueError(f"compare() runs one problem at a time, got {sorted(names)}")
    problem = problem or get_problem(specs[0].problem, cache_dir)
    adapters = _adapters()
    sigma_inits = sorted(
        {s.sigma_init or problem.generator_sigma_init(adapters[s.adapter]["sigma_init"]) for s in specs}
    )
    # before the slow references
    stored, earlier = _stored(out / "results.json", problem.name) if resume else ({}, [])
    references = {str(si): problem.references(si) for si in sigma_inits}
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "command": command,
        "problem": problem.name,
        "primary": problem.primary,
        "teacher": _portable(problem.teacher_info),
        "references": references,
        "reference_sampler": problem.REFERENCE_SAMPLER,
    }
    earlier = [c for i, c in enumerate(earlier) if c != command and c not in earlier[:i]]
    if earlier:  # the commands of the stored runs a --resume keeps, oldest first
        result["earlier_commands"] = earlier
    # stored runs this command does not ask for (other variants or seeds) stay in the file: a --resume
    # with fewer variants adds to a results folder, it never drops what an earlier command measured
    asked = {(s.label, seed) for s in specs for seed in seeds}
    kept = [r for key, r in stored.items() if key not in asked]
    runs: list[dict[str, Any]] = []
    for spec in specs:
        want = json.loads(json.dumps(spec.to_json()))
        for seed in seeds:
            old = stored.get((spec.label, seed))
            # compare with defaults filled in: results stored before a RunSpec field existed still match
            if old is not None and same_spec(old["spec"], want):
                log.info("%s seed %d: reusing the stored run", spec.label, seed)
                runs.append(old)
                continue
            r = run_one(problem, spec, seed, progress=progress, track=track)
            samples, cond = r.pop("_samples"), r.pop("_cond")
            weights = r.pop("_weights")
            if save_weights:  # for `disback guide`
                save_tensors(out / weights_name(spec.label, seed), weights)
            if seed == seeds[0]:
                problem.save_samples(
                    samples, out / f"samples-{spec.label}.png", f"{spec.label}, seed {seed}, {spec.iterations} it", cond
                )
            runs.append(r)
            write_json(out / "results.json", {**result, "partial": True, "runs": runs + kept})
    runs += kept
    result["runs"] = runs
    result["summary"] = summarise(runs, problem.primary, base_label=specs[0].label)
    write_json(out / "results.json", result)
    plot_curves(result, out / "curves.png")
    return result
