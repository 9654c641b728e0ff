"""The native routing-trace format, version 1: field table and metadata schema.

The human-readable specification is `traces/FORMAT.md`; this module is its executable twin and
the single place that lists fields, dtypes, shapes, metadata types and bounds. A trace is one
safetensors file (no pickle; read by positioned reads, never memory-mapped). N = tokens,
L = MoE layers, k = experts per token, E = routed experts.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np

from .errors import TraceFormatError

FORMAT_NAME = "lynx-moe-trace"
FORMAT_VERSION = 1
SUFFIX = ".safetensors"

ROUTERS = ("softmax", "grouped_topk", "sigmoid")
PHASE_PREFILL, PHASE_DECODE = 0, 1
MISSING_NAMES = ("logits", "weights", "arrival_s", "prompt_tokens")  # what `missing` may list

# Bounds on sizes the metadata announces, so that no reader or statistic allocates memory out of
# proportion to the file (a per-expert array is O(E), a per-layer one O(L), a pair of slots O(k^2)).
MAX_EXPERTS = 65536  # ids are int16 up to E = 32767, int32 above
MAX_TOP_K = 256
MAX_LAYERS = 1024  # MoE layers per trace
MAX_LAYER_INDEX = 1 << 20  # a model's layer index

# name -> (allowed safetensors dtypes, shape in symbols, required)
FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...], bool]] = {
    "request_id": (("I32",), ("N",), True),
    "position": (("I32",), ("N",), True),
    "phase": (("I8",), ("N",), True),
    "arrival_s": (("F64",), ("N",), False),
    "ids": (("I16", "I32"), ("N", "L", "k"), True),
    "weights": (("F16", "BF16", "F32"), ("N", "L", "k"), False),
    "logits": (("F16", "BF16", "F32"), ("N", "L", "E"), False),
}
FLOAT_DTYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}
# Relative precision of the stored float dtypes (2^-mantissa bits): the unit of the ordering tolerance.
FLOAT_EPS = {"F16": 2.0 ** -10, "BF16": 2.0 ** -7, "F32": 2.0 ** -23}

# header (`__metadata__`) keys; `checksums` holds the digests of `traces/FORMAT.md`, "Checksums"
HEADER_KEYS = ("format", "format_version", "meta", "checksums")
CHECKSUM_ALGORITHM = "sha256"


def json_found(value) -> str:
    """A metadata value as the file spells it, with its JSON type: `"a" (string)`, `5 (integer)`."""
    kinds = ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"), (list, "list"),
             (tuple, "list"), (dict, "object"), (type(None), "null"))
    kind = next((k for t, k in kinds if isinstance(value, t)), type(value).__name__)
    try:
        text = json.dumps(value, default=repr)
    except (TypeError, ValueError):
        text = repr(value)
    text = text if len(text) <= 80 else text[:77] + "..."
    return text if kind == "null" else f"{text} ({kind})"


def is_int(x) -> bool:
    """A real integer: not a bool, not a float with an integral value, not a string of digits."""
    return isinstance(x, int) and not isinstance(x, bool)


def distinct_keys(pairs: list) -> dict:
    """json `object_pairs_hook` refusing a key given twice (json keeps the last one silently)."""
    keys = [k for k, _ in pairs]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise ValueError(f"repeated keys {dup}")
    return dict(pairs)


@dataclass(frozen=True)
class TraceMeta:
    """Everything about a trace that is not per token. Stored as JSON in the file header."""

    model: str
    num_experts: int  # E, routed experts (shared experts are not in the ids)
    top_k: int  # k
    moe_layers: tuple[int, ...]  # the model's layer index of each of the L MoE layers
    router: str = "softmax"  # softmax | grouped_topk | sigmoid
    renormalize: bool = True  # top-k weights rescaled to sum to 1 by the model
    shared_experts: int = 0
    n_group: int = 1  # grouped_topk only: expert groups and groups kept per token
    topk_group: int = 1
    weights_kind: str = "none"  # what `weights` holds, in words ("none" when absent)
    ids_ordered: bool = True  # ids[..., 0] is each token's top-1 expert (slots by falling weight)
    router_bias: bool = False  # the model's choice added a bias the trace does not store (DeepSeek-V3)
    missing: tuple[str, ...] = ()  # what the source could not provide, e.g. ("logits",)
    provenance: dict = field(default_factory=dict)  # source, tool, seed, commit, caveats
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        # numpy scalars from a producer are the ints and bools they hold; lists become tuples
        for name in ("num_experts", "top_k", "shared_experts", "n_group", "topk_group", "format_version"):
            v = getattr(self, name)
            if isinstance(v, np.integer):
                object.__setattr__(self, name, int(v))
        for name in ("renormalize", "ids_ordered", "router_bias"):
            if isinstance(getattr(self, name), np.bool_):
                object.__setattr__(self, name, bool(getattr(self, name)))
        for name in ("moe_layers", "missing"):
            v = getattr(self, name)
            if isinstance(v, (list, tuple, np.ndarray)):
                object.__setattr__(self, name, tuple(int(x) if isinstance(x, np.integer) else x for x in v))

    @property
    def num_layers(self) -> int:
        return len(self.moe_layers)

    @property
    def ids_follow_logits(self) -> bool:
        """Whether the stored ids must be the router's top-k of the stored logits. Not when the
        model's choice used a bias the trace lacks: `router_bias`, or, in traces written before
        that key existed, a `weights_kind` that says 'bias-corrected' (the recorder's DeepSeek-V3)."""
        return not (self.router_bias or "bias-corrected" in self.weights_kind)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, file: str = "<memory>") -> "TraceMeta":
        if not isinstance(text, str):
            raise TraceFormatError(file, "metadata", "a JSON object in a string", json_found(text))
        try:
            raw = json.loads(text, object_pairs_hook=distinct_keys)
        except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
            raise TraceFormatError(file, "metadata", "a JSON object with distinct keys", f"invalid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise TraceFormatError(file, "metadata", "a JSON object", json_found(raw))
        version = raw.get("format_version")
        if not is_int(version) or version != FORMAT_VERSION:
            raise TraceFormatError(file, "format_version", f"{FORMAT_VERSION} (this reader)",
                                   "nothing" if "format_version" not in raw else json_found(version))
        known = set(cls.__dataclass_fields__)
        required = {"model", "num_experts", "top_k", "moe_layers"}
        for name in sorted(required - set(raw)):
            raise TraceFormatError(file, name, "a metadata entry", "nothing")
        extra = sorted(set(raw) - known)
        if extra:
            raise TraceFormatError(file, "metadata", f"keys among {sorted(known)}", f"unknown keys {extra}")
        for name in ("moe_layers", "missing"):  # JSON lists; anything else is left for check() to name
            if isinstance(raw.get(name), list):
                raw[name] = tuple(raw[name])
        meta = cls(**raw)
        meta.check(file)
        return meta

    def check(self, file: str = "<memory>") -> None:
        """Raise TraceFormatError, naming field, expected and found, on any metadata value of the
        wrong type or out of its bounds. Types first (a string is never compared with a number)."""

        def need(ok: bool, name: str, expected: str, found) -> None:
            if not ok:
                raise TraceFormatError(file, name, expected, json_found(found))

        need(is_int(self.format_version) and self.format_version == FORMAT_VERSION, "format_version",
             f"the integer {FORMAT_VERSION}", self.format_version)
        need(isinstance(self.model, str), "model", "a string", self.model)
        need(is_int(self.num_experts) and 1 <= self.num_experts <= MAX_EXPERTS, "num_experts",
             f"an integer in 1..{MAX_EXPERTS}", self.num_experts)
        E = self.num_experts
        need(is_int(self.top_k) and 1 <= self.top_k <= min(E, MAX_TOP_K), "top_k",
             f"an integer in 1..num_experts={E}" + (f" (at most {MAX_TOP_K})" if E > MAX_TOP_K else ""), self.top_k)
        layers = self.moe_layers
        need(isinstance(layers, tuple) and all(is_int(x) for x in layers), "moe_layers",
             "a list of integer layer indices", list(layers) if isinstance(layers, tuple) else layers)
        need(1 <= len(layers) <= MAX_LAYERS, "moe_layers", f"1..{MAX_LAYERS} layer indices", list(layers))
        need(all(0 <= x < MAX_LAYER_INDEX for x in layers), "moe_layers",
             f"layer indices in 0..{MAX_LAYER_INDEX - 1}", list(layers))
        need(len(set(layers)) == len(layers), "moe_layers", "distinct layer indices", list(layers))
        need(isinstance(self.router, str) and self.router in ROUTERS, "router", f"one of {ROUTERS}", self.router)
        for name in ("renormalize", "ids_ordered", "router_bias"):
            need(isinstance(getattr(self, name), bool), name, "true or false (a JSON boolean)", getattr(self, name))
        need(is_int(self.shared_experts) and 0 <= self.shared_experts <= MAX_EXPERTS, "shared_experts",
             f"an integer in 0..{MAX_EXPERTS}", self.shared_experts)
        need(is_int(self.n_group) and 1 <= self.n_group <= E and E % self.n_group == 0, "n_group",
             f"an integer dividing num_experts={E}", self.n_group)
        need(is_int(self.topk_group) and 1 <= self.topk_group <= self.n_group, "topk_group",
             f"an integer in 1..n_group={self.n_group}", self.topk_group)
        if self.router == "grouped_topk":
            need(self.topk_group * (E // self.n_group) >= self.top_k, "topk_group",
                 f"kept groups holding at least top_k={self.top_k} experts ({E // self.n_group} per group)",
                 self.topk_group)
        need(isinstance(self.weights_kind, str), "weights_kind", "a string", self.weights_kind)
        miss = self.missing
        need(isinstance(miss, tuple) and all(isinstance(x, str) and x in MISSING_NAMES for x in miss), "missing",
             f"a list of names among {list(MISSING_NAMES)}", list(miss) if isinstance(miss, tuple) else miss)
        need(len(set(miss)) == len(miss), "missing", "distinct names", list(miss))
        need(isinstance(self.provenance, dict), "provenance", "a JSON object", self.provenance)
        try:
            json.dumps(self.provenance)
        except (TypeError, ValueError) as e:
            raise TraceFormatError(file, "provenance", "a JSON object of JSON values", f"{e}") from None


# ---- checksums (`traces/FORMAT.md`, "Checksums") -------------------------------------------
# __metadata__["checksums"] = JSON {"algorithm": "sha256", "meta": <hex digest of the `meta`
# string's UTF-8 bytes>, "tensors": {name: {"dtype": D, "shape": [..], "digest": <hex digest of
# the tensor's stored bytes>}}}. dtype and shape are repeated so that a header edit that keeps
# the byte count (F16 -> BF16) still disagrees with them.


def digest_hex(data) -> str:
    """The checksum of bytes (or any buffer) in the format's algorithm, as hex."""
    import hashlib

    return hashlib.new(CHECKSUM_ALGORITHM, data).hexdigest()


def checksums_json(meta_text: str, tensors: dict[str, tuple[str, tuple[int, ...], str]]) -> str:
    """The `checksums` header value: tensors = {name: (safetensors dtype, shape, hex digest)}."""
    return json.dumps({"algorithm": CHECKSUM_ALGORITHM, "meta": digest_hex(meta_text.encode()),
                       "tensors": {n: {"dtype": d, "shape": list(s), "digest": h} for n, (d, s, h) in sorted(tensors.items())}},
                      sort_keys=True, separators=(",", ":"))


def parse_checksums(text, file: str, layout: dict[str, tuple[str, tuple[int, ...]]]) -> tuple[str, dict[str, str]]:
    """(meta digest, {tensor: digest}) from the `checksums` header value, which must list exactly
    the file's tensors with their dtypes and shapes (layout = {name: (dtype, shape)})."""
    def is_hex(h) -> bool:
        return isinstance(h, str) and len(h) == 64 and all(c in "0123456789abcdef" for c in h)

    if not isinstance(text, str):
        raise TraceFormatError(file, "checksums", "a JSON object in a string", json_found(text))
    try:
        raw = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise TraceFormatError(file, "checksums", "a JSON object", f"invalid JSON ({e})") from None
    if not isinstance(raw, dict) or set(raw) != {"algorithm", "meta", "tensors"}:
        raise TraceFormatError(file, "checksums", "an object with keys algorithm, meta, tensors",
                               f"keys {sorted(raw)}" if isinstance(raw, dict) else json_found(raw))
    if raw["algorithm"] != CHECKSUM_ALGORITHM:
        raise TraceFormatError(file, "checksums", f"algorithm '{CHECKSUM_ALGORITHM}'", json_found(raw["algorithm"]))
    if not is_hex(raw["meta"]):
        raise TraceFormatError(file, "checksums", f"a {CHECKSUM_ALGORITHM} hex digest of the metadata",
                               json_found(raw["meta"]))
    tensors = raw["tensors"]
    if not isinstance(tensors, dict) or set(tensors) != set(layout):
        raise TraceFormatError(file, "checksums", f"digests of exactly the file's tensors {sorted(layout)}",
                               f"digests of {sorted(tensors)}" if isinstance(tensors, dict) else json_found(tensors))
    digests = {}
    for name, (dtype, shape) in layout.items():
        e = tensors[name]
        if not isinstance(e, dict) or set(e) != {"dtype", "shape", "digest"} or not is_hex(e["digest"]):
            raise TraceFormatError(file, name, "a checksums entry {dtype, shape, digest}", json_found(e))
        if e["dtype"] != dtype or e["shape"] != list(shape):
            raise TraceFormatError(file, name, f"dtype {e['dtype']} and shape {e['shape']}, as its checksum records",
                                   f"dtype {dtype} and shape {list(shape)} in the header")
        digests[name] = e["digest"]
    return raw["meta"], digests


def content_hash(meta: TraceMeta, tensors: dict[str, tuple[str, tuple[int, ...], str]]) -> str:
    """One hex digest of a trace's content: the canonical metadata and every tensor's dtype, shape
    and digest. Equal for equal content, whatever the header's spacing or the tensors' order."""
    return digest_hex(json.dumps({"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
                                  "meta": json.loads(meta.to_json()),
                                  "tensors": {n: [d, list(s), h] for n, (d, s, h) in sorted(tensors.items())}},
                                 sort_keys=True, separators=(",", ":")).encode())
