"""The unit-store kernel: SwitchHead sums where each output row takes one unit's two pairs.

A unit is a (token, head) of a SwitchHead routing with unit pairs
(:class:`kernels.routing.UnitPairs`): its two experts' products add into one output
row and nothing else does (O's dx: a head's two experts into that head's row). Each
program multiplies a tile of units of one expert combination by both matrices, adds the
two products in registers and stores the row: no zeroing, no atomics, no 16-bit sums.
On an H200 at MoEUT_244M it took O's forward+backward from 1.593 to 1.423 ms.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels import autotune
from kernels.autotune import TileConfig
from kernels.config import DEFAULT, CvmmConfig
from kernels.cvmm_triton.launch import dummy_f32, jit, launch, tl
from kernels.cvmm_triton.primitives import mma, row_scale, w_layout
from kernels.cvmm_triton.tuning import bench_or_none, head_bench_inputs
from kernels.routing import Routing


@jit
def units_kernel(
    a_ptr,        # [Ra, I]  rows read by the pairs
    w_ptr,        # expert matrices: element (e, i, o) at e*SW_E + i*SW_I + o*SW_O
    lo_ptr,       # [U] int32 each sorted unit's pair with the lower expert
    hi_ptr,       # [U] int32 its other pair
    tiles_ptr,    # [4, Z] int32 lower expert, higher expert, start, end of each tile
    scale_ptr,    # [P] per-pair scale (gates); unused if not HAS_SCALE
    c_ptr,        # [Rc, O] rows dotted with each product for dgates; unused if not DGATE
    out_ptr,      # [Ro, O] one row per unit, stored
    dg_ptr,       # [P] float32 dgates; unused if not DGATE
    Z: tl.constexpr, I: tl.constexpr, O: tl.constexpr, K: tl.constexpr,
    A_R: tl.constexpr, O_R: tl.constexpr, C_R: tl.constexpr,
    SW_E: tl.constexpr, SW_I: tl.constexpr, SW_O: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    HAS_SCALE: tl.constexpr, DGATE: tl.constexpr, IEEE: tl.constexpr,
):
  """Both products of a tile of units that share their two experts, added in registers
  and stored: each output row is one unit's (K // O_R == 2), so nothing is added
  across programs. One column block (O <= BN); the contraction BK at a time."""
  one_a: tl.constexpr = (K // A_R) % 2 == 0          # both pairs read one input row
  tile = tl.program_id(0)
  e_lo = tl.load(tiles_ptr + tile)
  e_hi = tl.load(tiles_ptr + Z + tile)
  start = tl.load(tiles_ptr + 2 * Z + tile)
  end = tl.load(tiles_ptr + 3 * Z + tile)
  if start < end:
    rows = start + tl.arange(0, BM)
    rmask = rows < end
    p_lo = tl.load(lo_ptr + rows, mask=rmask, other=0)              # [BM]
    p_hi = tl.load(hi_ptr + rows, mask=rmask, other=1)
    tok = p_lo // K
    s_lo, s_hi = p_lo % K, p_hi % K                                  # slots
    a_lo = (tok * A_R + s_lo // (K // A_R)).to(tl.int64)
    a_hi = (tok * A_R + s_hi // (K // A_R)).to(tl.int64)
    cols = tl.arange(0, BN)
    cmask = cols < O
    w_lo = w_ptr + e_lo.to(tl.int64) * SW_E
    w_hi = w_ptr + e_hi.to(tl.int64) * SW_E
    acc_lo = tl.zeros((BM, BN), dtype=tl.float32)
    acc_hi = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in tl.range(0, I, BK):
      ks = k0 + tl.arange(0, BK)
      kmask = ks < I
      amask = rmask[:, None] & kmask[None, :]
      bmask = kmask[:, None] & cmask[None, :]
      x_lo = tl.load(a_ptr + a_lo[:, None] * I + ks[None, :], mask=amask, other=0.0)
      if one_a:
        x_hi = x_lo
      else:
        x_hi = tl.load(a_ptr + a_hi[:, None] * I + ks[None, :], mask=amask, other=0.0)
      b_lo = tl.load(w_lo + ks[:, None] * SW_I + cols[None, :] * SW_O, mask=bmask, other=0.0)
      b_hi = tl.load(w_hi + ks[:, None] * SW_I + cols[None, :] * SW_O, mask=bmask, other=0.0)
      acc_lo = mma(x_lo, b_lo, acc_lo, IEEE)
      acc_hi = mma(x_hi, b_hi, acc_hi, IEEE)
    omask = rmask[:, None] & cmask[None, :]
    if DGATE:   # both pairs of a unit dot one row: K // C_R is even (the wrapper checks)
      c_row = (tok * C_R + s_lo // (K // C_R)).to(tl.int64)
      c = tl.load(c_ptr + c_row[:, None] * O + cols[None, :], mask=omask,
                  other=0.0).to(tl.float32)
      tl.store(dg_ptr + p_lo, tl.sum(acc_lo * c, axis=1), mask=rmask)
      tl.store(dg_ptr + p_hi, tl.sum(acc_hi * c, axis=1), mask=rmask)
    o_row = (tok * O_R + s_lo // (K // O_R)).to(tl.int64)
    acc = (acc_lo * row_scale(scale_ptr, p_lo, rmask, HAS_SCALE)[:, None]
           + acc_hi * row_scale(scale_ptr, p_hi, rmask, HAS_SCALE)[:, None])
    tl.store(out_ptr + o_row[:, None] * O + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=omask)


# Most output columns the unit-store kernel keeps on chip: two [BM, O] float32 products.
UNITS_MAX_COLS = 256


def units_store_applies(routing: Routing, o: int, a_rows: int, out_rows: int,
                        c_rows: int | None) -> bool:
  """Whether :func:`units_store` can compute this sum: the routing carries unit pairs,
  every output row takes the two pairs of one unit (K // out_rows == 2), dgates (if
  any, ``c_rows``) dot one row per unit, and O <= :data:`UNITS_MAX_COLS`."""
  k = routing.k
  return (routing.pairs is not None and out_rows * 2 == k and o <= UNITS_MAX_COLS
          and (c_rows is None or (k // c_rows) % 2 == 0) and k % a_rows == 0)


def units_candidates(o: int, dtype) -> list[TileConfig]:
  bn = max(16, autotune.next_pow2(o))
  if jnp.dtype(dtype).itemsize >= 4:
    raw = [(64, 32, 4, 2), (32, 32, 4, 2)]
  else:
    # Two [BM, O] float32 products per program: 64-row tiles with 8 warps compile for
    # sm90 without spills at SwitchHead O's dx (O = 128, I = 1024: 165-201 registers);
    # 128-row tiles and 4 warps spill (kernels.offline.sass_stats).
    raw = [(64, 64, 8, 3), (64, 32, 8, 4), (64, 64, 8, 4), (64, 128, 8, 2)]
  return [TileConfig(bm, bn, bk, w, st) for bm, bk, w, st in raw]


def choose_units_config(n, k, e, block, i, o, dtype, a_rows, out_rows, c_rows,
                        has_scale, transpose_w, config: CvmmConfig = DEFAULT) -> TileConfig:
  """The autotuner's tile for :func:`units_store` (timed on a random SwitchHead routing
  of k // 2 heads of ``block`` experts each)."""
  shape = (n, k, e, block, i, o, a_rows, out_rows, c_rows or 0, int(has_scale),
           int(transpose_w))

  def bench(cfg):
    r, a, w, sc = head_bench_inputs(n, k, e, block, i, o, dtype, a_rows, has_scale,
                                     transpose_w)
    with jax.ensure_compile_time_eval():
      c = (jax.random.normal(jax.random.key(4), (n * c_rows, o), dtype) if c_rows
           else None)
    f = autotune.compile_now(
        lambda a, w, r, sc, c: units_store(a, w, r, sc, c, cfg, a_rows=a_rows,
                                           out_rows=out_rows, c_rows=c_rows or 1,
                                           transpose_w=transpose_w)[0],
        a, w, r, sc, c)
    return autotune.time_call(lambda: f(a, w, r, sc, c))

  return autotune.tuner().choose("triton_units", shape, dtype, units_candidates(o, dtype),
                                 bench_or_none(bench), config=config)


def units_store(a, w, routing: Routing, scale, dgate_rows, cfg: TileConfig, *,
                a_rows: int, out_rows: int, c_rows: int, transpose_w: bool):
  """out[orow(u)] = sum over the two pairs p of unit u of scale[p] * a[arow(p)] @ W_e(p)
  (and dgates[p] = the unscaled product . dgate_rows[crow(p)]), one launch of
  :func:`units_kernel` over the routing's unit tiles: each output row is written once,
  so there is no zeroing, no atomic and no 16-bit sum. Returns (out [N * out_rows, O] in
  a's dtype, dgates [P] float32 or None). See :func:`units_store_applies`."""
  n, k = routing.n_tokens, routing.k
  i, o, sw = w_layout(w.shape, transpose_w)
  dgate = dgate_rows is not None
  if not units_store_applies(routing, o, a_rows, out_rows, c_rows if dgate else None):
    raise ValueError(f"unit store: needs unit pairs, K // out_rows == 2 (K={k}, "
                     f"out_rows={out_rows}), an even K // c_rows with dgates (c_rows="
                     f"{c_rows}) and O <= {UNITS_MAX_COLS} (O={o})")
  if cfg.block_n < o:
    raise ValueError(f"{cfg}: the unit-store kernel needs block_n >= O={o}")
  tiles = routing.pairs.tiles(cfg.block_m)
  z = tiles.shape[1]
  out_shapes = [jax.ShapeDtypeStruct((n * out_rows, o), a.dtype),
                jax.ShapeDtypeStruct((n * k,) if dgate else (1,), jnp.float32)]
  args = [a, w, routing.pairs.lo, routing.pairs.hi, tiles,
          scale if scale is not None else dummy_f32(),
          dgate_rows if dgate else dummy_f32()]
  out, dg = launch(units_kernel, args, out_shapes, z, cfg,
                    Z=z, I=i, O=o, K=k, A_R=a_rows, O_R=out_rows, C_R=c_rows,
                    SW_E=sw[0], SW_I=sw[1], SW_O=sw[2], BM=cfg.block_m, BN=cfg.block_n,
                    BK=cfg.block_k, HAS_SCALE=scale is not None, DGATE=dgate,
                    IEEE=a.dtype == jnp.float32)
  return out, (dg if dgate else None)


