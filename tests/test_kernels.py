"""Triton MoE kernels against float64 references, on fresh random inputs.

On the CPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py) at small shapes; with
LYNX_KERNELS_ON_GPU=1 on a CUDA machine the same tests run the compiled kernels. Outputs and
workspaces are poisoned with NaN first, so an element a kernel fails to write fails the test.
Cases: batch 1, an expert with no tokens, all tokens on one expert, experts repeated across
tokens, k = 1 and k = 8, non-power-of-two sizes, dropped slots, several experts' runs longer
than one block, and a larger batch.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from kernels import MoEConfig, align_block_size, fused_moe, moe_reference
from kernels.align import max_rows
from kernels.configs import LayerShape, bucket, heuristic, load_table, select_config, table_path

DEVICE = "cuda" if os.environ.get("LYNX_KERNELS_ON_GPU") == "1" else "cpu"
TOL = {torch.float16: 4e-3, torch.bfloat16: 3e-2}  # of the output's largest magnitude


def routing(g, T, E, k, kind="random", drop=0.0):
    """ids [T, k] distinct per token, and positive weights; `kind` shapes the expert choice."""
    if kind == "one_expert":  # every token's first slot on expert 0
        ids = torch.stack([torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.randperm(E - 1, generator=g)[:k - 1]])
                           for _ in range(T)])
    elif kind == "skip_last":  # expert E - 1 gets nothing
        ids = torch.stack([torch.randperm(E - 1, generator=g)[:k] for _ in range(T)])
    else:
        ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    w = torch.rand(T, k, generator=g) + 0.05
    if drop and k > 1:
        d = torch.rand(T, k, generator=g) < drop
        d[:, 0] = False
        ids[d], w[d] = -1, 0.0
    return ids, w


def layer(g, E, H, I, dtype):
    """w1 [E, 2I, H] (gate rows, then up rows) and w2 [E, H, I], scaled to unit outputs."""
    w1 = (torch.randn(E, 2 * I, H, generator=g) / H ** 0.5).to(dtype)
    w2 = (torch.randn(E, H, I, generator=g) / I ** 0.5).to(dtype)
    return w1, w2


CASES = [  # (T, E, H, I, k, kind, drop, config)
    (1, 8, 48, 40, 2, "random", 0.0, MoEConfig(16, 16, 16, 4, 1)),  # batch 1
    (6, 8, 48, 40, 2, "skip_last", 0.0, MoEConfig(16, 32, 16, 4, 1)),  # an expert with no tokens
    (20, 6, 40, 24, 2, "one_expert", 0.0, MoEConfig(4, 16, 16, 4, 1)),  # all on one expert, runs > 1 block
    (9, 5, 24, 56, 1, "random", 0.0, MoEConfig(2, 16, 8, 4, 1)),  # k = 1, repeated experts
    (5, 12, 36, 20, 8, "random", 0.3, MoEConfig(8, 16, 16, 4, 1)),  # k = 8, dropped slots
    (64, 4, 32, 16, 2, "random", 0.0, MoEConfig(16, 16, 32, 4, 1)),  # a larger batch
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_fused_moe_matches_float64_reference(case, dtype):
    T, E, H, I, k, kind, drop, cfg = CASES[case]
    g = torch.Generator().manual_seed(1000 + case)
    x = torch.randn(T, H, generator=g).to(dtype)
    w1, w2 = layer(g, E, H, I, dtype)
    ids, w = routing(g, T, E, k, kind, drop)
    unused = sorted(set(range(E)) - set(ids[ids >= 0].tolist()))
    for e in unused:  # an unused expert's weights must never enter the result
        w1[e], w2[e] = float("nan"), float("inf")
    ref = moe_reference(x, w1, w2, ids, w)
    ws = {"h": torch.full((T * k, I), float("nan"), dtype=dtype, device=DEVICE),
          "y": torch.full((T * k, H), float("nan"), dtype=torch.float32, device=DEVICE)}
    out = torch.full((T, H), float("nan"), dtype=dtype, device=DEVICE)
    d = lambda t: t.to(DEVICE)  # noqa: E731
    got = fused_moe(d(x), d(w1), d(w2), d(ids), d(w), config=cfg, out=out, workspace=ws).cpu()
    assert got is not None and torch.isfinite(got).all(), "an output element was not written (or NaN leaked in)"
    err = (got.double() - ref).abs().max().item()
    assert err <= TOL[dtype] * ref.abs().max().item(), (err, ref.abs().max().item())
    if kind == "skip_last":
        assert E - 1 in unused


def test_fused_moe_default_config_and_fresh_buffers():
    g = torch.Generator().manual_seed(7)
    T, E, H, I, k = 3, 4, 32, 16, 2
    x = torch.randn(T, H, generator=g).half()
    w1, w2 = layer(g, E, H, I, torch.float16)
    ids, w = routing(g, T, E, k)
    got = fused_moe(x.to(DEVICE), w1.to(DEVICE), w2.to(DEVICE), ids.to(DEVICE), w.to(DEVICE)).cpu()
    ref = moe_reference(x, w1, w2, ids, w)
    assert got.dtype == torch.float16 and (got.double() - ref).abs().max() <= 4e-3 * ref.abs().max()


@pytest.mark.parametrize("fused", [True, False], ids=["triton", "torch"])
@pytest.mark.parametrize("seed", range(6))
def test_align_layout(seed, fused):
    """Every live pair appears once, in its expert's run, in pair order; runs are padded to the
    block; empty experts own no block; blocks past the end are marked -1 (both align paths)."""
    g = torch.Generator().manual_seed(seed)
    T, E, k = int(torch.randint(1, 40, (1,), generator=g)), int(torch.randint(2, 20, (1,), generator=g)), 0
    k = int(torch.randint(1, min(E, 8) + 1, (1,), generator=g))
    bm = (1, 2, 4, 16, 64)[seed % 5]
    ids, _ = routing(g, T, E, k, drop=0.3)
    al = align_block_size(ids.to(DEVICE), E, bm, fused=fused)
    al.sorted_pairs, al.block_expert, al.num_padded = al.sorted_pairs.cpu(), al.block_expert.cpu(), al.num_padded.cpu()
    P = T * k
    flat = ids.reshape(-1)
    sp, be, n = al.sorted_pairs.long(), al.block_expert.long(), int(al.num_padded)
    assert sp.numel() == max_rows(P, E, bm) and be.numel() == sp.numel() // bm
    counts = torch.bincount(flat[flat >= 0], minlength=E)
    assert n == int(((counts + bm - 1) // bm * bm).sum())
    live = sp[:n][sp[:n] < P]
    assert sorted(live.tolist()) == torch.nonzero(flat >= 0).flatten().tolist()  # each live pair once
    assert (sp[n:] == P).all()
    for b in range(be.numel()):
        rows = sp[b * bm:(b + 1) * bm]
        if b * bm >= n:
            assert be[b] == -1
            continue
        real = rows[rows < P]
        assert real.numel() > 0 and (flat[real] == be[b]).all()
    for e in range(E):  # pair order inside an expert; no block for an expert without pairs
        run = sp[:n][(sp[:n] < P)]
        mine = run[flat[run] == e]
        assert mine.tolist() == sorted(mine.tolist())
        assert (counts[e] == 0) == (not (be == e).any())


@pytest.mark.slow  # ~19 s
def test_fused_align_equals_the_torch_align():
    """The one-program Triton align and the torch ops give the same layout, bit for bit, on
    random routings with dropped slots, every block size, up to the fused kernel's limit."""
    from kernels.align import MAX_FUSED_PAIRS

    g = torch.Generator().manual_seed(3)
    for trial in range(24):
        T = int(torch.randint(1, 60, (1,), generator=g)) if trial < 22 else MAX_FUSED_PAIRS // 8
        E = int(torch.randint(2, 300, (1,), generator=g)) if trial % 3 else 256
        k = int(torch.randint(1, min(E, 8) + 1, (1,), generator=g)) if trial < 22 else 8
        ids, _ = routing(g, T, E, k, drop=0.3)
        bm = (1, 2, 4, 16, 64, 128)[trial % 6]
        a = align_block_size(ids, E, bm, fused=False)
        b = align_block_size(ids.to(DEVICE), E, bm, fused=True)
        for f in ("sorted_pairs", "block_expert", "num_padded"):
            assert torch.equal(getattr(a, f), getattr(b, f).cpu()), (trial, f)
    with pytest.raises(ValueError, match="up to"):
        align_block_size(torch.zeros(MAX_FUSED_PAIRS + 1, 1, dtype=torch.long), 4, 16, fused=True)


def test_bad_inputs_are_named():
    x = torch.zeros(2, 8, dtype=torch.float16)
    w1, w2 = torch.zeros(3, 12, 8, dtype=torch.float16), torch.zeros(3, 8, 6, dtype=torch.float16)
    ids, w = torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 2)
    with pytest.raises(ValueError, match="w1: expected"):
        fused_moe(x, w1[:, :11], w2, ids, w)
    with pytest.raises(ValueError, match="dtypes"):
        fused_moe(x.float(), w1, w2, ids, w)
    with pytest.raises(ValueError, match="topk_ids and topk_weights"):
        fused_moe(x, w1, w2, ids[:1], w)
    with pytest.raises(ValueError, match="block_m: expected a power of two"):
        align_block_size(ids, 3, 12)


def test_config_table(tmp_path, monkeypatch):
    """Tuned tables are keyed on (tokens, distinct experts): the nearest entry within one power
    of two on both axes; the heuristic elsewhere; bad files named with the entry at fault."""
    assert [bucket(x) for x in (0.5, 1, 3, 16, 17, 10**6)] == [1, 1, 4, 16, 32, 65536]
    assert heuristic(2).block_m == 16 and heuristic(500).block_m == 128
    monkeypatch.setattr("kernels.configs.TABLE_DIR", tmp_path)
    dev, shape = "NVIDIA H100 80GB HBM3", LayerShape(8, 2, 4096, 14336)
    path = table_path(dev, "bfloat16", shape)
    a, b, c = MoEConfig(16, 128, 64, 4, 5), MoEConfig(16, 64, 64, 8, 3), MoEConfig(64, 64, 64, 8, 3)
    path.write_text(json.dumps({"entries": [{"tokens": 16, "distinct": 8, "config": a.as_dict()},
                                            {"tokens": 16, "distinct": 2, "config": b.as_dict()},
                                            {"tokens": 256, "distinct": 8, "config": c.as_dict()}]}))
    assert select_config(16, 8, shape, dev) == a
    assert select_config(16, 2, shape, dev) == b  # same tokens, fewer experts: another entry
    assert select_config(12, 7, shape, dev) == a  # buckets (16, 8)
    assert select_config(32, 3, shape, dev) == b  # one bucket away on both axes: nearest by sum
    assert select_config(300, 8, shape, dev) == c
    assert select_config(8192, 8, shape, dev) == heuristic(8192 * 2 / 8)  # prefill: far from every entry
    assert select_config(64, 8, shape, dev) == heuristic(16)  # two buckets from both 16 and 256
    assert select_config(16, 8, shape, "other GPU") == heuristic(4)
    assert select_config(16, 8, LayerShape(8, 1, 4096, 14336), dev) == heuristic(2)  # another shape: no table
    assert select_config(16, 8, shape, "", pairs=20) == heuristic(20 / 8)  # dropped slots: live pairs
    for bad, msg in (("{not json", "not a tuned MoE config table"), ('{"entries": []}', "no 'entries'"),
                     ('{"entries": [{"tokens": 12, "distinct": 8, "config": {}}]}', r"entries\[0\]: tokens and distinct"),
                     ('{"entries": [{"tokens": 16, "distinct": 8, "config": {"block_m": 16}}]}', r"entries\[0\]: config")):
        path.write_text(bad)
        with pytest.raises(ValueError, match=msg):
            load_table(path)


def test_kernel_benchmark_script_runs(tmp_path):
    """benchmarks/kernels.py --cpu: every path of the GPU benchmark (ours, the torch loop,
    torch._grouped_mm where present, Lynx routing, the reference checks) at tiny sizes."""
    import subprocess
    import sys

    from conftest import ROOT

    out = tmp_path / "k.json"
    r = subprocess.run([sys.executable, "benchmarks/kernels.py", "--cpu", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["interpreted"] and len(data["decode"]) == 6 and len(data["lynx_routing"]) == 6
    assert all(row["ours_us"] > 0 and row["distinct"] >= 1 for row in data["decode"])
    if hasattr(torch, "_grouped_mm"):
        assert all(isinstance(row["grouped_mm_us"], float) and row["grouped_mm_timing"] == "cpu_check"
                   for row in data["decode"])


def test_tuning_writes_a_table_the_kernels_read(tmp_path):
    """benchmarks/kernels.py --tune (CPU check mode, two candidates): a table per shape that
    kernels/configs.py loads."""
    import subprocess
    import sys

    from conftest import ROOT

    r = subprocess.run([sys.executable, "benchmarks/kernels.py", "--cpu", "--tune", "--candidates", "2",
                        "--tune-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    paths = sorted(tmp_path.glob("*.json"))
    assert [p.name.split("_E")[1] for p in paths] == ["128_k8_H64_I32.json", "64_k6_H64_I32.json", "8_k2_H64_I32.json"]
    for path in paths:  # one per shape (E, k differ), keyed by the two decode batches of the check mode
        table = load_table(path)
        assert {t for t, _ in table} == {1, 2} and all(isinstance(c, MoEConfig) for c in table.values())
