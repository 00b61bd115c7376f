"""The σ-MoE pair's forward in one kernel: up, ReLU and the gated down projection of a
tile of sorted pairs, the middle kept on chip. Legend in :mod:`kernels.routing`.

      h[p] = relu(x[n] @ W1[e])                      stored [P, H] for the backward pass
      out[n] (+)= scale[p] * h[p] @ W2[e]            added into [N, O]

for the pairs p = (n, s) of a tile (one expert e). As the row kernel
(:mod:`kernels.cvmm_mosaic.rows`): one CUDA block per multiprocessor walks the used
tiles; producer warpgroups gather the tile's rows of x with cp.async and the first
copies W1's blocks by TMA, ``num_stages`` stages of (rows, W1 block) in flight; each
consumer warpgroup (64 rows) accumulates its [64, H] middle with wgmma. Then, per tile:
  1. the consumers take the ReLU, store h's rows (every thread 16-byte pieces) and keep
     h in shared memory as the next wgmma's operand;
  2. the first producer copies W2's column blocks [H, block_n] by TMA into a ring of
     two buffers; per block the consumers multiply h by it, scale the rows and add
     them into their tokens' output rows (kernels/cvmm_mosaic/common.py: added rows).
A producer tells the consumers that a stage of step t is full once its copies of step
``t`` landed, ``num_stages - 2`` steps later within the tile, and all of the tile's at
its end, before the W2 copies (the consumers' second phase needs every stage of the
first, and the first producer waits for the second phase's buffers).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from kernels import autotune
from kernels.arrays import pad_to
from kernels.autotune import TileConfig
from kernels.cvmm_mosaic import slots
from kernels.cvmm_mosaic.common import (CHUNK, PRODUCER_REGISTERS, ROWS_PER_WG, add_rows,
                                        check_tiles, claim_stage, consumer_registers,
                                        fitting_tiles, gather_buffer, gather_commit,
                                        gather_rows, gather_views, gathers_done, launch,
                                        load, mma_steps, pipeline_lag, pl, plgpu,
                                        store_rows, tiled, zeros_after)
from kernels.routing import Routing

_ALIGN = 8           # output widths padded to 16 bytes of 16-bit values (as rows.py)
MAX_HIDDEN = 256     # the middle's width: one wgmma accumulator of [64, H]
W2_STAGES = 2        # buffers of W2's column blocks


def hidden_fits(h: int) -> bool:
  """Whether a middle of width ``h`` (padded to 64 columns) fits one accumulator."""
  return -(-h // CHUNK) * CHUNK <= MAX_HIDDEN


def pair_forward(x: jax.Array, w1: jax.Array, w2: jax.Array, routing: Routing,
                 scale: jax.Array, *, sum_dtype, cfg: TileConfig | None = None):
  """(out [N, O] in ``sum_dtype``, h [P, H] in x's dtype), see the module docstring.

  x [N, D] 16-bit; w1 [E, D, H], w2 [E, H, O] in x's dtype; scale [P] float32 (the
  gates, times the float16 sums' row scales); ``sum_dtype`` float32, bfloat16 or
  float16 (the rows are added in it)."""
  n, k = routing.n_tokens, routing.k
  e, d, h = w1.shape
  o = w2.shape[2]
  if not hidden_fits(h):
    raise ValueError(f"pair_forward keeps a middle of at most {MAX_HIDDEN} columns, got {h}")
  hp = -(-h // CHUNK) * CHUNK
  sums = jnp.dtype(sum_dtype)
  if cfg is None:
    cfg = choose_pair_config(n, k, e, d, hp, o, x.dtype, sums.name)
  check_pair_config(cfg, hp, sums.itemsize)
  tiles, pairs, x_idx, h_idx, w1_p, w2_p = pair_operands(routing, cfg.block_m, w1, w2)
  sc = slots.slot_values(pairs, scale)
  x_p = pad_to(x, 1, CHUNK)
  op = -(-o // _ALIGN) * _ALIGN
  out, hm = _launch(x_p, w1_p, w2_p, tiles[0], slots.used_tiles(tiles), x_idx, h_idx, sc,
                    n, n * k, x_p.shape[1], hp, op, sums, cfg)
  out = out[:, :o] if op != o else out
  return out, (hm[:, :h] if hp != h else hm)


def pair_operands(routing: Routing, bm: int, w1, w2):
  """What both pair kernels take (tiles of ``bm`` pairs): (tiles [3, Z], the slots'
  pairs [Z*T], their token rows (the first phase's gathered rows and the second's
  added rows), their own rows (the middle's), w1 and w2 padded to whole 64-column
  chunks: the middle's zero columns through W1's padding meet W2's zero rows)."""
  tiles = routing.ordered_tiles(bm, "token")                                   # [3, Z]
  pairs = slots.slot_pairs(routing, tiles, bm)                                 # [Z*T]
  x_idx = slots.slot_rows(pairs, routing, 1)
  h_idx = slots.slot_rows(pairs, routing, routing.k)
  w1_p = pad_to(pad_to(w1, 1, CHUNK), 2, CHUNK)
  w2_p = pad_to(pad_to(w2, 1, CHUNK), 2, CHUNK)
  return tiles, pairs, x_idx, h_idx, w1_p, w2_p


def smem_bytes(cfg: TileConfig, hp: int, out_itemsize: int, itemsize: int = 2) -> int:
  n_cons = cfg.block_m // ROWS_PER_WG
  stage = (cfg.block_m + hp) * CHUNK * itemsize                 # x rows, W1 block
  w2 = W2_STAGES * hp * cfg.block_n * itemsize
  mid = n_cons * ROWS_PER_WG * hp * itemsize                    # h, the wgmma operand
  epi = n_cons * ROWS_PER_WG * max(hp * itemsize, cfg.block_n * out_itemsize)
  return cfg.num_stages * stage + w2 + mid + epi


def check_pair_config(cfg: TileConfig, hp: int, out_itemsize: int):
  check_tiles(cfg, smem_bytes(cfg, hp, out_itemsize))


def pair_candidates(hp: int, o: int, out_itemsize: int) -> list[TileConfig]:
  """Tiles in heuristic order (the first: the choice without autotuning), those that fit
  shared memory: two consumer warpgroups and two producers first, as the row kernel."""
  bn_max = min(256, max(CHUNK, autotune.next_pow2(o)))
  raw = [(128, 128, 3, 2), (128, 64, 4, 2), (128, 64, 3, 2), (128, 128, 2, 2),
         (128, 128, 3, 1), (128, 64, 4, 1), (64, 128, 4, 1), (64, 64, 6, 1), (128, 64, 2, 2),
         (64, 64, 3, 1), (64, 64, 2, 1)]
  return fitting_tiles(raw, bn_max, lambda cfg: smem_bytes(cfg, hp, out_itemsize))


def choose_pair_config(n, k, e, d, hp, o, dtype, sum_dtype: str) -> TileConfig:
  """The autotuner's tile for this shape (timed on a random routing)."""
  shape = (n, k, e, d, hp, o)
  itemsize = jnp.dtype(sum_dtype).itemsize

  def bench(cfg):
    from kernels.routing import synthetic_routing  # noqa: PLC0415
    with jax.ensure_compile_time_eval():
      r = synthetic_routing(n, k, e)
      ks = jax.random.split(jax.random.key(1), 4)
      x = jax.random.normal(ks[0], (n, d), dtype)
      w1 = (jax.random.normal(ks[1], (e, d, hp)) * d ** -0.5).astype(dtype)
      w2 = (jax.random.normal(ks[2], (e, hp, o)) * hp ** -0.5).astype(dtype)
      sc = jax.random.uniform(ks[3], (n * k,), jnp.float32)
    f = autotune.compile_now(
        lambda x, w1, w2, r, sc: pair_forward(x, w1, w2, r, sc, sum_dtype=sum_dtype,
                                              cfg=cfg), x, w1, w2, r, sc)
    return autotune.time_call(lambda: f(x, w1, w2, r, sc))

  from kernels.cvmm_mosaic.common import is_available  # noqa: PLC0415
  return autotune.tuner().choose(f"mosaic_pair_{sum_dtype}", shape, dtype,
                                 pair_candidates(hp, o, itemsize),
                                 bench if is_available() else None)


def tile_producer(p: int, n_items, tile_e_g, idx_g, rows_g, aidx, aidx_bar, a_rows,
                  gather_bar, full, empty, empty2, copy_step, copy_block, *, bm: int,
                  n_prod: int, grid_k: int, n_nb: int, stages: int, nsm: int):
  """Producer warpgroup ``p`` of the fused pair kernels (here and
  :mod:`kernels.cvmm_mosaic.pair_bwd`). Per tile: for each of the first phase's
  ``grid_k`` steps, its share of the tile's rows of ``rows_g`` (row indices from
  ``idx_g``, prefetched a tile ahead into its own double buffer in ``aidx``) gathered
  into stage s, and, from the first producer, ``copy_step(expert, step, s)``'s TMA
  copies of the step's matrix block; the stages are told full ``num_stages - 2`` steps
  later and all at the tile's end. Then the first producer issues the second phase's
  ``n_nb`` blocks, ``copy_block(expert, block, s2)`` into a ring of W2_STAGES whose
  buffers the consumers release (``empty2``)."""
  plgpu.set_max_registers(PRODUCER_REGISTERS, action="decrease")
  share = bm // n_prod
  lag = pipeline_lag(stages)
  sm = lax.axis_index("sm")

  def fetch_idx(z, b):   # into this producer's own double buffer: rows 2p, 2p + 1
    plgpu.copy_gmem_to_smem(idx_g.at[pl.ds(z * bm, bm)], aidx.at[2 * p + b],
                            aidx_bar.at[2 * p + b])

  @pl.when(sm < n_items)
  def _():
    fetch_idx(sm, 0)

  @plgpu.nd_loop((n_items,), collective_axes="sm")
  def _item(info):
    (z,) = info.index
    j = info.local_index
    b = j % 2
    ex = tile_e_g[z]
    plgpu.barrier_wait(aidx_bar.at[2 * p + b])
    plgpu.commit_smem()   # as in rows.py: the last tile's gathers are all issued

    @pl.when(z + nsm < n_items)
    def _():
      fetch_idx(z + nsm, 1 - b)

    def kstep(kk, carry):
      t = j * grid_k + kk
      s = claim_stage(t, stages, empty)
      if p == 0:
        copy_step(ex, kk, s)
      mine = pl.ds(p * share, share)
      gather_rows(rows_g.at[:, pl.ds(kk * CHUNK, CHUNK)], aidx.at[2 * p + b, mine],
                  a_rows.at[s, mine], gather_bar.at[p])
      gather_commit()

      @pl.when(kk >= lag)
      def _():
        gathers_done(lag)
        plgpu.barrier_arrive(full.at[(t - lag) % stages])
      return carry

    lax.fori_loop(0, grid_k, kstep, 0)
    gathers_done(0)          # the tile's last steps: every stage of it is full
    for back in range(lag, 0, -1):
      @pl.when(grid_k >= back)
      def _():
        plgpu.barrier_arrive(full.at[(j * grid_k + grid_k - back) % stages])

    if p == 0:               # the second phase's blocks
      def nstep(nb, carry):
        copy_block(ex, nb, claim_stage(j * n_nb + nb, W2_STAGES, empty2))
        return carry

      lax.fori_loop(0, n_nb, nstep, 0)

  local = jnp.where(sm < n_items, (n_items - sm + nsm - 1) // nsm, 0)
  for s in range(stages):    # no copy or barrier outlives the kernel
    @pl.when(s < local * grid_k)
    def _():
      plgpu.barrier_wait(empty.at[s])
  if p == 0:
    for s2 in range(W2_STAGES):
      @pl.when(s2 < local * n_nb)
      def _():
        plgpu.barrier_wait(empty2.at[s2])


def add_blocks(mma, row_scale, o_smem, oidx, out_g, full2, empty2, *, t0, n_nb: int,
               bn: int):
  """A consumer's second phase in the fused pair kernels: per output column block nb
  (step t0 + nb of the W2_STAGES ring), ``mma(acc, stage)``'s [64, bn] product, its
  rows times ``row_scale`` [64], added into rows ``oidx`` of ``out_g`` (columns nb * bn
  on) through ``o_smem`` [64, bn] in the output's dtype."""
  def nstep(nb, carry):
    acc = pl.run_scoped(lambda acc_ref: mma_steps(acc_ref, t0 + nb, 1, W2_STAGES, full2,
                                                  empty2, mma),
                        plgpu.ACC((ROWS_PER_WG, bn)))
    acc = acc * lax.broadcast_in_dim(row_scale, acc.shape, [0])
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)   # the last block's reads
    o_smem[...] = acc.astype(o_smem.dtype)
    add_rows(o_smem, oidx, out_g, nb * bn)
    return carry

  lax.fori_loop(0, n_nb, nstep, 0)


def _launch(x, w1, w2, tile_e, n_used, x_idx, h_idx, sc, n_out, n_mid, d, hp, o, sums, cfg):
  dtype = x.dtype
  bm, bn, stages = cfg.block_m, cfg.block_n, cfg.num_stages
  n_cons, n_prod = bm // ROWS_PER_WG, cfg.producers
  grid_k = -(-d // CHUNK)
  n_nb = -(-o // bn)
  items = n_used.astype(jnp.int32)                                    # [1]
  nsm = autotune.multiprocessor_count()
  cons_regs = consumer_registers(n_cons, n_prod)

  def body(n_items_g, tile_e_g, x_idx_g, h_idx_g, sc_g, x_g, w1_g, w2_g, out_g, h_g,
           a_buf, w1_buf, full, empty, w2_buf, full2, empty2, aidx, aidx_bar, oidx, hidx,
           osc, epi_bar, h_mma, stage_buf, gather_bar):
    a_mma, a_rows = gather_views(a_buf)
    h_rows_v, o_smem = stage_buf          # one buffer: h's rows, then each block's output
    wg = lax.axis_index("wg")
    n_items = n_items_g[0]

    def producer(p: int):
      def copy_step(ex, kk, s):
        plgpu.copy_gmem_to_smem(w1_g.at[ex, pl.ds(kk * CHUNK, CHUNK), pl.ds(0, hp)],
                                w1_buf.at[s], full.at[s])

      def copy_block(ex, nb, s2):
        plgpu.copy_gmem_to_smem(w2_g.at[ex, pl.ds(0, hp), pl.ds(nb * bn, bn)],
                                w2_buf.at[s2], full2.at[s2])

      tile_producer(p, n_items, tile_e_g, x_idx_g, x_g, aidx, aidx_bar, a_rows, gather_bar,
                    full, empty, empty2, copy_step, copy_block, bm=bm, n_prod=n_prod,
                    grid_k=grid_k, n_nb=n_nb, stages=stages, nsm=nsm)

    def consumer(c_i: int):
      plgpu.set_max_registers(cons_regs, action="increase")

      @plgpu.nd_loop((n_items,), collective_axes="sm")
      def _item(info):
        (z,) = info.index
        j = info.local_index
        slot0 = z * bm + c_i * ROWS_PER_WG
        for src, dst in ((x_idx_g, oidx), (h_idx_g, hidx), (sc_g, osc)):
          plgpu.copy_gmem_to_smem(src.at[pl.ds(slot0, ROWS_PER_WG)], dst.at[c_i],
                                  epi_bar.at[c_i])

        def up(acc_ref, s):
          plgpu.wgmma(acc_ref, a_mma.at[s, pl.ds(c_i * ROWS_PER_WG, ROWS_PER_WG)],
                      w1_buf.at[s])

        acc = pl.run_scoped(lambda acc_ref: mma_steps(acc_ref, j * grid_k, grid_k, stages,
                                                      full, empty, up),
                            plgpu.ACC((ROWS_PER_WG, hp)))
        mid = jnp.maximum(acc, 0.0)
        mid = mid.astype(dtype)                                     # [64, Hp]
        plgpu.barrier_wait(epi_bar.at[c_i])
        # the last tile's added rows have been read out of the staging buffer
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        h_mma.at[c_i][...] = mid
        h_rows_v.at[c_i][...] = mid
        store_rows(h_rows_v.at[c_i], hidx.at[c_i], h_g, 0)          # h for the backward
        plgpu.commit_smem()                                          # h before the wgmma
        g = load(osc.at[c_i], plgpu.Layout.WGMMA.reduce(1))

        def down(acc_ref, s2):
          plgpu.wgmma(acc_ref, h_mma.at[c_i], w2_buf.at[s2])

        add_blocks(down, g, o_smem.at[c_i], oidx.at[c_i], out_g, full2, empty2,
                   t0=j * n_nb, n_nb=n_nb, bn=bn)

      plgpu.wait_smem_to_gmem(0)   # the last added rows

    for c_i in range(n_cons):
      pl.when(wg == c_i)(functools.partial(consumer, c_i))
    for p in range(n_prod):
      pl.when(wg == n_cons + p)(functools.partial(producer, p))

  scratch = [
      gather_buffer((stages, bm, CHUNK), dtype),                                # a_buf
      plgpu.SMEM((stages, CHUNK, hp), dtype, transforms=tiled(dtype)),          # w1_buf
      plgpu.Barrier(num_arrivals=n_prod + 1, num_barriers=stages),              # full
      plgpu.Barrier(num_arrivals=n_cons, num_barriers=stages),                  # empty
      plgpu.SMEM((W2_STAGES, hp, bn), dtype, transforms=tiled(dtype)),          # w2_buf
      plgpu.Barrier(num_arrivals=1, num_barriers=W2_STAGES),                    # full2
      plgpu.Barrier(num_arrivals=n_cons, num_barriers=W2_STAGES),               # empty2
      plgpu.SMEM((2 * n_prod, bm), jnp.int32),                                  # aidx
      plgpu.Barrier(num_arrivals=1, num_barriers=2 * n_prod),                   # aidx_bar
      plgpu.SMEM((n_cons, ROWS_PER_WG), jnp.int32),                             # oidx
      plgpu.SMEM((n_cons, ROWS_PER_WG), jnp.int32),                             # hidx
      plgpu.SMEM((n_cons, ROWS_PER_WG), jnp.float32),                           # osc
      plgpu.Barrier(num_arrivals=3, num_barriers=n_cons),                       # epi_bar
      plgpu.SMEM((n_cons, ROWS_PER_WG, hp), dtype, transforms=tiled(dtype)),    # h_mma
      plgpu.RefUnion(plgpu.SMEM((n_cons, ROWS_PER_WG, hp), dtype),              # h rows,
                     plgpu.SMEM((n_cons, ROWS_PER_WG, bn), sums)),              # output
      plgpu.Barrier(num_arrivals=bm // n_prod, num_barriers=n_prod),           # gather_bar
  ]
  inputs = [items, tile_e, x_idx, h_idx, sc, x, w1, w2]
  out_ref = jax.new_ref(zeros_after((n_out, o), sums, inputs))   # added into zeros
  (hm,) = launch(body, inputs + [out_ref], [jax.ShapeDtypeStruct((n_mid, hp), dtype)],
                 scratch, nsm, n_cons + n_prod)
  return out_ref[...], hm
