"""Fuzzing the trajectory loader and the tensor loader with corrupted inputs (seeded, no hypothesis).

Every case starts from a pristine saved folder copied into ``tmp_path``, corrupts it, and must end
in :class:`StorageError` whose message names the file; never another exception, never a hang,
never a successful load of something that differs from what was saved. Families: bytes of the
node and probe files (truncated, flipped, appended, replaced, symlinked), safetensors headers
forged with their hash rewritten (dtypes relabelled, shapes, offsets, absurd lengths, bad JSON),
the manifest's text (truncated, flipped, huge, deeply nested, duplicate keys), every manifest field
removed or replaced by values of the wrong type (with and without the digest rewritten), node
entries (types, names leaving the folder, swaps, drops), the LoRA spec, symlinks, another base
model, format 1 folders, and the tensor loader alone. Also: reproducible saves, format 1 folders
still load, and a short fault-injection run (SIGKILL during saves).

    python -m pytest -p no:cacheprovider tests/test_storage_fuzz.py -s   # prints the case counts
"""
from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from conftest import CaseTimeout, deadline as _deadline

from disback_core import Batch, LoraSpec, StorageError, Trajectory, edm_mlp, freeze, make_generator, record_degradation
from disback_core.adapters import DMD2
from disback_core.storage import (MAX_HEADER_STRING_BYTES, MAX_JSON_BYTES, load_tensors, read_tensor_header,
                                  sha256_bytes, sha256_file, tensors_fingerprint, tensors_to_bytes)
from disback_core.trajectory import FORMAT, manifest_digest

ROOT = Path(__file__).resolve().parents[1]
NODES = ("node1", "node2", "node3")
FILES = NODES + ("probe",)
WRONG = [None, True, False, 0, -1, 1.5, float("nan"), float("inf"), 2 ** 80, "", "x", [], [1], {}, {"a": 1}]
CASE_SECONDS = 10.0  # a case still loading after this is interrupted and counts as a hang


# ----------------------------------------------------------------------------- fixtures


def _teacher(seed: int = 0, width: int = 16) -> torch.nn.Module:
    torch.manual_seed(seed)
    return freeze(edm_mlp(2, sigma_data=1.0, width=width, depth=1))


@pytest.fixture(scope="module")
def teacher():
    torch.set_num_threads(1)
    return _teacher()


@pytest.fixture(scope="module")
def saved(teacher):
    gen = make_generator(teacher, 80.0)
    return record_degradation(teacher, gen, DMD2(sigma_data=1.0), lambda: Batch(torch.randn(16, 2)), steps=6,
                              interval=2, lr=1e-2, lora=LoraSpec(rank=2), probe_size=4, seed=1)


@pytest.fixture(scope="module")
def pristine(saved, tmp_path_factory):
    """Saved folders the cases copy: format 2 (``v2``) and format 1 (``v1``, as the old writer did)."""
    root = tmp_path_factory.mktemp("pristine")
    saved.save(root / "v2")
    write_v1(saved, root / "v1")
    write_v1(saved, root / "v1-oldest", oldest=True)
    full = [{k: v.clone() for k, v in saved.materialize(i).state_dict().items()} for i in (1, 2)]
    Trajectory(saved.teacher, full, kind="full", steps=[2, 4]).save(root / "full")
    return root


def write_v1(traj: Trajectory, folder: Path, oldest: bool = False) -> None:
    """A format-1 folder exactly as the previous library wrote it (safetensors package, fixed names);
    ``oldest``: as the first releases did (no per-dtype fingerprints, LoRA ``extra`` field)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    entries = []
    for k, (state, step) in enumerate(zip(traj.nodes, traj.steps), start=1):
        name = f"node-{k:04d}.safetensors"
        save_file({n: v.contiguous() for n, v in state.items()}, folder / name, {"node": str(k), "step": str(step)})
        entries.append({"index": k, "step": step, "file": name, "sha256": sha256_file(folder / name)})
    p = traj.probe
    save_file({"x": p.x, "sigma": p.sigma, **{f"out.{k}": o for k, o in enumerate(p.outputs)}},
              folder / "probe.safetensors")
    man = {"format": FORMAT, "version": 1, "library": "disback 0.1.0", "kind": traj.kind,
           "base_fingerprint": traj.base_fingerprint, "lora": traj.lora.to_json(), "nodes": entries,
           "probe": {"file": "probe.safetensors", "sha256": sha256_file(folder / "probe.safetensors")},
           "meta": traj.meta, "base_fingerprints": {
               str(d).removeprefix("torch."): tensors_fingerprint(traj.teacher.state_dict(), d)
               for d in (torch.float32, torch.bfloat16, torch.float16)}}
    if oldest:
        del man["base_fingerprints"]
        man["lora"] = {"rank": traj.lora.rank, "alpha": traj.lora.alpha,
                       "target_modules": list(traj.lora.target_modules), "extra": {}}
    (folder / "manifest.json").write_text(json.dumps(man, indent=2, sort_keys=True) + "\n")


def same(a: Trajectory, b: Trajectory) -> bool:
    """Exactly the same nodes (values and dtypes), steps, spec, kind, meta and probe."""
    if (a.kind, a.steps, a.lora, len(a.nodes)) != (b.kind, b.steps, b.lora, len(b.nodes)):
        return False
    if json.dumps(a.meta, sort_keys=True) != json.dumps(b.meta, sort_keys=True):
        return False
    for x, y in zip(a.nodes, b.nodes):
        if x.keys() != y.keys() or not all(x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]) for k in x):
            return False
    pa, pb = a.probe, b.probe
    if pa is None or pb is None:
        return pa is pb
    pairs = [(pa.x, pb.x), (pa.sigma, pb.sigma), *zip(pa.outputs, pb.outputs)]
    return (len(pa.outputs) == len(pb.outputs) and (pa.cond is None) == (pb.cond is None)
            and all(x.dtype == y.dtype and torch.equal(x, y) for x, y in pairs))


# ----------------------------------------------------------------------------- folder helpers


def man(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def put(folder: Path, m: Any, digest: bool = True) -> str:
    """Write manifest ``m``; with ``digest`` (and a format-2 dict) its digest is recomputed, so the
    loader's field checks, not the digest, must catch the edit."""
    if digest and isinstance(m, dict) and m.get("version") == 2:
        m = {**m, "digest": manifest_digest(m)}
    (folder / "manifest.json").write_text(json.dumps(m, indent=2))
    return "manifest.json"


def entry(m: dict, target: str) -> dict:
    return m["probe"] if target == "probe" else m["nodes"][int(target[-1]) - 1]


def path_of(folder: Path, target: str) -> Path:
    return folder / entry(man(folder), target)["file"]


def forge(folder: Path, target: str, data: bytes) -> str:
    """Replace ``target``'s file by ``data`` with its sha256, content name and the digest rewritten
    (a consistent edit: only the header and tensor checks can refuse it). Returns the new name."""
    m = man(folder)
    e = entry(m, target)
    (folder / e["file"]).unlink()
    sha = sha256_bytes(data)
    prefix = "probe" if target == "probe" else f"node-{int(target[-1]):04d}"
    name = f"{prefix}-{sha[:16]}.safetensors"
    (folder / name).write_bytes(data)
    e.update(file=name, sha256=sha)
    put(folder, m)
    return name


def split_st(data: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


def join_st(header: Any, body: bytes, raw: bytes | None = None, declared: int | None = None) -> bytes:
    head = raw if raw is not None else json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    return (len(head) if declared is None else declared).to_bytes(8, "little") + head + body


def tensor_keys(header: dict) -> list[str]:
    return sorted(k for k in header if k != "__metadata__")


# ----------------------------------------------------------------------------- cases


@dataclass
class Case:
    """One corrupted input: ``mutate(folder)`` corrupts a copy of ``base`` and returns the file name
    the error must name. ``benign``: a byte change the format cannot see (JSON whitespace, a
    float digit that parses to the same double) may load, but then it must equal the saved one."""

    name: str
    mutate: Callable[[Path], str]
    base: str = "v2"
    teacher: Callable[[], torch.nn.Module] | None = None
    kwargs: dict = field(default_factory=dict)
    benign: bool = False


def _file_bytes_cases(base: str, targets: tuple[str, ...], seed: int) -> list[Case]:
    """Truncated, flipped, appended, replaced and symlinked node/probe files (hash not rewritten)."""
    rng = random.Random(seed)
    cases = []
    for target in targets:
        def trunc(folder, target=target, frac=None, at=None):
            p = path_of(folder, target)
            data = p.read_bytes()
            n = at if at is not None else int(frac * len(data))
            p.write_bytes(data[:min(n, len(data) - 1)])
            return p.name
        for at in (0, 1, 7, 8, 9, 40):
            cases.append(Case(f"{base}/{target}/truncate@{at}", lambda f, t=trunc, a=at: t(f, at=a), base))
        for i in range(14):
            cases.append(Case(f"{base}/{target}/truncate~{i}", lambda f, t=trunc, fr=rng.random(): t(f, frac=fr), base))

        def flip(folder, target=target, u=0.0, x=1):
            p = path_of(folder, target)
            data = bytearray(p.read_bytes())
            data[int(u * len(data))] ^= x
            p.write_bytes(bytes(data))
            return p.name
        for i in range(20):
            cases.append(Case(f"{base}/{target}/flip{i}", lambda f, fl=flip, u=rng.random(), x=rng.randrange(1, 256):
                              fl(f, u=u, x=x), base))

        def append(folder, target=target, extra=b""):
            p = path_of(folder, target)
            p.write_bytes(p.read_bytes() + extra)
            return p.name
        for extra in (b"\0", b" ", bytes(rng.randrange(256) for _ in range(100))):
            cases.append(Case(f"{base}/{target}/append{len(extra)}", lambda f, a=append, e=extra: a(f, extra=e), base))

        def replace(folder, target=target, how=""):
            p = path_of(folder, target)
            data = p.read_bytes()
            p.unlink()
            outside = folder.parent / f"outside-{folder.name}"
            outside.mkdir(exist_ok=True)
            if how == "empty":
                p.write_bytes(b"")
            elif how == "garbage":
                p.write_bytes(bytes(random.Random(len(data)).randrange(256) for _ in range(len(data))))
            elif how == "zeros":
                p.write_bytes(bytes(1 << 20))
            elif how == "dir":
                p.mkdir()
            elif how == "fifo":
                os.mkfifo(p)
            elif how == "link-outside":  # identical bytes: only the symlink check can refuse it
                (outside / p.name).write_bytes(data)
                p.symlink_to(outside / p.name)
            elif how == "link-loop":
                p.symlink_to(p.name)
            elif how == "link-dangling":
                p.symlink_to(outside / "nothing")
            elif how == "link-devzero":
                p.symlink_to("/dev/zero")
            return p.name
        for how in ("empty", "garbage", "zeros", "dir", "fifo", "link-outside", "link-loop", "link-dangling",
                    "link-devzero"):
            cases.append(Case(f"{base}/{target}/replace-{how}", lambda f, r=replace, h=how: r(f, how=h), base))
    return cases


# Header mutations: (header, body, rng, target) -> new file bytes, or None where not applicable.
def _relabel(to: str) -> Callable:
    def mut(h, body, rng, target):
        h[rng.choice(tensor_keys(h))]["dtype"] = to
        return join_st(h, body)
    return mut


def _set_field(fieldname: str, value: Callable[[dict], Any]) -> Callable:
    def mut(h, body, rng, target):
        e = h[rng.choice(tensor_keys(h))]
        e[fieldname] = value(e)
        return join_st(h, body)
    return mut


def _matrix_key(h: dict, rng: random.Random, target: str) -> str | None:
    """A non-square matrix to reshape (not the probe's x: a reshaped x with the same rows is a
    valid probe for a module that accepts it, so only verify() could tell)."""
    keys = [k for k in tensor_keys(h) if len(h[k]["shape"]) == 2 and h[k]["shape"][0] != h[k]["shape"][1]
            and not (target == "probe" and k == "x")]
    return rng.choice(keys) if keys else None


def _reshape(kind: str) -> Callable:
    def mut(h, body, rng, target):
        k = _matrix_key(h, rng, target)
        if k is None:
            return None
        a, b = h[k]["shape"]
        h[k]["shape"] = {"transpose": [b, a], "unsqueeze": [a, b, 1], "flatten": [a * b]}[kind]
        return join_st(h, body)
    return mut


def _offsets(kind: str) -> Callable:
    def mut(h, body, rng, target):
        keys = sorted(tensor_keys(h), key=lambda k: h[k]["data_offsets"][0])
        k = rng.choice([k for k in keys if h[k]["data_offsets"][1] > h[k]["data_offsets"][0]])
        b, e = h[k]["data_offsets"]
        if kind == "reversed":
            h[k]["data_offsets"] = [e, b]
        elif kind == "past-end":
            h[k]["data_offsets"] = [b, len(body) + 4]
        elif kind == "shifted":
            h[k]["data_offsets"] = [b + 4, e + 4]
        elif kind == "overlap":
            other = next((o for o in keys if o != k and h[o]["data_offsets"][1] - h[o]["data_offsets"][0] == e - b), None)
            if other is None:
                return None
            h[k]["data_offsets"] = list(h[other]["data_offsets"])
        elif kind == "huge":
            h[k]["data_offsets"] = [0, 2 ** 70]
        elif kind == "three":
            h[k]["data_offsets"] = [b, e, e]
        elif kind == "floats":
            h[k]["data_offsets"] = [float(b), float(e)]
        elif kind == "negative":
            h[k]["data_offsets"] = [-4, e]
        return join_st(h, body)
    return mut


def _raw(kind: str) -> Callable:
    """Mutations of the raw header bytes and its declared length."""
    def mut(h, body, rng, target):
        head = json.dumps(h).encode()
        if kind == "absurd-length":
            return join_st(h, body, declared=2 ** 60)
        if kind == "max-length":
            return join_st(h, body, declared=2 ** 64 - 1)
        if kind == "length-past-end":
            return join_st(h, body, declared=len(head) + len(body) + 64)
        if kind == "length-zero":
            return join_st(h, body, declared=0)
        if kind == "length-short":
            return join_st(h, body, declared=8)
        if kind == "over-100MiB":
            return join_st(h, body, declared=(100 << 20) + 1)
        if kind == "not-json":
            return join_st(None, body, raw=b"this is not json at all " + head[:40])
        if kind == "list":
            return join_st([h], body)
        if kind == "nested":
            return join_st(None, body, raw=b'{"__metadata__":' + b"[" * 200 + b"]" * 200 + b"," + head[1:])
        if kind == "duplicate":
            k = rng.choice(tensor_keys(h))
            return join_st(None, body, raw=head[:-1] + b"," + json.dumps({k: h[k]}).encode()[1:])
        if kind == "not-utf8":
            return join_st(None, body, raw=head[:-1] + b',"\xff\xfe":1}')
        if kind == "nul-padding":
            raw = head + b"\0" * (8 - len(head) % 8 or 8)
            return len(raw).to_bytes(8, "little") + raw + body
        if kind == "meta-not-str":
            h["__metadata__"] = {"node": 1}
            return join_st(h, body)
        if kind == "meta-escaped-quotes":  # a metadata string of \" over the cap: refused by the scan, unparsed
            return join_st(None, body, raw=b'{"__metadata__":{"x":"' + b'\\"' * (MAX_HEADER_STRING_BYTES // 2 + 1)
                           + b'"},' + head[1:])
        if kind == "meta-list":
            h["__metadata__"] = ["node"]
            return join_st(h, body)
        if kind == "trailing":
            return join_st(h, body + b"\0" * 8)
        if kind == "short-body":
            return join_st(h, body[:-4])
        if kind == "empty-name":
            k = rng.choice(tensor_keys(h))
            h[""] = h.pop(k)
            return join_st(h, body)
        if kind == "renamed":
            k = rng.choice(tensor_keys(h))
            h["module.fake_unet." + k] = h.pop(k)
            return join_st(h, body)
        if kind == "extra-tensor":
            h["extra.weight"] = {"dtype": "F32", "shape": [2], "data_offsets": [len(body), len(body) + 8]}
            return join_st(h, body + bytes(8))
        if kind == "missing-tensor":  # drop the last tensor and its bytes: a consistent, smaller file
            k = max(tensor_keys(h), key=lambda k: h[k]["data_offsets"][0])
            b = h.pop(k)["data_offsets"][0]
            return join_st(h, body[:b])
        if kind == "entry-extra-field":
            h[rng.choice(tensor_keys(h))]["x"] = 1
            return join_st(h, body)
        if kind == "entry-missing-dtype":
            del h[rng.choice(tensor_keys(h))]["dtype"]
            return join_st(h, body)
        if kind == "entry-not-object":
            h[rng.choice(tensor_keys(h))] = "F32"
            return join_st(h, body)
        if kind == "bool-values":  # a BOOL tensor whose bytes are not 0/1
            k = max(tensor_keys(h), key=lambda k: h[k]["data_offsets"][0])
            b, e = h[k]["data_offsets"]
            h[k] = {"dtype": "BOOL", "shape": [e - b], "data_offsets": [b, e]}
            return join_st(h, body[:b] + b"\x07" * (e - b))
        if kind == "f64-halved":  # consistent sizes, wrong shape
            k = _matrix_key(h, rng, target)
            if k is None:
                return None
            shape = h[k]["shape"]
            n = math.prod(shape)
            if n % 2:
                return None
            h[k].update(dtype="F64", shape=[n // 2])
            return join_st(h, body)
        raise AssertionError(kind)
    return mut


HEADER_MUTATIONS: dict[str, Callable] = {
    "dtype-F32-to-I32": _relabel("I32"), "dtype-F32-to-F16": _relabel("F16"), "dtype-F32-to-F31": _relabel("F31"),
    "dtype-F32-to-BOOL": _relabel("BOOL"), "dtype-F32-to-U32": _relabel("U32"), "dtype-int": _relabel(5),  # type: ignore[arg-type]
    "dtype-F32-to-F64": _relabel("F64"), "dtype-lowercase": _relabel("f32"),
    "shape-transpose": _reshape("transpose"), "shape-unsqueeze": _reshape("unsqueeze"), "shape-flatten": _reshape("flatten"),
    "shape-negative": _set_field("shape", lambda e: [-1] + e["shape"][1:]),
    "shape-bool": _set_field("shape", lambda e: [True] * len(e["shape"])),
    "shape-float": _set_field("shape", lambda e: [float(d) for d in e["shape"]]),
    "shape-huge": _set_field("shape", lambda e: [2 ** 40, 2 ** 20]),
    "shape-2^80": _set_field("shape", lambda e: [2 ** 80]),
    "shape-string": _set_field("shape", lambda e: "12"),
    "shape-100-dims": _set_field("shape", lambda e: [1] * 100),
    "shape-null": _set_field("shape", lambda e: None),
    **{f"offsets-{k}": _offsets(k) for k in ("reversed", "past-end", "shifted", "overlap", "huge", "three", "floats",
                                             "negative")},
    **{f"raw-{k}": _raw(k) for k in ("absurd-length", "max-length", "length-past-end", "length-zero", "length-short",
                                     "over-100MiB", "not-json", "list", "nested", "duplicate", "not-utf8",
                                     "nul-padding", "meta-not-str", "meta-list", "trailing", "short-body",
                                     "empty-name", "renamed", "extra-tensor", "missing-tensor", "entry-extra-field",
                                     "entry-missing-dtype", "entry-not-object", "bool-values", "f64-halved")},
}


def _header_cases(seed: int) -> list[Case]:
    """Safetensors headers forged with the file's hash, name and the digest rewritten."""
    rng = random.Random(seed)
    cases = []
    for target in FILES:
        for name, mut in HEADER_MUTATIONS.items():
            def mutate(folder, target=target, mut=mut, r=random.Random(rng.random())):
                h, body = split_st(path_of(folder, target).read_bytes())
                data = mut(h, body, r, target)
                return forge(folder, target, data) if data is not None else "SKIP"
            cases.append(Case(f"header/{target}/{name}", mutate))
    for target in FILES:  # after the seeded cases, so that their seeds stay as they were
        def escaped(folder, target=target, mut=_raw("meta-escaped-quotes")):
            h, body = split_st(path_of(folder, target).read_bytes())
            return forge(folder, target, mut(h, body, None, target))
        cases.append(Case(f"header/{target}/raw-meta-escaped-quotes", escaped))
    for name, keys in (("drop-out.3", ["out.3"]), ("drop-x", ["x"]), ("drop-sigma", ["sigma"])):
        def drop(folder, keys=keys):
            t = load_tensors(path_of(folder, "probe"))
            return forge(folder, "probe", tensors_to_bytes({k: v for k, v in t.items() if k not in keys}))
        cases.append(Case(f"probe/{name}", drop))

    def probe_edit(folder, how=""):
        t = load_tensors(path_of(folder, "probe"))
        if how == "extra-out.4":
            t["out.4"] = t["out.3"].clone()
        elif how == "out-shape":
            t["out.2"] = t["out.2"].reshape(-1)
        elif how == "x-rows":
            t["x"] = t["x"].reshape(-1, 1)
        elif how == "sigma-rows":
            t["sigma"] = t["sigma"][:2]
        elif how == "out-int":
            t["out.1"] = t["out.1"].to(torch.int32)
        elif how == "x-int":
            t["x"] = t["x"].to(torch.int64)
        elif how == "x-scalar":
            t["x"] = t["x"][0, 0]
        elif how == "unknown-key":
            t["noise"] = t["x"].clone()
        return forge(folder, "probe", tensors_to_bytes(t))
    for how in ("extra-out.4", "out-shape", "x-rows", "sigma-rows", "out-int", "x-int", "x-scalar", "unknown-key"):
        cases.append(Case(f"probe/{how}", lambda f, h=how: probe_edit(f, how=h)))
    return cases


def _manifest_text_cases(seed: int) -> list[Case]:
    """The manifest's bytes: truncated, flipped, not UTF-8, huge, deeply nested, duplicate keys, ..."""
    rng = random.Random(seed)
    cases = []

    def trunc(folder, u=0.0):
        p = folder / "manifest.json"
        text = p.read_bytes()
        p.write_bytes(text[:int(u * (len(text) - 2))])
        return "manifest.json"
    for i in range(20):
        cases.append(Case(f"manifest/truncate{i}", lambda f, u=rng.random(): trunc(f, u)))

    def flip(folder, u=0.0, x=1):
        p = folder / "manifest.json"
        data = bytearray(p.read_bytes())
        spots = [i for i, c in enumerate(data) if c not in b" \n\t\r"]
        data[spots[int(u * len(spots))]] ^= x
        p.write_bytes(bytes(data))
        return "manifest.json"
    for i in range(40):
        cases.append(Case(f"manifest/flip{i}", lambda f, u=rng.random(), x=rng.randrange(1, 256): flip(f, u, x),
                          benign=True))

    def text(folder, how=""):
        p = folder / "manifest.json"
        t = p.read_text()
        data = {
            "empty": b"", "null": b"null", "list": b"[]", "string": b'"manifest"', "number": b"5",
            "bom": b"\xef\xbb\xbf" + t.encode(), "not-utf8": t.replace('"lora"', '"lo\udcffra"').encode(
                "utf-8", "surrogateescape"),
            "over-16MiB": t.encode() + b" " * (MAX_JSON_BYTES + 1),
            "16MiB-brackets": b"[" * (MAX_JSON_BYTES - 8),
            # exactly the cap: scanned and parsed in linear time and memory (built only for its case)
            "16MiB-escaped-quotes": lambda: b'\\"' * (MAX_JSON_BYTES // 2),
            # a meta string of \" just under the cap: parsed, then refused by the digest
            "meta-escaped-quotes": lambda: t.replace(
                '"meta": {', '"meta": {"q": "' + '\\"' * ((MAX_JSON_BYTES - len(t)) // 2 - 8) + '", ', 1).encode(),
            "deep-meta": t.replace('"meta": {', '"meta": {"deep": ' + "[" * 70 + "]" * 70 + ",", 1).encode(),
            "deep-100000": b"[" * 100000 + b"]" * 100000,
            "duplicate-kind": t.replace('"kind": "lora"', '"kind": "lora", "kind": "full"', 1).encode(),
            "duplicate-nodes": t.replace('"node_count"', '"nodes": [], "node_count"', 1).encode(),
            "5000-digit-int": t.replace('"meta": {', '"meta": {"big": ' + "9" * 5000 + ",", 1).encode(),
            "step-NaN": t.replace('"step": 2', '"step": NaN', 1).encode(),
            "step-Infinity": t.replace('"step": 2', '"step": Infinity', 1).encode(),
            "step-1e400": t.replace('"step": 2', '"step": 1e400', 1).encode(),
            "trailing-garbage": t.encode() + b"}",
            "two-objects": t.encode() + t.encode(),
            "nul-byte": t.replace('"lora"', '"lo\\u0000ra"', 1).encode(),
            "uppercase-hex": t.replace('"sha256": "', '"sha256": "A', 1).encode(),
        }[how]
        p.write_bytes(data() if callable(data) else data)
        return "manifest.json"
    for how in ("empty", "null", "list", "string", "number", "bom", "not-utf8", "over-16MiB", "16MiB-brackets",
                "16MiB-escaped-quotes", "meta-escaped-quotes", "deep-meta", "deep-100000", "duplicate-kind",
                "duplicate-nodes", "5000-digit-int", "step-NaN",
                "step-Infinity", "step-1e400", "trailing-garbage", "two-objects", "nul-byte", "uppercase-hex"):
        cases.append(Case(f"manifest/{how}", lambda f, h=how: text(f, h)))

    def special(folder, how=""):
        p = folder / "manifest.json"
        data = p.read_bytes()
        p.unlink()
        if how == "missing":
            pass
        elif how == "dir":
            p.mkdir()
        elif how == "fifo":
            os.mkfifo(p)
        elif how == "symlink":
            other = folder.parent / f"manifest-{folder.name}.json"
            other.write_bytes(data)
            p.symlink_to(other)
        elif how == "devzero":
            p.symlink_to("/dev/zero")
        return "manifest.json"
    for how in ("missing", "dir", "fifo", "symlink", "devzero"):
        cases.append(Case(f"manifest/{how}", lambda f, h=how: special(f, h)))
    return cases


FIELD_VALID: dict[str, Callable[[Any], bool]] = {  # values a field may take in some valid trajectory
    "library": lambda v: isinstance(v, str), "meta": lambda v: isinstance(v, dict), "probe": lambda v: v is None,
}


def _manifest_field_cases() -> list[Case]:
    """Every top-level field removed, replaced by a wrong value (with and without the digest
    rewritten), and unknown fields added."""
    cases = []

    def edit(folder, key="", value=None, remove=False, digest=False):
        m = man(folder)
        if remove:
            del m[key]
        else:
            m[key] = value
        return put(folder, m, digest=digest)
    keys = ["format", "version", "library", "kind", "base_fingerprint", "base_fingerprints", "lora", "node_count",
            "nodes", "probe", "meta", "digest"]
    for key in keys:
        cases.append(Case(f"field/{key}/removed", lambda f, k=key: edit(f, k, remove=True)))
        if key != "digest":  # (rewriting the digest would put it back)
            cases.append(Case(f"field/{key}/removed+digest", lambda f, k=key: edit(f, k, remove=True, digest=True)))
        for i, v in enumerate(WRONG):
            cases.append(Case(f"field/{key}/{v!r:.20}", lambda f, k=key, v=v: edit(f, k, copy.deepcopy(v))))
            if key != "digest" and not FIELD_VALID.get(key, lambda _: False)(v):
                cases.append(Case(f"field/{key}/{v!r:.20}+digest",
                                  lambda f, k=key, v=v: edit(f, k, copy.deepcopy(v), digest=True)))
    for key, v in (("extra", 1), ("alpha_pattern", {"net.inp": 4}), ("Nodes", []), ("", None)):
        cases.append(Case(f"field/unknown-{key}", lambda f, k=key, v=v: edit(f, k, v)))
        cases.append(Case(f"field/unknown-{key}+digest", lambda f, k=key, v=v: edit(f, k, v, digest=True)))
    for key, v in (("version", 1), ("version", 3), ("version", 99), ("version", "2"), ("version", 2.0),
                   ("format", "disback-trajectory2"), ("kind", "full"), ("kind", "LORA"), ("node_count", 2),
                   ("node_count", 4), ("node_count", 3.0), ("node_count", "3"), ("base_fingerprint", "0" * 64),
                   ("base_fingerprints", {"float32": "0" * 64}), ("nodes", [[]]), ("nodes", [None] * 3),
                   ("library", "disback 9.9"), ("meta", {"dsm_loss": [0.0]})):
        cases.append(Case(f"field/{key}={v!r:.30}", lambda f, k=key, v=v: edit(f, k, v)))
        if not (key in ("library", "meta") or (key == "base_fingerprint")):
            cases.append(Case(f"field/{key}={v!r:.30}+digest", lambda f, k=key, v=v: edit(f, k, v, digest=True)))
    return cases


ENTRY_WRONG = {
    "index": [0, 2, 4, True, 1.0, "1", None, -1, 2 ** 80, [], {}],
    "step": [-1, -5, 1.5, "7", "abc", True, False, 2 ** 63, 2 ** 80, None, float("nan"), float("inf"), [], {}],
    "file": ["../x.safetensors", "/abs/node.safetensors", "a\\b.safetensors", ".hidden.safetensors",
             "x" * 300 + ".safetensors", "", "a\0b.safetensors", 5, None, [], "node-0001.safetensors", "manifest.json",
             "..", "node.safetensors.tmp", "sub/node.safetensors", "OTHER"],
    "sha256": ["A" * 64, "a" * 63, "a" * 65, "g" * 64, 5, None, [], "", "OTHER"],
}


def _entry_cases() -> list[Case]:
    """Node entries: every field of every entry given wrong values (digest rewritten), entries
    missing a field, with an extra field, not objects."""
    cases = []

    def edit(folder, k=1, key="", value=None, op="set"):
        m = man(folder)
        e = m["nodes"][k - 1]
        other = m["nodes"][k % 3]
        if op == "set":
            e[key] = other[key] if value == "OTHER" else value
        elif op == "del":
            del e[key]
        elif op == "extra":
            e["size"] = 10
        elif op == "replace":
            m["nodes"][k - 1] = value
        return put(folder, m)
    for k in (1, 2, 3):
        for key, values in ENTRY_WRONG.items():
            for v in values:
                if key == "index" and v == k and type(v) is int:
                    continue
                cases.append(Case(f"entry{k}/{key}={v!r:.20}", lambda f, k=k, key=key, v=v: edit(f, k, key, v)))
            cases.append(Case(f"entry{k}/{key}-missing", lambda f, k=k, key=key: edit(f, k, key, op="del")))
        cases.append(Case(f"entry{k}/extra-field", lambda f, k=k: edit(f, k, op="extra")))
        for v in ([], "node", None, 5, True):
            cases.append(Case(f"entry{k}/is-{v!r}", lambda f, k=k, v=v: edit(f, k, value=v, op="replace")))
    return cases


def _structure_cases() -> list[Case]:
    """Dropped, swapped, duplicated node entries; the probe entry removed or leaving the folder."""
    cases = []

    def nodes(folder, how="", digest=True):
        m = man(folder)
        n = m["nodes"]
        if how == "drop-last":
            n.pop()
        elif how == "drop-last+count":
            n.pop()
            m["node_count"] = 2
        elif how == "drop-first+count":
            n.pop(0)
            m["node_count"] = 2
        elif how == "swap":
            n[0], n[1] = n[1], n[0]
        elif how == "swap+renumber":
            n[0], n[1] = n[1], n[0]
            n[0]["index"], n[1]["index"] = 1, 2
        elif how == "swap-files":
            for key in ("file", "sha256"):
                n[0][key], n[1][key] = n[1][key], n[0][key]
        elif how == "swap-steps":
            n[0]["step"], n[1]["step"] = n[1]["step"], n[0]["step"]
        elif how == "duplicate":
            n.append({**n[2], "index": 4})
            m["node_count"] = 4
        elif how == "duplicate-same-index":
            n.insert(1, dict(n[0]))
            m["node_count"] = 4
        elif how == "empty":
            n.clear()
            m["node_count"] = 0
        elif how == "one-of-three":
            del n[1:]
        return put(folder, m, digest=digest)
    for how in ("drop-last", "drop-last+count", "drop-first+count", "swap", "swap+renumber", "swap-files",
                "swap-steps", "duplicate", "duplicate-same-index", "empty", "one-of-three"):
        for digest in (False, True):
            if how == "swap-steps" and digest:
                continue  # steps need not increase: swapped steps with the digest rewritten are a valid edit
            expect_probe = how == "drop-last+count" and digest  # consistent manifest: the probe's extra output
            cases.append(Case(f"nodes/{how}{'+digest' if digest else ''}",
                              lambda f, h=how, d=digest, p=expect_probe: _probe_named(f) if p and nodes(f, h, d)
                              else nodes(f, h, d)))

    def probe(folder, value=None, digest=True, outside=False):
        m = man(folder)
        real = m["probe"]
        if outside:
            src = folder / real["file"]
            out = folder.parent / f"outside-{folder.name}"
            out.mkdir(exist_ok=True)
            shutil.copy(src, out / "probe.safetensors")
            value = {"file": value.replace("OUT", str(out)), "sha256": real["sha256"]}
        elif value == "NOSHA":
            value = {"file": real["file"]}
        elif value == "EXTRA":
            value = {**real, "size": 1}
        elif value == "V1NAME":
            os.rename(folder / real["file"], folder / "probe.safetensors")
            value = {**real, "file": "probe.safetensors"}
        m["probe"] = value
        return put(folder, m, digest=digest)
    for v in (True, False, 1, "probe.safetensors", [], {}, "NOSHA", "EXTRA", "V1NAME", None):
        for digest in (False, True):
            if v is None and digest:
                continue  # a trajectory without a probe is valid
            cases.append(Case(f"probe-entry/{v!r}{'+digest' if digest else ''}",
                              lambda f, v=v, d=digest: probe(f, copy.deepcopy(v), d)))
    for path in ("../outside-{name}/probe.safetensors", "OUT/probe.safetensors"):
        cases.append(Case(f"probe-entry/{path}", lambda f, p=path: probe(f, p.format(name=f.name), True, True)))
    return cases


def _probe_named(folder: Path) -> str:
    return man(folder)["probe"]["file"]


LORA_EDITS = {  # field -> values; those valid for some spec only fail by the digest
    "alpha": [8, -4, 0, float("nan"), float("inf"), "x", True, None, [2.0]],
    "rank": [0, -1, 2 ** 23, 1.5, True, "4", None, 3],
    "use_rslora": [True, "yes", 1, None],
    "target_modules": ["net.inp", "(a*)*b", [], [1], ["does_not_exist"], ["net.inp", "net.inp"], ["x"] * 10000,
                       ["net.inp"], None, {"net.inp": 1}],
}
LORA_VALID = {("alpha", 8), ("use_rslora", True)}  # a valid spec for this teacher: only the digest can tell
LORA_NODE_ERROR = {("rank", 3), ("target_modules", ("net.inp",))}  # a valid spec the node files do not fit


def _lora_cases() -> list[Case]:
    cases = []

    def edit(folder, key="", value=None, digest=True, op="set"):
        m = man(folder)
        if op == "set":
            m["lora"][key] = value
        elif op == "del":
            del m["lora"][key]
        else:
            m["lora"][key] = value
        return put(folder, m, digest=digest)
    for key, values in LORA_EDITS.items():
        for v in values:
            cases.append(Case(f"lora/{key}={v!r:.20}", lambda f, k=key, v=v: edit(f, k, copy.deepcopy(v), False)))
            hashable = tuple(v) if isinstance(v, list) else json.dumps(v) if isinstance(v, dict) else v
            if (key, hashable) in LORA_VALID:
                continue
            node_error = (key, hashable) in LORA_NODE_ERROR
            cases.append(Case(f"lora/{key}={v!r:.20}+digest",
                              lambda f, k=key, v=v, n=node_error: _first_node(f) if n and edit(f, k, copy.deepcopy(v))
                              else edit(f, k, copy.deepcopy(v))))
        for digest in (False, True):
            cases.append(Case(f"lora/{key}-missing{'+digest' if digest else ''}",
                              lambda f, k=key, d=digest: edit(f, k, digest=d, op="del")))
    for key, v in (("alpha_pattern", {"net.inp": 4}), ("extra", {"use_rslora": True}), ("rank_pattern", {})):
        for digest in (False, True):
            cases.append(Case(f"lora/+{key}{'+digest' if digest else ''}",
                              lambda f, k=key, v=v, d=digest: edit(f, k, v, d, op="add")))
    return cases


def _first_node(folder: Path) -> str:
    return man(folder)["nodes"][0]["file"]


def _link_cases() -> list[Case]:
    """Names and symlinks leaving the folder."""
    cases = []

    def outside_entry(folder, target="node1", absolute=False):
        m = man(folder)
        e = entry(m, target)
        out = folder.parent / f"outside-{folder.name}"
        out.mkdir(exist_ok=True)
        shutil.copy(folder / e["file"], out / e["file"])
        e["file"] = str(out / e["file"]) if absolute else f"../{out.name}/{e['file']}"
        return put(folder, m)
    for target in FILES:
        for absolute in (False, True):
            cases.append(Case(f"links/{target}-{'absolute' if absolute else 'dotdot'}",
                              lambda f, t=target, a=absolute: outside_entry(f, t, a)))

    def link_inside(folder):
        a, b = path_of(folder, "node1"), path_of(folder, "node2")
        a.unlink()
        a.symlink_to(b.name)
        return a.name
    cases.append(Case("links/node1->node2", link_inside))

    def folder_gone(folder, how=""):
        shutil.rmtree(folder)
        if how == "file":
            folder.write_text("not a folder")
        return folder.name
    for how in ("missing", "file"):
        cases.append(Case(f"links/folder-{how}", lambda f, h=how: folder_gone(f, h)))
    return cases


def _teacher_cases() -> list[Case]:
    """Another base model, and fingerprints edited."""
    cases = [
        Case("teacher/seed1", lambda f: "manifest.json", teacher=lambda: _teacher(seed=1)),
        Case("teacher/width8", lambda f: "manifest.json", teacher=lambda: _teacher(width=8)),
        Case("teacher/bf16-of-seed1", lambda f: "manifest.json", teacher=lambda: _teacher(seed=1).to(torch.bfloat16)),
        Case("teacher/width8-unchecked", lambda f: _first_node(f), teacher=lambda: _teacher(width=8),
             kwargs={"check_fingerprint": False}),
        Case("teacher/width32-unchecked", lambda f: _first_node(f), teacher=lambda: _teacher(width=32),
             kwargs={"check_fingerprint": False}),
    ]

    def edit(folder, key="", digest=True):
        m = man(folder)
        if key == "base_fingerprint" or digest:  # (a zeroed base_fingerprint alone: the fp32 one still matches)
            m["base_fingerprint"] = "0" * 64
        if key == "base_fingerprints" or digest:
            m["base_fingerprints"] = {k: "0" * 64 for k in m["base_fingerprints"]}
        return put(folder, m, digest=digest)
    for key in ("base_fingerprint", "base_fingerprints"):
        for digest in (False, True):
            if key == "base_fingerprints" and digest:
                continue  # the exact fp32 fingerprint still matches: a valid (if useless) edit
            cases.append(Case(f"teacher/{key}-zeroed{'+digest' if digest else ''}",
                              lambda f, k=key, d=digest: edit(f, k, d)))
    cases.append(Case("teacher/bf16-fingerprints-zeroed", lambda f: edit(f, "base_fingerprints"),
                      teacher=lambda: _teacher().to(torch.bfloat16)))
    return cases


def _v1_cases() -> list[Case]:
    """Format-1 folders: what they can still be checked for (no digest)."""
    cases = []

    def edit(folder, fn):
        m = man(folder)
        fn(m)
        return put(folder, m, digest=False)
    edits: dict[str, tuple[Callable[[dict], Any], str]] = {
        "drop-last": (lambda m: m["nodes"].pop(), "probe.safetensors"),
        "swap": (lambda m: m["nodes"].reverse(), "manifest.json"),
        "swap-files": (lambda m: [m["nodes"][0].update(file="node-0002.safetensors", sha256=m["nodes"][1]["sha256"])],
                       "manifest.json"),
        "probe-true": (lambda m: m.update(probe=True), "manifest.json"),
        "probe-outside": (lambda m: m["probe"].update(file="../outside/probe.safetensors"), "manifest.json"),
        "probe-absolute": (lambda m: m["probe"].update(file="/etc/passwd"), "manifest.json"),
        "alpha-nan": (lambda m: m["lora"].update(alpha=float("nan")), "manifest.json"),
        "alpha-zero": (lambda m: m["lora"].update(alpha=0), "manifest.json"),
        "rank-2^23": (lambda m: m["lora"].update(rank=2 ** 23), "manifest.json"),
        "rank-3": (lambda m: m["lora"].update(rank=3), "node-0001.safetensors"),
        "target-string": (lambda m: m["lora"].update(target_modules="net.inp"), "manifest.json"),
        "alpha_pattern": (lambda m: m["lora"].update(alpha_pattern={"net.inp": 4}), "manifest.json"),
        "extra-bad": (lambda m: m["lora"].update(extra={"lora_dropout": 0.1}), "manifest.json"),
        "meta-list": (lambda m: m.update(meta=[]), "manifest.json"),
        "node_count-in-v1": (lambda m: m.update(node_count=3), "manifest.json"),
        "lora-missing": (lambda m: m.pop("lora"), "manifest.json"),
        "version-2-without-digest": (lambda m: m.update(version=2), "manifest.json"),
        "hash-in-name": (lambda m: m["nodes"][0].update(file=f"node-0001-{m['nodes'][0]['sha256'][:16]}.safetensors"),
                         "manifest.json"),
    }
    for step in (1.5, "7", True, -5, 2 ** 80, None):
        edits[f"step={step!r}"] = (lambda m, s=step: m["nodes"][1].update(step=s), "manifest.json")
    for sha in (5, None, "A" * 64):
        edits[f"sha={sha!r}"] = (lambda m, s=sha: m["nodes"][1].update(sha256=s), "manifest.json")
    for name, (fn, expect) in edits.items():
        cases.append(Case(f"v1/{name}", lambda f, fn=fn, e=expect: edit(f, fn) and e, base="v1"))
    cases += _file_bytes_cases("v1", ("node1", "probe"), seed=7)[::3]
    return cases


def _tensor_loader_cases(seed: int) -> list[Case]:
    """``load_tensors`` alone on a standalone file: seeded random invalid headers and data."""
    rng = random.Random(seed)
    cases = []
    kinds = ("length", "truncate", "shape", "dtype", "offsets", "garbage", "sha")

    def mutate(folder, kind="", r=None):
        p = path_of(folder, "node2")
        data = p.read_bytes()
        h, body = split_st(data)
        k = r.choice(tensor_keys(h))
        if kind == "length":
            new = join_st(h, body, declared=r.randrange(len(data) - 7, 2 ** 64))
        elif kind == "truncate":
            new = data[:r.randrange(0, len(data))]
        elif kind == "shape":
            n = math.prod(h[k]["shape"])
            dims = [r.randrange(0, 2 ** r.randrange(1, 40)) for _ in range(r.randrange(1, 5))]
            if math.prod(dims) == n:
                dims.append(2)
            h[k]["shape"] = dims
            new = join_st(h, body)
        elif kind == "dtype":
            h[k]["dtype"] = "".join(r.choice("FIUBCX0123456789_") for _ in range(r.randrange(1, 6)))
            if h[k]["dtype"] in ("F32", "I32", "U32"):
                h[k]["dtype"] = "F99"
            new = join_st(h, body)
        elif kind == "offsets":
            b, e = h[k]["data_offsets"]
            d = r.choice([-1, 1]) * r.randrange(1, 2 ** r.randrange(1, 64))
            h[k]["data_offsets"] = [b, e + d] if r.random() < 0.5 else [b + d, e + d]
            new = join_st(h, body)
        elif kind == "garbage":
            n = r.randrange(1, 200)
            new = join_st(None, body, raw=bytes(r.randrange(256) for _ in range(n)))
        else:  # sha: a flipped byte, loaded with the expected sha256
            buf = bytearray(data)
            buf[r.randrange(len(buf))] ^= r.randrange(1, 256)
            new = bytes(buf)
        p.write_bytes(new)
        return p.name
    for i in range(140):
        kind = kinds[i % len(kinds)]
        cases.append(Case(f"loader/{kind}-{i}", lambda f, k=kind, s=rng.random(): mutate(f, k, random.Random(s)),
                          base="loader", kwargs={"sha": kind == "sha"}))
    return cases


def _full_kind_cases() -> list[Case]:
    """kind='full' folders (whole state dicts, no probe): spec, kind and node tensors."""
    cases = []

    def edit(folder, key="", value=None, digest=True):
        m = man(folder)
        m[key] = value
        return put(folder, m, digest=digest)
    for key, v in (("lora", {"rank": 2, "alpha": 2.0, "use_rslora": False, "target_modules": ["net.inp"]}),
                   ("kind", "lora"), ("probe", {"file": "probe.safetensors", "sha256": "0" * 64})):
        for digest in (False, True):
            cases.append(Case(f"full/{key}{'+digest' if digest else ''}", lambda f, k=key, v=v, d=digest:
                              edit(f, k, copy.deepcopy(v), d), base="full"))
    for name in ("dtype-F32-to-I32", "dtype-F32-to-F16", "shape-transpose", "raw-renamed", "raw-extra-tensor",
                 "raw-missing-tensor", "raw-absurd-length", "offsets-overlap"):
        for target in ("node1", "node2"):
            def mutate(folder, target=target, mut=HEADER_MUTATIONS[name], r=random.Random(len(cases))):
                h, body = split_st(path_of(folder, target).read_bytes())
                data = mut(h, body, r, target)
                return forge(folder, target, data) if data is not None else "SKIP"
            cases.append(Case(f"full/{target}/{name}", mutate, base="full"))
    cases += [c for c in _file_bytes_cases("full", ("node1",), seed=8)[::4]]
    return cases


FAMILIES: dict[str, Callable[[], list[Case]]] = {
    "file-bytes": lambda: _file_bytes_cases("v2", FILES, seed=1),
    "headers": lambda: _header_cases(seed=2),
    "manifest-text": lambda: _manifest_text_cases(seed=3),
    "manifest-fields": _manifest_field_cases,
    "node-entries": _entry_cases,
    "structure": _structure_cases,
    "lora": _lora_cases,
    "links": _link_cases,
    "teachers": _teacher_cases,
    "format-1": _v1_cases,
    "full-kind": _full_kind_cases,
    "tensor-loader": lambda: _tensor_loader_cases(seed=4),
}
COUNTS: dict[str, int] = {}


# ----------------------------------------------------------------------------- running cases


def _load(case: Case, folder: Path, teacher: torch.nn.Module) -> Any:
    if case.base == "loader":  # the tensor loader alone, with and without the expected hash
        p = path_of(folder, "node2")
        e = entry(man(folder), "node2")
        if case.kwargs["sha"]:
            return load_tensors(p, sha256=e["sha256"])
        read_tensor_header(p)
        return load_tensors(p)
    return Trajectory.load(folder, case.teacher() if case.teacher else teacher, **case.kwargs)


def run_case(case: Case, pristine: Path, work: Path, teacher: torch.nn.Module, saved: Trajectory) -> str | None:
    """None if ``case`` ends as it must; else what went wrong."""
    folder = work / "case"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    shutil.copytree(pristine / ("v2" if case.base == "loader" else case.base), folder, symlinks=True)
    expect = case.mutate(folder)
    if expect == "SKIP":
        return "SKIP"
    t0 = time.monotonic()
    try:
        with _deadline(CASE_SECONDS):
            got = _load(case, folder, teacher)
    except CaseTimeout:
        return f"{case.name}: still running after {CASE_SECONDS} s (a hang)"
    except StorageError as e:
        msg = str(e)
        if time.monotonic() - t0 > CASE_SECONDS:
            return f"{case.name}: took {time.monotonic() - t0:.1f} s"
        return None if expect in msg else f"{case.name}: the message does not name {expect!r}: {msg[:300]}"
    except BaseException as e:  # noqa: BLE001 - anything else is the failure this suite looks for
        return f"{case.name}: {type(e).__name__} instead of StorageError: {str(e)[:300]}"
    if case.benign and isinstance(got, Trajectory) and same(got, saved):
        return "BENIGN"
    return f"{case.name}: loaded without an error"


def run_family(name: str, pristine: Path, tmp_path: Path, teacher, saved) -> dict[str, int]:
    cases = FAMILIES[name]()
    outcomes = {"refused": 0, "benign": 0, "skipped": 0}
    failures = []
    for i, case in enumerate(cases):
        res = run_case(case, pristine, tmp_path / "work", teacher, saved)
        if res is None:
            outcomes["refused"] += 1
        elif res == "BENIGN":
            outcomes["benign"] += 1
        elif res == "SKIP":
            outcomes["skipped"] += 1
        else:
            failures.append(res)
    shutil.rmtree(tmp_path / "work", ignore_errors=True)
    COUNTS[name] = outcomes["refused"]
    print(f"\n{name}: {len(cases)} cases, {outcomes}")
    assert not failures, f"{len(failures)} of {len(cases)} cases failed:\n" + "\n".join(failures[:40])
    return outcomes


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fuzz_family_ends_in_storage_error_naming_the_file(family, pristine, tmp_path, teacher, saved):
    torch.set_num_threads(1)
    outcomes = run_family(family, pristine, tmp_path, teacher, saved)
    assert outcomes["refused"] >= 0.9 * sum(outcomes.values())  # benign and skipped cases are rare


def test_fuzz_has_at_least_500_cases():
    counts = {name: len(make()) for name, make in FAMILIES.items()}
    total = sum(counts.values())
    print(f"\nfuzz cases: {total} {counts}")
    assert total >= 500, counts


# ----------------------------------------------------------------------------- save side


def test_pristine_folders_load_exactly(pristine, teacher, saved):
    for base in ("v2", "v1", "v1-oldest"):
        back = Trajectory.load(pristine / base, teacher)
        assert same(back, saved), base
        assert max(back.verify()) < 1e-5
    full = Trajectory.load(pristine / "full", teacher)
    assert full.kind == "full" and full.steps == [2, 4] and full.probe is None
    back = Trajectory.load(pristine / "v1", teacher, merge=False)
    assert max(back.verify()) == 0.0


def test_meta_with_nan_and_a_bf16_teacher_round_trip(saved, teacher, tmp_path):
    odd = copy.copy(saved)
    odd.meta = {**saved.meta, "dsm_loss": [float("nan"), float("inf"), 0.1], "note": "é\u0000"}
    odd.save(tmp_path / "a")
    back = Trajectory.load(tmp_path / "a", teacher)
    assert same(back, odd)
    cast = copy.deepcopy(teacher).to(torch.bfloat16)  # recognised by the per-dtype fingerprints
    assert Trajectory.load(tmp_path / "a", cast).steps == saved.steps


def test_saves_are_byte_reproducible_and_content_named(saved, teacher, tmp_path):
    saved.save(tmp_path / "a")
    Trajectory.load(tmp_path / "a", teacher).save(tmp_path / "b")  # a loaded copy saves the same bytes
    names = sorted(os.listdir(tmp_path / "a"))
    assert names == sorted(os.listdir(tmp_path / "b"))
    for n in names:
        assert (tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes(), n
        if n != "manifest.json":
            assert n.split("-")[-1].split(".")[0] == sha256_file(tmp_path / "a" / n)[:16]
    before = {n: os.stat(tmp_path / "a" / n).st_ino for n in names}
    saved.save(tmp_path / "a")  # an identical re-save reuses every tensor file
    assert all(os.stat(tmp_path / "a" / n).st_ino == before[n] for n in names if n != "manifest.json")


def test_our_files_are_plain_safetensors(saved, tmp_path):
    from safetensors.torch import load_file

    saved.save(tmp_path / "a")
    for p in (tmp_path / "a").glob("*.safetensors"):
        ours, theirs = load_tensors(p), load_file(p)
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    odd = {"b": torch.arange(3, dtype=torch.int16), "a": torch.randn(2, 3, dtype=torch.float64),
           "c": torch.tensor([True, False]), "d": torch.randn(()).to(torch.bfloat16), "e": torch.zeros(0, 4)}
    data = tensors_to_bytes(odd, {"z": "1", "a": "2"})
    assert data == tensors_to_bytes(dict(reversed(list(odd.items()))), {"a": "2", "z": "1"})
    (tmp_path / "odd.safetensors").write_bytes(data)
    back = load_tensors(tmp_path / "odd.safetensors", sha256=sha256_bytes(data))
    theirs = load_file(tmp_path / "odd.safetensors")
    assert all(back[k].dtype == v.dtype and torch.equal(back[k], v) and torch.equal(theirs[k], v) for k, v in odd.items())


def test_resave_over_format_1_and_stray_files(saved, teacher, pristine, tmp_path):
    folder = tmp_path / "t"
    shutil.copytree(pristine / "v1", folder)
    (folder / ".node-0001-0123456789abcdef.safetensors.abc123.tmp").write_bytes(b"partial")
    (folder / ".manifest.json.xyz.tmp").write_bytes(b"{")
    (folder / "notes.txt").write_text("the user's own file")
    saved.save(folder)
    names = sorted(os.listdir(folder))
    assert "notes.txt" in names and not any(n.endswith(".tmp") for n in names)
    assert "node-0001.safetensors" not in names and "probe.safetensors" not in names
    assert len(names) == 6 and man(folder)["version"] == 2
    assert same(Trajectory.load(folder, teacher), saved)


def test_unsavable_trajectories_are_refused_before_writing(saved, tmp_path):
    bad = copy.copy(saved)
    bad.steps = [-1, 4, 6]
    with pytest.raises(ValueError, match="node 1: step"):
        bad.save(tmp_path / "a")
    bad = copy.copy(saved)
    bad.meta = {"x": object()}
    with pytest.raises(ValueError, match="meta must be JSON-serialisable"):
        bad.save(tmp_path / "b")
    deep: list = []
    for _ in range(70):
        deep = [deep]
    bad.meta = {"deep": deep}
    with pytest.raises(ValueError, match="meta cannot be saved"):
        bad.save(tmp_path / "c")
    assert not (tmp_path / "a").exists() or not os.listdir(tmp_path / "a")


def test_absurd_header_sizes_do_not_allocate(tmp_path):
    """A 1 KiB file declaring a 2**60-byte header or 2**60 elements is refused at once."""
    p = tmp_path / "x.safetensors"
    for data in (join_st({"a": {"dtype": "F32", "shape": [2 ** 30, 2 ** 30], "data_offsets": [0, 2 ** 62]}}, bytes(1024)),
                 join_st({}, bytes(1024), declared=2 ** 60)):
        p.write_bytes(data)
        t0 = time.monotonic()
        with pytest.raises(StorageError, match="x.safetensors"):
            load_tensors(p)
        assert time.monotonic() - t0 < 1.0


# ----------------------------------------------------------------------------- fault injection


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fault injection forks writer processes")
def test_sigkill_during_saves_never_loses_the_previous_save(tmp_path):
    spec = importlib.util.spec_from_file_location("fault_injection", ROOT / "benchmarks" / "fault_injection.py")
    fi = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fi)
    res = fi.run(kills=10, seed=3, workdir=tmp_path)
    assert res["failures"] == [], res["failures"]
    assert res["kills"] == res["killed_by_sigkill"] == res["loads_ok"] == res["verified"] == 10
    assert res["equal_to_a_saved_trajectory"] == 10 and res["partial_files_under_final_names"] == 0
    assert res["stray_files_after_next_save"] == 0 and res["next_save_loads_and_equals_A"]


def test_header_byte_flips_agree_with_the_safetensors_package(pristine, tmp_path):
    """Random flips inside a header (no hash given): either a StorageError naming the file, or the
    same tensors the ``safetensors`` package reads (never a file it refuses). Not counted above."""
    from safetensors.torch import load as st_load

    src = path_of(pristine / "v2", "node2").read_bytes()
    n = int.from_bytes(src[:8], "little")
    rng = random.Random(5)
    p = tmp_path / "flipped.safetensors"
    accepted = 0
    for _ in range(200):
        data = bytearray(src)
        data[8 + rng.randrange(n)] ^= rng.randrange(1, 256)
        p.write_bytes(bytes(data))
        try:
            ours = load_tensors(p)
        except StorageError as e:
            assert p.name in str(e)
            continue
        theirs = st_load(bytes(data))
        assert ours.keys() == theirs.keys()
        assert all(ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]) for k in ours)
        accepted += 1
    assert accepted < 200
