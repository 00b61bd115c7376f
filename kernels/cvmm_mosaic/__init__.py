"""CVMM as Pallas kernels on the Mosaic GPU backend (Hopper, sm90: TMA, wgmma).

Modules, from the bottom up:
  common   availability, gathered-row buffers, compiler parameters, the interpreter hook
  slots    per-slot row maps of the tile lists, in plain JAX
  rows     the gathered row kernel (every product: forward, gated sums, dx, dgates)
  gram     the weight-gradient kernel (ragged contraction over each expert's rows)
  pair     the σ-MoE pair's fused forward (up, ReLU, gated down; the middle on chip)
  pair_bwd the σ-MoE pair's fused gradient of its inputs (the middle's gradient on chip)
  ops      the custom_vjp ops: cvmm_mosaic, cvmm_mosaic_pair
"""
from kernels.cvmm_mosaic.common import is_available
from kernels.cvmm_mosaic.ops import cvmm_mosaic, cvmm_mosaic_pair, pair_supported

__all__ = ["cvmm_mosaic", "cvmm_mosaic_pair", "is_available", "pair_supported"]
