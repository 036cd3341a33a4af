"""Fuzzing the training-state loader (``load_state``) and the export loader (``load_generator``).

Seeded, no hypothesis. Every case copies a pristine saved folder, corrupts it and loads it. It
must end in :class:`StorageError` whose message names the folder, or, for a forgery that rewrites
every hash so that the edited value reaches the field checks, in a load identical to the pristine
one (a value the format allows). Never another exception, a hang (10 s), or a load that differs.

Families per loader: every file's bytes (truncated, flipped, appended, emptied, removed, replaced
by a symlink, a folder or a FIFO); every JSON field removed or replaced by values of the wrong
type, with the hashes that cover it rewritten (and without, where a digest must catch it);
safetensors headers forged with their hashes rewritten (dtype relabelled, shapes, offsets,
absurd lengths, bad JSON, extra or missing tensors). The trajectory loader has its own suite
(tests/test_storage_fuzz.py).

    python -m pytest -p no:cacheprovider tests/test_loader_fuzz.py -s   # prints the case counts
"""
from __future__ import annotations

import copy
import json
import os
import random
import shutil
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import CaseTimeout, deadline, tiny_unet2d
from diffusers import DDPMScheduler
from test_state import CFG, build, kw, params, train

from disback_core import DiffusersDenoiser, OneStepGenerator, StorageError, export_generator, load_generator
from disback_core.state import load_state, save_state
from disback_core.storage import body_digest, sha256_bytes

WRONG = [None, True, False, 0, -1, 1.5, float("nan"), float("inf"), 2 ** 80, "", "x", "../x", [], [1], {}, {"a": 1}]
CASE_SECONDS = 10.0
COUNTS: dict[str, dict[str, int]] = {}


@dataclass
class Case:
    name: str
    mutate: Callable[[Path], Any]
    forged: bool = False  # every hash rewritten: a value the format allows loads (a different, valid artefact)
    may_load: bool = False  # the content is unchanged (e.g. a JSON file's final newline cut): it must load the same


# ----------------------------------------------------------------------------- byte-level cases


def _fifo_or_skip(p: Path) -> None:
    if not hasattr(os, "mkfifo"):
        raise pytest.skip.Exception("needs mkfifo")
    os.mkfifo(p)


def byte_cases(files: list[str], seed: int) -> list[Case]:
    """Corruptions of each file's bytes or kind; ``files`` are paths relative to the folder."""
    rng = random.Random(seed)
    cases = []
    for rel in files:
        def trunc(f: Path, rel=rel, at=None, frac=None):
            p = f / rel
            data = p.read_bytes()
            n = at if at is not None else int(frac * len(data))
            p.write_bytes(data[:n] if n >= 0 else data[:len(data) + n])

        for at in (0, 1, 8, -1):  # the last byte of a JSON file is its newline: the same content
            cases.append(Case(f"{rel}/truncate@{at}", lambda f, t=trunc, a=at: t(f, at=a),
                              may_load=at == -1 and rel.endswith(".json")))
        for i in range(3):
            cases.append(Case(f"{rel}/truncate~{i}", lambda f, t=trunc, fr=rng.random(): t(f, frac=fr)))

        def flip(f: Path, rel=rel, u=0.0, x=1):
            p = f / rel
            data = bytearray(p.read_bytes())
            data[int(u * len(data))] ^= x
            p.write_bytes(bytes(data))

        for i in range(4):
            cases.append(Case(f"{rel}/flip{i}", lambda f, fl=flip, u=rng.random(), x=rng.randrange(1, 256): fl(f, u=u, x=x)))

        def other(f: Path, rel=rel, how=""):
            p = f / rel
            data = p.read_bytes()
            if how == "append":
                p.write_bytes(data + b"\0junk\0")
            elif how == "empty":
                p.write_bytes(b"")
            elif how == "missing":
                p.unlink()
            elif how == "symlink":
                outside = f.parent / ("outside-" + p.name)
                outside.write_bytes(data)
                p.unlink()
                p.symlink_to(outside)
            elif how == "folder":
                p.unlink()
                p.mkdir()
            elif how == "fifo":
                p.unlink()
                _fifo_or_skip(p)

        for how in ("append", "empty", "missing", "symlink", "folder", "fifo"):
            cases.append(Case(f"{rel}/{how}", lambda f, o=other, h=how: o(f, how=h)))
    return cases


# ----------------------------------------------------------------------------- safetensors header forgeries


def _split(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def _join(header: Any, body: bytes, raw: bytes | None = None, declared: int | None = None) -> bytes:
    h = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(h) if declared is None else declared) + h + body


def _first(h: dict) -> str:
    return sorted(k for k in h if k != "__metadata__")[0]


def _matrix(h: dict) -> str | None:
    ks = [k for k in sorted(h) if k != "__metadata__" and len(h[k]["shape"]) >= 1 and h[k]["shape"][0] > 1]
    return ks[0] if ks else None


def _relabel(to: str) -> Callable[[dict, bytes], bytes | None]:
    def m(h, body):
        k = _first(h)
        if h[k]["dtype"] == to:
            k = next((x for x in sorted(h) if x != "__metadata__" and h[x]["dtype"] != to), None)
            if k is None:
                return None
        h[k]["dtype"] = to
        return _join(h, body)
    return m


def _shape(h, body):
    k = _matrix(h)
    if k is None:
        return None
    h[k]["shape"] = [h[k]["shape"][0] // 2 or 1, *h[k]["shape"][1:], 2]
    return _join(h, body)


def _offsets_past(h, body):
    k = _first(h)
    h[k]["data_offsets"] = [h[k]["data_offsets"][0], len(body) + 64]
    return _join(h, body)


def _offsets_overlap(h, body):
    ks = sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])
    if len(ks) < 2:
        return None
    a, b = h[ks[0]]["data_offsets"], h[ks[1]]["data_offsets"]
    h[ks[1]]["data_offsets"] = [a[0], a[0] + (b[1] - b[0])]
    return _join(h, body)


def _drop_tensor(h, body):
    h.pop(_first(h))
    return _join(h, body)


def _extra_tensor(h, body):
    h["zz_extra"] = {"dtype": "F32", "shape": [1], "data_offsets": [len(body), len(body) + 4]}
    return _join(h, body + b"\0\0\0\0")


def _rename_tensor(h, body):
    k = _first(h)
    h[k + "_renamed"] = h.pop(k)
    return _join(h, body)


HEADER_FORGERIES: dict[str, Callable[[dict, bytes], bytes | None]] = {
    "dtype-I32": _relabel("I32"), "dtype-F16": _relabel("F16"), "dtype-U8": _relabel("U8"), "dtype-BAD": _relabel("F99"),
    "shape": _shape, "offsets-past-end": _offsets_past, "offsets-overlap": _offsets_overlap,
    "drop-tensor": _drop_tensor, "extra-tensor": _extra_tensor, "rename-tensor": _rename_tensor,
    "header-not-json": lambda h, body: _join(None, body, raw=b"{not json" + b" " * 8),
    "header-length-absurd": lambda h, body: _join(h, body, declared=2 ** 62),
    "header-length-past-file": lambda h, body: _join(h, body, declared=len(json.dumps(h)) + len(body) + 10),
    "header-a-list": lambda h, body: _join([1, 2], body),
}


# ----------------------------------------------------------------------------- JSON edits


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path into nested dicts (lists are left whole)."""
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.append(prefix + (k,))
            out += _paths(v, prefix + (k,))
    return out


def _set(obj: dict, path: tuple, value: Any, remove: bool = False) -> None:
    for k in path[:-1]:
        obj = obj[k]
    if remove:
        obj.pop(path[-1])
    else:
        obj[path[-1]] = value


# ----------------------------------------------------------------------------- export


def _generator(seed: int = 0) -> OneStepGenerator:
    torch.manual_seed(seed)
    return OneStepGenerator(DiffusersDenoiser(tiny_unet2d(), scheduler=DDPMScheduler()), 10.0).eval()


Z = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(0))
NOTE = "disback_generator.json"
EXPORT_FILES = ["config.json", "diffusion_pytorch_model.safetensors", "disback_schedule.safetensors", NOTE]


def _rewrite_note(folder: Path, fn: Callable[[dict], None], digest: bool = True) -> None:
    p = folder / NOTE
    note = json.loads(p.read_text())
    fn(note)
    if digest:
        note["digest"] = body_digest(note)
    p.write_text(json.dumps(note))


def _rehash_export(folder: Path, name: str, data: bytes) -> None:
    """Write ``data`` as ``name`` and rewrite its hash and size in the note, and the note's digest."""
    (folder / name).write_bytes(data)
    _rewrite_note(folder, lambda n: n["files"][name].update(sha256=sha256_bytes(data), bytes=len(data)))


def export_cases() -> list[Case]:
    cases = byte_cases(EXPORT_FILES, seed=1)
    pristine_note = json.loads(json.dumps(_pristine_note()))
    for path in _paths(pristine_note):
        if path == ("digest",):
            continue
        label = ".".join(map(str, path))
        cases.append(Case(f"note/{label}/removed", lambda f, p=path: _rewrite_note(f, lambda n: _set(n, p, None, True)), True))
        cases.append(Case(f"note/{label}/edited-digest-kept",
                          lambda f, p=path: _rewrite_note(f, lambda n: _set(n, p, "edited"), digest=False)))
        for v in WRONG:
            cases.append(Case(f"note/{label}={v!r:.16}",
                              lambda f, p=path, v=v: _rewrite_note(f, lambda n: _set(n, p, copy.deepcopy(v))), True))
    for v in WRONG:
        cases.append(Case(f"note/digest={v!r:.16}", lambda f, v=v: _rewrite_note(f, lambda n: n.update(digest=v), False)))
    for name in ("diffusion_pytorch_model.safetensors", "disback_schedule.safetensors"):
        for fname, forge in HEADER_FORGERIES.items():
            def mutate(f: Path, name=name, forge=forge):
                h, body = _split((f / name).read_bytes())
                data = forge(h, body)
                if data is None:
                    return "SKIP"
                _rehash_export(f, name, data)
            cases.append(Case(f"{name}/forged-{fname}", mutate, True))

    def config_edit(f: Path, key: str, value: Any):
        cfg = json.loads((f / "config.json").read_text())
        cfg[key] = value
        _rehash_export(f, "config.json", json.dumps(cfg).encode())
    for key, value in (("block_out_channels", [8, 32]), ("_class_name", "os"), ("_class_name", "UNet2DConditionModel"),
                       ("in_channels", 3), ("layers_per_block", 2), ("norm_num_groups", 3)):
        cases.append(Case(f"config/{key}={value!r}", lambda f, k=key, v=value: config_edit(f, k, v), True))
    for i, text in enumerate([b"[]", b"{}", b"null", b"{" * 100 + b"}" * 100, b"\xff\xfe"]):
        cases.append(Case(f"config/replaced{i}", lambda f, t=text: _rehash_export(f, "config.json", t), True))
    return cases


_NOTE_CACHE: dict[str, Any] = {}


def _pristine_note() -> dict:
    if "note" not in _NOTE_CACHE:
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            export_generator(_generator(), Path(d) / "g")
            _NOTE_CACHE["note"] = json.loads((Path(d) / "g" / NOTE).read_text())
    return _NOTE_CACHE["note"]


# ----------------------------------------------------------------------------- state


STEP = "step-000000003"


def _manifest_sha(folder: Path) -> None:
    """Point latest.json at the (edited) manifest: rewrite its manifest_sha256."""
    p = folder / "latest.json"
    latest = json.loads(p.read_text())
    latest["manifest_sha256"] = sha256_bytes((folder / STEP / "manifest.json").read_bytes())
    p.write_text(json.dumps(latest))


def _edit_manifest(folder: Path, fn: Callable[[dict], None]) -> None:
    p = folder / STEP / "manifest.json"
    m = json.loads(p.read_text())
    fn(m)
    p.write_text(json.dumps(m))
    _manifest_sha(folder)


def _rehash_state(folder: Path, name: str, data: bytes) -> None:
    (folder / STEP / name).write_bytes(data)
    _edit_manifest(folder, lambda m: m["files"][name].update(sha256=sha256_bytes(data), size=len(data)))


def state_cases(pristine: Path) -> list[Case]:
    files = sorted(f"{STEP}/{p.name}" for p in (pristine / STEP).iterdir()) + ["latest.json"]
    cases = byte_cases(files, seed=2)
    manifest = json.loads((pristine / STEP / "manifest.json").read_text())
    for path in _paths(manifest):
        label = ".".join(map(str, path))
        cases.append(Case(f"manifest/{label}/removed", lambda f, p=path: _edit_manifest(f, lambda m: _set(m, p, None, True)), True))
        for v in WRONG[::2] if len(path) > 2 else WRONG:  # deep paths: every other wrong value
            cases.append(Case(f"manifest/{label}={v!r:.16}",
                              lambda f, p=path, v=v: _edit_manifest(f, lambda m: _set(m, p, copy.deepcopy(v))), True))
    latest = json.loads((pristine / "latest.json").read_text())
    for key in latest:
        def edit_latest(f: Path, key=key, v: Any = None, remove=False):
            p = f / "latest.json"
            d = json.loads(p.read_text())
            d.pop(key) if remove else d.__setitem__(key, v)
            p.write_text(json.dumps(d))
        cases.append(Case(f"latest/{key}/removed", lambda f, e=edit_latest: e(f, remove=True)))
        for v in WRONG + ["step-000000002", "/etc", "../" + STEP]:
            cases.append(Case(f"latest/{key}={v!r:.16}", lambda f, e=edit_latest, v=v: e(f, v=copy.deepcopy(v))))
    for name in ("module-model.safetensors", "optimizer-adamw.safetensors", "rng-rank0.safetensors"):
        for fname, forge in HEADER_FORGERIES.items():
            def mutate(f: Path, name=name, forge=forge):
                h, body = _split((f / STEP / name).read_bytes())
                data = forge(h, body)
                if data is None:
                    return "SKIP"
                _rehash_state(f, name, data)
            cases.append(Case(f"{name}/forged-{fname}", mutate, True))
    return cases


# ----------------------------------------------------------------------------- running


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("pristine")
    gen = _generator()
    export_generator(gen, root / "export")
    with torch.no_grad():
        out = gen(Z)
    o = build()
    train(o, 3)
    save_state(root / "state", step=3, **kw(o), config=CFG, extra={"note": "x", "t": torch.ones(2)})
    return {"root": root, "export_out": out, "state_params": params(o)}


def _load_export(folder: Path, ref: dict) -> bool:
    with torch.no_grad():
        return torch.equal(load_generator(folder)(Z), ref["export_out"])


def _load_state(folder: Path, ref: dict) -> bool:
    o = build(seed=1)
    got = load_state(folder, **kw(o), config=CFG)
    return got["step"] == 3 and all(torch.equal(v, ref["state_params"][k]) for k, v in params(o).items())


FAMILIES: dict[str, tuple[str, Callable[[Path], list[Case]], Callable[[Path, dict], bool]]] = {
    "export": ("export", lambda root: export_cases(), _load_export),
    "state": ("state", lambda root: state_cases(root / "state"), _load_state),
}


def run_case(case: Case, src: Path, work: Path, load: Callable[[Path, dict], bool], ref: dict) -> str | None:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    folder = work / "case"
    shutil.copytree(src, folder, symlinks=True)
    if case.mutate(folder) == "SKIP":
        return "SKIP"
    t0 = time.monotonic()
    try:
        with deadline(CASE_SECONDS):
            same = load(folder, ref)
    except CaseTimeout:
        return f"{case.name}: still running after {CASE_SECONDS} s (a hang)"
    except StorageError as e:
        return None if str(folder) in str(e) else f"{case.name}: the message does not name the folder: {str(e)[:300]}"
    except BaseException as e:  # noqa: BLE001 - anything else is what this suite looks for
        return f"{case.name}: {type(e).__name__} instead of StorageError: {str(e)[:300]}"
    finally:
        if time.monotonic() - t0 > CASE_SECONDS:
            return f"{case.name}: took {time.monotonic() - t0:.1f} s"  # noqa: B012
    if case.forged or (case.may_load and same):
        return "VALID"
    return f"{case.name}: loaded without an error" + ("" if same else " and differs from what was saved")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_loader_fuzz_ends_in_storage_error_naming_the_folder(family, pristine, tmp_path):
    torch.set_num_threads(1)
    base, make, load = FAMILIES[family]
    cases = make(pristine["root"])
    outcomes = {"refused": 0, "valid-forgery": 0, "skipped": 0}
    failures = []
    for case in cases:
        res = run_case(case, pristine["root"] / base, tmp_path / "work", load, pristine)
        if res is None:
            outcomes["refused"] += 1
        elif res == "VALID":
            outcomes["valid-forgery"] += 1
        elif res == "SKIP":
            outcomes["skipped"] += 1
        else:
            failures.append(res)
    COUNTS[family] = {"cases": len(cases), **outcomes}
    print(f"\n{family}: {len(cases)} cases, {outcomes}")
    assert not failures, f"{len(failures)} of {len(cases)} cases failed:\n" + "\n".join(failures[:40])
    assert outcomes["refused"] >= 0.8 * len(cases)  # valid forgeries: free-form fields (extra, versions, lr values)
    assert len(cases) >= 250
