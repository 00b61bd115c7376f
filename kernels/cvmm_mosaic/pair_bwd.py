"""The σ-MoE pair's backward pass for its inputs in one kernel: the gradient through the
gated down projection, the ReLU and the up projection of a tile of sorted pairs, the
middle's gradient kept on chip. Legend in :mod:`kernels.routing`.

      t[p] = dout[n] @ W2[e]^T                        [H]
      dgates[p] = <t[p], h[p]>                        (h: the forward's middle)
      du[p] = gates[p] * t[p] * (h[p] > 0)            stored [P, H] for dW1
      dx[n] (+)= rscale[p] * du[p] @ W1[e]^T          added into [N, D]

for the pairs p = (n, s) of a tile (one expert e); ``rscale`` is 1 or, with float16
sums, the power of two of dx's row n. The weight gradients are the weight-gradient
kernel's (:mod:`kernels.cvmm_mosaic.gram`). Structure as the forward
(:mod:`kernels.cvmm_mosaic.pair`): producers gather the tile's rows of dout and the
first copies W2's blocks [H, 64] (used transposed), the consumers accumulate t in one
[64, 64] accumulator per 64 columns of H; then each consumer gathers its rows of h,
takes dgates and du, stores du's rows and keeps du in shared memory; the first producer
copies W1's blocks [block_n, H] (used transposed) into a ring of two, and per block the
consumers multiply du by it and add the rows into their tokens' rows of dx.
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
from kernels.cvmm_mosaic.common import (CHUNK, ROWS_PER_WG, check_tiles,
                                        consumer_registers, fitting_tiles, gather_buffer,
                                        gather_commit, gather_rows, gather_views,
                                        gathers_done, launch, load, mma_steps, pl, plgpu,
                                        store_rows, tiled, zeros_after)
from kernels.cvmm_mosaic.pair import (MAX_HIDDEN, W2_STAGES, add_blocks, hidden_fits,
                                      pair_operands, tile_producer)
from kernels.routing import Routing

_ALIGN = 8
W1_STAGES = W2_STAGES  # buffers of W1's row blocks (tile_producer's second ring)


def pair_backward(dout: jax.Array, h: jax.Array, w1: jax.Array, w2: jax.Array,
                  routing: Routing, gates: jax.Array, rscale: jax.Array, *, sum_dtype,
                  cfg: TileConfig | None = None):
  """(dx [N, D] in ``sum_dtype``, du [P, H] in dout's dtype, dgates [P] float32), see
  the module docstring. dout [N, O], h [P, H] 16-bit; w1 [E, D, H], w2 [E, H, O] in
  dout's dtype; gates, rscale [P] float32."""
  n, k = routing.n_tokens, routing.k
  e, d, hdim = w1.shape
  o = w2.shape[2]
  if not hidden_fits(hdim):
    raise ValueError(f"pair_backward keeps a middle of at most {MAX_HIDDEN} columns, "
                     f"got {hdim}")
  hp = -(-hdim // CHUNK) * CHUNK
  sums = jnp.dtype(sum_dtype)
  if cfg is None:
    cfg = choose_pair_bwd_config(n, k, e, d, hp, o, dout.dtype, sums.name)
  check_pair_bwd_config(cfg, hp, sums.itemsize)
  bm = cfg.block_m
  tiles, pairs, x_idx, h_idx, w1_p, w2_p = pair_operands(routing, bm, w1, w2)
  g = slots.slot_values(pairs, gates)
  rs = slots.slot_values(pairs, rscale)
  dout_p = pad_to(dout, 1, CHUNK)
  h_p = pad_to(h, 1, CHUNK)
  dp = -(-d // _ALIGN) * _ALIGN
  dx, du, dg = _launch(dout_p, h_p, w1_p, w2_p, tiles[0], slots.used_tiles(tiles), x_idx,
                       h_idx, g, rs, n, n * k, dout_p.shape[1], hp, dp, sums, cfg)
  dx = dx[:, :d] if dp != d else dx
  du = du[:, :hdim] if hp != hdim else du
  z = tiles.shape[1]
  valid = pairs >= 0
  slot_of_pair = jnp.zeros((routing.n_pairs,), jnp.int32).at[
      jnp.where(valid, pairs, routing.n_pairs)].set(
          jnp.arange(z * bm, dtype=jnp.int32), mode="drop")                    # [P]
  return dx, du, dg[slot_of_pair]


def smem_bytes(cfg: TileConfig, hp: int, out_itemsize: int, itemsize: int = 2) -> int:
  n_cons = cfg.block_m // ROWS_PER_WG
  stage = (cfg.block_m + hp) * CHUNK * itemsize                 # dout rows, W2 block
  w1 = W1_STAGES * hp * cfg.block_n * itemsize
  mid = 2 * n_cons * ROWS_PER_WG * hp * itemsize                # h's rows then du's; du
  epi = n_cons * ROWS_PER_WG * (cfg.block_n * out_itemsize + 4)
  return cfg.num_stages * stage + w1 + mid + epi


def check_pair_bwd_config(cfg: TileConfig, hp: int, out_itemsize: int):
  check_tiles(cfg, smem_bytes(cfg, hp, out_itemsize))


def pair_bwd_candidates(hp: int, d: int, out_itemsize: int) -> list[TileConfig]:
  """Tiles in heuristic order (the first: the choice without autotuning), those that fit
  shared memory."""
  bn_max = min(256, max(CHUNK, autotune.next_pow2(d)))
  raw = [(128, 64, 3, 2), (128, 128, 2, 2), (128, 64, 3, 1), (64, 128, 4, 1),
         (64, 64, 6, 1), (128, 64, 2, 2), (64, 64, 3, 1), (64, 64, 2, 1)]
  return fitting_tiles(raw, bn_max, lambda cfg: smem_bytes(cfg, hp, out_itemsize))


def choose_pair_bwd_config(n, k, e, d, hp, o, dtype, sum_dtype: str) -> TileConfig:
  """The autotuner's tile for this shape (timed on a random routing)."""
  shape = (n, k, e, d, hp, o)

  def bench(cfg):
    from kernels.routing import synthetic_routing  # noqa: PLC0415
    with jax.ensure_compile_time_eval():
      r = synthetic_routing(n, k, e)
      ks = jax.random.split(jax.random.key(1), 5)
      dy = jax.random.normal(ks[0], (n, o), dtype)
      hm = jax.nn.relu(jax.random.normal(ks[1], (n * k, hp), dtype))
      w1 = (jax.random.normal(ks[2], (e, d, hp)) * d ** -0.5).astype(dtype)
      w2 = (jax.random.normal(ks[3], (e, hp, o)) * hp ** -0.5).astype(dtype)
      g = jax.random.uniform(ks[4], (n * k,), jnp.float32)
    f = autotune.compile_now(
        lambda dy, hm, w1, w2, r, g: pair_backward(dy, hm, w1, w2, r, g, g,
                                                   sum_dtype=sum_dtype, cfg=cfg),
        dy, hm, w1, w2, r, g)
    return autotune.time_call(lambda: f(dy, hm, w1, w2, r, g))

  from kernels.cvmm_mosaic.common import is_available  # noqa: PLC0415
  return autotune.tuner().choose(f"mosaic_pair_bwd_{sum_dtype}", shape, dtype,
                                 pair_bwd_candidates(hp, d, jnp.dtype(sum_dtype).itemsize),
                                 bench if is_available() else None)


def _launch(dout, h, w1, w2, tile_e, n_used, x_idx, h_idx, g, rs, n_out, n_mid, o, hp, d,
            sums, cfg):
  dtype = dout.dtype
  bm, bn, stages = cfg.block_m, cfg.block_n, cfg.num_stages
  n_cons, n_prod = bm // ROWS_PER_WG, cfg.producers
  n_hc = hp // CHUNK            # 64-column chunks of the middle
  grid_k = -(-o // CHUNK)
  n_nb = -(-d // bn)
  items = n_used.astype(jnp.int32)                                    # [1]
  nsm = autotune.multiprocessor_count()
  cons_regs = consumer_registers(n_cons, n_prod)

  def body(n_items_g, tile_e_g, x_idx_g, h_idx_g, g_g, rs_g, dout_g, h_g, w1_g, w2_g, dx_g,
           du_g, dg_g, a_buf, w2_buf, full, empty, w1_buf, full2, empty2, aidx, aidx_bar,
           oidx, hidx, og, ors, epi_bar, mid_buf, du_mma, o_smem, dg_smem, gather_bar,
           h_bar):
    a_mma, a_rows = gather_views(a_buf)
    h_mma, h_rows = gather_views(mid_buf)     # h's rows gathered; then du's to store
    wg = lax.axis_index("wg")
    n_items = n_items_g[0]

    def producer(p: int):
      def copy_step(ex, kk, s):
        for ch in range(n_hc):
          plgpu.copy_gmem_to_smem(
              w2_g.at[ex, pl.ds(ch * CHUNK, CHUNK), pl.ds(kk * CHUNK, CHUNK)],
              w2_buf.at[s, ch], full.at[s])

      def copy_block(ex, nb, s2):
        for ch in range(n_hc):
          plgpu.copy_gmem_to_smem(w1_g.at[ex, pl.ds(nb * bn, bn), pl.ds(ch * CHUNK, CHUNK)],
                                  w1_buf.at[s2, ch], full2.at[s2])

      tile_producer(p, n_items, tile_e_g, x_idx_g, dout_g, aidx, aidx_bar, a_rows,
                    gather_bar, full, empty, empty2, copy_step, copy_block, bm=bm,
                    n_prod=n_prod, grid_k=grid_k, n_nb=n_nb, stages=stages, nsm=nsm)

    def consumer(c_i: int):
      plgpu.set_max_registers(cons_regs, action="increase")

      @plgpu.nd_loop((n_items,), collective_axes="sm")
      def _item(info):
        (z,) = info.index
        j = info.local_index
        slot0 = z * bm + c_i * ROWS_PER_WG
        for src, dst in ((x_idx_g, oidx), (h_idx_g, hidx), (g_g, og), (rs_g, ors)):
          plgpu.copy_gmem_to_smem(src.at[pl.ds(slot0, ROWS_PER_WG)], dst.at[c_i],
                                  epi_bar.at[c_i])

        def back_t(accs, s):     # t = dout @ W2^T, one accumulator per 64 columns of H
          a = a_mma.at[s, pl.ds(c_i * ROWS_PER_WG, ROWS_PER_WG)]
          for ch in range(n_hc):
            plgpu.wgmma(accs[ch], a, w2_buf.at[s, ch].transpose((1, 0)))

        ts = pl.run_scoped(lambda *accs: mma_steps(accs, j * grid_k, grid_k, stages, full,
                                                   empty, back_t),
                           *[plgpu.ACC((ROWS_PER_WG, CHUNK))] * n_hc)
        plgpu.barrier_wait(epi_bar.at[c_i])
        # the last tile's dgates and added rows have been read out of shared memory
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        for ch in range(n_hc):   # this warpgroup's rows of h
          gather_rows(h_g.at[:, pl.ds(ch * CHUNK, CHUNK)], hidx.at[c_i],
                      h_rows.at[c_i, ch], h_bar.at[c_i])
        gather_commit()
        gathers_done(0)
        plgpu.commit_smem()      # every thread's rows are in
        layout = plgpu.Layout.WGMMA.reduce(1)
        gv = load(og.at[c_i], layout)
        dg = None
        dus = []
        for ch in range(n_hc):
          hv = load(h_mma.at[c_i, ch], plgpu.Layout.WGMMA).astype(jnp.float32)
          part = jnp.sum(ts[ch] * hv, axis=1)
          dg = part if dg is None else dg + part
          du = ts[ch] * lax.broadcast_in_dim(gv, ts[ch].shape, [0])
          dus.append(jnp.where(hv > 0, du, 0.0).astype(dtype))
        plgpu.commit_smem()      # h read by every thread before du overwrites it
        dg_smem.at[c_i][...] = dg
        for ch in range(n_hc):
          du_mma.at[c_i, ch][...] = dus[ch]
          h_rows.at[c_i, ch][...] = dus[ch]
          store_rows(h_rows.at[c_i, ch], hidx.at[c_i], du_g, ch * CHUNK)   # du for dW1
        plgpu.commit_smem()      # du and dgates before the wgmma and the copy
        plgpu.copy_smem_to_gmem(dg_smem.at[c_i], dg_g.at[pl.ds(slot0, ROWS_PER_WG)])
        rsv = load(ors.at[c_i], layout)

        def back_x(acc, s2):     # dx's block: du @ W1^T
          for ch in range(n_hc):
            plgpu.wgmma(acc, du_mma.at[c_i, ch], w1_buf.at[s2, ch].transpose((1, 0)))

        add_blocks(back_x, rsv, o_smem.at[c_i], oidx.at[c_i], dx_g, full2, empty2,
                   t0=j * n_nb, n_nb=n_nb, bn=bn)

      plgpu.wait_smem_to_gmem(0)   # the last added rows and dgates

    for c_i in range(n_cons):
      pl.when(wg == c_i)(functools.partial(consumer, c_i))
    for p in range(n_prod):
      pl.when(wg == n_cons + p)(functools.partial(producer, p))

  scratch = [
      gather_buffer((stages, bm, CHUNK), dtype),                                # a_buf
      plgpu.SMEM((stages, n_hc, CHUNK, CHUNK), dtype, transforms=tiled(dtype)),  # w2_buf
      plgpu.Barrier(num_arrivals=n_prod + n_hc, num_barriers=stages),           # full
      plgpu.Barrier(num_arrivals=n_cons, num_barriers=stages),                  # empty
      plgpu.SMEM((W1_STAGES, n_hc, bn, CHUNK), dtype, transforms=tiled(dtype)),  # w1_buf
      plgpu.Barrier(num_arrivals=n_hc, num_barriers=W1_STAGES),                 # full2
      plgpu.Barrier(num_arrivals=n_cons, num_barriers=W1_STAGES),               # empty2
      plgpu.SMEM((2 * n_prod, bm), jnp.int32),                                  # aidx
      plgpu.Barrier(num_arrivals=1, num_barriers=2 * n_prod),                   # aidx_bar
      plgpu.SMEM((n_cons, ROWS_PER_WG), jnp.int32),                             # oidx
      plgpu.SMEM((n_cons, ROWS_PER_WG), jnp.int32),                             # hidx
      plgpu.SMEM((n_cons, ROWS_PER_WG), jnp.float32),                           # og
      plgpu.SMEM((n_cons, ROWS_PER_WG), jnp.float32),                           # ors
      plgpu.Barrier(num_arrivals=4, num_barriers=n_cons),                       # epi_bar
      gather_buffer((n_cons, n_hc, ROWS_PER_WG, CHUNK), dtype),                 # mid_buf
      plgpu.SMEM((n_cons, n_hc, ROWS_PER_WG, CHUNK), dtype, transforms=tiled(dtype)),
      plgpu.SMEM((n_cons, ROWS_PER_WG, bn), sums),                              # o_smem
      plgpu.SMEM((n_cons, ROWS_PER_WG), jnp.float32),                           # dg_smem
      plgpu.Barrier(num_arrivals=bm // n_prod, num_barriers=n_prod),           # gather_bar
      plgpu.Barrier(num_arrivals=ROWS_PER_WG, num_barriers=n_cons),             # h_bar
  ]
  inputs = [items, tile_e, x_idx, h_idx, g, rs, dout, h, w1, w2]
  dx_ref = jax.new_ref(zeros_after((n_out, d), sums, inputs))   # added into zeros
  z_slots = x_idx.shape[0]
  du, dg = launch(body, inputs + [dx_ref],
                  [jax.ShapeDtypeStruct((n_mid, hp), dtype),
                   jax.ShapeDtypeStruct((z_slots,), jnp.float32)],
                  scratch, nsm, n_cons + n_prod)
  return dx_ref[...], du, dg
