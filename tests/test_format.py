"""The native trace format: round trip, and a clear error for every kind of bad file."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import ROOT, small_arrays
from lynx_sim.traces import TraceFormatError, TraceMeta, open_trace, write_trace
from lynx_sim.traces.format import FORMAT_NAME
from lynx_sim.traces.writer import header_metadata


def raw_tensors(a):
    """The tensors write_trace would store, for tampering with."""
    t = {"request_id": torch.from_numpy(a.request_id.astype(np.int32)), "position": torch.from_numpy(a.position.astype(np.int32)),
         "phase": torch.from_numpy(a.phase.astype(np.int8)), "ids": torch.from_numpy(a.ids.astype(np.int16)),
         "weights": torch.from_numpy(a.weights).half(), "logits": torch.from_numpy(a.logits).half()}
    return t


def save_raw(path, tensors, meta, header=None):
    """A file as a producer with a bug would write it: checksums of what it wrote, so that the
    reader's data checks (not the checksums) must find the defect. `header` replaces the whole
    `__metadata__` (no checksums: the header checks run before the checksums are looked for)."""
    save_file(tensors, str(path), metadata=header or header_metadata(meta, tensors))
    return path


def expect_error(path, field, *fragments):
    with pytest.raises(TraceFormatError) as ei:
        open_trace(path)
    msg = str(ei.value)
    assert str(path) in msg and f"field '{field}'" in msg, msg
    for f in fragments:
        assert f in msg, msg
    return msg


def test_round_trip(tmp_path, arrays):
    path = write_trace(tmp_path / "t.safetensors", arrays)
    tr = open_trace(path)
    assert tr.meta == arrays.meta
    assert tr.num_tokens == 12 and tr.num_requests == 3 and tr.num_layers == 3
    np.testing.assert_array_equal(tr.read("ids"), arrays.ids)
    np.testing.assert_allclose(tr.read("weights"), arrays.weights, atol=1e-3)
    np.testing.assert_allclose(tr.read("logits", 2, 7), arrays.logits[2:7], atol=4e-3)
    np.testing.assert_array_equal(tr.request_offsets, [0, 5, 8, 12])
    np.testing.assert_array_equal(tr.arrival_s, arrays.arrival_s)


@pytest.mark.parametrize("dtype,torch_dtype", [("float16", torch.float16), ("bfloat16", torch.bfloat16), ("float32", torch.float32)])
def test_float_dtypes(tmp_path, arrays, dtype, torch_dtype):
    path = write_trace(tmp_path / "t.safetensors", arrays, float_dtype=dtype)
    tr = open_trace(path)
    expect = torch.from_numpy(arrays.logits).to(torch_dtype).float().numpy()
    np.testing.assert_array_equal(tr.read("logits"), expect)


def test_ids_only_trace(tmp_path):
    a = small_arrays(logits=False)
    a.weights = None
    tr = open_trace(write_trace(tmp_path / "t.safetensors", a))
    assert not tr.has("weights") and not tr.has("logits")
    with pytest.raises(KeyError, match="no 'logits'"):
        tr.read("logits")


def test_chunked_validation_reports_absolute_row(tmp_path, arrays):
    t = raw_tensors(arrays)
    t["ids"][10, 1, 0] = 99
    path = save_raw(tmp_path / "bad.safetensors", t, arrays.meta)
    with pytest.raises(TraceFormatError, match="row 10, layer 1"):
        open_trace(path).validate_data(chunk_tokens=4)


def test_wrong_shape_k_mismatch(tmp_path, arrays):
    t = raw_tensors(arrays)
    t["ids"] = torch.cat([t["ids"], t["ids"][..., :1]], -1)
    expect_error(save_raw(tmp_path / "b.safetensors", t, arrays.meta), "ids", "k=2", "[12, 3, 3]")


def test_expert_count_mismatch(tmp_path, arrays):
    t = raw_tensors(arrays)
    meta = dataclasses.replace(arrays.meta, num_experts=16)
    expect_error(save_raw(tmp_path / "b.safetensors", t, meta), "logits", "E=16", "[12, 3, 8]")


def test_wrong_dtype(tmp_path, arrays):
    t = raw_tensors(arrays)
    t["ids"] = t["ids"].float()
    expect_error(save_raw(tmp_path / "b.safetensors", t, arrays.meta), "ids", "I16 or I32", "F32")
    t = raw_tensors(arrays)
    t["phase"] = t["phase"].int()
    expect_error(save_raw(tmp_path / "c.safetensors", t, arrays.meta), "phase", "I8", "I32")


def test_ids_out_of_range(tmp_path, arrays):
    t = raw_tensors(arrays)
    t["ids"][3, 2, 1] = 8
    expect_error(save_raw(tmp_path / "b.safetensors", t, arrays.meta), "ids", "0..7", "8 at row 3, layer 2")
    t["ids"][3, 2, 1] = -1
    expect_error(save_raw(tmp_path / "c.safetensors", t, arrays.meta), "ids", "-1 at row 3")


def test_repeated_id(tmp_path, arrays):
    t = raw_tensors(arrays)
    t["ids"][4, 0, 1] = t["ids"][4, 0, 0]
    expect_error(save_raw(tmp_path / "b.safetensors", t, arrays.meta), "ids", "distinct", "row 4, layer 0")


@pytest.mark.parametrize("name,value", [("weights", float("nan")), ("logits", float("inf")), ("logits", float("nan"))])
def test_nan_inf(tmp_path, arrays, name, value):
    t = raw_tensors(arrays)
    t[name][7, 1, 0] = value
    expect_error(save_raw(tmp_path / "b.safetensors", t, arrays.meta), name, "finite", "row 7, layer 1")


def test_truncated_file(tmp_path, arrays):
    path = write_trace(tmp_path / "t.safetensors", arrays)
    data = path.read_bytes()
    for cut in (len(data) - 10, 100, 5):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        expect_error(bad, "file", "safetensors", "truncated")


def test_not_a_trace(tmp_path, arrays):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64 + b"definitely not a trace")
    expect_error(junk, "file")
    other = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(3)}, str(other))  # a valid safetensors file, but not a trace
    expect_error(other, "format", FORMAT_NAME, "None")
    npz = tmp_path / "x.npz"
    np.savez(npz, ids=np.zeros(3))
    expect_error(npz, "file")
    expect_error(tmp_path / "missing.safetensors", "file", "no such file")


def test_unknown_format_version(tmp_path, arrays):
    t = raw_tensors(arrays)
    header = {"format": FORMAT_NAME, "format_version": "7", "meta": arrays.meta.to_json()}
    expect_error(save_raw(tmp_path / "b.safetensors", t, arrays.meta, header), "format_version", "1", "'7'")
    meta = json.loads(arrays.meta.to_json())
    meta["format_version"] = 2
    header = {"format": FORMAT_NAME, "format_version": "1", "meta": json.dumps(meta)}
    expect_error(save_raw(tmp_path / "c.safetensors", t, arrays.meta, header), "format_version", "2")


def test_bad_metadata(tmp_path, arrays):
    t = raw_tensors(arrays)
    expect_error(save_raw(tmp_path / "a.safetensors", t, dataclasses.replace(arrays.meta, router="magic")), "router", "softmax")
    expect_error(save_raw(tmp_path / "b.safetensors", t, dataclasses.replace(arrays.meta, top_k=9)), "top_k", "1..num_experts=8")
    header = {"format": FORMAT_NAME, "format_version": "1", "meta": "{not json"}
    expect_error(save_raw(tmp_path / "c.safetensors", t, arrays.meta, header), "metadata", "JSON")
    meta = json.loads(arrays.meta.to_json())
    del meta["num_experts"]
    header = {"format": FORMAT_NAME, "format_version": "1", "meta": json.dumps(meta)}
    expect_error(save_raw(tmp_path / "d.safetensors", t, arrays.meta, header), "num_experts", "metadata entry")


def test_missing_and_unknown_tensors(tmp_path, arrays):
    t = raw_tensors(arrays)
    del t["phase"]
    expect_error(save_raw(tmp_path / "a.safetensors", t, arrays.meta), "phase", "tensor in the file")
    t = raw_tensors(arrays)
    t["extra"] = torch.zeros(2)
    expect_error(save_raw(tmp_path / "b.safetensors", t, arrays.meta), "tensors", "unknown ['extra']")


def test_token_columns(tmp_path, arrays):
    t = raw_tensors(arrays)
    t["request_id"][11] = 0  # request 0 reappears after request 2
    expect_error(save_raw(tmp_path / "a.safetensors", t, arrays.meta), "request_id", "contiguous", "request 0")
    t = raw_tensors(arrays)
    t["position"][2] = 0
    expect_error(save_raw(tmp_path / "b.safetensors", t, arrays.meta), "position", "increasing", "rows 1-2")
    t = raw_tensors(arrays)
    t["phase"][6] = 2
    expect_error(save_raw(tmp_path / "c.safetensors", t, arrays.meta), "phase", "0 (prefill) or 1 (decode)", "2 at row 6")


def test_writer_refuses_bad_arrays(tmp_path, arrays):
    arrays.ids[0, 0, 1] = arrays.ids[0, 0, 0]
    with pytest.raises(TraceFormatError, match="repeated id"):
        write_trace(tmp_path / "t.safetensors", arrays)
    assert not (tmp_path / "t.safetensors").exists()
    a = small_arrays()
    a.arrival_s[1] = 5.0  # two arrival times inside request 0
    with pytest.raises(TraceFormatError, match="one arrival time per request"):
        write_trace(tmp_path / "u.safetensors", a)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_positioned_reads_equal_safetensors(tmp_path, dtype):
    """read_stored (positioned reads at the header's offsets) returns exactly what safetensors'
    own loader returns, for every tensor and random row ranges (empty, open-ended, whole)."""
    from safetensors.torch import load_file

    a = small_arrays(lengths=(7, 1, 30, 12))
    path = write_trace(tmp_path / "t.safetensors", a, float_dtype=dtype)
    ref = load_file(str(path))
    tr = open_trace(path)
    rng = np.random.default_rng(0)
    N = tr.num_tokens
    for name, full in ref.items():
        ranges = [(0, None), (N, N), (3, 3)] + [tuple(sorted(rng.integers(0, N + 1, 2))) for _ in range(10)]
        for lo, hi in ranges:
            got = tr.read_stored(name, lo, hi)
            assert got.dtype == full.dtype and torch.equal(got, full[lo:hi]), (name, lo, hi)


def test_file_truncated_after_opening(tmp_path):
    """A file cut short while open: the read names the file, the tensor and the missing bytes."""
    a = small_arrays(lengths=(20,) * 3)
    path = write_trace(tmp_path / "t.safetensors", a)
    from lynx_sim.traces.reader import data_layout

    tr = open_trace(path)
    data = path.read_bytes()
    path.write_bytes(data[: data_layout(path)["logits"][0] + 100])  # cut inside the logits
    with pytest.raises(TraceFormatError, match="logits.*truncated"):
        tr.read("logits")


def test_reads_are_row_ranges(tmp_path):
    """Reading one request touches its rows only: the read is the slice, not the whole tensor."""
    a = small_arrays(lengths=(50,) * 20)
    tr = open_trace(write_trace(tmp_path / "t.safetensors", a))
    part = tr.read("logits", 100, 150)
    assert part.shape == (50, 3, 8)
    np.testing.assert_allclose(part, a.logits[100:150], atol=4e-3)


def _rows(a, lo, hi):
    """Rows [lo, hi) of TraceArrays a (whole requests in the tests below)."""
    pick = lambda x: None if x is None else x[lo:hi]  # noqa: E731
    return dataclasses.replace(a, request_id=a.request_id[lo:hi], position=a.position[lo:hi], phase=a.phase[lo:hi],
                               ids=a.ids[lo:hi], weights=pick(a.weights), logits=pick(a.logits), arrival_s=pick(a.arrival_s))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_streamed_trace_equals_the_in_memory_one(tmp_path, dtype):
    """TraceWriter's parts laid out as one file: safetensors loads it, and every tensor equals
    what write_trace writes for the whole trace at once."""
    from safetensors.torch import load_file

    from lynx_sim.traces import TraceWriter

    a = small_arrays(lengths=(5, 3, 4, 7, 1))
    bounds = np.r_[0, np.cumsum((5, 3, 4, 7, 1))]
    whole = load_file(str(write_trace(tmp_path / "whole.safetensors", a, float_dtype=dtype)))
    with TraceWriter(tmp_path / "parts.safetensors", a.meta, float_dtype=dtype) as w:
        for lo, hi in ((0, 2), (2, 3), (3, 5)):  # parts of 2, 1 and 2 requests
            w.append(_rows(a, int(bounds[lo]), int(bounds[hi])))
    parts = load_file(str(tmp_path / "parts.safetensors"))
    assert set(parts) == set(whole)
    for name in whole:
        assert parts[name].dtype == whole[name].dtype and torch.equal(parts[name], whole[name]), name
    tr = open_trace(tmp_path / "parts.safetensors")
    assert tr.meta == a.meta and tr.num_requests == 5
    assert not list(tmp_path.glob(".trace-parts-*")), "spool files removed"


def test_streamed_writer_refuses_bad_parts(tmp_path):
    from lynx_sim.traces import TraceWriter

    a = small_arrays(lengths=(5, 3))
    w = TraceWriter(tmp_path / "t.safetensors", a.meta)
    w.append(_rows(a, 0, 5))
    with pytest.raises(ValueError, match="continue from an earlier part"):
        w.append(_rows(a, 0, 5))
    with pytest.raises(ValueError, match="same fields"):
        w.append(dataclasses.replace(_rows(a, 5, 8), logits=None))
    with pytest.raises(ValueError, match="no parts"):
        TraceWriter(tmp_path / "u.safetensors", a.meta).close()


# ---- integrity, bounds and resources: one test per reproducer of the corrupted-trace probe ----

def rewrite_meta(path, edit, rehash=True):
    """`path` with its metadata JSON edited by edit(dict); the metadata checksum recomputed when
    `rehash` (a producer's bug: the type check must name the field) or not (a corruption)."""
    import hashlib
    import struct

    b = path.read_bytes()
    (n,) = struct.unpack("<Q", b[:8])
    header = json.loads(b[8:8 + n])
    md = header["__metadata__"]
    meta = json.loads(md["meta"])
    edit(meta)
    md["meta"] = json.dumps(meta)
    if rehash:
        sums = json.loads(md["checksums"])
        sums["meta"] = hashlib.sha256(md["meta"].encode()).hexdigest()
        md["checksums"] = json.dumps(sums)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + b[8 + n:])
    return path


@pytest.mark.parametrize("field,value,fragment", [
    ("moe_layers", 5, "found 5 (integer)"), ("moe_layers", None, "found null"), ("n_group", "a", 'found "a" (string)'),
    ("ids_ordered", "false", 'found "false" (string)'), ("num_experts", 2 ** 31, "1..65536"),
    ("num_experts", True, "found true (boolean)"), ("top_k", 2.0, "found 2.0 (number)"), ("missing", ["logits"], "logits"),
    ("provenance", [1], "JSON object"), ("moe_layers", [0, 0, 1], "distinct")])
def test_metadata_of_the_wrong_type_is_named(tmp_path, arrays, field, value, fragment):
    path = rewrite_meta(write_trace(tmp_path / "t.safetensors", arrays), lambda m: m.__setitem__(field, value))
    expect_error(path, field, fragment)


def test_ids_ordered_string_is_refused_before_a_policy_sees_it(tmp_path, arrays):
    """`ids_ordered: "false"` is truthy in Python: sere would treat slot 0 as the top-1. Refused."""
    path = rewrite_meta(write_trace(tmp_path / "t.safetensors", arrays), lambda m: m.__setitem__("ids_ordered", "false"))
    expect_error(path, "ids_ordered", "true or false")


def test_a_flipped_data_byte_is_caught_by_the_checksum(tmp_path, arrays):
    from lynx_sim.traces.reader import data_layout

    path = write_trace(tmp_path / "t.safetensors", arrays)
    data = bytearray(path.read_bytes())
    offset = data_layout(path)["logits"][0]
    data[offset + 11] ^= 0x01  # a low mantissa bit: finite, in range, the routing checks cannot see it
    path.write_bytes(bytes(data))
    expect_error(path, "logits", "sha256", "corrupted")
    data[offset + 11] ^= 0x01
    data[data_layout(path)["ids"][0] + 1] ^= 0x40  # ids[0,0,0] += 16384: out of range AND a checksum mismatch
    path.write_bytes(bytes(data))
    msg = expect_error(path, "ids", "corrupted")
    assert "0..7" not in msg, "a corrupted byte is reported as corruption, not as the producer's bad id"
    tr = open_trace(path, verify=False)  # the skip flag: opens, trusts the data as it is
    assert not tr.verified and tr.read("ids")[0, 0, 0] >= 8


def test_header_dtype_lie_is_caught(tmp_path, arrays):
    """F16 -> BF16 keeps the byte count and the field table allows both: the checksum records it."""
    import struct

    path = write_trace(tmp_path / "t.safetensors", arrays)
    b = path.read_bytes()
    (n,) = struct.unpack("<Q", b[:8])
    header = json.loads(b[8:8 + n])
    header["logits"]["dtype"] = "BF16"
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + b[8 + n:])
    expect_error(path, "logits", "dtype F16", "BF16")


def test_content_hash(tmp_path):
    """Equal content, equal hash: both writers, any verify flag; different content, different hash."""
    from lynx_sim.traces import TraceWriter

    a = small_arrays(lengths=(5, 3, 4))
    h1 = open_trace(write_trace(tmp_path / "a.safetensors", a)).content_hash
    with TraceWriter(tmp_path / "b.safetensors", a.meta) as w:
        w.append(_rows(a, 0, 8))
        w.append(_rows(a, 8, 12))
    assert open_trace(tmp_path / "b.safetensors").content_hash == h1
    assert open_trace(tmp_path / "a.safetensors", verify=False).content_hash == h1
    assert len(h1) == 64 and int(h1, 16) >= 0
    b = small_arrays(lengths=(5, 3, 4))
    b.arrival_s = b.arrival_s + 1.0
    assert open_trace(write_trace(tmp_path / "c.safetensors", b)).content_hash != h1
    c = dataclasses.replace(a, meta=dataclasses.replace(a.meta, model="other"))
    assert open_trace(write_trace(tmp_path / "d.safetensors", c)).content_hash != h1


def test_file_without_checksums_is_refused_and_rehash_adds_them(tmp_path, arrays, capsys):
    from lynx_sim.traces.__main__ import main

    t = raw_tensors(arrays)
    old = save_raw(tmp_path / "old.safetensors", t, arrays.meta,
                   {"format": FORMAT_NAME, "format_version": "1", "meta": arrays.meta.to_json()})
    expect_error(old, "checksums", "rehash")
    assert main(["rehash", str(old), str(old)]) == 0  # in place
    tr = open_trace(old)
    assert tr.checksummed and tr.verified and tr.meta == arrays.meta
    np.testing.assert_array_equal(tr.read("ids"), arrays.ids)
    t["ids"][0, 0, 0] = 9  # a bad old file is not blessed with checksums
    bad = save_raw(tmp_path / "bad.safetensors", t, arrays.meta,
                   {"format": FORMAT_NAME, "format_version": "1", "meta": arrays.meta.to_json()})
    assert main(["rehash", str(bad), str(tmp_path / "new.safetensors")]) == 2
    assert "field 'ids'" in capsys.readouterr().err and not (tmp_path / "new.safetensors").exists()


def test_verify_false_opens_without_reading_the_routing_tensors(tmp_path, monkeypatch):
    from lynx_sim.traces.reader import Trace

    path = write_trace(tmp_path / "t.safetensors", small_arrays(lengths=(30,) * 4))
    read = []
    real = Trace.read_stored
    monkeypatch.setattr(Trace, "read_stored", lambda self, n, a=0, b=None: read.append(n) or real(self, n, a, b))
    Trace(path, verify=False)
    assert set(read) == {"request_id", "position", "phase", "arrival_s"}
    read.clear()
    Trace(path)
    assert {"ids", "weights", "logits"} <= set(read)


def test_slots_must_fall_when_ids_are_ordered(tmp_path):
    a = small_arrays()
    a.ids[4, 1] = a.ids[4, 1, ::-1].copy()
    a.weights[4, 1] = a.weights[4, 1, ::-1].copy()  # ids and weights agree, but slot 0 is not the top-1
    with pytest.raises(TraceFormatError, match=r"field 'ids_ordered'.*row 4, layer 1"):
        write_trace(tmp_path / "t.safetensors", a)
    a.meta = dataclasses.replace(a.meta, ids_ordered=False)
    open_trace(write_trace(tmp_path / "t.safetensors", a))  # honest metadata: fine
    t = raw_tensors(small_arrays())  # a producer with a bug wrote the file anyway: the reader refuses it
    t["weights"][2, 0] = t["weights"][2, 0].flip(0)
    expect_error(save_raw(tmp_path / "b.safetensors", t, small_arrays().meta), "ids_ordered", "falling weight", "row 2, layer 0")


def test_ids_must_be_the_top_k_of_the_stored_logits(tmp_path):
    a = small_arrays(logits=True)
    worst = np.argsort(a.logits[6, 2])[0]
    a.ids[6, 2, 1] = worst  # slot 1 on the expert with the lowest logit
    a.weights = None
    with pytest.raises(TraceFormatError, match=rf"field 'ids'.*left out for expert {worst}.*row 6, layer 2"):
        write_trace(tmp_path / "t.safetensors", a)
    t = raw_tensors(small_arrays())
    t["ids"][6, 2, 1] = int(worst)
    expect_error(save_raw(tmp_path / "b.safetensors", t, small_arrays().meta), "ids", "top-k of the stored logits", "row 6, layer 2")
    # the model's choice used a bias the trace lacks: no such check (the recorder's DeepSeek-V3)
    for meta in (dataclasses.replace(a.meta, router_bias=True, ids_ordered=False),
                 dataclasses.replace(a.meta, weights_kind="sigmoid scores (bias-corrected, group-limited choice)",
                                     ids_ordered=False)):
        open_trace(write_trace(tmp_path / "c.safetensors", dataclasses.replace(a, meta=meta)))


def test_ties_and_float16_rounding_are_allowed(tmp_path):
    a = small_arrays(E=8, k=2, L=1, lengths=(3,))
    a.weights = None
    a.logits[:] = np.array([0.5, 2.0, 2.0, -1, 0, 0, 0, 0.1], np.float32)  # experts 1 and 2 tie for the top
    a.ids[:] = [[[2, 1]]]
    open_trace(write_trace(tmp_path / "t.safetensors", a))
    a.logits[0, 0, 7] = 2.0 + 2e-3  # within 4 float16 eps (of 2.0) of the chosen: a tie at float16 precision
    open_trace(write_trace(tmp_path / "t.safetensors", a))
    a.logits[0, 0, 7] = 2.05  # clearly larger than a chosen expert's logit
    with pytest.raises(TraceFormatError, match=r"expert 7 \(logit 2.05\d*\) left out"):
        write_trace(tmp_path / "t.safetensors", a)
    open_trace(write_trace(tmp_path / "t.safetensors", dataclasses.replace(a, logits=a.logits * 0 + 1)))  # all tie


def test_grouped_router_ids_come_from_the_kept_groups(tmp_path):
    """grouped_topk (E=8 in 4 groups, 2 kept): the best two experts overall lie in one group, the
    router's top-2 are that group's best and the second group's best."""
    z = np.array([[[5.0, 4.9, 0, 0, 3.0, 0, 0, 0]]], np.float32)
    meta = TraceMeta(model="g", num_experts=8, top_k=2, moe_layers=(0,), router="grouped_topk", n_group=4, topk_group=2)
    base = dict(meta=meta, request_id=np.zeros(1, int), position=np.zeros(1, int), phase=np.zeros(1, int), logits=z)
    from lynx_sim.traces import TraceArrays

    open_trace(write_trace(tmp_path / "t.safetensors", TraceArrays(ids=np.array([[[0, 1]]]), **base)))
    bad = TraceArrays(ids=np.array([[[0, 4]]]), **base)  # skips expert 1 of a kept group
    with pytest.raises(TraceFormatError, match=r"expert 1 \(logit 4.89\d*\) left out for expert 4"):
        write_trace(tmp_path / "u.safetensors", bad)
    meta1 = dataclasses.replace(meta, topk_group=1)
    bad = TraceArrays(ids=np.array([[[0, 4]]]), **{**base, "meta": meta1})  # expert 4's group is not kept
    with pytest.raises(TraceFormatError, match="expert 4 of group 2"):
        write_trace(tmp_path / "v.safetensors", bad)


def test_writer_refuses_float_ids_and_columns(tmp_path, arrays):
    for name, value in (("ids", arrays.ids.astype(np.float32)), ("request_id", arrays.request_id.astype(float)),
                        ("position", arrays.position + 0.5)):
        with pytest.raises(TraceFormatError, match=rf"field '{name}': expected an integer dtype"):
            write_trace(tmp_path / "t.safetensors", dataclasses.replace(arrays, **{name: value}))
    assert list(tmp_path.iterdir()) == []


def test_files_honour_the_umask(tmp_path):
    from lynx_sim.traces import TraceWriter

    a = small_arrays()
    old = os.umask(0o027)
    try:
        write_trace(tmp_path / "a.safetensors", a)
        with TraceWriter(tmp_path / "b.safetensors", a.meta) as w:
            w.append(a)
        os.umask(0o002)
        write_trace(tmp_path / "c.safetensors", a)
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == {"a.safetensors": 0o640, "b.safetensors": 0o640, "c.safetensors": 0o664}


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, OSError(28, "No space left on device")])
def test_no_leftovers_after_an_exception_mid_write(tmp_path, monkeypatch, interrupt):
    from lynx_sim.traces import TraceWriter

    a = small_arrays()
    write_trace(tmp_path / "keep.safetensors", a)
    before = (tmp_path / "keep.safetensors").read_bytes()

    def fail(fd):
        raise interrupt

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(type(interrupt) if isinstance(interrupt, BaseException) else interrupt) as ei:
        write_trace(tmp_path / "keep.safetensors", small_arrays(seed=1))
    if isinstance(interrupt, OSError):
        assert "keep.safetensors" in str(ei.value) and ei.value.errno == 28
    with pytest.raises(type(interrupt) if isinstance(interrupt, BaseException) else interrupt):
        with TraceWriter(tmp_path / "w.safetensors", a.meta) as w:
            w.append(a)
    monkeypatch.undo()
    with pytest.raises(RuntimeError):
        with TraceWriter(tmp_path / "x.safetensors", a.meta) as w:
            w.append(a)
            raise RuntimeError("the producer failed between parts")
    w = TraceWriter(tmp_path / "y.safetensors", a.meta)  # never closed: removed when garbage collected
    w.append(a)
    del w
    import gc

    gc.collect()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.safetensors"]
    assert (tmp_path / "keep.safetensors").read_bytes() == before, "a failed write leaves the old file as it was"


def test_sigterm_mid_write_leaves_nothing(tmp_path):
    """A `synth` killed (SIGTERM) while its file is being written: exit 143, no temporary left."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    flag = tmp_path / "writing"
    script = f"""
import os, sys, time
import lynx_sim.traces.writer  # noqa
def slow(fd):
    open({str(flag)!r}, "w").close()
    time.sleep(60)
os.fsync = slow
from lynx_sim.traces.__main__ import main
sys.exit(main(["synth", "--model", "mixtral_8x7b", "--requests", "2", "--set", "output_tokens.max=8",
               "--set", "output_tokens.min=4", "--set", "prompt_tokens.max=4", "--set", "prompt_tokens.min=2",
               {str(out / 'syn.safetensors')!r}]))
"""
    p = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not flag.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert flag.exists(), p.stderr.read() if p.poll() is not None else "never started writing"
    assert [q.name for q in out.iterdir()] == [f"syn.safetensors.partial-{p.pid}"]
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=30) == 128 + signal.SIGTERM
    assert list(out.iterdir()) == []


def test_os_errors_name_the_file(tmp_path, monkeypatch, arrays):
    path = write_trace(tmp_path / "t.safetensors", arrays)
    real_open = os.open

    def denied(p, *a, **k):
        if str(p).endswith(".safetensors") or ".partial-" in str(p):
            raise PermissionError(13, "Permission denied", str(p))
        return real_open(p, *a, **k)

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(PermissionError, match=r"Permission denied: '.*t\.safetensors'"):
        open_trace(path)
    with pytest.raises(PermissionError, match=r"Permission denied: '.*u\.safetensors'") as ei:
        write_trace(tmp_path / "u.safetensors", arrays)  # a read-only destination
    assert ".partial" not in str(ei.value)
    monkeypatch.undo()
    long = tmp_path / ("x" * 300 + ".safetensors")
    with pytest.raises(OSError, match="File name too long") as ei:
        write_trace(long, arrays)
    assert ei.value.errno == 36 and ei.value.filename == str(long)
    with pytest.raises(OSError, match="File name too long"):
        open_trace(long)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.safetensors"]


def test_trace_larger_than_memory_opens_with_flat_memory(tmp_path):
    """A sparse 64 GiB trace (valid header and token columns, the logits a hole) opens with
    verify=False and reads its last row, under an address-space limit far below the file's size
    (so no memory map of it can exist), with a resident size of a few hundred MB. safetensors'
    safe_open, which the reader used before, fails on the same file under the same limit."""
    import hashlib
    import subprocess
    import sys

    from lynx_sim.traces.writer import file_header

    N, L, E, k = 16384, 64, 32767, 2
    meta = TraceMeta(model="huge", num_experts=E, top_k=k, moe_layers=tuple(range(L)))
    small = {"request_id": np.zeros(N, np.int32), "position": np.arange(N, dtype=np.int32),
             "phase": np.r_[0, np.ones(N - 1)].astype(np.int8),
             "ids": np.broadcast_to(np.arange(k, dtype=np.int16), (N, L, k)).copy()}
    layout = [(n, {"int32": "I32", "int8": "I8", "int16": "I16"}[str(v.dtype)], v.shape, v.nbytes,
               hashlib.sha256(v.tobytes()).hexdigest()) for n, v in small.items()]
    layout.append(("logits", "F16", (N, L, E), N * L * E * 2, "0" * 64))  # a claim: verify=False trusts it
    path = tmp_path / "huge.safetensors"
    with open(path, "wb") as f:
        f.write(file_header(meta, layout))
        for v in small.values():
            f.write(v.tobytes())
        size = f.tell() + N * L * E * 2
    os.truncate(path, size)
    assert size > 64 * 2 ** 30 - 2 ** 24 and os.stat(path).st_blocks * 512 < 2 ** 26  # sparse on disk
    script = f"""
import json, resource
from lynx_sim.traces.reader import Trace
vm = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
limit = vm + (4 << 30)
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
t = Trace({str(path)!r}, verify=False)
row = t.read("logits", {N - 1}, {N})
ids = t.read("ids", {N - 1}, {N})
try:
    from safetensors import safe_open
    safe_open({str(path)!r}, framework="pt")
    old = "opened"
except Exception as e:
    old = str(e)
print(json.dumps({{"limit": limit, "rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "shape": list(row.shape), "zeros": float(abs(row).sum()) == 0.0, "ids": ids[0, 0].tolist(),
                  "tokens": t.num_tokens, "safe_open": old}}))
"""
    try:
        p = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    finally:
        path.unlink()  # 64 GiB apparent size: do not leave it to pytest's kept temporary folders
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["limit"] < size / 4 and r["shape"] == [1, L, E] and r["zeros"] and r["ids"] == [0, 1] and r["tokens"] == N
    assert r["rss_kb"] < 1.5 * 2 ** 20, r
    assert "Cannot allocate memory" in r["safe_open"] or "mmap" in r["safe_open"], r["safe_open"]


def test_layout_is_checked_even_without_verification(tmp_path, arrays):
    """Offsets that overlap, leave a gap or run past the end are refused by name at open, with
    verify=False too (the checksums would catch them, but are not read then)."""
    import struct

    path = write_trace(tmp_path / "t.safetensors", arrays)
    b = path.read_bytes()
    (n,) = struct.unpack("<Q", b[:8])
    for shift, field in ((-2, "ids"), (2, "ids")):
        header = json.loads(b[8:8 + n])
        lo, hi = header["ids"]["data_offsets"]
        header["ids"]["data_offsets"] = [lo + shift, hi + shift]
        blob = json.dumps(header).encode()
        blob += b" " * (-len(blob) % 8)
        bad = tmp_path / f"shift{shift}.safetensors"
        bad.write_bytes(struct.pack("<Q", len(blob)) + blob + b[8 + n:])
        with pytest.raises(TraceFormatError, match=r"field '(ids|logits|phase|position|request_id|weights|arrival_s)'"
                                                   r": expected data from byte"):
            open_trace(bad, verify=False)


def test_data_layout_names_a_dtype_it_cannot_read(tmp_path, arrays):
    """A tensor stored in a dtype the reader has no torch type for (safetensors' U32 here) is named,
    not mapped to None for a later TypeError."""
    import json
    import struct

    from lynx_sim.traces.reader import data_layout

    path = write_trace(tmp_path / "t.safetensors", arrays)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header["position"]["dtype"] = "U32"  # the same width as its I32: a consistent layout, an unreadable dtype
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    bad = tmp_path / "u16.safetensors"
    bad.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])
    with pytest.raises(TraceFormatError, match="position"):
        data_layout(bad)
