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

import os
import types

import jax
import jax.numpy as jnp


def _kernel_applies(x: jax.Array, k: int) -> bool:
  if not (x.dtype == jnp.float32 and 0 < x.size < 2 ** 31           # int32 offsets
          and 1 <= k <= x.shape[-1] <= 4096):
    return False
  if jax.default_backend() != "gpu" and os.environ.get("CVMM_TRITON_INTERPRET", "0") != "1":
    return False                     # no GPU: do not import Triton at all
  from kernels.cvmm_triton import launch  # noqa: PLC0415
  return launch.is_available() or launch.interpret()


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
  cfg = types.SimpleNamespace(num_warps=4, num_stages=1)              # what launch reads
  from kernels.cvmm_triton.launch import launch  # noqa: PLC0415
  from kernels.topk_triton import topk_kernel  # noqa: PLC0415
  (idx,) = launch(topk_kernel, (flat,), [jax.ShapeDtypeStruct((r, k), jnp.int32)], grid, cfg,
                  R=r, E=e, K=k, BR=br, BE=be)
  return idx.reshape(*lead, k)
