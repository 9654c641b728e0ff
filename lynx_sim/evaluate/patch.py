"""Apply a policy from the registry inside a Hugging Face MoE model's MoE blocks.

Each router module (lynx_sim/traces/record.py: router_modules) returns (logits, weights, ids)
and its block hands ids and weights to the experts. A forward hook replaces them with the
policy's choice for the same rows, so the experts compute what the policy selected and every
later layer and token sees the consequence (closed loop). One router call is one layer of one
forward: the policy sees that layer's real batch (a decode step of B sequences: B rows), as an
[1, B, ...] batch. Phase: a forward whose cache is empty is a prefill, any other a decode step;
policies that declare `decode_only` leave prefill untouched. A slot the policy drops goes to the
experts' "no expert" index E (transformers' experts skip it) with weight 0.

Per-layer statistics of every call are kept (distinct experts loaded, the fidelity measures).
Rules whose learned statistics are per layer of a trace (prune, sere, layer_k, oracle) need the
layer index and are not supported here yet: they raise their own clear error.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch

from ..policies.base import BatchRouting, Policy
from ..traces.record import router_modules


@dataclass
class LayerStats:
    calls: int = 0
    acted: int = 0
    distinct: list = field(default_factory=list)  # distinct experts per decode call (what a step loads)
    vanilla_distinct: list = field(default_factory=list)
    fidelity: dict = field(default_factory=lambda: defaultdict(list))


class PolicyPatch:
    """Context manager: `with PolicyPatch(model, policy) as p: model.generate(...)`; p.stats[l]."""

    MEASURES = ("top1_retention", "gate_mass_retained", "slots_changed", "kl_to_router_nats")

    def __init__(self, model, policy: Policy):
        self.model, self.policy = model, policy
        self.routers = router_modules(model)
        self.stats = [LayerStats() for _ in self.routers]
        self.phase = "prefill"

    def __enter__(self) -> "PolicyPatch":
        base = self.model.base_model
        self._handles = [base.register_forward_pre_hook(self._phase_hook, with_kwargs=True)]
        self._handles += [mod.register_forward_hook(self._hook(i)) for i, (_, mod) in enumerate(self.routers)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()

    def _phase_hook(self, module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        self.phase = "prefill" if cache is None or cache.get_seq_length() == 0 else "decode"

    def _hook(self, i: int):
        def hook(module, args, output):
            logits, weights, ids = output
            E = logits.shape[-1]
            flat_ids = ids.reshape(-1, ids.shape[-1])
            st = self.stats[i]
            st.calls += 1
            if self.phase == "prefill" and self.policy.decode_only:
                return None
            batch = BatchRouting(flat_ids[None].long(), weights.reshape(flat_ids.shape)[None].float(),
                                 logits.reshape(-1, E)[None].float(), ids_ordered=not _unordered(module))
            sel = self.policy.select(batch)
            if self.phase == "decode":
                st.distinct.append(int(sel.fidelity.distinct_experts[0]))
                st.vanilla_distinct.append(int(torch.unique(flat_ids).numel()))
                for m in self.MEASURES:
                    st.fidelity[m].append(float(getattr(sel.fidelity, m)[0]))
            if not sel.acted:
                return None
            st.acted += 1
            new_ids = sel.ids[0]
            new_w = sel.weights[0] if sel.weights is not None else weights.reshape(flat_ids.shape).float()
            new_w = torch.where(new_ids >= 0, new_w, 0.0)
            new_ids = torch.where(new_ids >= 0, new_ids, E)  # transformers' experts skip index E
            return logits, new_w.to(weights.dtype).reshape(weights.shape), new_ids.to(ids.dtype).reshape(ids.shape)
        return hook


def _unordered(router) -> bool:
    """DeepSeek-V3's router returns its top-k unsorted (slot 0 is not the top-1)."""
    return type(router).__name__.startswith("DeepseekV3")
