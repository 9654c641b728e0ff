"""Write a trace held in memory to one safetensors file (format v1, see `traces/FORMAT.md`).

Arrays are validated with the same checks the reader runs, so a file we write always loads.
Writing needs the whole trace in memory; streaming writes belong to the recorder.
"""

from __future__ import annotations

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


def write_trace(path: str | Path, arrays: TraceArrays, float_dtype: str = "float16") -> Path:
    """Validate `arrays` and write them to `path`; floats are stored as `float_dtype`."""
    path = Path(path)
    if float_dtype not in FLOAT_DTYPES:
        raise ValueError(f"float_dtype: expected one of {sorted(FLOAT_DTYPES)}, found {float_dtype!r}")
    check_arrays(arrays, file=str(path))
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
    header = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "meta": arrays.meta.to_json()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=header)
    return path
