"""Kill-test worker and driver for :mod:`disback_core.state`.

As a script, it trains a tiny model (plus a ``pad x pad`` linear layer, so that a save takes
measurable time) and saves a state after every step, resuming from the folder's latest state when
there is one::

    python tests/_resume_worker.py FOLDER --steps N [--pad 768] [--keep 2] [--trace] [--out FILE]

It prints one line per event, flushed before the work it announces: ``ready <step>``, ``step <k>``,
``loss <k> <float.hex> <seconds>``, ``save <k>``, ``saved <k> <seconds>``, ``fp <k> <sha256 of the
whole state>`` (with ``--trace``) and ``done <N>``. Each training step draws from torch's global RNG,
numpy's and Python's ``random``, and a data sampler's ``torch.Generator``.

As a module, :func:`kill_campaign` runs an uninterrupted reference run, then SIGKILLs workers at
seeded random points (mid-step, mid-save, anywhere), checks after every kill that the folder's
latest state loads, verifies and equals the reference run's state at its step bit for bit, that
every other folder there is either refused or complete, and finally resumes to the end and compares
the final parameters with the reference run's (used by ``tests/test_state.py`` and
``benchmarks/kill_resume.py``).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from disback_core.state import latest_state, list_states, load_state, save_state  # noqa: E402
from disback_core.storage import StorageError, load_tensors, save_tensors  # noqa: E402

WORKER = Path(__file__).resolve()
CONFIG = {"problem": "kill-test", "net": [8, 32, 8], "lr": 1e-2, "batch": 16, "pad_batch": 64}


# --------------------------------------------------------------------------- the training run


def build(pad: int) -> dict[str, Any]:
    """The run's objects, built the same way in every process."""
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 8))
    padm = nn.Linear(pad, pad, bias=False)
    opt = torch.optim.AdamW([*net.parameters(), *padm.parameters()], lr=CONFIG["lr"], weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.995 ** s)
    data = torch.randn(256, 8, generator=torch.Generator().manual_seed(7))
    return {"modules": {"net": net, "pad": padm}, "optimizers": {"opt": opt}, "schedulers": {"lr": sched},
            "generators": {"sampler": torch.Generator().manual_seed(1234)}, "data": data, "pad": pad}


def config(pad: int) -> dict[str, Any]:
    return {**CONFIG, "pad": pad}


def train_step(o: dict[str, Any]) -> float:
    net, padm = o["modules"]["net"], o["modules"]["pad"]
    opt, sched = o["optimizers"]["opt"], o["schedulers"]["lr"]
    idx = torch.randint(0, o["data"].shape[0], (CONFIG["batch"],), generator=o["generators"]["sampler"])
    x = o["data"][idx]
    scale = 1.0 + random.random() + 0.01 * random.gauss(0.0, 1.0)
    shift = 0.01 * float(np.random.standard_normal())
    x = x * scale + shift + 0.05 * torch.randn_like(x)
    z = padm(torch.randn(CONFIG["pad_batch"], o["pad"]))
    loss = (net(x) - x.flip(1).sin()).pow(2).mean() + 1e-4 * z.pow(2).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    return float(loss.detach())


def state_kwargs(o: dict[str, Any]) -> dict[str, Any]:
    return {k: o[k] for k in ("modules", "optimizers", "schedulers", "generators")}


def fingerprint(o: dict[str, Any]) -> str:
    """sha256 over everything a resume restores: weights, optimizer and scheduler state, all RNGs."""
    h = hashlib.sha256()

    def put(name: str, t: torch.Tensor) -> None:
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())

    for name, m in sorted(o["modules"].items()):
        for k, v in sorted(m.state_dict().items()):
            put(f"{name}.{k}", v)
    sd = o["optimizers"]["opt"].state_dict()
    for i, st in sorted(sd["state"].items()):
        for k, v in sorted(st.items()):
            put(f"opt.{i}.{k}", v)
    h.update(repr(sd["param_groups"]).encode())
    h.update(repr(sorted(o["schedulers"]["lr"].state_dict().items())).encode())
    put("rng.torch", torch.get_rng_state())
    put("rng.sampler", o["generators"]["sampler"].get_state())
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    h.update(f"{kind}|{keys.tobytes().hex()}|{pos}|{has_gauss}|{cached!r}".encode())
    h.update(repr(random.getstate()).encode())
    return h.hexdigest()


def emit(*parts: Any) -> None:
    sys.stdout.write(" ".join(str(p) for p in parts) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--pad", type=int, default=768)
    ap.add_argument("--keep", type=int, default=2)
    ap.add_argument("--trace", action="store_true")
    ap.add_argument("--resave", action="store_true", help="resume from the state before the latest one, so that "
                    "the first save re-saves the live state's step")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    o = build(args.pad)
    start, src = 0, latest_state(args.folder)
    steps = list_states(args.folder)
    if args.resave and src is not None and len(steps) >= 2 and src.name == f"step-{steps[-1]:09d}":
        src = Path(args.folder) / f"step-{steps[-2]:09d}"
    if src is not None:
        start = load_state(src, **state_kwargs(o), config=config(args.pad))["step"]
    emit("ready", start)
    for k in range(start + 1, args.steps + 1):
        emit("step", k)
        t0 = time.perf_counter()
        loss = train_step(o)
        emit("loss", k, loss.hex(), f"{time.perf_counter() - t0:.6f}")
        emit("save", k)
        t0 = time.perf_counter()
        save_state(args.folder, step=k, **state_kwargs(o), extra={"epoch": k // 16, "seen": k * CONFIG["batch"]},
                   config=config(args.pad), keep=args.keep)
        emit("saved", k, f"{time.perf_counter() - t0:.6f}")
        if args.trace:
            emit("fp", k, fingerprint(o))
    if args.out:
        save_tensors(args.out, {f"{n}.{k}": v for n, m in o["modules"].items() for k, v in m.state_dict().items()})
    emit("done", args.steps)


# --------------------------------------------------------------------------- fork server


def serve() -> None:
    """Fork server: for each stdin line (a JSON list of worker arguments) fork a worker running
    :func:`main`, report ``pid <pid>`` and, once it has ended (or was killed), ``exit <pid> <status>``.
    Imports and lazy initialisation are paid once, by a warm-up run in a scratch folder; every
    worker then starts from the same state (each rebuilds and reseeds its objects)."""
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as scratch:
        with contextlib.redirect_stdout(io.StringIO()):
            main([scratch, "--steps", "1", "--pad", "8"])
            main([scratch, "--steps", "2", "--pad", "8"])  # a resume: load_state
    while True:
        line = sys.stdin.readline()
        if not line:
            return
        args = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                main(args)
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        emit("pid", pid)
        _, status = os.waitpid(pid, 0)
        emit("exit", pid, status)


class Server:
    """One fork server; its workers' events arrive on its stdout."""

    def __init__(self, workdir: Path, timeout: float):
        self.errpath = workdir / "worker-stderr.txt"
        self.err = open(self.errpath, "w")
        self.p = subprocess.Popen([sys.executable, str(WORKER), "--serve"], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=self.err, text=True, env=_env())
        self.watchdog = threading.Timer(timeout, self.p.kill)  # a hung worker cannot hang the caller
        self.watchdog.daemon = True
        self.watchdog.start()

    def start(self, args: list[str]) -> tuple[int, list[list[str]]]:
        """Fork a worker; returns its pid and its events up to ``ready``."""
        self.p.stdin.write(json.dumps(args) + "\n")
        self.p.stdin.flush()
        pid, events = None, []
        # The worker's lines and the server's "pid" line share one pipe: under load the worker can
        # get far (even to its end) before the server writes "pid", so "ready" may not be the last event.
        while pid is None or not any(e[0] == "ready" for e in events):
            e = self.next()
            if e[0] == "pid":
                pid = int(e[1])
            elif e[0] == "exit":  # the server writes it after "pid": the worker died before "ready"
                raise RuntimeError(f"worker ended (status {e[2]}) before it was ready:\n"
                                   f"{self.errpath.read_text()[-3000:]}")
            else:
                events.append(e)
        return pid, events

    def next(self) -> list[str]:
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError(f"fork server ended:\n{self.errpath.read_text()[-3000:]}")
        return line.split()

    def until_exit(self) -> tuple[list[list[str]], int]:
        """The worker's remaining events and its wait status."""
        events = []
        while True:
            e = self.next()
            if e[0] == "exit":
                return events, int(e[2])
            events.append(e)

    def run(self, args: list[str]) -> list[list[str]]:
        """A worker run to its end."""
        _, events = self.start(args)
        rest, status = self.until_exit()
        if status != 0:
            raise RuntimeError(f"worker failed (status {status}):\n{self.errpath.read_text()[-3000:]}")
        return events + rest

    def close(self) -> None:
        self.watchdog.cancel()
        if self.p.poll() is None:
            self.p.stdin.close()
            self.p.wait(30)
        self.err.close()


# --------------------------------------------------------------------------- the driver


def _args(folder: Path, steps: int, pad: int, keep: int, *extra: str) -> list[str]:
    return [str(folder), "--steps", str(steps), "--pad", str(pad), "--keep", str(keep), *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def _mean(xs: list[float], default: float) -> float:
    return sum(xs) / len(xs) if xs else default


def _where(events: list[list[str]]) -> str:
    """Where the worker was when it was killed, from its last event."""
    last = events[-1][0] if events else "ready"
    return {"save": "mid-save", "step": "mid-step", "loss": "mid-step", "saved": "mid-step",
            "ready": "mid-step"}.get(last, last)


def _check_dirs(folder: Path, o: dict[str, Any], cfg: dict[str, Any], ref_fp: dict[int, str],
                out: dict[str, Any]) -> None:
    """Every folder in the run folder is refused or is a complete state equal to the reference's."""
    if not folder.is_dir():
        return
    for entry in sorted(os.listdir(folder)):
        path = folder / entry
        if not path.is_dir():
            continue
        out["dirs_scanned"] += 1
        try:
            st = load_state(path, **state_kwargs(o), config=cfg)
        except StorageError:
            out["dirs_refused"] += 1
            if not entry.startswith("."):  # a step-* folder is only ever made from a complete one
                out["step_dirs_refused"] += 1
                out["failures"].append(f"{entry}: a step folder is refused")
            continue
        if fingerprint(o) == ref_fp.get(st["step"]):
            out["dirs_accepted_complete"] += 1
        else:
            out["partial_accepted"] += 1
            out["failures"].append(f"{entry}: loaded but differs from the reference state at step {st['step']}")


def _folder_state(folder: Path, keep: int) -> list[str]:
    """What a kill left in the run folder, read from its entries (several may apply)."""
    if not folder.is_dir():
        return ["no folder yet"]
    names = os.listdir(folder)
    live = latest_state(folder) if "latest.json" in names else None
    steps = sorted(int(n[5:]) for n in names if n.startswith("step-"))
    tmps = [n for n in names if n.startswith(".step-")]
    out = []
    for n in tmps:
        if live is not None and n == live.name:
            out.append("live temporary folder (re-save between its two switches)")
        elif n.endswith("-old"):
            out.append("old folder moved aside (re-save or cleanup)")
        elif n.endswith("-link"):
            out.append("staged hard-link copy (re-save)")
        elif os.path.exists(folder / n / "manifest.json"):
            out.append("complete temporary folder, not renamed")
        else:
            out.append("partial temporary folder")
    if any(n.startswith(".latest.json.tmp-") for n in names):
        out.append("temporary pointer file")
    if live is not None and steps and steps[-1] > int(re.search(r"step-(\d{9})", live.name).group(1)):
        out.append("step folder newer than latest.json (renamed, not yet switched to)")
    if len(steps) > keep:
        out.append("more step folders than keep (switched, not yet cleaned up)")
    return out or ["clean"]


def _check_latest(folder: Path, o: dict[str, Any], cfg: dict[str, Any], ref_fp: dict[int, str], saved_best: int,
                  out: dict[str, Any]) -> None:
    """The latest state loads, verifies, is not older than the last save reported complete, and
    equals the reference run's state at its step."""
    n = out["kills"]
    if latest_state(folder) is None:
        if saved_best:
            out["loads_after_kill_failed"] += 1
            out["failures"].append(f"kill {n}: no latest state after step {saved_best} was saved")
        else:
            out["kills_before_first_save"] += 1
        return
    t0 = time.perf_counter()
    try:
        st = load_state(folder, **state_kwargs(o), config=cfg)
        ok = st["step"] >= saved_best and fingerprint(o) == ref_fp.get(st["step"])
        if not ok:
            out["failures"].append(f"kill {n}: latest state (step {st['step']}) is older than step {saved_best} "
                                   "or differs from the reference")
    except StorageError as e:
        ok = False
        out["failures"].append(f"kill {n}: latest state refused: {e}")
    out["load_seconds"].append(time.perf_counter() - t0)
    out["loads_after_kill_ok" if ok else "loads_after_kill_failed"] += 1


def _kill_once(server: Server, args: list[str], steps: int, rng: random.Random,
               durations: dict[str, list[float]]) -> tuple[int, list[list[str]], bool]:
    """Start a worker (a third of them resuming from the state before the latest, so that their first
    save re-saves the live step), SIGKILL it at a seeded random point: a random time into a step,
    into a save, or anywhere in its first 0.3 s; returns its start step and its events."""
    resave = rng.random() < 1 / 3
    pid, events = server.start(args + ["--resave"] * resave)
    start = int(events[0][1])
    phase = rng.choice(["step", "save", "save", "any"])
    target = min(start + rng.randint(1, 2), steps - 1)
    if phase == "any":
        delay = rng.uniform(0.0, 0.3)
    else:
        # into a step: within its usual length; into a save: sometimes just after it, too
        delay = rng.uniform(0.0, (0.9 if phase == "step" else 1.3) * _mean(durations[phase], 0.05))
        while events[-1][:2] != [phase, str(target)] and events[-1][0] != "done":
            events.append(server.next())
    time.sleep(delay)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:  # it had ended already
        pass
    rest, _ = server.until_exit()
    return start, events + rest, resave


def kill_campaign(workdir: str | os.PathLike, *, kills: int, seed: int, steps: int, pad: int = 768,
                  keep: int = 2, timeout: float = 900) -> dict[str, Any]:
    """Reference run, ``kills`` SIGKILLs at seeded random points, checks after each, final resume."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    cfg = config(pad)
    server = Server(workdir, timeout)
    try:
        ref_events = server.run(_args(workdir / "reference", steps, pad, keep, "--trace", "--out",
                                      str(workdir / "reference.safetensors")))
        t_ref = time.perf_counter() - t_all
        ref_loss = {int(e[1]): e[2] for e in ref_events if e[0] == "loss"}
        ref_fp = {int(e[1]): e[2] for e in ref_events if e[0] == "fp"}
        durations = {"step": [float(e[3]) for e in ref_events if e[0] == "loss"],
                     "save": [float(e[2]) for e in ref_events if e[0] == "saved"]}
        rng = random.Random(seed)
        folder = workdir / "run"
        o = build(pad)
        out: dict[str, Any] = {
            "kills": 0, "kills_mid_save": 0, "kills_mid_step": 0, "resave_runs": 0, "kills_mid_resave": 0,
            "worker_finished_early": 0,
            "loads_after_kill_ok": 0, "loads_after_kill_failed": 0, "kills_before_first_save": 0,
            "resumed_runs": 0, "resumed_runs_equal": 0, "losses_checked": 0, "losses_equal": 0,
            "dirs_scanned": 0, "dirs_refused": 0, "step_dirs_refused": 0, "dirs_accepted_complete": 0,
            "partial_accepted": 0, "after_kill_folder": {}, "failures": [], "load_seconds": [],
        }
        saved_best = 0
        for _ in range(kills):
            start, events, resave = _kill_once(server, _args(folder, steps, pad, keep), steps, rng, durations)
            out["kills"] += 1
            out["resave_runs"] += resave
            out["kills_mid_resave"] += resave and events[-1] == ["save", str(start + 1)]
            out["worker_finished_early"] += events[-1][0] == "done"
            out["kills_mid_save" if _where(events) == "mid-save" else "kills_mid_step"] += 1
            same = [ref_loss.get(int(e[1])) == e[2] for e in events if e[0] == "loss"]
            out["losses_checked"] += len(same)
            out["losses_equal"] += sum(same)
            out["resumed_runs"] += start > 0
            out["resumed_runs_equal"] += start > 0 and all(same)
            saved_best = max([saved_best] + [int(e[1]) for e in events if e[0] == "saved"])
            for label in _folder_state(folder, keep):
                out["after_kill_folder"][label] = out["after_kill_folder"].get(label, 0) + 1
            _check_latest(folder, o, cfg, ref_fp, saved_best, out)
            _check_dirs(folder, o, cfg, ref_fp, out)
        final_events = server.run(_args(folder, steps, pad, keep, "--out", str(workdir / "resumed.safetensors")))
    finally:
        server.close()
    final_start = int(final_events[0][1])
    same = [ref_loss.get(int(e[1])) == e[2] for e in final_events if e[0] == "loss"]
    out["losses_checked"] += len(same)
    out["losses_equal"] += sum(same)
    a, b = load_tensors(workdir / "reference.safetensors"), load_tensors(workdir / "resumed.safetensors")
    out["final_resume_from_step"] = final_start
    out["final_params_equal"] = bool(set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)) and all(same)
    out["resumed_runs"] += final_start > 0
    out["resumed_runs_equal"] += final_start > 0 and out["final_params_equal"]
    expected = {"latest.json", *(f"step-{s:09d}" for s in range(max(1, steps - keep + 1), steps + 1))}
    out["stray_entries"] = sorted(set(os.listdir(folder)) - expected)
    out["missing_entries"] = sorted(expected - set(os.listdir(folder)))
    loads = out.pop("load_seconds")
    out["timings"] = {"total_s": round(time.perf_counter() - t_all, 2), "reference_run_s": round(t_ref, 2),
                      "mean_step_s": round(_mean(durations["step"], 0), 4),
                      "mean_save_s": round(_mean(durations["save"], 0), 4),
                      "mean_verified_load_s": round(_mean(loads, 0), 4)}
    out["state_bytes"] = sum(f.stat().st_size for f in (folder / f"step-{steps:09d}").iterdir())
    return out


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        serve()
    else:
        main()
