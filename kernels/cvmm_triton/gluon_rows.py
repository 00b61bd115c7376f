"""The Gluon fused-sum row kernels (Hopper): a tile of pairs of one expert per program.

``rows_sum_kernel``: the tile's gathered rows times each column block of the expert's
matrix in turn (``BUF`` buffers of the matrix, at least 3), block nb + 1's product
issued before block nb's reductions (:mod:`kernels.cvmm_triton.gluon_common`).
``rows2_sum_kernel``: tiles of two halves that share each column block of the matrix
(copied once, multiplied by both halves in turn): the matrices' L2 traffic of
2 * BM-row tiles. Its tiles come first among the fused sums' candidates.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels import autotune
from kernels.autotune import TileConfig
from kernels.cvmm_triton.gluon_common import (cp, fence_async_shared, gl, gluon,
                                              rows_sum_supported, warpgroup_mma,
                                              warpgroup_mma_wait)
from kernels.cvmm_triton.launch import dummy_f32, install_gluon_launcher, launch
from kernels.cvmm_triton.primitives import w_layout
from kernels.routing import Routing

if gluon is not None:
  from kernels.cvmm_triton.gluon_common import (RED_BF16, RED_F16, acc_layout, b_view,
                                                copy_block, epi_smem, gather_rows,
                                                output_rows, reduce_block, rows_layout,
                                                rows_scale, w_smem)

  @gluon.jit
  def rows_sum_kernel(
      a_ptr,        # [Ra, I] rows read by the pairs (16-bit)
      w_ptr,        # expert matrices: element (e, i, o) at e*SW_E + i*SW_I + o*SW_O
      order_ptr,    # [P] int32 pair index at each sorted position
      tiles_ptr,    # [3, Z] int32 expert, start, end of each tile
      scale_ptr,    # [P] float32 per-pair scale; unused if not HAS_SCALE
      out_ptr,      # [Ro, O] 16-bit sums (zeroed)
      Z: gl.constexpr, I: gl.constexpr, O: gl.constexpr, K: gl.constexpr,
      A_R: gl.constexpr, O_R: gl.constexpr,
      SW_E: gl.constexpr, SW_I: gl.constexpr, SW_O: gl.constexpr,
      BM: gl.constexpr, BN: gl.constexpr, BUF: gl.constexpr, NW: gl.constexpr,
      HAS_SCALE: gl.constexpr, F16: gl.constexpr):
    """The fused sum of a tile of pairs of one expert (see the module docstring): the
    tile's gathered rows times each column block of the expert's matrix in turn, block
    nb + 1's product on the tensor cores while block nb is reduced."""
    n_nb: gl.constexpr = O // BN
    ASM: gl.constexpr = RED_F16 if F16 else RED_BF16
    dt: gl.constexpr = a_ptr.dtype.element_ty
    # layouts: the product's (wgmma: NW warps along the rows), the copies' (16 bytes per
    # thread along the contiguous dimension) and the reductions' (eight columns each)
    acc_l: gl.constexpr = acc_layout(BN, NW)
    a_l: gl.constexpr = rows_layout(I, NW)
    red_l: gl.constexpr = rows_layout(BN, NW)
    a_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BM, I], dt)
    TRANS: gl.constexpr = SW_I == 1         # the matrix is contiguous along I
    b_smem = w_smem(dt, BUF, I, BN, TRANS)
    a_smem = gl.allocate_shared_memory(dt, [BM, I], a_sl)
    epi = epi_smem(out_ptr.dtype.element_ty, BM, BN)

    tile = gl.program_id(0)
    e = gl.load(tiles_ptr + tile)
    start = gl.load(tiles_ptr + Z + tile)
    end = gl.load(tiles_ptr + 2 * Z + tile)
    if start < end:
      w_base = w_ptr + e.to(gl.int64) * SW_E
      # the tile's gathered rows -> shared memory (copy group 0, with column block 0)
      gather_rows(a_smem, a_ptr, order_ptr, start, end, I, K, A_R, BM, a_l)
      gl.static_assert(BUF >= 3, "BUF: at least 3 buffers (2 blocks in flight)")
      for j in gl.static_range(BUF - 1):
        copy_block(b_smem, w_base, j, I, O, BN, SW_I, SW_O, TRANS, NW)
        cp.commit_group()
      # the reductions' rows and validity; the scales in the product's layout
      o_row, rmask_r = output_rows(order_ptr, start, end, K, O_R, BM, red_l)
      s = rows_scale(scale_ptr, order_ptr, start, end, BM, acc_l, HAS_SCALE)
      zero = gl.zeros([BM, BN], gl.float32, layout=acc_l)

      # Block nb's product runs on the tensor cores while block nb - 1 is reduced.
      # Only finished products are carried from one iteration to the next: a product
      # in flight must not be copied (ptxas would then serialise the wgmma).
      cp.wait_group(BUF - 2)
      fence_async_shared()
      gl.thread_barrier()
      prev = warpgroup_mma(a_smem, b_view(b_smem, 0, BUF, TRANS), zero, use_acc=False,
                           is_async=True)
      prev = warpgroup_mma_wait(num_outstanding=0, deps=(prev,))
      for nb in range(1, n_nb):
        copy_block(b_smem, w_base, nb + BUF - 2, I, O, BN, SW_I, SW_O, TRANS, NW)
        cp.commit_group()
        cp.wait_group(BUF - 2)     # block nb is in shared memory
        fence_async_shared()
        gl.thread_barrier()        # ... for every thread; and block nb - 2's buffer is free
        cur = warpgroup_mma(a_smem, b_view(b_smem, nb, BUF, TRANS), zero,
                            use_acc=False, is_async=True)
        reduce_block(prev, nb - 1, o_row, rmask_r, s, out_ptr, O, BM, BN, red_l, ASM,
                      epi)
        prev = warpgroup_mma_wait(num_outstanding=0, deps=(cur,))
      reduce_block(prev, n_nb - 1, o_row, rmask_r, s, out_ptr, O, BM, BN, red_l, ASM,
                    epi)

  @gluon.jit
  def rows2_sum_kernel(
      a_ptr,        # [Ra, I] rows read by the pairs (16-bit)
      w_ptr,        # expert matrices: element (e, i, o) at e*SW_E + i*SW_I + o*SW_O
      order_ptr,    # [P] int32 pair index at each sorted position
      tiles_ptr,    # [3, Z] int32 expert, start, end of each tile of up to 2 * BM rows
      scale_ptr,    # [P] float32 per-pair scale; unused if not HAS_SCALE
      out_ptr,      # [Ro, O] 16-bit sums (zeroed)
      Z: gl.constexpr, I: gl.constexpr, O: gl.constexpr, K: gl.constexpr,
      A_R: gl.constexpr, O_R: gl.constexpr,
      SW_E: gl.constexpr, SW_I: gl.constexpr, SW_O: gl.constexpr,
      BM: gl.constexpr, BN: gl.constexpr, NW: gl.constexpr,
      HAS_SCALE: gl.constexpr, F16: gl.constexpr):
    """:func:`rows_sum_kernel` for tiles of 2 * BM rows taken as two halves of BM: each
    column block of the expert's matrix is copied once and multiplied by both halves,
    one after the other, so the matrices' traffic is that of 2 * BM-row tiles while only
    BM-row products are in registers (two buffers of the matrix: each block is used for
    two steps, long enough for the next one's copy).

    Steps (nb, h) for column block nb and half h; in each, the product of the step is
    issued to the tensor cores and the previous step's is reduced meanwhile. The next
    block is copied at (nb, 0), into the buffer block nb - 1 used."""
    n_nb: gl.constexpr = O // BN
    ASM: gl.constexpr = RED_F16 if F16 else RED_BF16
    dt: gl.constexpr = a_ptr.dtype.element_ty
    acc_l: gl.constexpr = acc_layout(BN, NW)
    a_l: gl.constexpr = rows_layout(I, NW)
    red_l: gl.constexpr = rows_layout(BN, NW)
    a_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BM, I], dt)
    TRANS: gl.constexpr = SW_I == 1
    b_smem = w_smem(dt, 2, I, BN, TRANS)
    a0 = gl.allocate_shared_memory(dt, [BM, I], a_sl)
    a1 = gl.allocate_shared_memory(dt, [BM, I], a_sl)
    epi = epi_smem(out_ptr.dtype.element_ty, BM, BN)

    tile = gl.program_id(0)
    e = gl.load(tiles_ptr + tile)
    start = gl.load(tiles_ptr + Z + tile)
    end = gl.load(tiles_ptr + 2 * Z + tile)
    if start < end:
      w_base = w_ptr + e.to(gl.int64) * SW_E
      mid = start + BM
      # both halves' gathered rows, with block 0
      gather_rows(a0, a_ptr, order_ptr, start, end, I, K, A_R, BM, a_l)
      gather_rows(a1, a_ptr, order_ptr, mid, end, I, K, A_R, BM, a_l)
      copy_block(b_smem, w_base, 0, I, O, BN, SW_I, SW_O, TRANS, NW)
      cp.commit_group()
      # each half's output rows, validity and scales
      o_row0, m0 = output_rows(order_ptr, start, end, K, O_R, BM, red_l)
      o_row1, m1 = output_rows(order_ptr, mid, end, K, O_R, BM, red_l)
      s0 = rows_scale(scale_ptr, order_ptr, start, end, BM, acc_l, HAS_SCALE)
      s1 = rows_scale(scale_ptr, order_ptr, mid, end, BM, acc_l, HAS_SCALE)
      zero = gl.zeros([BM, BN], gl.float32, layout=acc_l)

      cp.wait_group(0)                 # the rows and block 0
      fence_async_shared()
      gl.thread_barrier()
      copy_block(b_smem, w_base, 1, I, O, BN, SW_I, SW_O, TRANS, NW)
      cp.commit_group()
      cur = warpgroup_mma(a0, b_view(b_smem, 0, 2, TRANS), zero, use_acc=False,
                          is_async=True)
      prev = warpgroup_mma_wait(num_outstanding=0, deps=(cur,))          # (0, 0)
      cur = warpgroup_mma(a1, b_view(b_smem, 0, 2, TRANS), zero, use_acc=False,
                          is_async=True)
      reduce_block(prev, 0, o_row0, m0, s0, out_ptr, O, BM, BN, red_l, ASM, epi)
      prev = warpgroup_mma_wait(num_outstanding=0, deps=(cur,))          # (0, 1)
      for nb in range(1, n_nb):
        cp.wait_group(0)               # block nb is in shared memory
        fence_async_shared()
        gl.thread_barrier()            # ... for every thread; block nb - 1's buffer is free
        copy_block(b_smem, w_base, nb + 1, I, O, BN, SW_I, SW_O, TRANS, NW)
        cp.commit_group()
        cur = warpgroup_mma(a0, b_view(b_smem, nb, 2, TRANS), zero, use_acc=False,
                            is_async=True)
        reduce_block(prev, nb - 1, o_row1, m1, s1, out_ptr, O, BM, BN, red_l, ASM, epi)
        prev = warpgroup_mma_wait(num_outstanding=0, deps=(cur,))        # (nb, 0)
        cur = warpgroup_mma(a1, b_view(b_smem, nb, 2, TRANS), zero, use_acc=False,
                            is_async=True)
        reduce_block(prev, nb, o_row0, m0, s0, out_ptr, O, BM, BN, red_l, ASM, epi)
        prev = warpgroup_mma_wait(num_outstanding=0, deps=(cur,))        # (nb, 1)
      reduce_block(prev, n_nb - 1, o_row1, m1, s1, out_ptr, O, BM, BN, red_l, ASM, epi)


# Gluon row-kernel tiles (block_m, block_n, warps, buffers), in heuristic order: at
# MoEUT_244M on an H200, 128x64 with 8 warps and 4 buffers was the fastest of all tiles,
# Triton's included, for down, O and up's dx (O 0.652 against 0.717 ms).
GLUON_ROWS_TILES = ((128, 64, 8, 4), (128, 64, 4, 4), (128, 64, 4, 3), (128, 64, 8, 3),
                    (64, 64, 4, 3), (256, 64, 8, 3), (128, 128, 8, 3))
# The two-half kernel's tiles (BM of a half, BN, warps), first among the candidates: at
# MoEUT_244M on an H200, 128x64 took the down projection from 1.336 to 1.181 ms.
GLUON_ROWS2_TILES = ((128, 64, 8), (128, 32, 8))


def gluon_tile(tile, i: int) -> TileConfig:
  """The TileConfig of a Gluon kernel's tile (block_m, block_n, warps, buffers[,
  halves]) for a contraction of ``i``: the whole of it in one block, every column
  block in turn."""
  bm, bn, w, b = tile[:4]
  return TileConfig(bm, bn, max(16, autotune.next_pow2(i)), w, b, loop_n=True, gluon=True,
                    halves=tile[4] if len(tile) > 4 else 1)


def gluon_rows_candidates(i: int) -> list[TileConfig]:
  """The Gluon row kernels' tiles for a contraction of ``i``: the two-half kernel's,
  then the row kernel's."""
  return ([gluon_tile((bm, bn, w, 2, 2), i) for bm, bn, w in GLUON_ROWS2_TILES]
          + [gluon_tile(t, i) for t in GLUON_ROWS_TILES])


def gluon_rows_ok(i: int, o: int, dtype, red: int, dgate: bool):
  """cfg -> whether a Gluon row kernel can run this call: a fused 16-bit sum (8-wide
  reductions: sm90, not the interpreter), no dgates, and the shapes
  :func:`~kernels.cvmm_triton.gluon_common.rows_sum_supported` names. (The device, a
  Hopper GPU, is :func:`kernels.cvmm_triton.launch.hopper`.)"""
  def ok(cfg: TileConfig) -> bool:
    if red != 8 or dgate:
      return False
    if cfg.halves == 1 and cfg.num_stages < 3:     # the row kernel: 3 buffers at least
      return False
    return rows_sum_supported(i, o, dtype, cfg.block_n)
  return ok


def gluon_rows_meta(w_shape, transpose_w: bool, cfg: TileConfig, *, z: int, k: int,
                    a_rows: int, out_rows: int, has_scale: bool, f16: bool) -> dict:
  """The Gluon row kernels' compile-time arguments for expert matrices of ``w_shape``
  (:func:`~kernels.cvmm_triton.primitives.w_layout`), ``z`` tiles and the tile ``cfg``
  (:func:`gluon_rows_sum`, and :mod:`kernels.offline` compiling it without a GPU). With
  ``cfg.halves`` 2 the two-half kernel's (``cfg.block_m`` the height of a half)."""
  i, o, sw = w_layout(w_shape, transpose_w)
  meta = dict(Z=z, I=i, O=o, K=k, A_R=a_rows, O_R=out_rows, SW_E=sw[0], SW_I=sw[1],
              SW_O=sw[2], BM=cfg.block_m, BN=cfg.block_n, NW=cfg.num_warps,
              HAS_SCALE=has_scale, F16=f16)
  return meta if cfg.halves > 1 else dict(meta, BUF=cfg.num_stages)


def gluon_rows_sum(a, w, routing: Routing, tiles, scale, cfg: TileConfig, *, a_rows: int,
                   out_rows: int, transpose_w: bool, out_dtype) -> jax.Array:
  """One launch of a Gluon fused-sum row kernel: the row kernel, or with ``cfg.halves``
  2 the two-half kernel (``tiles`` of 2 * block_m rows). out [N * out_rows, O] (zeroed,
  then every tile's scaled rows added in ``out_dtype``, float16 or bf16), for
  :func:`kernels.cvmm_triton.rows.rows_matmul` (which scales float16 sums back)."""
  install_gluon_launcher()
  n, k = routing.n_tokens, routing.k
  z = tiles.shape[1]
  meta = gluon_rows_meta(w.shape, transpose_w, cfg, z=z, k=k, a_rows=a_rows,
                         out_rows=out_rows, has_scale=scale is not None,
                         f16=jnp.dtype(out_dtype) == jnp.float16)
  kernel = rows2_sum_kernel if cfg.halves == 2 else rows_sum_kernel
  (out,) = launch(
      kernel, [a, w, routing.order, tiles, scale if scale is not None else dummy_f32()],
      [jax.ShapeDtypeStruct((n * out_rows, meta["O"]), out_dtype)], z, cfg, zeroed=(0,),
      **meta)
  return out
