"""The native trace format: round trip, and a clear error for every kind of bad file."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import small_arrays
from lynx_sim.traces import TraceFormatError, open_trace, write_trace
from lynx_sim.traces.format import FORMAT_NAME


def raw_tensors(a):
    """The tensors write_trace would store, for tampering with."""
    t = {"request_id": torch.from_numpy(a.request_id.astype(np.int32)), "position": torch.from_numpy(a.position.astype(np.int32)),
         "phase": torch.from_numpy(a.phase.astype(np.int8)), "ids": torch.from_numpy(a.ids.astype(np.int16)),
         "weights": torch.from_numpy(a.weights).half(), "logits": torch.from_numpy(a.logits).half()}
    return t


def save_raw(path, tensors, meta, header=None):
    header = header or {"format": FORMAT_NAME, "format_version": "1", "meta": meta.to_json()}
    save_file(tensors, str(path), metadata=header)
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
