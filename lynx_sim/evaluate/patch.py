"""Apply a policy from the registry inside a Hugging Face MoE model's MoE blocks.

Each router module (lynx_sim/traces/record.py: router_modules) returns (logits, weights, ids)
and its block hands ids and weights to the experts. A forward hook replaces them with the
policy's choice for the same rows, so the experts compute what the policy selected and every
later layer and token sees the consequence (closed loop). One router call is one layer of one
forward: the policy (its `at_layer` view, which holds that layer's learned state) sees that
layer's real batch as a [1, rows, ...] batch. Phase: a forward whose cache is empty is a
prefill, any other a decode step; policies that declare `decode_only` leave prefill untouched.
A slot the policy drops gets weight 0 and, as its id, the token's first kept expert: every
experts implementation of transformers then adds an exact zero for it. (Index E, the "no expert"
sentinel, is masked only under expert parallelism; the default grouped_mm implementation
otherwise leaves its rows uninitialised, and 0 x NaN poisons the token.)

Only live rows form the policy's batch, as in a server: in a prefill the prompt tokens (not the
left padding, by the attention mask); in a decode step the sequences still running (a sequence
whose input is an end-of-sequence token has finished: a server would have retired it, while
generate() keeps computing it until the whole batch ends). Other rows keep the model's routing
and count in no statistic.

Per-layer statistics of every decode call are kept (distinct experts loaded, the fidelity measures).
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
    rows: list = field(default_factory=list)  # live rows per decode call (the real batch size)
    fidelity: dict = field(default_factory=lambda: defaultdict(list))


class PolicyPatch:
    """Context manager: `with PolicyPatch(model, policy, eos) as p: model.generate(...)`; p.stats[l]."""

    MEASURES = ("top1_retention", "gate_mass_retained", "slots_changed", "kl_to_router_nats")

    def __init__(self, model, policy: Policy, eos: set[int] | None = None):
        self.model, self.policy = model, policy
        self.routers = router_modules(model)
        self.layers = [policy.at_layer(i) for i in range(len(self.routers))]
        self.eos = torch.tensor(sorted(eos or ()), dtype=torch.long)
        self.stats = [LayerStats() for _ in self.routers]
        self.phase = "prefill"
        self.live: torch.Tensor | None = None  # [rows] bool of the current forward
        self.finished: torch.Tensor | None = None  # [b] bool: sequences that ended

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
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:  # embeddings given: every row is live
            self.live = None
            return
        b, T = ids.shape
        mask = kwargs.get("attention_mask")
        if self.phase == "prefill" or self.finished is None or self.finished.shape[0] != b:
            self.finished = torch.zeros(b, dtype=torch.bool)
        if self.phase == "decode":
            self.finished |= torch.isin(ids[:, 0].cpu(), self.eos)
        live = ~self.finished[:, None].expand(b, T)
        if mask is not None and mask.dim() == 2:
            live = live & mask[:, -T:].cpu().bool()
        self.live = live.reshape(-1)

    def _hook(self, i: int):
        def hook(module, args, output):
            logits, weights, ids = output
            E = logits.shape[-1]
            flat_ids = ids.reshape(-1, ids.shape[-1])
            flat_w = weights.reshape(flat_ids.shape)
            st = self.stats[i]
            st.calls += 1
            policy = self.layers[i]
            if self.phase == "prefill" and policy.decode_only:
                return None
            rows = (torch.nonzero(self.live).flatten().to(ids.device) if self.live is not None
                    and self.live.shape[0] == flat_ids.shape[0] else torch.arange(flat_ids.shape[0], device=ids.device))
            if rows.numel() == 0:
                return None
            live_ids = flat_ids[rows].long()
            batch = BatchRouting(live_ids[None], flat_w[rows][None].float(), logits.reshape(-1, E)[rows][None].float(),
                                 ids_ordered=not _unordered(module))
            sel = policy.select(batch)
            if self.phase == "decode":
                st.rows.append(int(rows.numel()))
                st.distinct.append(int(sel.fidelity.distinct_experts[0]))
                st.vanilla_distinct.append(int(torch.unique(live_ids).numel()))
                for m in self.MEASURES:
                    st.fidelity[m].append(float(getattr(sel.fidelity, m)[0]))
            if not sel.acted:
                return None
            st.acted += 1
            new_ids = sel.ids[0]
            new_w = sel.weights[0] if sel.weights is not None else batch.weights[0]
            kept = new_ids >= 0
            new_w = torch.where(kept, new_w, 0.0)
            first = new_ids.gather(-1, kept.int().argmax(-1, keepdim=True))  # every token keeps one
            new_ids = torch.where(kept, new_ids, first)  # weight 0 on an expert the token loads anyway
            out_ids, out_w = flat_ids.clone(), flat_w.clone()
            out_ids[rows] = new_ids.to(ids.dtype)
            out_w[rows] = new_w.to(weights.dtype)
            return logits, out_w.reshape(weights.shape), out_ids.reshape(ids.shape)
        return hook


def _unordered(router) -> bool:
    """DeepSeek-V3's router returns its top-k unsorted (slot 0 is not the top-1)."""
    return type(router).__name__.startswith("DeepseekV3")
