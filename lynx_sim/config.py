"""The repository's hydra configuration, composed the way `python -m lynx_sim` composes it, for
code that is not a hydra entry point (the trace tool, tests, benchmarks, notebooks)."""

from __future__ import annotations

from pathlib import Path

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def compose(overrides=(), return_hydra_config: bool = False):
    """conf/config.yaml with command-line style overrides, e.g. compose(["model=mixtral_8x7b"])."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return hydra_compose("config", overrides=list(overrides), return_hydra_config=return_hydra_config)
