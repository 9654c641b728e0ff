"""The steady decode replay streams each slot's request a block of rows at a time
(lynx_sim/engine/replay.py, lynx_sim/traces/source.py: RowStream): its batches, admissions and
random offsets equal a replay of whole requests stepped one at a time, across window edges and
block edges, for file and synthetic traces; the rows the slots hold stay within batch x block
rows; a request streamed to its end hashes as the whole request does."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch

from conftest import compose_cfg, small_arrays
from lynx_sim.engine.replay import ClosedLoopReplay
from lynx_sim.model import ModelSpec
from lynx_sim.traces import write_trace
from lynx_sim.traces.reader import Trace
from lynx_sim.traces.source import FileSource, RowStream, SynthSource, phase_rows
from lynx_sim.traces.synth import CHUNK_TOKENS, SynthParams


def whole_request_replay(src, B: int, steps: int, seed: int):
    """The reference: each slot holds its whole request (read at admission); batches stacked one
    step at a time; finished slots replaced in slot order after each step; a reused request
    starts at a random offset drawn at its admission."""
    rng, R = np.random.default_rng(seed), src.num_requests
    nxt = reused = 0
    prefill_only = not src.decode_routing  # its prompt rows are replayed

    def admit():
        nonlocal nxt, reused
        while True:
            r, nxt = nxt, nxt + 1
            arr = src.request(r % R) if prefill_only else phase_rows(src, r % R if R else r, phase=1)
            if len(arr.ids):
                break
        start = 0
        if R and r >= R:
            reused += 1
            start = int(rng.integers(0, len(arr.ids)))
        return [arr, start]

    slots, seq = [admit() for _ in range(B)], []
    for _ in range(steps):
        stack = lambda f: None if getattr(slots[0][0], f) is None else torch.from_numpy(  # noqa: E731
            np.stack([getattr(a, f)[c] for a, c in slots], 1))
        context = sum(int(a.position[c]) + 1 for a, c in slots)
        seq.append((stack("ids").long(), stack("weights"), stack("logits"), context))
        for i, sl in enumerate(slots):
            sl[1] += 1
            if sl[1] >= len(sl[0].ids):
                slots[i] = admit()
    return seq, reused, nxt


def synth(model="olmoe_1b_7b", seed=3, requests=None, **preset):
    cfg = compose_cfg([f"model={model}", "trace=synth"])
    p = SynthParams.from_cfg({**SynthParams.from_cfg(cfg.synth).__dict__, **preset})
    return SynthSource(ModelSpec.from_cfg(cfg.model), p, seed, num_requests=requests)  # a number: reused past it


def file_source(tmp_path, lengths, block_bytes=700, prefill_only=False):
    a = small_arrays(E=8, k=2, L=3, lengths=lengths)
    if prefill_only:
        a.phase[:] = 0
    path = write_trace(tmp_path / "t.safetensors", a)
    return lambda: FileSource(Trace(path), block_bytes=block_bytes)


CASES = {  # name: (source factory, steps); every case reuses requests or runs past many blocks
    "file": (lambda tmp: file_source(tmp, (9, 4, 17, 6, 30, 5, 12)), 140),
    "file_long": (lambda tmp: file_source(tmp, (90, 4, 151, 37, 1, 66, 120), block_bytes=5000), 300),
    "file_prefill_only": (lambda tmp: file_source(tmp, (9, 4, 17, 6, 30, 5, 12), prefill_only=True), 140),
    "synth": (lambda tmp: (lambda: synth()), 140),
    "synth_reused": (lambda tmp: lambda: synth(requests=4, output_tokens={"dist": "uniform", "min": 20, "max": 70}), 200),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_streamed_windows_equal_whole_requests_stepped(tmp_path, case):
    """Windows of 1, a few and many steps, blocks of the least (CHUNK_TOKENS) and of whole
    requests: the same batches, reuse count and admissions as whole requests stepped one at a time."""
    make, steps = CASES[case][0](tmp_path), CASES[case][1]
    base = whole_request_replay(make(), 5, steps, seed=11)
    assert case == "synth" or base[1] > 0, "the case must reuse requests"
    digests = set()
    for window_bytes, stream_bytes in ((1, 1), (5000, 1), (1 << 22, 1), (1 << 22, 1 << 30)):
        src = make()
        rp = ClosedLoopReplay(src, 5, np.random.default_rng(11), horizon=steps, window_bytes=window_bytes,
                              stream_bytes=stream_bytes)
        assert rp.block_rows == CHUNK_TOKENS if stream_bytes == 1 or "synth" in case else rp.block_rows > 150
        assert rp.prefill_as_decode == (case == "file_prefill_only")
        seq = []
        for _ in range(steps):
            b, ctx = rp.batch()
            seq.append((b.ids.clone(), None if b.weights is None else b.weights.clone(), b.logits.clone(), ctx))
            rp.advance()
        assert (rp.reused, rp.next_request) == base[1:]
        for t, (x, y) in enumerate(zip(seq, base[0])):
            assert torch.equal(x[0], y[0]) and torch.equal(x[2], y[2]) and x[3] == y[3], f"step {t}"
            assert (x[1] is None) == (y[1] is None) and (x[1] is None or torch.equal(x[1], y[1])), f"step {t}"
        if stream_bytes == 1:  # the same blocks read, whatever the window
            digests.add(src.digest.hexdigest())
    assert len(digests) == 1, "the routing digest must not depend on the window"


@pytest.mark.parametrize("stored", ["file", "synth"])
def test_slots_hold_at_most_a_block_each(tmp_path, stored):
    """A large batch of long requests: the slots hold batch x block_rows rows, a small share of
    what whole requests would hold; for a file, that (and one step's window) is all the replay
    allocates, counted by tracemalloc (the generator's suspended frames are the generator's)."""
    B, steps = 64, 40
    if stored == "file":
        lengths = tuple(int(n) for n in np.random.default_rng(0).integers(150, 400, 2 * B))
        L, k, E = 8, 2, 64
        path = write_trace(tmp_path / "t.safetensors", small_arrays(E=E, k=k, L=L, lengths=lengths))
        src = FileSource(Trace(path))
        whole = sum(n - 1 for n in lengths[:B])  # decode rows of the first B requests
    else:
        src = synth(model="olmoe_1b_7b", prompt_tokens={"dist": "uniform", "min": 1, "max": 9},
                    output_tokens={"dist": "uniform", "min": 150, "max": 400})
        m = src.model
        L, k, E = m.num_moe_layers, m.top_k, m.num_experts
        whole = sum(src.lengths(r)[1] for r in range(B))
    row_bytes = L * (8 * k + 4 * k + 4 * E) + 8  # ids (int64 at most), weights, logits, position of one token
    step_bytes = L * B * (8 * k + 4 * k + 4 * E)  # a window of one step
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        rp = ClosedLoopReplay(src, B, np.random.default_rng(0), horizon=steps, window_bytes=1, stream_bytes=1)
        held = []
        for _ in range(steps):
            rp.batch()
            held.append(rp.held_bytes())
            rp.advance()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    bound = B * rp.block_rows * row_bytes
    assert rp.block_rows == CHUNK_TOKENS and bound * 10 < whole * row_bytes, "whole requests would hold far more"
    assert max(held) <= bound, f"slots hold {max(held)} bytes, more than {B} x {rp.block_rows} rows ({bound})"
    if stored == "file":
        assert grown <= bound + step_bytes + B * 4096, f"the replay holds {grown} bytes, rows {bound}"


def test_file_streams_read_only_the_rows_asked(tmp_path, monkeypatch):
    """A streamed file request is read a block of rows at a time, never the trace's read-ahead block."""
    spans = []
    real = Trace.read_stored

    def spy(self, name, start=0, stop=None):
        if name == "logits":
            spans.append(stop - start)
        return real(self, name, start, stop)

    src = file_source(tmp_path, (90, 4, 151, 37), block_bytes=1 << 20)()
    monkeypatch.setattr(Trace, "read_stored", spy)
    s = RowStream(src, 2, 1, block_rows=16, start=5)
    rows = []
    while s.next_row < s.length:
        rows.append(s.read())
    assert spans == [16] * 9 + [1] and s.length == 150
    whole = src.request(2, phase=1)
    for f in ("ids", "weights", "logits", "position"):
        np.testing.assert_array_equal(np.concatenate([getattr(r, f) for r in rows]), getattr(whole, f)[5:])


def test_file_streams_rows_of_a_phase_that_is_not_contiguous(tmp_path):
    """Prompt and output rows interleaved within a request: a stream of either phase, from an
    offset, reads exactly the rows `request(r, phase)` returns."""
    a = small_arrays(E=8, k=2, L=3, lengths=(40, 30))
    a.phase[:] = np.arange(70) % 3 != 0
    src = FileSource(Trace(write_trace(tmp_path / "t.safetensors", a)))
    for phase in (0, 1):
        whole, s, parts = src.request(0, phase=phase), RowStream(src, 0, phase, 4, start=3), []
        while s.next_row < s.length:
            parts.append(s.read())
        assert s.length == len(whole.ids) > 10 and max(len(p.ids) for p in parts) == 4
        for f in ("ids", "weights", "logits", "position", "phase"):
            np.testing.assert_array_equal(np.concatenate([getattr(p, f) for p in parts]), getattr(whole, f)[3:])


@pytest.mark.parametrize("stored", ["file", "synth"])
def test_streamed_request_hashes_as_the_whole_request(tmp_path, stored):
    """The routing digest of a request read in blocks (from its first row) equals that of the
    request read whole; blocks read again, and blocks read by a copy from an offset, change nothing."""
    if stored == "file":
        make = lambda: file_source(tmp_path, (90, 4, 151, 37))()  # noqa: E731
        block = 13
    else:
        make = lambda: synth(output_tokens={"dist": "uniform", "min": 40, "max": 60})  # noqa: E731
        block = CHUNK_TOKENS
    whole, streamed = make(), make()
    for r in (0, 2):
        whole.request(r, phase=1)
        late = RowStream(streamed, r, 1, block, start=17)  # a copy from an offset: a gap, not hashed
        late.read()
        s = RowStream(streamed, r, 1, block)
        s.read()
        RowStream(streamed, r, 1, block).read()  # the same rows again: hashed once
        RowStream(streamed, r, 1, block, start=5).read()  # a copy from an offset overlapping it: not hashed
        while s.next_row < s.length:
            s.read()
        late.read()
    RowStream(streamed, 1, 1, block, start=2).read()  # read only from an offset: not named
    copy = RowStream(streamed, 1, 1, block)
    copy.seek(0, hashed=False)  # a replayed copy whose random offset is 0: not named either
    copy.read()
    assert streamed.digest.hexdigest() == whole.digest.hexdigest() and streamed.digest.blocks == 2
    for src in (whole, streamed):  # a request cut short by the run's end: the rows read are named
        RowStream(src, 3, 1, block).read()
    first = RowStream(streamed, 3, 1, block)
    first.read()
    RowStream(streamed, 3, 1, block, start=first.next_row).read()  # a copy that continues it: not named
    assert streamed.digest.hexdigest() == whole.digest.hexdigest() and streamed.digest.blocks == 3
