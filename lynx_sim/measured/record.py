"""The calibration record's parts that are not fits: error summaries, the hardware a GPU name
means, where the data came from, the predicted-vs-measured plots, and writing the JSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd


def errors(pred_ms, meas_ms) -> dict:
    """median and p90 of |pred / meas - 1|, the bias median(pred / meas) - 1 (negative: too fast), n."""
    pred, meas = np.asarray(pred_ms, float), np.asarray(meas_ms, float)
    if len(pred) == 0:
        return {"median": None, "p90": None, "bias": None, "n": 0}
    e = np.abs(pred / meas - 1)
    return {"median": round(float(np.median(e)), 4), "p90": round(float(np.quantile(e, 0.9)), 4),
            "bias": round(float(np.median(pred / meas) - 1), 4), "n": int(len(e))}


def hardware(gpu: str):
    """The HardwareSpec of conf/hardware/<gpu>.yaml."""
    from omegaconf import OmegaConf

    from ..config import CONF_DIR
    from ..cost.hardware import HardwareSpec

    return HardwareSpec.from_cfg(OmegaConf.load(CONF_DIR / "hardware" / f"{gpu}.yaml"))


def source(tables: dict) -> dict:
    """The package version and, per table kind, the file and the framework versions read."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        pkg_version = version("aiconfigurator-core")
    except PackageNotFoundError:
        pkg_version = None
    return {"package": "aiconfigurator-core", "version": pkg_version, "framework": "vllm",
            "tables": {name: table_note(df) for name, df in tables.items()}}


def table_note(df: pd.DataFrame) -> dict:
    src = df.attrs.get("source", "")
    marker = "aiconfigurator_core/"
    return {"path": src[src.find(marker):] if marker in src else src,
            "version": sorted(map(str, df.version.unique())) if "version" in df else None}


def plot(gpu: str, folder: Path, parts: dict) -> dict:
    """Predicted vs measured (held-out rows), log-log, one PNG per component; returns {name: path}
    relative to the folder's parent (where the JSON sits)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, (meas, pred, uncal) in parts.items():
        if len(meas) == 0:
            continue
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.loglog(meas, uncal, ".", ms=2, alpha=0.4, color="0.6", label="uncalibrated")
        ax.loglog(meas, pred, ".", ms=2, alpha=0.6, label="fitted (held-out rows)")
        lo, hi = float(min(meas.min(), pred.min())), float(max(meas.max(), pred.max()))
        ax.plot([lo, hi], [lo, hi], "k-", lw=0.8)
        ax.set(xlabel="measured ms", ylabel="predicted ms", title=f"{gpu} {name}")
        ax.legend(loc="upper left", fontsize=8)
        path = folder / f"{gpu}_{name}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths[name] = str(path.relative_to(folder.parent))
    return paths


def write_record(record: dict, path: str | Path) -> Path:
    """Write the record as JSON (no NaN), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, allow_nan=False) + "\n")
    tmp.replace(path)
    return path
