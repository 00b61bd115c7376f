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
