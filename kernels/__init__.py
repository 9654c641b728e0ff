"""Triton MoE kernels (fused grouped expert GEMMs, Lynx routing kernels).

Not written yet: they arrive with the kernels-and-executor issue. Layering (tests/test_layering.py):
this package imports only torch and triton.
"""
