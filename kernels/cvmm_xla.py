"""CVMM in pure JAX through expert-aligned tiles: the CPU path and the portable fallback.

The sorted pairs are laid out so that each expert's group starts on a tile boundary of
``tile`` rows (groups padded with zero rows). Every tile then belongs to exactly one
expert, and the whole product is one batched matmul ``[Z, T, I] @ [Z, I, O]`` over
Z tiles, the static bound of :meth:`Routing.tiles`. Padding costs at most E*T rows; the
tile height follows the mean group size so that this stays about P. XLA differentiates
it (the weight gradient is a scatter-add of per-tile products into the experts).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.routing import Routing


def is_available() -> bool:
  return True


def _tile_rows(n_pairs: int, n_experts: int) -> int:
  mean_group = max(1, n_pairs // n_experts)
  t = 8
  while t < mean_group and t < 128:
    t *= 2
  return t


def _pair_rows(routing: Routing, m: int) -> jax.Array:
  """[P] rows of x.reshape(N*M, I) read by each sorted position."""
  order = routing.order
  k = routing.k
  return (order // k) * m + (order % k) // (k // m)


def cvmm_xla(x: jax.Array, routing: Routing, w: jax.Array,
             gates: jax.Array | None = None) -> jax.Array:
  """See :func:`kernels.cvmm`. x [N, M, I], w [E, I, O], gates [N, K] or None."""
  n, m, i = x.shape
  e, _, o = w.shape
  k, p = routing.k, routing.n_pairs
  t = _tile_rows(p, e)
  tile_expert = routing.tiles(t)[0]                                  # [Z]; unused tiles: any
  z = tile_expert.shape[0]                                           # static tile count

  sizes = routing.group_sizes
  padded = (sizes + t - 1) // t * t                                  # [E]
  poff = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(padded, dtype=jnp.int32)])
  sorted_e = routing.sorted_expert()                                 # [P]
  rank = jnp.arange(p, dtype=jnp.int32) - routing.group_offsets[sorted_e]
  dest = poff[sorted_e] + rank                                       # [P] row in the tiles

  xs = x.reshape(n * m, i)[_pair_rows(routing, m)]                   # [P, I]
  x_tiles = jnp.zeros((z * t, i), x.dtype).at[dest].set(xs, unique_indices=True)
  y_tiles = jnp.einsum("ZTI,ZIO->ZTO", x_tiles.reshape(z, t, i), w[tile_expert],
                       preferred_element_type=jnp.float32)           # [Z, T, O]
  y_sorted = y_tiles.reshape(z * t, o)[dest]                         # [P, O]
  y = jnp.zeros((p, o), jnp.float32).at[routing.order].set(y_sorted, unique_indices=True)
  y = y.reshape(n, k, o)                                             # [N, K, O]
  if gates is None:
    return y.astype(x.dtype)
  return jnp.einsum("NK,NKO->NO", gates.astype(jnp.float32), y).astype(x.dtype)
