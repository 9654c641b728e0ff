"""The source contract (lynx_sim/traces/source.py: `Source`): every source implementation has
every declared member, of the declared types, and its members agree with each other (row counts,
blocks, requests); an object lacking any member is not a source; the engine reads sources
through the contract only (no attribute probes)."""

from __future__ import annotations

import re

import types

import numpy as np
import pytest

from conftest import ROOT, compose_cfg, small_arrays
from lynx_sim.model import ModelSpec
from lynx_sim.traces import TraceMeta, write_trace
from lynx_sim.traces.digest import RoutingDigest
from lynx_sim.traces.reader import Trace
from lynx_sim.traces.source import FileSource, Source, SynthSource, build_source
from lynx_sim.traces.synth import SynthParams

DATA = {"name": str, "meta": TraceMeta, "fields": frozenset, "digest": RoutingDigest,
        "prompt_routing": bool, "decode_routing": bool}  # and num_requests: int | None
METHODS = ("lengths", "num_rows", "request", "read_blocks", "max_block_rows", "request_arrivals")


def declared_members() -> set[str]:
    return set(Source.__annotations__) | {n for n, v in vars(Source).items() if callable(v) and not n.startswith("_")}


def test_the_contract_declares_what_the_engine_reads():
    assert declared_members() == set(DATA) | {"num_requests"} | set(METHODS)
    for name in METHODS:
        assert getattr(Source, name).__doc__, f"Source.{name} needs a docstring"


def sources(tmp_path):
    a = small_arrays(E=8, k=2, L=3, lengths=(9, 4, 17, 6))
    a.phase[9:13], a.position[9:13] = 1, np.arange(9, 13)  # request 1: decode rows only, from position 9
    prefill = small_arrays(E=8, k=2, L=3, lengths=(5, 3), logits=False)
    prefill.phase[:], prefill.arrival_s = 0, None
    cfg = compose_cfg(["model=olmoe_1b_7b", "trace=synth"])
    return {
        "file": FileSource(Trace(write_trace(tmp_path / "a.safetensors", a)), block_bytes=700),
        "file_prefill_only": FileSource(Trace(write_trace(tmp_path / "p.safetensors", prefill))),
        "synth": build_source(cfg, ModelSpec.from_cfg(cfg.model)),
        "synth_finite": SynthSource(ModelSpec.from_cfg(cfg.model), SynthParams.from_cfg(cfg.synth), 1, num_requests=3),
    }


@pytest.mark.parametrize("case", ["file", "file_prefill_only", "synth", "synth_finite"])
def test_every_source_satisfies_the_contract(tmp_path, case):
    src = sources(tmp_path)[case]
    assert isinstance(src, Source)
    for name, kind in DATA.items():
        assert isinstance(getattr(src, name), kind), f"{case}.{name}: {type(getattr(src, name))}, expected {kind}"
    assert src.num_requests is None or isinstance(src.num_requests, int)
    assert all(isinstance(f, str) for f in src.fields) and {"ids", "phase"} <= src.fields
    assert src.name.startswith("synth:" if "synth" in case else "file:")
    assert src.decode_routing == (case != "file_prefill_only")
    assert src.prompt_routing  # every source here holds (or generates) prompt rows
    arrivals = src.request_arrivals()
    if case == "file":
        assert arrivals.dtype == np.float64 and arrivals.tolist() == [0.0, 1.0, 2.0, 3.0]
    else:
        assert arrivals is None
    for r in range(min(3, src.num_requests or 3)):
        P, O = src.lengths(r)
        assert isinstance(P, int) and isinstance(O, int) and P >= 0 and O >= 0
        for phase in (None, 0, 1):
            n = src.num_rows(r, phase)
            whole = src.request(r, phase=phase)
            assert isinstance(n, int) and n == len(whole.ids)
            assert phase is None or (whole.phase == phase).all()
            for start in (0, min(3, n)):
                blocks = list(src.read_blocks(r, phase, start, 2))
                assert all(0 < len(b.ids) <= src.max_block_rows(2) for b in blocks)
                got = np.concatenate([b.ids for b in blocks]) if blocks else whole.ids[:0]
                np.testing.assert_array_equal(got, whole.ids[start:])
        if case != "file" or r != 1:
            assert P == src.num_rows(r, 0) and O == src.num_rows(r, 1)
    if case == "file":
        assert src.prompt_routing and src.lengths(1) == (9, 4)  # no prompt rows: where its decode starts


def test_an_object_lacking_a_member_is_not_a_source(tmp_path):
    src = sources(tmp_path)["file"]
    full = types.SimpleNamespace(**{n: getattr(src, n) for n in declared_members()})
    assert isinstance(full, Source)
    for name in sorted(declared_members()):
        partial = types.SimpleNamespace(**{n: getattr(src, n) for n in declared_members() - {name}})
        assert not isinstance(partial, Source), f"an object without {name} passed as a source"


def test_the_engine_does_not_probe_sources():
    """No module of the engine asks a source what it has (hasattr/getattr) or reaches past the contract."""
    probe = re.compile(r"getattr\([^,]*source|hasattr\(|\.source\.trace\b|source\.trace\b")
    files = sorted((ROOT / "lynx_sim" / "engine").glob("*.py"))
    assert {f.name for f in files} >= {"replay.py", "workload.py", "serving.py", "decode.py"}
    for f in files:
        assert not probe.search(f.read_text()), f
