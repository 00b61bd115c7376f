"""Rotary position embedding in the "rotate-half" layout on the first channels of a head."""
from __future__ import annotations

import jax
import jax.numpy as jnp

ROPE_BASE = 10000.0


def rotary_width(d_head: int) -> int:
  """Rotated channels per head: half the head, rounded down to even.

  The original uses int(0.5 * d_head) and crashes when that is odd (MoEUT_44M: 82 -> 41);
  like the paper's training code we round down (41 -> 40).
  """
  n = int(0.5 * d_head)
  return n - n % 2


def apply_rope(x: jax.Array, positions: jax.Array, n_rot: int) -> jax.Array:
  """Rotates the first ``n_rot`` channels of x [B, T, H, Dh] at ``positions`` [T].

  rot(x) = x * cos + concat(-x2, x1) * sin over the rotated part split into halves x1, x2;
  channel c uses frequency index c mod (n_rot / 2). Computed in float32.
  """
  if n_rot == 0:
    return x
  half = n_rot // 2
  inv_freq = ROPE_BASE ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / n_rot)   # [n_rot/2]
  angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]             # [T, n_rot/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[None, :, None, :]           # [1, T, 1, n_rot]
  xr = x[..., :n_rot].astype(jnp.float32)
  x1, x2 = xr[..., :half], xr[..., half:]
  rotated = xr * jnp.cos(angles) + jnp.concatenate([-x2, x1], axis=-1) * jnp.sin(angles)
  return jnp.concatenate([rotated.astype(x.dtype), x[..., n_rot:]], axis=-1)
