"""Hydra entry point: `python -m lynx_sim policy=lynx batch=64` (and `-m` for sweeps)."""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig

from .run import run


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(cfg) -> float:
    summary = run(cfg, out_dir=HydraConfig.get().runtime.output_dir)
    return summary.get("speedup", summary.get("tpot_speedup"))


if __name__ == "__main__":
    main()
