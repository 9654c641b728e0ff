"""The config schema, in one place: the type of every key (hydra refuses a wrong type or an
unknown key while composing) and `validate(cfg)`, the ranges and combinations checked before any
work. Values and their comments stay in `conf/` (STYLE.md item 8: schema in Python, choices in
YAML); here every field is MISSING, so a deleted key is caught too.

Groups whose options share keys are typed per option (`workload`, `trace`: each yaml names its
schema in its defaults list). `model`, `hardware`, `synth` and `policy` stay open nodes: their
options differ in shape, their readers (ModelSpec, HardwareSpec, SynthParams, each policy's
constructor) check them. Every refusal is a `ConfigError`: one line `key: expected X, found Y`.
"""

import math
from dataclasses import dataclass, field, fields, is_dataclass
from enum import Enum
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

SEED_MAX = 2**32 - 1  # numpy's legacy and torch-compatible seed range: one seed means the same thing everywhere
MAX_STEPS = 10**6  # decode steps (and warmup): ~8 min at the ~2,000 it/s of benchmarks/RESULTS.md (sim_speed)
MAX_REQUESTS = 10**6  # requests of a serving run: one row each in memory and requests.csv; hours of simulation
MAX_SPAN_S = 1e6  # expected arrival span of a Poisson run (num_requests / rate_rps), simulated s (11.6 days): past
# it requests arrive days apart and are served alone (the rate no longer matters, only the run's length grows), and
# far past it float64 event times blur microsecond costs (ulp 1.2e-7 s at 1e9 s)


class ConfigError(ValueError):
    """A refused config value: one line `key: expected X, found Y` (plus a hint)."""

    def __init__(self, key: str, expected: str, found, hint: str = ""):
        self.key = key
        found = found if isinstance(found, Worded) else show(found)
        super().__init__(f"{key}: expected {expected}, found {found}" + (f"; {hint}" if hint else ""))


class Worded(str):
    """A `found` already in words (not a value to quote): Worded("an unknown key")."""


def show(v) -> str:
    """A value as the command line spells it."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, Enum):
        return repr(v.value)
    return repr(v)


class MemoryCheck(str, Enum):
    error = "error"  # refuse a model whose weights do not fit the GPUs
    warn = "warn"  # run it, flagged


class ApproximateMissing(str, Enum):
    lowest_bin = "lowest_bin"  # stand-in logits (lynx_sim/policies/approximate.py)


@dataclass
class ParallelConf:
    gpus: int = MISSING
    expert_parallel: bool = MISSING


@dataclass
class SloConf:
    tpot_ms: Optional[float] = MISSING
    ttft_ms: Optional[float] = MISSING


@dataclass
class ServingConf:
    max_num_batched_tokens: int = MISSING
    chunked_prefill: bool = MISSING
    kv_block_tokens: int = MISSING
    gpu_memory_utilization: float = MISSING
    kv_capacity_tokens: Optional[int] = MISSING
    disaggregated: bool = MISSING
    kv_transfer_gbps: float = MISSING
    compare_vanilla: bool = MISSING


@dataclass
class DecodeWorkload:
    kind: str = MISSING
    steps: int = MISSING
    warmup_steps: int = MISSING


@dataclass
class ClosedWorkload:
    kind: str = MISSING
    concurrency: Optional[int] = MISSING
    num_requests: int = MISSING


@dataclass
class PoissonWorkload:
    kind: str = MISSING
    rate_rps: float = MISSING
    num_requests: int = MISSING


@dataclass
class TraceWorkload:
    kind: str = MISSING
    num_requests: int = MISSING
    time_scale: float = MISSING


@dataclass
class SynthTrace:
    kind: str = MISSING


@dataclass
class FileTrace:
    kind: str = MISSING
    path: Optional[str] = MISSING
    verify: bool = MISSING


@dataclass
class SimConfig:
    """conf/config.yaml: the simulator's run."""
    model: Any = MISSING
    hardware: Any = MISSING
    policy: Any = MISSING
    trace: Any = MISSING  # typed per option: SynthTrace, FileTrace
    workload: Any = MISSING  # typed per option: DecodeWorkload, ClosedWorkload, ...
    synth: Any = MISSING
    batch: int = MISSING
    seed: int = MISSING
    parallel: ParallelConf = field(default_factory=ParallelConf)
    memory_check: MemoryCheck = MISSING
    slo: SloConf = field(default_factory=SloConf)
    serving: ServingConf = field(default_factory=ServingConf)
    plots: bool = MISSING
    approximate_missing: Optional[ApproximateMissing] = MISSING


@dataclass
class ExecutorSettings:
    device: str = MISSING
    steps: int = MISSING
    layers: Optional[int] = MISSING
    repeats: int = MISSING
    warmup: int = MISSING
    cuda_graphs: bool = MISSING
    dtype: str = MISSING
    check: bool = MISSING
    cpu_hidden: int = MISSING
    cpu_intermediate: int = MISSING


@dataclass
class ExecutorConfig(SimConfig):
    """conf/executor.yaml: the simulator's run plus the GPU executor's settings."""
    executor: ExecutorSettings = field(default_factory=ExecutorSettings)


KIND = {DecodeWorkload: "decode", ClosedWorkload: "closed", PoissonWorkload: "poisson", TraceWorkload: "trace",
        SynthTrace: "synth", FileTrace: "file"}  # each option's `kind`, which run() dispatches on


def register() -> None:
    """Put the schema in hydra's ConfigStore (conf/*.yaml name it in their defaults lists)."""
    cs = ConfigStore.instance()
    cs.store(name="lynx_sim_schema", node=SimConfig)
    cs.store(name="executor_schema", node=ExecutorConfig)
    for name, node in (("decode", DecodeWorkload), ("closed", ClosedWorkload), ("poisson", PoissonWorkload),
                       ("trace", TraceWorkload)):
        cs.store(group="schema/workload", name=name, node=node)
    cs.store(group="schema/trace", name="synth", node=SynthTrace)
    cs.store(group="schema/trace", name="file", node=FileTrace)


register()


def describe(t) -> str:
    """A schema type in words."""
    if get_origin(t) is Union:
        inner = [a for a in get_args(t) if a is not type(None)]
        return f"{describe(inner[0])} or null"
    if t is bool:
        return "true or false"
    if t is int:
        return "an integer"
    if t is float:
        return "a number"
    if t is str:
        return "a string"
    if isinstance(t, type) and issubclass(t, Enum):
        return "one of " + ", ".join(m.value for m in t)
    if is_dataclass(t):
        return "a mapping with keys " + ", ".join(f.name for f in fields(t))
    return "a value"


def field_type(owner, name: str):
    """The declared type of `owner.name` (owner: a schema dataclass), or None."""
    return get_type_hints(owner).get(name) if is_dataclass(owner) else None


def _keys(node: DictConfig, path: str = "") -> None:
    """Every key a typed node declares is set, and no other: `+foo=1` and `~batch` pass hydra."""
    kind = node._metadata.object_type
    if not is_dataclass(kind):
        return
    names = [f.name for f in fields(kind)]
    for key in node:
        if key not in names:
            raise ConfigError(path + str(key), f"one of the keys {', '.join(names)}", Worded("an unknown key"))
    for name in names:
        if name not in node or OmegaConf.is_missing(node, name):
            raise ConfigError(path + name, describe(field_type(kind, name)), Worded("no value"))
        child = node._get_node(name)
        if isinstance(child, DictConfig) and not child._is_none():
            _keys(child, f"{path}{name}.")


def _int(v, key: str, low: int, high: int | None = None, hint: str = "") -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < low or (high is not None and v > high):
        expected = f"an integer >= {low}" if high is None else f"an integer in {low}..{high}"
        raise ConfigError(key, expected, v, hint)


def _positive(v, key: str, nullable: bool = False, hint: str = "") -> None:
    if v is None and nullable:
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
        raise ConfigError(key, "a finite number > 0" + (" or null" if nullable else ""), v, hint)


def validate(cfg, longest_request: int | None = None) -> None:
    """Refuse (ConfigError) what a run cannot mean, before any work: ranges, and the combinations
    of keys with each other and with the model, hardware and memory plan. `longest_request`: the
    most tokens one request of an open trace file holds (prompt + output - 1); a synthetic
    preset's comes from the config."""
    _keys(cfg)
    _int(cfg.batch, "batch", 1)
    _int(cfg.seed, "seed", 0, SEED_MAX, "numpy's 32-bit seed range")
    for group in ("workload", "trace"):  # the keys an option declares are those of its kind
        kind = KIND.get(OmegaConf.get_type(cfg[group]))
        if kind is not None and cfg[group].kind != kind:
            raise ConfigError(f"{group}.kind", f"{kind!r}, the kind of {group}={kind}'s keys", cfg[group].kind,
                              f"choose the option: {group}=...")
    serving = _workload(cfg.workload)
    for key in ("tpot_ms", "ttft_ms"):
        _positive(cfg.slo[key], f"slo.{key}", nullable=True, hint="the SLO in milliseconds, or null for none")
    _serving(cfg, serving, longest_request)
    if cfg.trace.kind not in ("synth", "file"):
        raise ConfigError("trace.kind", "synth or file", cfg.trace.kind)
    if cfg.trace.kind == "file":
        _trace_path(cfg.trace.get("path"))
    _layout(cfg, serving)


def _workload(w) -> bool:
    """The workload's own ranges; True for the serving engine's kinds."""
    from .engine.workload import KINDS

    if w.kind not in KINDS:
        raise ConfigError("workload.kind", "one of " + ", ".join(KINDS), w.kind)
    if w.kind == "decode":
        _int(w.steps, "workload.steps", 1, MAX_STEPS, "a bound on the run's length")
        _int(w.warmup_steps, "workload.warmup_steps", 0, MAX_STEPS, "a bound on the run's length")
        return False
    _int(w.num_requests, "workload.num_requests", 1, MAX_REQUESTS,
         "every request keeps a row in memory and in requests.csv")
    if w.kind == "closed" and w.concurrency is not None:
        _int(w.concurrency, "workload.concurrency", 1, hint="clients; null: as many as `batch`")
    if w.kind == "poisson":
        _positive(w.rate_rps, "workload.rate_rps", hint="requests per second")
        if w.num_requests / w.rate_rps > MAX_SPAN_S:
            raise ConfigError("workload.rate_rps", f"at least {w.num_requests / MAX_SPAN_S:.3g} requests/s "
                              f"(workload.num_requests / rate_rps, the expected arrival span, at most {MAX_SPAN_S:.0e} "
                              "simulated seconds)", w.rate_rps)
    if w.kind == "trace":
        _positive(w.time_scale, "workload.time_scale", hint="the factor on recorded gaps")
    return True


def _serving(cfg, serving: bool, longest_request: int | None) -> None:
    s = cfg.serving
    _int(s.max_num_batched_tokens, "serving.max_num_batched_tokens", 1)
    _int(s.kv_block_tokens, "serving.kv_block_tokens", 1)
    g = s.gpu_memory_utilization
    if not (isinstance(g, (int, float)) and 0 < g <= 1):
        raise ConfigError("serving.gpu_memory_utilization", "a number in (0, 1]", g)
    if s.kv_capacity_tokens is not None:
        _int(s.kv_capacity_tokens, "serving.kv_capacity_tokens", s.kv_block_tokens,
             hint="at least one KV block (serving.kv_block_tokens), or null for the memory plan's")
    if not serving:
        return
    if s.max_num_batched_tokens < cfg.batch:
        raise ConfigError("serving.max_num_batched_tokens", f">= batch ({cfg.batch}): every running request "
                          "decodes one token per iteration (vLLM's rule)", s.max_num_batched_tokens)
    if s.disaggregated:
        _positive(s.kv_transfer_gbps, "serving.kv_transfer_gbps", hint="the prefill-to-decode link, GB/s")
    if not s.chunked_prefill:
        longest, where = _longest(cfg, longest_request)
        if longest is not None and s.max_num_batched_tokens < longest:
            raise ConfigError("serving.max_num_batched_tokens", f"at least {longest} without chunked prefill "
                              f"(the longest request of {where}, prompt + output - 1: a preempted request "
                              "recomputes whole; vLLM's max_model_len rule)", s.max_num_batched_tokens,
                              "or serving.chunked_prefill=true")


def _longest(cfg, longest_request: int | None) -> tuple[int | None, str]:
    if longest_request is not None:
        return longest_request, "the trace"
    if cfg.trace.kind != "synth":
        return None, ""  # known once the file is open: run() passes it
    p = _synth(cfg)
    return p.prompt_tokens["max"] + p.output_tokens["max"] - 1, f"synth preset {cfg.model.name}"


def _synth(cfg):
    """The synth preset, read (and checked) by its own reader."""
    from .traces.synth import SynthParams

    return _read("synth", SynthParams.from_cfg, cfg.synth)


def _trace_path(path) -> None:
    from pathlib import Path

    if not path:
        raise ConfigError("trace.path", "a native trace file (trace=file)", None,
                          "see `python -m lynx_sim.traces convert|synth`")
    if not Path(path).is_file():
        raise ConfigError("trace.path", "an existing native trace file", path)


def _read(group: str, reader, node, trips=(KeyError, TypeError, AttributeError, ValueError)):
    """An open group's node through its reader; what the reader trips on, as one ConfigError."""
    try:
        return reader(node)
    except trips as e:
        found = Worded(" ".join(str(e).split()))
        raise ConfigError(group, f"the keys and types of a conf/{group}/ option", found) from None


def _layout(cfg, serving: bool) -> None:
    """The policy's parameters (its constructor checks them), the parallel layout against the
    model's shape, and `batch` against the KV cache."""
    from .cost import HardwareSpec, Parallel, Roofline
    from .cost.memory import plan
    from .model import ModelSpec
    from .policies import build_policy

    _int(cfg.parallel.gpus, "parallel.gpus", 1)
    model = _read("model", ModelSpec.from_cfg, cfg.model)
    cal = cfg.hardware.get("calibration")
    hw = _read("hardware", HardwareSpec.from_cfg, OmegaConf.merge(cfg.hardware, {"calibration": None}))
    if cal is not None:  # its own key: the file, the field and what was expected, in one line
        from .cost.calibration import CONF_CALIBRATIONS

        try:
            hw = hw.calibrated(str(cal))
        except ValueError as e:
            known = [f.stem for f in sorted(CONF_CALIBRATIONS.glob("*.json")) if f'"gpu": "{hw.name}"' in f.read_text()]
            names = f"'{known[0]}'" if len(known) == 1 else f"one of {known}" if known else "none in conf/calibration/"
            raise ConfigError("hardware.calibration", f"a calibration of {hw.name} ({names}, or a calibration file's "
                              "path) or null", Worded(str(e))) from None
    # the policy's constructor checks its parameters; its ValueErrors already name them
    _read("policy", lambda p: build_policy(p, model), cfg.policy, (KeyError, AttributeError))
    par = Parallel(cfg.parallel.gpus, cfg.parallel.expert_parallel)
    g, a = par.gpus, model.attention
    if par.expert_parallel:
        if model.num_experts % g:
            raise ConfigError("parallel.gpus", f"a divisor of the {model.num_experts} experts of {model.name} "
                              "under expert parallelism", g)
    else:
        nkv = a.get("num_kv_heads", a["num_heads"])
        for what, n in ((f"{a['num_heads']} attention heads", a["num_heads"] % g),
                        (f"expert intermediate size {model.expert_intermediate_size}", model.expert_intermediate_size % g),
                        (f"{nkv} KV heads (or a multiple of them)", nkv % g and g % nkv)):
            if n:
                raise ConfigError("parallel.gpus", f"a divisor of the {what} of {model.name} under tensor "
                                  "parallelism", g, "or parallel.expert_parallel=true")
    mem = plan(model, hw, par, Roofline(model, hw, par).kv_bytes_per_token_rank(), float(cfg.serving.gpu_memory_utilization))
    hand = cfg.serving.kv_capacity_tokens if serving else None
    capacity = hand if hand is not None else (mem.kv_capacity_tokens if mem.fits else None)
    # tokens each running request holds at least: one; the steady decode batch runs all B at once,
    # each past its prompt (a synthetic preset's shortest is known)
    per = 1 if serving or cfg.trace.kind != "synth" else _synth(cfg).prompt_tokens["min"] + 1
    if capacity is not None and cfg.batch * per > capacity:
        where = "serving.kv_capacity_tokens" if hand is not None else f"memory plan of {model.name} on {hw.name}"
        each = "at least one each" if per == 1 else f"at least {per} each: the synth preset's shortest prompt + 1"
        raise ConfigError("batch", f"at most {capacity // per} (the KV cache's {capacity} tokens, {each}; {where})",
                          cfg.batch, "more GPUs (parallel.gpus) or larger hardware")
