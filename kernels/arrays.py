"""Small array helpers shared by the kernels and the model."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def pad_to(a: jax.Array, axis: int, multiple: int) -> jax.Array:
  """a zero-padded at the end of ``axis`` to a multiple of ``multiple`` (a itself if it is one)."""
  pad = -a.shape[axis] % multiple
  if not pad:
    return a
  widths = [(0, 0)] * a.ndim
  widths[axis] = (0, pad)
  return jnp.pad(a, widths)


def gated_rows(x: jax.Array, gates: jax.Array) -> jax.Array:
  """[P, I] rows gates[n, s] * x[n, s // (K // M)] for x [N, M, I], gates [N, K]: the rows
  of a gated weight gradient, scaled once here. The Triton weight-gradient kernel contracts
  plain rows about 1.5x as fast as rows it scales on the way (MoEUT_244M down
  projection on an H200: 0.70 vs 1.10 ms)."""
  n, m, i = x.shape
  k = gates.shape[1]
  rows = x.astype(jnp.float32)[:, :, None, :] * gates.astype(jnp.float32).reshape(
      n, m, k // m, 1)
  return rows.astype(x.dtype).reshape(n * k, i)
