"""The GPU code path of every kernel compiles for an H100/H200 (sm_90) without a GPU: Triton's
ahead-of-time compiler and its bundled ptxas build each launch the package makes (recorded under
the interpreter), the GEMMs lower to tensor-core mma, and shared memory and registers fit with
no spills (executor/aot.py). The interpreter tests check values; this checks the compiler's half."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT


def _has_nvidia_toolchain() -> bool:
    try:
        from triton.backends.nvidia import compiler as nv
    except ImportError:
        return False
    return all((Path(nv.__file__).parent / "bin" / t).is_file() for t in ("ptxas", "cuobjdump"))


@pytest.mark.slow  # ~28 s with a cold Triton cache
@pytest.mark.skipif(not _has_nvidia_toolchain(), reason="this Triton has no NVIDIA backend with ptxas and cuobjdump")
def test_every_kernel_compiles_for_sm90_within_its_limits(tmp_path):
    out = tmp_path / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "executor.aot", "--arch", "90", "--json", str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = json.loads(out.read_text())["launches"]
    names = {x["kernel"] for x in rows}
    assert names == {"_align_kernel", "_gate_up_kernel", "_down_kernel", "_bin_kernel", "_colsum_kernel",
                     "_pick_kernel", "_remap_kernel"}
    gemms = [x for x in rows if x["kernel"] in ("_gate_up_kernel", "_down_kernel")]
    assert {x["dtype"] for x in gemms} == {"bf16", "fp16"} and all(x["tensor_core_mma"] for x in gemms)
    assert all(x["constexprs"]["UPCAST"] is False for x in gemms)  # the GPU path, not the interpreter's
    assert {x["constexprs"]["BLOCK_M"] for x in gemms} == {16, 32, 64, 128}  # every heuristic configuration
    for x in rows:
        assert not x["problems"] and x["local_bytes"] == 0 and x["stack_bytes"] == 0, x
        assert 0 < x["regs"] <= 255 and x["shared_bytes"] <= 232448, x
