"""Import the reference `.npz` routing traces (schema of `../shared/traces/README.md`).

The reference files carry ids, optionally renormalised top-k weights, sequence offsets, phases
and MoE layer indices, but no router logits, arrival times or prompt positions of decode-only
recordings. What is missing is written into the native metadata (`missing`,
`provenance.notes`) so that every consumer can say whether its result is exact.

Every malformed archive is a TraceFormatError naming the file, the array or meta key, what was
expected and what was found: not a zip, a `.npy` renamed, a corrupted member, pickled objects
(never loaded: allow_pickle=False), a missing or unknown array, a wrong dtype (float ids or
offsets are refused, not truncated) or dimension count, meta that is not a JSON object, a meta
key of the wrong type. OS errors (no permission, a name too long) stay OSErrors naming the path.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .arrays import TraceArrays
from .errors import TraceFormatError
from .format import TraceMeta, is_int, json_found
from .reader import os_error
from .validate import check_arrays
from .writer import write_trace

# Router settings the reference schema does not record, keyed by a prefix of its "model" string.
KNOWN_ROUTERS = {
    "mistralai/Mixtral": dict(router="softmax", renormalize=True, name="mixtral_8x7b"),
    "deepseek-ai/DeepSeek-V2-Lite": dict(router="softmax", renormalize=False, name="deepseek_v2_lite"),
    "meta-llama/Llama-4-Maverick": dict(router="sigmoid", renormalize=False, name="llama4_maverick"),
}
# array -> (dimensions, numpy dtype kinds, in words); `weights` is optional
ARRAYS = {"ids": (3, "iu", "an integer dtype"), "seq_offsets": (1, "iu", "an integer dtype"),
          "phase": (1, "iu", "an integer dtype"), "layers": (1, "iu", "an integer dtype"),
          "meta": (0, "U", "a unicode string (0-d)"), "weights": (3, "f", "a float dtype")}
REQUIRED = ("ids", "seq_offsets", "phase", "layers", "meta")


def _load_npz(src: Path) -> dict[str, np.ndarray]:
    file = str(src)
    try:
        st = src.stat()
    except FileNotFoundError:
        raise TraceFormatError(file, "file", "an existing .npz file", "no such file") from None
    except OSError as e:
        raise os_error(e, file) from None
    if not src.is_file():
        raise TraceFormatError(file, "file", "a regular .npz file", "a directory" if src.is_dir() else "not a regular file")
    try:
        with open(src, "rb") as f:
            magic = f.read(6)
    except OSError as e:
        raise os_error(e, file) from None
    if magic.startswith(b"\x93NUMPY"):
        raise TraceFormatError(file, "file", "a numpy .npz archive (a zip of .npy arrays)", "a single .npy array")
    if not magic.startswith(b"PK"):
        raise TraceFormatError(file, "file", "a numpy .npz archive (a zip of .npy arrays)",
                               f"{st.st_size} bytes starting {magic!r}: not a zip archive")
    data = {}
    try:
        z = np.load(src, allow_pickle=False)
    except OSError as e:
        raise os_error(e, file) from None
    except Exception as e:  # zipfile, zlib and numpy's own errors: one bad archive, whatever the layer
        raise TraceFormatError(file, "file", "a readable numpy .npz archive", f"{type(e).__name__}: {e}") from None
    with z:
        unknown = sorted(set(z.files) - set(ARRAYS))
        if unknown:
            raise TraceFormatError(file, "arrays", f"names among {sorted(ARRAYS)}", f"unknown {unknown}")
        for key in z.files:
            try:
                data[key] = z[key]
            except Exception as e:  # a corrupted member (CRC, deflate), pickled objects, a bad .npy header
                raise TraceFormatError(file, key, "a readable .npy member without pickled objects",
                                       f"{type(e).__name__}: {e}") from None
    for key in REQUIRED:
        if key not in data:
            raise TraceFormatError(file, key, "an array in the archive", f"arrays {sorted(data)}")
    for key, arr in data.items():
        ndim, kinds, what = ARRAYS[key]
        if arr.dtype.kind not in kinds:
            raise TraceFormatError(file, key, what, f"dtype {arr.dtype}")
        if arr.ndim != ndim:
            raise TraceFormatError(file, key, f"{ndim} dimensions", f"shape {list(arr.shape)}")
    return data


def _ref_meta(file: str, text: str) -> dict:
    """The archive's `meta` JSON object, with the types of the keys the importer reads checked."""
    try:
        ref = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise TraceFormatError(file, "meta", "a JSON object", f"invalid JSON ({e})") from None
    if not isinstance(ref, dict):
        raise TraceFormatError(file, "meta", "a JSON object", json_found(ref))
    for key, ok, expected, required in (("model", lambda v: isinstance(v, str), "a string", True),
                                        ("num_experts", is_int, "an integer", True),
                                        ("top_k", is_int, "an integer", True),
                                        ("shared_experts", is_int, "an integer", False),
                                        ("weights", lambda v: isinstance(v, str), "a string", False)):
        if key not in ref:
            if required:
                raise TraceFormatError(file, f"meta.{key}", expected, "nothing")
            continue
        if not ok(ref[key]):
            raise TraceFormatError(file, f"meta.{key}", expected, json_found(ref[key]))
    return ref


def reference_to_arrays(src: str | Path, router: str | None = None, renormalize: bool | None = None) -> TraceArrays:
    """Read one reference `.npz` into native arrays (checked by the writer's validation)."""
    src = Path(src)
    file = str(src)
    d = _load_npz(src)
    ref = _ref_meta(file, str(d["meta"]))
    model = ref["model"]
    known = next((v for k, v in KNOWN_ROUTERS.items() if model.startswith(k)), None)
    if known is None and (router is None or renormalize is None):
        raise TraceFormatError(file, "meta.model", f"a model among {sorted(KNOWN_ROUTERS)} or explicit "
                               "--router and --renormalize", repr(model))
    router = router or known["router"]
    renormalize = known["renormalize"] if renormalize is None else renormalize
    ids, offsets = d["ids"], d["seq_offsets"]
    N = ids.shape[0]
    if offsets.size < 2 or offsets[0] != 0 or offsets[-1] != N or (np.diff(offsets.astype(np.int64)) < 0).any():
        found = f"{offsets.size} offsets" if offsets.size < 2 else f"{offsets[:3].tolist()}...{offsets[-1]}"
        raise TraceFormatError(file, "seq_offsets", f"at least 2 non-decreasing offsets from 0 to N={N}", found)
    offsets = offsets.astype(np.int64)  # in 0..N: exact
    for key, shape in (("phase", (N,)), ("weights", ids.shape)):
        if key in d and d[key].shape != shape:
            raise TraceFormatError(file, key, f"shape {list(shape)} (as ids)", f"shape {list(d[key].shape)}")
    lengths = np.diff(offsets)
    request_id = np.repeat(np.arange(len(lengths), dtype=np.int32), lengths)
    position = (np.arange(N) - np.repeat(offsets[:-1], lengths)).astype(np.int32)
    weights = d["weights"].astype(np.float32) if "weights" in d else None
    missing = ["logits", "arrival_s"] + ([] if weights is not None else ["weights"])
    notes = ["positions count from each sequence's first recorded token"]
    phase = d["phase"]  # checked as it is (0 or 1) before it is stored as int8
    if N and (phase == 1).all():
        missing.append("prompt_tokens")
        notes.append("decode tokens only: prompt length unknown, positions are relative")
    # slot 0 is the top-1 only where the weights say so everywhere (or there is one slot)
    ids_ordered = ids.shape[2] == 1 or (weights is not None and bool((weights[..., :-1] >= weights[..., 1:]).all()))
    if not ids_ordered:
        notes.append("id order inside a row is not by weight: slot 0 is not the top-1 expert")
    meta = TraceMeta(
        model=model, num_experts=ref["num_experts"], top_k=ref["top_k"],
        moe_layers=tuple(int(x) for x in d["layers"]), router=router, renormalize=bool(renormalize),
        shared_experts=ref.get("shared_experts", 0), weights_kind=ref.get("weights", "none"),
        ids_ordered=ids_ordered, missing=tuple(missing),
        provenance={"importer": "lynx_sim.traces.convert", "source_file": src.name, "notes": notes,
                    "reference_meta": ref},
    )
    arrays = TraceArrays(meta=meta, request_id=request_id, position=position, phase=phase, ids=ids, weights=weights)
    check_arrays(arrays, file=file)  # errors name the archive, not the destination
    return arrays


def convert(src: str | Path, dst: str | Path, router: str | None = None, renormalize: bool | None = None) -> Path:
    """Convert a reference `.npz` into a native trace file at `dst`."""
    arrays = reference_to_arrays(src, router, renormalize)
    return write_trace(dst, arrays, float_dtype="float16")
