"""The ``disback`` console script.

- ``disback demo``: the main job. On a built-in problem (``toy2d`` by default), train or load the
  cached teacher, distil it with one adapter with and without DisBack, write ``report.md``,
  ``results.json``, curve and sample PNGs into ``--out``, and print a summary table.
- ``disback bench``: the same runner with any list of variants, for the committed benchmarks.
  A variant is ``base``, ``disback``, or ``disback:key=value,...`` overriding DisBack settings
  (``nodes``, ``degradation_steps``, ``node_mode``, ``rank``, ``schedule``, ``share``,
  ``adaptive_ratio``, ``merge``, ``degradation_lr_scale``), e.g. ``disback:share=0.3`` or
  ``disback:schedule=budget``. ``disback`` records LoRA nodes at 3x the learning rate (the measured
  default, docs/WHEN_DISBACK_HELPS.md); ``disback:degradation_lr_scale=1`` is the paper's path.
  ``--student-steps 1 2 4`` trains K-step students (DMD2's multi-step generator) per variant.
- ``disback guide``: the trained students of bench folders with and without Distillation++
  teacher guidance, the metric against network evaluations (:mod:`disback_core.bench.guide`).
- ``disback train``: the training script (:mod:`disback_core.train`: DMD2, Diff-Instruct or SiD, with
  or without DisBack, on a built-in problem or a diffusers model, one or many processes, exact resume,
  ``--export``); every argument after ``train`` is its own (``disback train --help``). Needs
  ``accelerate`` (``pip install 'disback[distributed]'``).
- ``disback export STATE OUT``: the generator of a saved ``disback train`` state (a run folder, its
  ``state/`` or a kept step folder), rebuilt from the run configuration the state holds, exported
  with ``export_generator``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypedDict

__all__ = ["main"]

log = logging.getLogger("disback")


class _ProblemDefaults(TypedDict):
    iterations: int
    batch: int
    lr: float
    eval_every: int
    degradation_steps: int


# Defaults per problem: generator iterations, batch, learning rate, evaluation interval,
# degradation steps. The demo's toy2d default runs in a few minutes on 2 CPU cores.
PROBLEM_DEFAULTS: dict[str, _ProblemDefaults] = {
    "toy2d": {"iterations": 600, "batch": 256, "lr": 1e-4, "eval_every": 25, "degradation_steps": 500},
    "toy2d-edm": {"iterations": 600, "batch": 256, "lr": 1e-4, "eval_every": 25, "degradation_steps": 500},
    "grid25": {"iterations": 600, "batch": 256, "lr": 1e-4, "eval_every": 25, "degradation_steps": 500},
    "digits": {"iterations": 600, "batch": 64, "lr": 5e-5, "eval_every": 50, "degradation_steps": 300},
    "digits-cond": {"iterations": 600, "batch": 64, "lr": 5e-5, "eval_every": 50, "degradation_steps": 300},
    "digits-text": {"iterations": 600, "batch": 64, "lr": 5e-5, "eval_every": 50, "degradation_steps": 300},
    "digits-flow": {"iterations": 600, "batch": 64, "lr": 5e-5, "eval_every": 50, "degradation_steps": 300},
    "patches": {"iterations": 600, "batch": 64, "lr": 5e-5, "eval_every": 50, "degradation_steps": 300},
}
DISBACK_FIELDS: dict[str, Callable[[str], Any]] = {
    "nodes": int,
    "degradation_steps": int,
    "node_mode": str,
    "rank": int,
    "schedule": str,
    "share": float,
    "adaptive_ratio": float,
    "merge": lambda v: v.lower() in ("1", "true", "yes"),
    "degradation_lr_scale": float,
    "fake_start": str,
}


def _base_spec(args: argparse.Namespace, adapter: str):
    from .bench.runner import RunSpec

    d = PROBLEM_DEFAULTS[args.problem]
    return RunSpec(
        label="base",
        problem=args.problem,
        adapter=adapter,
        iterations=args.iterations or d["iterations"],
        batch=args.batch or d["batch"],
        lr=args.lr or d["lr"],
        eval_every=args.eval_every or d["eval_every"],
        degradation_steps=args.degradation_steps or d["degradation_steps"],
        freeze=args.freeze,
        cfg_scale=args.cfg_scale,
        student=args.student,
        fake_lr_scale=args.fake_lr_scale,
        critic_steps=args.critic_steps,
        init_generator=args.init_generator or "",
    )


def parse_variant(base, text: str):
    """``base`` | ``disback`` | ``disback:key=value,...`` -> a RunSpec derived from ``base``."""
    if text == "base":
        return dataclasses.replace(base, label="base", disback=False)
    if text == "disback":
        return dataclasses.replace(base, label="disback", disback=True)
    if not text.startswith("disback:"):
        raise ValueError(f"variant {text!r}: expected 'base', 'disback' or 'disback:key=value,...'")
    changes = {}
    for item in text[len("disback:") :].split(","):
        key, _, value = item.partition("=")
        if key not in DISBACK_FIELDS or not value:
            raise ValueError(f"variant {text!r}: unknown or empty setting {key!r}; known: {sorted(DISBACK_FIELDS)}")
        changes[key] = DISBACK_FIELDS[key](value)
    return dataclasses.replace(
        base, label=text.replace("disback:", "disback-").replace(",", "-").replace("=", ""), disback=True, **changes
    )


def _run(args: argparse.Namespace, variants: list[str], title: str, quiet: bool = False) -> int:
    import torch

    from .bench.problems import get_problem
    from .bench.report import summary_table, write_report
    from .bench.runner import compare
    from .bench.tracking import make_tracker

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    out = Path(args.out)
    command = "disback " + " ".join(shlex.quote(a) for a in args.argv) if args.record_command else ""
    log.info("problem %s: loading or training the teacher (cached after the first run)", args.problem)
    kw = {"teacher_steps": args.teacher_steps} if args.teacher_steps else {}
    if args.eval_samples:
        kw["eval_samples"] = args.eval_samples
    problem = get_problem(args.problem, args.cache_dir, progress=not args.no_progress, **kw)
    for k, v in problem.teacher_info.items():
        if k != "path":
            log.info("teacher %s: %s", k, v)
    track = make_tracker(args.tracker, out)
    results = {}
    for adapter in args.adapter:
        base = _base_spec(args, adapter)
        specs = [parse_variant(base, v) for v in variants]
        # K-step students (DMD2 Sec. 4.5): one spec per K; K = 1 keeps its label, so old results still --resume
        specs = [
            dataclasses.replace(s, student_steps=k, label=s.label if k == 1 else f"{s.label}-{k}step")
            for k in args.student_steps
            for s in specs
        ]
        folder = out / adapter if len(args.adapter) > 1 else out
        res = compare(
            specs,
            args.seeds,
            folder,
            command=command,
            progress=not args.no_progress,
            problem=problem,
            track=track,
            resume=args.resume,
            save_weights=args.save_weights,
        )
        write_report(res, folder / "report.md", f"{title}: {args.problem}, {adapter}")
        results[adapter] = res
        if not quiet:
            print(f"\n{args.problem} / {adapter} ({len(args.seeds)} seeds, {base.iterations} generator iterations)")
            print(summary_table(res))
    if not quiet:
        print(f"\nwrote {out} in {time.perf_counter() - t0:.0f} s")
    return 0


# The regime `disback demo` runs beside the built-in one (docs/WHEN_DISBACK_HELPS.md), as RunSpec
# overrides of the same problem and budget, and what to call it.
HEADLINE: dict[str, Any] = {"fake_lr_scale": 0.3}
HEADLINE_TEXT = "a slow critic (fake-score learning rate 0.3x the generator's)"


def _demo_job(settings: dict[str, Any], title: str) -> int:
    """One demo regime in a worker process (spawned: logging is set up again here)."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    return _run(argparse.Namespace(**settings), ["base", "disback"], title, quiet=True)


def _demo(args: argparse.Namespace) -> int:
    """The built-in regime, and with ``--headline`` the headline regime in ``OUT/headline``, side by
    side in two processes (each with half the CPU threads unless ``--threads``)."""
    import os
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from .bench.problems import get_problem
    from .bench.report import summary_table
    from .storage import read_json

    head = argparse.Namespace(**{**vars(args), **HEADLINE, "out": str(Path(args.out) / "headline")})
    if not args.headline or all(getattr(args, k) == v for k, v in HEADLINE.items()):
        return _run(args, ["base", "disback"], "disback demo")
    kw = {"teacher_steps": args.teacher_steps} if args.teacher_steps else {}
    get_problem(args.problem, args.cache_dir, progress=not args.no_progress, **kw)  # train/cache the teacher once
    threads = args.threads or max(1, (os.cpu_count() or 2) // 2)
    jobs = [
        (args, "disback demo: the built-in regime"),
        (head, f"disback demo, headline regime: {HEADLINE_TEXT}"),
    ]
    log.info("running the built-in regime (%s) and the headline regime (%s) side by side", args.out, head.out)
    t0 = time.perf_counter()
    with ProcessPoolExecutor(2, mp_context=get_context("spawn")) as pool:
        futures = [
            pool.submit(_demo_job, {**vars(ns), "threads": threads, "no_progress": True}, title) for ns, title in jobs
        ]
        codes = [f.result() for f in futures]
    for ns, title in jobs:
        for adapter in ns.adapter:
            folder = Path(ns.out) / adapter if len(ns.adapter) > 1 else Path(ns.out)
            print(f"\n{title}, {adapter} -> {folder}")
            print(summary_table(read_json(folder / "results.json", "demo results")))
    print(f"\nwrote {args.out} in {time.perf_counter() - t0:.0f} s")
    return max(codes)


def _report(paths: list[str]) -> int:
    """Re-summarise stored runs with the current rules; rewrite results.json, curves.png, report.md."""
    from .bench.report import summary_table, write_report
    from .bench.runner import SCHEMA, plot_curves, summarise
    from .storage import read_json, write_json

    for path in map(Path, paths):
        res = read_json(path, "benchmark results")
        if not isinstance(res, dict) or res.get("schema") != SCHEMA or res.get("partial"):
            raise SystemExit(f"{path}: not a complete {SCHEMA} results file")
        res["summary"] = summarise(res["runs"], res["primary"], base_label=res["runs"][0]["label"])
        write_json(path, res)
        plot_curves(res, path.parent / "curves.png")
        adapter = res["runs"][0]["spec"]["adapter"]
        write_report(res, path.parent / "report.md", f"disback bench: {res['problem']}, {adapter}")
        print(f"{path}:\n{summary_table(res)}\n")
    return 0


def _common(p: argparse.ArgumentParser, adapters_default: list[str]) -> None:
    from .bench.problems import PROBLEMS, STUDENTS
    from .bench.runner import ADAPTERS

    p.add_argument("--problem", choices=PROBLEMS, default="toy2d")
    p.add_argument("--adapter", choices=ADAPTERS, nargs="+", default=adapters_default)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--iterations", type=int, help="generator iterations (default per problem)")
    p.add_argument("--batch", type=int)
    p.add_argument("--lr", type=float, help="learning rate of generator, fake score and degradation alike")
    p.add_argument("--eval-every", type=int)
    p.add_argument("--eval-samples", type=int, help="samples per evaluation (default: toy2d 4000, digits 2000)")
    p.add_argument("--degradation-steps", type=int)
    p.add_argument(
        "--cfg-scale",
        type=float,
        default=0.0,
        help="teacher classifier-free guidance scale for conditional problems (0: none); every node "
        "of the path is guided alike",
    )
    p.add_argument(
        "--student-steps",
        type=int,
        nargs="+",
        default=[1],
        metavar="K",
        help="train K-step students (DMD2's multi-step generator; sigmas: K points uniform on the "
        "Karras ramp from sigma_init, see disback_core.fewstep.fewstep_sigmas); several K: "
        "one run per K, labelled VARIANT-Kstep (default 1, the one-step generator)",
    )
    p.add_argument(
        "--freeze",
        choices=["none", "gddi"],
        default="none",
        help="freeze part of the generator before training: gddi = GDD-I's rule (3x3 convs and attention "
        "output projections of every UNet block, disback_core.freezing); any adapter",
    )
    p.add_argument(
        "--student",
        choices=STUDENTS,
        default="copy",
        help="the generator's network: a copy of the teacher (default), the teacher's architecture "
        "re-initialised, or a smaller network (fresh); the fake score and the path stay on the teacher's",
    )
    p.add_argument(
        "--fake-lr-scale",
        type=float,
        default=1.0,
        help="fake-score learning rate = lr * this (a slow critic: below 1)",
    )
    p.add_argument(
        "--critic-steps",
        type=int,
        default=0,
        help="fake-score updates per generator update (0: the adapter's default; DMD2 5)",
    )
    p.add_argument(
        "--init-generator",
        help="start every variant's generator from these weights (a .safetensors file, e.g. a bench "
        "run's generator-base-seed0.safetensors: an already distilled generator)",
    )
    p.add_argument("--cache-dir", help="teacher cache (default $DISBACK_CACHE or ~/.cache/disback)")
    p.add_argument(
        "--teacher-steps",
        type=int,
        help="teacher training steps (default per problem; a quick check may use fewer, the cache keys on it)",
    )
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--tracker",
        choices=["none", "tensorboard", "wandb"],
        default="none",
        help="also send curves to TensorBoard or wandb (must be installed; never required)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="reuse the runs of an earlier (complete or interrupted) results.json in --out whose "
        "label, seed and settings match; run only the rest",
    )
    p.add_argument(
        "--save-weights",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="save each run's trained generator as generator-LABEL-seedS.safetensors in --out "
        "(what `disback guide` evaluates)",
    )
    p.add_argument(
        "--record-command",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="store the command line in results.json",
    )


def _diagnose(folders: list[str]) -> int:
    from .diagnostics import diagnose_results
    from .storage import read_json

    for folder in folders:
        path = Path(folder) / "results.json" if Path(folder).is_dir() else Path(folder)
        print(f"{folder}:")
        for line in diagnose_results(read_json(path)):
            print(f"  {line}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="disback", description="Distribution Backtracking for one-step diffusion distillation", allow_abbrev=False
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    # every parser refuses abbreviated options (`disback demo --seed 0` is not --seeds)
    d = sub.add_parser("demo", allow_abbrev=False, help="the main job: base method vs DisBack on a built-in problem")
    _common(d, ["dmd2"])
    d.add_argument("--out", default="runs/demo")
    d.add_argument(
        "--headline",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=f"also run the headline regime, {HEADLINE_TEXT}, into OUT/headline, side by side with the "
        "built-in one (docs/WHEN_DISBACK_HELPS.md)",
    )
    b = sub.add_parser("bench", allow_abbrev=False, help="benchmark variants (base, disback, disback:key=value,...)")
    _common(b, ["dmd2"])
    b.add_argument("--variants", nargs="+", default=["base", "disback"])
    b.add_argument("--out", required=True)
    gd = sub.add_parser(
        "guide",
        allow_abbrev=False,
        help="evaluate the trained students of bench results with and without "
        "Distillation++ teacher guidance: metric vs network evaluations",
    )
    gd.add_argument("results", nargs="+", help="bench output folders (results.json + generator-*.safetensors)")
    gd.add_argument("--guided-steps", type=int, nargs="+", default=[1, 2])
    gd.add_argument("--lams", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    gd.add_argument(
        "--final-sigmas",
        nargs="+",
        default=["default"],
        metavar="SIGMA",
        help="teacher noise levels when the last student step is guided; 'default': the Karras-ramp "
        "midpoint below the last student sigma (disback_core.guidance.default_final_sigma)",
    )
    gd.add_argument("--cache-dir")
    gd.add_argument("--threads", type=int)
    r = sub.add_parser("report", allow_abbrev=False, help="recompute summary, curves and report.md from a results.json")
    r.add_argument("results", nargs="+", help="results.json files")
    dg = sub.add_parser(
        "diagnose",
        allow_abbrev=False,
        help="does the critic lag the generator? the early score-gap growth of a bench folder's base runs "
        "(disback_core.diagnostics), and whether DisBack is expected to help",
    )
    dg.add_argument("folders", nargs="+", help="bench output folders (results.json)")
    # `disback train ARGS`: ARGS are disback_core.train's, parsed there (its --help lists them); its
    # module (torch, the adapters) is imported only when it runs, and accelerate only once it trains
    sub.add_parser(
        "train",
        allow_abbrev=False,
        add_help=False,
        help="train a one-step generator: DMD2, Diff-Instruct or SiD, with or without DisBack, on a built-in "
        "problem or a diffusers model, on one or many processes (`disback train --help`: its options)",
    )
    ex = sub.add_parser(
        "export",
        allow_abbrev=False,
        help="export the generator of a saved `disback train` state (export_generator), rebuilt from the run "
        "configuration the state holds",
    )
    ex.add_argument("state", help="a run folder (--out), its state/ folder, or a kept state/step-* folder")
    ex.add_argument("out", help="the export folder (new, empty, or an earlier export, which is replaced)")
    ex.add_argument("--model", help="the model folder, if it moved since training (its config is used)")
    ex.add_argument("--cache-dir", help="built-in problems: where the run's teacher is cached")
    args, rest = parser.parse_known_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the command recorded in results.json
    if rest and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if args.command in ("demo", "bench") and args.cfg_scale:
        from .bench.problems import CONDITIONAL

        if args.problem not in CONDITIONAL:
            parser.error(f"--cfg-scale needs a conditional problem ({', '.join(CONDITIONAL)}), not {args.problem}")
    if args.command == "demo":
        return _demo(args)
    if args.command == "guide":
        from .bench.guide import guide_main

        finals = [None if v == "default" else float(v) for v in args.final_sigmas]
        return guide_main(
            args.results,
            guided_steps=args.guided_steps,
            lams=args.lams,
            cache_dir=args.cache_dir,
            threads=args.threads,
            final_sigmas=finals,
        )
    if args.command == "report":
        return _report(args.results)
    if args.command == "diagnose":
        return _diagnose(args.folders)
    if args.command == "train":
        from .train import main as train_main

        train_main(rest, prog="disback train")
        return 0
    if args.command == "export":
        from .storage import StorageError
        from .train import export_state

        try:
            folder = export_state(args.state, args.out, model=args.model, cache_dir=args.cache_dir)
        except StorageError as e:  # not a state, or a damaged one: the message names the file
            raise SystemExit(f"disback export: {e}") from None
        print(f"exported the generator of {args.state} to {folder}")
        return 0
    try:
        variants = args.variants
        base = _base_spec(args, args.adapter[0])
        for v in variants:
            if "gdd" in args.adapter and parse_variant(base, v).disback:
                raise ValueError(
                    f"variant {v!r}: DisBack does not apply to --adapter gdd (no target score, no DSM); "
                    "use --variants base"
                )
    except ValueError as e:
        parser.error(str(e))
    return _run(args, variants, "disback bench")


if __name__ == "__main__":
    sys.exit(main())
