"""CVMM as Triton kernels called through jax-triton (and Gluon kernels on Hopper).

Modules, from the bottom up:
  launch        jax-triton, Triton's interpreter and the Gluon launcher: the one place
                that touches other libraries' internals
  primitives    device functions the kernels share (gathered products, vector reductions)
  scales        float16 sums: row scales, the scale-back and repair kernels
  tuning        random inputs for the autotuner and cache-key parts
  rows, units, dw, pair      the Triton kernel families, each with its launcher, tile
                candidates and autotuned choice
  gluon_common, gluon_rows, gluon_pairs    the Gluon fused-sum kernels (sm90)
  ops           the custom_vjp ops: cvmm_triton, cvmm_triton_unfused, cvmm_triton_pair
"""
from kernels.cvmm_triton.launch import is_available
from kernels.cvmm_triton.ops import cvmm_triton, cvmm_triton_pair, cvmm_triton_unfused
from kernels.cvmm_triton.pair import pair_supported

__all__ = ["cvmm_triton", "cvmm_triton_pair", "cvmm_triton_unfused", "is_available",
           "pair_supported"]
