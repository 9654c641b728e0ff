"""A GPU's datasheet peaks and, separately named, the efficiency factors and fixed costs the
uncalibrated roofline applies to them (`conf/hardware/*.yaml`), and the cost calibration that
replaces them where the GPU has one (`calibration:` in the yaml, a file of conf/calibration/:
lynx_sim/cost/calibration.py)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from .calibration import CostCalibration

# the uncalibrated roofline's factors and fixed costs: each measured (benchmarks/hardware_probe.py) or assumed
ROOFLINE_FIELDS = ("bandwidth_efficiency", "flops_efficiency", "moe_layer_fixed_us", "attention_layer_fixed_us",
                   "step_overhead_us", "collective_latency_us")


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
    measured: tuple[str, ...] = ()  # factors measured on the GPU (benchmarks/hardware_probe.py); the rest assumed
    calibration: CostCalibration | None = None  # fitted cost terms (conf/calibration/<name>.json); None: the roofline

    @classmethod
    def from_cfg(cls, h) -> "HardwareSpec":
        optional = {"collective_latency_us", "moe_block_m", "measured", "calibration"}
        fields = {k: h[k] for k in cls.__dataclass_fields__ if k not in optional}
        fields.update({k: h[k] for k in ("collective_latency_us", "moe_block_m")
                       if h.get(k) is not None})
        spec = cls(**{k: (str(v) if k == "name" else int(v) if k == "moe_block_m" else float(v)) for k, v in fields.items()})
        measured = tuple(h.get("measured") or ())
        unknown = sorted(set(measured) - set(ROOFLINE_FIELDS))
        if unknown:
            raise ValueError(f"hardware {spec.name}: field 'measured': expected names among {ROOFLINE_FIELDS}, "
                             f"found {unknown}")
        spec = replace(spec, measured=measured)
        return spec.calibrated(h.get("calibration")) if h.get("calibration") else spec

    def calibrated(self, name_or_path) -> "HardwareSpec":
        """This GPU priced with a cost calibration (a name in conf/calibration/ or a path); its
        datasheet peaks must be this hardware's."""
        cal = CostCalibration.load(name_or_path)
        if cal.gpu != self.name:
            raise ValueError(f"hardware {self.name}: calibration {cal.path} is of gpu '{cal.gpu}', not '{self.name}'")
        for comp in ("moe", "gemm", "attention_decode", "attention_prefill"):
            p = getattr(cal, comp)
            if p is not None and (p.peak_bandwidth_Bps != self.hbm_bandwidth_gbps * 1e9
                                  or p.peak_flops != self.bf16_tflops * 1e12):
                raise ValueError(f"{cal.path}: params.{comp}: expected the peaks of hardware {self.name} "
                                 f"({self.hbm_bandwidth_gbps * 1e9:g} B/s, {self.bf16_tflops * 1e12:g} FLOP/s), found "
                                 f"{p.peak_bandwidth_Bps:g} B/s, {p.peak_flops:g} FLOP/s")
        return replace(self, calibration=cal)

    @property
    def assumed(self) -> tuple[str, ...]:
        """The uncalibrated roofline's factors and fixed costs that were not measured on the GPU."""
        return tuple(f for f in ROOFLINE_FIELDS if f not in self.measured)

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
