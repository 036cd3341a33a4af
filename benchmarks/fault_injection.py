"""Fault injection: SIGKILL a process while it saves trajectories over one folder, then load it.

Two trajectories of a tiny teacher (A: 3 nodes, B: 4 nodes) are saved over one folder in the
cycle A, A, B, B (re-saving the same trajectory and switching to the other) by a writer process.
A warm "zygote" subprocess forks one writer per kill (so no kill waits for torch to import); the
writer is killed with SIGKILL after a seeded random delay, uniform over three median save times
from the start of its first save (so kills land in every phase of the first few saves). After each kill
the folder must load (``Trajectory.load``), verify (``verify()`` max error < 1e-5), equal A or B
exactly, and be the last save that completed or the one in progress at the kill; files under a
final name must be complete (their content hash matches the name). Stray files (temporary files,
files of the other save) are counted; the next save removes them.

    python benchmarks/fault_injection.py --kills 60 --seed 0 --out benchmarks/results/fault_injection.json

A 10-kill run is part of the test suite (tests/test_storage_fuzz.py).
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import re
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import torch

CYCLE = ("A", "A", "B", "B")
_FINAL = re.compile(r"(?:node-\d{4,}|probe)-([0-9a-f]{16})\.safetensors")


def tiny_teacher() -> Any:
    """The seeded tiny teacher: ``edm_mlp(2, sigma_data=1.0, width=16, depth=1)`` under seed 0."""
    from disback_core import edm_mlp, freeze

    torch.manual_seed(0)
    return freeze(edm_mlp(2, sigma_data=1.0, width=16, depth=1))


def build_pair() -> tuple[Any, Any, Any]:
    """(teacher, A, B): the tiny teacher and two different recorded trajectories of it."""
    from disback_core import Batch, LoraSpec, make_generator, record_degradation
    from disback_core.adapters import DMD2

    teacher = tiny_teacher()
    gen = make_generator(teacher, 80.0)

    def record(steps: int, seed: int) -> Any:
        return record_degradation(teacher, gen, DMD2(sigma_data=1.0), lambda: Batch(torch.randn(16, 2)), steps=steps,
                                  interval=2, lr=1e-2, lora=LoraSpec(rank=2), probe_size=4, seed=seed)

    return teacher, record(6, 1), record(8, 2)


def same_trajectory(a: Any, b: Any) -> bool:
    """Whether two trajectories hold exactly the same nodes, steps, spec, probe and meta."""
    if (a.kind, a.steps, a.lora, a.meta, len(a.nodes)) != (b.kind, b.steps, b.lora, b.meta, len(b.nodes)):
        return False
    for x, y in zip(a.nodes, b.nodes):
        if x.keys() != y.keys() or not all(x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]) for k in x):
            return False
    if (a.probe is None) != (b.probe is None):
        return False
    if a.probe is None:
        return True
    pa, pb = a.probe, b.probe
    tensors = [(pa.x, pb.x), (pa.sigma, pb.sigma), *zip(pa.outputs, pb.outputs)]
    return (len(pa.outputs) == len(pb.outputs) and (pa.cond is None) == (pb.cond is None)
            and all(torch.equal(x, y) for x, y in tensors) and (pa.cond is None or torch.equal(pa.cond, pb.cond)))


# ----------------------------------------------------------------------------- the writer side


def _writer_loop(folder: Path, trajs: dict[str, Any], progress: Path, offset: int) -> None:
    """Save the cycle forever, logging 'start i X t' / 'done i X t' (unbuffered, monotonic clock)
    around each save."""
    fd = os.open(progress, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    i = 0
    while True:
        label = CYCLE[(offset + i) % len(CYCLE)]
        os.write(fd, f"start {i} {label} {time.monotonic():.6f}\n".encode())
        trajs[label].save(folder)
        os.write(fd, f"done {i} {label} {time.monotonic():.6f}\n".encode())
        i += 1


def zygote(folder: Path, ref_a: Path, ref_b: Path) -> None:
    """Load A and B, report the mean save time, then fork one writer per 'fork <progress> <offset>'
    line on stdin, print its pid, and report how it ended ('dead <signal>')."""
    from disback_core import Trajectory

    torch.set_num_threads(1)
    teacher = tiny_teacher()
    trajs = {"A": Trajectory.load(ref_a, teacher), "B": Trajectory.load(ref_b, teacher)}
    scratch = Path(tempfile.mkdtemp(prefix="fi-scratch-"))
    t0 = time.perf_counter()
    for label in CYCLE * 2:
        trajs[label].save(scratch)
    shutil.rmtree(scratch)
    print(f"ready {(time.perf_counter() - t0) / (2 * len(CYCLE)):.6f}", flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        progress, offset = Path(cmd[1]), int(cmd[2])
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:  # the writer: never returns, never flushes the parent's buffers
            try:
                _writer_loop(folder, trajs, progress, offset)
            finally:
                os._exit(3)
        print(f"pid {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else -os.WEXITSTATUS(status)
        print(f"dead {sig}", flush=True)


# ----------------------------------------------------------------------------- the checking side


def _readline(proc: subprocess.Popen, timeout: float) -> str:
    """One line from the zygote's stdout, or raise if none comes within ``timeout`` seconds."""
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise RuntimeError(f"the writer did not answer within {timeout} s")
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"the writer exited (code {proc.poll()}): {proc.stderr.read() if proc.stderr else ''}")
    return line.strip()


def _progress(path: Path) -> tuple[str | None, str | None, list[float]]:
    """(label of the last completed save, label of the save in progress at the kill, durations of
    the completed saves)."""
    lines = [ln.split() for ln in path.read_text().split("\n") if ln.strip()] if path.exists() else []
    done = [ln for ln in lines if ln[0] == "done"]
    starts = {ln[1]: float(ln[3]) for ln in lines if ln[0] == "start"}
    in_progress = lines[-1][2] if lines and lines[-1][0] == "start" else None
    return (done[-1][2] if done else None), in_progress, [float(ln[3]) - starts[ln[1]] for ln in done]


def _wait_for_start(path: Path, timeout: float = 30.0) -> None:
    """Wait until the writer has logged the start of its first save."""
    end = time.monotonic() + timeout
    while not (path.exists() and path.stat().st_size):
        if time.monotonic() > end:
            raise RuntimeError(f"the writer did not start saving within {timeout} s")
        time.sleep(0.0002)


def _folder_state(folder: Path) -> dict[str, Any]:
    """Stray files (not named by the manifest) and files under a final name whose content does not
    match the hash in their name (a partial file that would have been accepted under its name)."""
    from disback_core.storage import read_json, sha256_file

    man = read_json(folder / "manifest.json")
    named = {"manifest.json"} | {e["file"] for e in man["nodes"]} | ({man["probe"]["file"]} if man["probe"] else set())
    names = sorted(os.listdir(folder))
    stray = [n for n in names if n not in named]
    partial = [n for n in names if (m := _FINAL.fullmatch(n)) and sha256_file(folder / n)[:16] != m.group(1)]
    return {"tmp": sum(n.endswith(".tmp") for n in stray), "unreferenced": sum(not n.endswith(".tmp") for n in stray),
            "partial_final": partial}


def check_after_kill(folder: Path, teacher: Any, refs: dict[str, Any], allowed: set[str]) -> dict[str, Any]:
    """Load and verify the folder after a kill; which reference it equals; its stray files."""
    from disback_core import Trajectory
    from disback_core.storage import StorageError

    out: dict[str, Any] = {"loaded": False, "verified": False, "version": None, "allowed": False}
    try:
        back = Trajectory.load(folder, teacher)
    except StorageError as e:
        out["error"] = str(e)
        return out
    out["loaded"] = True
    err = max(back.verify())
    out["verify_error"] = err
    out["verified"] = err < 1e-5
    out["version"] = next((k for k, t in refs.items() if same_trajectory(back, t)), None)
    out["allowed"] = out["version"] in allowed
    out.update(_folder_state(folder))
    return out


def run(kills: int = 60, seed: int = 0, workdir: str | os.PathLike | None = None,
        delay_saves: float = 3.0) -> dict[str, Any]:
    """Kill ``kills`` writers at seeded random times (uniform over ``delay_saves`` median save
    times, counted from the start of each writer's first save) and check the folder after each;
    returns the counts (see the module docstring)."""
    from disback_core import Trajectory

    torch.set_num_threads(1)
    t_start = time.perf_counter()
    rng = random.Random(seed)
    work = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="fault-injection-"))
    work.mkdir(parents=True, exist_ok=True)
    teacher, a, b = build_pair()
    refs = {"A": a, "B": b}
    for label, t in refs.items():
        t.save(work / f"ref-{label}")
    folder = work / "traj"
    a.save(folder)
    survivor = "A"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                                              os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--zygote", str(folder), str(work / "ref-A"),
                             str(work / "ref-B")], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    rows: list[dict[str, Any]] = []
    observed: list[float] = []
    try:
        save_s = float(_readline(proc, 120).split()[1])
        for i in range(kills):
            progress = work / f"progress-{i}.log"
            proc.stdin.write(f"fork {progress} {rng.randrange(len(CYCLE))}\n")
            proc.stdin.flush()
            pid = int(_readline(proc, 30).split()[1])
            _wait_for_start(progress)
            delay = rng.uniform(0.0, delay_saves * save_s)
            time.sleep(delay)
            os.kill(pid, signal.SIGKILL)
            sig = int(_readline(proc, 30).split()[1])
            completed, in_progress, durations = _progress(progress)
            observed += durations
            if observed:  # the window follows the saves as the writers really run them
                save_s = statistics.median(observed)
            n_done = len(durations)
            previous = completed or survivor
            allowed = {previous} | ({in_progress} if in_progress else set())
            row = check_after_kill(folder, teacher, refs, allowed)
            row.update(kill=i, delay_s=delay, signal=sig, saves_completed=n_done, in_progress=in_progress,
                       previous=previous, survivor_is="in_progress" if row["version"] == in_progress != previous
                       else "previous" if row["version"] == previous else None)
            rows.append(row)
            survivor = row["version"] or survivor
        proc.stdin.write("quit\n")
        proc.stdin.flush()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    a.save(folder)  # the next save removes what the kills left behind
    leftover = _folder_state(folder)
    back = Trajectory.load(folder, teacher)
    if workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return summarise(rows, leftover, same_trajectory(back, a), observed or [save_s], delay_saves, seed,
                     time.perf_counter() - t_start)


def summarise(rows: Sequence[dict[str, Any]], leftover: dict[str, Any], final_ok: bool, saves_s: Sequence[float],
              delay_saves: float, seed: int, seconds: float) -> dict[str, Any]:
    """The JSON result: counts over the kills, and every failing kill in full."""
    failures = [r for r in rows if not (r["loaded"] and r["verified"] and r["allowed"] and not r.get("partial_final")
                                        and r["signal"] == signal.SIGKILL)]
    errs = [r["verify_error"] for r in rows if "verify_error" in r]
    return {
        "kills": len(rows),
        "killed_by_sigkill": sum(r["signal"] == signal.SIGKILL for r in rows),
        "killed_mid_save": sum(r["in_progress"] is not None for r in rows),
        "killed_between_saves": sum(r["in_progress"] is None for r in rows),
        "saves_completed_by_writers": sum(r["saves_completed"] for r in rows),
        "loads_ok": sum(r["loaded"] for r in rows),
        "verified": sum(r["verified"] for r in rows),
        "max_verify_error": max(errs) if errs else None,
        "equal_to_a_saved_trajectory": sum(r["version"] is not None for r in rows),
        "survived": {k: sum(r["version"] == k for r in rows) for k in ("A", "B")},
        "survivor_was": {"previous_complete_save": sum(r["survivor_is"] == "previous" for r in rows),
                         "save_in_progress_after_its_switch": sum(r["survivor_is"] == "in_progress" for r in rows)},
        "partial_files_under_final_names": sum(len(r.get("partial_final", [])) for r in rows),
        "stray_files_after_kills": {"tmp": sum(r.get("tmp", 0) for r in rows),
                                    "unreferenced": sum(r.get("unreferenced", 0) for r in rows),
                                    "kills_leaving_any": sum(bool(r.get("tmp") or r.get("unreferenced")) for r in rows)},
        "stray_files_after_next_save": leftover["tmp"] + leftover["unreferenced"],
        "next_save_loads_and_equals_A": final_ok,
        "failures": failures,
        "median_save_seconds": statistics.median(saves_s),
        "kill_delay": f"uniform in [0, {delay_saves} median save times] after the writer starts its first save",
        "seed": seed,
        "seconds": round(seconds, 2),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, CPU",
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--kills", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--delay-saves", type=float, default=3.0,
                   help="kill delays are uniform in [0, this many median save times]")
    p.add_argument("--workdir", default=None, help="where the folders are written (default: a temporary folder)")
    p.add_argument("--out", default=None, help="write the JSON result here")
    p.add_argument("--zygote", nargs=3, metavar=("FOLDER", "REF_A", "REF_B"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.zygote:
        zygote(*map(Path, args.zygote))
        return {}
    argv = sys.argv[1:] if argv is None else list(argv)
    res = {"command": "python benchmarks/fault_injection.py " + " ".join(argv),
           **run(args.kills, args.seed, args.workdir, args.delay_saves)}
    if args.out:
        from disback_core.storage import write_json

        write_json(args.out, res)
    keys = ("kills", "killed_mid_save", "loads_ok", "verified", "equal_to_a_saved_trajectory", "survived",
            "survivor_was", "partial_files_under_final_names", "stray_files_after_kills", "stray_files_after_next_save")
    for k in keys:
        print(f"{k}: {res[k]}")
    print(f"failures: {len(res['failures'])}")
    return res


if __name__ == "__main__":
    main()
