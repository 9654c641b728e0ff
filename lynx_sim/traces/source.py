"""Where a run's routing comes from: a trace file, or the synthetic generator on the fly.

Both answer `request(r) -> TraceArrays` for one request, so the replay does not care which.
"""

from __future__ import annotations

from pathlib import Path

from .errors import TraceFormatError
from .reader import Trace
from .writer import TraceArrays

FIELDS = ("ids", "weights", "logits", "arrival_s")


class FileSource:
    """Requests read from a native trace file, one row range at a time (flat memory)."""

    def __init__(self, trace: Trace):
        self.trace, self.meta = trace, trace.meta
        self.num_requests: int | None = trace.num_requests
        self.name = f"file:{trace.path.name}"
        self.fields = set(trace.fields)

    def request(self, r: int) -> TraceArrays:
        a, b = int(self.trace.request_offsets[r]), int(self.trace.request_offsets[r + 1])
        cols = {n: self.trace.read(n, a, b) for n in FIELDS if self.trace.has(n)}
        return TraceArrays(meta=self.meta, request_id=self.trace.request_id[a:b], position=self.trace.position[a:b],
                           phase=self.trace.phase[a:b], **cols)


def check_matches_model(meta, model, where: str) -> None:
    """A trace replayed for a model must have that model's router shape."""
    r = model.router
    for field, have, want in (("num_experts", meta.num_experts, model.num_experts), ("top_k", meta.top_k, model.top_k),
                              ("moe layers", meta.num_layers, model.num_moe_layers), ("router", meta.router, r.kind),
                              ("renormalize", meta.renormalize, r.renormalize),
                              ("n_group/topk_group", (meta.n_group, meta.topk_group), (r.n_group, r.topk_group))):
        if have != want:
            raise TraceFormatError(where, field, f"{want} (model={model.name})",
                                   f"{have} (trace recorded from {meta.model!r}); choose the matching model=...")


def build_source(cfg, model):
    """The source a run's `trace` config group names."""
    kind = cfg.trace.kind
    if kind == "synth":
        from .synth import SynthParams, SyntheticTrace

        src = SyntheticTrace(model, SynthParams.from_cfg(cfg.synth), int(cfg.seed))
        src.num_requests, src.name = None, f"synth:{model.name}"
        src.fields = {"request_id", "position", "phase", "ids", "weights", "logits"}
        return src
    if kind == "file":
        path = cfg.trace.get("path")
        if not path:
            raise ValueError("trace=file needs trace.path=<native trace file> (see `python -m lynx_sim.traces`)")
        src = FileSource(Trace(Path(path)))
        check_matches_model(src.meta, model, str(path))
        return src
    raise ValueError(f"trace.kind: expected 'synth' or 'file', found {kind!r}")
