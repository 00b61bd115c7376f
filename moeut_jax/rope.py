"""Rotary position embedding in the "rotate-half" layout on the first channels of a head."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from moeut_jax.routing import round_in_float32

ROPE_BASE = 10000.0


def rotary_width(d_head: int) -> int:
  """Rotated channels per head: half the head, rounded down to even.

  The original uses int(0.5 * d_head) and crashes when that is odd (MoEUT_44M: 82 -> 41);
  like the paper's training code we round down (41 -> 40).
  """
  n = int(0.5 * d_head)
  return n - n % 2


def apply_rope(x: jax.Array, positions: jax.Array, n_rot: int,
               table_dtype=jnp.float32) -> jax.Array:
  """Rotates the first ``n_rot`` channels of x [B, T, H, Dh] at ``positions`` [T].

  rot(x) = x * cos + concat(-x2, x1) * sin over the rotated part split into halves x1, x2;
  channel c uses frequency index c mod (n_rot / 2). Computed in float32.

  ``table_dtype`` 16-bit computes as the original does under CUDA autocast (a bug of the
  original that we fix: docs/semantics.md §7): its angle table is ``torch.einsum`` of the
  positions and frequencies, which CUDA's autocast runs in the 16-bit dtype, so the
  positions (above 256 in bf16), the frequencies and their products are rounded (at 512
  positions angles are off by up to 2.4 radians), and cos, sin and the rotation of the
  16-bit q and k are 16-bit operations too. Our default computes the angles in float32.
  """
  if n_rot == 0:
    return x
  half = n_rot // 2
  inv_freq = ROPE_BASE ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / n_rot)   # [n_rot/2]
  pos = positions.astype(jnp.float32)
  low = jnp.dtype(table_dtype).itemsize < 4
  if low:
    pos, inv_freq = (round_in_float32(a, table_dtype) for a in (pos, inv_freq))
  angles = pos[:, None] * inv_freq[None, :]                                       # [T, n_rot/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[None, :, None, :]           # [1, T, 1, n_rot]
  xr = x[..., :n_rot].astype(jnp.float32)
  x1, x2 = xr[..., :half], xr[..., half:]
  turned = jnp.concatenate([-x2, x1], axis=-1)
  if low:     # every operation rounded to the 16-bit dtype, as PyTorch's 16-bit ops
    r = lambda v: round_in_float32(v, table_dtype)  # noqa: E731
    angles = r(angles)
    xr, turned = r(xr), r(turned)
    rotated = r(r(xr * r(jnp.cos(angles))) + r(turned * r(jnp.sin(angles))))
  else:
    rotated = xr * jnp.cos(angles) + turned * jnp.sin(angles)
  return jnp.concatenate([rotated.astype(x.dtype), x[..., n_rot:]], axis=-1)
