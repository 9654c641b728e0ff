"""Write a trace to one safetensors file (format v1, see `traces/FORMAT.md`).

`write_trace` writes a trace held in memory (safetensors' own writer). `TraceWriter` writes one
in parts with bounded memory (the recorder's long runs): each part is validated and spooled
per tensor to disk, and `close()` lays the spools out as one safetensors file (8-byte header
size, JSON header, tensors back to back, as the safetensors specification describes; the
result is checked by opening it with safetensors and the trace reader). Arrays are validated
with the same checks the reader runs, so a file we write always loads.
"""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from .format import FLOAT_DTYPES, FORMAT_NAME, FORMAT_VERSION, TraceMeta
from .validate import check_arrays

_TORCH_FLOAT = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class TraceArrays:
    """A whole trace in memory. Rows are tokens, grouped by request, in generation order."""

    meta: TraceMeta
    request_id: np.ndarray  # [N] int
    position: np.ndarray  # [N] int
    phase: np.ndarray  # [N] 0 = prefill, 1 = decode
    ids: np.ndarray  # [N, L, k] int
    weights: np.ndarray | None = None  # [N, L, k] float
    logits: np.ndarray | None = None  # [N, L, E] float
    arrival_s: np.ndarray | None = None  # [N] float, same value for every token of a request

    @property
    def num_tokens(self) -> int:
        return int(self.ids.shape[0])


def concat_arrays(parts: list[TraceArrays]) -> TraceArrays:
    """Requests of one meta, concatenated (optional fields kept where every part has them)."""
    if not parts:
        raise ValueError("concat: no requests")

    def cat(name):
        cols = [getattr(a, name) for a in parts]
        return None if any(c is None for c in cols) else np.concatenate(cols)

    return TraceArrays(meta=parts[0].meta, request_id=cat("request_id"), position=cat("position"), phase=cat("phase"),
                       ids=cat("ids"), weights=cat("weights"), logits=cat("logits"), arrival_s=cat("arrival_s"))


def stored_tensors(arrays: TraceArrays, float_dtype: str = "float16") -> dict[str, torch.Tensor]:
    """The tensors of `arrays` in their on-disk dtypes (ids int16 when E fits, floats as asked)."""
    if float_dtype not in FLOAT_DTYPES:
        raise ValueError(f"float_dtype: expected one of {sorted(FLOAT_DTYPES)}, found {float_dtype!r}")
    id_dtype = torch.int16 if arrays.meta.num_experts <= np.iinfo(np.int16).max else torch.int32
    tensors = {
        "request_id": torch.from_numpy(np.ascontiguousarray(arrays.request_id, dtype=np.int32)),
        "position": torch.from_numpy(np.ascontiguousarray(arrays.position, dtype=np.int32)),
        "phase": torch.from_numpy(np.ascontiguousarray(arrays.phase, dtype=np.int8)),
        "ids": torch.from_numpy(np.ascontiguousarray(arrays.ids, dtype=np.int64)).to(id_dtype),
    }
    for name in ("weights", "logits"):
        value = getattr(arrays, name)
        if value is not None:
            tensors[name] = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32)).to(_TORCH_FLOAT[float_dtype])
    if arrays.arrival_s is not None:
        tensors["arrival_s"] = torch.from_numpy(np.ascontiguousarray(arrays.arrival_s, dtype=np.float64))
    return tensors


def header_metadata(meta: TraceMeta) -> dict[str, str]:
    return {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "meta": meta.to_json()}


def write_trace(path: str | Path, arrays: TraceArrays, float_dtype: str = "float16") -> Path:
    """Validate `arrays` and write them to `path`; floats are stored as `float_dtype`."""
    path = Path(path)
    check_arrays(arrays, file=str(path))
    tensors = stored_tensors(arrays, float_dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=header_metadata(arrays.meta))
    return path


_SAFETENSORS_DTYPE = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
                      torch.int8: "I8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64"}


class TraceWriter:
    """Write a trace part by part; memory holds one part at a time. Parts are whole requests
    (a request may not continue into the next part) of one meta, with the same optional fields.

        with TraceWriter(path, meta) as w:
            for part in parts:
                w.append(part)
    """

    def __init__(self, path: str | Path, meta: TraceMeta, float_dtype: str = "float16"):
        self.path, self.meta, self.float_dtype = Path(path), meta, float_dtype
        if float_dtype not in FLOAT_DTYPES:
            raise ValueError(f"float_dtype: expected one of {sorted(FLOAT_DTYPES)}, found {float_dtype!r}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._spool = Path(tempfile.mkdtemp(prefix=".trace-parts-", dir=self.path.parent))
        self._layout: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        self.rows = 0
        self._requests: set[int] = set()

    def append(self, arrays: TraceArrays) -> None:
        if arrays.meta != self.meta:
            raise ValueError(f"{self.path}: every part must carry the writer's meta (found {arrays.meta.model!r} "
                             f"with different settings)")
        check_arrays(arrays, file=f"{self.path} (part from row {self.rows})")
        reqs = set(np.unique(arrays.request_id).tolist())
        again = sorted(reqs & self._requests)
        if again:
            raise ValueError(f"{self.path}: request ids {again[:5]} continue from an earlier part; a part holds whole requests")
        tensors = stored_tensors(arrays, self.float_dtype)
        layout = {n: (t.dtype, tuple(t.shape[1:])) for n, t in tensors.items()}
        if self._layout and layout != self._layout:
            raise ValueError(f"{self.path}: part from row {self.rows} has fields {sorted(layout)}, earlier parts "
                             f"{sorted(self._layout)} (the same fields and shapes are needed in every part)")
        self._layout = layout
        for name, t in tensors.items():
            with open(self._spool / name, "ab") as f:
                f.write(t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        self.rows += int(arrays.ids.shape[0])
        self._requests |= reqs

    def close(self) -> Path:
        """Lay the spooled parts out as one safetensors file, check it, remove the spools."""
        if not self._layout:
            shutil.rmtree(self._spool, ignore_errors=True)
            raise ValueError(f"{self.path}: no parts were appended")
        header, offset = {}, 0
        for name in sorted(self._layout):
            dtype, tail = self._layout[name]
            size = (self._spool / name).stat().st_size
            header[name] = {"dtype": _SAFETENSORS_DTYPE[dtype], "shape": [self.rows, *tail], "data_offsets": [offset, offset + size]}
            offset += size
        header["__metadata__"] = header_metadata(self.meta)
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
        tmp = self.path.with_name(self.path.name + ".partial")
        with open(tmp, "wb") as out:
            out.write(struct.pack("<Q", len(blob)))
            out.write(blob)
            for name in sorted(self._layout):
                with open(self._spool / name, "rb") as f:
                    shutil.copyfileobj(f, out, 16 << 20)
        shutil.rmtree(self._spool, ignore_errors=True)
        from .reader import Trace  # the whole file through safetensors' header checks and our data checks

        Trace(tmp)
        tmp.replace(self.path)
        return self.path

    def __enter__(self) -> "TraceWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            shutil.rmtree(self._spool, ignore_errors=True)
