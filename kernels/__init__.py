"""CVMM kernels for moeut-jax: pure JAX on the CPU, Pallas (Mosaic GPU) and Triton on GPUs.

The public API: :func:`cvmm` and :func:`cvmm_pair` (kernels/cvmm.py, the one entry
point, with :func:`expert_weights` and :func:`gated_sum`), the routing they take
(:func:`make_routing`, :func:`make_head_routing`), and :class:`CvmmConfig`, the kernels'
settings.
"""
from kernels.config import DEFAULT, F16_SCALES, IMPLEMENTATIONS, SUM_DTYPES, CvmmConfig
from kernels.cvmm import (available_implementations, cvmm, cvmm_pair, expert_weights, gated_sum,
                          is_available, resolve)
from kernels.routing import Routing, UnitPairs, make_head_routing, make_routing

__all__ = ["CvmmConfig", "DEFAULT", "F16_SCALES", "IMPLEMENTATIONS", "Routing", "SUM_DTYPES",
           "UnitPairs", "available_implementations", "cvmm", "cvmm_pair", "expert_weights",
           "gated_sum", "is_available", "make_head_routing", "make_routing", "resolve"]
