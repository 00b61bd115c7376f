"""The Gluon unit-pair kernel (Hopper): SwitchHead's sums over a token's heads, two
experts at a time.

A SwitchHead routing with unit pairs (:class:`kernels.routing.UnitPairs`) holds each
(token, head) as one unit of two pairs: the head's two experts, whose products add
into one output row. ``pairs_sum_kernel`` takes a tile of units of one combination of
two experts per program, multiplies it by both matrices and adds the two products in
registers before one reduction: half the reductions of a tile of pairs (O's forward at
MoEUT_244M, 65,536 tokens on an H200: 0.627 -> 0.501 ms).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels import autotune
from kernels.autotune import TileConfig
from kernels.config import DEFAULT, CvmmConfig
from kernels.cvmm_triton.gluon_common import (cp, fence_async_shared, gl, gluon,
                                              rows_sum_supported, warpgroup_mma,
                                              warpgroup_mma_wait)
from kernels.cvmm_triton.gluon_rows import gluon_tile
from kernels.cvmm_triton.launch import dummy_f32, hopper, install_gluon_launcher, launch
from kernels.cvmm_triton.primitives import w_layout
from kernels.cvmm_triton.scales import half_sums, sum_out_dtype
from kernels.cvmm_triton.tuning import bench_or_none, head_bench_inputs
from kernels.routing import Routing

if gluon is not None:
  from kernels.cvmm_triton.gluon_common import (RED_BF16, RED_F16, acc_layout, b_view,
                                                copy_block, epi_smem, gather_rows,
                                                output_rows, reduce_epi, rows_layout,
                                                rows_scale, unit_tile, w_smem)

  @gluon.jit
  def pairs_sum_kernel(
      a_ptr,        # [Ra, I] rows read by the pairs (16-bit)
      w_ptr,        # expert matrices: element (e, i, o) at e*SW_E + i*SW_I + o*SW_O
      lo_ptr,       # [U] int32 at each sorted position: the unit's pair of its lower expert
      hi_ptr,       # [U] int32 ... and its other pair
      tiles_ptr,    # [4, Z] int32 lower expert, higher expert, start, end of each tile
      scale_ptr,    # [P] float32 per-pair scale; unused if not HAS_SCALE
      out_ptr,      # [Ro, O] 16-bit sums (zeroed)
      Z: gl.constexpr, I: gl.constexpr, O: gl.constexpr, K: gl.constexpr,
      A_R: gl.constexpr, O_R: gl.constexpr,
      SW_E: gl.constexpr, SW_I: gl.constexpr, SW_O: gl.constexpr,
      BM: gl.constexpr, BN: gl.constexpr, BUF: gl.constexpr, NW: gl.constexpr,
      HAS_SCALE: gl.constexpr, F16: gl.constexpr):
    """The fused sum of units of two pairs (:class:`kernels.routing.UnitPairs`: a
    SwitchHead head's two experts), one tile of units of one expert combination per
    program. Both pairs of a unit add into one output row, so each column block is
    two products (one per expert) added in registers and reduced once: half the
    reductions of :func:`kernels.cvmm_triton.gluon_rows.rows_sum_kernel` on the same work.

    Per column block nb: wait for block nb - 1's products, combine and round them into
    ``epi``; then (one barrier) copy block nb + BUF - 1 of both matrices into the
    buffers block nb - 1 used, issue block nb's products, and reduce block nb - 1 from
    ``epi`` while they run. Two accumulators are in flight, none is carried."""
    n_nb: gl.constexpr = O // BN
    ASM: gl.constexpr = RED_F16 if F16 else RED_BF16
    dt: gl.constexpr = a_ptr.dtype.element_ty
    SAME_A: gl.constexpr = (K // A_R) % 2 == 0      # both pairs of a unit read one row
    acc_l: gl.constexpr = acc_layout(BN, NW)
    a_l: gl.constexpr = rows_layout(I, NW)
    red_l: gl.constexpr = rows_layout(BN, NW)
    a_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BM, I], dt)
    TRANS: gl.constexpr = SW_I == 1
    b_lo = w_smem(dt, BUF, I, BN, TRANS)
    b_hi = w_smem(dt, BUF, I, BN, TRANS)
    a_lo = gl.allocate_shared_memory(dt, [BM, I], a_sl)
    if SAME_A:
      a_hi = a_lo
    else:
      a_hi = gl.allocate_shared_memory(dt, [BM, I], a_sl)
    epi = epi_smem(out_ptr.dtype.element_ty, BM, BN)

    e_lo, e_hi, start, end = unit_tile(tiles_ptr, Z)
    if start < end:
      wl = w_ptr + e_lo.to(gl.int64) * SW_E
      wh = w_ptr + e_hi.to(gl.int64) * SW_E
      gather_rows(a_lo, a_ptr, lo_ptr, start, end, I, K, A_R, BM, a_l)
      if not SAME_A:
        gather_rows(a_hi, a_ptr, hi_ptr, start, end, I, K, A_R, BM, a_l)
      gl.static_assert(BUF >= 2, "BUF: at least 2 buffers per matrix")
      for j in gl.static_range(BUF - 1):
        copy_block(b_lo, wl, j, I, O, BN, SW_I, SW_O, TRANS, NW)
        copy_block(b_hi, wh, j, I, O, BN, SW_I, SW_O, TRANS, NW)
        cp.commit_group()
      # the reductions' rows (both pairs of a unit add into the lower pair's row)
      o_row, rmask_r = output_rows(lo_ptr, start, end, K, O_R, BM, red_l)
      s_lo = rows_scale(scale_ptr, lo_ptr, start, end, BM, acc_l, HAS_SCALE)
      s_hi = rows_scale(scale_ptr, hi_ptr, start, end, BM, acc_l, HAS_SCALE)
      zero = gl.zeros([BM, BN], gl.float32, layout=acc_l)

      cp.wait_group(BUF - 2)       # the rows and block 0
      fence_async_shared()
      gl.thread_barrier()
      copy_block(b_lo, wl, BUF - 1, I, O, BN, SW_I, SW_O, TRANS, NW)
      copy_block(b_hi, wh, BUF - 1, I, O, BN, SW_I, SW_O, TRANS, NW)
      cp.commit_group()
      c0 = warpgroup_mma(a_lo, b_view(b_lo, 0, BUF, TRANS), zero, use_acc=False,
                         is_async=True)
      c1 = warpgroup_mma(a_hi, b_view(b_hi, 0, BUF, TRANS), zero, use_acc=False,
                         is_async=True)
      for nb in range(1, n_nb):
        c0, c1 = warpgroup_mma_wait(num_outstanding=0, deps=(c0, c1))
        epi.store((c0 * s_lo[:, None] + c1 * s_hi[:, None]).to(epi.dtype))
        cp.wait_group(BUF - 2)     # block nb is in shared memory
        fence_async_shared()
        gl.thread_barrier()        # ... for every thread; block nb - 1's buffers are free
        copy_block(b_lo, wl, nb + BUF - 1, I, O, BN, SW_I, SW_O, TRANS, NW)
        copy_block(b_hi, wh, nb + BUF - 1, I, O, BN, SW_I, SW_O, TRANS, NW)
        cp.commit_group()
        c0 = warpgroup_mma(a_lo, b_view(b_lo, nb, BUF, TRANS), zero, use_acc=False,
                           is_async=True)
        c1 = warpgroup_mma(a_hi, b_view(b_hi, nb, BUF, TRANS), zero, use_acc=False,
                           is_async=True)
        reduce_epi(epi, nb - 1, o_row, rmask_r, out_ptr, O, BM, BN, red_l, ASM)
      c0, c1 = warpgroup_mma_wait(num_outstanding=0, deps=(c0, c1))
      epi.store((c0 * s_lo[:, None] + c1 * s_hi[:, None]).to(epi.dtype))
      reduce_epi(epi, n_nb - 1, o_row, rmask_r, out_ptr, O, BM, BN, red_l, ASM)


# Tiles of the unit-pair kernel (block_m, block_n, warps, buffers per matrix), in
# heuristic order: at MoEUT_244M on an H200 128x64 with 8 warps and 2 buffers (two blocks
# per SM) was the fastest for O's forward (0.520 ms against 0.540 for 64x64, 4 warps).
UNIT_PAIRS_TILES = ((128, 64, 8, 2), (64, 64, 4, 2), (128, 64, 8, 3), (128, 32, 8, 2))


def unit_pairs_config(routing: Routing, i: int, o: int, dtype, red: int, dgate: bool,
                      out_rows: int, *, a_rows: int = 1, has_scale: bool = True,
                      transpose_w: bool = False,
                      config: CvmmConfig = DEFAULT) -> TileConfig | None:
  """The tile of the unit-pair kernel (:func:`gluon_pairs_sum`) for a fused sum, or None
  where it does not apply: the routing carries no :class:`~kernels.routing.UnitPairs`,
  both pairs of a unit do not add into one output row, the sum is not a 16-bit one
  without dgates, the device is no Hopper GPU, or the shape is not one the Gluon
  kernels cover. The autotuner chooses among :data:`UNIT_PAIRS_TILES` (cached per
  shape)."""
  if routing.pairs is None or (routing.k // out_rows) % 2 or red != 8 or dgate:
    return None
  if not hopper():
    return None
  cands = [gluon_tile(t, i) for t in UNIT_PAIRS_TILES
           if rows_sum_supported(i, o, dtype, t[1])]
  if not cands:
    return None
  return choose_pairs_config(routing.n_tokens, routing.k, routing.n_experts,
                             routing.pairs.block, i, o, dtype, a_rows, out_rows, has_scale,
                             transpose_w, cands, config)


def choose_pairs_config(n, k, e, block, i, o, dtype, a_rows, out_rows, has_scale,
                        transpose_w, candidates, config: CvmmConfig = DEFAULT) -> TileConfig:
  """The autotuner's unit-pair tile for this shape (timed on a random SwitchHead
  routing of k // 2 heads of ``block`` experts each)."""
  shape = (n, k, e, block, i, o, a_rows, out_rows, int(has_scale), int(transpose_w))
  out_dtype = sum_out_dtype(half_sums(dtype, o, config.sum_dtype))

  def bench(cfg):
    r, a, w, sc = head_bench_inputs(n, k, e, block, i, o, dtype, a_rows, has_scale,
                                    transpose_w)
    f = autotune.compile_now(
        lambda a, w, r, sc: gluon_pairs_sum(a, w, r, sc, cfg, a_rows=a_rows,
                                            out_rows=out_rows, transpose_w=transpose_w,
                                            out_dtype=out_dtype),
        a, w, r, sc)
    return autotune.time_call(lambda: f(a, w, r, sc))

  return autotune.tuner().choose("gluon_pairs", shape, dtype, candidates,
                                 bench_or_none(bench), config=config)


def gluon_pairs_meta(w_shape, transpose_w: bool, cfg: TileConfig, *, z: int, k: int,
                     a_rows: int, out_rows: int, has_scale: bool, f16: bool) -> dict:
  """The unit-pair kernel's compile-time arguments (:func:`gluon_pairs_sum`, and
  :mod:`kernels.offline`)."""
  if (k // out_rows) % 2:
    raise ValueError(f"unit pairs: both pairs of a unit must add into one output row "
                     f"(K={k}, out_rows={out_rows})")
  if cfg.halves != 1:
    raise ValueError(f"{cfg}: the unit-pair kernel takes tiles of one part")
  i, o, sw = w_layout(w_shape, transpose_w)
  return dict(Z=z, I=i, O=o, K=k, A_R=a_rows, O_R=out_rows, SW_E=sw[0], SW_I=sw[1],
              SW_O=sw[2], BM=cfg.block_m, BN=cfg.block_n, BUF=cfg.num_stages,
              NW=cfg.num_warps, HAS_SCALE=has_scale, F16=f16)


def gluon_pairs_sum(a, w, routing: Routing, scale, cfg: TileConfig, *, a_rows: int,
                    out_rows: int, transpose_w: bool, out_dtype) -> jax.Array:
  """One launch of :func:`pairs_sum_kernel`: out [N * out_rows, O] (zeroed, then each
  tile of units adds its two experts' scaled products, combined, in ``out_dtype``:
  float16 or bf16), for :func:`kernels.cvmm_triton.rows.rows_matmul`."""
  install_gluon_launcher()
  pairs = routing.pairs
  n, k = routing.n_tokens, routing.k
  tiles = pairs.tiles(cfg.block_m)
  z = tiles.shape[1]
  meta = gluon_pairs_meta(w.shape, transpose_w, cfg, z=z, k=k, a_rows=a_rows,
                          out_rows=out_rows, has_scale=scale is not None,
                          f16=jnp.dtype(out_dtype) == jnp.float16)
  (out,) = launch(
      pairs_sum_kernel,
      [a, w, pairs.lo, pairs.hi, tiles, scale if scale is not None else dummy_f32()],
      [jax.ShapeDtypeStruct((n * out_rows, meta["O"]), out_dtype)], z, cfg, zeroed=(0,),
      **meta)
  return out
