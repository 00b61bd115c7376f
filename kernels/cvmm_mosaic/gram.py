"""The weight-gradient kernel: dW[e] = sum over e's pairs p of a[arow(p)]^T b[brow(p)],
both operands' rows gathered by index. Legend in :mod:`kernels.routing`.

Work items are (expert, block of I, block of O), walked by one persistent CUDA block per
multiprocessor. Each item contracts the expert's sorted positions [off[e], off[e+1]) in
steps of 64 rows: the producer warpgroups (``cfg.producers``, one or two, each with its
own copy of the row indices and a contiguous share of the step's rows) gather the
step's rows of a (block_m columns) and of b (block_n columns) with cp.async
(kernels/cvmm_mosaic/common.py: gathered rows), rows past the expert's end reading
zeros, and tell the consumers that a stage is full ``num_stages - 2`` steps later, once
its copies have landed; each consumer warpgroup owns 64 columns of I and accumulates
a^T b for them with wgmma (a's chunk used transposed). The row indices of the next step
are prefetched while the current step's rows are issued. Experts without pairs store
zeros.
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
from kernels.cvmm_mosaic.common import (CHUNK, PRODUCER_REGISTERS, ROWS_PER_WG, SMEM_BUDGET,
                                        claim_stage, consumer_registers, gather_buffer,
                                        gather_commit, gather_rows, gather_views, launch,
                                        mma_steps, pl, plgpu, producer_done, step_gathered)
from kernels.routing import Routing

STEP = 64          # rows contracted per pipeline step
# A TMA copy's start in global memory must be 16-byte aligned (an unaligned start
# coordinate of the innermost dimension traps: illegal instruction). Index windows
# start at an expert's offset, anywhere, so they are read from the 4-aligned position
# at or before it, STEP + IDX_SLACK entries (a multiple of 32: 128-byte copies).
IDX_ALIGN = 4
IDX_SLACK = 32


def expert_gram(a: jax.Array, b: jax.Array, routing: Routing, *, a_rows: int, b_rows: int,
                out_dtype, cfg: TileConfig | None = None) -> jax.Array:
  """[E, I, O]: dW[e] = sum_{p of e} a[arow(p)]^T b[brow(p)]; a [N * a_rows, I],
  b [N * b_rows, O] (rows per token as in :mod:`kernels.cvmm_mosaic.slots`)."""
  n, e = routing.n_tokens, routing.n_experts
  i, o = a.shape[1], b.shape[1]
  assert a.shape[0] == n * a_rows and b.shape[0] == n * b_rows, (a.shape, b.shape, n)
  if cfg is None:
    cfg = choose_gram_config(n, routing.k, e, i, o, a.dtype, a_rows, b_rows)
  check_gram_config(cfg)
  a_pos = slots.sorted_rows(routing, a_rows, STEP + IDX_SLACK)       # [P + 96]
  b_pos = slots.sorted_rows(routing, b_rows, STEP + IDX_SLACK)
  a_p, b_p = pad_to(a, 1, CHUNK), pad_to(b, 1, CHUNK)   # whole 64-column chunks
  dw = _launch(a_p, b_p, a_pos, b_pos, routing.group_offsets, e, jnp.dtype(out_dtype), cfg)
  return dw[:, :i, :o]


def check_gram_config(cfg: TileConfig):
  if cfg.block_m % ROWS_PER_WG or cfg.block_m // ROWS_PER_WG not in (1, 2):
    raise ValueError(f"block_m={cfg.block_m}: one or two consumer warpgroups of "
                     f"{ROWS_PER_WG} columns of I")
  if cfg.block_n % CHUNK or cfg.block_n > 256:
    raise ValueError(f"block_n={cfg.block_n} must be a multiple of {CHUNK} up to 256")
  if cfg.block_k != STEP:
    raise ValueError(f"block_k={cfg.block_k}: the gram contracts {STEP} rows a step")


def _launch(a, b, a_pos, b_pos, offsets, e, out_dtype, cfg):
  dtype = a.dtype
  i, o = a.shape[1], b.shape[1]
  bi, bo, stages = cfg.block_m, cfg.block_n, cfg.num_stages
  n_cons, n_bc, n_prod = bi // CHUNK, bo // CHUNK, cfg.producers
  cons_regs = consumer_registers(n_cons, n_prod)
  share = STEP // n_prod        # rows of a step each producer gathers
  n_ib, n_ob = -(-i // bi), -(-o // bo)
  n_items = e * n_ib * n_ob
  nsm = autotune.multiprocessor_count()

  def body(off_g, a_pos_g, b_pos_g, a_g, b_g, dw_g, a_buf, b_buf, full, empty, idx, idx_bar,
           o_smem, gather_bar):
    a_mma, a_rows = gather_views(a_buf)
    b_mma, b_rows = gather_views(b_buf)
    wg = lax.axis_index("wg")

    def item_of(lin):
      ex = lin // (n_ib * n_ob)
      ii = (lin // n_ob) % n_ib
      oo = lin % n_ob
      lo, hi = off_g[ex], off_g[ex + 1]
      return ex, ii, oo, lo, hi, (hi - lo + STEP - 1) // STEP

    def producer(p: int):
      plgpu.set_max_registers(PRODUCER_REGISTERS, action="decrease")

      def fetch(pos0, buf):   # into this producer's own double buffer
        base = pos0 - pos0 % IDX_ALIGN            # 16-byte aligned TMA start
        win = pl.ds(base, STEP + IDX_SLACK)
        plgpu.copy_gmem_to_smem(a_pos_g.at[win], idx.at[p, buf, 0], idx_bar.at[2 * p + buf])
        plgpu.copy_gmem_to_smem(b_pos_g.at[win], idx.at[p, buf, 1], idx_bar.at[2 * p + buf])

      @plgpu.nd_loop((n_items,), collective_axes="sm", init_carry=jnp.int32(0))
      def steps(info, carry):
        (lin,) = info.index
        ex, ii, oo, lo, hi, n_k = item_of(lin)

        @pl.when(n_k > 0)
        def _():
          fetch(lo, carry % 2)

        def kstep(kk, t):
          buf = t % 2
          # every thread of this producer has issued step t - 1's gathers, whose row
          # indices (buffer 1 - buf) the prefetch below overwrites (and step t - 2's,
          # whose buffer the next item's first fetch overwrites)
          plgpu.commit_smem()
          plgpu.barrier_wait(idx_bar.at[2 * p + buf])

          @pl.when(kk + 1 < n_k)
          def _():
            fetch(lo + (kk + 1) * STEP, 1 - buf)

          s = claim_stage(t, stages, empty)
          pos0 = lo + kk * STEP
          shift = pos0 % IDX_ALIGN                  # where pos0 lies in the window
          mine = pl.ds(shift + p * share, share)
          limit = hi - pos0 - p * share             # rows of mine within the expert
          rows_mine = pl.ds(p * share, share)
          for ch in range(n_cons):
            gather_rows(a_g.at[:, pl.ds(ii * bi + ch * CHUNK, CHUNK)], idx.at[p, buf, 0, mine],
                        a_rows.at[s, ch, rows_mine], gather_bar.at[p], limit)
          for ch in range(n_bc):
            gather_rows(b_g.at[:, pl.ds(oo * bo + ch * CHUNK, CHUNK)], idx.at[p, buf, 1, mine],
                        b_rows.at[s, ch, rows_mine], gather_bar.at[p], limit)
          gather_commit()
          step_gathered(t, stages, full)
          return t + 1

        return lax.fori_loop(0, n_k, kstep, carry)

      producer_done(steps, stages, full, empty)

    def consumer(c_i: int):
      plgpu.set_max_registers(cons_regs, action="increase")

      @plgpu.nd_loop((n_items,), collective_axes="sm", init_carry=jnp.int32(0))
      def _steps(info, carry):
        (lin,) = info.index
        ex, ii, oo, lo, hi, n_k = item_of(lin)

        def mma(acc_ref, s):
          lhs = a_mma.at[s, c_i].transpose((1, 0))                       # [64 of I, 64 rows]
          for ch in range(n_bc):
            plgpu.wgmma(acc_ref.at[:, pl.ds(ch * CHUNK, CHUNK)], lhs, b_mma.at[s, ch])

        acc = pl.run_scoped(lambda acc_ref: mma_steps(acc_ref, carry, n_k, stages, full,
                                                      empty, mma),
                            plgpu.ACC((ROWS_PER_WG, bo)))
        t_end = carry + n_k
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)   # the last item's store read
        o_smem.at[c_i][...] = acc.astype(out_dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(
            o_smem.at[c_i],
            dw_g.at[ex, pl.ds(ii * bi + c_i * CHUNK, ROWS_PER_WG), pl.ds(oo * bo, bo)])
        return t_end

      plgpu.wait_smem_to_gmem(0)

    for c_i in range(n_cons):
      pl.when(wg == c_i)(functools.partial(consumer, c_i))
    for p in range(n_prod):
      pl.when(wg == n_cons + p)(functools.partial(producer, p))

  scratch = [
      gather_buffer((stages, n_cons, STEP, CHUNK), dtype),                      # a_buf
      gather_buffer((stages, n_bc, STEP, CHUNK), dtype),                        # b_buf
      plgpu.Barrier(num_arrivals=n_prod, num_barriers=stages),                  # full
      plgpu.Barrier(num_arrivals=n_cons, num_barriers=stages),                  # empty
      plgpu.SMEM((n_prod, 2, 2, STEP + IDX_SLACK), jnp.int32),                  # idx
      plgpu.Barrier(num_arrivals=2, num_barriers=2 * n_prod),                   # idx_bar
      plgpu.SMEM((n_cons, ROWS_PER_WG, bo), out_dtype),                         # o_smem
      plgpu.Barrier(num_arrivals=share, num_barriers=n_prod),                   # gather_bar
  ]
  # Whole blocks: where a [64, bo] block is contiguous in dW (bo == o) its store is a
  # linear bulk copy (see rows._launch), which a partial block of I would run past.
  out_type = jax.ShapeDtypeStruct((e, n_ib * bi, n_ob * bo), out_dtype)
  (dw,) = launch(body, [offsets, a_pos, b_pos, a, b], [out_type], scratch, nsm,
                 n_cons + n_prod)
  return dw


def smem_bytes(cfg: TileConfig, out_itemsize: int, dtype_itemsize: int = 2) -> int:
  stage = (cfg.block_m + cfg.block_n) * STEP * dtype_itemsize
  return cfg.num_stages * stage + cfg.block_m * cfg.block_n * out_itemsize


def gram_candidates(o: int) -> list[TileConfig]:
  """Tiles of the weight-gradient kernel in heuristic order: the first three with two
  producer warpgroups, then every tile with one. Two producers were faster by 11-12% at
  MoEUT_244M's shapes on an H200 when rows came by one TMA copy each; with cp.async
  gathers the order has not been timed again."""
  bo_max = min(256, max(CHUNK, autotune.next_pow2(o)))
  raw = [(128, 128, 4), (128, 64, 6), (64, 128, 6), (128, 256, 3), (64, 64, 8)]
  raw = [(*t, 2) for t in raw[:3]] + [(*t, 1) for t in raw]
  out = []
  for bi, bo, st, prod in raw:
    cfg = TileConfig(bi, min(bo, bo_max), STEP, 4, st, producers=prod)
    if smem_bytes(cfg, 4) <= SMEM_BUDGET:
      out.append(cfg)
  return list(dict.fromkeys(out))


def choose_gram_config(n, k, e, i, o, dtype, a_rows, b_rows) -> TileConfig:
  shape = (n, k, e, i, o, a_rows, b_rows)

  def bench(cfg):
    from kernels.routing import synthetic_routing  # noqa: PLC0415
    with jax.ensure_compile_time_eval():
      r = synthetic_routing(n, k, e)
      a = jax.random.normal(jax.random.key(1), (n * a_rows, i), dtype)
      b = jax.random.normal(jax.random.key(2), (n * b_rows, o), dtype)
    f = autotune.compile_now(
        lambda a, b, r: expert_gram(a, b, r, a_rows=a_rows, b_rows=b_rows, out_dtype=dtype,
                                    cfg=cfg), a, b, r)
    return autotune.time_call(lambda: f(a, b, r))

  from kernels.cvmm_mosaic.common import is_available  # noqa: PLC0415
  return autotune.tuner().choose("mosaic_gram", shape, dtype, gram_candidates(o),
                                 bench if is_available() else None)
