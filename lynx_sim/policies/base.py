"""The policy interface shared by the simulator and the GPU executor (STYLE.md item 3).

A policy maps one decode batch's routing at every MoE layer to each token's expert ids and
weights. `Policy.select` is a template method: it checks the inputs, applies the phase gating
the policy declares, calls the policy's own `route`, checks the output and attaches the
fidelity measures. Tensors are layer-major (L, B, ...) so that rules that act per layer and per
batch vectorise over layers with plain torch reductions; nothing loops over tokens in Python.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..routing import RouterSpec
from .fidelity import Fidelity, measure


class PolicyInputError(ValueError):
    """The batch lacks what the policy needs, or has the wrong shape."""


@dataclass
class BatchRouting:
    """One batch of B tokens at L MoE layers, as the model routed it."""

    ids: torch.Tensor  # [L, B, k] int64, the model's own top-k
    weights: torch.Tensor | None = None  # [L, B, k] gate weights the model used
    logits: torch.Tensor | None = None  # [L, B, E] raw router logits
    decode: torch.Tensor | None = None  # [B] bool, True for decode tokens (None: all decode)
    ids_ordered: bool = True  # slot 0 holds each token's top-1 expert

    @property
    def num_tokens(self) -> int:
        return int(self.ids.shape[1])

    def all_decode(self) -> bool:
        return self.decode is None or bool(self.decode.all())


@dataclass
class Selection:
    """A policy's answer for one batch, with its fidelity against the model's own routing."""

    ids: torch.Tensor  # [L, B, k] int64
    weights: torch.Tensor | None  # [L, B, k]
    acted: bool  # False when gating left the model's routing untouched
    fidelity: Fidelity = field(default=None)


class Policy(ABC):
    """Base class: subclasses set `name`, `needs`, `decode_only` and implement `route`."""

    name: ClassVar[str] = ""
    needs: ClassVar[tuple[str, ...]] = ("ids",)  # fields of BatchRouting the rule reads
    decode_only: ClassVar[bool] = False  # act only on batches made entirely of decode tokens

    def __init__(self, router: RouterSpec):
        self.router = router

    def params(self) -> dict:
        """The policy's parameters, for summaries."""
        return {}

    def check_available(self, fields, where: str) -> None:
        """Fail before a run starts when its trace lacks what this policy reads."""
        missing = [n for n in self.needs if n not in fields]
        if missing:
            raise PolicyInputError(
                f"{where}: policy '{self.name}' needs router {', '.join(missing)}, and this trace has none "
                f"(it has {', '.join(sorted(fields))}). Use a trace with full router logits (the synthetic "
                f"generator, trace=synth, or a recorded trace), or another policy.")

    def select(self, batch: BatchRouting) -> Selection:
        self._check(batch)
        if self.decode_only and not batch.all_decode():
            sel = Selection(batch.ids, batch.weights, acted=False)
        else:
            ids, weights = self.route(batch)
            sel = Selection(ids, weights, acted=True)
        sel.fidelity = measure(batch, sel.ids, self.router.num_experts)
        return sel

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
