"""Routing metadata for CVMM: token-expert pairs sorted by expert.

Legend (used in every file of ``kernels/``):
  N  tokens (rows of the flattened batch)
  K  slots per token: the number of experts each token selected (top-k)
  M  input rows per token (1: every slot reads the same row; K: slot s reads row s;
     any divisor of K: slot s reads row s // (K // M))
  P  pairs, N * K
  E  experts
  I  input width (contraction), O output width

A :class:`Routing` is computed once per layer from the selected expert indices and
reused by every projection that shares the selection (σ-MoE up and down, the backward
pass), so the sort runs once.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Routing:
  """Token-expert pairs sorted by expert.

  Attributes:
    expert_index: [N, K] int32, the selected expert of every (token, slot).
    order: [P] int32, ``order[p]`` is the pair index ``n * K + s`` at sorted position p.
      Pairs of one expert are contiguous and keep their original relative order.
    group_sizes: [E] int32, pairs per expert.
    group_offsets: [E + 1] int32, exclusive prefix sum of ``group_sizes``.
    n_experts: E (static).
  """

  expert_index: jax.Array
  order: jax.Array
  group_sizes: jax.Array
  group_offsets: jax.Array
  n_experts: int = dataclasses.field(metadata=dict(static=True))

  @property
  def n_tokens(self) -> int:
    return self.expert_index.shape[0]

  @property
  def k(self) -> int:
    return self.expert_index.shape[1]

  @property
  def n_pairs(self) -> int:
    return self.order.shape[0]

  def sorted_expert(self) -> jax.Array:
    """[P] int32: the expert of each sorted position."""
    return self.expert_index.reshape(-1)[self.order]

  def sorted_token(self) -> jax.Array:
    """[P] int32: the token (row of N) of each sorted position."""
    return self.order // self.k

  def tiles(self, block_m: int) -> jax.Array:
    """[3, Z] int32 expert-aligned tiles of at most ``block_m`` sorted positions.

    Row 0 is each tile's expert, rows 1 and 2 its first and end sorted position
    (start == end for the unused tiles at the end). Z = min(P, (P + E*(block_m-1)) //
    block_m) is a static bound on sum_e ceil(group_sizes[e] / block_m). The GPU
    kernels launch one program per tile (and output block); being a pure function
    of the routing, XLA computes it once per jit for all calls with the same block.
    """
    return expert_tiles(self.group_sizes, self.group_offsets, self.n_pairs, block_m)

  def band_tiles(self, block_m: int, band: int) -> jax.Array:
    """[3, Z] int32 tiles as :meth:`tiles`, but each also within one band of ``band``
    tokens, listed band by band and, within a band, expert by expert.

    For the kernels that add their rows into a shared output (the fused sums), run in
    this order: the programs in flight add into one band's rows (``band`` × O values,
    which stay in L2), and the tiles of one (band, expert) run together, so each
    expert's matrix comes from DRAM about once per band instead of once per tile.
    Within an expert the sorted pairs are in token order, so a band is a contiguous
    part of each expert's positions. Z is a static bound on the number of tiles; the
    unused ones at the end have start == end.
    """
    if band < 1:
      raise ValueError(f"{band=} must be at least 1")
    n, k, p, e = self.n_tokens, self.k, self.n_pairs, self.n_experts
    n_bands = -(-n // band)
    if n_bands == 1:
      return self.tiles(block_m)
    b = jnp.arange(n_bands, dtype=jnp.int32)
    if (e + 1) * p < _PACKED_KEY_LIMIT:
      # The sorted positions' keys expert * P + pair are increasing; band b of expert x
      # starts at the first key >= x * P + b * band * K.
      keys = self.sorted_expert() * p + self.order                           # [P]
      q = jnp.arange(e, dtype=jnp.int32)[None, :] * p + b[:, None] * (band * k)
      lo = jnp.searchsorted(keys, q.reshape(-1), side="left").astype(jnp.int32)
      lo = lo.reshape(n_bands, e)
    else:
      band_of = (jnp.arange(p, dtype=jnp.int32) // k) // band              # [P]
      counts = jnp.zeros((n_bands * e,), jnp.int32).at[
          band_of * e + self.expert_index.reshape(-1)].add(1).reshape(n_bands, e)
      lo = self.group_offsets[None, :-1] + jnp.cumsum(counts, axis=0) - counts
    hi = jnp.concatenate([lo[1:], self.group_offsets[None, 1:]], axis=0)   # [bands, E]
    expert = jnp.broadcast_to(jnp.arange(e, dtype=jnp.int32), (n_bands, e))
    return segment_tiles(lo.reshape(-1), hi.reshape(-1), expert.reshape(-1), p, block_m)


_PACKED_KEY_LIMIT = 2 ** 31       # expert * P + pair must fit an int32


def make_routing(expert_index: jax.Array, n_experts: int) -> Routing:
  """Sorts the (token, slot) pairs of ``expert_index`` [N, K] by expert."""
  if expert_index.ndim != 2:
    raise ValueError(f"expert_index must be [N, K], got shape {expert_index.shape}")
  if not jnp.issubdtype(expert_index.dtype, jnp.integer):
    raise TypeError(f"expert_index must be integer, got {expert_index.dtype}")
  if n_experts < 1:
    raise ValueError(f"{n_experts=} must be at least 1")
  expert_index = expert_index.astype(jnp.int32)
  flat = expert_index.reshape(-1)                                   # [P]
  p = flat.shape[0]
  if n_experts * p < _PACKED_KEY_LIMIT:
    # One int32 key per pair, expert * P + pair: unique, so a plain (keys-only) sort
    # gives the stable order, and each expert's first position is a binary search.
    # Faster on GPUs than an argsort (a key-value sort) plus a bincount, whose
    # scatter-add contends on few bins.
    keys = jnp.sort(flat * p + jnp.arange(p, dtype=jnp.int32))     # [P]
    order = keys % p
    bounds = jnp.arange(n_experts + 1, dtype=jnp.int32) * p         # [E+1]
    group_offsets = jnp.searchsorted(keys, bounds, side="left",
                                     method="scan_unrolled").astype(jnp.int32)
    group_sizes = jnp.diff(group_offsets)                           # [E]
  else:
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)        # [P]
    group_sizes = jnp.bincount(flat, length=n_experts).astype(jnp.int32)   # [E]
    group_offsets = jnp.concatenate(
        [jnp.zeros((1,), jnp.int32), jnp.cumsum(group_sizes, dtype=jnp.int32)])  # [E+1]
  return Routing(expert_index, order, group_sizes, group_offsets, n_experts)


def expert_tiles(group_sizes: jax.Array, group_offsets: jax.Array, n_pairs: int,
                 block_m: int) -> jax.Array:
  """See :meth:`Routing.tiles`."""
  e = group_sizes.shape[0]
  return segment_tiles(group_offsets[:-1], group_offsets[1:],
                       jnp.arange(e, dtype=jnp.int32), n_pairs, block_m)


def segment_tiles(lo: jax.Array, hi: jax.Array, expert: jax.Array, n_pairs: int,
                  block_m: int) -> jax.Array:
  """[3, Z] int32 (expert, start, end) tiles of at most ``block_m`` sorted positions
  covering the segments [lo[g], hi[g]) (G disjoint segments, each of one expert
  ``expert[g]``), segment after segment. Z = min(P, (P + G*(block_m-1)) // block_m)
  bounds sum_g ceil((hi[g] - lo[g]) / block_m); unused tiles have start == end == 0."""
  g = lo.shape[0]
  z = max(1, min(n_pairs, (n_pairs + g * (block_m - 1)) // block_m))
  per_seg = (hi - lo + block_m - 1) // block_m                            # [G]
  tile_off = jnp.cumsum(per_seg, dtype=jnp.int32)                         # [G] inclusive
  zi = jnp.arange(z, dtype=jnp.int32)                                     # [Z]
  seg = jnp.searchsorted(tile_off, zi, side="right").astype(jnp.int32)    # [Z]
  used = seg < g
  seg = jnp.minimum(seg, g - 1)
  local = zi - (tile_off[seg] - per_seg[seg])                             # [Z] tile in segment
  start = lo[seg] + local * block_m
  end = jnp.minimum(start + block_m, hi[seg])
  start = jnp.where(used, start, 0)
  end = jnp.where(used, end, 0)
  return jnp.stack([expert[seg], start, end]).astype(jnp.int32)           # [3, Z]
