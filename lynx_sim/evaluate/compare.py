"""Closed-loop measures of a policy against the same model with its own routing (vanilla).

For batches of prompts (left padded, so batch-aware rules see real decode batches):
- free-running greedy generation with and without the policy: per-token agreement of the
  outputs (over vanilla's tokens; a missing or extra token disagrees) and the first divergence;
- teacher-forced along vanilla's tokens, in decode steps (generate() with the next token forced,
  raw logits kept): KL(vanilla || policy) of the next-token distributions and top-1 agreement;
- perplexity of a text under both (its tokens forced one decode step at a time);
- from the patched runs' decode steps: distinct experts per layer (policy and vanilla) over the
  sequences still running (patch.py), their mean count, and the fidelity measures of the
  policies issue.
The keys of the result are documented in docs/evaluate.md.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..traces.record import generated_length, pad_left
from .patch import PolicyPatch


class ForceTokens:
    """A logits processor that makes generate() emit given tokens (the raw logits are kept by
    generate's output_logits=True, before this runs)."""

    def __init__(self, targets: torch.Tensor, prompt_len: int):
        self.targets, self.prompt_len = targets, prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.prompt_len
        forced = torch.full_like(scores, float("-inf"))
        tgt = self.targets[:, min(step, self.targets.shape[1] - 1)].to(scores.device)
        return forced.scatter_(1, tgt[:, None], 0.0)


def _generate(model, ids, mask, pad, n, processor=None):
    from transformers import LogitsProcessorList

    dev = next(model.parameters()).device
    with torch.no_grad():
        out = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=n, do_sample=False,
                             pad_token_id=pad, use_cache=True, return_dict_in_generate=True, output_logits=True,
                             logits_processor=LogitsProcessorList([processor]) if processor else None)
    return out.sequences[:, ids.shape[1]:].cpu(), torch.stack(out.logits, 1).float().cpu()  # [b, n], [b, n, V]


def compare(model, policy, prompts: list[list[int]], *, batch_size: int = 8, max_new_tokens: int = 32, pad: int = 0,
            eos: set[int] | None = None, text: list[int] | None = None, text_chunk: int = 128) -> dict:
    """The measures above for `policy` on `model` (a transformers MoE causal LM)."""
    eos = eos if eos is not None else set()
    agree = total = 0
    first_div, kl_sum, top1_sum, steps = [], 0.0, 0, 0
    patches = []
    for i0 in range(0, len(prompts), batch_size):
        ids, mask = pad_left(prompts[i0:i0 + batch_size], pad)
        gen_v, _ = _generate(model, ids, mask, pad, max_new_tokens)
        logits_v = _generate(model, ids, mask, pad, max_new_tokens, ForceTokens(gen_v, ids.shape[1]))[1]
        with PolicyPatch(model, policy, eos) as p:
            gen_q, _ = _generate(model, ids, mask, pad, max_new_tokens)
        with PolicyPatch(model, policy, eos) as p_forced:
            logits_q = _generate(model, ids, mask, pad, max_new_tokens, ForceTokens(gen_v, ids.shape[1]))[1]
        patches += [p, p_forced]
        len_v = [generated_length(r, eos) for r in gen_v.tolist()]
        len_q = [generated_length(r, eos) for r in gen_q.tolist()]
        for j in range(len(len_v)):
            n = len_v[j]
            a, b = gen_v[j, :n], gen_q[j, :min(n, len_q[j])]
            same = (a[:len(b)] == b)
            agree += int(same.sum())
            total += n
            bad = torch.nonzero(~same).flatten()
            first_div.append(int(bad[0]) if len(bad) else (len(b) if len(b) < n else n))
            lp_v = F.log_softmax(logits_v[j, :n], -1)
            lp_q = F.log_softmax(logits_q[j, :n], -1)
            kl_sum += float((lp_v.exp() * (lp_v - lp_q)).sum())
            top1_sum += int((logits_v[j, :n].argmax(-1) == logits_q[j, :n].argmax(-1)).sum())
            steps += n
    out = {"policy": policy.name, "prompts": len(prompts), "generated_tokens": total,
           "greedy_token_agreement": agree / max(total, 1),
           "first_divergence_mean": float(np.mean(first_div)) if first_div else None,
           "next_token_kl_nats": kl_sum / max(steps, 1), "next_token_top1_agreement": top1_sum / max(steps, 1)}
    out.update(_routing_stats(patches))
    if text:
        out["perplexity"] = perplexity(model, policy, text, text_chunk, pad)
    return out


def perplexity(model, policy, tokens: list[int], chunk: int = 128, pad: int = 0) -> dict:
    """exp(mean NLL) of `tokens`, in chunks: each chunk's first token is the prompt and the rest
    are forced one decode step at a time, vanilla and with the policy."""
    chunks = [tokens[i:i + chunk] for i in range(0, len(tokens), chunk) if len(tokens[i:i + chunk]) >= 2]
    if not chunks:
        raise ValueError("perplexity: the text needs at least 2 tokens")
    res = {}
    for who in ("vanilla", "policy"):
        nll, n = 0.0, 0
        for c in chunks:
            ids, mask = torch.tensor([c[:1]]), torch.ones(1, 1, dtype=torch.long)
            tgt = torch.tensor([c[1:]])
            run = lambda: _generate(model, ids, mask, pad, len(c) - 1, ForceTokens(tgt, 1))[1]  # noqa: E731
            if who == "policy":
                with PolicyPatch(model, policy):
                    logits = run()
            else:
                logits = run()
            nll -= float(F.log_softmax(logits[0], -1).gather(-1, tgt[0, :, None]).sum())
            n += len(c) - 1
        res[who] = math.exp(nll / n)
    return res


def _routing_stats(patches: list[PolicyPatch]) -> dict:
    L = len(patches[0].stats)
    dist = [float(np.mean(sum((p.stats[l].distinct for p in patches), []) or [np.nan])) for l in range(L)]
    vdist = [float(np.mean(sum((p.stats[l].vanilla_distinct for p in patches), []) or [np.nan])) for l in range(L)]
    fid = {}
    for m in PolicyPatch.MEASURES:
        vals = [v for p in patches for st in p.stats for v in st.fidelity[m]]
        fid[m] = float(np.nanmean(vals)) if vals and not np.all(np.isnan(vals)) else None
    rows = [r for p in patches for r in p.stats[0].rows]
    return {"decode_batch_rows_mean": float(np.mean(rows)) if rows else None,
            "distinct_experts_per_layer": {"policy": dist, "vanilla": vdist},
            "distinct_experts": {"policy": float(np.nanmean(dist)), "vanilla": float(np.nanmean(vdist))},
            "fidelity": fid}
