"""A GPU's datasheet peaks and, separately named, the efficiency factors and fixed costs the
roofline applies to them (`conf/hardware/*.yaml`). A calibration JSON written by the executor
replaces the assumed factors with measured ones."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

CALIBRATED_FIELDS = ("bandwidth_efficiency", "flops_efficiency", "moe_bandwidth_efficiency", "moe_layer_fixed_us",
                     "attention_layer_fixed_us", "step_overhead_us", "collective_latency_us")


@dataclass(frozen=True)
class HardwareSpec:
    name: str
    hbm_bandwidth_gbps: float
    bf16_tflops: float
    fp8_tflops: float
    memory_gib: float
    interconnect_gbps: float
    bandwidth_efficiency: float
    flops_efficiency: float
    moe_layer_fixed_us: float
    attention_layer_fixed_us: float
    step_overhead_us: float
    collective_latency_us: float = 10.0  # assumed: one small NCCL collective within a node
    moe_block_m: int = 16  # rows of a grouped-GEMM tile: each expert's tokens are padded to it
    moe_bandwidth_efficiency: float | None = None  # the MoE kernel's own streaming efficiency (executor); None: bandwidth_efficiency
    calibrated_from: str | None = None
    measured: tuple[str, ...] = ()  # factors measured on the GPU (benchmarks/hardware_probe.py); the rest assumed

    @classmethod
    def from_cfg(cls, h) -> "HardwareSpec":
        optional = {"collective_latency_us", "moe_block_m", "moe_bandwidth_efficiency", "calibrated_from", "measured"}
        fields = {k: h[k] for k in cls.__dataclass_fields__ if k not in optional}
        fields.update({k: h[k] for k in ("collective_latency_us", "moe_block_m", "moe_bandwidth_efficiency")
                       if h.get(k) is not None})
        spec = cls(**{k: (str(v) if k == "name" else int(v) if k == "moe_block_m" else float(v)) for k, v in fields.items()})
        measured = tuple(h.get("measured") or ())
        unknown = sorted(set(measured) - set(CALIBRATED_FIELDS))
        if unknown:
            raise ValueError(f"hardware {spec.name}: field 'measured': expected names among {CALIBRATED_FIELDS}, "
                             f"found {unknown}")
        spec = replace(spec, measured=measured)
        return spec.calibrated(h.get("calibration")) if h.get("calibration") else spec

    def calibrated(self, path: str | Path) -> "HardwareSpec":
        """Replace the assumed factors by those of a calibration JSON (keys: CALIBRATED_FIELDS)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: hardware calibration: expected a readable JSON file, found {e}") from None
        unknown = sorted(set(data.get("factors", {})) - set(CALIBRATED_FIELDS))
        if unknown:
            raise ValueError(f"{path}: field 'factors': expected keys among {CALIBRATED_FIELDS}, found {unknown}")
        factors = {k: float(v) for k, v in data.get("factors", {}).items()}
        return replace(self, **factors, calibrated_from=str(path),
                       measured=tuple(dict.fromkeys(self.measured + tuple(factors))))

    @property
    def assumed(self) -> tuple[str, ...]:
        """Factors and fixed costs still assumed (neither measured nor calibrated); the MoE
        bandwidth factor counts only once set (unset, the MoE term uses bandwidth_efficiency)."""
        return tuple(f for f in CALIBRATED_FIELDS if f not in self.measured
                     and not (f == "moe_bandwidth_efficiency" and self.moe_bandwidth_efficiency is None))

    @property
    def moe_bandwidth_Bps(self) -> float:
        """Achievable HBM bandwidth of the MoE kernels, bytes/s."""
        eff = self.bandwidth_efficiency if self.moe_bandwidth_efficiency is None else self.moe_bandwidth_efficiency
        return self.hbm_bandwidth_gbps * 1e9 * eff

    @property
    def interconnect_Bps(self) -> float:
        """GPU-to-GPU bandwidth per direction, bytes/s (datasheet; no efficiency factor yet)."""
        return self.interconnect_gbps * 1e9

    @property
    def bandwidth_Bps(self) -> float:
        """Achievable HBM bandwidth, bytes/s."""
        return self.hbm_bandwidth_gbps * 1e9 * self.bandwidth_efficiency

    def flops_per_s(self, weight_bytes: float) -> float:
        """Achievable dense FLOP/s for weights of this width: fp8 tensor cores for 1-byte (fp8)
        weights; bf16 ones for 2-byte weights and for 4-bit weight-only formats (MXFP4, int4),
        which the kernels dequantise to bf16 before a bf16 MMA (w4a16, as vLLM runs them on
        Hopper; Blackwell's native FP4 MMA is not modelled)."""
        peak = self.fp8_tflops if weight_bytes == 1 else self.bf16_tflops
        return peak * 1e12 * self.flops_efficiency
