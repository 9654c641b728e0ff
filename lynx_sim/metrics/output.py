"""A run's outputs, written in one place: `steps.csv`, `requests.csv` (serving), `trace.json`,
`plots/*.png`, `config.resolved.yaml`, then `summary.json`.

`summary.json` is the run's commit mark: it is written last, so a run directory that has one is
complete. Every file is first written under a temporary name (`.tmp-<name>`, the suffix kept for
matplotlib) beside its final place; only when all are written are they renamed into place
(atomic on one filesystem), the summary last. A run killed at any moment leaves no summary or a
complete directory; a failed write (a full disk) removes its temporaries and leaves no summary.
The summary is standard JSON: a figure that is undefined is null, never NaN or Infinity.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from omegaconf import OmegaConf

SUMMARY = "summary.json"
TMP = ".tmp-"


class OutputError(OSError):
    """The outputs could not be written (the run directory has no summary.json)."""


def summary_json(summary: dict) -> str:
    """The summary as standard JSON; a NaN or infinity is a bug upstream, named by its key."""
    bad = _non_finite(summary)
    if bad:
        raise ValueError(f"summary.json: {bad[0]} is {bad[1]}, which is not JSON: an undefined figure must be "
                         "null (docs/metrics.md)")
    return json.dumps(summary, indent=2, allow_nan=False) + "\n"


def _non_finite(x, path: str = "summary"):
    if isinstance(x, float) and not math.isfinite(x):
        return path, x
    items = x.items() if isinstance(x, dict) else enumerate(x) if isinstance(x, (list, tuple)) else ()
    for k, v in items:
        bad = _non_finite(v, f"{path}.{k}" if isinstance(x, dict) else f"{path}[{k}]")
        if bad:
            return bad
    return None


def write_run(out: str | Path, cfg, summary: dict, tables: dict, num_experts: int) -> Path:
    """Write a run directory (module docstring); returns the summary's path."""
    from . import chrome_trace, plots

    out = Path(out)
    text = summary_json(summary)  # refused before anything is written
    staged: list[tuple[Path, Path]] = []

    def stage(path: Path) -> Path:
        tmp = path.with_name(TMP + path.name)
        staged.append((tmp, path))
        return tmp

    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / SUMMARY).unlink(missing_ok=True)  # an earlier run's mark must not vouch for the files rewritten now
        stage(out / "config.resolved.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        steps = tables["steps"]
        steps.to_csv(stage(out / "steps.csv"), index=False)
        chrome_trace.write(steps, stage(out / "trace.json"))
        if "requests_main" in tables:
            tables["requests_main"].to_csv(stage(out / "requests.csv"), index=False)
        if cfg.get("plots", True):
            pdir = out / "plots"
            pdir.mkdir(exist_ok=True)
            plots.step_breakdown(steps, stage(pdir / "step_breakdown.png"))
            plots.experts_per_layer(tables["per_layer"], stage(pdir / "experts_per_layer.png"), num_experts)
            if tables.get("requests"):
                plots.latency_cdf(tables["requests"], stage(pdir / "latency_cdf.png"), (cfg.get("slo") or {}).get("tpot_ms"))
        stage(out / SUMMARY).write_text(text)
        for tmp, _ in staged:
            _sync(tmp)
        for tmp, final in staged:  # the summary is staged last, so renamed last
            os.replace(tmp, final)
        _sync(out)
    except OSError as e:
        raise OutputError(f"{out}: outputs not written ({e}); the run directory has no {SUMMARY}") from e
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
    return out / SUMMARY


def _sync(path: Path) -> None:
    """Flush to the disk, so that a full disk fails here rather than after the rename."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
