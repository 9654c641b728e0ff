"""Import the reference `.npz` routing traces (schema of `../shared/traces/README.md`).

The reference files carry ids, optionally renormalised top-k weights, sequence offsets, phases
and MoE layer indices, but no router logits, arrival times or prompt positions of decode-only
recordings. What is missing is written into the native metadata (`missing`,
`provenance.notes`) so that every consumer can say whether its result is exact.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np

from .errors import TraceFormatError
from .format import TraceMeta
from .writer import TraceArrays, write_trace

# Router settings the reference schema does not record, keyed by a prefix of its "model" string.
KNOWN_ROUTERS = {
    "mistralai/Mixtral": dict(router="softmax", renormalize=True, name="mixtral_8x7b"),
    "deepseek-ai/DeepSeek-V2-Lite": dict(router="softmax", renormalize=False, name="deepseek_v2_lite"),
    "meta-llama/Llama-4-Maverick": dict(router="sigmoid", renormalize=False, name="llama4_maverick"),
}
REQUIRED = {"ids": 3, "seq_offsets": 1, "phase": 1, "layers": 1, "meta": 0}


def _load_npz(src: Path) -> dict[str, np.ndarray]:
    file = str(src)
    if not src.is_file():
        raise TraceFormatError(file, "file", "an existing .npz file", "no such file")
    try:
        with np.load(src, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise TraceFormatError(file, "file", "a numpy .npz archive without pickled objects", f"unreadable ({e})") from None
    for key, ndim in REQUIRED.items():
        if key not in data:
            raise TraceFormatError(file, key, "an array in the archive", f"keys {sorted(data)}")
        if data[key].ndim != ndim:
            raise TraceFormatError(file, key, f"{ndim} dimensions", f"shape {list(data[key].shape)}")
    return data


def reference_to_arrays(src: str | Path, router: str | None = None, renormalize: bool | None = None) -> TraceArrays:
    """Read one reference `.npz` into native arrays (checked by the writer's validation)."""
    src = Path(src)
    file = str(src)
    d = _load_npz(src)
    try:
        ref = json.loads(str(d["meta"]))
    except json.JSONDecodeError as e:
        raise TraceFormatError(file, "meta", "a JSON string", f"invalid JSON ({e})") from None
    model = str(ref.get("model", ""))
    known = next((v for k, v in KNOWN_ROUTERS.items() if model.startswith(k)), None)
    if known is None and (router is None or renormalize is None):
        raise TraceFormatError(file, "meta.model", f"a model among {sorted(KNOWN_ROUTERS)} or explicit "
                               "--router and --renormalize", repr(model))
    router = router or known["router"]
    renormalize = known["renormalize"] if renormalize is None else renormalize
    ids, offsets = d["ids"], d["seq_offsets"].astype(np.int64)
    N = ids.shape[0]
    if offsets[0] != 0 or offsets[-1] != N or (np.diff(offsets) < 0).any():
        raise TraceFormatError(file, "seq_offsets", f"non-decreasing offsets from 0 to N={N}",
                               f"{offsets[:3].tolist()}...{offsets[-1]}")
    lengths = np.diff(offsets)
    request_id = np.repeat(np.arange(len(lengths), dtype=np.int32), lengths)
    position = (np.arange(N) - np.repeat(offsets[:-1], lengths)).astype(np.int32)
    weights = d["weights"].astype(np.float32) if "weights" in d else None
    missing = ["logits", "arrival_s"] + ([] if weights is not None else ["weights"])
    notes = ["positions count from each sequence's first recorded token"]
    phase = d["phase"].astype(np.int8)
    if (phase == 1).all():
        missing.append("prompt_tokens")
        notes.append("decode tokens only: prompt length unknown, positions are relative")
    ids_ordered = weights is not None or ids.shape[2] == 1
    if not ids_ordered:
        notes.append("id order inside a row is not by weight: slot 0 is not the top-1 expert")
    meta = TraceMeta(
        model=model, num_experts=int(ref["num_experts"]), top_k=int(ref["top_k"]),
        moe_layers=tuple(int(x) for x in d["layers"]), router=router, renormalize=bool(renormalize),
        shared_experts=int(ref.get("shared_experts", 0)), weights_kind=str(ref.get("weights", "none")),
        ids_ordered=ids_ordered, missing=tuple(missing),
        provenance={"importer": "lynx_sim.traces.convert", "source_file": src.name, "notes": notes,
                    "reference_meta": ref},
    )
    return TraceArrays(meta=meta, request_id=request_id, position=position, phase=phase,
                       ids=ids.astype(np.int32), weights=weights)


def convert(src: str | Path, dst: str | Path, router: str | None = None, renormalize: bool | None = None) -> Path:
    """Convert a reference `.npz` into a native trace file at `dst`."""
    arrays = reference_to_arrays(src, router, renormalize)
    return write_trace(dst, arrays, float_dtype="float16")
