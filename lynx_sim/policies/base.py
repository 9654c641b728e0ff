"""The policy interface shared by the simulator and the GPU executor (STYLE.md item 3).

A policy maps one decode batch's routing at every MoE layer to each token's expert ids and
weights. `Policy.select` is a template method: it checks the inputs, applies the phase gating
the policy declares, calls the policy's own `route`, checks the output and attaches the
fidelity measures. Tensors are layer-major (L, B, ...) so that rules that act per layer and per
batch vectorise over layers with plain torch reductions; nothing loops over tokens in Python.

Output convention: ids [L, B, k]; a rule that gives a token fewer than k experts marks the
unused slots with DROPPED (-1) and weight 0. Every token keeps at least one expert.

Backends: every policy takes `backend` (auto | torch | compiled). Some work has compiled CPU
kernels (numba): the output check (check_cpu.py), the fidelity measures (fidelity_cpu.py) and
Lynx's selection (lynx_cpu.py); each has a torch twin, which is what a GPU batch runs. `auto`
takes the kernels for CPU tensors, `torch` never (the GPU's code path, on any device), `compiled`
insists on them. `Policy.compiled_path` is the one place that reads the choice.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

from ..routing import RouterSpec
from .fidelity import DROPPED, Fidelity, measure
from .params import check_choice

BACKENDS = ("auto", "torch", "compiled")


def device_type(where) -> str:
    """'cpu', 'cuda', ... of a tensor, a torch.device or a device string."""
    if isinstance(where, torch.Tensor):
        return where.device.type
    return torch.device(where).type


def output_violation(ids: torch.Tensor, weights: torch.Tensor | None, E: int) -> str | None:
    """The first broken rule of the output convention (torch reductions, any device), or None."""
    if ((ids < DROPPED) | (ids >= E)).any():
        return "ids outside -1..E-1"
    if (ids == DROPPED).all(-1).any():
        return "a token left with no expert"
    s = torch.sort(ids, -1).values
    if ((s[..., 1:] == s[..., :-1]) & (s[..., 1:] != DROPPED)).any():
        return "an expert repeated within a token"
    if weights is not None and (~torch.isfinite(weights).all() or (weights < 0).any()
                                or (weights[ids == DROPPED] != 0).any()):
        return "weights not finite and >= 0, or non-zero on a dropped slot"
    return None


class PolicyInputError(ValueError):
    """The batch lacks what the policy needs, or has the wrong shape."""


@dataclass(frozen=True)
class PolicyContext:
    """What a policy may know besides one batch: the router, and the modelled cost of one more
    distinct expert in one decode MoE layer (bytes of an expert / achievable bandwidth)."""

    router: RouterSpec
    expert_time_s: float = 0.0


@dataclass
class BatchRouting:
    """One batch of B tokens at L MoE layers, as the model routed it."""

    ids: torch.Tensor  # [L, B, k] int64, the model's own top-k
    weights: torch.Tensor | None = None  # [L, B, k] gate weights the model used
    logits: torch.Tensor | None = None  # [L, B, E] raw router logits
    decode: torch.Tensor | None = None  # [B] bool, True for decode tokens (None: all decode)
    ids_ordered: bool = True  # slot 0 holds each token's top-1 expert
    logits_filled: bool = False  # logits are stand-ins (approximate.py): fidelity must not read them

    @property
    def num_tokens(self) -> int:
        return int(self.ids.shape[1])

    def all_decode(self) -> bool:
        return self.decode is None or bool(self.decode.all())


@dataclass
class Selection:
    """A policy's answer for one batch, with its fidelity against the model's own routing."""

    ids: torch.Tensor  # [L, B, k] int64; DROPPED (-1) marks a slot the policy left empty
    weights: torch.Tensor | None  # [L, B, k]
    acted: bool  # False when gating left the model's routing untouched
    fidelity: Fidelity = field(default=None)


class Policy(ABC):
    """Base class: subclasses set `name`, `needs`, `decode_only` and implement `route`."""

    name: ClassVar[str] = ""
    needs: ClassVar[tuple[str, ...]] = ("ids",)  # fields of BatchRouting the rule reads
    decode_only: ClassVar[bool] = False  # act only on batches made entirely of decode tokens
    needs_profile: ClassVar[bool] = False  # learns from a routing profile (trace statistics) in `prepare`
    neutral: ClassVar[dict] = {}  # parameters under which the rule must equal vanilla (tested; read through
    # neutral_params(router), which rules whose neutral values depend on the router override)
    layer_state: ClassVar[tuple[str, ...]] = ()  # attributes learned per MoE layer (dim 0), set by prepare
    overhead_us: float = 0.0  # the rule's own GPU time per MoE layer (set from its config by build_policy)

    def __init__(self, ctx: PolicyContext | RouterSpec, backend: str = "auto"):
        self.ctx = ctx if isinstance(ctx, PolicyContext) else PolicyContext(ctx)
        self.router = self.ctx.router
        self.prepared = False
        self.backend = check_choice(self.name, "backend", backend, BACKENDS)

    @classmethod
    def neutral_params(cls, router: RouterSpec) -> dict | None:
        """Parameters under which the rule must equal vanilla on this router (tested); None: none do."""
        return cls.neutral

    def compiled_path(self, where) -> bool:
        """Whether compiled kernels take this policy's work for a batch on `where` (a tensor, a
        torch.device or a device string): the one place that reads `backend`. Here, for every
        rule: numba kernels (the output check, the fidelity measures) for CPU tensors under
        auto and compiled, never under torch; a non-CPU batch under compiled is refused, as
        lynx_sim has no GPU kernels of its own. Lynx extends it with its selection kernels."""
        if self.backend == "torch":
            return False
        kind = device_type(where)
        if kind == "cpu":
            return True
        if self.backend == "compiled":
            raise PolicyInputError(f"policy '{self.name}': backend=compiled: its compiled kernels run on CPU tensors, "
                                   f"this batch is on {kind} (backend=auto takes the torch path there)")
        return False

    def params(self) -> dict:
        """The policy's parameters, for summaries."""
        return {}

    def prepare(self, profile) -> None:
        """Learn what the rule needs from a routing profile (a `RoutingProfile`); default: nothing."""
        self.prepared = True

    def at_layer(self, layer: int) -> "Policy":
        """This policy for one MoE layer of a model run layer by layer (the closed loop, where a
        router sees a batch of one layer): a rule with per-layer state (`layer_state`) returns a
        shallow copy holding that layer's slice, so its batches are [1, B, ...]; others return self."""
        if not self.layer_state:
            return self
        if not self.prepared:
            raise PolicyInputError(f"policy '{self.name}' learns from trace statistics: call prepare(profile) first")
        L = int(getattr(self, self.layer_state[0]).shape[0])
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < L:
            raise PolicyInputError(f"policy '{self.name}': layer: expected an MoE layer index in 0..{L - 1} "
                                   f"(profiled on {L} layers), found {layer!r}")
        view = copy.copy(self)
        for name in self.layer_state:
            setattr(view, name, getattr(self, name)[layer:layer + 1])
        return view

    def check_available(self, fields, where: str) -> None:
        """Fail before a run starts when its trace lacks what this policy reads."""
        missing = [n for n in self.needs if n not in fields]
        if missing:
            raise PolicyInputError(
                f"{where}: policy '{self.name}' needs router {', '.join(missing)}, and this trace has none "
                f"(it has {', '.join(sorted(fields))}). Use a trace with full router logits (the synthetic "
                f"generator, trace=synth, or a recorded trace), another policy, or opt into the documented "
                f"approximation with approximate_missing=lowest_bin.")

    def select(self, batch: BatchRouting) -> Selection:
        self._check(batch)
        if self.needs_profile and not self.prepared:
            raise PolicyInputError(f"policy '{self.name}' learns from trace statistics: call prepare(profile) first")
        if self.decode_only and not batch.all_decode():
            sel = Selection(batch.ids, batch.weights, acted=False)
        else:
            ids, weights = self.route(batch)
            if not (ids is batch.ids and weights is batch.weights):  # the trace's own routing was checked at load
                self._check_output(batch, ids, weights)
            sel = Selection(ids, weights, acted=True)
        compiled = self.compiled_path(sel.ids) and device_type(sel.ids) == "cpu" and device_type(batch.ids) == "cpu"
        sel.fidelity = measure(batch, sel.ids, sel.weights, self.router, compiled=compiled)
        return sel

    def _check_output(self, batch: BatchRouting, ids: torch.Tensor, weights: torch.Tensor | None) -> None:
        """A rule's answer must follow the output convention; a violation is a bug in the rule."""
        if ids.shape != batch.ids.shape or ids.dtype != torch.int64:
            bad = f"ids {list(ids.shape)} {ids.dtype}, expected {list(batch.ids.shape)} int64"
        elif weights is not None and weights.shape != ids.shape:
            bad = f"weights {list(weights.shape)}, expected {list(ids.shape)}"
        elif self.compiled_path(ids) and device_type(ids) == "cpu" and (weights is None or device_type(weights) == "cpu"):
            from .check_cpu import MESSAGES, violation  # one compiled pass (the torch check below is its twin)

            w = weights.contiguous().numpy() if weights is not None else np.zeros((1, 1, 1), np.float32)
            bad = MESSAGES.get(violation(ids.contiguous().numpy(), w, self.router.num_experts, weights is not None))
        else:
            bad = output_violation(ids, weights, self.router.num_experts)
        if bad:
            raise AssertionError(f"policy '{self.name}' broke the output convention: {bad}")

    @abstractmethod
    def route(self, batch: BatchRouting) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return (ids [L, B, k], weights [L, B, k]) for an eligible batch."""

    def _check(self, batch: BatchRouting) -> None:
        E, k = self.router.num_experts, self.router.top_k
        if batch.ids.dim() != 3 or batch.ids.shape[-1] != k:
            raise PolicyInputError(f"policy '{self.name}': ids: expected [L, B, k={k}], found {list(batch.ids.shape)}")
        L, B, _ = batch.ids.shape
        for need in self.needs:
            if getattr(batch, need) is None:
                raise PolicyInputError(
                    f"policy '{self.name}' needs router {need}, and this trace has none. Use a trace with "
                    f"full router logits (the synthetic generator or a recorded trace), or another policy.")
        if batch.logits is not None and tuple(batch.logits.shape) != (L, B, E):
            raise PolicyInputError(f"policy '{self.name}': logits: expected [L={L}, B={B}, E={E}], "
                                   f"found {list(batch.logits.shape)}")
        if batch.weights is not None and batch.weights.shape != batch.ids.shape:
            raise PolicyInputError(f"policy '{self.name}': weights: expected {list(batch.ids.shape)}, "
                                   f"found {list(batch.weights.shape)}")
