"""Hardening of the training-state loader and the storage helpers (issue "Nothing lost, no save that
cannot be loaded"): one seeded fuzz family per defect found, plus the exact cases that were found.

1. step folders are verified like run folders (the manifest's digest; no edited value loads);
2. nothing but a StorageError escapes (deep nesting, RNG states cut short or of the wrong types);
3. bounded work before every check (the JSON scan, caps per file kind, cuda_devices, big headers);
4. optimizer param_groups fields have their types;
5. state.py uses storage's single implementation of every file helper;
plus the save side: a state the loader would refuse is refused before anything is written.

Each fuzz case starts from a pristine run folder (three kept steps for family 1, the latest one for
the others), changes it, and loads it; the outcome must be the one the format defines: a StorageError whose message names the folder and the
file, or, where the change is a valid value written consistently (every hash and the digest
rewritten), a load that holds that value. Any other exception, a case running over 10 s, or another
outcome fails the test. Seeded ``random.Random`` generators, no hypothesis.

    python -m pytest -p no:cacheprovider tests/test_state_hardening.py -s   # prints the case counts
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import re
import shutil
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import CaseTimeout, crashing_at, deadline
from test_state import CFG, build, kw, params, train

from disback_core import state as st
from disback_core import storage
from disback_core.state import list_states, load_state, save_state
from disback_core.storage import (
    MAX_HEADER_STRING_BYTES,
    MAX_JSON_BYTES,
    JsonScan,
    StorageError,
    body_digest,
    load_tensors,
    read_json,
    sha256_bytes,
)

CASE_SECONDS = 10.0
STEPS = (1, 2, 3)
WRONG = [None, True, False, 0, -1, 1.5, float("nan"), float("inf"), 2**80, "", "x", "fast", [], [1], {}, {"a": 1}]
COUNTS: dict[str, dict[str, int]] = {}


def step_dir(folder: Path, step: int) -> Path:
    return folder / f"step-{step:09d}"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder holding steps 1, 2 and 3 (keep=3), and each step's parameters."""
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("hardening") / "run"
    o = build()
    want = {}
    for step in STEPS:
        train(o, 1)
        save_state(folder, step=step, **kw(o), config=CFG, extra={"epoch": step, "t": torch.ones(2)}, keep=3)
        want[step] = params(o)
    return folder, want


@pytest.fixture
def scratch(tmp_path):
    """A folder for many small copies, saves and removals: in RAM where /dev/shm exists (the logic is
    under test, not the disk; removals are slow on some disks), else ``tmp_path``."""
    if not os.access("/dev/shm", os.W_OK):
        yield tmp_path
        return
    folder = Path(tempfile.mkdtemp(prefix="disback-hardening-", dir="/dev/shm"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def single(run, tmp_path_factory):
    """The run folder with its latest state only (step 3): what the other families change."""
    folder = tmp_path_factory.mktemp("single") / "run"
    shutil.copytree(run[0], folder)
    for s in (1, 2):
        shutil.rmtree(step_dir(folder, s))
    return folder


# ----------------------------------------------------------------------------- forging helpers


def manifest(folder: Path, step: int = 3) -> dict:
    return json.loads((step_dir(folder, step) / "manifest.json").read_text())


def point(folder: Path, step: int) -> None:
    """Make latest.json record the current manifest of ``step`` (if it names that step)."""
    p = folder / "latest.json"
    latest = json.loads(p.read_text())
    if latest["directory"] == step_dir(folder, step).name:
        latest["manifest_sha256"] = sha256_bytes((step_dir(folder, step) / "manifest.json").read_bytes())
        p.write_text(json.dumps(latest))


def put(folder: Path, m: dict, step: int = 3, digest: bool = True, pointer: bool = True) -> None:
    """Write manifest ``m`` of ``step``; with ``digest`` its digest is recomputed, with ``pointer``
    latest.json records its sha256: a consistent forgery that only the field checks can refuse."""
    if digest:
        m["digest"] = body_digest(m)
    (step_dir(folder, step) / "manifest.json").write_text(json.dumps(m))
    if pointer:
        point(folder, step)


def edit(folder: Path, fn: Callable[[dict], Any], step: int = 3, digest: bool = True, pointer: bool = True) -> None:
    m = manifest(folder, step)
    fn(m)
    put(folder, m, step, digest, pointer)


def forge_file(folder: Path, name: str, data: bytes, step: int = 3) -> None:
    """Replace a file of ``step`` with its size and sha256 rewritten in the manifest (and the digest)."""
    (step_dir(folder, step) / name).write_bytes(data)
    edit(folder, lambda m: m["files"][name].update(sha256=sha256_bytes(data), size=len(data)), step)


def get(obj: Any, path: tuple) -> Any:
    for k in path:
        obj = obj[k]
    return obj


def set_at(obj: Any, path: tuple, value: Any, remove: bool = False) -> None:
    parent = get(obj, path[:-1])
    if remove:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value


def load(target: Path) -> dict:
    o = build(seed=1)
    out = load_state(target, **kw(o), config=CFG)
    return {**out, "o": o}


# ----------------------------------------------------------------------------- running cases


@dataclass
class Case:
    name: str
    mutate: Callable[[Path], Any]
    expect: str = "refuse"  # "refuse": a StorageError naming ``file``; "load": it loads and ``check`` holds
    file: str = "manifest.json"
    target: Callable[[Path], Path] = lambda f: f  # what is loaded: the run folder or a step folder
    check: Callable[[dict], bool] | None = None
    message: str = ""  # a regular expression the refusal's message must match


class Workspace:
    """A copy of a pristine folder, put back before each case by rewriting only the files a case
    changed (copying and removing whole folders per case is slow on some file systems)."""

    def __init__(self, pristine: Path, work: Path):
        self.pristine, self.folder = pristine, work / "run"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        shutil.copytree(pristine, self.folder)
        self.files = {p.relative_to(self.folder): p.read_bytes() for p in self.folder.rglob("*") if p.is_file()}
        self.entries = self._entries()

    def _entries(self) -> set[Path]:
        return {p.relative_to(self.folder) for p in self.folder.rglob("*")}

    def reset(self) -> Path:
        if self._entries() != self.entries or any((self.folder / r).is_symlink() for r in self.files):
            shutil.rmtree(self.folder)
            shutil.copytree(self.pristine, self.folder)
        for rel, data in self.files.items():
            p = self.folder / rel
            if p.read_bytes() != data:
                p.write_bytes(data)
        return self.folder


def run_case(case: Case, space: Workspace) -> str | None:
    """None if the case ends as it must; else what went wrong."""
    folder = space.reset()
    case.mutate(folder)
    t0 = time.monotonic()
    try:
        with deadline(CASE_SECONDS):
            got = load(case.target(folder))
    except CaseTimeout:
        return f"{case.name}: still running after {CASE_SECONDS} s"
    except StorageError as e:
        msg = str(e)
        if case.expect != "refuse":
            return f"{case.name}: refused, but it is a valid state: {msg[:300]}"
        if str(folder) not in msg or case.file not in msg:
            return f"{case.name}: the message does not name {case.file}: {msg[:300]}"
        if case.message and not re.search(case.message, msg):
            return f"{case.name}: the message does not say {case.message!r}: {msg[:300]}"
        return None
    except BaseException as e:  # noqa: BLE001 - anything else is what this suite looks for
        return f"{case.name}: {type(e).__name__} instead of StorageError: {str(e)[:300]}"
    finally:
        if time.monotonic() - t0 > CASE_SECONDS:
            return f"{case.name}: took {time.monotonic() - t0:.1f} s"  # noqa: B012
    if case.expect == "refuse":
        return f"{case.name}: loaded without an error"
    if case.check is not None and not case.check(got):
        return f"{case.name}: loaded, but not what was written"
    return None


def run_family(name: str, cases: list[Case], pristine: Path, tmp_path: Path) -> None:
    space = Workspace(pristine, tmp_path / "work")
    failures = [r for c in cases if (r := run_case(c, space)) is not None]
    outcomes = {"refused": sum(c.expect == "refuse" for c in cases), "loaded": sum(c.expect == "load" for c in cases)}
    COUNTS[name] = {"cases": len(cases), **outcomes, "failed": len(failures)}
    print(f"\n{name}: {len(cases)} cases, {outcomes}, {len(failures)} failed")
    assert not failures, f"{len(failures)} of {len(cases)} cases failed:\n" + "\n".join(failures[:40])


# ----------------------------------------------------------------------------- 1. step folders


def _leaves(m: dict) -> list[tuple[tuple, Any]]:
    """(path, value) of every number and string a state holds, outside the digest."""
    out, stack = [], [((k,), v) for k, v in m.items() if k != "digest"]
    while stack:
        p, v = stack.pop()
        if isinstance(v, dict):
            stack += [(p + (k,), x) for k, x in v.items()]
        elif isinstance(v, list):
            stack += [(p + (i,), x) for i, x in enumerate(v)]
        elif isinstance(v, (int, float, str)) and not isinstance(v, bool):
            out.append((p, v))
    return sorted(out, key=lambda pv: str(pv[0]))


def _changed(v: Any, rng: random.Random) -> Any:
    if isinstance(v, str):
        return v + rng.choice(["x", "0", " "])
    new = rng.choice([v + 1, v * 2 + 1, -v - 1, 0.5, rng.uniform(0, 1), rng.randrange(1000)])
    return new if new != v else v + 1


def step_folder_cases(pristine: Path, seed: int = 0) -> list[Case]:
    rng = random.Random(seed)
    cases = []
    for s in STEPS:  # every kept step loads directly, exactly
        cases.append(
            Case(
                f"pristine/step-{s}",
                lambda f: None,
                "load",
                target=lambda f, s=s: step_dir(f, s),
                check=lambda got, s=s: _params_are(got, s),
            )
        )
    for s in STEPS:  # a value edited by hand (the digest not rewritten): refused, loaded directly or not
        leaves = _leaves(manifest(pristine, s))
        for path, v in rng.sample(leaves, 18):
            new = _changed(v, rng)
            label = ".".join(map(str, path))
            cases.append(
                Case(
                    f"edited/step-{s}/{label}={new!r:.20}",
                    lambda f, p=path, n=new, s=s: edit(f, lambda m: set_at(m, p, n), s, digest=False),
                    target=lambda f, s=s: step_dir(f, s),
                    message="digest|sha256",
                )
            )
        cases.append(
            Case(
                f"edited-pointer-rewritten/step-{s}",  # latest.json rewritten too: the digest refuses
                lambda f, s=s: edit(f, lambda m: m["extra"].update(epoch=99), s, digest=False),
                target=(lambda f: f) if s == 3 else (lambda f, s=s: step_dir(f, s)),
                message="digest",
            )
        )
    lr = ("optimizers", "adamw", "state_dict", "param_groups", 0, "lr")
    for s in STEPS:  # the case found: an optimizer lr edited to 0.5 in a step folder
        cases.append(
            Case(
                f"found/lr-0.5/step-{s}",
                lambda f, s=s: edit(f, lambda m: set_at(m, lr, 0.5), s, digest=False),
                target=lambda f, s=s: step_dir(f, s),
                message="digest",
            )
        )
    # a consistent forgery (digest rewritten) is a different valid state: it loads with the value written
    cases.append(
        Case(
            "forged/lr-0.5",
            lambda f: edit(f, lambda m: set_at(m, lr, 0.5), 1),
            "load",
            target=lambda f: step_dir(f, 1),
            check=lambda got: got["o"]["optimizers"]["adamw"].param_groups[0]["lr"] == 0.5,
        )
    )
    cases.append(
        Case(
            "forged/epoch",
            lambda f: edit(f, lambda m: m["extra"].update(epoch=7), 2),
            "load",
            target=lambda f: step_dir(f, 2),
            check=lambda got: got["extra"]["epoch"] == 7,
        )
    )
    for v in ["0" * 64, "A" * 64, "", None, 5, [], sha256_bytes(b"x")]:  # the digest itself
        cases.append(
            Case(
                f"digest={v!r:.12}",
                lambda f, v=v: edit(f, lambda m: m.update(digest=v), 2, digest=False),
                target=lambda f: step_dir(f, 2),
                message="digest",
            )
        )

    # manifests saved before digests: verified by latest.json's sha256 only where it names their folder
    def legacy(f: Path, s: int, change: bool = False, pointer: bool = True) -> None:
        m = manifest(f, s)
        del m["digest"]
        if change:
            set_at(m, lr, 0.5)
        put(f, m, s, digest=False, pointer=pointer)

    for s in (1, 2):
        cases.append(
            Case(
                f"legacy/older-step-{s}",
                lambda f, s=s: legacy(f, s),
                target=lambda f, s=s: step_dir(f, s),
                message="no digest",
            )
        )
    cases.append(Case("legacy/latest-via-run", lambda f: legacy(f, 3), "load", check=lambda got: _params_are(got, 3)))
    cases.append(
        Case(
            "legacy/latest-via-step",
            lambda f: legacy(f, 3),
            "load",
            target=lambda f: step_dir(f, 3),
            check=lambda got: _params_are(got, 3),
        )
    )
    cases.append(
        Case(
            "legacy/latest-edited",
            lambda f: legacy(f, 3, change=True, pointer=False),
            target=lambda f: step_dir(f, 3),
            message="sha256",
        )
    )
    cases.append(
        Case("legacy/latest-edited-via-run", lambda f: legacy(f, 3, change=True, pointer=False), message="sha256")
    )
    return cases


_WANT: dict[int, dict] = {}


def _params_are(got: dict, step: int) -> bool:
    return all(torch.equal(v, _WANT[step][k]) for k, v in params(got["o"]).items())


def test_step_folders_are_verified_like_run_folders(run, scratch):
    folder, want = run
    _WANT.update(want)
    cases = step_folder_cases(folder)
    assert len(cases) >= 70
    run_family("step-folders", cases, folder, scratch)


# ----------------------------------------------------------------------------- 2. exceptions


_SHAPES: dict[str, tuple[str, str, int, Callable[[Any], Any]]] = {  # opening, closing, JSON levels per level, value
    "list": ("[", "]", 1, lambda x: [x]),
    "dict": ('{"a": ', "}", 1, lambda x: {"a": x}),
    "tuple": ('{"__tuple__": [', "]}", 2, lambda x: (x,)),
    "int-keys": ('{"__dict__": [[1, ', "]]}", 3, lambda x: {1: x}),
}


def _deep(f: Path, where: str, shape: str, k: int) -> None:
    """Put a value ``k`` levels deep into ``where`` of step 3's manifest (as text: no recursion), with
    the digest and latest.json rewritten where the result can be parsed at all."""
    opening, closing, _, _ = _SHAPES[shape]
    m = manifest(f)
    m["digest"] = "d" * 64
    text = json.dumps(m)
    anchor = {"extra": '"extra": {', "config": '"config": {', "scheduler": '"_step_count": '}[where]
    value = opening * k + "0" + closing * k
    text = text.replace(anchor, anchor + (f'"deep": {value}, ' if where != "scheduler" else f'{value}, "deep": '), 1)
    if k <= 300:  # deep enough to refuse, shallow enough for json and the digest to handle
        text = text.replace("d" * 64, body_digest(json.loads(text)))
    (step_dir(f, 3) / "manifest.json").write_text(text)
    point(f, 3)


def _deep_value(shape: str, k: int) -> Any:
    x: Any = 0
    for _ in range(k):
        x = _SHAPES[shape][3](x)
    return x


def exception_cases(pristine: Path, seed: int = 1) -> list[Case]:
    rng = random.Random(seed)
    cases = []
    depths = [1, 2, 30, 63, 64, 65, 95, 96, 97, 150, 189, 190, 191, 192, 300, 500, 1000, 100000]
    depths += sorted(rng.randrange(1, 700) for _ in range(12))
    for i, k in enumerate(depths):
        for shape in _SHAPES:
            levels = 2 + _SHAPES[shape][2] * k  # the manifest and extra objects, then the value
            where = "extra" if (i + len(shape)) % 4 else rng.choice(["config", "scheduler"])
            ok = where == "extra" and levels <= st.MAX_MANIFEST_DEPTH
            cases.append(
                Case(
                    f"deep/{where}/{shape}-{k}",
                    lambda f, w=where, s=shape, k=k: _deep(f, w, s, k),
                    "load" if ok else "refuse",
                    target=(lambda f: f) if i % 2 else (lambda f: step_dir(f, 3)),
                    check=lambda got, s=shape, k=k: got["extra"]["deep"] == _deep_value(s, k),
                    message="levels deep" if levels > st.MAX_MANIFEST_DEPTH else "",
                )
            )
    cases += rng_json_cases(pristine, rng)
    return cases


_REMOVABLE = {("world_size",), ("numpy",)}  # not read back; no numpy state (numpy was not importable)


def _rng_valid(path: tuple, v: Any) -> bool:
    """Whether value ``v`` at ``path`` of rng-rank0.json is one a state can hold (a load must accept it)."""
    if path == ("world_size",):
        return True
    if path == ("numpy",):
        return v is None
    if path == ("rank",):
        return type(v) is int and v == 0
    if path == ("cuda_devices",):
        return type(v) is int and v == 0
    if path == ("python", "gauss_next"):
        return v is None or type(v) is float
    if path == ("numpy", "cached_gaussian"):
        return type(v) in (int, float)
    if path == ("numpy", "pos"):
        return type(v) is int and 0 <= v <= 624
    if path == ("numpy", "has_gauss"):
        return type(v) is int and v in (0, 1)
    return False


def rng_json_cases(pristine: Path, rng: random.Random) -> list[Case]:
    """rng-rank0.json edited and written consistently (its size, sha256, the digest, latest.json)."""
    name = "rng-rank0.json"
    info = json.loads((step_dir(pristine, 3) / name).read_text())
    cases = []

    def forge(f: Path, fn: Callable[[dict], Any]) -> None:
        d = json.loads((step_dir(f, 3) / name).read_text())
        fn(d)
        forge_file(f, name, json.dumps(d).encode())

    paths = [(k,) for k in info] + [("python", k) for k in info["python"]] + [("numpy", k) for k in info["numpy"]]
    paths += [("generators", "sampler"), ("generators", "sampler", "device")]
    for path in paths:
        label = ".".join(path)
        cases.append(
            Case(
                f"rng/{label}/removed",
                lambda f, p=path: forge(f, lambda d: set_at(d, p, None, True)),
                "load" if path in _REMOVABLE else "refuse",
                file=name,
            )
        )
        for v in WRONG[len(path) % 2 :: 2]:  # every other wrong value, alternating by depth
            cases.append(
                Case(
                    f"rng/{label}={v!r:.12}",
                    lambda f, p=path, v=v: forge(f, lambda d: set_at(d, p, v)),
                    "load" if _rng_valid(path, v) else "refuse",
                    file=name,
                )
            )
    # the case found: numpy's keys cut short (an IndexError from numpy), and its kin
    for n in (0, 1, 10, 100, 623, 625):
        cases.append(
            Case(
                f"rng/numpy.keys[:{n}]",
                lambda f, n=n: forge(f, lambda d: d["numpy"].update(keys=(d["numpy"]["keys"] * 2)[:n])),
                file=name,
                message="numpy",
            )
        )
        cases.append(
            Case(
                f"rng/python.state[:{n + 1}]",
                lambda f, n=n: forge(f, lambda d: d["python"].update(state=(d["python"]["state"] * 2)[: n + 1])),
                file=name,
                message="Python",
            )
        )
    for v in (-1, 2**32, 1.5, "1", None, True, [1]):
        i = rng.randrange(624)
        cases.append(
            Case(
                f"rng/numpy.keys[{i}]={v!r}",
                lambda f, i=i, v=v: forge(f, lambda d: d["numpy"]["keys"].__setitem__(i, v)),
                file=name,
            )
        )
        cases.append(
            Case(
                f"rng/python.state[{i}]={v!r}",
                lambda f, i=i, v=v: forge(f, lambda d: d["python"]["state"].__setitem__(i, v)),
                file=name,
            )
        )
    cases.append(
        Case(
            "rng/python.state[624]=625",
            lambda f: forge(f, lambda d: d["python"]["state"].__setitem__(624, 625)),
            file=name,
        )
    )
    cases.append(Case("rng/python.version=2", lambda f: forge(f, lambda d: d["python"].update(version=2)), file=name))
    cases.append(Case("rng/numpy.extra-key", lambda f: forge(f, lambda d: d["numpy"].update(x=1)), file=name))
    cases.append(
        Case(
            "rng/generators.sampler.device=cuda:0",
            lambda f: forge(f, lambda d: d["generators"]["sampler"].update(device="cuda:0")),
            file=name,
        )
    )
    return cases


def test_nothing_but_storage_errors_escape(single, scratch):
    folder = single
    cases = exception_cases(folder)
    assert len(cases) >= 250
    run_family("exceptions", cases, folder, scratch)


def test_the_found_cases_nested_extra_and_numpy_keys(single, tmp_path):
    folder = single
    work = tmp_path / "run"
    shutil.copytree(folder, work)
    _deep(work, "extra", "list", 500)
    with pytest.raises(StorageError, match=r"manifest.json is nested more than 192 levels deep"):
        load(work)
    shutil.rmtree(work)
    shutil.copytree(folder, work)
    d = json.loads((step_dir(work, 3) / "rng-rank0.json").read_text())
    d["numpy"]["keys"] = d["numpy"]["keys"][:10]
    forge_file(work, "rng-rank0.json", json.dumps(d).encode())
    with pytest.raises(StorageError, match=r"rng-rank0.json: the numpy RNG state is not"):
        load(work)


# ----------------------------------------------------------------------------- 3. bounded work


def _cuda(f: Path, v: Any) -> None:
    d = json.loads((step_dir(f, 3) / "rng-rank0.json").read_text())
    d["cuda_devices"] = v
    forge_file(f, "rng-rank0.json", json.dumps(d).encode())


def bound_cases() -> list[Case]:
    cases = []
    for v in (10**9, 2**31, 2**63, 2**80, 1025, 1024, 2, 1, -1, -(10**9), 1.5, 1e9, "1", True, None, [0], {}):
        cases.append(
            Case(
                f"cuda_devices={v!r}",
                lambda f, v=v: _cuda(f, v),
                file="rng-rank0.json",
                message="cuda_devices|torch.cuda.0",
            )
        )
    cases.append(Case("cuda_devices=0", lambda f: _cuda(f, 0), "load"))
    return cases


def test_bounded_work_before_every_check(single, scratch):
    folder = single
    cases = bound_cases()
    t0 = time.monotonic()
    run_family("bounds", cases, folder, scratch)
    assert time.monotonic() - t0 < 0.5 * len(cases)  # each refused at once (cuda_devices 1e9 ran for minutes)


def _measure(fn: Callable[[], Any]) -> tuple[BaseException | None, float, float]:
    """(the exception fn raised or None, seconds, peak traced MiB)."""
    tracemalloc.start()
    t0 = time.monotonic()
    err = None
    try:
        with deadline(CASE_SECONDS):
            fn()
    except (StorageError, CaseTimeout) as e:
        err = e
    finally:
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    return err, time.monotonic() - t0, peak


def test_16MiB_of_escaped_quotes_is_refused_in_bounded_time_and_memory(single, tmp_path):
    """The case found: a 16 MiB manifest of \\" peaked at 1.25 GB in the depth check."""
    folder = single
    work = tmp_path / "run"
    shutil.copytree(folder, work)
    man = step_dir(work, 3) / "manifest.json"
    man.write_bytes(b'\\"' * (MAX_JSON_BYTES // 2))  # exactly the cap
    assert man.stat().st_size == st.MAX_MANIFEST_BYTES == MAX_JSON_BYTES
    point(work, 3)
    for target in (work, step_dir(work, 3)):
        err, seconds, peak = _measure(lambda t=target: load(t))
        assert isinstance(err, StorageError) and "manifest.json is not valid JSON" in str(err), err
        assert peak < 64 and seconds < 10, (peak, seconds)
    err, seconds, peak = _measure(lambda: read_json(man, "trajectory manifest"))  # storage's reader, every caller
    assert isinstance(err, StorageError) and str(man) in str(err)
    assert peak < 64 and seconds < 10, (peak, seconds)
    man.write_bytes(b'"' + b'\\"' * (MAX_JSON_BYTES // 2 - 1) + b'"')  # the same as one string: parsed, refused
    point(work, 3)
    err, seconds, peak = _measure(lambda: load(work))
    assert isinstance(err, StorageError) and "not a disback-state manifest" in str(err), err
    assert peak < 64 and seconds < 10, (peak, seconds)


def test_a_forged_manifest_near_the_cap_loads_in_linear_time_and_memory(single, tmp_path):
    """A valid manifest just under the cap whose extra is one string of \\" (digest rewritten): loads."""
    folder = single
    work = tmp_path / "run"
    shutil.copytree(folder, work)
    m = manifest(work)
    m["extra"]["q"] = '"' * ((MAX_JSON_BYTES - 64 * 1024) // 2)
    put(work, m)
    assert (step_dir(work, 3) / "manifest.json").stat().st_size <= MAX_JSON_BYTES
    del m
    got: dict = {}
    err, seconds, peak = _measure(lambda: got.update(load(work)))
    assert err is None and len(got["extra"]["q"]) == (MAX_JSON_BYTES - 64 * 1024) // 2
    assert peak < 128 and seconds < 10, (peak, seconds)


def test_oversized_json_files_are_refused_before_reading(single, tmp_path):
    """Over each kind's cap (the manifest's is 16 MiB: a 64 MiB one ran for minutes): refused unread."""
    folder = single
    for name, size in (
        ("manifest.json", st.MAX_MANIFEST_BYTES + 1),
        ("manifest.json", 64 << 20),
        ("rng-rank0.json", st.MAX_RNG_JSON_BYTES + 1),
    ):
        work = tmp_path / f"run-{name}-{size}"
        shutil.copytree(folder, work)
        p = step_dir(work, 3) / name
        if name == "rng-rank0.json":  # its size and hash rewritten: the JSON reader's cap refuses it
            forge_file(work, name, p.read_bytes().ljust(size))
        else:
            with open(p, "r+b") as fh:
                fh.truncate(size)  # sparse: no time spent writing it
        err, seconds, peak = _measure(lambda w=work: load(w))
        assert isinstance(err, StorageError) and name in str(err) and "more than the" in str(err), err
        assert peak < 8 and seconds < 2, (peak, seconds)
    ptr = tmp_path / "ptr"
    shutil.copytree(folder, ptr)
    (ptr / "latest.json").write_bytes(b" " * (st.MAX_POINTER_BYTES + 1))
    with pytest.raises(StorageError, match="latest.json is .* more than the"):
        load(ptr)


def _safetensors_with_metadata_string(path: Path, n: int) -> None:
    head = b'{"__metadata__":{"x":"' + b'\\"' * (n // 2) + b'"},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    head += b" " * (-len(head) % 8)
    path.write_bytes(len(head).to_bytes(8, "little") + head + bytes(4))


def test_a_safetensors_header_metadata_string_is_capped_before_parsing(tmp_path):
    """The case found: a 94 MB file whose header metadata is a string of \\" raised MemoryError (or took
    53 s and 6 GB). Now refused by the scan after reading 17 MiB; a long string under the cap loads."""
    p = tmp_path / "big.safetensors"
    _safetensors_with_metadata_string(p, 94_000_000)
    for fn in (lambda: load_tensors(p), lambda: storage.read_tensor_header(p)):
        err, seconds, peak = _measure(fn)
        assert isinstance(err, StorageError) and p.name in str(err) and "string of more than" in str(err), err
        assert peak < 64 and seconds < 10, (peak, seconds)
    _safetensors_with_metadata_string(p, MAX_HEADER_STRING_BYTES // 2)
    got: dict = {}
    err, seconds, peak = _measure(lambda: got.update(load_tensors(p)))
    assert (
        err is None
        and list(got) == ["a"]
        and storage.read_tensor_header(p)[1]["x"] == '"' * (MAX_HEADER_STRING_BYTES // 4)
    )
    assert peak < 64 and seconds < 10, (peak, seconds)


def _reference_scan(data: bytes) -> tuple[int, int]:
    """(deepest nesting, longest string) by a byte-at-a-time state machine: a quote is escaped after an
    odd run of backslashes, brackets count outside strings."""
    inside = escaped = False
    depth = deepest = longest = start = 0
    for i, c in enumerate(data):
        if inside:
            if escaped:
                escaped = False
            elif c == 92:
                escaped = True
            elif c == 34:
                inside, longest = False, max(longest, i - start - 1)
        else:
            was, escaped = escaped, c == 92 and not escaped
            if c == 34 and not was:
                inside, start = True, i
            elif c in b"[{":
                depth += 1
                deepest = max(deepest, depth)
            elif c in b"]}":
                depth -= 1
    return deepest, longest


def _random_json(rng: random.Random, depth: int = 0) -> Any:
    r = rng.random()
    if depth > 8 or r < 0.35:
        return rng.choice(
            [0, -1.5, None, True, "", 'a\\"b', '"]', "\\\\", "[{", "\u00e9\\u0000", "x" * rng.randrange(50)]
        )
    if r < 0.65:
        return [_random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {
        rng.choice(["a", '"', "\\", "[", "k" * rng.randrange(9)]) + str(i): _random_json(rng, depth + 1)
        for i in range(rng.randrange(4))
    }


def _true_depth(obj: Any) -> int:
    best, stack = 0, [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, (list, dict)):
            best = max(best, d)
            stack += [(v, d + 1) for v in (o.values() if isinstance(o, dict) else o)]
    return best


def test_the_json_scan_agrees_with_a_state_machine_and_the_parser():
    """400 seeded inputs (JSON and garbage over its alphabet), fed whole and in random pieces."""
    rng = random.Random(3)
    for i in range(400):
        if i % 2:
            obj = _random_json(rng)
            data = json.dumps(obj, ensure_ascii=rng.random() < 0.5).encode()
        else:
            data = bytes(rng.choice(b'[]{}"\\ab,:') for _ in range(rng.randrange(300)))
        want = _reference_scan(data)
        whole = JsonScan("x", "t", 10**9)
        whole.feed(data)
        pieces, at = JsonScan("x", "t", 10**9), 0
        while at < len(data):
            n = rng.randrange(1, 12)
            pieces.feed(memoryview(data)[at : at + n])
            at += n
        assert (whole.deepest, whole.longest) == (pieces.deepest, pieces.longest) == want, (i, data[:200])
        if i % 2:
            assert whole.deepest == _true_depth(obj)
    scan = JsonScan("x", "t", 10**9)  # windows of the scan itself: a string and a backslash run across them
    data = b'["' + b"\\" * (storage._SCAN_CHUNK + 1) + b'"]"' + b"[" * 3 + b'"'
    scan.feed(data)
    assert (scan.deepest, scan.longest) == _reference_scan(data)


# ----------------------------------------------------------------------------- 4. param_groups


GROUP_VALUES = [
    "fast",
    None,
    True,
    False,
    [],
    {},
    [1],
    [0.9, 0.99],
    [0.9, "x"],
    [0.1, 0.2, 0.3],
    {"a": 1},
    0.5,
    3,
    2**80,
    -0.25,
    "0.1",
    float("nan"),
    float("inf"),
    {"__float__": "nan"},
    {"__tuple__": [0.8, 0.9]},
    {"__tensor__": "absent"},
]


def _decoded_value(v: Any) -> Any:
    if isinstance(v, dict) and set(v) == {"__tuple__"}:
        return tuple(v["__tuple__"])
    if isinstance(v, dict) and set(v) == {"__float__"}:
        return float(v["__float__"])
    return v


def _group_valid(key: str, v: Any) -> bool | None:
    """Whether a torch optimizer may hold ``v`` as ``key`` (None: a key this check leaves alone)."""
    if isinstance(v, dict) and set(v) == {"__tensor__"}:
        return False  # no such tensor in the optimizer's file
    v = _decoded_value(v)

    def num(x: Any) -> bool:
        return type(x) is int or (type(x) is float and math.isfinite(x))

    if key in ("lr", "initial_lr", "weight_decay", "momentum", "dampening", "eps"):  # (Adafactor's eps: a pair)
        return num(v)
    if key == "betas":
        return isinstance(v, (list, tuple)) and len(v) == 2 and all(num(x) for x in v)
    if key in ("amsgrad", "maximize", "nesterov", "capturable", "differentiable", "decoupled_weight_decay"):
        return isinstance(v, bool)
    if key in ("foreach", "fused"):
        return v is None or isinstance(v, bool)
    if key == "params":
        return False  # another parameter list never fits these optimizers
    return None


def param_group_cases(pristine: Path, seed: int = 4) -> list[Case]:
    rng = random.Random(seed)
    cases = []
    m = manifest(pristine)
    for opt in ("adamw", "sgd"):
        for key in m["optimizers"][opt]["state_dict"]["param_groups"][0]:
            path = ("optimizers", opt, "state_dict", "param_groups", 0, key)
            for v in ["fast", 0.5, [0.9, 0.99], *rng.sample(GROUP_VALUES[1:], 7)]:
                valid = _group_valid(key, v)
                if valid is None:
                    continue
                if valid and key in ("foreach", "fused") and v is True:
                    continue  # a valid type, but this build has no fused/foreach CPU kernels to check it with

                def check(got: dict, o=opt, k=key, v=v) -> bool:
                    return got["o"]["optimizers"][o].param_groups[0][k] == _decoded_value(v)

                cases.append(
                    Case(
                        f"{opt}.{key}={v!r:.16}",
                        lambda f, p=path, v=v: edit(f, lambda m: set_at(m, p, copy.deepcopy(v))),
                        "load" if valid else "refuse",
                        check=check,
                        file="manifest.json" if key != "params" else "step-000000003",
                        message=""
                        if valid or key == "params" or isinstance(v, dict) and "__tensor__" in v
                        else rf"param_groups\[0\]\.{key} is ",
                    )
                )
        cases.append(
            Case(
                f"{opt}.group-not-object",
                lambda f, o=opt: edit(
                    f, lambda m: m["optimizers"][o]["state_dict"]["param_groups"].__setitem__(0, [1])
                ),
            )
        )
        cases.append(
            Case(
                f"{opt}.group-without-params",
                lambda f, o=opt: edit(f, lambda m: m["optimizers"][o]["state_dict"]["param_groups"][0].pop("params")),
                message="no 'params'",
            )
        )
    return cases


def test_param_group_fields_have_their_types(single, scratch):
    folder = single
    cases = param_group_cases(folder)
    assert len(cases) >= 200
    run_family("param-groups", cases, folder, scratch)


def test_the_found_case_lr_fast_is_refused_naming_the_field(single, tmp_path):
    folder = single
    work = tmp_path / "run"
    shutil.copytree(folder, work)
    edit(work, lambda m: set_at(m, ("optimizers", "adamw", "state_dict", "param_groups", 0, "lr"), "fast"))
    o = build(seed=1)
    before = params(o)
    with pytest.raises(
        StorageError,
        match=r"manifest.json: optimizers\['adamw'\].*param_groups\[0\]\.lr is "
        r"\"fast\", not a finite number",
    ):
        load_state(work, **kw(o), config=CFG)
    assert all(torch.equal(v, before[k]) for k, v in params(o).items())  # nothing restored


# ----------------------------------------------------------------------------- save side


def test_the_deepest_state_a_save_writes_loads_back(tmp_path):
    """Tuples and dicts with non-string keys take 2 and 3 JSON levels per level: the deepest extra the
    encoder accepts is within the loader's depth limit (no save that cannot be loaded)."""
    o = build()
    deepest = {shape: _deep_value(shape, 59) for shape in ("tuple", "int-keys")}
    path = save_state(tmp_path, step=1, **kw(o), config=CFG, extra=deepest)
    scan = JsonScan("m", "manifest", 10**9)
    scan.feed((path / "manifest.json").read_bytes())
    assert 170 < scan.deepest <= st.MAX_MANIFEST_DEPTH, scan.deepest
    assert load(tmp_path)["extra"] == deepest
    with pytest.raises(ValueError, match="nested more than 60 levels"):  # the encoder's own limit
        save_state(tmp_path, step=2, **kw(o), config=CFG, extra={"x": _deep_value("list", 70)})


def test_a_state_too_large_to_load_is_refused_before_anything_is_written(tmp_path):
    o = build()
    save_state(tmp_path, step=1, **kw(o), config=CFG)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(
        ValueError,
        match=r"cannot be saved: it would not load back: the manifest of this state is "
        r"\d+ bytes, more than the 16777216 allowed",
    ):
        save_state(tmp_path, step=2, **kw(o), config=CFG, extra={"log": "x" * MAX_JSON_BYTES})
    assert sorted(os.listdir(tmp_path)) == before  # nothing written, no temporary folder left
    assert load(tmp_path)["step"] == 1


# ----------------------------------------------------------------------------- 5. one implementation


def test_state_uses_storage_single_implementation():
    src = Path(st.__file__).read_text()
    for twin in (
        "def _open_regular",
        "def _sha256_stream",
        "def _read_small",
        "def _parse_json",
        "def _no_duplicates",
        "def _write_new",
        "def _replace_file",
        "import hashlib",
        "json.loads",
        "os.open(",
        "os.fsync(",
        "os.replace(",
    ):
        assert twin not in src, twin
    assert st._write_new is st._replace_file is storage.atomic_write_bytes and st._fsync_dir is storage.fsync_dir


def test_stray_pointer_temporaries_of_either_kind_are_removed_by_the_next_save(tmp_path):
    o = build()
    save_state(tmp_path, step=1, **kw(o), config=CFG)
    for stray in (".latest.json.0123456789abcdef.tmp", ".latest.json.tmp-4242"):  # storage's name, the earlier one
        (tmp_path / stray).write_text("{")
    (tmp_path / ".latest.json.notes").write_text("not ours")
    save_state(tmp_path, step=2, **kw(o), config=CFG)
    assert sorted(os.listdir(tmp_path)) == [".latest.json.notes", "latest.json", "step-000000001", "step-000000002"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_crash_inside_storage_writes_leaves_the_old_or_the_new_state(scratch, monkeypatch):
    """test_state's crash test stops a save before each of state.py's file-system calls; the pointer,
    the manifest and every file are now written by storage's atomic writer, so this one stops a re-save
    of the live step (the longest path) before each ``os.fsync`` and ``os.replace`` inside it: a
    temporary file complete but not renamed, renamed but its folder not fsynced."""
    old = build()
    train(old, 2)
    template = scratch / "template"
    save_state(template, step=1, **kw(old), config=CFG, keep=2)
    save_state(template, step=2, **kw(old), config=CFG, keep=2)
    new = build()
    train(new, 3)
    targets = [(os, "replace"), (os, "fsync")]
    calls = []

    def counting(f: Callable[..., Any], name: str) -> Callable[..., Any]:
        return lambda *a: calls.append(name) or f(*a)

    with monkeypatch.context() as mp:  # how many there are: a save that counts them
        for obj, name in targets:
            mp.setattr(obj, name, counting(getattr(obj, name), name))
        shutil.copytree(template, scratch / "count")
        save_state(scratch / "count", step=2, **kw(new), config=CFG, keep=2)
    assert calls.count("replace") >= 8 and calls.count("fsync") >= 12, calls
    for k in range(1, len(calls) + 2):  # the last one completes
        folder = scratch / f"crash-{k}"
        shutil.copytree(template, folder)
        completed = crashing_at(k, targets, lambda f=folder: save_state(f, step=2, **kw(new), config=CFG, keep=2))
        assert completed == (k > len(calls)), k
        got = load(folder)
        now = params(got["o"])
        is_old = all(torch.equal(now[n], v) for n, v in params(old).items())
        is_new = all(torch.equal(now[n], v) for n, v in params(new).items())
        assert got["step"] == 2 and (is_old or is_new) and (is_new or not completed), k
        for s in list_states(folder):  # a step folder is never partial
            load(step_dir(folder, s))
        save_state(folder, step=2, **kw(new), config=CFG, keep=2)  # the next save repairs everything
        assert sorted(os.listdir(folder)) == ["latest.json", "step-000000001", "step-000000002"], k
        shutil.rmtree(folder)
    print(f"\ncrash points inside storage's writes of a re-save: {len(calls)} ({calls.count('replace')} renames)")
