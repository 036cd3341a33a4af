"""``disback train``: DMD2, Diff-Instruct or SiD, with or without DisBack, on one or many processes.

    disback train --problem toy2d --method dmd2 --disback --iterations 1500 --out runs/train
    disback train --model tiny-sd3 --disback --max_train_steps 2000 --export runs/sd3/onestep
    accelerate launch --num_processes 2 -m disback_core.cli train --problem toy2d --method dmd2 --disback
    torchrun --nproc-per-node 2 -m disback_core.cli train --problem digits --method sid --fsdp
    disback train --unet tiny-text --method dmd2 --disback        # a diffusers UNet2DConditionModel
    disback train --model tiny-sd3 --disback --shift 3            # a flow transformer (SD3, FLUX, SANA, Wan)
    disback train --model path/to/sd3 ...                         # a save_pretrained or pipeline folder
    disback train ... --resume                                    # continue exactly where it stopped
    disback train ... --resume --max_train_steps 20000            # extend a finished run
    disback train ... --overwrite                                 # start over in an --out that holds a run
    disback train ... --fsdp --state-format full                  # gathered full states instead of shards
    disback export runs/train runs/train/onestep                  # the generator of any saved state

``examples/train.py`` calls :func:`main` (``python examples/train.py ...``, ``accelerate launch
examples/train.py ...``). ``accelerate`` is needed to train (``pip install 'disback[distributed]'``),
not to import this module or to export.

Models (``--unet``, alias ``--model`` / ``--pretrained_model_name_or_path``): a preset of
:data:`disback_core.presets.TINY_PRESETS` (random weights, nothing downloaded) or a local folder
(``save_pretrained``, or a diffusers pipeline folder: its ``transformer/`` or ``unet/``); the class is
read from ``config.json``'s ``_class_name`` (:func:`disback_core.presets.build_model`). UNets
(``UNet2DModel``, ``UNet2DConditionModel``) are wrapped by ``DiffusersDenoiser`` (DDPM schedule) with
the method's own generator noise level; flow transformers (``SD3Transformer2DModel``,
``FluxTransformer2DModel``, ``SanaTransformer2DModel``, ``WanTransformer3DModel``) by
``FlowMatchDenoiser`` with a ``FlowMatchEulerDiscreteScheduler`` (``--shift``, else the pipeline
folder's scheduler, else 3.0), a one-step generator from pure noise (flow time 1,
``make_flow_generator``), and every method's noise levels drawn as SD3 trains (``LogitNormalSigma``
with the shift; the fake score's DSM weighted by ``flow_weight``, i.e. the flow-matching velocity
loss the teacher was trained with). The synthetic data are noise and random conditions of the shapes
the config expects (``example_cond``, ``sample_shape``: Wan's are 5-d video latents).

The diffusers training scripts' flag names are accepted too (:data:`DIFFUSERS_ALIASES`):
``--output_dir`` (``--out``), ``--max_train_steps`` (``--iterations``), ``--learning_rate``
(``--lr``), ``--gradient_accumulation_steps`` (``--grad-accum``), ``--checkpointing_steps``
(``--save-every``), ``--checkpoints_total_limit`` (``--keep``), ``--mixed_precision``,
``--max_grad_norm``, ``--resume_from_checkpoint latest`` (``--resume``), ``--seed``. As in
diffusers, ``--train_batch_size`` is the batch per device and micro-batch (the global batch is
``train_batch_size x processes x gradient_accumulation_steps``); ``--batch-size`` is the global one.

Roles: the generator and the fake score are wrapped by DDP (``accelerator.prepare``) or sharded by
FSDP2 (``--fsdp``, ``fully_shard`` on every child module and the root); the teacher and the
trajectory are never wrapped. Degradation Recording runs with DDP-averaged gradients; rank 0
writes the path, every rank loads and checks it (:func:`disback_core.distributed.share_trajectory`).
Gradient accumulation (``--grad-accum``) skips DDP's all-reduce on all but the last micro-batch;
``--mixed-precision bf16`` autocasts the forward passes; a NaN/inf loss or gradient drops that
update and is counted, and ``--max-nonfinite`` in a row stop the run (``--on-nonfinite raise``: the
first); tqdm and logs on rank 0 only; optional TensorBoard (``--tensorboard``). ``--save-every``
writes a resumable state (:mod:`disback_core.state`): models, optimizers, LR schedulers, the
backtracking schedule, every rank's RNG states and the data position; ``--resume`` (alias
``--resume_from_checkpoint latest``) continues from the newest one and refuses a state of another
configuration. Nothing is lost by mistake: a run pointed at an ``--out`` that holds an earlier run
(states, a recorded path or ``result.json``) refuses to start unless told ``--resume`` or
``--overwrite``. A launch that does not match what it asked for (``accelerate launch --cpu
--num_processes 2`` runs one process; ``WORLD_SIZE`` set but no process group) is refused before
training, naming both numbers (:func:`check_launch`).

State formats (``--state-format``): ``sharded`` (the default with ``--fsdp``) saves with
:func:`disback_core.sharded_state.save_sharded_state` straight from the live objects: under FSDP2
every rank writes its own shards of both models and both optimizers (torch.distributed.checkpoint,
safetensors), and no rank gathers the model; ``--resume`` reads them back with
:func:`~disback_core.sharded_state.load_sharded_state`, each rank only its part. ``full`` (the default
otherwise) saves with :func:`disback_core.state.save_state`: one file per module and optimizer; under
FSDP2 the full weights and optimizer states are first gathered into plain CPU copies of both models
(:func:`disback_core.distributed.full_state_to`). ``sharded`` without ``--fsdp`` (one process, or DDP)
is allowed. Both formats share the run folder's layout (``state/latest.json``, ``state/step-*``) and
resume exactly (a sharded state's files are not byte-reproducible; what they hold is). The format
is not part of the run's identity (it is not in the run's config): ``--resume`` follows the format
of the state it finds (states of runs that predate the flag are all ``full``, ``--fsdp`` ones too,
and resume as they were saved), and refuses a ``--state-format`` that names the other one (a run
does not change format midway). The world size is part of the run's identity, in both formats: a
run saved at 2 ranks resumes at 2 ranks only (a sharded state's resharding serves ``disback export``
and :func:`build_generator`, which read it in one process). With ``--fsdp`` and ``sharded``,
``--export`` gathers the generator once, at the end of the run (rank 0 holds it, on the CPU), and
``generator_change`` in ``result.json`` is computed shard by shard.

Extending a run: the total (``--iterations`` / ``--max_train_steps``) is not part of the run's
identity; ``--resume`` with a larger total continues from the state's update to the new total (a
total below the state's update is refused). Everything else resumes as saved: the data position,
the RNG states, the optimizers, the LR schedulers (a linear warm-up over ``--warmup`` updates, then
constant: it does not depend on the total, so an extension is the same schedule as one longer run)
and DisBack's schedule. DisBack's :class:`~disback_core.schedules.FixedInterval` counts generator
updates: its interval is set once, from the first total (``share x total / (nodes - 1)``), and its
position is kept, so an extended run goes on from where the path was (on the teacher, when the
first run walked the whole path) and does not walk it again. An extension therefore equals one
run of the larger total exactly (bit for bit) when the interval is the same for both totals (without
``--disback``: always); otherwise it is the first run's path schedule followed by more updates on
the teacher.

Export: ``--export FOLDER`` writes the trained generator at the end of the run with
:func:`disback_core.export.export_generator` (rank 0; under FSDP2 from the gathered full weights;
the run configuration in the note's metadata); ``disback export STATE OUT`` (:func:`export_state`)
rebuilds the run's generator from any saved state of either format (a run's ``--out``, its
``state/`` folder, or a kept ``state/step-*`` folder) with the configuration stored in that state,
and exports it (one process: a sharded state of a 2-rank FSDP2 run is resharded into it, and
exports the same bytes as the same run saved ``full``). A folder that exists and is not an export
is refused before anything starts (an earlier export is replaced atomically).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import math
import os
import random
import shutil
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapters import DMD2, DiffInstruct, SiD
from .backtracking import Backtrack
from .denoisers import DiffusersDenoiser, make_generator, trainable_copy
from .distributed import any_rank, full_state_from, full_state_to, share_trajectory
from .faults import NonFiniteGuard
from .lora import LoraSpec
from .presets import FLOW_CLASSES, TINY_PRESETS, spec_class_name
from .recording import record_degradation
from .schedules import FixedInterval
from .sigmas import LogitNormalSigma, flow_weight
from .step import Batch, optimizer_params

__all__ = [
    "main",
    "parse_args",
    "run_config",
    "export_state",
    "build_generator",
    "read_state",
    "DIFFUSERS_ALIASES",
    "RUN_KEYS",
]

METHODS: dict[str, tuple[Any, float]] = {"dmd2": (DMD2, 80.0), "di": (DiffInstruct, 1.0), "sid": (SiD, 2.5)}
DEFAULT_SHIFT = 3.0  # SD3's sampling shift, when neither --shift nor a pipeline scheduler gives one
DEFAULT_BATCH = 256
STATE_FORMATS = ("full", "sharded")  # --state-format: disback_core.state's or disback_core.sharded_state's
DESCRIPTION = (
    "Train a one-step generator: DMD2, Diff-Instruct or SiD, with or without DisBack, on one or many "
    "processes, with exact resume and --export."
)
# Which options define a run: a saved state from another configuration is refused on --resume. The
# total (--iterations) is not among them: a run may be extended (states saved before it was taken out
# hold it; on --resume theirs is used for the check, see main).
RUN_KEYS = (
    "problem",
    "unet",
    "method",
    "disback",
    "batch_size",
    "grad_accum",
    "lr",
    "seed",
    "record_steps",
    "nodes",
    "rank",
    "node_mode",
    "share",
    "mixed_precision",
    "fsdp",
    "max_grad_norm",
    "warmup",
    "teacher_steps",
)
# The diffusers training scripts' names (and their hyphenated spellings) for this script's options:
# diffusers' name -> this script's. --train_batch_size is diffusers' per-device batch (see parse_args).
DIFFUSERS_ALIASES = {
    "--output_dir": "--out",
    "--pretrained_model_name_or_path": "--unet",
    "--max_train_steps": "--iterations",
    "--learning_rate": "--lr",
    "--train_batch_size": "--batch-size",
    "--gradient_accumulation_steps": "--grad-accum",
    "--checkpointing_steps": "--save-every",
    "--checkpoints_total_limit": "--keep",
    "--resume_from_checkpoint": "--resume",
    "--mixed_precision": "--mixed-precision",
    "--max_grad_norm": "--max-grad-norm",
    "--seed": "--seed",
}


def _flags(*names: str) -> list[str]:
    """Each name and, for a diffusers name with underscores, its hyphenated spelling."""
    out = []
    for n in names:
        out.append(n)
        if "_" in n and n.replace("_", "-") not in out:
            out.append(n.replace("_", "-"))
    return out


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The command line of ``disback train`` (and ``examples/train.py``)."""
    ap = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, allow_abbrev=False)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--problem", choices=["toy2d", "digits", "digits-cond"], help="a built-in problem (default toy2d)")
    src.add_argument(
        *_flags("--unet", "--model", "--pretrained_model_name_or_path"),
        dest="unet",
        metavar="MODEL",
        help=f"a diffusers model: a preset ({', '.join(TINY_PRESETS)}; random weights) or a local "
        "folder (save_pretrained, or a pipeline's, using its transformer/ or unet/) of a "
        "UNet2DModel, UNet2DConditionModel or flow transformer (" + ", ".join(FLOW_CLASSES) + ")",
    )
    ap.add_argument(
        "--shift",
        type=float,
        default=None,
        help="flow transformers: the timestep shift (sigma factor) of the teacher's schedule and of the "
        f"methods' noise levels (default: the pipeline folder's scheduler, else {DEFAULT_SHIFT})",
    )
    ap.add_argument("--method", choices=sorted(METHODS), default="dmd2")
    ap.add_argument("--disback", action="store_true", help="record the degradation path, then backtrack along it")
    ap.add_argument(
        *_flags("--iterations", "--max_train_steps"),
        dest="iterations",
        type=int,
        default=1000,
        help="generator updates in all (a larger one with --resume extends a run)",
    )
    batch = ap.add_mutually_exclusive_group()
    batch.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help=f"global batch per update, split over ranks and micro-batches (default {DEFAULT_BATCH})",
    )
    batch.add_argument(
        *_flags("--train_batch_size"),
        dest="train_batch_size",
        type=int,
        default=None,
        help="diffusers' spelling, per device: the batch of each micro-batch on each rank "
        "(global batch = this x processes x --grad-accum)",
    )
    ap.add_argument(
        *_flags("--grad-accum", "--gradient_accumulation_steps"),
        dest="grad_accum",
        type=int,
        default=1,
        help="micro-batches per update on each rank",
    )
    ap.add_argument(*_flags("--lr", "--learning_rate"), dest="lr", type=float, default=1e-4)
    ap.add_argument(
        "--warmup", type=int, default=0, help="linear LR warm-up, in updates, then constant (independent of the total)"
    )
    ap.add_argument(*_flags("--max-grad-norm", "--max_grad_norm"), dest="max_grad_norm", type=float, default=10.0)
    ap.add_argument(
        "--on-nonfinite",
        choices=["skip", "raise"],
        default="skip",
        help="a NaN/inf loss or gradient: drop that update (and stop after --max-nonfinite in a row), or stop",
    )
    ap.add_argument("--max-nonfinite", type=int, default=10)
    ap.add_argument(
        *_flags("--mixed-precision", "--mixed_precision"), dest="mixed_precision", choices=["no", "bf16"], default="no"
    )
    ap.add_argument("--fsdp", action="store_true", help="shard generator and fake score with FSDP2 instead of DDP")
    ap.add_argument(
        "--state-format",
        choices=STATE_FORMATS,
        default=None,
        help="how resumable states are written: 'sharded', every rank writes its own shards "
        "(torch.distributed.checkpoint, safetensors; nothing is gathered), or 'full', the full weights and "
        "optimizer states (gathered under --fsdp), one file per module (default: sharded with --fsdp, full "
        "otherwise). --resume follows the state's own format and refuses this flag naming the other one; "
        "disback export reads either",
    )
    ap.add_argument("--record-steps", type=int, default=500)
    ap.add_argument("--nodes", type=int, default=5)
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank of the path's nodes")
    ap.add_argument("--node-mode", choices=["lora", "svd", "full"], default="lora")
    ap.add_argument("--share", type=float, default=0.1, help="share of the updates spent on degraded targets")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--teacher-steps", type=int, default=None, help="built-in problems: teacher training steps")
    ap.add_argument("--cache-dir", help="built-in problems: where trained teachers are cached")
    ap.add_argument(
        *_flags("--out", "--output_dir"),
        dest="out",
        default="runs/train",
        help="the run folder: states, recorded path, result.json",
    )
    ap.add_argument(
        *_flags("--save-every", "--checkpointing_steps"),
        dest="save_every",
        type=int,
        default=0,
        help="write a resumable state every N updates (0: at the end)",
    )
    ap.add_argument(
        *_flags("--keep", "--checkpoints_total_limit"), dest="keep", type=int, default=3, help="resumable states kept"
    )
    ap.add_argument(
        "--export",
        metavar="FOLDER",
        default=None,
        help="at the end of training, export the generator there (disback_core.export_generator, the "
        "run configuration in its metadata); a folder that exists and is not an export is refused",
    )
    again = ap.add_mutually_exclusive_group()
    again.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest state in --out (a fresh start when it holds none); with a "
        "larger --iterations, extend a finished run",
    )
    again.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in an --out that holds an earlier run, deleting its states, recorded path "
        "and result.json first (without --resume or --overwrite such an --out is refused)",
    )
    ap.add_argument(
        *_flags("--resume_from_checkpoint"),
        dest="resume_from_checkpoint",
        choices=["latest"],
        default=None,
        help="diffusers' spelling of --resume: 'latest' is the newest state in --out",
    )
    ap.add_argument("--stop-after", type=int, default=0, help="stop (after saving) at this update, as if interrupted")
    ap.add_argument("--tensorboard", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-progress", action="store_true")
    return ap


def parse_args(argv: list[str] | None, prog: str | None = None) -> argparse.Namespace:
    ap = build_parser(prog)
    args = ap.parse_args(argv)
    if args.resume_from_checkpoint == "latest":
        if args.overwrite:
            ap.error("argument --resume_from_checkpoint: not allowed with argument --overwrite")
        args.resume = True
    if args.problem is None and args.unet is None:
        args.problem = "toy2d"
    args.model_class = None
    if args.unet is not None:  # refuse an unknown preset or class before anything starts
        try:
            args.model_class = spec_class_name(resolve_model(args.unet)[0])
        except (OSError, ValueError) as e:
            ap.error(f"--unet: {e}" if args.unet in str(e) else f"--unet {args.unet}: {e}")
    if args.shift is not None:
        if args.model_class not in FLOW_CLASSES:
            ap.error("--shift is for flow-matching transformers (" + ", ".join(FLOW_CLASSES) + ")")
        if not (math.isfinite(args.shift) and args.shift > 0):
            ap.error(f"--shift must be a finite number > 0, got {args.shift}")
    if args.batch_size is None and args.train_batch_size is None:
        args.batch_size = DEFAULT_BATCH
    for name in ("iterations", "batch_size", "train_batch_size", "grad_accum", "nodes", "rank", "record_steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    return args


def resolve_batch(args: argparse.Namespace, world: int) -> None:
    """``--train_batch_size`` (per device and micro-batch, as diffusers') as the global ``batch_size``."""
    if args.train_batch_size is not None:
        args.batch_size = args.train_batch_size * world * args.grad_accum


def run_config(args: argparse.Namespace, world: int) -> dict[str, Any]:
    """The run's identity (:data:`RUN_KEYS` and the world size), as saved in every state and checked on
    ``--resume``; a flow run adds its resolved ``shift`` (see :func:`main`)."""
    resolve_batch(args, world)
    return {k: getattr(args, k) for k in RUN_KEYS} | {"world_size": world}


# ------------------------------------------------------------------------------------------ refusals


def earlier_run(out: Path) -> list[str]:
    """What an earlier run left in ``out`` that a fresh start would replace (empty: nothing)."""
    found = []
    for name, what in (("state", "resumable states"), ("trajectory", "a recorded path"), ("result.json", "a result")):
        path = out / name
        if path.is_file() or (path.is_dir() and any(path.iterdir())):
            found.append(f"{name}{'/' if path.is_dir() else ''} ({what})")
    return found


def check_out(args: argparse.Namespace) -> None:
    """Refuse, before anything starts, a fresh run into an ``--out`` that holds an earlier one."""
    found = [] if args.resume or args.overwrite else earlier_run(Path(args.out))
    if found:
        raise SystemExit(
            f"--out {args.out} holds an earlier run: {', '.join(found)}. Refusing to start over in it "
            "(that would replace them). Pass --resume to continue from its newest state, or a new "
            "--out, or --overwrite to delete them and start over."
        )


def check_export_target(folder: str | os.PathLike, flag: str = "--export") -> Path:
    """Refuse, before anything starts, an export folder that exists and is not an export of this
    library (a file, a link, or a non-empty folder without its note); an earlier export is fine
    (:func:`~disback_core.export.export_generator` replaces it atomically)."""
    from .export import NOTE_NAME, _is_ours

    path = Path(folder)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise SystemExit(f"{flag} {path} exists and is not a folder: refusing to replace it with an export")
    if path.is_dir() and any(path.iterdir()) and not _is_ours(path):
        raise SystemExit(
            f"{flag} {path} exists, is not empty and is not an export (it holds no {NOTE_NAME}): "
            "refusing to write an export into it; choose another folder (an earlier export is "
            "replaced)"
        )
    return path


def config_changes(saved: Mapping[str, Any], config: Mapping[str, Any]) -> list[str]:
    """The run options that differ between a saved run's configuration and this one's, as
    ``"--seed: 0 in the run, 1 given"`` (empty: the same run)."""
    out = []
    for k in sorted(set(saved) | set(config)):
        a, b = saved.get(k, "(absent)"), config.get(k, "(absent)")
        if a != b or type(a) is not type(b):
            out.append(f"--{k}: {a!r} in the run, {b!r} given")
    return out


def check_same_run(saved: Mapping[str, Any], config: Mapping[str, Any], where: Path) -> None:
    """Refuse, before anything is loaded, resuming ``where`` (a state or a recorded path) with options
    that change the run's identity: a changed ``--seed`` also changes a preset's random teacher, and
    would otherwise surface later as a path "recorded on another base model"."""
    changes = config_changes(saved, config)
    if changes:
        raise SystemExit(
            f"--resume: {where} is from a run with other options: {'; '.join(changes)}. Resume with the "
            "run's own options, or start a new run (a new --out, or --overwrite)."
        )


def _manifest_format(step_dir: Path) -> Any:
    """The ``format`` field of ``step_dir``'s manifest, unverified (None when it cannot be read: the
    reader of the full format then names the problem)."""
    from .state import MANIFEST, MAX_MANIFEST_BYTES, MAX_MANIFEST_DEPTH
    from .storage import StorageError, parse_json, read_bytes

    path = step_dir / MANIFEST
    try:
        m = parse_json(read_bytes(path, "manifest", MAX_MANIFEST_BYTES), path, "manifest", MAX_MANIFEST_DEPTH)
    except StorageError:
        return None
    return m.get("format") if isinstance(m, dict) else None


def read_state(folder: str | os.PathLike) -> dict[str, Any]:
    """A saved state's manifest, verified (digest, and the sha256 ``latest.json`` records): ``{"config",
    "step", "world_size", "path", "format"}``, for a state folder (with ``latest.json``) or a step
    folder, of either format: ``"format"`` is ``"full"`` (:mod:`disback_core.state`, manifest format
    ``disback-state``) or ``"sharded"`` (:mod:`disback_core.sharded_state`, ``disback-sharded-state``).
    The tensors are not read (:func:`~disback_core.state.load_state` and
    :func:`~disback_core.sharded_state.load_sharded_state` verify them)."""
    from . import sharded_state
    from .state import _decode, _read_manifest, _resolve

    step_dir, sha = _resolve(Path(folder))
    fmt = "sharded" if _manifest_format(step_dir) == sharded_state.FORMAT else "full"
    m = sharded_state._read_manifest(step_dir, sha)[0] if fmt == "sharded" else _read_manifest(step_dir, sha)
    config = _decode(m["config"], {}, f"{step_dir / 'manifest.json'}: config")
    return {"config": config, "step": m["step"], "world_size": m["world_size"], "path": step_dir, "format": fmt}


# torchrun's and accelerate's multi-GPU launcher's counts, and MPI's (which accelerate reads on CPUs).
# True: the whole run's process count; False: this node's (at most the whole run's).
_LAUNCH_VARS = {
    "WORLD_SIZE": True,
    "LOCAL_WORLD_SIZE": False,
    "PMI_SIZE": True,
    "OMPI_COMM_WORLD_SIZE": True,
    "MV2_COMM_WORLD_SIZE": True,
}


def _launcher_argv() -> list[str]:
    """The command line of the process that started this one ([] when it cannot be read)."""
    try:
        import psutil  # type: ignore[import-untyped, unused-ignore]

        parent = psutil.Process().parent()
        return parent.cmdline() if parent is not None else []
    except Exception:  # noqa: BLE001 - no psutil, no permission, the parent gone: nothing to read
        return []


def _accelerate_launch_processes(argv: list[str]) -> int | None:
    """``--num_processes`` of an ``accelerate launch`` command line (else its config file's), or None.

    accelerate 1.16's simple launcher (``--cpu``, or a config that is not multi-GPU, without
    ``--mpirun_hostfile``) starts ONE process whatever ``--num_processes`` says, and sets no
    variable that names the count: the launcher's own command line is the only place it is written."""
    names = [Path(a).name.removesuffix(".exe") for a in argv]
    rest = None
    for i, name in enumerate(names):
        if name in ("accelerate-launch", "accelerate.commands.launch"):
            rest = argv[i + 1 :]
        elif name in ("accelerate", "accelerate.commands.accelerate_cli") and names[i + 1 : i + 2] == ["launch"]:
            rest = argv[i + 2 :]
        if rest is not None:
            break
    if rest is None:
        return None
    try:
        from accelerate.commands.config import default_config_file, load_config_from_file
        from accelerate.commands.launch import launch_command_parser

        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            launch, _ = launch_command_parser().parse_known_args(rest)
        if launch.num_processes is not None:
            return int(launch.num_processes)
        # as accelerate does: an explicit --config_file, else the default one unless --cpu
        if launch.config_file is not None or (os.path.isfile(default_config_file) and not launch.cpu):
            n = getattr(load_config_from_file(launch.config_file), "num_processes", None)
            return int(n) if isinstance(n, int) and n > 0 else None
    except (Exception, SystemExit):  # noqa: BLE001 - an unreadable launcher command line: nothing to check
        return None
    return None


def requested_processes() -> list[tuple[int, bool, str]]:
    """What the launch asked for: ``(count, whole run, where it is written)`` for every launcher
    variable and for ``accelerate launch``'s ``--num_processes``."""
    asked = [
        (int(os.environ[var]), whole, f"{var}={os.environ[var]}")
        for var, whole in _LAUNCH_VARS.items()
        if os.environ.get(var, "").strip().isdigit()
    ]
    n = _accelerate_launch_processes(_launcher_argv())
    if n is not None:
        asked.append((n, True, f"accelerate launch --num_processes {n}"))
    return asked


def check_launch(world: int) -> None:
    """Refuse a launch whose process count is not the one the Accelerator sees (``world``), naming
    both: e.g. ``accelerate launch --cpu --num_processes 2`` (which runs one process) or a
    ``WORLD_SIZE`` with no process group (the script started with ``python`` instead of the launcher)."""
    for n, whole, where in requested_processes():
        if (n != world) if whole else (n > world):
            if where.startswith("accelerate"):
                cause = (
                    "accelerate launch's --cpu launcher (and a config that is not multi-GPU) starts one process "
                    f"whatever --num_processes says: launch with `accelerate launch --multi_gpu --num_processes "
                    f"{n}` (without --cpu: on CPUs it runs {n} gloo processes) or `torchrun --nproc-per-node {n}`"
                )
            else:
                cause = (
                    "the script was started with python instead of the launcher (the variable left in the "
                    "environment), or the launcher's process group did not form (on GPUs: LOCAL_RANK not set)"
                )
            raise SystemExit(
                f"this launch asked for {n} processes ({where}) but the Accelerator sees {world} "
                f"process{'es' if world != 1 else ''}: {cause}. Refusing to train {world} where {n} were "
                "asked for."
            )


# ------------------------------------------------------------------------------------------ data


def build_task(args: argparse.Namespace, accelerator: Any = None) -> dict[str, Any]:
    """The teacher, a batch sampler ``sample(n, generator) -> Batch`` and an evaluation (or None)."""
    if args.problem:
        from .bench.problems import get_problem

        kw = {} if args.teacher_steps is None else {"teacher_steps": args.teacher_steps}
        first = contextlib.nullcontext() if accelerator is None else accelerator.main_process_first()
        with first:  # rank 0 trains and caches the teacher, the others load it
            problem = get_problem(args.problem, args.cache_dir, **kw)
        z, c = problem.eval_inputs()
        return {
            "teacher": problem.teacher,
            "sigma_data": problem.sigma_data,
            "sample": problem.batch,
            "evaluate": lambda g: problem.evaluate(_generate(g, z, c), c),
        }
    return build_model_task(args)


def resolve_model(spec: str) -> tuple[str, Path | None]:
    """``--unet``'s model (a preset name or a folder with ``config.json``; a pipeline folder, with
    ``model_index.json``, gives its ``transformer/`` or ``unet/``) and the scheduler folder saved
    with it (the pipeline's ``scheduler/``), if any."""
    if spec in TINY_PRESETS:
        return spec, None
    folder = Path(spec)
    if not (folder / "config.json").is_file() and (folder / "model_index.json").is_file():
        folder = next(
            (folder / sub for sub in ("transformer", "unet") if (folder / sub / "config.json").is_file()), folder
        )
    pipeline = [d for d in (folder, folder.parent) if (d / "model_index.json").is_file()]
    scheduler = next((d / "scheduler" for d in pipeline if (d / "scheduler" / "scheduler_config.json").is_file()), None)
    return str(folder), scheduler


def flow_scheduler(shift: float | None, folder: Path | None) -> Any:
    """The teacher's ``FlowMatchEulerDiscreteScheduler``: ``--shift``, else the pipeline's scheduler
    (a FlowMatch* config as saved, FLUX's dynamic shift included; SANA's/Wan's ``flow_shift``), else 3.0."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if shift is None and folder is not None:
        cfg = json.loads((folder / "scheduler_config.json").read_text())
        if str(cfg.get("_class_name", "")).startswith("FlowMatch"):
            return FlowMatchEulerDiscreteScheduler.from_config(cfg)
        if isinstance(cfg.get("flow_shift"), (int, float)):
            shift = float(cfg["flow_shift"])
    return FlowMatchEulerDiscreteScheduler(shift=DEFAULT_SHIFT if shift is None else shift)


def build_model_task(args: argparse.Namespace) -> dict[str, Any]:
    """``--unet``: the model of its config's class (:func:`disback_core.presets.build_model`), its
    denoiser and synthetic batches: noise and random conditions of the shapes the config expects."""
    from diffusers import DDPMScheduler

    from .flow import FlowMatchDenoiser
    from .presets import build_model, example_cond, sample_shape

    spec, scheduler_dir = resolve_model(args.unet)
    model = build_model(spec, seed=args.seed).eval().requires_grad_(False)
    flow = type(model).__name__ in FLOW_CLASSES
    teacher: nn.Module
    if flow:
        teacher = FlowMatchDenoiser(model, flow_scheduler(args.shift, scheduler_dir))
        shift = teacher.shift_factor(torch.zeros(sample_shape(model, 1)))  # FLUX's dynamic shift: at this size
    else:
        scheduler = DDPMScheduler() if scheduler_dir is None else DDPMScheduler.from_pretrained(scheduler_dir)
        teacher = DiffusersDenoiser(model, scheduler=scheduler, clamp=True)
        shift = None

    def sample(n: int, g: torch.Generator) -> Batch:  # conditions first, then the noise (7 text tokens)
        cond = example_cond(model, n, tokens=7, generator=g)
        return Batch(torch.randn(sample_shape(model, n), generator=g), cond)

    return {
        "teacher": teacher,
        "sigma_data": 1.0 if flow else 0.5,
        "sample": sample,
        "evaluate": None,
        "flow": flow,
        "shift": shift,
    }


def make_method(args: argparse.Namespace, task: dict[str, Any]) -> Any:
    """The method; for a flow teacher its noise levels are SD3's logit-normal flow times with the
    teacher's shift (generator side and fake score alike), and the fake score's DSM loss is weighted
    by ``flow_weight`` (it then equals the flow-matching velocity loss the teacher was trained with)."""
    method_cls = METHODS[args.method][0]
    if not task.get("flow"):
        return method_cls(sigma_data=task["sigma_data"])
    times = LogitNormalSigma(shift=task["shift"])
    return method_cls(
        sigma_sampler=times, fake_sigma_sampler=times, sigma_data=task["sigma_data"], dsm_weight=flow_weight
    )


def _generate(generator: nn.Module, z: torch.Tensor, cond: Any, chunk: int = 1024) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat(
            [
                generator(z[i : i + chunk], None if cond is None else cond[i : i + chunk])
                for i in range(0, len(z), chunk)
            ]
        )


# ------------------------------------------------------------------------------------------ wrapping


def shard(module: nn.Module) -> nn.Module:
    """FSDP2: ``fully_shard`` every direct child holding parameters, then the root."""
    from torch.distributed.fsdp import fully_shard

    for child in module.modules():
        if (
            child is not module
            and any(True for _ in child.parameters(recurse=False))
            and sum(p.numel() for p in child.parameters()) >= 1 << 12
        ):
            fully_shard(child)
    fully_shard(module)
    return module


def unwrap(module: nn.Module) -> nn.Module:
    return getattr(module, "module", module)


def _no_sync(module: nn.Module, last: bool) -> contextlib.AbstractContextManager:
    sync_off = getattr(module, "no_sync", None)  # DDP's
    return sync_off() if not last and sync_off is not None else contextlib.nullcontext()


def update(
    loss_fn: Callable[[Batch], torch.Tensor],
    wrapped: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    batches: list[Batch],
    max_grad_norm: float,
    accelerator: Any,
    sharded: bool,
    guard: NonFiniteGuard,
    where: str,
) -> float:
    """One optimizer step over ``len(batches)`` micro-batches: DDP all-reduces on the last one only;
    each micro-batch's loss is divided by their number; only the optimizer's parameters get
    gradients (FSDP2 reduce-scatters in its own backward hooks, which ``backward(inputs=...)`` would
    skip: there every trainable tensor gets gradients, and each update starts by clearing its own)."""
    params = optimizer_params(optimizer)
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for i, batch in enumerate(batches):
        with _no_sync(wrapped, i == len(batches) - 1), accelerator.autocast():
            reason = ""
            try:
                loss = loss_fn(batch) / len(batches)
            except FloatingPointError as e:  # a loss's own finiteness check
                reason = str(e)
            if not reason and not torch.isfinite(loss.detach()).all():
                reason = f"loss {float(loss.detach())}"
        if any_rank(bool(reason)):  # all ranks skip together (a lone rank skipping backward would hang DDP)
            guard.failed(where, reason or "another rank's loss is not finite", params)
            return math.nan
        loss.backward() if sharded else loss.backward(inputs=params)
        total += float(loss.detach())
    if not guard.check(where, None, params):  # the all-reduced gradients: the same decision on every rank
        return math.nan
    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    scheduler.step()
    return total


# ------------------------------------------------------------------------------------------ main


def make_student(args: argparse.Namespace, task: dict[str, Any], teacher: nn.Module) -> nn.Module:
    """The generator: one step from pure noise for a flow teacher (flow time 1, sigma = inf: its input
    is exactly z), else a copy of the teacher at the method's noise level."""
    if task.get("flow"):
        from .flow import make_flow_generator

        return make_flow_generator(teacher)
    return make_generator(teacher, METHODS[args.method][1])


def _jsonable(obj: Any) -> Any:
    """``obj`` for an export note's metadata: non-finite floats as their repr (JSON has none)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return repr(obj)
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def _export(generator: nn.Module, folder: Path, config: dict[str, Any], step: int, source: str) -> Path:
    from .export import export_generator

    metadata = {"run": _jsonable(config), "updates": step, "exported_by": source}
    return export_generator(generator, folder, metadata=metadata)


def _import_accelerate() -> tuple[Any, Any]:
    try:
        from accelerate import Accelerator
        from accelerate.utils import set_seed
    except ImportError as e:
        raise SystemExit(
            f"disback train needs accelerate, an optional dependency ({e}): "
            "pip install 'disback[distributed]' (or pip install accelerate)"
        ) from None
    return Accelerator, set_seed


def resolve_state_format(args: argparse.Namespace, saved_state: Mapping[str, Any] | None) -> str:
    """``--state-format``: on ``--resume`` the state's own format (the flag, when given, must name it: a
    run does not change format midway), else the flag, else ``sharded`` under ``--fsdp`` and ``full``
    otherwise. The format is not part of the run's identity (not in its config): states of runs
    that predate the flag (all full) resume as they were saved."""
    if saved_state is None:
        return args.state_format or ("sharded" if args.fsdp else "full")
    fmt = saved_state["format"]
    if args.state_format is not None and args.state_format != fmt:
        raise SystemExit(
            f"--resume: {saved_state['path']} is a {fmt} state, but --state-format {args.state_format} was "
            f"given. Resume with --state-format {fmt}, or without --state-format (a resumed run keeps its "
            "states' format); to save the other format, start a new run (a new --out, or --overwrite)."
        )
    return str(fmt)


def _max_change(module: nn.Module, initial: Mapping[str, torch.Tensor]) -> float:
    """max |W - W_0| over ``module``'s state (``initial``: W_0 in full, by the same names). Each rank
    compares its local shard of an FSDP2 (DTensor) entry with the matching slice of W_0, then the ranks
    take the maximum (one all-reduce): the value the full tensors give, without gathering them."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    from .distributed import max_over_ranks

    moved = -math.inf
    for k, v in module.state_dict().items():
        v = v.detach()
        w0 = initial[k]
        if isinstance(v, DTensor):  # W_0 cut as v is (each rank slices its own part: no communication)
            w0 = distribute_tensor(w0.to(v.device), v.device_mesh, v.placements, src_data_rank=None).to_local()
            v = v.to_local()
        if v.numel():
            moved = max(moved, float((v.cpu().float() - w0.cpu().float()).abs().max()))
    return max_over_ranks([moved])[0]


def main(argv: list[str] | None = None, *, prog: str | None = None) -> dict[str, Any]:
    """Train (``disback train``; ``argv`` as on its command line); returns what ``result.json`` holds."""
    from .sharded_state import load_sharded_state, save_sharded_state
    from .state import latest_state, load_state, save_state

    args = parse_args(argv, prog)
    check_out(args)  # before anything starts: a fresh run never replaces an earlier one it was not told to
    out = Path(args.out)
    if args.export is not None:
        export = check_export_target(args.export).resolve()
        if out.resolve() == export or export in out.resolve().parents:
            raise SystemExit(
                f"--export {args.export} holds --out {args.out}: the export needs a folder of its own "
                f"(e.g. --export {out / 'export'})"
            )
    saved_state = None
    if args.resume and latest_state(out / "state") is not None:
        saved_state = read_state(out / "state")
        if args.iterations < saved_state["step"]:
            raise SystemExit(
                f"--iterations/--max_train_steps {args.iterations} is below the update the state in "
                f"{out / 'state'} reached ({saved_state['step']}): a run can be extended, not "
                "shortened (its newest state is kept as it is)"
            )
    state_format = resolve_state_format(args, saved_state)
    sharded = state_format == "sharded"
    Accelerator, set_seed = _import_accelerate()
    torch.set_num_threads(args.threads)
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=args.mixed_precision,
        log_with="tensorboard" if args.tensorboard else None,
        project_dir=args.out,
    )
    rank, world = accelerator.process_index, accelerator.num_processes
    check_launch(world)  # on every rank, before training: one process where two were asked for is an error
    if args.overwrite:  # told to: the earlier run's states, path and result go before this run writes its own
        if accelerator.is_main_process:
            for name in ("state", "trajectory"):
                shutil.rmtree(out / name, ignore_errors=True)
            (out / "result.json").unlink(missing_ok=True)
        accelerator.wait_for_everyone()
    config = run_config(args, world)
    if args.batch_size % (world * args.grad_accum):
        raise SystemExit(
            f"--batch-size {args.batch_size} does not divide into {world} ranks x {args.grad_accum} micro-batches"
        )
    micro = args.batch_size // (world * args.grad_accum)
    task = build_task(args, accelerator)
    if task.get("flow"):  # only flow runs carry the key: states of earlier UNet and problem runs still resume
        config["shift"] = task["shift"]
    resume_config = config  # what a saved state is checked against (see below)
    if saved_state is not None:  # the run's identity, before a path or state is loaded
        # A state saved before the total was taken out of the run's identity holds it: checked as theirs.
        if "iterations" in saved_state["config"]:
            resume_config = config | {"iterations": saved_state["config"]["iterations"]}
        check_same_run(saved_state["config"], resume_config, saved_state["path"])
    teacher = task["teacher"].to(accelerator.device)
    method = make_method(args, task)
    set_seed(args.seed)  # Python, numpy and torch: identical initial models on every rank
    data = torch.Generator().manual_seed(args.seed * 1000 + rank)  # each rank its own data stream
    draw = lambda: _to(task["sample"](micro, data), accelerator.device)  # noqa: E731
    generator = make_student(args, task, teacher).to(accelerator.device)
    fake: nn.Module = trainable_copy(teacher)
    distiller: Any = method
    target: nn.Module = teacher
    if args.disback:
        path = out / "trajectory"
        if args.resume and (path / "manifest.json").is_file():
            from .trajectory import Trajectory
            from .trajectory_files import read_manifest

            recorded = read_manifest(path / "manifest.json")["meta"].get("run")
            if isinstance(recorded, dict):  # paths of earlier versions hold no run: the teacher check alone
                check_same_run(recorded, {k: v for k, v in config.items() if k in recorded}, path)
            traj = Trajectory.load(path, teacher)
        else:
            from torch.nn.parallel import DistributedDataParallel as DDP

            g0 = copy.deepcopy(generator).requires_grad_(False)
            traj = record_degradation(
                teacher,
                g0,
                method,
                draw,
                steps=args.record_steps,
                nodes=args.nodes,
                lr=args.lr,
                mode=args.node_mode,
                lora=LoraSpec(rank=args.rank),
                seed=args.seed,
                wrap=DDP if world > 1 else None,
                progress=accelerator.is_main_process and not args.no_progress,
            )
            traj.meta["run"] = {k: v for k, v in config.items() if k != "iterations"}  # checked on --resume
            traj = share_trajectory(traj if rank == 0 else None, path, teacher)  # one verified path on all ranks
        # The interval comes from this total; on --resume the state's schedule (its interval and
        # position) replaces it, so an extended run keeps the first run's interval.
        distiller = Backtrack(method, traj, FixedInterval.from_share(args.iterations, traj.last, args.share))
        fake, target = distiller.initial_fake(), distiller.target
    warm = lambda step: min(1.0, (step + 1) / args.warmup) if args.warmup else 1.0  # noqa: E731
    guard = NonFiniteGuard(args.on_nonfinite, max_consecutive=args.max_nonfinite)
    make_opt = lambda params: torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)  # noqa: E731
    initial = {k: v.detach().to("cpu", copy=True) for k, v in generator.state_dict().items()}
    mirrors: dict[str, tuple[nn.Module, torch.optim.Optimizer]] = {}
    # sharded FSDP2 states need no copies; --export gathers the generator once, at the end, into this one
    template = (
        copy.deepcopy(generator).to("cpu") if args.fsdp and sharded and args.export is not None and rank == 0 else None
    )
    if args.fsdp and not sharded:  # plain CPU copies that hold the gathered weights and optimizer states for saving
        for name, m in (("generator", generator), ("fake", fake)):
            mirror = copy.deepcopy(m).to("cpu")
            mirror_opt = make_opt(mirror.parameters())
            for group in mirror_opt.param_groups:  # the key an LR scheduler adds to the live optimizer's groups
                group["initial_lr"] = group["lr"]
            mirrors[name] = (mirror, mirror_opt)
        gen_w, fake_w = shard(generator), shard(fake)  # new (DTensor) parameters: optimizers come after
    else:
        gen_w, fake_w = accelerator.prepare(generator, fake)  # DDP when world > 1; the parameters stay the same
    g_opt = make_opt(unwrap(gen_w).parameters())
    f_opt = make_opt([*unwrap(fake_w).parameters(), *distiller.critic_parameters()])
    g_sched = torch.optim.lr_scheduler.LambdaLR(g_opt, warm)
    f_sched = torch.optim.lr_scheduler.LambdaLR(f_opt, warm)
    live = {"generator": (unwrap(gen_w), g_opt), "fake": (unwrap(fake_w), f_opt)}
    saved = mirrors or live  # what the state functions see: the live objects, or the FSDP2 mirrors
    start = 0
    if saved_state is not None:
        objects: dict[str, Any] = {
            "modules": {k: m for k, (m, _) in saved.items()},
            "optimizers": {k: o for k, (_, o) in saved.items()},
            "schedulers": {"generator": g_sched, "fake": f_sched},
            "generators": {"data": data},
            "config": resume_config,
        }
        if sharded:  # collective: each rank reads its own shards into the live (FSDP2-sharded) objects
            got = load_sharded_state(out / "state", **objects)
        else:
            got = load_state(out / "state", **objects, rank=rank, world_size=world)
        for name, (m, o) in mirrors.items():
            full_state_from(m, live[name][0], o, live[name][1])
        start = got["step"]
        if args.disback:
            distiller.load_state_dict(got["extra"]["backtrack"])
        accelerator.print(
            f"resumed at update {start}" + (f", to go on to {args.iterations}" if args.iterations > start else "")
        )
    if args.tensorboard:
        accelerator.init_trackers("disback", config={k: v for k, v in config.items() if v is not None})
    fake_unwrapped, gen_unwrapped = unwrap(fake_w), unwrap(gen_w)

    def save(step: int) -> None:
        objects: dict[str, Any] = {
            "step": step,
            "modules": {k: m for k, (m, _) in saved.items()},
            "optimizers": {k: o for k, (_, o) in saved.items()},
            "schedulers": {"generator": g_sched, "fake": f_sched},
            "generators": {"data": data},
            "extra": {"backtrack": distiller.state_dict() if args.disback else None},
            "config": config,
            "keep": args.keep,
        }
        if sharded:  # collective: every rank writes its own shards of the live objects, nothing gathered
            save_sharded_state(out / "state", **objects)
            return
        for name, (m, o) in mirrors.items():
            full_state_to(m, live[name][0], o, live[name][1])
        save_state(out / "state", **objects, rank=rank, world_size=world, barrier=accelerator.wait_for_everyone)

    def critic_loss(b: Batch) -> torch.Tensor:
        with torch.no_grad():
            x = gen_unwrapped(b.z, b.cond)
        return distiller.fake_score_loss(x, fake_w, b.cond, real=b.real, real_cond=b.real_cond)["loss"]

    def generator_loss(b: Batch) -> torch.Tensor:  # the fake is read unwrapped: no DDP reduction for it
        return distiller.generator_loss(gen_w(b.z, b.cond), target, fake_unwrapped, b.cond)["loss"]

    from tqdm.auto import tqdm

    bar = tqdm(
        range(start, args.iterations),
        initial=start,
        total=args.iterations,
        disable=not accelerator.is_main_process or args.no_progress,
        desc=f"{args.method}",
    )
    logs: dict[str, float] = {}
    for it in bar:
        for _ in range(method.critic_steps):
            logs["critic"] = update(
                critic_loss,
                fake_w,
                f_opt,
                f_sched,
                [draw() for _ in range(args.grad_accum)],
                args.max_grad_norm,
                accelerator,
                args.fsdp,
                guard,
                "critic",
            )
        logs["generator"] = update(
            generator_loss,
            gen_w,
            g_opt,
            g_sched,
            [draw() for _ in range(args.grad_accum)],
            args.max_grad_norm,
            accelerator,
            args.fsdp,
            guard,
            "generator",
        )
        if math.isfinite(logs["generator"]):  # a dropped generator update is not a generator step
            distiller.on_generator_step()
        logs["skipped"] = guard.skipped
        if args.tensorboard:
            accelerator.log(logs, step=it + 1)
        bar.set_postfix(logs)
        if args.save_every and (it + 1) % args.save_every == 0:
            save(it + 1)
        if args.stop_after and it + 1 >= args.stop_after:
            if not args.save_every or (it + 1) % args.save_every:
                save(it + 1)
            if args.export is not None:
                accelerator.print(
                    f"stopped at update {it + 1} of {args.iterations}: --export {args.export} is "
                    f"written when the run ends (or: disback export {args.out} FOLDER)"
                )
            accelerator.end_training()
            return {"logs": logs, "updates": it + 1, "stopped": True}
    if start < args.iterations and (not args.save_every or args.iterations % args.save_every):
        save(args.iterations)  # (a finished run resumed at its own total trained nothing: its state stays)
    if mirrors:
        full_state_to(mirrors["generator"][0], gen_unwrapped)  # collective: every rank
    trained = mirrors["generator"][0] if mirrors else gen_unwrapped  # the full weights, unwrapped from DDP/FSDP2
    if args.fsdp and sharded:  # FSDP2 without mirrors: each rank compares its shards, nothing gathered
        moved = _max_change(gen_unwrapped, initial)
        if args.export is not None:  # collective: rank 0 gets the full weights (on the CPU), the others nothing
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            full = get_model_state_dict(gen_unwrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if template is not None:
                template.load_state_dict(full, strict=True)
                trained = template
            del full
    else:
        final = trained.state_dict()
        moved = max(float((final[k].detach().cpu().float() - v.float()).abs().max()) for k, v in initial.items())
    result: dict[str, Any] = {
        "logs": logs,
        "updates": args.iterations,
        "world_size": world,
        "generator_change": moved,
        "skipped_updates": guard.skipped,
    }  # max |W - W_0|: proof that the generator trained
    if args.disback:
        result["switches"] = distiller.switches
    accelerator.print(
        "final losses "
        + ", ".join(f"{k} {v:.6g}" for k, v in logs.items())
        + (f"; switches {distiller.switches}" if args.disback else "")
    )
    if task["evaluate"] is not None:  # on every rank: a sharded generator's forward needs them all
        result["metrics"] = task["evaluate"](gen_unwrapped)
        accelerator.print(f"final metrics {result['metrics']}")
    if args.export is not None:
        if accelerator.is_main_process:
            _export(trained, Path(args.export), config, args.iterations, "disback train")
            accelerator.print(f"exported the generator to {args.export}")
        accelerator.wait_for_everyone()
        result["export"] = str(args.export)
    if start == args.iterations and saved_state is not None and (out / "result.json").is_file():
        accelerator.print(f"nothing to train: the state is at update {start}, the total; result.json kept")
    elif accelerator.is_main_process:
        (out / "result.json").write_text(json.dumps(result, indent=2, default=str))
    accelerator.end_training()
    return result


def _state_folder(folder: Path) -> Path:
    """A run's ``--out`` (its ``state/``), a state folder or a step folder: the one ``load_state`` reads."""
    if (
        not (folder / "latest.json").exists()
        and not (folder / "manifest.json").exists()
        and (folder / "state" / "latest.json").exists()
    ):
        return folder / "state"
    return folder


def build_generator(
    state: str | os.PathLike,
    *,
    model: str | None = None,
    cache_dir: str | None = None,
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, dict[str, Any]]:
    """The generator of a saved state of either format (see :func:`export_state`), and
    :func:`read_state`'s answer. In one process (no process group): a sharded state of any world size
    is read whole, resharded to this one process."""
    from .sharded_state import load_sharded_state
    from .state import load_state

    saved = read_state(_state_folder(Path(state)))
    cfg = saved["config"]
    if not isinstance(cfg, dict) or "method" not in cfg or "seed" not in cfg:
        raise SystemExit(f"{saved['path']}: not a state of disback train (its config holds no method and seed)")
    args = argparse.Namespace(
        problem=cfg.get("problem"),
        unet=model or cfg.get("unet"),
        method=cfg["method"],
        seed=cfg["seed"],
        teacher_steps=cfg.get("teacher_steps"),
        cache_dir=cache_dir,
        shift=None,
    )
    if args.problem is None and args.unet is None:
        raise SystemExit(f"{saved['path']}: its config names neither a problem nor a model")
    task = build_task(args)
    if task.get("flow") and cfg.get("shift") is not None and task["shift"] != cfg["shift"]:
        from .flow import FlowMatchDenoiser  # the run was given --shift: its teacher's schedule

        task["teacher"] = FlowMatchDenoiser(task["teacher"].model, flow_scheduler(float(cfg["shift"]), None))
    generator = make_student(args, task, task["teacher"])
    import numpy as np

    rng = (random.getstate(), np.random.get_state())  # load_state restores the saved run's RNG states:
    try:  # this process keeps its own
        with torch.random.fork_rng():
            if saved["format"] == "sharded":
                load_sharded_state(saved["path"], modules={"generator": generator}, config=cfg, strict=False)
            else:
                load_state(
                    saved["path"],
                    modules={"generator": generator},
                    config=cfg,
                    rank=0,
                    world_size=saved["world_size"],
                    strict=False,
                )
    finally:
        random.setstate(rng[0])
        np.random.set_state(rng[1])
    return generator.to(device).eval().requires_grad_(False), saved


def export_state(
    state: str | os.PathLike, out: str | os.PathLike, *, model: str | None = None, cache_dir: str | None = None
) -> Path:
    """``disback export STATE OUT``: rebuild the generator of a saved ``disback train`` state and export it.

    ``state`` is a run's ``--out`` (its newest state), its ``state/`` folder, or one kept step folder
    (``state/step-000001200``). The generator is built as the run built it, from the run configuration
    the state holds (the model or problem, the method, the seed, a flow model's shift), and its weights
    are loaded from the state (verified); ``model`` replaces the configured model folder (a run whose
    model folder moved: only its config and architecture are used), ``cache_dir`` is where a built-in
    problem's teacher is cached. ``out`` must not exist, be empty, or hold an earlier export (replaced
    atomically); anything else is refused before anything is built.
    """
    folder = check_export_target(out, "OUT")
    generator, saved = build_generator(state, model=model, cache_dir=cache_dir)
    return _export(generator, folder, saved["config"], saved["step"], f"disback export {saved['path']}")


def _to(batch: Batch, device: torch.device) -> Batch:
    def move(t: Any) -> Any:  # tensors, and the tensors of dict conditions (SD3's and FLUX's)
        if isinstance(t, torch.Tensor):
            return t.to(device)
        return {k: move(v) for k, v in t.items()} if isinstance(t, dict) else t

    return Batch(move(batch.z), move(batch.cond), move(batch.real), move(batch.real_cond))


if __name__ == "__main__":
    main(sys.argv[1:])
