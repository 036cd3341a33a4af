"""Kill-test worker and driver for :mod:`disback_core.sharded_state`.

As a fork server (``python tests/_sharded_kill.py --serve``) it reads one JSON job a line and forks
``world`` worker processes for it (world size 1: a plain run; 2: an FSDP2 run on CPU over gloo, its
process group set up through a file). The workers save a sharded state at step after step, each
step's state rebuilt from ``(step, generation)`` alone (seeded weights and one training step), so a
checker can rebuild the state any completed save must hold. They print ``ready``, ``save <k>``,
``saved <k> <seconds>`` and ``done`` (rank 0), flushed before the work they announce.

As a module, :func:`kill_campaign` SIGKILLs workers at seeded random points (mid-save, between
saves, anywhere early) and checks after every kill that the run folder's latest state loads at
world size 1 (a state saved at 2 is resharded) and equals bit for bit the state of the last save
reported complete or of the save in flight, that every ``step-*`` folder loads and equals its
step's state, and that every temporary folder is refused or complete. A third of the workers
re-save the live step or resume from an earlier one. Finally one worker per run folder runs to its
end and the folder must hold only ``latest.json`` and the last ``keep`` step folders.
"""

from __future__ import annotations

import contextlib
import importlib
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

import torch

HERE = Path(__file__).resolve().parent
for p in (str(HERE), str(HERE.parent)):
    if p not in sys.path:
        sys.path.insert(0, p)

from _sharded_run import CFG, build, differences, full_state, kw, train_step  # noqa: E402

from disback_core.sharded_state import load_sharded_state, save_sharded_state  # noqa: E402
from disback_core.state import latest_state  # noqa: E402
from disback_core.storage import StorageError  # noqa: E402

WORKER = Path(__file__).resolve()
SHARD = re.compile(r"shard-\d{5}-")


def state_for(step: int, gen: int, pad: int, mesh: Any = None) -> dict[str, Any]:
    """The state every save of ``step`` by generation ``gen`` holds (the same at every world size)."""
    o = build(seed=gen * 100_000 + step, mesh=mesh, pad=pad)
    train_step(o, step)
    return o


def emit(*parts: Any) -> None:
    sys.stdout.write(" ".join(str(p) for p in parts) + "\n")
    sys.stdout.flush()


# --------------------------------------------------------------------------- worker and fork server


def work(job: dict[str, Any], rank: int) -> None:
    torch.set_num_threads(1)
    world, mesh = job["world"], None
    if world > 1:
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        dist.init_process_group("gloo", init_method=f"file://{job['pg']}", rank=rank, world_size=world)
        mesh = init_device_mesh("cpu", (world,))
    if rank == 0:
        emit("ready")
    for k in range(job["start"], job["start"] + job["saves"]):
        o = state_for(k, job["gen"], job["pad"], mesh)
        if rank == 0:
            emit("save", k)
        t0 = time.perf_counter()
        save_sharded_state(job["folder"], step=k, **kw(o), extra={"gen": job["gen"]}, config=CFG, keep=job["keep"])
        if rank == 0:
            emit("saved", k, f"{time.perf_counter() - t0:.6f}")
    if rank == 0:
        emit("done")
    if world > 1:
        torch.distributed.destroy_process_group()


def serve() -> None:
    """For each stdin line (a JSON job) fork its workers, report ``pid <rank> <pid>`` and, once all
    have ended (or were killed), ``exit <status> ...``. Imports and lazy initialisation are paid once."""
    torch.set_num_threads(1)
    for name in ("torch.distributed.checkpoint", "torch.distributed.device_mesh", "torch.distributed.fsdp"):
        importlib.import_module(name)

    with tempfile.TemporaryDirectory() as scratch, contextlib.redirect_stdout(io.StringIO()):
        o = state_for(1, 0, 8)
        save_sharded_state(scratch, step=1, **kw(o), extra={"gen": 0}, config=CFG)
        load_sharded_state(scratch, **kw(build(pad=8)), config=CFG)
    while True:
        line = sys.stdin.readline()
        if not line:
            return
        job = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pids = []
        for rank in range(job["world"]):
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    work(job, rank)
                    code = 0
                except BaseException:
                    traceback.print_exc()
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            pids.append(pid)
        for rank, pid in enumerate(pids):
            emit("pid", rank, pid)
        statuses = [os.waitpid(pid, 0)[1] for pid in pids]
        emit("exit", *statuses)


class Server:
    """One fork server; its workers' events arrive on its stdout."""

    def __init__(self, workdir: Path, timeout: float):
        self.errpath = workdir / "worker-stderr.txt"
        self.err = open(self.errpath, "w")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
        self.p = subprocess.Popen(
            [sys.executable, str(WORKER), "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.err,
            text=True,
            env=env,
        )
        self.watchdog = threading.Timer(timeout, self.p.kill)  # a hung worker cannot hang the caller
        self.watchdog.daemon = True
        self.watchdog.start()

    def next(self) -> list[str]:
        line = self.p.stdout.readline()  # type: ignore[union-attr]
        if not line:
            raise RuntimeError(f"fork server ended:\n{self.errpath.read_text()[-3000:]}")
        return line.split()

    def start(self, job: dict[str, Any]) -> tuple[list[int], list[list[str]]]:
        """Fork a job's workers; returns their pids and the events up to rank 0's ``ready``."""
        self.p.stdin.write(json.dumps(job) + "\n")  # type: ignore[union-attr]
        self.p.stdin.flush()  # type: ignore[union-attr]
        pids: dict[int, int] = {}
        events: list[list[str]] = []
        while len(pids) < job["world"] or not any(e[0] == "ready" for e in events):
            e = self.next()
            if e[0] == "pid":
                pids[int(e[1])] = int(e[2])
            elif e[0] == "exit":
                raise RuntimeError(
                    f"workers ended ({e[1:]}) before they were ready:\n{self.errpath.read_text()[-3000:]}"
                )
            else:
                events.append(e)
        return [pids[r] for r in range(job["world"])], events

    def until_exit(self) -> tuple[list[list[str]], list[int]]:
        events: list[list[str]] = []
        while True:
            e = self.next()
            if e[0] == "exit":
                return events, [int(s) for s in e[1:]]
            events.append(e)

    def close(self) -> None:
        self.watchdog.cancel()
        if self.p.poll() is None:
            self.p.stdin.close()  # type: ignore[union-attr]
            self.p.wait(30)
        self.err.close()


# --------------------------------------------------------------------------- the driver


def _loaded(path: Path, pad: int) -> tuple[int, int, dict[str, torch.Tensor]]:
    """(step, generation, full state) of a state loaded at world size 1 into fresh plain objects."""
    o = build(seed=99, pad=pad)
    r = load_sharded_state(path, **kw(o), config=CFG)
    return r["step"], r["extra"]["gen"], full_state(o)


def _matches(step: int, gen: int, got: dict[str, torch.Tensor], pad: int) -> bool:
    return not differences(got, full_state(state_for(step, gen, pad)))


def _folder_state(folder: Path, keep: int) -> list[str]:
    """What a kill left in the run folder, read from its entries (several may apply)."""
    if not folder.is_dir():
        return ["no folder yet"]
    names = os.listdir(folder)
    try:
        live = latest_state(folder) if "latest.json" in names else None
    except StorageError:
        return ["broken latest.json"]
    steps = sorted(int(n[5:]) for n in names if n.startswith("step-"))
    out = []
    for n in (n for n in names if n.startswith(".step-")):
        if live is not None and n == live.name:
            out.append("live temporary folder (re-save between its two switches)")
        elif n.endswith("-old"):
            out.append("old folder moved aside (re-save or cleanup)")
        elif n.endswith("-link"):
            out.append("staged hard-link copy (re-save)")
        elif (folder / n / "manifest.json").exists():
            out.append("complete temporary folder, not renamed")
        elif any(SHARD.match(f) for f in os.listdir(folder / n)):
            out.append("temporary folder with shards, no manifest")
        else:
            out.append("temporary folder without shards")
    if any(n.startswith(".latest.json.") for n in names):
        out.append("temporary pointer file")
    if live is not None and steps and steps[-1] > int(live.name.split("-")[1].split(".")[0]):
        out.append("step folder newer than latest.json (renamed, not yet switched to)")
    if len(steps) > keep:
        out.append("more step folders than keep (switched, not yet cleaned up)")
    return out or ["clean"]


def _check_folders(folder: Path, pad: int, out: dict[str, Any], n: int) -> None:
    """Every step folder loads and equals its step's state; every temporary one is refused or complete."""
    for entry in sorted(os.listdir(folder)):
        path = folder / entry
        if not path.is_dir():
            continue
        try:
            step, gen, got = _loaded(path, pad)
        except StorageError:
            if entry.startswith("step-"):
                out["step_dirs_refused"] += 1
                out["failures"].append(f"kill {n}: step folder {entry} is refused")
            else:
                out["temporary_dirs_refused"] += 1
            continue
        if not _matches(step, gen, got, pad):
            out["partial_accepted"] += 1
            out["failures"].append(f"kill {n}: {entry} loads but is not the state of step {step}")
        elif entry.startswith("step-"):
            out["step_dirs_complete"] += 1
        else:
            out["temporary_dirs_complete"] += 1


def kill_campaign(
    workdir: str | os.PathLike,
    *,
    kills: int,
    seed: int,
    worlds: tuple[int, ...] = (1, 2),
    pad: int = 256,
    keep: int = 2,
    timeout: float = 900,
) -> dict[str, Any]:
    """``kills`` SIGKILLs of workers at seeded random points, alternating over ``worlds``, each checked."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    rng = random.Random(seed)
    out: dict[str, Any] = {
        "kills": 0,
        "kills_by_world": {str(w): 0 for w in worlds},
        "kills_mid_save": 0,
        "kills_between_saves": 0,
        "kills_before_first_save": 0,
        "resave_or_rewind_runs": 0,
        "latest_is_last_reported_save": 0,
        "latest_is_save_in_flight": 0,
        "latest_is_previous_state": 0,
        "no_state_yet": 0,
        "loads_after_kill_ok": 0,
        "loads_after_kill_failed": 0,
        "resharded_loads": 0,
        "step_dirs_complete": 0,
        "step_dirs_refused": 0,
        "temporary_dirs_refused": 0,
        "temporary_dirs_complete": 0,
        "partial_accepted": 0,
        "saves_completed": 0,
        "after_kill_folder": {},
        "save_seconds_mean": {},
        "failures": [],
    }
    live: dict[int, tuple[int, int] | None] = dict.fromkeys(worlds)
    durations: dict[int, list[float]] = {w: [] for w in worlds}
    gen = 0
    server = Server(workdir, timeout)
    try:
        for n in range(kills):
            world = worlds[n % len(worlds)]
            folder = workdir / f"ws{world}"
            before = live[world]
            start = 1
            if before is not None:
                r = rng.random()
                start = before[0] if r < 0.2 else max(1, before[0] - 1) if r < 1 / 3 else before[0] + 1
                out["resave_or_rewind_runs"] += start <= before[0]
            gen += 1
            job = {
                "folder": str(folder),
                "world": world,
                "gen": gen,
                "start": start,
                "saves": 10_000,
                "pad": pad,
                "keep": keep,
                "pg": str(workdir / f"pg-{n}"),
            }
            pids, events = server.start(job)
            mean = sum(durations[world][-8:]) / max(1, len(durations[world][-8:])) or 0.05
            if rng.random() < 0.25:  # anywhere early: before, during or after the first save
                time.sleep(rng.uniform(0.0, 3 * mean))
            else:  # into a save (or just after it) of one of the first steps
                target = start + rng.randint(0, 2)
                while events[-1][:2] != ["save", str(target)]:
                    events.append(server.next())
                time.sleep(rng.uniform(0.0, 1.2 * mean))
            order = pids[:] if rng.random() < 0.5 else pids[::-1]
            for i, pid in enumerate(order):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                if i == 0 and len(order) > 1:
                    time.sleep(rng.uniform(0.0, 0.02))
            rest, _ = server.until_exit()
            events += rest
            out["kills"] += 1
            out["kills_by_world"][str(world)] += 1
            saved = [int(e[1]) for e in events if e[0] == "saved"]
            durations[world] += [float(e[2]) for e in events if e[0] == "saved"]
            out["saves_completed"] += len(saved)
            last = [e for e in events if e[0] in ("save", "saved")]
            in_flight = int(last[-1][1]) if last and last[-1][0] == "save" else None
            if in_flight is not None:
                out["kills_mid_save"] += 1
            elif saved:
                out["kills_between_saves"] += 1
            else:
                out["kills_before_first_save"] += 1
            for what in _folder_state(folder, keep):
                out["after_kill_folder"][what] = out["after_kill_folder"].get(what, 0) + 1
            allowed = {(saved[-1], gen)} if saved else ({before} if before is not None else set())
            if in_flight is not None:
                allowed.add((in_flight, gen))
            if latest_state(folder) is None:
                if allowed:
                    out["loads_after_kill_failed"] += 1
                    out["failures"].append(f"kill {n}: no latest state, expected one of {sorted(allowed)}")
                else:
                    out["no_state_yet"] += 1
                continue
            try:
                step, g, got = _loaded(folder, pad)
            except StorageError as e:
                out["loads_after_kill_failed"] += 1
                out["failures"].append(f"kill {n}: latest state refused: {e}")
                continue
            if (step, g) in allowed and _matches(step, g, got, pad):
                out["loads_after_kill_ok"] += 1
                out["resharded_loads"] += world != 1
                key = (
                    "latest_is_last_reported_save"
                    if saved and (step, g) == (saved[-1], gen)
                    else "latest_is_save_in_flight"
                    if (step, g) == (in_flight, gen)
                    else "latest_is_previous_state"
                )
                out[key] += 1
                live[world] = (step, g)
            else:
                out["loads_after_kill_failed"] += 1
                out["failures"].append(
                    f"kill {n}: latest state is step {step} of generation {g}, "
                    f"expected one of {sorted(allowed)} with its exact state"
                )
                live[world] = (step, g)
            _check_folders(folder, pad, out, n)
        # every run folder: a worker that is not killed repairs whatever the kills left
        out["final_clean"] = {}
        for world in worlds:
            folder = workdir / f"ws{world}"
            gen += 1
            begin = (live[world] or (0, 0))[0] + 1
            job = {
                "folder": str(folder),
                "world": world,
                "gen": gen,
                "start": begin,
                "saves": 2,
                "pad": pad,
                "keep": keep,
                "pg": str(workdir / f"pg-final-{world}"),
            }
            server.start(job)
            _, statuses = server.until_exit()
            names = sorted(os.listdir(folder))
            want = ["latest.json", *(f"step-{s:09d}" for s in range(max(1, begin + 2 - keep), begin + 2))]
            step, g, got = _loaded(folder, pad)
            out["final_clean"][str(world)] = (
                statuses == [0] * world
                and names == want
                and (step, g) == (begin + 1, gen)
                and _matches(step, g, got, pad)
            )
            if not out["final_clean"][str(world)]:
                out["failures"].append(f"final run at world size {world}: {statuses}, {names} (expected {want})")
    finally:
        server.close()
    out["save_seconds_mean"] = {str(w): round(sum(d) / max(1, len(d)), 4) for w, d in durations.items()}
    out["seconds"] = round(time.perf_counter() - t_all, 1)
    return out


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        serve()
    else:
        print(json.dumps(kill_campaign(sys.argv[1], kills=int(sys.argv[2]), seed=0), indent=1))
