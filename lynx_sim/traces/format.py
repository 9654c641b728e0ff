"""The native routing-trace format, version 1: field table and metadata schema.

The human-readable specification is `traces/FORMAT.md`; this module is its executable twin and
the single place that lists fields, dtypes and shapes. A trace is one safetensors file
(no pickle, memory-mapped on read). N = tokens, L = MoE layers, k = experts per token,
E = routed experts.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from .errors import TraceFormatError

FORMAT_NAME = "lynx-moe-trace"
FORMAT_VERSION = 1
SUFFIX = ".safetensors"

ROUTERS = ("softmax", "grouped_topk", "sigmoid")
PHASE_PREFILL, PHASE_DECODE = 0, 1

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
    missing: tuple[str, ...] = ()  # what the source could not provide, e.g. ("logits",)
    provenance: dict = field(default_factory=dict)  # source, tool, seed, commit, caveats
    format_version: int = FORMAT_VERSION

    @property
    def num_layers(self) -> int:
        return len(self.moe_layers)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, file: str = "<memory>") -> "TraceMeta":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise TraceFormatError(file, "metadata", "a JSON object", f"invalid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise TraceFormatError(file, "metadata", "a JSON object", type(raw).__name__)
        version = raw.get("format_version")
        if version != FORMAT_VERSION:
            raise TraceFormatError(file, "format_version", f"{FORMAT_VERSION} (this reader)", repr(version))
        known = set(cls.__dataclass_fields__)
        required = {"model", "num_experts", "top_k", "moe_layers"}
        for name in sorted(required - set(raw)):
            raise TraceFormatError(file, name, "a metadata entry", "nothing")
        extra = sorted(set(raw) - known)
        if extra:
            raise TraceFormatError(file, "metadata", f"keys among {sorted(known)}", f"unknown keys {extra}")
        raw["moe_layers"] = tuple(raw["moe_layers"])
        raw["missing"] = tuple(raw.get("missing", ()))
        meta = cls(**raw)
        meta.check(file)
        return meta

    def check(self, file: str = "<memory>") -> None:
        """Raise TraceFormatError on a metadata value that cannot be right."""

        def need(ok: bool, name: str, expected: str, found) -> None:
            if not ok:
                raise TraceFormatError(file, name, expected, repr(found))

        need(isinstance(self.num_experts, int) and self.num_experts >= 1, "num_experts", "an int >= 1", self.num_experts)
        need(isinstance(self.top_k, int) and 1 <= self.top_k <= self.num_experts, "top_k",
             f"an int in 1..num_experts={self.num_experts}", self.top_k)
        need(len(self.moe_layers) >= 1 and all(isinstance(x, int) for x in self.moe_layers), "moe_layers",
             "a non-empty list of layer indices", self.moe_layers)
        need(self.router in ROUTERS, "router", f"one of {ROUTERS}", self.router)
        need(isinstance(self.renormalize, bool), "renormalize", "true or false", self.renormalize)
        need(self.num_experts % max(self.n_group, 1) == 0 and 1 <= self.topk_group <= self.n_group, "n_group",
             "n_group dividing num_experts and 1 <= topk_group <= n_group", (self.n_group, self.topk_group))
