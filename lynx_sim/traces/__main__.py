"""Trace tool: `python -m lynx_sim.traces {convert,synth,stats} ...` (see `--help` of each).

  convert SRC.npz DST.safetensors         import a reference trace (../shared/traces schema)
  synth --model M [--requests N] DST      write a synthetic trace from conf/synth/M.yaml
  stats PATH [--json] [--plot OUT.png]    union fraction, adjacent overlap, load CV, top-1 weight
  record --model DIR|HUB_ID --prompts FILE DST   routing of a Hugging Face MoE model during generate()
  rehash SRC DST                          verify a trace written before checksums, write it with them

Bad input (a malformed trace or archive, a missing or unreadable file, a read-only destination)
prints one line `error: ...` naming the file and field, and exits with status 2. A write that
fails or is interrupted (Ctrl-C, SIGTERM) leaves no partial file behind.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from .errors import TraceFormatError

from ..config import CONF_DIR, compose


def cmd_convert(a) -> int:
    from .convert import convert

    renorm = None if a.renormalize is None else a.renormalize == "true"
    dst = convert(a.src, a.dst, router=a.router, renormalize=renorm)
    print(f"wrote {dst}")
    return 0


def cmd_synth(a) -> int:
    import torch

    from ..model import ModelSpec
    from ..routing import route_exact
    from .synth import SynthParams, SyntheticTrace
    from .writer import _TORCH_FLOAT, write_trace

    models = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
    if a.model not in models:
        raise ValueError(f"--model: expected one of {models}, found {a.model!r}")
    if a.requests < 1:
        raise ValueError(f"--requests: expected an integer >= 1, found {a.requests}")
    cfg = compose([f"model={a.model}", *[f"synth.{kv}" for kv in a.set]])
    model = ModelSpec.from_cfg(cfg.model)
    arrays = SyntheticTrace(model, SynthParams.from_cfg(cfg.synth), a.seed).to_arrays(a.requests)
    # the file stores logits at float_dtype: derive ids and weights from the stored values, so that
    # a policy reading the logits and vanilla reading the ids see the same router
    z = torch.from_numpy(arrays.logits).to(_TORCH_FLOAT[a.float_dtype]).float()
    ids, w = route_exact(z.numpy(), model.router)  # machine-independent, as the generator's own
    arrays.logits, arrays.ids, arrays.weights = z.numpy(), ids, w
    path = write_trace(a.dst, arrays, float_dtype=a.float_dtype)
    print(f"wrote {path}: {a.requests} requests of model {a.model}, seed {a.seed}")
    return 0


def cmd_stats(a) -> int:
    from .reader import open_trace
    from .stats import trace_stats

    path = Path(a.path)
    with tempfile.TemporaryDirectory() as tmp:
        if path.suffix == ".npz":  # a reference trace: import it first
            from .convert import convert

            path = convert(path, Path(tmp) / "imported.safetensors")
        with open_trace(path) as trace:
            stats = trace_stats(trace, draws=a.draws, seed=a.seed)
    stats["path"] = str(a.path)
    if a.plot:
        from .plot import plot_stats

        plot_stats(stats, a.plot)
    if a.json:
        print(json.dumps(stats, indent=2))
    else:
        print(f"{a.path}: {stats['model']}")
        print(f"  E={stats['num_experts']} k={stats['top_k']} L={stats['num_layers']}  {stats['num_tokens']} "
              f"{stats['tokens_used']} tokens in {stats['num_sequences']} sequences")
        print("  union fraction  " + "  ".join(f"B={b}: {v:.3f}" for b, v in stats["union_fraction"].items()))
        print("  (uniform null)  " + "  ".join(f"B={b}: {v:.3f}" for b, v in stats["union_fraction_null"].items()))
        ov = stats["adjacent_overlap"]
        print(f"  adjacent overlap {ov['mean']:.3f} (chance {ov['chance']:.3f}, {ov['pairs']} pairs)")
        print(f"  load CV median  {stats['load_cv']['median']:.3f}")
        if "top1_weight_mean" in stats:
            print(f"  top-1 weight share mean {stats['top1_weight_mean']:.3f}")
        if a.plot:
            print(f"  plot: {a.plot}")
    return 0


def cmd_record(a) -> int:
    import transformers

    from .record import load_model, read_prompts, record, tokenize

    prompts = read_prompts(a.prompts)[: a.limit] if a.limit else read_prompts(a.prompts)
    model, tok = load_model(a.model, a.device, a.dtype)
    ids = tokenize(tok, prompts, a.chat)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    prov = {"tool": "python -m lynx_sim.traces record", "model": a.model, "prompts": str(a.prompts),
            "transformers": transformers.__version__, "max_new_tokens": a.max_new_tokens, "do_sample": a.do_sample,
            "temperature": a.temperature, "top_p": a.top_p, "seed": a.seed, "dtype": a.dtype, "chat": a.chat}
    dst = record(model, ids, a.dst, name=a.name or Path(a.model).name, batch_size=a.batch_size,
                 max_new_tokens=a.max_new_tokens, do_sample=a.do_sample, temperature=a.temperature, top_p=a.top_p,
                 seed=a.seed, pad_token_id=pad, chunk_tokens=a.chunk_tokens, float_dtype=a.float_dtype, provenance=prov)
    print(f"wrote {dst}: {len(ids)} requests")
    return 0


def cmd_rehash(a) -> int:
    from .writer import rehash

    dst = rehash(a.src, a.dst)
    print(f"wrote {dst}: checksums added")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lynx_sim.traces", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert", help="import a reference .npz trace into the native format")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--router", choices=["softmax", "grouped_topk", "sigmoid"], help="for models the importer does not know")
    c.add_argument("--renormalize", choices=["true", "false"], help="for models the importer does not know")
    c.set_defaults(fn=cmd_convert)
    s = sub.add_parser("synth", help="write a synthetic trace with full router logits")
    s.add_argument("dst")
    s.add_argument("--model", default="qwen3_30b_a3b", help="a name in conf/model/ (its preset is conf/synth/<name>.yaml)")
    s.add_argument("--requests", type=int, default=64)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--float-dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a preset value")
    s.set_defaults(fn=cmd_synth)
    t = sub.add_parser("stats", help="routing statistics of a native or reference trace")
    t.add_argument("path")
    t.add_argument("--json", action="store_true", help="print JSON")
    t.add_argument("--plot", metavar="PNG", help="also draw the statistics")
    t.add_argument("--draws", type=int, default=400, help="random batches per batch size for union_fraction")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(fn=cmd_stats)
    r = sub.add_parser("record", help="record routing of a Hugging Face MoE model during generate()")
    r.add_argument("dst")
    r.add_argument("--model", required=True, help="local model directory or hub id (HF_HUB_OFFLINE=1 stays offline)")
    r.add_argument("--prompts", required=True, help="text file, one prompt per line, or .jsonl with 'prompt' or 'text'")
    r.add_argument("--name", help="model name stored in the trace (default: the directory or id's last part)")
    r.add_argument("--limit", type=int, help="only the first N prompts")
    r.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    r.add_argument("--batch-size", type=int, default=8)
    r.add_argument("--max-new-tokens", type=int, default=128)
    r.add_argument("--do-sample", action="store_true")
    r.add_argument("--temperature", type=float, default=1.0)
    r.add_argument("--top-p", type=float, default=1.0)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--device", default="cpu")
    r.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    r.add_argument("--float-dtype", default="float16", choices=["float16", "bfloat16", "float32"], help="stored floats")
    r.add_argument("--chunk-tokens", type=int, default=16384, help="rows held in memory before a part is written")
    r.set_defaults(fn=cmd_record)
    h = sub.add_parser("rehash", help="verify a trace written before checksums and write it with them")
    h.add_argument("src")
    h.add_argument("dst", help="may be SRC itself (replaced once the new file is complete)")
    h.set_defaults(fn=cmd_rehash)
    return p


def main(argv: list[str] | None = None) -> int:
    from .writer import terminate_as_exit

    a = parser().parse_args(argv)
    try:
        with terminate_as_exit():  # SIGTERM unwinds like Ctrl-C: writers remove their partial files
            return a.fn(a)
    except (TraceFormatError, ValueError, OSError) as e:  # OSError: a file, named, as the OS reports it
        print(f"error: {e}", file=sys.stderr)
        return 2
    except MemoryError:
        print(f"error: out of memory in '{a.cmd}' (its files: {' '.join(_paths(a))})", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


def _paths(a) -> list[str]:
    return [str(getattr(a, k)) for k in ("src", "dst", "path") if getattr(a, k, None)]


if __name__ == "__main__":
    sys.exit(main())
