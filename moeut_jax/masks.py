"""Attention masks: the original's ``AttentionMask`` and how it becomes one boolean array.

True means "may NOT attend", as in the original. Shapes (legend in ``model.py``):
  src_length_mask  [B, S]   padding of the keys
  position_mask    [T, S]   or [T, T], left-padded with False for cached positions
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp


class AttentionMask(NamedTuple):
  """The original's mask. ``AttentionMask(None, None)`` means no masking at all."""
  src_length_mask: Optional[jax.Array] = None
  position_mask: Optional[jax.Array] = None


def causal_mask(q_len: int, k_len: int | None = None) -> jax.Array:
  """[T, S] True above the diagonal: the original's ``triu(ones(T, T), 1)``."""
  k_len = q_len if k_len is None else k_len
  return jnp.arange(k_len)[None, :] > jnp.arange(q_len)[:, None]


def blocked_keys(mask: AttentionMask | None, *, causal: bool, batch: int, q_len: int,
                 n_keys: int, offset, valid_keys=None) -> jax.Array | None:
  """Combines every masking rule into one boolean [B|1, 1, T, S] array (True = blocked).

  Args:
    mask: the user's mask or None.
    causal: block keys after each query (used when ``mask`` is None in ``MoEUTLM``).
    batch, q_len, n_keys: B, T, S (S = cached + new keys, or a fixed cache's capacity).
    offset: absolute position of the first query (int, or a traced int32 for a fixed
      cache): queries sit at ``offset + arange(T)``, keys at ``arange(S)``.
    valid_keys: for a fixed-capacity cache, the number of filled key slots (offset + T);
      keys at or after it are blocked. None when every key slot is filled.

  Returns:
    None when nothing is blocked.
  """
  q_pos = offset + jnp.arange(q_len, dtype=jnp.int32)                # [T]
  k_pos = jnp.arange(n_keys, dtype=jnp.int32)                        # [S]
  blocked = None

  def add(b):
    nonlocal blocked
    blocked = b if blocked is None else (blocked | b)

  if causal:
    add((k_pos[None, :] > q_pos[:, None])[None, None])              # [1, 1, T, S]
  if mask is not None and mask.position_mask is not None:
    pm = jnp.asarray(mask.position_mask).astype(bool)
    if pm.ndim != 2 or pm.shape[0] != q_len or pm.shape[1] not in (q_len, n_keys):
      raise ValueError(
          f"position_mask must be [T, T] or [T, S] with T={q_len} queries and S={n_keys} keys, "
          f"got shape {pm.shape}")
    if pm.shape[1] != n_keys:                                         # [T, T]: pad the cache
      full = jnp.zeros((q_len, n_keys), bool)
      pm = jax.lax.dynamic_update_slice(full, pm, (jnp.int32(0), jnp.asarray(offset, jnp.int32)))
    add(pm[None, None])
  if mask is not None and mask.src_length_mask is not None:
    sl = jnp.asarray(mask.src_length_mask).astype(bool)
    if sl.shape != (batch, n_keys):
      raise ValueError(
          f"src_length_mask must be [B, S] = {(batch, n_keys)} (B batch, S keys including "
          f"cached ones), got shape {sl.shape}")
    add(sl[:, None, None, :])
  if valid_keys is not None:
    add((k_pos >= valid_keys)[None, None, None, :])
  return blocked
