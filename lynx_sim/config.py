"""The repository's hydra configuration, composed the way `python -m lynx_sim` composes it, for
code that is not a hydra entry point (the trace tool, tests, benchmarks, notebooks), and the
command line's refusals: a wrong type, an unknown key, a value out of range (lynx_sim/schema.py)
or a known error raised later is one line on stderr and exit status 2, never a traceback.
`HYDRA_FULL_ERROR=1` (hydra's own switch) re-raises instead."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path

from .schema import ConfigError, Worded, describe, field_type, validate

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def compose(overrides=(), return_hydra_config: bool = False, config_name: str = "config"):
    """conf/<config_name>.yaml with command-line style overrides, e.g. compose(["model=mixtral_8x7b"]);
    a composition error (wrong type, unknown key or option) raises ConfigError."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        try:
            return hydra_compose(config_name, overrides=list(overrides), return_hydra_config=return_hydra_config)
        except (HydraException, OmegaConfBaseException, ValueError) as e:  # hydra raises a few plain ValueErrors
            raise from_hydra(e, overrides) from None


def load(overrides=(), config_name: str = "config"):
    """What `python -m lynx_sim` checks before hydra's main: compose, booleans spelled as
    booleans, then every range and combination (schema.validate)."""
    cfg = compose(overrides, config_name=config_name)
    _booleans(cfg, overrides)
    validate(cfg)
    return cfg


def _booleans(cfg, overrides) -> None:
    """OmegaConf reads 1, 'yes' or 'on' as true; on the command line a boolean key takes true or false."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import BooleanNode, DictConfig, OmegaConf

    for o in OverridesParser.create().parse_overrides(list(overrides)):
        if o.is_sweep_override() or o.is_delete() or o.package is not None:
            continue
        parent_key, _, leaf = o.key_or_group.rpartition(".")
        parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
        node = parent._get_node(leaf) if isinstance(parent, DictConfig) and leaf in parent else None
        if isinstance(node, BooleanNode) and not isinstance(o.value(), bool):
            raise ConfigError(o.key_or_group, "true or false", o.value())


def from_hydra(e: Exception, overrides=()) -> ConfigError:
    """A hydra or OmegaConf composition error as one ConfigError line naming the key."""
    from hydra.errors import MissingConfigException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    if isinstance(e, MissingConfigException) and e.missing_cfg_file:
        group, _, name = e.missing_cfg_file.rpartition("/")
        options = ", ".join(e.options or [])
        return ConfigError(group or "config", f"one of {options}" if options else "an existing config", name)
    cause = e
    while cause is not None and not (isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None)):
        cause = cause.__cause__ or cause.__context__
    if cause is None:
        return _unparsed(e, overrides)
    owner, key = getattr(cause, "object_type", None), cause.full_key
    leaf = key.rpartition(".")[2]
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)):
        known = owner is not None and hasattr(owner, "__dataclass_fields__")
        keys = f"one of the keys {', '.join(owner.__dataclass_fields__)}" if known else "a key this config node has"
        return ConfigError(key, keys, Worded("an unknown key"))
    t = field_type(owner, leaf)
    found = getattr(cause, "value", None) if hasattr(cause, "value") else Worded(_one_line(cause))
    return ConfigError(key, describe(t) if t is not None else _one_line(cause).split(" full_key")[0], found)


def _unparsed(e: Exception, overrides) -> ConfigError:
    """An override hydra could not parse, or a sweep without -m, named by its key."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    for line in overrides:
        key = line.partition("=")[0].lstrip("+~")
        try:
            o = parser.parse_override(line)
        except HydraException:
            return ConfigError(key, "a value in hydra's override grammar", Worded(repr(line.partition("=")[2])),
                               "https://hydra.cc/docs/advanced/override_grammar/basic")
        if o.is_sweep_override():
            return ConfigError(key, "one value (a sweep runs with -m)", Worded(repr(line.partition("=")[2])))
    return ConfigError("config", "a config hydra can compose", Worded(_one_line(e)))


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def precheck(argv: list[str], config_name: str = "config") -> None:
    """Compose and check a single run's command line before hydra's main; exit 2 with one line
    when it is refused. Sweeps (-m) and hydra's own flags (--help, --info, ...) pass through:
    each sweep job checks its own config."""
    from hydra._internal.utils import get_args_parser

    args, _ = get_args_parser().parse_known_args(argv)
    if (args.multirun or args.help or args.hydra_help or args.info or args.shell_completion
            or args.config_path or args.config_dir or args.experimental_rerun):
        return
    with refusals():  # --cfg prints the config: its types and keys must hold, ranges need not
        (compose if args.cfg else load)(args.overrides, config_name=args.config_name or config_name)


@contextmanager
def refusals():
    """Known errors (refused configs, traces, policy inputs, memory, a missing input file) as one
    line and exit 2; outputs that could not be written (a full disk) as one line and exit 1."""
    from .metrics.output import OutputError

    try:
        yield
    except (ValueError, FileNotFoundError, OutputError) as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(_one_line(e), file=sys.stderr)
        sys.exit(1 if isinstance(e, OutputError) else 2)
