"""`python -m lynx_sim.traces`: convert and describe the three reference traces."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import reference_trace
from lynx_sim.traces import open_trace
from lynx_sim.traces.__main__ import main
from lynx_sim.traces.convert import reference_to_arrays

# ../shared/traces/README.md, "What they show"
EXPECTED = {
    "mixtral": dict(E=8, k=2, L=32, N=577, R=4, used="decode", union={"1": 0.25, "8": 0.88, "16": 0.98},
                    overlap=0.37, cv=0.2, top1=0.71, missing={"logits", "arrival_s", "prompt_tokens"}),
    "deepseek": dict(E=64, k=6, L=26, N=192023, R=1999, used="all", union={"1": 0.09, "8": 0.51, "16": 0.74, "32": 0.91},
                     overlap=0.26, cv=0.2, top1=None, missing={"logits", "arrival_s", "weights"}),
    "llama4": dict(E=128, k=1, L=24, N=34517, R=235, used="decode", union={"8": 0.05, "16": 0.09, "64": 0.24},
                   overlap=None, cv=2.0, top1=None, missing={"logits", "arrival_s", "weights"}),
}


@pytest.mark.shared
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_convert_and_stats(tmp_path, capsys, name):
    exp = EXPECTED[name]
    src = reference_trace(name)
    dst = tmp_path / f"{name}.safetensors"
    assert main(["convert", str(src), str(dst)]) == 0
    tr = open_trace(dst)
    m = tr.meta
    assert (m.num_experts, m.top_k, m.num_layers, tr.num_tokens, tr.num_requests) == (exp["E"], exp["k"], exp["L"], exp["N"], exp["R"])
    assert set(m.missing) == exp["missing"]
    raw = np.load(src, allow_pickle=False)
    np.testing.assert_array_equal(tr.read("ids"), raw["ids"])
    capsys.readouterr()
    png = tmp_path / "stats.png"
    assert main(["stats", str(dst), "--json", "--draws", "200", "--plot", str(png)]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["tokens_used"] == exp["used"] and png.stat().st_size > 10_000
    for B, v in exp["union"].items():
        assert s["union_fraction"][B] == pytest.approx(v, abs=0.015), B
    assert set(s["union_fraction"]) == {"1", "2", "4", "8", "16", "32", "64", "128"}
    if exp["overlap"] is not None:
        assert s["adjacent_overlap"]["mean"] == pytest.approx(exp["overlap"], abs=0.01)
    assert s["load_cv"]["median"] == pytest.approx(exp["cv"], rel=0.25)
    assert len(s["load_cv"]["per_layer"]) == exp["L"]
    if exp["top1"] is not None:
        assert s["top1_weight_mean"] == pytest.approx(exp["top1"], abs=0.01)
    else:
        assert "top1_weight_mean" not in s


@pytest.mark.shared
def test_stats_reads_reference_npz_directly(capsys):
    assert main(["stats", str(reference_trace("mixtral")), "--draws", "200"]) == 0
    out = capsys.readouterr().out
    assert "union fraction" in out and "top-1 weight share mean 0.70" in out


def test_bad_reference_file_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.npz"
    np.savez(bad, ids=np.zeros((3, 2, 1), dtype=np.int16))
    assert main(["convert", str(bad), str(tmp_path / "out.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "bad.npz" in err and "seq_offsets" in err
    obj = tmp_path / "pickled.npz"
    np.savez(obj, ids=np.array([{"a": 1}], dtype=object))
    with pytest.raises(Exception, match="pickled|unreadable"):
        reference_to_arrays(obj)
    assert main(["stats", str(tmp_path / "nothing.safetensors")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_unknown_model_needs_router_settings(tmp_path):
    path = tmp_path / "x.npz"
    ids = np.array([[[0, 1]], [[1, 2]]], dtype=np.int16)
    meta = json.dumps({"model": "acme/Unknown-MoE", "num_experts": 4, "top_k": 2})
    np.savez(path, ids=ids, seq_offsets=np.array([0, 2]), phase=np.ones(2, np.int8), layers=np.array([0], np.int16), meta=np.array(meta))
    with pytest.raises(ValueError, match="--router"):
        reference_to_arrays(path)
    a = reference_to_arrays(path, router="softmax", renormalize=False)
    assert a.meta.router == "softmax" and not a.meta.renormalize and not a.meta.ids_ordered


def test_synth_cli_writes_a_self_consistent_trace(tmp_path, capsys):
    """ids and weights are the router's choice on the logits as stored (float16), not before rounding."""
    import torch

    from lynx_sim.routing import RouterSpec, route

    dst = tmp_path / "s.safetensors"
    assert main(["synth", "--model", "qwen3_30b_a3b", "--requests", "2", "--set", "output_tokens.max=20",
                 "--set", "output_tokens.min=10", "--set", "prompt_tokens.max=8", "--set", "prompt_tokens.min=4", str(dst)]) == 0
    tr = open_trace(dst)
    ids, w = route(torch.from_numpy(tr.read("logits")), RouterSpec(128, 8))
    assert torch.equal(ids, torch.from_numpy(tr.read("ids")))
    torch.testing.assert_close(w, torch.from_numpy(tr.read("weights")), atol=1e-3, rtol=1e-3)
    assert main(["synth", "--model", "nonexistent", str(dst)]) == 2
    assert "expected one of" in capsys.readouterr().err
    assert main(["synth", "--requests", "0", str(dst)]) == 2
    assert "--requests" in capsys.readouterr().err


def _reference_npz(path, **change):
    """A small valid archive of the reference schema, with `change` applied (None removes)."""
    from conftest import small_arrays

    a = small_arrays(seed=5, lengths=(6, 4, 5))
    meta = {"model": "mistralai/Mixtral-8x7B-Instruct-v0.1", "num_experts": 8, "top_k": 2}
    arrays = {"ids": a.ids.astype(np.int16), "weights": a.weights.astype(np.float16), "seq_offsets": np.array([0, 6, 10, 15]),
              "phase": np.ones(15, np.int8), "layers": np.array([0, 1, 2], np.int16), "meta": np.array(json.dumps(meta))}
    for k, v in change.items():
        arrays.pop(k) if v is None else arrays.__setitem__(k, v)
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("case,field", [
    ("no num_experts", "meta.num_experts"), ("num_experts 'eight'", "meta.num_experts"), ("meta a list", "meta"),
    ("meta a number", "meta"), ("empty seq_offsets", "seq_offsets"), ("float ids", "ids"), ("float offsets", "seq_offsets"),
    (".npy renamed", "file"), ("corrupted member", "ids")])
def test_convert_names_every_malformed_archive(tmp_path, capsys, case, field):
    src = tmp_path / "ref.npz"
    meta = lambda **kw: np.array(json.dumps({"model": "mistralai/Mixtral-8x7B", "num_experts": 8, "top_k": 2, **kw}))  # noqa: E731
    if case == "no num_experts":
        _reference_npz(src, meta=np.array(json.dumps({"model": "mistralai/Mixtral-8x7B", "top_k": 2})))
    elif case == "num_experts 'eight'":
        _reference_npz(src, meta=meta(num_experts="eight"))
    elif case == "meta a list":
        _reference_npz(src, meta=np.array("[8, 2]"))
    elif case == "meta a number":
        _reference_npz(src, meta=np.array("8"))
    elif case == "empty seq_offsets":
        _reference_npz(src, seq_offsets=np.array([], np.int64))
    elif case == "float ids":
        _reference_npz(src, ids=np.full((15, 3, 2), 1.7, np.float32))
    elif case == "float offsets":
        _reference_npz(src, seq_offsets=np.array([0, 6.5, 10, 15]))
    elif case == ".npy renamed":
        np.save(tmp_path / "x.npy", np.zeros(3))
        (tmp_path / "x.npy").rename(src)
    else:
        _reference_npz(src)
        data = bytearray(src.read_bytes())
        data[data.index(b"ids.npy") + 200] ^= 0xFF  # a byte of the stored ids member: its CRC fails
        src.write_bytes(bytes(data))
    dst = tmp_path / "out.safetensors"
    assert main(["convert", str(src), str(dst)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {src}: field '{field}': expected "), err
    assert not dst.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["ref.npz"]


def test_convert_os_errors_are_one_line_naming_the_path(tmp_path, capsys, monkeypatch):
    import os

    src = _reference_npz(tmp_path / "ref.npz")
    long_src = tmp_path / ("r" * 300 + ".npz")
    assert main(["convert", str(long_src), str(tmp_path / "o.safetensors")]) == 2
    assert "File name too long" in capsys.readouterr().err
    long_dst = tmp_path / ("o" * 300 + ".safetensors")
    assert main(["convert", str(src), str(long_dst)]) == 2
    err = capsys.readouterr().err
    assert "File name too long" in err and str(long_dst) in err and len(err.strip().splitlines()) == 1
    real = os.open
    monkeypatch.setattr(os, "open", lambda p, *a, **k: (_ for _ in ()).throw(PermissionError(13, "Permission denied", str(p)))
                        if ".partial-" in str(p) else real(p, *a, **k))  # a read-only destination folder
    dst = tmp_path / "ro" / "out.safetensors"
    assert main(["convert", str(src), str(dst)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: [Errno 13] Permission denied: '{dst}'"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.npz", "ro"] and not list((tmp_path / "ro").iterdir())


@pytest.mark.parametrize("num_experts", [2 ** 20, 2 ** 31])
def test_stats_refuses_an_absurd_expert_count_at_once(tmp_path, capsys, num_experts):
    """num_experts edited to 2^20 in a small trace made `stats` run 3 minutes at 1.9 GB (2^31: a
    MemoryError). The bound on num_experts refuses it before any statistic runs."""
    import time

    from conftest import small_arrays
    from test_format import rewrite_meta

    from lynx_sim.traces import write_trace

    a = small_arrays(logits=False)
    path = rewrite_meta(write_trace(tmp_path / "t.safetensors", a), lambda m: m.__setitem__("num_experts", num_experts))
    t0 = time.perf_counter()
    assert main(["stats", str(path)]) == 2
    assert time.perf_counter() - t0 < 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {path}: field 'num_experts': expected an integer in 1..65536, found {num_experts}")


def test_stats_memory_stays_bounded_at_the_largest_sizes_allowed(tmp_path):
    """E = 65536, k = 256 (the bounds) in a 2-token trace: statistics in bounded memory and time."""
    import time

    from lynx_sim.traces import TraceArrays, TraceMeta, write_trace
    from lynx_sim.traces.stats import trace_stats

    meta = TraceMeta(model="big", num_experts=65536, top_k=256, moe_layers=(0, 1))
    rng = np.random.default_rng(0)
    ids = np.stack([np.stack([rng.permutation(65536)[:256] for _ in range(2)]) for _ in range(4)])
    a = TraceArrays(meta=meta, request_id=np.array([0, 0, 1, 1]), position=np.array([0, 1, 0, 1]), phase=np.ones(4, int), ids=ids)
    from lynx_sim.traces import open_trace

    t0 = time.perf_counter()
    s = trace_stats(open_trace(write_trace(tmp_path / "t.safetensors", a)), draws=50)
    assert time.perf_counter() - t0 < 10 and s["num_experts"] == 65536
