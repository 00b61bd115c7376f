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
pass), so the sort runs once. On GPUs it also carries the GPU kernels' tile lists
(:meth:`Routing.with_tiles`), computed once per layer too instead of once per call.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp


# Launch orders of tile lists (:meth:`Routing.ordered_tiles`).
TILE_ORDERS = ("expert", "token")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Routing:
  """Token-expert pairs sorted by expert.

  Attributes:
    expert_index: [N, K] int32, the selected expert of every (token, slot).
    order: [P] int32, ``order[p]`` is the pair index ``n * K + s`` at sorted position p.
      Pairs of one expert are contiguous. From :func:`make_routing` they keep their
      original relative order (token order); from :func:`make_unit_routing` they are in
      blocks of one partner expert each, token order within a block.
    group_sizes: [E] int32, pairs per expert.
    group_offsets: [E + 1] int32, exclusive prefix sum of ``group_sizes``.
    n_experts: E (static).
    tile_lists: precomputed [3, Z] tile lists, keyed "<order>/<block_m>" (see
      :meth:`ordered_tiles`); empty unless :meth:`with_tiles` filled it. A cache only:
      a list it lacks is computed when asked for.
    pairs: the pairs taken two by two and sorted by their two experts
      (:class:`UnitPairs`, :meth:`with_unit_pairs`), or None. SwitchHead's routings
      carry them when asked (:func:`make_head_routing`): the fused sums then add a
      head's two products in registers before one reduction.
  """

  expert_index: jax.Array
  order: jax.Array
  group_sizes: jax.Array
  group_offsets: jax.Array
  n_experts: int = dataclasses.field(metadata=dict(static=True))
  tile_lists: dict = dataclasses.field(default_factory=dict)
  pairs: Optional[UnitPairs] = None

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
    kernels launch one program per tile (and output block).
    """
    return self.ordered_tiles(block_m, "expert")

  def ordered_tiles(self, block_m: int, order: str = "expert") -> jax.Array:
    """[3, Z] int32 tiles of at most ``block_m`` sorted positions, launched in ``order``:
      "expert"    expert by expert (:meth:`tiles`);
      "token"     by the first token they hold (:func:`token_ordered`; the fused sums).
    Taken from :attr:`tile_lists` when it holds them, else computed."""
    if order not in TILE_ORDERS:
      raise ValueError(f"tile order {order!r}: expected one of {TILE_ORDERS}")
    cached = self.tile_lists.get(f"{order}/{block_m}")
    if cached is not None:
      return cached
    tiles = expert_tiles(self.group_sizes, self.group_offsets, self.n_pairs, block_m)
    return tiles if order == "expert" else token_ordered(tiles, self)

  def with_tiles(self, block_ms=None, orders=TILE_ORDERS) -> Routing:
    """This routing with the tile lists of ``block_ms`` (default: :data:`TILE_BLOCKS`,
    the GPU kernels' row tiles) in ``orders`` computed now, so that every kernel call
    that shares the routing (forward and backward) reuses them. Under ``jax.jit`` the
    lists no call uses are dropped by XLA."""
    block_ms = TILE_BLOCKS if block_ms is None else tuple(block_ms)
    lists = dict(self.tile_lists)
    for o in dict.fromkeys(orders):
      for bm in block_ms:
        lists[f"{o}/{bm}"] = self.ordered_tiles(bm, o)
    return dataclasses.replace(self, tile_lists=lists)

  def with_unit_pairs(self, block: int, block_ms=None) -> Routing:
    """This routing with its pairs taken two by two (:func:`make_unit_pairs`; ``block``:
    experts per head) and their tile lists for ``block_ms`` (default :data:`PAIR_BLOCKS`)
    computed now."""
    return dataclasses.replace(self, pairs=make_unit_pairs(self, block, block_ms))


_PACKED_KEY_LIMIT = 2 ** 31       # sort keys must fit an int32

# Row-tile heights of the GPU kernels' tile candidates (kernels/cvmm_triton/).
TILE_BLOCKS = (64, 128, 256)


# Row-tile heights of the unit-pair kernels (kernels/cvmm_triton/gluon_pairs.py). Under
# jax.jit the lists no call uses are dropped.
PAIR_BLOCKS = (64, 128)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class UnitPairs:
  """The pairs of a routing taken two by two, sorted by their experts.

  Unit u is the pairs 2u and 2u + 1: two consecutive slots of one token (K even). In
  SwitchHead (k = 2 per head, slot 2h + j of head h) a unit is one head of one token,
  and its two experts are that head's. Both pairs of a unit read one input row (or two
  rows) and add into one output row, so a kernel can multiply a tile of units that
  share their two experts by both matrices and add the two products before one
  reduction: half the reductions of a tile of pairs.

  Attributes:
    lo: [U] int32, at each sorted position the unit's pair with the lower expert (the
      first if both are the same).
    hi: [U] int32, the unit's other pair.
    group_offsets: [G + 1] int32, where each combination's units start; combination
      (a, b), a <= b within one block of ``block`` experts starting at expert c, is
      group c * block + (a - c) * block + (b - c).
    block: experts per block (static): both experts of every unit lie in one block of
      ``block`` consecutive experts (SwitchHead: one head's experts).
    n_experts: E (static).
    k: K, slots per token (static).
    tile_lists: [4, Z] int32 tile lists keyed by their height (str): the lower and
      the higher expert, start and end of each tile of at most that many sorted units
      of one combination, launched by the first token they hold (unused tiles last,
      with start == end == 0). A cache: :meth:`tiles` computes a list it lacks.
  """

  lo: jax.Array
  hi: jax.Array
  group_offsets: jax.Array
  block: int = dataclasses.field(metadata=dict(static=True))
  n_experts: int = dataclasses.field(metadata=dict(static=True))
  k: int = dataclasses.field(metadata=dict(static=True))
  tile_lists: dict = dataclasses.field(default_factory=dict)

  @property
  def n_units(self) -> int:
    return self.lo.shape[0]

  def tiles(self, block_m: int, by_token: bool = True) -> jax.Array:
    """[4, Z] int32 (lower expert, higher expert, start, end) tiles, launched by the
    first token they hold (else combination by combination, as sorted)."""
    cached = self.tile_lists.get(str(block_m)) if by_token else None
    if cached is not None:
      return cached
    u, b = self.n_units, self.block
    g = self.group_offsets.shape[0] - 1
    t = segment_tiles(self.group_offsets[:-1], self.group_offsets[1:],
                      jnp.arange(g, dtype=jnp.int32), u, block_m)            # [3, Z]
    grp, start, end = t[0], t[1], t[2]
    base = (grp // (b * b)) * b
    e_lo, e_hi = base + (grp % (b * b)) // b, base + grp % b
    first_tok = _first_tokens(self.lo, start, self.k)
    key = jnp.where(end > start, first_tok, u)
    t4 = jnp.stack([e_lo, e_hi, start, end]).astype(jnp.int32)
    return t4[:, _stable_order(key, u + 1)] if by_token else t4


def make_unit_pairs(routing: Routing, block: int, block_ms=None) -> UnitPairs:
  """The pairs of ``routing`` taken two by two (:class:`UnitPairs`) and sorted by their
  two experts, with the tile lists of ``block_ms`` (default :data:`PAIR_BLOCKS`).

  Both experts of every unit must lie in one block of ``block`` consecutive experts
  (SwitchHead: each head's experts); with concrete indices that is checked here.
  (:func:`make_unit_routing` builds a routing and its unit pairs with one sort.)"""
  grp, swap = _unit_groups(routing.expert_index, routing.n_experts, block)
  unit, offs = _group_sort(grp, routing.n_experts * block)
  return _unit_pairs(unit, swap, offs, block, routing.n_experts, routing.k, block_ms)


def make_unit_routing(expert_index: jax.Array, n_experts: int, block: int, *,
                      tile_blocks=None, block_ms=None) -> Routing:
  """A routing of ``expert_index`` [N, K] together with its unit pairs (slots 2j and
  2j + 1 of a token, both experts within one block of ``block`` experts), from one sort
  of the N * K / 2 units instead of two sorts (the pairs by expert, then the units).

  The units are sorted by their combination of experts (token order within one); each
  expert's pairs are then its combinations' units, one block per partner expert: first
  the combinations where it is the lower expert (by partner), then those where it is
  the higher. Within an expert the pairs are therefore not in token order, but each
  block is, so tiles launched by first token keep most of their locality. Everything else is as :func:`make_routing`
  (``tile_blocks``) and :func:`make_unit_pairs` (``block_ms``)."""
  expert_index = _check_expert_index(expert_index, n_experts)
  n, k = expert_index.shape
  e, b = n_experts, block
  grp, swap = _unit_groups(expert_index, e, b)
  unit, offs = _group_sort(grp, e * b)                                     # [U], [G+1]
  u = unit.shape[0]
  # sizes[c, x, y]: units of block c whose experts are its x-th and y-th (x <= y)
  sizes = jnp.diff(offs).reshape(e // b, b, b)
  # the pairs' blocks in their sorted order: expert by expert, first the combinations
  # where it is the lower expert (by partner), then those where it is the higher
  as_lo = sizes                                                # [E/b, x, y]: expert x
  as_hi = jnp.swapaxes(sizes, 1, 2)                            # [E/b, x, y]: expert x
  blocks = jnp.stack([as_lo, as_hi], axis=2).reshape(-1)       # [E * 2 * b]
  group_sizes = jnp.sum(blocks.reshape(e, 2 * b), axis=1)
  group_offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32),
                                   jnp.cumsum(group_sizes, dtype=jnp.int32)])
  ends = jnp.cumsum(blocks, dtype=jnp.int32)
  q = jnp.arange(2 * u, dtype=jnp.int32)                       # sorted pair positions
  blk = jnp.searchsorted(ends, q, side="right", method="scan_unrolled").astype(jnp.int32)
  x, hi_side, y = blk // (2 * b), (blk // b) % 2, blk % b      # expert, side, partner
  xl = x % b
  g = (x // b) * (b * b) + jnp.where(hi_side == 1, y * b + xl, xl * b + y)
  su = unit[offs[g] + q - (ends[blk] - blocks[blk])]           # the position's unit
  order = 2 * su + jnp.where(hi_side == 1, 1 - swap[su], swap[su])
  pairs = _unit_pairs(unit, swap, offs, b, e, k, block_ms)
  r = Routing(expert_index, order, group_sizes, group_offsets, e, pairs=pairs)
  tile_blocks = _default_tile_blocks() if tile_blocks is None else tile_blocks
  return r.with_tiles(tile_blocks) if tile_blocks else r


def _unit_groups(expert_index: jax.Array, n_experts: int,
                 block: int) -> tuple[jax.Array, jax.Array]:
  """(combination [U], swapped [U]) int32 of the units of ``expert_index`` [N, K] (slots
  2j and 2j + 1 of a token): the group of its two experts (see :class:`UnitPairs`) and
  1 where the second slot holds the lower expert. Refuses odd K, a ``block`` that does
  not divide the experts and (concrete indices) a unit across two blocks."""
  k, e = expert_index.shape[1], n_experts
  if k % 2:
    raise ValueError(f"unit pairs need an even number of slots per token, got K={k}")
  if block < 1 or e % block:
    raise ValueError(f"{block=} must divide the {e} experts")
  ex = expert_index.reshape(-1, 2)
  e_lo, e_hi = jnp.min(ex, axis=1), jnp.max(ex, axis=1)
  if not isinstance(ex, jax.core.Tracer) and ex.shape[0]:
    if bool(jnp.any(e_lo // block != e_hi // block)):
      raise ValueError(f"unit pairs: a unit's two experts lie in different blocks of "
                       f"{block} experts")
  swap = (ex[:, 1] < ex[:, 0]).astype(jnp.int32)
  grp = (e_lo // block) * (block * block) + (e_lo % block) * block + e_hi % block
  return grp.astype(jnp.int32), swap


def _unit_pairs(unit, swap, offs, block: int, e: int, k: int, block_ms) -> UnitPairs:
  """:class:`UnitPairs` of the units sorted by combination (``unit`` [U], the unit at
  each sorted position; ``offs`` [G + 1]) with the tile lists of ``block_ms``."""
  sw = swap[unit]
  up = UnitPairs(2 * unit + sw, 2 * unit + 1 - sw, offs, block, e, k)
  lists = {str(bm): up.tiles(bm) for bm in (PAIR_BLOCKS if block_ms is None else block_ms)}
  return dataclasses.replace(up, tile_lists=lists)


def token_ordered(tiles: jax.Array, routing: Routing) -> jax.Array:
  """Tiles [3, Z] (in expert order) reordered by the first token they hold (unused
  tiles last).

  Within an expert the sorted pairs keep token order, so a tile of BM pairs covers a
  band of about BM * E / K tokens. Launched in expert order, the tiles running at one
  time add into rows spread over all N tokens, and the fused sums' reductions miss L2
  (the output is several times its size). Launched by first token, the programs in
  flight touch one band of rows, which stays in L2. The cost is that consecutive
  programs use different experts' matrices.
  """
  start, end = tiles[1], tiles[2]
  first_tok = _first_tokens(routing.order, start, routing.k)
  key = jnp.where(end > start, first_tok, routing.n_tokens)         # [Z]
  return tiles[:, _stable_order(key, routing.n_tokens + 1)]


def check_out_rows(out_rows: int, k: int, gated: bool) -> None:
  """Raises ``ValueError`` unless ``out_rows`` groups of slots can be summed: 1, or with
  gates a divisor of the slots per token ``k`` (:func:`kernels.cvmm`'s ``out_rows``)."""
  if out_rows == 1:
    return
  if not gated:
    raise ValueError("out_rows sums gated slots: it needs gates")
  if out_rows < 1 or k % out_rows:
    raise ValueError(f"out_rows={out_rows} must divide the slots per token k={k}")


def make_routing(expert_index: jax.Array, n_experts: int, *,
                 tile_blocks=None) -> Routing:
  """Sorts the (token, slot) pairs of ``expert_index`` [N, K] by expert.

  tile_blocks: row-tile heights whose tile lists (:meth:`Routing.with_tiles`) are
    computed here, once for every kernel call that shares the routing. None: the GPU
    kernels' (:data:`TILE_BLOCKS`) when JAX's default backend is a GPU, none elsewhere
    (the CPU implementation computes its own).
  """
  expert_index = _check_expert_index(expert_index, n_experts)
  flat = expert_index.reshape(-1)                                   # [P]
  order, group_offsets = _group_sort(flat, n_experts)
  group_sizes = jnp.diff(group_offsets)                             # [E]
  r = Routing(expert_index, order, group_sizes, group_offsets, n_experts)
  tile_blocks = _default_tile_blocks() if tile_blocks is None else tile_blocks
  return r.with_tiles(tile_blocks) if tile_blocks else r


def _check_expert_index(expert_index: jax.Array, n_experts: int) -> jax.Array:
  """``expert_index`` as int32 [N, K]; errors for another rank, a non-integer dtype or
  no experts."""
  if expert_index.ndim != 2:
    raise ValueError(f"expert_index must be [N, K], got shape {expert_index.shape}")
  if not jnp.issubdtype(expert_index.dtype, jnp.integer):
    raise TypeError(f"expert_index must be integer, got {expert_index.dtype}")
  if n_experts < 1:
    raise ValueError(f"{n_experts=} must be at least 1")
  return expert_index.astype(jnp.int32)


def _default_tile_blocks() -> tuple:
  """The tile heights a routing precomputes lists for by default: :data:`TILE_BLOCKS`
  when JAX's default backend is a GPU, else none."""
  return TILE_BLOCKS if jax.default_backend() == "gpu" else ()


# SwitchHead routings carry unit pairs by default from this many (token, head) units.
UNIT_PAIRS_MIN_UNITS = 2 ** 18


def unit_pairs_wanted(n_units: int) -> bool:
  """Whether a SwitchHead routing of ``n_units`` (token, head) units carries unit pairs
  when its caller does not say (:attr:`kernels.CvmmConfig.unit_pairs` None): where the
  GPU kernels run (JAX's default backend is a GPU), from :data:`UNIT_PAIRS_MIN_UNITS`
  units.

  Measured at MoEUT_244M on an H200: with unit pairs O's forward takes 0.501 instead of
  0.627 ms at 65,536 tokens, and a training step of 64 x 1024 tokens (2^18 units per
  SwitchHead routing) 290-292 instead of 294 ms; at 16 x 1024 tokens the step took 90.1
  ms with them and 89.2 without (the units' sort and tile lists cost more than the
  kernel saves while the output stays in L2)."""
  return jax.default_backend() == "gpu" and n_units >= UNIT_PAIRS_MIN_UNITS


def make_head_routing(index: jax.Array, experts_per_head: int, *, tile_blocks=None,
                      unit_pairs: bool | None = None) -> Routing:
  """The routing of a SwitchHead projection: ``index`` [N, H, k] holds each head's k
  selected experts among its own ``experts_per_head``; head h's expert j is expert
  h * experts_per_head + j of H * experts_per_head, and slot h * k + s of a token is
  its head h's s-th choice.

  unit_pairs: attach :class:`UnitPairs` (k = 2: one unit per head and token), which the
    fused sums over a token's heads then use (kernels/cvmm_triton/gluon_pairs.py); the
    routing is then :func:`make_unit_routing`'s (one sort, of the units). None:
    :func:`unit_pairs_wanted` (on GPUs, from 2^18 units). tile_blocks: as for
    :func:`make_routing`."""
  if index.ndim != 3:
    raise ValueError(f"index must be [N, H, k], got shape {index.shape}")
  n, h, k = index.shape
  ea = experts_per_head
  expert = index.astype(jnp.int32) + (jnp.arange(h, dtype=jnp.int32) * ea)[:, None]
  if unit_pairs is None:
    unit_pairs = unit_pairs_wanted(n * h)
  if unit_pairs and k == 2:
    return make_unit_routing(expert.reshape(n, h * k), h * ea, ea, tile_blocks=tile_blocks)
  return make_routing(expert.reshape(n, h * k), h * ea, tile_blocks=tile_blocks)


def _group_sort(ids: jax.Array, n_groups: int) -> tuple[jax.Array, jax.Array]:
  """(order [M], offsets [G + 1]) int32 of ``ids`` [M] in [0, G): the positions sorted
  by id, stably, and where each id's positions start.

  With packed keys (:func:`_packed_sort`) each id's first position is a binary search
  in the sorted keys. Faster on GPUs than an argsort (a key-value sort) plus a
  bincount, whose scatter-add contends on few bins."""
  m = ids.shape[0]
  keys = _packed_sort(ids, n_groups)
  if keys is not None:
    bounds = jnp.arange(n_groups + 1, dtype=jnp.int32) * m                  # [G+1]
    offsets = jnp.searchsorted(keys, bounds, side="left", method="scan_unrolled")
    return keys % max(m, 1), offsets.astype(jnp.int32)
  order = jnp.argsort(ids, stable=True).astype(jnp.int32)
  sizes = jnp.bincount(ids, length=n_groups).astype(jnp.int32)
  return order, jnp.concatenate([jnp.zeros((1,), jnp.int32),
                                 jnp.cumsum(sizes, dtype=jnp.int32)])


def _stable_order(key: jax.Array, bound: int) -> jax.Array:
  """[Z] int32 positions of ``key`` [Z] (values in [0, bound)) sorted by key, stably:
  from packed keys (:func:`_packed_sort`) where they fit, else an argsort."""
  keys = _packed_sort(key, bound)
  if keys is not None:
    return keys % max(key.shape[0], 1)
  return jnp.argsort(key, stable=True).astype(jnp.int32)


def _packed_sort(key: jax.Array, bound: int) -> jax.Array | None:
  """The sorted keys key * Z + position of ``key`` [Z] (values in [0, bound)), or None
  where bound * Z does not fit an int32. Unique keys, so a plain (keys-only) sort gives
  the stable order (the position is the key modulo Z)."""
  z = key.shape[0]
  if bound * z >= _PACKED_KEY_LIMIT:
    return None
  return jnp.sort(key * z + jnp.arange(z, dtype=jnp.int32))


def _first_tokens(order: jax.Array, start: jax.Array, k: int) -> jax.Array:
  """[Z] the token of each tile's first sorted position (``order``: the pair at each
  sorted position, K slots per token; unused tiles read position 0 or the last)."""
  return order[jnp.minimum(start, order.shape[0] - 1)] // k


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
  # unrolled: no while loop (on GPUs each loop iteration is a few more launches)
  seg = jnp.searchsorted(tile_off, zi, side="right",
                         method="scan_unrolled").astype(jnp.int32)             # [Z]
  used = seg < g
  seg = jnp.minimum(seg, g - 1)
  local = zi - (tile_off[seg] - per_seg[seg])                             # [Z] tile in segment
  start = lo[seg] + local * block_m
  end = jnp.minimum(start + block_m, hi[seg])
  start = jnp.where(used, start, 0)
  end = jnp.where(used, end, 0)
  return jnp.stack([expert[seg], start, end]).astype(jnp.int32)           # [3, Z]


def synthetic_routing(n: int, k: int, e: int, seed: int = 0) -> Routing:
  """Random top-k of random logits: roughly balanced groups, like a trained router."""
  logits = jax.random.normal(jax.random.key(seed), (n, e))
  _, idx = jax.lax.top_k(logits, min(k, e))
  if k > e:
    idx = jnp.tile(idx, (1, -(-k // e)))[:, :k]
  return make_routing(idx, e)
