"""Fuzz: seeded corruptions of valid traces and reference archives, every one refused by name.

A few hundred corrupted traces (header-size bytes, header JSON bytes, metadata values of every
wrong type, data byte flips, truncations, dtype/shape/offset lies, structural header edits) and
malformed `.npz` archives, generated from one seed. For each: a TraceFormatError whose message
reads `<file>: field '<field>': expected ..., found ...` and names the field or tensor at fault
(data flips: the tensor that owns the byte, caught by its checksum), never another exception and
never a trace opened silently. A handful go through the CLI in subprocesses: one line
`error: ...`, exit status 2, no traceback. About 1,200 cases in about ten seconds.

Run: python -m pytest -q tests/test_trace_fuzz.py
"""

from __future__ import annotations

import io
import json
import re
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, small_arrays
from lynx_sim.traces import TraceFormatError, TraceMeta, write_trace
from lynx_sim.traces.convert import reference_to_arrays
from lynx_sim.traces.reader import Trace

SEED = 20261202
MESSAGE = re.compile(r"field '([^']+)': expected .+, found .+", re.S)


def grouped_arrays():
    """A valid grouped_topk trace (E=8 in 4 groups, 2 kept, k=2): ids chosen on the logits."""
    a = small_arrays(seed=3)
    z = a.logits
    N, L, E = z.shape
    g = z.reshape(N, L, 4, 2).max(-1)  # [N, L, G]
    keep = np.argsort(-g, axis=-1, kind="stable")[..., :2]
    mask = np.zeros_like(g, dtype=bool)
    np.put_along_axis(mask, keep, True, -1)
    masked = np.where(np.repeat(mask, 2, -1), z, -np.inf)
    ids = np.argsort(-masked, axis=-1, kind="stable")[..., :2]
    p = np.exp(z - z.max(-1, keepdims=True))
    w = np.take_along_axis(p / p.sum(-1, keepdims=True), ids, -1)
    a.ids, a.weights = ids, (w / w.sum(-1, keepdims=True)).astype(np.float32)
    a.meta = TraceMeta(model="grouped", num_experts=8, top_k=2, moe_layers=(1, 3, 5), router="grouped_topk",
                       n_group=4, topk_group=2, weights_kind="renormalised", provenance={"test": True})
    return a


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, bytes]:
    """Valid trace files, as bytes: with logits (float16, bfloat16), ids only, grouped router."""
    d = tmp_path_factory.mktemp("bases")
    ids_only = small_arrays(seed=1, logits=False)
    ids_only.weights = None
    made = {"full": (small_arrays(), "float16"), "bf16": (small_arrays(seed=2), "bfloat16"),
            "ids_only": (ids_only, "float16"), "grouped": (grouped_arrays(), "float32")}
    out = {}
    for name, (a, dtype) in made.items():
        path = write_trace(d / f"{name}.safetensors", a, float_dtype=dtype)
        Trace(path).close()  # the base itself is valid
        out[name] = path.read_bytes()
    return out


def split(b: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", b[:8])
    return json.loads(b[8:8 + n]), b[8 + n:]


def join(header: dict, data: bytes) -> bytes:
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob + data


def with_meta(b: bytes, edit, rehash: bool = True) -> bytes:
    """The trace with its `meta` JSON edited by `edit(dict)`; its checksum recomputed when `rehash`
    (a producer with a bug) or left as it was (a corruption)."""
    header, data = split(b)
    md = header["__metadata__"]
    meta = json.loads(md["meta"])
    edit(meta)
    md["meta"] = json.dumps(meta)
    if rehash:
        sums = json.loads(md["checksums"])
        import hashlib

        sums["meta"] = hashlib.sha256(md["meta"].encode()).hexdigest()
        md["checksums"] = json.dumps(sums)
    return join(header, data)


def refused(path: Path, fields: set[str] | None = None, opener=None) -> str | None:
    """None when the file is refused as it should be, else what went wrong."""
    try:
        (opener or (lambda p: Trace(p).close()))(path)
    except TraceFormatError as e:
        msg = str(e)
        m = MESSAGE.search(msg)
        if str(path) not in msg or m is None:
            return f"badly worded: {msg}"
        if fields is not None and e.field not in fields:
            return f"field {e.field!r}, wanted one of {sorted(fields)}: {msg}"
        return None
    except Exception as e:  # noqa: BLE001 - the point of the test
        return f"{type(e).__name__}: {e}"
    return "OPENED SILENTLY"


def run_cases(tmp_path: Path, cases: list[tuple[str, bytes, set[str] | None]]) -> None:
    failures = []
    for i, (label, data, fields) in enumerate(cases):
        path = tmp_path / f"c{i}.safetensors"
        path.write_bytes(data)
        why = refused(path, fields)
        if why:
            failures.append(f"{label}: {why}")
    assert not failures, f"{len(failures)} of {len(cases)} corruptions:\n" + "\n".join(failures[:20])


def test_header_size_bytes(tmp_path, bases):
    rng = np.random.default_rng(SEED)
    cases = []
    for name, b in bases.items():
        (n,) = struct.unpack("<Q", b[:8])
        for value in (0, 1, n - 8, n - 1, n + 1, n + 8, len(b) - 8, len(b), 2 ** 63, 2 ** 64 - 1):
            cases.append((f"{name} size={value}", struct.pack("<Q", value) + b[8:], None))
        for _ in range(8):
            c = bytearray(b)
            c[int(rng.integers(0, 8))] ^= int(rng.integers(1, 256))
            cases.append((f"{name} size bytes {bytes(c[:8]).hex()}", bytes(c), None))
    run_cases(tmp_path, cases)


def test_header_byte_flips(tmp_path, bases):
    """Any byte of the JSON header flipped: refused, unless the header still parses to the same
    JSON (a flip of padding whitespace into other whitespace, which changes nothing)."""
    rng = np.random.default_rng(SEED + 1)
    cases = []
    for name, b in bases.items():
        (n,) = struct.unpack("<Q", b[:8])
        original = json.loads(b[8:8 + n])
        while sum(1 for c in cases if c[0].startswith(name)) < 30:
            c = bytearray(b)
            at = int(rng.integers(8, 8 + n))
            c[at] ^= int(rng.integers(1, 256))
            try:
                if json.loads(bytes(c[8:8 + n])) == original:
                    continue
            except (ValueError, UnicodeDecodeError):
                pass
            cases.append((f"{name} header byte {at}", bytes(c), None))
    run_cases(tmp_path, cases)


WRONG = {  # metadata values of the wrong type or out of bounds, for the trace `full` (E=8, k=2, L=3)
    "model": [None, 5, True, [], {}],
    "num_experts": [None, "8", 8.0, True, [8], -1, 0, 2 ** 20, 2 ** 31, 2 ** 64],
    "top_k": [None, "2", 2.5, False, 0, 9, 10 ** 9],
    "moe_layers": [None, 5, "0,1,2", [], [0, 1, "2"], [0, 1, 1], [0, -1, 2], [0, 1, 2.0], [True, 1, 2],
                   list(range(2000)), [0, 1, 2 ** 40], {"0": 0}],
    "router": [None, 5, "magic", ["softmax"]],
    "renormalize": ["true", 1, None, 0],
    "shared_experts": [-1, "0", 1.5, None, True, 2 ** 20],
    "n_group": ["a", 0, 3, None, 2.0, True, 16],
    "topk_group": [0, 2, "1", None],
    "weights_kind": [None, 5, ["x"]],
    "ids_ordered": ["false", "true", 0, 1, None],
    "router_bias": ["false", 1, None],
    "missing": ["logits", ["nonsense"], [5], ["logits"], None, ["prompt_tokens", "prompt_tokens"], {}],
    "provenance": [[], "x", 5, None],
    "format_version": [2, "1", 1.0, True, None],
}


def test_metadata_of_every_wrong_type(tmp_path, bases):
    """Each wrong value is named by its field, even with the metadata checksum made to agree."""
    cases = []
    for field, values in WRONG.items():
        for v in values:
            cases.append((f"{field}={v!r}"[:80], with_meta(bases["full"], lambda m, f=field, v=v: m.__setitem__(f, v)),
                          {field}))
    for key in ("model", "num_experts", "top_k", "moe_layers", "format_version"):
        cases.append((f"no {key}", with_meta(bases["full"], lambda m, k=key: m.pop(k)), {key}))
    cases.append(("unknown key", with_meta(bases["full"], lambda m: m.__setitem__("extra", 1)), {"metadata"}))
    # well-typed edits without a matching checksum: the header was corrupted or edited by hand
    for field, v in (("model", "other"), ("weights_kind", "x"), ("provenance", {"a": 1}), ("renormalize", False),
                     ("ids_ordered", False), ("shared_experts", 2), ("moe_layers", [7, 8, 9])):
        cases.append((f"{field}={v!r} unhashed", with_meta(bases["full"], lambda m, f=field, v=v: m.__setitem__(f, v),
                                                            rehash=False), {"meta"}))
    assert len(cases) > 90
    run_cases(tmp_path, cases)


def test_data_byte_flips_are_caught_by_the_checksum(tmp_path, bases):
    """Every flipped data byte: an error naming the tensor that owns the byte."""
    rng = np.random.default_rng(SEED + 2)
    cases = []
    for name, b in bases.items():
        header, data = split(b)
        start = len(b) - len(data)
        spans = {t: e["data_offsets"] for t, e in header.items() if t != "__metadata__"}
        for t, (lo, hi) in spans.items():  # every tensor, then random bytes anywhere
            for at in [lo, hi - 1, *rng.integers(lo, hi, 2)]:
                c = bytearray(b)
                c[start + int(at)] ^= int(rng.integers(1, 256))
                cases.append((f"{name} {t} byte {at}", bytes(c), {t}))
    assert len(cases) > 80
    run_cases(tmp_path, cases)


def test_truncations_and_trailing_bytes(tmp_path, bases):
    rng = np.random.default_rng(SEED + 3)
    cases = []
    for name, b in bases.items():
        for cut in [0, 4, 8, 9, len(b) - 1, *rng.integers(10, len(b) - 1, 8)]:
            cases.append((f"{name} cut at {cut}", b[:int(cut)], {"file"}))
        for extra in (b"\0", b" " * 8, bytes(100)):
            cases.append((f"{name} + {len(extra)} bytes", b + extra, {"file"}))
    run_cases(tmp_path, cases)


def test_dtype_shape_and_offset_lies(tmp_path, bases):
    """A tensor entry that lies about its dtype, shape or offsets (checksums as written)."""
    cases = []
    for name, b in bases.items():
        header, data = split(b)
        for t in [k for k in header if k != "__metadata__"]:
            e = header[t]
            lies = [("dtype", d) for d in ("F16", "BF16", "F32", "F64", "I8", "U8", "I16", "U16", "I32", "I64", "X9", 5)]
            N, *rest = e["shape"]
            lies += [("shape", s) for s in ([N + 1, *rest], [N - 1, *rest], [*rest, N], [N, *rest, 1], [N * 2] if rest else [],
                                            [], "12", None, [N, -1] if not rest else [-N, *rest])]
            lo, hi = e["data_offsets"]
            lies += [("data_offsets", o) for o in ([lo + 1, hi + 1], [lo, hi + 2], [hi, lo], [lo], None, [lo - 1, hi - 1])]
            for key, value in lies:
                h = json.loads(json.dumps(header))
                if h[t][key] == value:
                    continue
                h[t][key] = value
                cases.append((f"{name} {t}.{key}={value!r}", join(h, data), {t, "file", "tensors"}))
    run_cases(tmp_path, cases)


def test_structural_header_edits(tmp_path, bases):
    b = bases["full"]
    header, data = split(b)
    md = header["__metadata__"]
    sums = json.loads(md["checksums"])

    def edit(fn):
        h = json.loads(json.dumps(header))
        fn(h)
        return join(h, data)

    def sums_edit(fn):
        s = json.loads(json.dumps(sums))
        fn(s)
        return edit(lambda h: h["__metadata__"].__setitem__("checksums", json.dumps(s)))

    cases = [
        ("no __metadata__", edit(lambda h: h.pop("__metadata__")), {"format"}),
        ("no checksums", edit(lambda h: h["__metadata__"].pop("checksums")), {"checksums"}),
        ("no meta", edit(lambda h: h["__metadata__"].pop("meta")), {"meta"}),
        ("unknown header key", edit(lambda h: h["__metadata__"].__setitem__("x", "y")), {"__metadata__"}),
        ("int format_version", edit(lambda h: h["__metadata__"].__setitem__("format_version", 1)), {"__metadata__"}),
        ("format", edit(lambda h: h["__metadata__"].__setitem__("format", "other")), {"format"}),
        ("no ids entry", edit(lambda h: h.pop("ids")), None),
        ("extra tensor", edit(lambda h: h.__setitem__("extra", {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]})),
         {"tensors", "checksums"}),
        ("tensor entry a list", edit(lambda h: h.__setitem__("phase", [1, 2])), {"phase"}),
        ("header a list", struct.pack("<Q", 8) + b"[]      " + data, {"file"}),
        ("repeated key", struct.pack("<Q", len(b"{\"a\":1,\"a\":2}   ")) + b"{\"a\":1,\"a\":2}   " + data, {"file"}),
        ("checksums not JSON", edit(lambda h: h["__metadata__"].__setitem__("checksums", "{nope")), {"checksums"}),
        ("algorithm md5", sums_edit(lambda s: s.__setitem__("algorithm", "md5")), {"checksums"}),
        ("a tensor's digest missing", sums_edit(lambda s: s["tensors"].pop("ids")), {"checksums"}),
        ("an extra digest", sums_edit(lambda s: s["tensors"].__setitem__("x", s["tensors"]["ids"])), {"checksums"}),
        ("digest upper case", sums_edit(lambda s: s["tensors"]["ids"].__setitem__("digest", s["tensors"]["ids"]["digest"].upper())),
         {"ids"}),
        ("digest short", sums_edit(lambda s: s["tensors"]["ids"].__setitem__("digest", "ab")), {"ids"}),
        ("digest of another tensor", sums_edit(lambda s: s["tensors"]["ids"].__setitem__("digest", s["tensors"]["phase"]["digest"])),
         {"ids"}),
        ("recorded dtype", sums_edit(lambda s: s["tensors"]["logits"].__setitem__("dtype", "BF16")), {"logits"}),
        ("meta digest", sums_edit(lambda s: s.__setitem__("meta", "0" * 64)), {"meta"}),
    ]
    run_cases(tmp_path, cases)


# ---- reference .npz archives ------------------------------------------------------------------

def npz_bytes(arrays: dict, compressed: bool = False) -> bytes:
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    return buf.getvalue()


def reference(**change) -> dict:
    """A valid reference archive (the schema of ../shared/traces/README.md), with changes."""
    a = small_arrays(seed=5, lengths=(6, 4, 5))
    N = a.ids.shape[0]
    meta = {"model": "mistralai/Mixtral-8x7B-Instruct-v0.1", "num_experts": 8, "top_k": 2, "weights": "renormalised"}
    for k, v in change.pop("meta_keys", {}).items():  # None: remove the key
        meta.pop(k) if v is None else meta.__setitem__(k, v)
    out = {"ids": a.ids.astype(np.int16), "weights": a.weights.astype(np.float16), "seq_offsets": np.array([0, 6, 10, N]),
           "phase": np.ones(N, np.int8), "layers": np.array([0, 1, 2], np.int16), "meta": np.array(json.dumps(meta))}
    for k, v in change.items():  # None: remove the array
        out.pop(k) if v is None else out.__setitem__(k, v)
    return out


def test_malformed_npz(tmp_path):
    ok = tmp_path / "ok.npz"
    ok.write_bytes(npz_bytes(reference()))
    assert reference_to_arrays(ok).meta.ids_ordered
    ids = reference()["ids"]
    pickled = tmp_path / "obj.npy"
    np.save(pickled, np.arange(3))
    arch = npz_bytes(reference())
    member = arch.index(b"ids.npy")  # the stored (uncompressed) member: flip a data byte after its header
    corrupted = bytearray(arch)
    corrupted[member + 200] ^= 0xFF
    comp = bytearray(npz_bytes(reference(), compressed=True))
    comp[len(comp) // 3] ^= 0xFF
    cases = [(f"no {k}", npz_bytes(reference(**{k: None})), {k}) for k in ("ids", "seq_offsets", "phase", "layers", "meta")]
    cases += [
        ("float ids", npz_bytes(reference(ids=ids.astype(np.float32))), {"ids"}),
        ("float offsets", npz_bytes(reference(seq_offsets=np.array([0.0, 6, 10, 15]))), {"seq_offsets"}),
        ("float phase", npz_bytes(reference(phase=np.ones(15))), {"phase"}),
        ("float layers", npz_bytes(reference(layers=np.array([0.0, 1, 2]))), {"layers"}),
        ("int weights", npz_bytes(reference(weights=np.ones(ids.shape, np.int8))), {"weights"}),
        ("2-d ids", npz_bytes(reference(ids=ids[:, :, 0])), {"ids"}),
        ("object ids", npz_bytes(reference(ids=np.array([{"a": 1}], dtype=object))), {"ids"}),
        ("unknown array", npz_bytes(reference(logits=np.zeros(3))), {"arrays"}),
        ("empty seq_offsets", npz_bytes(reference(seq_offsets=np.array([], np.int64))), {"seq_offsets"}),
        ("one offset", npz_bytes(reference(seq_offsets=np.array([0]))), {"seq_offsets"}),
        ("offsets short of N", npz_bytes(reference(seq_offsets=np.array([0, 6, 10, 14]))), {"seq_offsets"}),
        ("offsets falling", npz_bytes(reference(seq_offsets=np.array([0, 10, 6, 15]))), {"seq_offsets"}),
        ("phase shape", npz_bytes(reference(phase=np.ones(14, np.int8))), {"phase"}),
        ("phase 2", npz_bytes(reference(phase=np.full(15, 2, np.int8))), {"phase"}),
        ("phase 257 (no int8 wrap)", npz_bytes(reference(phase=np.full(15, 257, np.int16))), {"phase"}),
        ("weights shape", npz_bytes(reference(weights=np.ones((15, 3, 3), np.float16))), {"weights"}),
        ("ids 8 of 8", npz_bytes(reference(ids=np.where(ids == 0, 8, ids).astype(np.int16))), {"ids"}),
        ("ids 2^32+1 (no int32 wrap)", npz_bytes(reference(ids=np.where(ids == 1, 2 ** 32 + 1, ids.astype(np.int64)))), {"ids"}),
        ("negative layer", npz_bytes(reference(layers=np.array([0, -1, 2], np.int16))), {"moe_layers"}),
        ("meta a list", npz_bytes(reference(meta=np.array("[1, 2]"))), {"meta"}),
        ("meta a number", npz_bytes(reference(meta=np.array("5"))), {"meta"}),
        ("meta not JSON", npz_bytes(reference(meta=np.array("{model"))), {"meta"}),
        ("meta an int array", npz_bytes(reference(meta=np.array(5))), {"meta"}),
        ("no num_experts", npz_bytes(reference(meta_keys={"num_experts": None})), {"meta.num_experts"}),
        ("num_experts 'eight'", npz_bytes(reference(meta_keys={"num_experts": "eight"})), {"meta.num_experts"}),
        ("num_experts 8.0", npz_bytes(reference(meta_keys={"num_experts": 8.0})), {"meta.num_experts"}),
        ("num_experts 2^20", npz_bytes(reference(meta_keys={"num_experts": 2 ** 20})), {"num_experts"}),
        ("top_k a list", npz_bytes(reference(meta_keys={"top_k": [2]})), {"meta.top_k"}),
        ("top_k 3 for 2 slots", npz_bytes(reference(meta_keys={"top_k": 3})), {"ids"}),
        ("model 5", npz_bytes(reference(meta_keys={"model": 5})), {"meta.model"}),
        ("unknown model", npz_bytes(reference(meta_keys={"model": "acme/x"})), {"meta.model"}),
        ("shared_experts '1'", npz_bytes(reference(meta_keys={"shared_experts": "1"})), {"meta.shared_experts"}),
        ("weights 3", npz_bytes(reference(meta_keys={"weights": 3})), {"meta.weights"}),
        (".npy renamed", pickled.read_bytes(), {"file"}),
        ("text", b"ids,weights\n1,2\n", {"file"}),
        ("empty", b"", {"file"}),
        ("zip cut in half", arch[: len(arch) // 2], {"file"}),
        ("corrupted member", bytes(corrupted), {"ids", "file"}),
        ("corrupted compressed archive", bytes(comp), None),
        ("zip of other things", _zip({"readme.txt": b"hello"}), {"arrays"}),
    ]
    failures = []
    for i, (label, data, fields) in enumerate(cases):
        path = tmp_path / f"n{i}.npz"
        path.write_bytes(data)
        why = refused(path, fields, opener=reference_to_arrays)
        if why:
            failures.append(f"{label}: {why}")
    assert not failures, f"{len(failures)} of {len(cases)} archives:\n" + "\n".join(failures)


def _zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return buf.getvalue()


def test_cli_prints_one_line_and_exits_2(tmp_path, bases):
    """A handful through `python -m lynx_sim.traces` in subprocesses (in parallel): one line
    `error: ...` naming the file and field, status 2, no traceback."""
    header, data = split(bases["full"])
    flipped = bytearray(bases["full"])
    flipped[len(flipped) - 5] ^= 1
    bad_meta = with_meta(bases["full"], lambda m: m.__setitem__("moe_layers", 5))
    files = {"flip.safetensors": bytes(flipped), "cut.safetensors": bases["full"][:100], "meta.safetensors": bad_meta,
             "eight.npz": npz_bytes(reference(meta_keys={"num_experts": "eight"})), "npy.npz": b"\x93NUMPY" + bytes(100)}
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    runs = {"flip.safetensors": ["stats"], "cut.safetensors": ["stats"], "meta.safetensors": ["stats", "--json"],
            "eight.npz": ["convert"], "npy.npz": ["stats"]}
    procs = {}
    for name, cmd in runs.items():
        args = [sys.executable, "-m", "lynx_sim.traces", cmd[0], str(tmp_path / name), *cmd[1:]]
        if cmd[0] == "convert":
            args.append(str(tmp_path / "out.safetensors"))
        procs[name] = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for name, p in procs.items():
        out, err = p.communicate(timeout=120)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (name, p.returncode, err)
        assert "Traceback" not in err and str(tmp_path / name) in lines[0] and MESSAGE.search(lines[0]), (name, err)
    assert not (tmp_path / "out.safetensors").exists()
    assert not list(tmp_path.glob("*.partial-*"))
