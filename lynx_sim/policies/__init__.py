"""Expert-selection policies: one module a rule, registered by name, configured by `conf/policy/`.

Importing this package imports every module in it, which registers every policy: adding a rule
means adding its module and its `conf/policy/<name>.yaml`, nothing else.
"""

import importlib
import pkgutil

from .base import BatchRouting, Policy, PolicyContext, PolicyInputError, Selection
from .registry import POLICIES, build_policy, register

for _m in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["BatchRouting", "POLICIES", "Policy", "PolicyContext", "PolicyInputError", "Selection", "build_policy", "register"]
