"""Triton MoE kernels: the fused expert layer (align, grouped gate/up and down GEMMs) and, with
it, plain references the tests and benchmarks compare against.

Layering (tests/test_layering.py): this package imports only torch and triton.
"""

from .align import Alignment, align_block_size
from .configs import LayerShape, MoEConfig, select_config
from .fused_moe import fused_moe
from .reference import moe_reference

__all__ = ["Alignment", "LayerShape", "MoEConfig", "align_block_size", "fused_moe", "moe_reference", "select_config"]
