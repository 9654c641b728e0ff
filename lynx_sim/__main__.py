"""Hydra entry point: `python -m lynx_sim policy=lynx batch=64` (and `-m` for sweeps).

A single run's command line is composed and checked before hydra's main (lynx_sim/config.py); a
refused value, like every known error raised later (trace, policy input, memory), is one line
`key: expected X, found Y` on stderr and exit status 2. In a sweep (-m) each job checks its own."""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig

from .config import precheck, refusals
from .run import run


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(cfg) -> float:
    with refusals():
        summary = run(cfg, out_dir=HydraConfig.get().runtime.output_dir)
    return summary.get("speedup", summary.get("tpot_speedup"))


if __name__ == "__main__":
    precheck(sys.argv[1:])
    main()
