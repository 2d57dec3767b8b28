"""Numba-compiled kernels and the reference AI workloads that use them."""
