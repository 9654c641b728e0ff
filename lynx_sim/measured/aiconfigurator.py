"""Read the kernel latencies NVIDIA AIConfigurator measured on real GPUs, as pandas tables.

Source of the data: NVIDIA AIConfigurator (github ai-dynamo/aiconfigurator, Apache-2.0), the
tables shipped in the `aiconfigurator-core` wheel (`pip install -e ".[measured]"`) under
`aiconfigurator_core/systems/data/<gpu>/<op>/<framework>/<version>/<table>.parquet`. What each
table's timed region includes, the columns and their units: docs/measured.md.

The package is located with importlib's find_spec, which does not execute it (importing it
loads a native extension we do not need). Every reader takes `root=` (a folder laid out like
`systems/data`) so that tests can point it at small tables of their own.

    from lynx_sim.measured import read_moe
    moe = read_moe("h200")                     # bfloat16 rows of the newest vLLM version
    moe[moe.distribution == "balanced"]        # num_tokens, ..., latency_ms, routing_faithful
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .routing import routing_faithful

# Our hardware names (conf/hardware/*.yaml) -> AIConfigurator's folder names. Their own names
# are accepted as they are.
GPU_NAMES = {"h100_sxm": "h100_sxm", "h200": "h200_sxm", "a100_80gb": "a100_sxm", "b200": "b200_sxm",
             "l40s": "l40s"}

# Table kind -> (op folder, file name).
TABLES = {
    "moe": ("moe", "moe_perf.parquet"),
    "gemm": ("gemm", "gemm_perf.parquet"),
    "generation_attention": ("attention", "generation_attention_perf.parquet"),
    "context_attention": ("attention", "context_attention_perf.parquet"),
    "allreduce": ("comm", "custom_allreduce_perf.parquet"),
    "nccl": ("comm", "nccl_perf.parquet"),  # framework "nccl"
}

# Their column -> ours, per table kind (every other column keeps its name; docs/measured.md).
RENAMES = {
    "moe": {"moe_dtype": "dtype", "latency": "latency_ms"},
    "gemm": {"gemm_dtype": "dtype", "latency": "latency_ms"},
    "generation_attention": {"attn_dtype": "dtype", "latency": "latency_ms"},
    "context_attention": {"attn_dtype": "dtype", "latency": "latency_ms"},
    "allreduce": {"allreduce_dtype": "dtype", "message_size": "message_elements", "latency": "latency_ms"},
    "nccl": {"nccl_dtype": "dtype", "message_size": "message_elements", "latency": "latency_ms"},
}
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "half": 2, "float32": 4, "fp8": 1, "int8": 1}


class MeasuredDataError(ValueError):
    """The measured table asked for is not there (package, GPU, op, framework, version or rows)."""


def data_root(root: str | Path | None = None) -> Path:
    """The `systems/data` folder of the installed aiconfigurator-core, or `root` when given."""
    if root is not None:
        root = Path(root)
        if not root.is_dir():
            raise MeasuredDataError(f"measured-data root {root} is not a folder")
        return root
    import importlib.util

    spec = importlib.util.find_spec("aiconfigurator_core")  # locates, does not execute the package
    if spec is None or not spec.submodule_search_locations:
        raise MeasuredDataError("aiconfigurator-core is not installed: pip install -e \".[measured]\"")
    path = Path(list(spec.submodule_search_locations)[0]) / "systems" / "data"
    if not path.is_dir():
        raise MeasuredDataError(f"aiconfigurator-core is installed but has no data folder at {path}")
    return path


def gpu_folder(gpu: str) -> str:
    """Our hardware name (or theirs) -> their folder name."""
    return GPU_NAMES.get(gpu, gpu)


def _version_key(v: str):
    """PEP 440 order (0.5.6.post2 > 0.5.6, 1.3.0rc20 < 1.3.0); unparsable names first, by name."""
    from packaging.version import InvalidVersion, Version  # a dependency of transformers and hydra

    try:
        return (1, Version(v))
    except InvalidVersion:
        return (0, v)


def inventory(root: str | Path | None = None) -> pd.DataFrame:
    """Every table present: one row per (gpu, op, framework, version, table) with its path."""
    base = data_root(root)
    rows = []
    for kind, (op, name) in TABLES.items():
        for path in sorted(base.glob(f"*/{op}/*/*/{name}")):
            version_dir = path.parent
            rows.append({"gpu": version_dir.parents[2].name, "op": op, "framework": version_dir.parent.name,
                         "version": version_dir.name, "table": kind, "path": str(path)})
    return pd.DataFrame(rows, columns=["gpu", "op", "framework", "version", "table", "path"])


def versions(gpu: str, table: str, framework: str = "vllm", root: str | Path | None = None) -> list[str]:
    """Versions holding this table for this GPU and framework, oldest first."""
    op, name = _table(table)
    base = data_root(root)
    folder = base / gpu_folder(gpu)
    if not folder.is_dir():
        present = sorted(p.name for p in base.iterdir() if p.is_dir())
        raise MeasuredDataError(f"GPU {gpu!r} (folder {gpu_folder(gpu)!r}): no data at {folder}; present: {present}")
    fw = folder / op / framework
    if not fw.is_dir():
        present = sorted(p.name for p in (folder / op).iterdir()) if (folder / op).is_dir() else []
        raise MeasuredDataError(f"{gpu_folder(gpu)}: no {op!r} data for framework {framework!r} at {fw}; "
                                f"frameworks present: {present}")
    found = [p.name for p in fw.iterdir() if (p / name).is_file()]
    if not found:
        raise MeasuredDataError(f"{gpu_folder(gpu)}/{op}/{framework}: no version holds {name} (under {fw})")
    return sorted(found, key=_version_key)


def table_path(gpu: str, table: str, framework: str = "vllm", version: str | None = None,
               root: str | Path | None = None) -> Path:
    """The parquet file of one table; `version=None` takes the newest present."""
    op, name = _table(table)
    present = versions(gpu, table, framework, root)
    chosen = present[-1] if version is None else str(version)
    if chosen not in present:
        raise MeasuredDataError(f"{gpu_folder(gpu)}/{op}/{framework}: version {chosen!r} has no {name}; "
                                f"versions present: {present}")
    return data_root(root) / gpu_folder(gpu) / op / framework / chosen / name


def read_table(gpu: str, table: str, framework: str = "vllm", version: str | None = None,
               root: str | Path | None = None) -> pd.DataFrame:
    """One measured table with our column names (RENAMES; docs/measured.md), all its rows."""
    try:
        import pyarrow  # noqa: F401  (pandas' parquet engine)
    except ImportError as e:
        raise ImportError("reading measured tables needs pyarrow: pip install -e \".[measured]\"") from e
    path = table_path(gpu, table, framework, version, root)
    df = pd.read_parquet(path).rename(columns=RENAMES[table])
    if "message_elements" in df.columns:
        unknown = sorted(set(df["dtype"]) - set(DTYPE_BYTES))
        if unknown:
            raise MeasuredDataError(f"{path}: dtype: expected one of {sorted(DTYPE_BYTES)} (bytes per element), "
                                    f"found {unknown}")
        df["message_bytes"] = df["message_elements"] * df["dtype"].map(DTYPE_BYTES)
    if table == "generation_attention":
        df["kv_len"] = df["step"] + 1  # cached history plus the token being decoded
    df.attrs["source"] = str(path)
    return df


def read_moe(gpu: str, framework: str = "vllm", version: str | None = None, dtype: str | None = "bfloat16",
             kernel_source: str | None = None, root: str | Path | None = None) -> pd.DataFrame:
    """MoE rows of one dtype (None: all) and optionally one kernel_source, with two added
    columns: `routing_faithful` (our reproduction of the routing is what vLLM ran) and
    `routing_note` (why not, else empty). See lynx_sim/measured/routing.py."""
    df = _select(read_table(gpu, "moe", framework, version, root), dtype=dtype, kernel_source=kernel_source)
    keys = ["num_tokens", "hidden_size", "num_experts", "topk", "distribution"]
    verdict = {key: routing_faithful(*key) for key in df[keys].drop_duplicates().itertuples(index=False, name=None)}
    flags = [verdict[key] for key in df[keys].itertuples(index=False, name=None)]
    df["routing_faithful"] = [f[0] for f in flags]
    df["routing_note"] = [f[1] for f in flags]
    return df


def read_gemm(gpu: str, framework: str = "vllm", version: str | None = None, dtype: str | None = None,
              root: str | Path | None = None) -> pd.DataFrame:
    """GEMM rows (m tokens, n out features, k in features) of one dtype (None: all)."""
    return _select(read_table(gpu, "gemm", framework, version, root), dtype=dtype)


def read_generation_attention(gpu: str, framework: str = "vllm", version: str | None = None,
                              root: str | Path | None = None) -> pd.DataFrame:
    """Decode attention rows (one new token per sequence against kv_len cached positions)."""
    return read_table(gpu, "generation_attention", framework, version, root)


def read_context_attention(gpu: str, framework: str = "vllm", version: str | None = None,
                           root: str | Path | None = None) -> pd.DataFrame:
    """Prefill attention rows (isl prompt tokens per sequence, nothing cached)."""
    return read_table(gpu, "context_attention", framework, version, root)


def read_allreduce(gpu: str, framework: str = "vllm", version: str | None = None,
                   root: str | Path | None = None) -> pd.DataFrame:
    """vLLM custom all-reduce rows (num_gpus, message_elements, backend graph or eager)."""
    return read_table(gpu, "allreduce", framework, version, root)


def _table(table: str) -> tuple[str, str]:
    if table not in TABLES:
        raise MeasuredDataError(f"table kind {table!r}: expected one of {sorted(TABLES)}")
    return TABLES[table]


def _select(df: pd.DataFrame, **equal) -> pd.DataFrame:
    """Rows whose columns equal the given values (None: no filter); empty selection -> error."""
    for column, value in equal.items():
        if value is None:
            continue
        keep = df[column] == value
        if not keep.any():
            raise MeasuredDataError(f"{df.attrs.get('source', 'table')}: no row with {column} == {value!r}; "
                                    f"present: {sorted(df[column].unique())}")
        df = df[keep]
    return df.reset_index(drop=True)
