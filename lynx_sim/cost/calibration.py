"""A cost calibration: the fitted parameters of the MoE-layer, GEMM, attention and all-reduce
terms for one GPU, where they came from and how well they predict measurements they were not
fitted on. One format whatever measured the GPU (NVIDIA AIConfigurator's tables through
`python -m lynx_sim.measured fit`, or the GPU executor's own layer times).

The simulator loads `conf/calibration/<name>.json` by default for the hardware whose yaml names
it (`calibration: <name>`, or a path to a file of this format); `calibration: null` prices with
the uncalibrated roofline, whose efficiency factors and fixed costs are assumed. Every summary
names the calibration it used (`CostCalibration.describe`).

File (JSON): {"format": 1, "gpu", "date", "seed", "source": {...}, "report": path of the full
fit record, "params": {"moe", "gemm", "attention": {"decode", "prefill"}, "allreduce"} (each the
fields of its parameter class, bf16 kernels; a component may be absent: it is then priced
uncalibrated and named so), "params_by_dtype": {"fp8" | "fp8_block": {"moe": {...}}} (MoE
kernels fitted on other weight formats), "heldout" and "uncalibrated": {component: {"median",
"p90", "n"}} (errors on held-out rows, of the fit and of the uncalibrated roofline)}.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path

from .attention import AttentionParams
from .gemm import GemmParams
from .moe_layer import MoEKernelParams
from .parallel import AllReduceParams

FORMAT = 1
REPO = Path(__file__).resolve().parents[2]
CONF_CALIBRATIONS = REPO / "conf" / "calibration"
COMPONENTS = ("moe", "gemm", "attention_decode", "attention_prefill", "allreduce")
TOP_KEYS = {"format", "gpu", "date", "seed", "source", "report", "params", "params_by_dtype", "heldout", "uncalibrated"}


class CalibrationError(ValueError):
    """A calibration file that cannot be used, with the file and the field named."""


@dataclass(frozen=True)
class CostCalibration:
    gpu: str
    path: str
    date: str
    source: dict
    moe: MoEKernelParams | None = None
    gemm: GemmParams | None = None
    attention_decode: AttentionParams | None = None
    attention_prefill: AttentionParams | None = None
    allreduce: AllReduceParams | None = None
    heldout: dict = field(default_factory=dict)
    seed: int | None = None
    moe_by_dtype: dict = field(default_factory=dict)  # weight format (fp8, fp8_block) -> MoEKernelParams
    sha256: str | None = None  # of the file's bytes (load)

    @property
    def fitted(self) -> tuple[str, ...]:
        return tuple(c for c in COMPONENTS if getattr(self, c) is not None)

    @property
    def missing(self) -> tuple[str, ...]:
        return tuple(c for c in COMPONENTS if getattr(self, c) is None)

    def source_line(self) -> str:
        """One line: what measured the GPU (package and version, framework, or the executor's device)."""
        s = self.source
        if s.get("package"):
            line = f"{s['package']} {s.get('version') or '?'}, {s.get('framework', '?')} tables"
        else:
            line = str(s.get("kind") or "unknown source")
        return line + (f" ({s['device']})" if s.get("device") else "")

    def describe(self) -> dict:
        """What a summary records of the calibration it priced with."""
        return {"name": Path(self.path).stem, "path": self.path, "sha256": self.sha256, "gpu": self.gpu,
                "source": self.source_line(),
                "date": self.date, "fitted": list(self.fitted), "not_fitted": list(self.missing),
                "heldout_error": {k: {q: v.get(q) for q in ("median", "p90")} for k, v in self.heldout.items()}}

    @classmethod
    def load(cls, name_or_path: str | Path) -> "CostCalibration":
        """A calibration by name (conf/calibration/<name>.json; `<name>.json` too) or by path (one
        with a folder in it). Summaries show a path inside this repository relative to it, so that
        they do not depend on where the repository lies, and the file's SHA-256."""
        text = str(name_or_path)
        if "/" not in text:  # a name: machine-independent in summaries
            name = text[:-5] if text.endswith(".json") else text
            p = CONF_CALIBRATIONS / f"{name}.json"
        else:
            p = Path(text)
        try:
            raw = p.read_bytes()
            data = json.loads(raw)
        except FileNotFoundError:
            known = sorted(f.stem for f in CONF_CALIBRATIONS.glob("*.json"))
            raise CalibrationError(f"calibration {text!r}: expected a file {p} (known names: {known}), "
                                   "found none") from None
        except (OSError, ValueError) as e:
            raise CalibrationError(f"{p}: expected a readable JSON calibration, found {e}") from None
        try:
            shown = str(p.resolve().relative_to(REPO))
        except ValueError:
            shown = str(p)
        cal = cls.from_dict(data, shown)
        return replace(cal, sha256=hashlib.sha256(raw).hexdigest())

    @classmethod
    def from_dict(cls, data: dict, path: str) -> "CostCalibration":
        if not isinstance(data, dict):
            raise CalibrationError(f"{path}: expected a JSON object, found {type(data).__name__}")
        unknown = sorted(set(data) - TOP_KEYS)
        if unknown:
            raise CalibrationError(f"{path}: expected top-level keys among {sorted(TOP_KEYS)}, found {unknown}")
        if data.get("format") != FORMAT:
            raise CalibrationError(f"{path}: field 'format': expected {FORMAT}, found {data.get('format')!r}")
        for key, kind in (("gpu", str), ("date", str), ("source", dict), ("params", dict)):
            if not isinstance(data.get(key), kind):
                raise CalibrationError(f"{path}: field '{key}': expected a {kind.__name__}, "
                                       f"found {type(data.get(key)).__name__}")
        params = data["params"]
        unknown = sorted(set(params) - {"moe", "gemm", "attention", "allreduce"})
        if unknown:
            raise CalibrationError(f"{path}: field 'params': expected keys among moe, gemm, attention, allreduce, "
                                   f"found {unknown}")
        attention = params.get("attention") or {}
        if not isinstance(attention, dict):
            raise CalibrationError(f"{path}: field 'params.attention': expected an object with decode/prefill, "
                                   f"found {type(attention).__name__}")
        by_dtype = data.get("params_by_dtype") or {}
        if not isinstance(by_dtype, dict) or any(not isinstance(v, dict) or set(v) - {"moe"} for v in by_dtype.values()):
            raise CalibrationError(f"{path}: field 'params_by_dtype': expected {{format: {{'moe': {{...}}}}}}, "
                                   f"found {json.dumps(by_dtype)[:80]}")
        moe_by_dtype = {str(k): _params(MoEKernelParams, v.get("moe"), path, f"params_by_dtype.{k}.moe")
                        for k, v in by_dtype.items() if v.get("moe") is not None}
        heldout = data.get("heldout") or {}
        for key in ("heldout", "uncalibrated"):
            errs = data.get(key) or {}
            if not isinstance(errs, dict):
                raise CalibrationError(f"{path}: field '{key}': expected an object, found {type(errs).__name__}")
            for comp, e in errs.items():
                if not isinstance(e, dict) or any(
                        v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0)
                        for v in (e.get(q) for q in ("median", "p90", "n"))):
                    raise CalibrationError(f"{path}: field '{key}.{comp}': expected {{median, p90, n}} numbers >= 0 "
                                           f"or null, found {json.dumps(e)[:80]}")
        return cls(gpu=data["gpu"], path=path, date=data["date"], source=data["source"], seed=data.get("seed"),
                   moe=_params(MoEKernelParams, params.get("moe"), path, "params.moe"),
                   gemm=_params(GemmParams, params.get("gemm"), path, "params.gemm"),
                   attention_decode=_params(AttentionParams, attention.get("decode"), path, "params.attention.decode"),
                   attention_prefill=_params(AttentionParams, attention.get("prefill"), path,
                                             "params.attention.prefill"),
                   allreduce=_allreduce(params.get("allreduce"), path), heldout=heldout, moe_by_dtype=moe_by_dtype)


def _params(cls, d, path: str, where: str):
    """cls(**d), every field checked: names known, numbers finite, efficiencies in (0, 1]."""
    if d is None:
        return None
    if not isinstance(d, dict):
        raise CalibrationError(f"{path}: field '{where}': expected an object, found {type(d).__name__}")
    names = {f.name: f for f in fields(cls)}
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise CalibrationError(f"{path}: field '{where}': expected keys among {sorted(names)}, found {unknown}")
    out = {}
    for k, v in d.items():
        if names[k].type == "bool" or isinstance(v, bool):
            if not (isinstance(v, bool) and names[k].type == "bool"):
                raise CalibrationError(f"{path}: field '{where}.{k}': expected "
                                       f"{'true/false' if names[k].type == 'bool' else 'a number'}, found {v!r}")
            out[k] = v
            continue
        if not isinstance(v, (int, float)) or v != v or v in (float("inf"), float("-inf")):
            raise CalibrationError(f"{path}: field '{where}.{k}': expected a finite number, found {v!r}")
        if k.endswith("efficiency") and not 0 < v <= 1:
            raise CalibrationError(f"{path}: field '{where}.{k}': expected a fraction in (0, 1], found {v!r}")
        if (k.startswith("peak") or k in ("block_m", "align")) and not v > 0:
            raise CalibrationError(f"{path}: field '{where}.{k}': expected a positive number, found {v!r}")
        if v < 0:
            raise CalibrationError(f"{path}: field '{where}.{k}': expected a number >= 0, found {v!r}")
        if names[k].type == "int" and v != int(v):
            raise CalibrationError(f"{path}: field '{where}.{k}': expected an integer, found {v!r}")
        out[k] = int(v) if names[k].type == "int" else float(v)
    required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
    absent = [k for k in required if k not in out]
    if absent:
        raise CalibrationError(f"{path}: field '{where}': expected keys {absent}, found none")
    return cls(**out)


def _allreduce(d, path: str) -> AllReduceParams | None:
    if d is None:
        return None
    where = "params.allreduce"
    if not isinstance(d, dict) or set(d) != {"latency_us", "bus_Bps"}:
        raise CalibrationError(f"{path}: field '{where}': expected keys latency_us and bus_Bps, "
                               f"found {sorted(d) if isinstance(d, dict) else type(d).__name__}")
    lat, bw = d["latency_us"], d["bus_Bps"]
    if not (isinstance(lat, dict) and isinstance(bw, dict)) or set(lat) != set(bw):
        raise CalibrationError(f"{path}: field '{where}': expected latency_us and bus_Bps keyed by the same GPU counts")
    for g in lat:
        if not str(g).isdigit() or int(g) < 2:
            raise CalibrationError(f"{path}: field '{where}.latency_us': expected GPU counts >= 2 as keys, found {g!r}")
        for name, table in (("latency_us", lat), ("bus_Bps", bw)):
            v = table[g]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 <= v < float("inf")) \
                    or (name == "bus_Bps" and v == 0):
                raise CalibrationError(f"{path}: field '{where}.{name}.{g}': expected a finite positive number, "
                                       f"found {v!r}")
    return AllReduceParams(latency_us={str(g): float(v) for g, v in lat.items()},
                           bus_Bps={str(g): float(v) for g, v in bw.items()})


def conf_record(record: dict, report: str | None = None) -> dict:
    """The calibration file (this module's format) of a full fit record (lynx_sim/measured):
    the parameters, source and date, and the held-out error per component."""
    comps = record.get("components", {})
    return {"format": FORMAT, "gpu": record["gpu"], "date": record["date"], "seed": record.get("seed"),
            "source": record["source"], "report": report, "params": record["params"],
            "params_by_dtype": record.get("params_by_dtype") or {},
            "heldout": {k: {q: c["heldout"].get(q) for q in ("median", "p90", "n")} for k, c in comps.items()},
            "uncalibrated": {k: {q: c["uncalibrated"].get(q) for q in ("median", "p90", "n")} for k, c in comps.items()}}
