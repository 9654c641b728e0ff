"""Record routing from Hugging Face transformers MoE models during `generate()`.

transformers (v5) gives every supported MoE block a router module (`MixtralTopKRouter`,
`Qwen2MoeTopKRouter`, `Qwen3MoeTopKRouter`, `OlmoeTopKRouter`, `DeepseekV3TopkRouter`,
`GptOssTopKRouter`) that returns (router logits, the weights used, the expert ids used), and
the block passes exactly those ids and weights to its experts. A forward hook on each router
therefore records the model's own choice, DeepSeek-V3's group-limited, bias-corrected selection
included, with no recomputation. Per generate() call: one prefill forward ([batch x padded
prompt] rows) then one forward per new token ([batch] rows); the recorder keeps each request's
real prompt tokens (left padding dropped, positions from 0) and the generated tokens the model
processed (up to its end-of-sequence token), and writes them in parts (`TraceWriter`), so
memory stays bounded by `chunk_tokens` rows whatever the run's length.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .arrays import TraceArrays, concat_arrays
from .format import TraceMeta
from .writer import TraceWriter

ROUTER_CLASS = re.compile(r"Top[Kk]Router$")
LAYER = re.compile(r"layers\.(\d+)\.")


@dataclass(frozen=True)
class Family:
    router: str  # our router kind (lynx_sim/routing.py)
    ids_ordered: bool  # slot 0 holds the top-1 (the model's topk is sorted)
    weights_kind: str
    router_bias: bool = False  # the choice adds a bias the trace does not store: ids need not be the logits' top-k


FAMILIES = {
    "mixtral": Family("softmax", True, "softmax probabilities of the top-k, renormalised to sum to 1"),
    "qwen2_moe": Family("softmax", True, "softmax probabilities of the top-k (renormalised when norm_topk_prob)"),
    "qwen3_moe": Family("softmax", True, "softmax probabilities of the top-k (renormalised when norm_topk_prob)"),
    "olmoe": Family("softmax", True, "softmax probabilities of the top-k (renormalised when norm_topk_prob)"),
    "deepseek_v3": Family("grouped_topk", False, "sigmoid scores of the chosen experts (bias-corrected, "
                          "group-limited choice), renormalised when norm_topk_prob, times routed_scaling_factor",
                          router_bias=True),
    "gpt_oss": Family("softmax", True, "softmax over the k chosen logits (= renormalised top-k softmax)"),
}


def router_modules(model) -> list[tuple[int, torch.nn.Module]]:
    """(model layer index, router module) of every MoE layer, in layer order."""
    found = []
    for name, mod in model.named_modules():
        if ROUTER_CLASS.search(type(mod).__name__):
            m = LAYER.search(name + ".")
            if m is None:
                raise ValueError(f"record: router {name!r} ({type(mod).__name__}) is not inside a numbered layer")
            found.append((int(m.group(1)), mod))
    if not found:
        raise ValueError(f"record: {type(model).__name__} has no router module of a supported family "
                         f"({', '.join(sorted(FAMILIES))}); transformers v5 MoE models name them *TopKRouter")
    return sorted(found, key=lambda x: x[0])


def meta_for(model, name: str, provenance: dict | None = None) -> TraceMeta:
    """The trace metadata of a supported model, from its config."""
    cfg = model.config
    fam = FAMILIES.get(cfg.model_type)
    if fam is None:
        raise ValueError(f"record: model_type {cfg.model_type!r} is not supported; supported: {sorted(FAMILIES)}")
    E = next(getattr(cfg, a) for a in ("num_local_experts", "num_experts", "n_routed_experts") if getattr(cfg, a, None))
    renorm = bool(getattr(cfg, "norm_topk_prob", True)) if cfg.model_type != "mixtral" else True
    if cfg.model_type == "gpt_oss":
        renorm = True
    shared = int(getattr(cfg, "n_shared_experts", 0) or (1 if getattr(cfg, "shared_expert_intermediate_size", 0) else 0))
    return TraceMeta(model=name, num_experts=int(E), top_k=int(cfg.num_experts_per_tok),
                     moe_layers=tuple(i for i, _ in router_modules(model)), router=fam.router, renormalize=renorm,
                     shared_experts=shared, n_group=int(getattr(cfg, "n_group", 1) or 1) if fam.router == "grouped_topk" else 1,
                     topk_group=int(getattr(cfg, "topk_group", 1) or 1) if fam.router == "grouped_topk" else 1,
                     weights_kind=fam.weights_kind, ids_ordered=fam.ids_ordered, router_bias=fam.router_bias,
                     provenance=provenance or {})


@dataclass
class RouterTap:
    """Forward hooks on the routers: calls[layer] = [(logits [n, E], weights [n, k], ids [n, k]), ...]."""

    model: torch.nn.Module
    calls: list[list[tuple]] = field(default_factory=list)

    def __enter__(self) -> "RouterTap":
        routers = router_modules(self.model)
        self.calls = [[] for _ in routers]
        self._handles = [mod.register_forward_hook(self._hook(i)) for i, (_, mod) in enumerate(routers)]
        return self

    def _hook(self, i: int):
        def hook(module, args, output):
            logits, weights, ids = output
            E = logits.shape[-1]
            self.calls[i].append((logits.detach().reshape(-1, E).float().cpu(),
                                  weights.detach().reshape(-1, weights.shape[-1]).float().cpu(),
                                  ids.detach().reshape(-1, ids.shape[-1]).cpu()))
        return hook

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()


def eos_ids(model) -> set[int]:
    e = model.generation_config.eos_token_id
    return set() if e is None else {int(x) for x in (e if isinstance(e, (list, tuple)) else [e])}


def pad_left(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask [b, S], prompts left padded (every last token aligned)."""
    S = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), S), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), S), dtype=torch.long)
    for j, p in enumerate(prompts):
        ids[j, S - len(p):] = torch.tensor(p)
        mask[j, S - len(p):] = 1
    return ids, mask


def generated_length(tokens: list[int], eos: set[int]) -> int:
    """Tokens a sequence really generated: through its first end-of-sequence token."""
    for t, tok in enumerate(tokens):
        if tok in eos:
            return t + 1
    return len(tokens)


def assemble_rows(tap: RouterTap, attention_mask: torch.Tensor, generated: torch.Tensor, eos: set[int], meta: TraceMeta,
             first_request: int) -> TraceArrays:
    """One generate() call's routing -> the requests' rows. attention_mask [b, S] of the (left
    padded) prompts; generated [b, n] the new tokens. Call 0 is the prefill ([b x S] rows),
    call t >= 1 processed new token t - 1 of every sequence ([b] rows)."""
    b, S = attention_mask.shape
    n_calls = len(tap.calls[0])
    cols = {"ids": [], "weights": [], "logits": []}
    rid, pos, phase = [], [], []
    for j in range(b):
        prompt = torch.nonzero(attention_mask[j]).flatten()
        P = int(prompt.numel())
        n = generated_length(generated[j].tolist(), eos)
        steps = min(n - 1, n_calls - 1)  # new tokens the model processed: all but the last one it produced
        rows = [(0, j * S + int(s)) for s in prompt] + [(c, j) for c in range(1, steps + 1)]
        for c_idx, name in ((2, "ids"), (1, "weights"), (0, "logits")):
            per_layer = [torch.stack([tap.calls[l][c][c_idx][r] for c, r in rows]) for l in range(len(tap.calls))]
            cols[name].append(torch.stack(per_layer, 1))  # [rows, L, .]
        rid += [first_request + j] * len(rows)
        pos += list(range(P + steps))
        phase += [0] * P + [1] * steps
    cat = {k: torch.cat(v).numpy() for k, v in cols.items()}
    return TraceArrays(meta=meta, request_id=np.asarray(rid, np.int64), position=np.asarray(pos, np.int64),
                       phase=np.asarray(phase, np.int8), ids=cat["ids"].astype(np.int64), weights=cat["weights"],
                       logits=cat["logits"])


def record(model, prompts: list[list[int]], out: str | Path, *, name: str, batch_size: int = 8, max_new_tokens: int = 64,
           do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, pad_token_id: int = 0,
           chunk_tokens: int = 16384, float_dtype: str = "float16", provenance: dict | None = None,
           progress: bool = True) -> Path:
    """Generate from tokenised `prompts` in batches (left padded) and write their routing."""
    if batch_size < 1 or max_new_tokens < 1 or not prompts:
        raise ValueError(f"record: expected prompts, batch_size >= 1 and max_new_tokens >= 1; found {len(prompts)} "
                         f"prompts, batch_size={batch_size}, max_new_tokens={max_new_tokens}")
    empty = [i for i, p in enumerate(prompts) if len(p) == 0]
    if empty:
        raise ValueError(f"record: prompts {empty[:5]} are empty after tokenisation")
    from rich.progress import Progress

    meta = meta_for(model, name, provenance)
    dev = next(model.parameters()).device
    eos = eos_ids(model)
    part: list[TraceArrays] = []
    rows = 0
    torch.manual_seed(seed)
    with TraceWriter(out, meta, float_dtype) as writer, Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("recording", total=len(prompts))
        for i0 in range(0, len(prompts), batch_size):
            batch = prompts[i0:i0 + batch_size]
            ids, mask = pad_left(batch, pad_token_id)
            S = ids.shape[1]
            with RouterTap(model) as tap, torch.no_grad():
                out_ids = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=max_new_tokens,
                                         do_sample=do_sample, temperature=temperature if do_sample else None,
                                         top_p=top_p if do_sample else None, pad_token_id=pad_token_id, use_cache=True)
            part.append(assemble_rows(tap, mask, out_ids[:, S:].cpu(), eos, meta, i0))
            rows += part[-1].num_tokens
            if rows >= chunk_tokens:
                writer.append(concat_arrays(part))
                part, rows = [], 0
            bar.advance(task, len(batch))
        if part:
            writer.append(concat_arrays(part))
    return Path(out)


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a text file (one per non-empty line) or JSONL ({"prompt": ...} or {"text": ...})."""
    import json

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts: {path} does not exist")
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if path.suffix == ".jsonl":
        out = []
        for n, ln in enumerate(lines, 1):
            try:
                obj = json.loads(ln)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: expected a JSON object per line ({e})") from None
            text = obj.get("prompt", obj.get("text")) if isinstance(obj, dict) else None
            if not isinstance(text, str):
                raise ValueError(f"{path}:{n}: expected a 'prompt' or 'text' string field, found {ln[:80]!r}")
            out.append(text)
        lines = out
    if not lines:
        raise ValueError(f"prompts: {path} holds no prompt")
    return lines


def load_model(model_id: str, device: str = "cpu", dtype: str = "auto"):
    """A causal LM and its tokenizer from a local directory or hub id, by transformers' own rules
    (HF_HUB_OFFLINE=1 keeps it offline; a local directory never touches the network)."""
    import transformers

    kwargs = {} if dtype == "auto" else {"dtype": getattr(torch, dtype)}
    model = transformers.AutoModelForCausalLM.from_pretrained(model_id, **kwargs).to(device).eval()
    tok = transformers.AutoTokenizer.from_pretrained(model_id)
    return model, tok


def tokenize(tok, prompts: list[str], chat: bool = False) -> list[list[int]]:
    if chat:
        return [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True)
                for p in prompts]
    return [tok(p)["input_ids"] for p in prompts]
