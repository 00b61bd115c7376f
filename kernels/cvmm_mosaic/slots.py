"""Per-slot row maps of the Mosaic GPU kernels, in plain JAX (computed by XLA, O(P)).

A tile list (:meth:`kernels.routing.Routing.ordered_tiles`) gives each tile z its
expert and its sorted positions [start, end), at most T of them. Slot (z, r) is
position start + r of tile z; the kernels read, per slot, the row of an input it
multiplies and the row of the output it writes, and (gated calls) its gate. Slots past
a tile's end ("padding") read and write row R of an [R, C] array: out of bounds, so the
gathers read zeros there and the writes are skipped (kernels/cvmm_mosaic/common.py).

Row maps: pair p = n * K + s lives in row ``(p // K) * R + (p % K) // (K // R)`` of an
array with R rows per token (R = 1: the token's row; R = K: the pair's own row; R = M:
x's row of that slot).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.routing import Routing


def pair_row(pair: jax.Array, k: int, rows_per_token: int) -> jax.Array:
  """Row of pair ``pair`` (any shape, int32) in an array of ``rows_per_token`` rows a token."""
  return (pair // k) * rows_per_token + (pair % k) // (k // rows_per_token)


def slot_pairs(routing: Routing, tiles: jax.Array, t: int) -> jax.Array:
  """[Z * T] int32: the pair of every slot of ``tiles`` [3, Z] (tiles of at most ``t``
  positions), -1 for padding slots."""
  start, end = tiles[1], tiles[2]
  pos = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]       # [Z, T]
  valid = pos < end[:, None]
  pair = routing.order[jnp.clip(pos, 0, max(routing.n_pairs - 1, 0))]
  return jnp.where(valid, pair, -1).reshape(-1)


def slot_rows(pairs: jax.Array, routing: Routing, rows_per_token: int) -> jax.Array:
  """[S] int32 rows (``rows_per_token`` a token) of the slots' pairs; padding slots get
  N * rows_per_token, one past the last row."""
  oob = routing.n_tokens * rows_per_token
  return jnp.where(pairs >= 0, pair_row(pairs, routing.k, rows_per_token), oob
                   ).astype(jnp.int32)


def slot_values(pairs: jax.Array, values: jax.Array) -> jax.Array:
  """[S] float32 ``values`` [P] (by pair) of the slots' pairs; 0 for padding slots."""
  v = values.reshape(-1).astype(jnp.float32)
  return jnp.where(pairs >= 0, v[jnp.maximum(pairs, 0)], 0.0)


def used_tiles(tiles: jax.Array) -> jax.Array:
  """[1] int32: how many tiles of ``tiles`` [3, Z] hold positions (they come first)."""
  return jnp.sum(tiles[2] > tiles[1], dtype=jnp.int32).reshape(1)


def sorted_rows(routing: Routing, rows_per_token: int, pad: int) -> jax.Array:
  """[P + pad] int32: the row (``rows_per_token`` a token) of the pair at each sorted
  position, then ``pad`` out-of-bounds rows (the weight gradient's index blocks may
  run past the last position)."""
  rows = pair_row(routing.order, routing.k, rows_per_token).astype(jnp.int32)
  oob = jnp.full((pad,), routing.n_tokens * rows_per_token, jnp.int32)
  return jnp.concatenate([rows, oob])
