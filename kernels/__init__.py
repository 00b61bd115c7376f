"""CVMM kernels for moeut-jax: pure JAX on the CPU, Pallas (Mosaic GPU) and Triton on GPUs."""
from kernels.cvmm import (IMPLEMENTATIONS, SUM_DTYPES, available_implementations, cvmm,
                          cvmm_pair, is_available, resolve)
from kernels.routing import Routing, UnitPairs, make_head_routing, make_routing

__all__ = ["IMPLEMENTATIONS", "Routing", "SUM_DTYPES", "available_implementations", "cvmm",
           "cvmm_pair", "is_available", "make_head_routing", "make_routing", "resolve",
           "UnitPairs"]
