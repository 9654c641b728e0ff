"""Hydra entry point: `python -m executor policy=lynx batch=64` (the simulator's conf/).

Exits with status 2 and a message when no GPU is present, unless executor.device=cpu."""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig

from .device import NoGPUError
from .run import run


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(cfg) -> None:
    try:
        s = run(cfg, HydraConfig.get().runtime.output_dir)
    except (NoGPUError, ValueError) as e:
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
    main()
