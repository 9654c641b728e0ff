"""Compile the Triton kernels (kernels/) for a GPU that is not here, exactly as they are launched.

The CPU interpreter (the tests' mode) checks what the kernels compute but never runs Triton's
compiler. This does: representative calls of every kernel run once under the interpreter, which
records each launch (kernel, argument types, constexprs, warps, stages, options); then Triton's
ahead-of-time path and its bundled ptxas build each recorded launch for a CUDA target (sm_90:
H100 and H200), and cuobjdump reads the cubin's resources. It shows that the GPU code path
lowers, that the GEMMs use tensor-core instructions, and that shared memory and registers fit
with no spills to local memory. Speed still needs the GPU (benchmarks/kernels.py).

    python -m executor.aot [--arch 90] [--json OUT]     # exit 1 when a launch fails a check
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

LIMITS = {90: {"shared_bytes": 232448, "regs_per_thread": 255, "regs_per_sm": 65536}}  # H100/H200 (sm_90)
TYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64", "int8": "i8", "int16": "i16",
         "int32": "i32", "int64": "i64", "bool": "i1", "uint8": "u8"}
OPTIONS = ("num_warps", "num_stages", "enable_fp_fusion")


def representative_calls() -> None:
    """Every kernel of the package at the shapes and launch configurations it is used with."""
    import torch

    from kernels.align import align_block_size
    from kernels.configs import heuristic
    from kernels.fused_moe import fused_moe
    from kernels.lynx_routing import lynx_route

    g = torch.Generator().manual_seed(0)
    E, H, I, k, T = 8, 64, 32, 2, 4
    for dtype in (torch.bfloat16, torch.float16):
        x = torch.randn(T, H, generator=g).to(dtype)
        w1 = torch.randn(E, 2 * I, H, generator=g).to(dtype)
        w2 = torch.randn(E, H, I, generator=g).to(dtype)
        ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
        w = torch.rand(T, k, generator=g)
        for ppe in (1, 32, 128, 1024):  # every heuristic configuration (decode to prefill)
            fused_moe(x, w1, w2, ids, w, config=heuristic(ppe))
    for T, E, k in ((64, 64, 8), (256, 128, 8)):  # the one-program Triton align, up to 2048 pairs
        align_block_size(torch.randint(0, E, (T, k), generator=g), E, 16)
    for E, k in ((8, 2), (64, 6), (128, 8)):  # Mixtral, DeepSeek-V2-Lite, Qwen3-30B-A3B routers
        for renorm in (True, False):
            lynx_route(torch.randn(2, 16, E, generator=g), 0.7, 2, k, renorm)


def capture() -> list[dict]:
    """Run `representative_calls` under the interpreter and return each distinct launch."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("executor.aot capture: run with TRITON_INTERPRET=1 (the launches are recorded there)")
    import torch
    from triton.runtime.interpreter import InterpretedFunction

    seen, launches = set(), []
    original = InterpretedFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        names = self.arg_names
        bound = dict(zip(names, args)) | {n: v for n, v in kwargs.items() if n in names}
        params = inspect.signature(self.fn).parameters
        constexprs = {n for n in names if "constexpr" in str(params[n].annotation)}
        args_out = {}
        for n in names:
            v = bound[n]
            if n == "UPCAST":  # the interpreter-only bf16 upcast (fused_moe.py): off, as on the GPU
                args_out[n] = {"constexpr": False}
            elif n in constexprs:
                args_out[n] = {"constexpr": v if not isinstance(v, torch.dtype) else str(v)}
            elif isinstance(v, torch.Tensor):
                args_out[n] = {"type": "*" + TYPES[str(v.dtype).removeprefix("torch.")]}
            elif isinstance(v, bool):
                args_out[n] = {"type": "i1"}
            elif isinstance(v, int):
                args_out[n] = {"type": "i32" if -2**31 <= v < 2**31 else "i64"}
            elif isinstance(v, float):
                args_out[n] = {"type": "fp32"}
            else:
                raise TypeError(f"executor.aot: {self.fn.__name__}.{n}: cannot type {type(v).__name__}")
        launch = {"kernel": f"{self.fn.__module__}:{self.fn.__name__}", "args": args_out,
                  "options": {o: kwargs[o] for o in OPTIONS if o in kwargs}}
        key = json.dumps(launch, sort_keys=True)
        if key not in seen:
            seen.add(key)
            launches.append(launch)
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = record
    try:
        representative_calls()
    finally:
        InterpretedFunction.run = original
    return launches


def resources(cubin: bytes) -> dict:
    """REG, SHARED, LOCAL and STACK bytes of the cubin's kernel (cuobjdump -res-usage)."""
    from triton.backends.nvidia import compiler as nv

    tool = Path(nv.__file__).parent / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    return {k.lower(): int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out)}


def compile_launch(launch: dict, arch: int) -> dict:
    """Build one recorded launch for sm_<arch> and check it against that GPU's limits."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    mod, name = launch["kernel"].split(":")
    fn = getattr(importlib.import_module(mod), name)
    sig = {n: ("constexpr" if "constexpr" in a else a["type"]) for n, a in launch["args"].items()}
    consts = {n: a["constexpr"] for n, a in launch["args"].items() if "constexpr" in a}
    k = triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", arch, 32),
                       options=launch["options"])
    res = resources(k.asm["cubin"])
    ptx = k.asm["ptx"]
    warps = launch["options"].get("num_warps", 4)
    lim = LIMITS[arch]
    dtype = next(a["type"][1:] for a in launch["args"].values() if a.get("type", "").startswith("*"))
    out = {"kernel": name, "dtype": dtype, "constexprs": consts, "options": launch["options"], "shared_bytes": int(k.metadata.shared),
           "regs": res.get("reg", 0), "local_bytes": res.get("local", 0), "stack_bytes": res.get("stack", 0),
           "tensor_core_mma": bool(re.search(r"\b(wgmma|mma)\.", ptx)), "uses_dot": "tl.dot" in _source(fn)}
    problems = []
    if out["shared_bytes"] > lim["shared_bytes"]:
        problems.append(f"shared memory {out['shared_bytes']} B > {lim['shared_bytes']} B")
    if out["regs"] > lim["regs_per_thread"] or out["regs"] * 32 * warps > lim["regs_per_sm"]:
        problems.append(f"{out['regs']} registers x {32 * warps} threads do not fit")
    if out["local_bytes"] or out["stack_bytes"]:
        problems.append(f"spills: {out['local_bytes']} B local, {out['stack_bytes']} B stack")
    if out["uses_dot"] and not out["tensor_core_mma"]:
        problems.append("tl.dot did not lower to tensor-core mma")
    out["problems"] = problems
    return out


def _source(fn) -> str:
    return inspect.getsource(fn.fn)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m executor.aot", description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, choices=sorted(LIMITS), help="CUDA compute capability x 10")
    ap.add_argument("--json", type=Path, help="write the per-launch report here")
    ap.add_argument("--capture", type=Path, help=argparse.SUPPRESS)  # internal: the interpreter half
    a = ap.parse_args(argv)
    if a.capture:
        a.capture.write_text(json.dumps(capture()))
        return 0
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("executor.aot: unset TRITON_INTERPRET (the compiler half must see real Triton kernels)", file=sys.stderr)
        return 2
    try:
        from triton.backends.nvidia import compiler as nv
    except ImportError:
        print("executor.aot: this Triton has no NVIDIA backend", file=sys.stderr)
        return 2
    if not (Path(nv.__file__).parent / "bin" / "ptxas").is_file():
        print("executor.aot: this Triton has no bundled ptxas", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "launches.json"
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        r = subprocess.run([sys.executable, "-m", "executor.aot", "--capture", str(spec)], env=env,
                           capture_output=True, text=True)
        if r.returncode:
            print(r.stderr[-3000:], file=sys.stderr)
            return 1
        launches = json.loads(spec.read_text())
    rows = [compile_launch(x, a.arch) for x in launches]
    print(f"sm_{a.arch}: {len(rows)} launches compiled")
    print(f"{'kernel':<16}{'dtype':<6}{'constexprs':<46}{'warps':>6}{'stages':>7}{'regs':>6}{'shared B':>10}{'mma':>5}  problems")
    for x in rows:
        c = ",".join(f"{k}={v}" for k, v in x["constexprs"].items())
        print(f"{x['kernel']:<16}{x['dtype']:<6}{c[:45]:<46}{x['options'].get('num_warps', 4):>6}{x['options'].get('num_stages', 3):>7}"
              f"{x['regs']:>6}{x['shared_bytes']:>10}{('yes' if x['tensor_core_mma'] else '-'):>5}  "
              f"{'; '.join(x['problems']) or 'ok'}")
    if a.json:
        import triton

        a.json.write_text(json.dumps({"arch": a.arch, "triton": triton.__version__, "launches": rows}, indent=2) + "\n")
    return 1 if any(x["problems"] for x in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
