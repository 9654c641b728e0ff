"""The routing profile for rules that learn per-layer statistics (prune, sere, layer_k) in the
closed loop: from a trace recorded from the same model (`python -m lynx_sim.traces record`),
or recorded here from the model's own routing (vanilla, greedy) on profile prompts. As in
the simulator (policies/routing_profile.py), decode tokens are used when there are any.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..policies.routing_profile import RoutingProfile
from ..traces.record import RouterTap, assemble_rows, meta_for, pad_left


def from_model(model, prompts: list[list[int]], *, batch_size: int, max_new_tokens: int, pad: int, eos: set[int],
               held_out: bool, max_tokens: int = 4096) -> RoutingProfile:
    """Generate greedily from tokenised `prompts` with the model's own routing and learn from it."""
    if not prompts:
        raise ValueError("routing profile: no profile prompts")
    meta = meta_for(model, "routing_profile")
    dev = next(model.parameters()).device
    arrays, decode_rows = [], 0
    for i0 in range(0, len(prompts), batch_size):
        ids, mask = pad_left(prompts[i0:i0 + batch_size], pad)
        with RouterTap(model) as tap, torch.no_grad():
            out = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=pad, use_cache=True)
        arrays.append(assemble_rows(tap, mask, out[:, ids.shape[1]:].cpu(), eos, meta, i0))
        decode_rows += int((arrays[-1].phase == 1).sum())
        if decode_rows >= max_tokens:
            break
    return RoutingProfile.from_arrays(arrays, held_out, max_tokens)


def profile_for(policy: str, model, tok, *, trace: str | None, prompts: str | None, in_sample: bool,
                batch_size: int, max_new_tokens: int, pad: int, eos: set[int], max_tokens: int = 4096,
                chat: bool = False) -> tuple[RoutingProfile | None, dict | None]:
    """(routing profile, its summary for the results) for a registry policy that learns per-layer
    statistics, from `trace` when given, else from the model's routing on the `prompts` file
    (`in_sample`: those are the prompts being evaluated); (None, None) for other policies."""
    from ..policies import POLICIES
    from ..traces.record import read_prompts, tokenize

    if policy not in POLICIES or not POLICIES[policy].needs_profile:
        return None, None
    if trace:
        profile, info = from_trace(trace, model, max_tokens), {"source": f"trace:{trace}", "in_sample": None}
    elif prompts:
        profile = from_model(model, tokenize(tok, read_prompts(prompts), chat), batch_size=batch_size,
                           max_new_tokens=max_new_tokens, pad=pad, eos=eos, held_out=not in_sample, max_tokens=max_tokens)
        info = {"source": f"prompts:{prompts}", "in_sample": in_sample}
    else:
        raise ValueError(f"policy '{policy}' learns per-layer statistics: give --profile-trace or --profile-prompts")
    return profile, {**info, "tokens": int(profile.ids.shape[0])}


def from_trace(path: str | Path, model, max_tokens: int = 4096) -> RoutingProfile:
    """A recorded trace of the same model: its router shape must be the model's."""
    from ..traces.reader import open_trace
    from ..traces.source import FileSource

    trace = open_trace(path)
    want = meta_for(model, "model")
    for name in ("num_experts", "top_k", "num_layers", "router"):
        have, exp = getattr(trace.meta, name), getattr(want, name)
        if have != exp:
            raise ValueError(f"{path}: routing profile trace: {name}: expected {exp} (the model's), found {have} "
                             f"(recorded from {trace.meta.model!r})")
    return RoutingProfile.from_source(FileSource(trace), max_tokens)
