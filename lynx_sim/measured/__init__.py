"""Measured kernel latencies from NVIDIA AIConfigurator (Apache-2.0) and the routing each
measured MoE row ran with: the ground truth the roofline in lynx_sim/cost is calibrated against
(docs/measured.md)."""

from .aiconfigurator import (GPU_NAMES, TABLES, MeasuredDataError, data_root, inventory, read_allreduce,
                             read_context_attention, read_gemm, read_generation_attention, read_moe, read_table,
                             table_path, versions)
from .routing import (balanced_assignment, balanced_counts, local_counts, power_law_counts, power_law_draws,
                      power_law_routing, routing_faithful, row_counts)

__all__ = ["GPU_NAMES", "TABLES", "MeasuredDataError", "data_root", "inventory", "read_allreduce",
           "read_context_attention", "read_gemm", "read_generation_attention", "read_moe", "read_table", "table_path",
           "versions", "balanced_assignment", "balanced_counts", "local_counts", "power_law_counts", "power_law_draws",
           "power_law_routing", "routing_faithful", "row_counts"]
