"""Which device the executor runs on, and what it is (for the results it writes).

A real measurement needs a CUDA GPU. Without one the executor refuses (exit status 2) unless
asked for `executor.device=cpu`: tiny dimensions under the Triton interpreter, which checks
the plumbing and the numbers but measures no speed.
"""

from __future__ import annotations

import os
import platform
import subprocess
from dataclasses import dataclass


class NoGPUError(RuntimeError):
    """No CUDA device and no request to run on the CPU."""


@dataclass(frozen=True)
class Device:
    kind: str  # "cuda" or "cpu"
    name: str
    l2_bytes: int  # 0 when unknown (CPU)

    @property
    def interpreted(self) -> bool:
        return self.kind == "cpu"


def choose(requested: str) -> Device:
    """`requested`: auto | cuda | cpu. The CPU path sets TRITON_INTERPRET=1, so it must run
    before anything imports the kernels."""
    if requested not in ("auto", "cuda", "cpu"):
        raise ValueError(f"executor.device: expected auto, cuda or cpu, found {requested!r}")
    if requested == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
        return Device("cpu", f"CPU ({platform.processor() or platform.machine()}), Triton interpreter", 0)
    import torch

    if not torch.cuda.is_available():
        raise NoGPUError("executor: no CUDA GPU on this machine, and the executor measures GPU time. Run it on a "
                         "machine with an NVIDIA GPU, or pass executor.device=cpu to check it at tiny sizes under "
                         "the Triton interpreter (no speed is measured then).")
    props = torch.cuda.get_device_properties(0)
    return Device("cuda", props.name, int(getattr(props, "L2_cache_size", 0)))


def versions(dev: Device) -> dict:
    """Software and driver versions to record beside every measurement."""
    import torch
    import triton

    out = {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
           "device": dev.name}
    if dev.kind == "cuda":
        out["cuda"] = torch.version.cuda
        try:
            out["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            out["driver"] = "unknown"
    return out
