"""The gathered row kernel: tiles of sorted pairs times their expert's matrix, with the
rows gathered and written (or added) by index. Legend in :mod:`kernels.routing`.

      out[orow(p)] (+)= scale[p] * (a[arow(p)] @ W_e)            for the pairs p of a tile

One kernel serves every CVMM product, as the Triton row kernel does
(:mod:`kernels.cvmm_triton.rows`): the forward (out = y [P, O], stored), the gated
forward (out [N, O]: the gated sum over the K slots, added), dx (W^T; added where
several slots read one x row) and the gated dx with dgates[p] = <dout[n] @ W_e^T,
x[arow(p)]> taken from the same product. Nothing of size [P, O] is written where rows
are added: each tile adds its rows into the output (below).

Structure (one CUDA block per multiprocessor, persistent): work items are (tile, column
block) pairs of the used tiles, walked by every block in steps of the grid. Warpgroups:
  producers (the last ``cfg.producers``, one or two, few registers): per item, the tile's
  row indices come into shared memory (each producer its own copy, prefetched one item
  ahead); per contraction step of 64 columns each waits for a free stage, then the
  first issues one TMA copy for the matrix block, and each gathers its share of the
  tile's rows (a contiguous block) with cp.async, every thread 16-byte pieces
  (kernels/cvmm_mosaic/common.py: gathered rows). A producer tells the consumers that a
  stage is full ``num_stages - 2`` steps later, once its copies of that step have
  landed, so that many steps of row copies are in flight;
  consumers (``block_m / 64`` of them, 64 rows each): per step they wait for the stage,
  issue the wgmma, and release the previous stage once its wgmma retired (one wgmma in
  flight); the epilogue scales the rows by their gates and writes them to shared
  memory; stored rows: every thread of the warpgroup stores 16-byte pieces of them into
  their output rows (``st.global.v4``); added rows: float32 sums one TMA reduction per
  row, read from shared memory while the next item's main loop runs, 16-bit sums every
  thread's 16-byte vector atomics (kernels/cvmm_mosaic/common.py: stored and added
  rows). Padding slots' rows and columns past the output
  are skipped.
``num_stages`` stages of (rows, matrix block) are in flight.
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
                                        load, mma_steps, pl, plgpu, producer_done,
                                        step_gathered, store_rows, tiled, zeros_after)
from kernels.routing import Routing

# The epilogue stores output rows in 16-byte pieces and adds them by TMA, whose rows must
# be 16 bytes apart: output widths are padded to multiples of 8 (16 bytes of 16-bit
# values); the gathered inputs and the matrices are padded to 64 columns (whole chunks;
# only odd shapes copy anything: the model's widths are multiples of 64).
_ALIGN = 8


def rows_matmul(a: jax.Array, w: jax.Array, routing: Routing, *, a_rows: int,
                out_rows: int, transpose_w: bool = False, scale: jax.Array | None = None,
                dgate_rows: jax.Array | None = None, c_rows: int = 1,
                sum_dtype=jnp.float32, cfg: TileConfig | None = None):
  """out[orow(p)] (+)= scale[p] * a[arow(p)] @ W_e, see the module docstring.

  a: [N * a_rows, I]; w: [E, I, O] (or, ``transpose_w``, [E, O, I] used transposed:
  the product is a @ w[e]^T); scale: [P] (by pair) or None; dgate_rows: [N * c_rows, O]
  rows dotted with the unscaled product for dgates, or None.
  Returns (out [N * out_rows, O], dgates [P] float32 or None). Where several pairs meet
  in one output row (out_rows < K) they are added in ``sum_dtype`` (float32, bfloat16
  or float16: :func:`kernels.cvmm_mosaic.ops.summed_rows` scales float16 rows) and out
  has that dtype; else out has a's dtype.
  """
  n, k = routing.n_tokens, routing.k
  e = w.shape[0]
  kc, no = (w.shape[2], w.shape[1]) if transpose_w else (w.shape[1], w.shape[2])
  assert a.shape == (n * a_rows, kc), (a.shape, n, a_rows, kc)
  reduce = out_rows < k
  dgate = dgate_rows is not None
  if cfg is None:
    cfg = choose_rows_config(n, k, e, kc, no, a.dtype, a_rows, out_rows, scale is not None,
                             dgate, transpose_w, jnp.dtype(sum_dtype).name)
  check_rows_config(cfg, no, dgate)
  bm = cfg.block_m
  tiles = routing.ordered_tiles(bm, "token" if reduce else "expert")            # [3, Z]
  pairs = slots.slot_pairs(routing, tiles, bm)                                   # [Z*T]
  a_idx = slots.slot_rows(pairs, routing, a_rows)
  o_idx = slots.slot_rows(pairs, routing, out_rows)
  sc = None if scale is None else slots.slot_values(pairs, scale)
  c_idx = slots.slot_rows(pairs, routing, c_rows) if dgate else None
  # gathered in whole 64-column chunks; the matrices' tiled copies need whole (8, 64) tiles
  a_p = pad_to(a, 1, CHUNK)
  w_p = pad_to(pad_to(w, 1, CHUNK), 2, CHUNK)
  kc_p, no_p = -(-kc // _ALIGN) * _ALIGN, -(-no // _ALIGN) * _ALIGN
  c_p = pad_to(dgate_rows, 1, CHUNK) if dgate else None
  out_dtype = jnp.dtype(sum_dtype) if reduce else a.dtype
  out, dg = _launch(a_p, w_p, tiles[0], slots.used_tiles(tiles), a_idx, o_idx, sc, c_idx,
                    c_p, n * out_rows, kc_p, no_p, out_dtype, transpose_w, reduce, cfg)
  out = out[:, :no] if out.shape[1] != no else out
  if dgate:
    z = tiles.shape[1]
    valid = pairs >= 0
    slot_of_pair = jnp.zeros((routing.n_pairs,), jnp.int32).at[
        jnp.where(valid, pairs, routing.n_pairs)].set(
            jnp.arange(z * bm, dtype=jnp.int32), mode="drop")             # [P]
    dg = dg.sum(axis=0)[slot_of_pair]                                    # [P]
  return out, dg


def check_rows_config(cfg: TileConfig, no: int, dgate: bool):
  check_tiles(cfg)
  if dgate and cfg.block_n != CHUNK:
    raise ValueError(f"block_n={cfg.block_n}: dgates take column blocks of {CHUNK}")


def _launch(a, w, tile_e, n_used, a_idx, o_idx, sc, c_idx, c, n_out, kc, no, out_dtype,
            transpose_w, reduce, cfg):
  dtype = a.dtype
  bm, bn, stages = cfg.block_m, cfg.block_n, cfg.num_stages
  n_cons, n_prod = bm // ROWS_PER_WG, cfg.producers
  grid_k = -(-kc // CHUNK)
  n_nb = -(-no // bn)
  n_items = (n_used * n_nb).astype(jnp.int32)                         # [1]
  nsm = autotune.multiprocessor_count()
  has_scale, dgate = sc is not None, c is not None
  z_slots = a_idx.shape[0]
  cons_regs = consumer_registers(n_cons, n_prod)
  share = bm // n_prod          # rows each producer gathers

  def body(*refs):
    it = iter(refs)
    n_items_g, tile_e_g, a_idx_g, o_idx_g = (next(it) for _ in range(4))
    sc_g = next(it) if has_scale else None
    c_idx_g = next(it) if dgate else None
    a_g, w_g = next(it), next(it)
    c_g = next(it) if dgate else None
    out_g = next(it)
    dg_g = next(it) if dgate else None
    (a_buf, w_buf, full, empty, aidx, aidx_bar, oidx, osc, epi_bar, o_smem,
     c_buf, c_bar, dg_smem, gather_bar) = (next(it) for _ in range(14))
    a_mma, a_rows = gather_views(a_buf)
    wg = lax.axis_index("wg")
    sm = lax.axis_index("sm")
    items = n_items_g[0]

    def producer(p: int):
      plgpu.set_max_registers(PRODUCER_REGISTERS, action="decrease")

      def fetch_idx(lin, b):   # into this producer's own double buffer: rows 2p, 2p + 1
        z = lin // n_nb
        plgpu.copy_gmem_to_smem(a_idx_g.at[pl.ds(z * bm, bm)], aidx.at[2 * p + b],
                                aidx_bar.at[2 * p + b])

      @pl.when(sm < items)
      def _():
        fetch_idx(sm, 0)

      @plgpu.nd_loop((items,), collective_axes="sm")
      def _item(info):
        (lin,) = info.index
        j = info.local_index
        b = j % 2
        z, nb = lin // n_nb, lin % n_nb
        ex = tile_e_g[z]
        plgpu.barrier_wait(aidx_bar.at[2 * p + b])
        # every thread of this producer has issued the last item's gathers, whose row
        # indices (buffer 1 - b) the prefetch overwrites: the warps run apart by up to
        # pipeline_lag steps, and items of few steps (a contraction of one or two chunks)
        # gathered rows of the next item's tile on an H100 without this barrier
        plgpu.commit_smem()

        @pl.when(lin + nsm < items)
        def _():
          fetch_idx(lin + nsm, 1 - b)

        def kstep(kk, carry):
          t = j * grid_k + kk
          s = claim_stage(t, stages, empty)
          if p == 0:
            if transpose_w:
              src = w_g.at[ex, pl.ds(nb * bn, bn), pl.ds(kk * CHUNK, CHUNK)]
            else:
              src = w_g.at[ex, pl.ds(kk * CHUNK, CHUNK), pl.ds(nb * bn, bn)]
            plgpu.copy_gmem_to_smem(src, w_buf.at[s], full.at[s])
          mine = pl.ds(p * share, share)
          gather_rows(a_g.at[:, pl.ds(kk * CHUNK, CHUNK)], aidx.at[2 * p + b, mine],
                      a_rows.at[s, mine], gather_bar.at[p])
          gather_commit()
          step_gathered(t, stages, full)
          return carry

        lax.fori_loop(0, grid_k, kstep, 0)

      local_items = jnp.where(sm < items, (items - sm + nsm - 1) // nsm, 0)
      producer_done(local_items * grid_k, stages, full, empty)

    def consumer(c_i: int):
      plgpu.set_max_registers(cons_regs, action="increase")

      @plgpu.nd_loop((items,), collective_axes="sm")
      def _item(info):
        (lin,) = info.index
        j = info.local_index
        z, nb = lin // n_nb, lin % n_nb
        slot0 = z * bm + c_i * ROWS_PER_WG
        # the epilogue's row maps (and the dgates' rows) come in during the main loop
        plgpu.copy_gmem_to_smem(o_idx_g.at[pl.ds(slot0, ROWS_PER_WG)], oidx.at[c_i],
                                epi_bar.at[c_i])
        if has_scale:
          plgpu.copy_gmem_to_smem(sc_g.at[pl.ds(slot0, ROWS_PER_WG)], osc.at[c_i],
                                  epi_bar.at[c_i])
        if dgate:
          plgpu.copy_gmem_to_smem(c_idx_g.at[pl.ds(slot0, ROWS_PER_WG)],
                                  aidx.at[2 * n_prod + c_i, pl.ds(0, ROWS_PER_WG)],
                                  epi_bar.at[c_i])

        def mma(acc_ref, s):
          rhs = w_buf.at[s].transpose((1, 0)) if transpose_w else w_buf.at[s]
          plgpu.wgmma(acc_ref, a_mma.at[s, pl.ds(c_i * ROWS_PER_WG, ROWS_PER_WG)], rhs)

        acc = pl.run_scoped(lambda acc_ref: mma_steps(acc_ref, j * grid_k, grid_k, stages,
                                                      full, empty, mma),
                            plgpu.ACC((ROWS_PER_WG, bn)))                # [64, BN] f32
        plgpu.barrier_wait(epi_bar.at[c_i])
        if dgate or reduce:   # the last item's dgates and added rows have been read
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        if dgate:
          _dgates(acc, c_i, nb, slot0)
        if has_scale:
          g = load(osc.at[c_i], plgpu.Layout.WGMMA.reduce(1))
          acc = acc * lax.broadcast_in_dim(g, acc.shape, [0])
        o_smem.at[c_i][...] = acc.astype(out_dtype)
        # padding slots' rows (row N * out_rows) and columns past the output's are skipped
        if reduce:   # float32: TMA reductions, read while the next item's loop runs
          add_rows(o_smem.at[c_i], oidx.at[c_i], out_g, nb * bn)
        else:        # every thread stores 16-byte pieces of the rows
          store_rows(o_smem.at[c_i], oidx.at[c_i], out_g, nb * bn)

      plgpu.wait_smem_to_gmem(0)   # the last dgates and added rows

    def _dgates(acc, c_i, nb, slot0):
      """dgates partials of this column block: <acc row, c row>, c gathered here."""
      c_mma, c_rows_v = gather_views(c_buf)
      gather_rows(c_g.at[:, pl.ds(nb * bn, bn)], aidx.at[2 * n_prod + c_i, pl.ds(0, ROWS_PER_WG)],
                  c_rows_v.at[c_i], c_bar.at[c_i])
      gather_commit()
      gathers_done(0)
      plgpu.commit_smem()   # every thread's rows are in
      cv = load(c_mma.at[c_i], plgpu.Layout.WGMMA).astype(jnp.float32)
      dg_smem.at[c_i][...] = jnp.sum(acc * cv, axis=1)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(dg_smem.at[c_i], dg_g.at[nb, pl.ds(slot0, ROWS_PER_WG)])

    for c_i in range(n_cons):
      pl.when(wg == c_i)(functools.partial(consumer, c_i))
    for p in range(n_prod):
      pl.when(wg == n_cons + p)(functools.partial(producer, p))

  w_block = (bn, CHUNK) if transpose_w else (CHUNK, bn)
  scratch = [
      gather_buffer((stages, bm, CHUNK), dtype),                                # a_buf
      plgpu.SMEM((stages, *w_block), dtype, transforms=tiled(dtype)),           # w_buf
      plgpu.Barrier(num_arrivals=n_prod + 1, num_barriers=stages),              # full
      plgpu.Barrier(num_arrivals=n_cons, num_barriers=stages),                  # empty
      plgpu.SMEM((2 * n_prod + 2, bm), jnp.int32),   # aidx: 2 per producer, dgates' rows
      plgpu.Barrier(num_arrivals=1, num_barriers=2 * n_prod),                   # aidx_bar
      plgpu.SMEM((n_cons, ROWS_PER_WG), jnp.int32),                             # oidx
      plgpu.SMEM((n_cons, ROWS_PER_WG), jnp.float32),                           # osc
      plgpu.Barrier(num_arrivals=1 + has_scale + dgate, num_barriers=n_cons),   # epi_bar
      plgpu.SMEM((n_cons, ROWS_PER_WG, bn), out_dtype),                         # o_smem
      gather_buffer((n_cons, ROWS_PER_WG, CHUNK), dtype),                       # c_buf
      plgpu.Barrier(num_arrivals=ROWS_PER_WG, num_barriers=n_cons),             # c_bar
      plgpu.SMEM((n_cons, ROWS_PER_WG), jnp.float32),                           # dg_smem
      plgpu.Barrier(num_arrivals=bm // n_prod, num_barriers=n_prod),           # gather_bar
  ]
  inputs = [n_items, tile_e, a_idx, o_idx] + ([sc] if has_scale else []) + (
      [c_idx] if dgate else []) + [a, w] + ([c] if dgate else [])
  out_types = []
  if reduce:   # added into zeros: the output goes in as a mutable array
    out_ref = jax.new_ref(zeros_after((n_out, no), out_dtype, inputs))
    inputs.append(out_ref)
  else:
    out_types.append(jax.ShapeDtypeStruct((n_out, no), out_dtype))
  if dgate:
    out_types.append(jax.ShapeDtypeStruct((n_nb, z_slots), jnp.float32))
  outs = list(launch(body, inputs, out_types, scratch, nsm, n_cons + n_prod))
  out = out_ref[...] if reduce else outs.pop(0)
  dg = outs.pop(0) if dgate else None
  return out, dg


def smem_bytes(cfg: TileConfig, out_itemsize: int, dtype_itemsize: int = 2) -> int:
  n_cons = cfg.block_m // ROWS_PER_WG
  stage = (cfg.block_m + cfg.block_n) * CHUNK * dtype_itemsize
  return cfg.num_stages * stage + n_cons * ROWS_PER_WG * (cfg.block_n * out_itemsize
                                                          + CHUNK * dtype_itemsize)


def rows_candidates(no: int, out_itemsize: int, dgate: bool) -> list[TileConfig]:
  """Tiles of the row kernel in heuristic order (first: the choice without autotuning):
  two consumer warpgroups of 64 rows, the widest column block the output takes, two
  producer warpgroups; then tiles with one producer. The order was measured when rows
  came by one TMA copy each (two producers took 28-39% less time on an H200 at
  MoEUT_244M's shapes); with cp.async gathers and thread stores it has not been timed
  again."""
  bn_max = 64 if dgate else min(256, max(CHUNK, autotune.next_pow2(no)))
  raw = [(128, 128, 4), (128, 256, 2), (128, 64, 6), (64, 128, 6), (128, 128, 3),
         (64, 256, 4), (64, 64, 8)]
  raw = [(*t, 2) for t in raw[:4]] + [(*t, 1) for t in raw]
  return fitting_tiles(raw, bn_max, lambda cfg: smem_bytes(cfg, out_itemsize))


def choose_rows_config(n, k, e, kc, no, dtype, a_rows, out_rows, has_scale, dgate,
                       transpose_w, sum_dtype) -> TileConfig:
  """The autotuner's tile for this call's shape (timed on a random routing)."""
  reduce = out_rows < k
  out_itemsize = jnp.dtype(sum_dtype).itemsize if reduce else jnp.dtype(dtype).itemsize
  shape = (n, k, e, kc, no, a_rows, out_rows, int(has_scale), int(dgate), int(transpose_w))

  def bench(cfg):
    from kernels.routing import synthetic_routing  # noqa: PLC0415
    with jax.ensure_compile_time_eval():
      r = synthetic_routing(n, k, e)
      a = jax.random.normal(jax.random.key(1), (n * a_rows, kc), dtype)
      ws = (e, no, kc) if transpose_w else (e, kc, no)
      w = jax.random.normal(jax.random.key(2), ws, dtype)
      sc = jax.random.uniform(jax.random.key(3), (n * k,), jnp.float32) if has_scale else None
      cr = jax.random.normal(jax.random.key(4), (n, no), dtype) if dgate else None
    f = autotune.compile_now(
        lambda a, w, r, sc, cr: rows_matmul(a, w, r, a_rows=a_rows, out_rows=out_rows,
                                            transpose_w=transpose_w, scale=sc,
                                            dgate_rows=cr, c_rows=1, sum_dtype=sum_dtype,
                                            cfg=cfg), a, w, r, sc, cr)
    return autotune.time_call(lambda: f(a, w, r, sc, cr))

  from kernels.cvmm_mosaic.common import is_available  # noqa: PLC0415
  return autotune.tuner().choose(f"mosaic_rows_{sum_dtype}", shape, dtype,
                                 rows_candidates(no, out_itemsize, dgate),
                                 bench if is_available() else None)
