"""Open a native trace: header and metadata checked at once, data streamed by positioned reads.

Per-token bookkeeping columns (request id, position, phase, arrival: 9-17 bytes a token) are
loaded; the routing tensors (ids, weights, logits) are read by row range on demand, so replaying
or validating a trace larger than RAM keeps memory flat.
"""

from __future__ import annotations

import json
import math
import os
import struct
import weakref
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from safetensors import safe_open

from .errors import TraceFormatError
from .format import FIELDS, FORMAT_NAME, FORMAT_VERSION, TraceMeta
from .validate import check_routing_block, check_shape, check_token_columns

DEFAULT_CHUNK_TOKENS = 4096


class Trace:
    """A read-only view of one trace file. Use `read(name, start, stop)` for routing tensors."""

    def __init__(self, path: str | Path, validate: bool = True, chunk_tokens: int = DEFAULT_CHUNK_TOKENS):
        self.path = Path(path)
        file = str(self.path)
        if not self.path.is_file():
            raise TraceFormatError(file, "file", "an existing trace file", "no such file")
        try:
            self._f = safe_open(file, framework="pt")
            header = self._f.metadata() or {}
        except Exception as e:  # safetensors raises its own error type for truncated or foreign bytes
            raise TraceFormatError(file, "file", "a safetensors trace file",
                                   f"unreadable bytes, truncated or not a trace ({e})") from None
        if header.get("format") != FORMAT_NAME:
            raise TraceFormatError(file, "format", f"'{FORMAT_NAME}' in the safetensors header",
                                   repr(header.get("format")))
        if header.get("format_version") != str(FORMAT_VERSION):
            raise TraceFormatError(file, "format_version", f"{FORMAT_VERSION} (this reader)",
                                   repr(header.get("format_version")))
        self.meta = TraceMeta.from_json(header.get("meta", ""), file)
        self._check_header(file)
        del self._f  # the header is checked; data is read by positioned reads (read_stored)
        self._layout = data_layout(self.path)
        self._fd = os.open(file, os.O_RDONLY)
        self._close = weakref.finalize(self, os.close, self._fd)
        self.request_id = self.read("request_id")
        self.position = self.read("position")
        self.phase = self.read("phase")
        self.arrival_s = self.read("arrival_s") if "arrival_s" in self.fields else None
        check_token_columns(file, self.request_id, self.position, self.phase, self.arrival_s)
        starts = np.flatnonzero(np.r_[True, self.request_id[1:] != self.request_id[:-1]])
        self.request_offsets = np.r_[starts, self.num_tokens].astype(np.int64)  # [R + 1]
        if validate:
            self.validate_data(chunk_tokens)

    def _check_header(self, file: str) -> None:
        self.fields = set(self._f.keys())
        unknown = sorted(self.fields - set(FIELDS))
        if unknown:
            raise TraceFormatError(file, "tensors", f"names among {sorted(FIELDS)}", f"unknown {unknown}")
        ids_shape = self._f.get_slice("ids").get_shape() if "ids" in self.fields else None
        if ids_shape is None or len(ids_shape) != 3:
            raise TraceFormatError(file, "ids", "a tensor [N, L, k]", "nothing" if ids_shape is None else f"shape {ids_shape}")
        self.num_tokens = int(ids_shape[0])
        sizes = {"N": self.num_tokens, "L": self.meta.num_layers, "k": self.meta.top_k, "E": self.meta.num_experts}
        for name, (dtypes, symbols, required) in FIELDS.items():
            if name not in self.fields:
                if required:
                    raise TraceFormatError(file, name, "a tensor in the file", "nothing")
                continue
            sl = self._f.get_slice(name)
            if sl.get_dtype() not in dtypes:
                raise TraceFormatError(file, name, f"dtype {' or '.join(dtypes)}", sl.get_dtype())
            check_shape(file, name, tuple(sl.get_shape()), tuple(sizes[s] for s in symbols), symbols)

    @property
    def num_layers(self) -> int:
        return self.meta.num_layers

    @property
    def num_requests(self) -> int:
        return len(self.request_offsets) - 1

    def has(self, name: str) -> bool:
        return name in self.fields

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows [start, stop) of one tensor as numpy: floats as float32 (float64 for arrival_s), ids as int64."""
        return self.as_numpy(name, self.read_stored(name, start, stop))

    def read_stored(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows [start, stop) of one tensor in its stored dtype, read from the file into a fresh
        buffer (positioned reads at the offsets of the safetensors header, which safe_open checked:
        unlike slices of its memory map, they leave no file pages in the process, so streaming a
        long trace keeps the resident size flat)."""
        if name not in self.fields:
            raise KeyError(f"{self.path}: trace has no '{name}' tensor (fields: {sorted(self.fields)})")
        offset, dtype, shape = self._layout[name]
        start, stop, _ = slice(start, stop).indices(shape[0])
        n = max(stop - start, 0)
        if n == 0:
            return torch.empty((0, *shape[1:]), dtype=dtype)
        row = math.prod(shape[1:]) * dtype.itemsize
        buf = np.empty(n * row, np.uint8)
        done = 0
        while done < buf.size:  # a positioned read may return less than asked
            got = os.preadv(self._fd, [buf[done:]], offset + start * row + done)
            if got <= 0:
                raise TraceFormatError(str(self.path), name, f"{buf.size} bytes of rows {start}..{stop}",
                                       f"{done} (file truncated)")
            done += got
        return torch.from_numpy(buf).view(dtype).reshape(n, *shape[1:])

    @staticmethod
    def as_numpy(name: str, t: torch.Tensor, copy: bool = False) -> np.ndarray:
        """Stored rows in the dtypes `read` returns; `copy`: never a view of `t`."""
        dtype = torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else torch.int64 if name == "ids" else t.dtype
        return t.to(dtype, copy=copy).numpy()

    def iter_blocks(self, names: tuple[str, ...], chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> Iterator[tuple[int, dict]]:
        """Yield (first_row, {name: rows}) over the whole trace, `chunk_tokens` rows at a time."""
        for a in range(0, self.num_tokens, chunk_tokens):
            b = min(a + chunk_tokens, self.num_tokens)
            yield a, {n: self.read(n, a, b) for n in names if self.has(n)}

    def validate_data(self, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> None:
        """Stream every routing tensor through the format's data checks, a chunk at a time."""
        for a in range(0, self.num_tokens, chunk_tokens):
            b = min(a + chunk_tokens, self.num_tokens)
            block = {n: self.as_numpy(n, t) for n, t in self.read_block(("ids", "weights", "logits"), a, b).items()}
            check_routing_block(str(self.path), self.meta, a, block["ids"], block.get("weights"), block.get("logits"))

    def read_block(self, names, start: int, stop: int) -> dict[str, torch.Tensor]:
        """Rows [start, stop) of the named tensors the trace has, in their stored dtypes."""
        return {n: self.read_stored(n, start, stop) for n in names if self.has(n)}


STORED_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
                 "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
                 "BOOL": torch.bool}


def data_layout(path: Path) -> dict[str, tuple[int, torch.dtype, tuple[int, ...]]]:
    """name -> (absolute byte offset, dtype, shape) of each tensor, from the safetensors header
    (8 bytes little-endian header size, the JSON header, then the data; safe_open has already
    checked it)."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    return {name: (8 + size + info["data_offsets"][0], STORED_DTYPES[info["dtype"]], tuple(info["shape"]))
            for name, info in header.items() if name != "__metadata__"}


def open_trace(path: str | Path, validate: bool = True) -> Trace:
    """Open and (by default) fully validate a native trace file."""
    return Trace(path, validate=validate)
