"""Indices of the k largest values along the last axis: a Triton kernel on GPUs.

The routers pick k of E experts per token ([N, E] float32, E in the hundreds, k <= 24).
XLA runs ``jax.lax.top_k`` there as a full sort of every row (0.42-0.50 ms at N = 16,384,
E = 387, k = 16 on an H200, against about 0.01 ms to read the logits once). The kernel
holds a block of rows in registers and takes the maximum k times.

Selection order is ``jax.lax.top_k``'s: descending by IEEE total order (NaN above +inf,
-0.0 below +0.0), equal values by increasing index. Each float is compared through an
int32 key with the same order (non-negative floats: their bits; negative: the bits with
the 31 low ones flipped), and a taken column gets a key below every float's.

``topk_indices`` uses the kernel on GPUs with jax-triton and ``jax.lax.top_k`` elsewhere.
"""
from __future__ import annotations

import types

import jax
import jax.numpy as jnp

from kernels import cvmm_triton
from kernels.cvmm_triton import tl, triton

_jit = triton.jit if triton is not None else (lambda fn: fn)

@_jit
def _topk_kernel(x_ptr, idx_ptr, R, E, K: tl.constexpr, BR: tl.constexpr, BE: tl.constexpr):
  rows = tl.program_id(0) * BR + tl.arange(0, BR)                     # [BR]
  cols = tl.arange(0, BE)                                             # [BE]
  inb = (rows[:, None] < R) & (cols[None, :] < E)
  x = tl.load(x_ptr + rows[:, None] * E + cols[None, :], mask=inb, other=0.0)
  bits = x.to(tl.int32, bitcast=True)
  key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)                  # total order of floats
  taken = -2147483647 - 1                                             # below every float's key
  key = tl.where(inb, key, taken)
  for j in tl.static_range(K):
    best = tl.max(key, axis=1)                                        # [BR]
    first = tl.min(tl.where(key == best[:, None], cols[None, :], BE), axis=1)
    tl.store(idx_ptr + rows * K + j, first, mask=rows < R)
    key = tl.where(cols[None, :] == first[:, None], taken, key)


def _kernel_applies(x: jax.Array, k: int) -> bool:
  return ((cvmm_triton.is_available() or cvmm_triton._interpret())
          and x.dtype == jnp.float32 and 0 < x.size < 2 ** 31  # int32 offsets
          and 1 <= k <= x.shape[-1] <= 4096)


def topk_indices(x: jax.Array, k: int) -> jax.Array:
  """int32 indices [..., k] of the k largest entries of x [..., E] along the last axis,
  largest first, as ``jax.lax.top_k(x, k)[1]``. Not differentiable (indices only)."""
  if not 1 <= k <= x.shape[-1]:
    raise ValueError(f"k={k} must be in [1, {x.shape[-1]}] for an axis of {x.shape[-1]}")
  if not _kernel_applies(x, k):
    return jax.lax.top_k(x, k)[1].astype(jnp.int32)
  e = x.shape[-1]
  lead = x.shape[:-1]
  flat = jax.lax.stop_gradient(x).reshape(-1, e)                      # [R, E]
  r = flat.shape[0]
  be = max(16, 1 << (e - 1).bit_length())
  br = max(1, min(16, 4096 // be))                                    # 4096 keys per program
  grid = max(1, -(-r // br))
  cfg = types.SimpleNamespace(num_warps=4, num_stages=1)              # what _launch reads
  (idx,) = cvmm_triton._launch(_topk_kernel, (flat,),
                               [jax.ShapeDtypeStruct((r, k), jnp.int32)], grid, cfg,
                               R=r, E=e, K=k, BR=br, BE=be)
  return idx.reshape(*lead, k)
