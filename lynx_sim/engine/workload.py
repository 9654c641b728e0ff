"""Where requests come from: arrival times (`conf/workload/`) and each request's routing rows.

- closed: `concurrency` clients; each sends its next request the moment its last one finishes.
- poisson: arrivals at `rate_rps` per second (seeded exponential gaps).
- trace: the arrival time recorded in the trace (`arrival_s` of each request's first row),
  optionally scaled by `time_scale`.
Prompt and output lengths come from the trace: a file's phase-0 and phase-1 rows (a request
whose prompt routing was not recorded gets its prompt length from its first decode position,
and its decode rows stand in for the prompt's routing: flagged), or the synthetic preset.
Requests past the end of a file start over from its first (flagged).
"""

from __future__ import annotations

import numpy as np

from ..schema import MAX_SPAN_S, ConfigError
from ..traces.source import Source
from ..traces.arrays import TraceArrays
from .request import Request

KINDS = ("decode", "closed", "poisson", "trace")


class RequestFactory:
    """Builds `Request`s of trace request r and loads their rows on demand (memory flat)."""

    def __init__(self, source: Source):
        self.source = source
        self.stand_in_prompts = 0  # requests whose prompt routing is borrowed from their decode rows
        self.reused = 0

    @property
    def num_requests(self) -> int | None:
        return self.source.num_requests

    def _lengths(self, r: int) -> tuple[int, int]:
        """(prompt, output) tokens of trace request r; a prompt of at least one token."""
        P, O = self.source.lengths(r)
        return max(P, 1), O

    def longest_request(self) -> int:
        """The most tokens one request of the file holds in the KV cache, prompt + output - 1
        (a preempted request recomputes that many at once)."""
        return max((sum(self._lengths(r)) - 1 for r in range(self.num_requests)), default=0)

    def make(self, rid: int, arrival_s: float, r: int | None = None) -> Request | None:
        """Request number `rid` replaying trace request `r` (default: rid, wrapping); None when
        that trace request has no output tokens to serve."""
        R = self.num_requests
        r = rid if r is None else r
        if R:
            if r >= R:
                self.reused += 1
            r %= R
        P, O = self._lengths(r)
        if O < 1:
            return None
        return Request(rid=rid, trace_request=r, arrival_s=arrival_s, prompt=P, output=O)

    def load(self, req: Request) -> None:
        """Rows 0 .. P + O - 1 of the request, prompt first; borrowed prompt rows when missing."""
        arr = self.source.request(req.trace_request)
        pre, dec = np.flatnonzero(arr.phase == 0), np.flatnonzero(arr.phase == 1)
        if pre.size < req.prompt:
            self.stand_in_prompts += 1
            pool = dec if dec.size else pre
            pre = np.r_[pre, np.resize(pool, req.prompt - pre.size)]
        idx = np.r_[pre[:req.prompt], dec[:req.output]]
        req.rows = TraceArrays(meta=arr.meta, request_id=arr.request_id[idx], position=arr.position[idx],
                               phase=arr.phase[idx], ids=arr.ids[idx],
                               weights=None if arr.weights is None else arr.weights[idx],
                               logits=None if arr.logits is None else arr.logits[idx])


def arrival_times(workload, factory: RequestFactory, rng: np.random.Generator) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(arrival times, trace request of each) of `workload.num_requests` requests; times None for
    closed (clients pace themselves), requests None for "request i replays trace request i"."""
    kind, n = workload.kind, int(workload.num_requests)
    if n < 1:
        raise ValueError(f"workload.num_requests: expected an integer >= 1, found {n!r}")
    if kind == "closed":
        return None, None
    if kind == "poisson":
        rate = float(workload.rate_rps)
        if not rate > 0:
            raise ValueError(f"workload.rate_rps: expected a rate > 0 requests/s, found {workload.rate_rps!r}")
        return np.cumsum(rng.exponential(1.0 / rate, n)), None
    if kind == "trace":
        starts = factory.source.request_arrivals()
        if starts is None:
            raise ValueError(f"workload=trace: {factory.source.name} has no field 'arrival_s' (arrival time of each "
                             f"request); use workload=poisson or closed, or a trace recorded with arrival times")
        order = np.argsort(starts, kind="stable")
        starts = starts[order] - starts.min()
        gap = float(np.diff(starts).mean()) if len(starts) > 1 else 1.0
        reps = -(-n // len(starts))  # past the end: the recorded pattern repeats, one period later each time
        period = float(starts[-1]) + gap
        t = np.concatenate([starts + i * period for i in range(reps)])[:n]
        r = np.concatenate([order + i * len(order) for i in range(reps)])[:n]
        scale = float(workload.get("time_scale", 1.0))
        if not scale > 0 or not t[-1] * scale <= MAX_SPAN_S:
            raise ConfigError("workload.time_scale", f"a factor > 0 that keeps the {n} arrivals within {MAX_SPAN_S:.0e} "
                              f"simulated seconds (recorded span {t[-1]:.3g} s)", scale)
        return t * scale, r
    raise ValueError(f"workload.kind: expected one of {KINDS}, found {kind!r}")
