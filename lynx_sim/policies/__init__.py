"""Expert-selection policies: one module a rule, registered by name, configured by `conf/policy/`.

Importing this package registers every policy.
"""

from . import lynx, vanilla  # noqa: F401  (registration side effect)
from .base import BatchRouting, Policy, PolicyInputError, Selection
from .registry import POLICIES, build_policy, register

__all__ = ["BatchRouting", "POLICIES", "Policy", "PolicyInputError", "Selection", "build_policy", "register"]
