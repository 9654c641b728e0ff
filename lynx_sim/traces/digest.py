"""A content hash of the routing a run read, so that two users can tell they replayed the same.

Rows are hashed per (request, phase) key in row order: one running SHA-256 per field over the
bytes of its rows (positions, phases, ids, weights, logits as the run used them), so a request
read whole and the same request streamed in blocks (the decode replay reads a block per slot at a
time, `source.RowStream`) give the same value. A key's hash covers its rows 0..n-1 as far as
they were read: rows already hashed are skipped, rows past a gap are left out (the replay feeds
only streams that start at row 0, so n is how far a request's first pass got). The run's digest
is a SHA-256 over the keys and their hashes in sorted order, so it does not depend on the order
or the number of times rows were read. Synthetic and file traces are hashed alike.
"""

from __future__ import annotations

import hashlib

import numpy as np

FIELDS = ("position", "phase", "ids", "weights", "logits")


class _Part:
    """The running hash of one key's rows 0..rows-1."""

    def __init__(self):
        self.rows = 0
        self.fields: dict[str, "hashlib._Hash"] = {}

    def update(self, arrays, skip: int) -> None:
        for name in FIELDS:
            a = getattr(arrays, name)
            if a is None:
                continue
            h = self.fields.get(name)
            if h is None:  # faster than blake2b where the CPU has SHA extensions
                h = self.fields[name] = hashlib.sha256(f"{name}:{a.dtype.str}:{a.shape[1:]}".encode())
            h.update(np.ascontiguousarray(a[skip:]).data)
        self.rows += len(arrays.ids) - skip

    def digest(self) -> bytes:
        h = hashlib.sha256(f"rows:{self.rows}".encode())
        for name in FIELDS:
            if name in self.fields:
                h.update(name.encode())
                h.update(self.fields[name].digest())
        return h.digest()


class RoutingDigest:
    def __init__(self):
        self._done: dict[tuple[int, int], bytes] = {}  # keys whose every row is hashed
        self._open: dict[tuple[int, int], _Part] = {}  # keys being streamed: at most one per replay slot

    def add(self, request: int, phase: int | None, arrays) -> None:
        """Hash all the rows of `request` (of every phase when phase is None) unless already hashed."""
        self.feed(request, phase, 0, arrays, total=len(arrays.ids))

    def feed(self, request: int, phase: int | None, first: int, arrays, total: int) -> None:
        """Rows first.. of the `total` rows of (request, phase), in row order."""
        key = (int(request), -1 if phase is None else int(phase))
        if key in self._done:
            return
        part = self._open.get(key)
        if part is None:
            if first > 0:  # a gap: rows before `first` not read yet
                return
            part = self._open[key] = _Part()
        skip, n = part.rows - first, len(arrays.ids)
        if skip < 0 or (n and skip >= n):  # a gap, or rows hashed already
            return
        part.update(arrays, skip)
        if part.rows >= total:
            self._done[key] = part.digest()
            del self._open[key]

    @property
    def blocks(self) -> int:
        """Keys hashed (requests, or phases of them)."""
        return len(self._done) + len(self._open)

    def hexdigest(self) -> str:
        parts = {**self._done, **{key: part.digest() for key, part in self._open.items()}}
        h = hashlib.sha256()
        for key in sorted(parts):
            h.update(repr(key).encode())
            h.update(parts[key])
        return h.hexdigest()
