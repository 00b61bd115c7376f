"""The row kernel: each tile of sorted pairs times its expert's matrix, rows gathered
and written (or added) by index. Legend in :mod:`kernels.routing`.

``rows_kernel``: one program per (expert-aligned tile of sorted pairs, block of output
  columns), or per tile walking every column block (``loop_n``). It gathers the tile's
  input rows by index, multiplies them by the tile's expert matrix and writes each
  result row to an output row chosen by index:

      out[orow(p)] (+)= scale[p] * (a[arow(p)] @ W[e(p)])      for the pairs p of the tile

  Row maps are ``row(p) = (p // K) * R + (p % K) // (K // R)`` with R in {1, M, K} rows
  per token, so one kernel serves
    forward            a = x  (R = M),   out = y [P, O]       (R = K), stored
    forward, gated     a = x  (R = M),   out = [N, O]         (R = 1), scale = gates, added
    dx                 a = dy (R = K),   W^T, out = dx (R = M), added when K // M > 1
    dx, gated          a = dout (R = 1), W^T, scale = gates, out = dx (R = M), plus
                       dgates[p] = <dout[n] @ W^T, x[arow(p)]> from the same product,
                       written as one partial per column block and summed afterwards.
  With gates the weighted sum over the K slots is fused: each program adds its
  gate-weighted rows into the [N, O] output with atomics, so the [P, O] intermediate
  is never written. The adds are float32, or 16-bit (:mod:`kernels.cvmm_triton.scales`).

:func:`rows_matmul` launches it, or the other kernels of a fused sum: the Gluon row
kernels on Hopper (:mod:`kernels.cvmm_triton.gluon_rows`), the unit-pair kernel
(:mod:`kernels.cvmm_triton.gluon_pairs`) and the unit-store kernel
(:mod:`kernels.cvmm_triton.units`). float32 inputs use ``input_precision="ieee"``
(true float32, not tf32); bf16 and float16 accumulate in float32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels import autotune
from kernels.autotune import TileConfig
from kernels.config import DEFAULT, CvmmConfig
from kernels.cvmm_triton.gluon_pairs import gluon_pairs_sum, unit_pairs_config
from kernels.cvmm_triton.gluon_rows import gluon_rows_candidates, gluon_rows_ok, gluon_rows_sum
from kernels.cvmm_triton.launch import compute_capability, dummy_f32, hopper, jit, launch, tl
from kernels.cvmm_triton.primitives import gathered_matmul, mma, row_scale, rows_epilogue, sum_tiles, w_layout
from kernels.cvmm_triton.scales import (checked_scales_pay, f16_row_scales_checked, f16_unscale,
                                        half_sums, red_width, sum_out_dtype,
                                        unscale_rows_checked)
from kernels.cvmm_triton.tuning import bench_or_none, sum_key, synthetic_routing
from kernels.cvmm_triton.units import choose_units_config, units_store, units_store_applies
from kernels.routing import Routing
from kernels.row_scales import f16_row_scales, max_l1


@jit
def rows_kernel(
    a_ptr,        # [Ra, I]  rows read by the pairs
    w_ptr,        # expert matrices: element (e, i, o) at e*SW_E + i*SW_I + o*SW_O
    order_ptr,    # [P] int32 pair index at each sorted position
    tiles_ptr,    # [3, Z] int32 expert, start, end of each tile
    scale_ptr,    # [P] per-pair scale (gates), indexed by pair; unused if not HAS_SCALE
    c_ptr,        # [Rc, O] rows dotted with the product for dgates; unused if not DGATE
    out_ptr,      # [Ro, O]  (float32 when ATOMIC)
    dg_ptr,       # [P, cdiv(O, BN)] float32 dgates partials; unused if not DGATE
    Z: tl.constexpr, I: tl.constexpr, O: tl.constexpr, K: tl.constexpr,
    A_R: tl.constexpr, O_R: tl.constexpr, C_R: tl.constexpr,
    SW_E: tl.constexpr, SW_I: tl.constexpr, SW_O: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    HAS_SCALE: tl.constexpr, ATOMIC: tl.constexpr, DGATE: tl.constexpr,
    IEEE: tl.constexpr, LOOP_N: tl.constexpr, RED: tl.constexpr, F16: tl.constexpr,
):
  n_nb: tl.constexpr = (O + BN - 1) // BN
  pid = tl.program_id(0)
  if LOOP_N:   # one program per tile walks every column block; a is loaded once
    tile = pid
  else:        # one program per (tile, column block)
    tile = pid // n_nb
  e = tl.load(tiles_ptr + tile)
  start = tl.load(tiles_ptr + Z + tile)
  end = tl.load(tiles_ptr + 2 * Z + tile)
  if start < end:
    rows = start + tl.arange(0, BM)                                # [BM] sorted positions
    rmask = rows < end
    pair = tl.load(order_ptr + rows, mask=rmask, other=0)          # [BM]
    tok = pair // K
    slot = pair % K
    a_row = (tok * A_R + slot // (K // A_R)).to(tl.int64)          # [BM]
    sc = row_scale(scale_ptr, pair, rmask, HAS_SCALE)             # [BM]
    w_base = w_ptr + e.to(tl.int64) * SW_E
    if LOOP_N:
      # The whole contraction fits one block (I <= BK): keep a in registers and
      # stream the expert's matrix one column block at a time.
      ks = tl.arange(0, BK)
      kmask = ks < I
      a = tl.load(a_ptr + a_row[:, None] * I + ks[None, :],
                  mask=rmask[:, None] & kmask[None, :], other=0.0)  # [BM, BK]
      for nb in tl.range(0, n_nb):
        cols = nb * BN + tl.arange(0, BN)
        b = tl.load(w_base + ks[:, None] * SW_I + cols[None, :] * SW_O,
                    mask=kmask[:, None] & (cols < O)[None, :], other=0.0)  # [BK, BN]
        acc = mma(a, b, None, IEEE)
        rows_epilogue(acc, nb, pair, tok, slot, rmask, sc, c_ptr, out_ptr, dg_ptr,
                       O, K, O_R, C_R, BM, BN, HAS_SCALE, ATOMIC, DGATE, RED, F16)
    else:
      nb = pid % n_nb
      cols = nb * BN + tl.arange(0, BN)                            # [BN]
      acc = gathered_matmul(a_ptr, a_row, rmask, w_base, cols, cols < O, I, SW_I, SW_O,
                             BM, BN, BK, IEEE)                      # [BM, BN]
      rows_epilogue(acc, nb, pair, tok, slot, rmask, sc, c_ptr, out_ptr, dg_ptr,
                     O, K, O_R, C_R, BM, BN, HAS_SCALE, ATOMIC, DGATE, RED, F16)


def rows_matmul(a: jax.Array, w: jax.Array, routing: Routing, *, a_rows: int,
                out_rows: int, transpose_w: bool = False, scale: jax.Array | None = None,
                dgate_rows: jax.Array | None = None, c_rows: int = 1,
                fuse_sum: bool = True, cfg: TileConfig | None = None,
                config: CvmmConfig = DEFAULT):
  """out[orow(p)] (+)= scale[p] * a[arow(p)] @ W_e, see the module docstring.

  a: [N * a_rows, I]; w: [E, I, O] (or [E, O, I] used transposed); scale: [P] or None;
  dgate_rows: [N * c_rows, O] rows dotted with the unscaled product, or None.
  Returns (out [N * out_rows, O], dgates [P] float32 or None). Where several pairs
  meet in one output row (out_rows < K), out is in a's dtype with 16-bit sums
  (:func:`kernels.cvmm_triton.scales.half_sums`; float16 sums are scaled back by a
  kernel), else float32; where none meet, a's dtype. With ``fuse_sum=False`` such
  rows are not added atomically: every pair's scaled row is stored ([P, O] in a's
  dtype) and XLA sums them (the intermediate is written).

  Which kernel runs: a routing with unit pairs (:class:`~kernels.routing.UnitPairs`)
  takes the Gluon unit-pair kernel for 16-bit fused sums on Hopper
  (:func:`~kernels.cvmm_triton.gluon_pairs.unit_pairs_config`; unless ``cfg`` names a
  row tile), and the unit-store kernel where each output row takes exactly one unit
  (:func:`~kernels.cvmm_triton.units.units_store`); otherwise the tile ``cfg`` (None:
  the autotuner's) names the Triton row kernel or a Gluon row kernel.
  """
  if out_rows < routing.k and not fuse_sum:
    out, dg = rows_matmul(a, w, routing, a_rows=a_rows, out_rows=routing.k,
                          transpose_w=transpose_w, scale=scale, dgate_rows=dgate_rows,
                          c_rows=c_rows, cfg=cfg, config=config)         # [P, O]
    n, k = routing.n_tokens, routing.k
    out = out.reshape(n, out_rows, k // out_rows, -1).astype(jnp.float32).sum(axis=2)
    return out.reshape(n * out_rows, -1), dg
  n, k, p = routing.n_tokens, routing.k, routing.n_pairs
  e = w.shape[0]
  i, o, sw = w_layout(w.shape, transpose_w)
  assert a.shape == (n * a_rows, i), (a.shape, n, a_rows, i)
  dgate = dgate_rows is not None
  if cfg is None and units_store_applies(routing, o, a_rows, out_rows,
                                         c_rows if dgate else None):
    ucfg = choose_units_config(n, k, e, routing.pairs.block, i, o, a.dtype, a_rows,
                               out_rows, c_rows if dgate else None, scale is not None,
                               transpose_w, config)
    return units_store(a, w, routing, scale, dgate_rows, ucfg, a_rows=a_rows,
                       out_rows=out_rows, c_rows=c_rows, transpose_w=transpose_w)
  atomic = out_rows < k
  sd = config.sum_dtype
  red = red_width(o, a.dtype, sd) if atomic else 1
  half = half_sums(a.dtype, o, sd) if atomic else None
  gluon_ok = gluon_rows_ok(i, o, a.dtype, red, dgate)
  pcfg = None
  if cfg is None and atomic and config.gluon:
    pcfg = unit_pairs_config(routing, i, o, a.dtype, red, dgate, out_rows, a_rows=a_rows,
                             has_scale=scale is not None, transpose_w=transpose_w,
                             config=config)
  if pcfg is None:
    if cfg is None:
      cfg = choose_rows_config(n, k, e, i, o, a.dtype, a_rows, out_rows, scale is not None,
                               config)
      if cfg.gluon and not (gluon_ok(cfg) and hopper()):
        cfg = triton_rows_candidates(i, o, a.dtype)[0]   # a cached choice it cannot take
    elif cfg.gluon and not gluon_ok(cfg):
      raise ValueError(f"{cfg}: the Gluon row kernel needs a fused 16-bit sum without "
                       f"dgates, a contraction of 16..256 (a power of two), whole column "
                       f"blocks and 3 buffers at least (2 for two halves); got I={i}, O={o}, "
                       f"{jnp.dtype(a.dtype).name}, sum reductions of {red}, "
                       f"dgates={dgate}")
    elif cfg.gluon and not hopper():
      raise ValueError(f"{cfg}: the Gluon row kernel runs on Hopper GPUs (sm90) only; "
                       f"this one is sm{compute_capability():.1f}")
  out_dtype = sum_out_dtype(half) if atomic else a.dtype
  # checked float16 scales: the scale-back checks every row's sums
  checked = (half == "float16" and config.f16_scales == "checked"
             and checked_scales_pay(i, o, a_rows, out_rows))
  gates, sampled = scale, None
  if checked:
    row_s, scale, sampled = f16_row_scales_checked(a, w, transpose_w, routing, scale,
                                                   a_rows, out_rows)
  elif half == "float16":
    w_l1 = max_l1(w, 2 if transpose_w else 1)
    row_s, scale = f16_row_scales(a, w_l1, routing, scale, a_rows, out_rows)
  if pcfg is not None:      # a SwitchHead routing's unit pairs: one reduction per unit
    out = gluon_pairs_sum(a, w, routing, scale, pcfg, a_rows=a_rows, out_rows=out_rows,
                          transpose_w=transpose_w, out_dtype=out_dtype)
    dg = None
  elif cfg.gluon:           # tiles of halves * block_m rows
    tiles = sum_tiles(routing, cfg.halves * cfg.block_m)
    out = gluon_rows_sum(a, w, routing, tiles, scale, cfg, a_rows=a_rows,
                         out_rows=out_rows, transpose_w=transpose_w, out_dtype=out_dtype)
    dg = None
  else:
    tiles = sum_tiles(routing, cfg.block_m) if atomic else routing.tiles(cfg.block_m)
    z = tiles.shape[1]
    n_nb = -(-o // cfg.block_n)
    loop_n = cfg.loop_n and i <= cfg.block_k
    out_shapes = [jax.ShapeDtypeStruct((n * out_rows, o), out_dtype),
                  jax.ShapeDtypeStruct((p, n_nb) if dgate else (1,), jnp.float32)]
    args = [a, w, routing.order, tiles,
            scale if scale is not None else dummy_f32(),
            dgate_rows if dgate else dummy_f32()]
    out, dg = launch(
        rows_kernel, args, out_shapes, z if loop_n else z * n_nb, cfg,
        zeroed=(0,) if atomic else (),
        Z=z, I=i, O=o, K=k, A_R=a_rows, O_R=out_rows, C_R=c_rows,
        SW_E=sw[0], SW_I=sw[1], SW_O=sw[2], BM=cfg.block_m, BN=cfg.block_n,
        BK=cfg.block_k, HAS_SCALE=scale is not None, ATOMIC=atomic, DGATE=dgate,
        IEEE=a.dtype == jnp.float32, LOOP_N=loop_n, RED=red, F16=half == "float16")
    dg = dg.sum(axis=1) if dgate else None
  if checked:
    out = unscale_rows_checked(out, 1.0 / row_s, sampled, a, w, routing, gates, a.dtype,
                               a_rows=a_rows, out_rows=out_rows, transpose_w=transpose_w)
  elif half == "float16":
    out = f16_unscale(out, row_s, a.dtype)
  return out, dg


def rows_candidates(i: int, o: int, dtype, gluon: bool = False) -> list[TileConfig]:
  """Tile candidates of the row kernels, in heuristic order; ``gluon``: the call can
  take the Gluon kernels, whose tiles then come first
  (:func:`~kernels.cvmm_triton.gluon_rows.gluon_rows_candidates`)."""
  out = triton_rows_candidates(i, o, dtype)
  if gluon:
    ok = gluon_rows_ok(i, o, dtype, 8, False)
    out = [c for c in gluon_rows_candidates(i) if ok(c)] + out
  return out


def triton_rows_candidates(i: int, o: int, dtype) -> list[TileConfig]:
  bn_max = max(16, autotune.next_pow2(o))
  bk_max = max(16, autotune.next_pow2(i))
  if jnp.dtype(dtype).itemsize >= 4:
    raw = [(64, 64, 32, 4, 3), (128, 64, 32, 8, 3), (64, 128, 32, 4, 3)]
  else:
    # First: the heuristic choice when autotuning is off. 256-row tiles read each
    # tile's expert matrix from L2 once per 256 rows instead of 128: at MoEUT_244M on
    # an H200, 256x128x64 w8 s4 ran the up projection in 0.737 ms (the best 128- or
    # 64-row tile: 0.828) and V in 0.417 (0.461).
    raw = [(128, 128, 64, 4, 4), (128, 128, 64, 8, 3), (128, 64, 64, 4, 4),
           (64, 128, 64, 4, 4), (128, 256, 64, 8, 3), (256, 128, 64, 8, 4),
           (256, 128, 64, 8, 3)]
  out = []
  for bm, bn, bk, w, st in raw:
    out.append(TileConfig(bm, min(bn, bn_max), min(bk, bk_max), w, st))
  if i <= 256 and o > 128 and jnp.dtype(dtype).itemsize < 4:
    # Narrow contraction, wide output (σ-MoE down, SwitchHead O, their dx): a program
    # keeps its gathered rows and walks every column block (ahead of the list: the
    # heuristic choice when autotuning is off).
    # 256-row tiles read each expert's matrix half as often (with 16-bit sums the
    # matrices' L2 traffic is the largest part of the down projection's).
    looped = [TileConfig(bm, min(bn, bn_max), bk_max, w, st, loop_n=True)
              for bm, bn, w, st in ((128, 64, 4, 3), (128, 128, 8, 3), (64, 128, 4, 3),
                                    (64, 256, 8, 2), (128, 256, 8, 2), (256, 64, 8, 3),
                                    (256, 32, 8, 3))]
    out = looped + out
  return list(dict.fromkeys(out))


def choose_rows_config(n, k, e, i, o, dtype, a_rows, out_rows, has_scale,
                       config: CvmmConfig = DEFAULT) -> TileConfig:
  """The autotuner's row tile for this shape (timed on a random routing)."""
  shape = (n, k, e, i, o, a_rows, out_rows, int(has_scale)) + sum_key(
      dtype, o, out_rows < k, config.sum_dtype)

  def bench(cfg):
    with jax.ensure_compile_time_eval():
      r = synthetic_routing(n, k, e)
      a = jax.random.normal(jax.random.key(1), (n * a_rows, i), dtype)
      w = jax.random.normal(jax.random.key(2), (e, i, o), dtype)
      sc = jax.random.uniform(jax.random.key(3), (n * k,), jnp.float32) if has_scale else None
    f = autotune.compile_now(
        lambda a, w, r, sc: rows_matmul(a, w, r, a_rows=a_rows, out_rows=out_rows,
                                        scale=sc, cfg=cfg, config=config)[0],
        a, w, r, sc)
    return autotune.time_call(lambda: f(a, w, r, sc))

  atomic = out_rows < k
  gluon = (config.gluon and atomic and red_width(o, dtype, config.sum_dtype) == 8
           and hopper())
  return autotune.tuner().choose("triton_rows", shape, dtype,
                                 rows_candidates(i, o, dtype, gluon),
                                 bench_or_none(bench), config=config)


