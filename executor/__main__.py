"""Hydra entry point: `python -m executor policy=lynx batch=64` (conf/executor.yaml: the
simulator's config plus the `executor` node).

A bad setting, or no GPU present (unless executor.device=cpu), is one line on stderr and exit
status 2, as for `python -m lynx_sim` (lynx_sim/config.py)."""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig

from lynx_sim.config import precheck, refusals

from .device import NoGPUError
from .run import run


@hydra.main(version_base=None, config_path="../conf", config_name="executor")
def main(cfg) -> None:
    try:
        with refusals():
            s = run(cfg, HydraConfig.get().runtime.output_dir)
    except NoGPUError as e:
        print(e, file=sys.stderr)
        sys.exit(2)
    err = s["simulator_error"]
    print(f"{s['model']} {s['policy']} B={s['batch']} on {s['device']['device']}: MoE layer "
          f"{s['moe_layer_us']['policy']:.1f} us (vanilla {s['moe_layer_us']['vanilla']:.1f} us), measured speedup "
          f"{s['measured_moe_speedup']:.3f}, predicted {s['predicted_moe_speedup']:.3f}"
          + (f"; simulator error median {err['median']:.1%}, p90 {err['p90']:.1%}" if err else ""))
    for note in s["notes"]:
        print("note:", note)


if __name__ == "__main__":
    precheck(sys.argv[1:], "executor")
    main()
