"""The fused-sum row kernels written in Gluon (Triton's explicit-layout dialect), sm90.

The Triton row kernel (:func:`kernels.cvmm_triton._rows_kernel`, ``loop_n``) of the
projections whose output rows are summed over experts (σ-MoE down, SwitchHead O, and
the dx of σ-MoE up and SwitchHead V) keeps a tile's gathered rows in registers and,
for each block of output columns, multiplies and then adds the block into the output
with vector reductions. Its warps either multiply or reduce: the tensor cores wait
while the block's reductions are issued.

This kernel does the same work with the order made explicit:
- the tile's gathered rows go to shared memory once (``cp.async``);
- the expert's matrix streams through ``BUF`` shared buffers, one column block each;
- block n+1's product is issued to the tensor cores (asynchronous ``wgmma``) before
  block n's reductions, so that the two overlap within one program;
- each product block is scaled and rounded to 16 bits where the tensor cores leave it,
  and goes through a shared buffer of its own (``stmatrix``, 16-byte loads, rows
  swizzled) to the reductions' layout of eight adjacent columns per thread.

The last step is what made it faster than the Triton kernel (bench/RESULTS.md, eleventh
session). Before it, the float32 product went through the small scratch buffer of a
layout change, in four rounds of two barriers each: at MoEUT_244M on an H200 the
kernel ran as fast as Triton's (ninth session). Rounding first halves the shared
memory traffic and needs one round: the down projection's kernel went from 1.219 to
1.126 ms (0.945 to 0.807 ms without its reductions), the whole O projection from 0.717
ms (Triton) to 0.652. Its tiles are the fused 16-bit sums' first candidates on sm90
(CVMM_GLUON=0 leaves them out).

A second kernel, :func:`_pairs_sum_kernel`, does the same for SwitchHead's units of two
pairs (:class:`kernels.routing.UnitPairs`; by default on routings of 2^18 units or
more): each tile holds units of one combination of two experts, is multiplied by both
matrices, and the two products are added in registers before one reduction (O's
forward at MoEUT_244M, 65,536 tokens: 0.627 -> 0.501 ms).

A third, :func:`_rows2_sum_kernel`, is the row kernel for tiles of two halves that
share each column block of the expert's matrix; its tiles come first among the fused
sums' candidates (the down projection at MoEUT_244M: 1.336 -> 1.181 ms).

The kernels are written in Gluon, which jax-triton cannot compile itself:
:func:`install_launcher` lets ``jax_triton.triton_call`` launch Gluon kernels by
compiling them with Triton's own pipeline and handing the PTX to jax-triton's launch
layer. Only on Hopper (sm90: its wgmma instructions); 16-bit inputs and 16-bit sums.
"""
from __future__ import annotations

import os
import tempfile

try:
  import triton
  from triton.experimental import gluon
  from triton.experimental.gluon import language as gl
  from triton.experimental.gluon.language.nvidia.hopper import (async_copy as cp,
                                                                fence_async_shared,
                                                                warpgroup_mma,
                                                                warpgroup_mma_wait)
except ImportError:  # no Triton (CPU-only installs), or a Triton without Gluon
  triton = gluon = None

__all__ = ["available", "install_launcher", "rows_sum_supported"]


def available() -> bool:
  return gluon is not None


def rows_sum_supported(i: int, o: int, dtype, block_n: int) -> bool:
  """Shapes the Gluon kernel covers: the whole contraction in one block (I a power of
  two in [16, 256]), whole column blocks and 16-byte reductions (O % block_n == 0),
  16-bit inputs."""
  import jax.numpy as jnp  # noqa: PLC0415
  return (available() and jnp.dtype(dtype).itemsize == 2 and 16 <= i <= 256
          and i & (i - 1) == 0 and o % block_n == 0 and block_n % 8 == 0)


if gluon is not None:
  from kernels.autotune import next_pow2
  from kernels.cvmm_triton import _red_half_v8_asm

  _RED_F16 = gl.constexpr(_red_half_v8_asm("f16x2"))
  _RED_BF16 = gl.constexpr(_red_half_v8_asm("bf16x2"))
  _ST_F16 = gl.constexpr(_red_half_v8_asm("f16x2").replace(      # PROBE 2: plain stores
      "red.global.gpu.relaxed.add.noftz.v4.f16x2", "st.global.v4.b32"))

  @gluon.jit
  def _red_v8(out_ptr, offs, v, mask, ASM: gl.constexpr, BM: gl.constexpr,
              BN: gl.constexpr):
    """Adds the [BM, BN] 16-bit values v to out_ptr + offs, eight adjacent columns per
    reduction; v's layout holds eight adjacent columns per thread."""
    x = gl.reshape(v, [BM, BN // 8, 2, 2, 2])      # column = 8 j + 4 b2 + 2 b1 + b0
    e0, e1 = gl.split(x)                           # b0
    e00, e01 = gl.split(e0)                        # b1
    e10, e11 = gl.split(e1)
    c0, c4 = gl.split(e00)                         # b2
    c2, c6 = gl.split(e01)
    c1, c5 = gl.split(e10)
    c3, c7 = gl.split(e11)
    p0 = (out_ptr + _first8(offs, BM, BN)).to(gl.int64)
    m0 = _first8(mask.to(gl.int32), BM, BN)
    gl.inline_asm_elementwise(
        ASM, "=r,l,h,h,h,h,h,h,h,h,r", [p0, c0, c1, c2, c3, c4, c5, c6, c7, m0],
        dtype=gl.int32, is_pure=False, pack=1)

  @gluon.jit
  def _unit_tile(tiles_ptr, Z: gl.constexpr):
    """This program's unit-pair tile: (lower expert, higher expert, start, end) from the
    [4, Z] tile list."""
    tile = gl.program_id(0)
    return (gl.load(tiles_ptr + tile), gl.load(tiles_ptr + Z + tile),
            gl.load(tiles_ptr + 2 * Z + tile), gl.load(tiles_ptr + 3 * Z + tile))

  @gluon.jit
  def _first8(t, BM: gl.constexpr, BN: gl.constexpr):
    """[BM, BN // 8]: the first of every eight adjacent columns of t."""
    x = gl.reshape(t, [BM, BN // 8, 2, 2, 2])
    a, _b = gl.split(x)
    a, _b = gl.split(a)
    a, _b = gl.split(a)
    return a

  @gluon.jit
  def _rows_sum_kernel(
      a_ptr,        # [Ra, I] rows read by the pairs (16-bit)
      w_ptr,        # expert matrices: element (e, i, o) at e*SW_E + i*SW_I + o*SW_O
      order_ptr,    # [P] int32 pair index at each sorted position
      tiles_ptr,    # [3, Z] int32 expert, start, end of each tile
      scale_ptr,    # [P] float32 per-pair scale; unused if not HAS_SCALE
      rs_ptr,       # [Ro] float32 inverse row scales of float16 sums; unused if not FIN
      out_ptr,      # [Ro, O] 16-bit sums (zeroed)
      cnt_ptr,      # [ceil(Ro / FG)] int32 arrivals per group of rows (zeroed); if FIN
      Z: gl.constexpr, I: gl.constexpr, O: gl.constexpr, K: gl.constexpr,
      A_R: gl.constexpr, O_R: gl.constexpr,
      SW_E: gl.constexpr, SW_I: gl.constexpr, SW_O: gl.constexpr,
      BM: gl.constexpr, BN: gl.constexpr, BUF: gl.constexpr, NW: gl.constexpr,
      HAS_SCALE: gl.constexpr, F16: gl.constexpr, FIN: gl.constexpr = False,
      FG: gl.constexpr = 32, RO: gl.constexpr = 0, FIN_BF16: gl.constexpr = False,
      PROBE: gl.constexpr = 0):
    # PROBE (bench/gluon_rows_probe.py only; 0 in use): 1 issues the reductions with a
    # false predicate (no memory traffic), 2 stores instead of adding, 3 skips the
    # products (adds zeros), 4 skips the matrix's copies (the products read whatever
    # the buffers hold), 5 is 4 and 1 together (gathers, products, layout changes).
    n_nb: gl.constexpr = O // BN
    if PROBE == 2:
      ASM: gl.constexpr = _ST_F16
    else:
      ASM: gl.constexpr = _RED_F16 if F16 else _RED_BF16
    dt: gl.constexpr = a_ptr.dtype.element_ty
    # layouts: the product's (wgmma: NW warps along the rows), the copies' (16 bytes per
    # thread along the contiguous dimension) and the reductions' (eight columns each)
    acc_l: gl.constexpr = _acc_layout(BN, NW)
    a_l: gl.constexpr = _rows_layout(I, NW)
    red_l: gl.constexpr = _rows_layout(BN, NW)
    a_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BM, I], dt)
    TRANS: gl.constexpr = SW_I == 1         # the matrix is contiguous along I
    b_smem = _w_smem(dt, BUF, I, BN, TRANS)
    a_smem = gl.allocate_shared_memory(dt, [BM, I], a_sl)
    epi = _epi_smem(out_ptr.dtype.element_ty, BM, BN)

    tile = gl.program_id(0)
    e = gl.load(tiles_ptr + tile)
    start = gl.load(tiles_ptr + Z + tile)
    end = gl.load(tiles_ptr + 2 * Z + tile)
    if start < end:
      w_base = w_ptr + e.to(gl.int64) * SW_E
      # the tile's gathered rows -> shared memory (copy group 0, with column block 0)
      _gather_rows(a_smem, a_ptr, order_ptr, start, end, I, K, A_R, BM, a_l)
      gl.static_assert(BUF >= 3, "BUF: at least 3 buffers (2 blocks in flight)")
      for j in gl.static_range(BUF - 1):
        if PROBE != 4 and PROBE != 5:
          _copy_block(b_smem, w_base, j, I, O, BN, SW_I, SW_O, TRANS, NW)
        cp.commit_group()
      # the reductions' rows and validity; the scales in the product's layout
      o_row, rmask_r = _out_rows(order_ptr, start, end, K, O_R, BM, red_l)
      s = _rows_scale(scale_ptr, order_ptr, start, end, BM, acc_l, HAS_SCALE)
      zero = gl.zeros([BM, BN], gl.float32, layout=acc_l)

      # Block nb's product runs on the tensor cores while block nb - 1 is reduced.
      # Only finished products are carried from one iteration to the next: a product
      # in flight must not be copied (ptxas would then serialise the wgmma).
      cp.wait_group(BUF - 2)
      fence_async_shared()
      gl.thread_barrier()
      if PROBE == 3:
        prev = zero
      else:
        prev = warpgroup_mma(a_smem, _b_view(b_smem, 0, BUF, TRANS), zero, use_acc=False,
                             is_async=True)
        prev = warpgroup_mma_wait(num_outstanding=0, deps=(prev,))
      if PROBE == 1 or PROBE == 5:
        rmask_r = rmask_r & (o_row < 0)      # (never: every row is >= 0)
      for nb in range(1, n_nb):
        if PROBE != 4 and PROBE != 5:
          _copy_block(b_smem, w_base, nb + BUF - 2, I, O, BN, SW_I, SW_O, TRANS, NW)
        cp.commit_group()
        cp.wait_group(BUF - 2)     # block nb is in shared memory
        fence_async_shared()
        gl.thread_barrier()        # ... for every thread; and block nb - 2's buffer is free
        if PROBE == 3:
          _reduce_block(prev, nb - 1, o_row, rmask_r, s, out_ptr, O, BM, BN, red_l, ASM,
                        epi)
        else:
          cur = warpgroup_mma(a_smem, _b_view(b_smem, nb, BUF, TRANS), zero,
                              use_acc=False, is_async=True)
          _reduce_block(prev, nb - 1, o_row, rmask_r, s, out_ptr, O, BM, BN, red_l, ASM,
                        epi)
          prev = warpgroup_mma_wait(num_outstanding=0, deps=(cur,))
      _reduce_block(prev, n_nb - 1, o_row, rmask_r, s, out_ptr, O, BM, BN, red_l, ASM,
                    epi)
      if FIN:
        _finish(out_ptr, rs_ptr, cnt_ptr, order_ptr, start, end, BM, K, O_R, K // O_R, O,
                RO, FG, FIN_BF16, NW)

  @gluon.jit
  def _pairs_sum_kernel(
      a_ptr,        # [Ra, I] rows read by the pairs (16-bit)
      w_ptr,        # expert matrices: element (e, i, o) at e*SW_E + i*SW_I + o*SW_O
      lo_ptr,       # [U] int32 at each sorted position: the unit's pair of its lower expert
      hi_ptr,       # [U] int32 ... and its other pair
      tiles_ptr,    # [4, Z] int32 lower expert, higher expert, start, end of each tile
      scale_ptr,    # [P] float32 per-pair scale; unused if not HAS_SCALE
      rs_ptr,       # [Ro] float32 inverse row scales of float16 sums; unused if not FIN
      out_ptr,      # [Ro, O] 16-bit sums (zeroed)
      cnt_ptr,      # [ceil(Ro / FG)] int32 arrivals per group of rows (zeroed); if FIN
      Z: gl.constexpr, I: gl.constexpr, O: gl.constexpr, K: gl.constexpr,
      A_R: gl.constexpr, O_R: gl.constexpr,
      SW_E: gl.constexpr, SW_I: gl.constexpr, SW_O: gl.constexpr,
      BM: gl.constexpr, BN: gl.constexpr, BUF: gl.constexpr, NW: gl.constexpr,
      HAS_SCALE: gl.constexpr, F16: gl.constexpr, FIN: gl.constexpr = False,
      FG: gl.constexpr = 32, RO: gl.constexpr = 0, FIN_BF16: gl.constexpr = False):
    """The fused sum of units of two pairs (:class:`kernels.routing.UnitPairs`: a
    SwitchHead head's two experts), one tile of units of one expert combination per
    program. Both pairs of a unit add into one output row, so each column block is
    two products (one per expert) added in registers and reduced once: half the
    reductions of :func:`_rows_sum_kernel` on the same work.

    Per column block nb: wait for block nb - 1's products, combine and round them into
    ``epi``; then (one barrier) copy block nb + BUF - 1 of both matrices into the
    buffers block nb - 1 used, issue block nb's products, and reduce block nb - 1 from
    ``epi`` while they run. Two accumulators are in flight, none is carried."""
    n_nb: gl.constexpr = O // BN
    ASM: gl.constexpr = _RED_F16 if F16 else _RED_BF16
    dt: gl.constexpr = a_ptr.dtype.element_ty
    SAME_A: gl.constexpr = (K // A_R) % 2 == 0      # both pairs of a unit read one row
    acc_l: gl.constexpr = _acc_layout(BN, NW)
    a_l: gl.constexpr = _rows_layout(I, NW)
    red_l: gl.constexpr = _rows_layout(BN, NW)
    a_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BM, I], dt)
    TRANS: gl.constexpr = SW_I == 1
    b_lo = _w_smem(dt, BUF, I, BN, TRANS)
    b_hi = _w_smem(dt, BUF, I, BN, TRANS)
    a_lo = gl.allocate_shared_memory(dt, [BM, I], a_sl)
    if SAME_A:
      a_hi = a_lo
    else:
      a_hi = gl.allocate_shared_memory(dt, [BM, I], a_sl)
    epi = _epi_smem(out_ptr.dtype.element_ty, BM, BN)

    e_lo, e_hi, start, end = _unit_tile(tiles_ptr, Z)
    if start < end:
      wl = w_ptr + e_lo.to(gl.int64) * SW_E
      wh = w_ptr + e_hi.to(gl.int64) * SW_E
      _gather_rows(a_lo, a_ptr, lo_ptr, start, end, I, K, A_R, BM, a_l)
      if not SAME_A:
        _gather_rows(a_hi, a_ptr, hi_ptr, start, end, I, K, A_R, BM, a_l)
      gl.static_assert(BUF >= 2, "BUF: at least 2 buffers per matrix")
      for j in gl.static_range(BUF - 1):
        _copy_block(b_lo, wl, j, I, O, BN, SW_I, SW_O, TRANS, NW)
        _copy_block(b_hi, wh, j, I, O, BN, SW_I, SW_O, TRANS, NW)
        cp.commit_group()
      # the reductions' rows (both pairs of a unit add into the lower pair's row)
      o_row, rmask_r = _out_rows(lo_ptr, start, end, K, O_R, BM, red_l)
      s_lo = _rows_scale(scale_ptr, lo_ptr, start, end, BM, acc_l, HAS_SCALE)
      s_hi = _rows_scale(scale_ptr, hi_ptr, start, end, BM, acc_l, HAS_SCALE)
      zero = gl.zeros([BM, BN], gl.float32, layout=acc_l)

      cp.wait_group(BUF - 2)       # the rows and block 0
      fence_async_shared()
      gl.thread_barrier()
      _copy_block(b_lo, wl, BUF - 1, I, O, BN, SW_I, SW_O, TRANS, NW)
      _copy_block(b_hi, wh, BUF - 1, I, O, BN, SW_I, SW_O, TRANS, NW)
      cp.commit_group()
      c0 = warpgroup_mma(a_lo, _b_view(b_lo, 0, BUF, TRANS), zero, use_acc=False,
                         is_async=True)
      c1 = warpgroup_mma(a_hi, _b_view(b_hi, 0, BUF, TRANS), zero, use_acc=False,
                         is_async=True)
      for nb in range(1, n_nb):
        c0, c1 = warpgroup_mma_wait(num_outstanding=0, deps=(c0, c1))
        epi.store((c0 * s_lo[:, None] + c1 * s_hi[:, None]).to(epi.dtype))
        cp.wait_group(BUF - 2)     # block nb is in shared memory
        fence_async_shared()
        gl.thread_barrier()        # ... for every thread; block nb - 1's buffers are free
        _copy_block(b_lo, wl, nb + BUF - 1, I, O, BN, SW_I, SW_O, TRANS, NW)
        _copy_block(b_hi, wh, nb + BUF - 1, I, O, BN, SW_I, SW_O, TRANS, NW)
        cp.commit_group()
        c0 = warpgroup_mma(a_lo, _b_view(b_lo, nb, BUF, TRANS), zero, use_acc=False,
                           is_async=True)
        c1 = warpgroup_mma(a_hi, _b_view(b_hi, nb, BUF, TRANS), zero, use_acc=False,
                           is_async=True)
        _reduce_epi(epi, nb - 1, o_row, rmask_r, out_ptr, O, BM, BN, red_l, ASM)
      c0, c1 = warpgroup_mma_wait(num_outstanding=0, deps=(c0, c1))
      epi.store((c0 * s_lo[:, None] + c1 * s_hi[:, None]).to(epi.dtype))
      _reduce_epi(epi, n_nb - 1, o_row, rmask_r, out_ptr, O, BM, BN, red_l, ASM)
      if FIN:     # a unit is one arrival
        _finish(out_ptr, rs_ptr, cnt_ptr, lo_ptr, start, end, BM, K, O_R, K // O_R // 2,
                O, RO, FG, FIN_BF16, NW)

  @gluon.jit
  def _pairs2_sum_kernel(
      a_ptr,        # [Ra, I] rows read by the pairs (16-bit)
      w_ptr,        # expert matrices: element (e, i, o) at e*SW_E + i*SW_I + o*SW_O
      lo_ptr,       # [U] int32 at each sorted position: the unit's pair of its lower expert
      hi_ptr,       # [U] int32 ... and its other pair
      tiles_ptr,    # [4, Z] int32 lower expert, higher expert, start, end (2 * BM units)
      scale_ptr,    # [P] float32 per-pair scale; unused if not HAS_SCALE
      rs_ptr,       # unused (no finishing)
      out_ptr,      # [Ro, O] 16-bit sums (zeroed)
      cnt_ptr,      # unused
      Z: gl.constexpr, I: gl.constexpr, O: gl.constexpr, K: gl.constexpr,
      A_R: gl.constexpr, O_R: gl.constexpr,
      SW_E: gl.constexpr, SW_I: gl.constexpr, SW_O: gl.constexpr,
      BM: gl.constexpr, BN: gl.constexpr, BUF: gl.constexpr, NW: gl.constexpr,
      HAS_SCALE: gl.constexpr, F16: gl.constexpr):
    """:func:`_pairs_sum_kernel` for tiles of 2 * BM units taken as two halves of BM
    that share each column block of both experts' matrices (copied once, multiplied by
    both halves in turn): the matrices' L2 traffic of 2 * BM-unit tiles, which at
    SwitchHead's shapes is most of the kernel's traffic (O at MoEUT_244M: about 1 GB of
    matrix blocks against 0.5 GiB of reductions with BM = 128). Two buffers per matrix
    (BUF 2); no finishing.

    Steps (nb, h); in each, the previous step's two products are combined into
    ``epi``, the step's two products are issued, and the previous step's block is
    reduced from ``epi`` meanwhile. Block nb + 1 is copied at (nb, 0), into the
    buffers block nb - 1 used."""
    gl.static_assert(BUF == 2, "BUF: the two-half unit-pair kernel takes 2 buffers")
    n_nb: gl.constexpr = O // BN
    ASM: gl.constexpr = _RED_F16 if F16 else _RED_BF16
    dt: gl.constexpr = a_ptr.dtype.element_ty
    SAME_A: gl.constexpr = (K // A_R) % 2 == 0      # both pairs of a unit read one row
    acc_l: gl.constexpr = _acc_layout(BN, NW)
    a_l: gl.constexpr = _rows_layout(I, NW)
    red_l: gl.constexpr = _rows_layout(BN, NW)
    a_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BM, I], dt)
    TRANS: gl.constexpr = SW_I == 1
    b_lo = _w_smem(dt, 2, I, BN, TRANS)
    b_hi = _w_smem(dt, 2, I, BN, TRANS)
    lo0 = gl.allocate_shared_memory(dt, [BM, I], a_sl)
    lo1 = gl.allocate_shared_memory(dt, [BM, I], a_sl)
    if SAME_A:
      hi0 = lo0
      hi1 = lo1
    else:
      hi0 = gl.allocate_shared_memory(dt, [BM, I], a_sl)
      hi1 = gl.allocate_shared_memory(dt, [BM, I], a_sl)
    epi = _epi_smem(out_ptr.dtype.element_ty, BM, BN)

    e_lo, e_hi, start, end = _unit_tile(tiles_ptr, Z)
    if start < end:
      wl = w_ptr + e_lo.to(gl.int64) * SW_E
      wh = w_ptr + e_hi.to(gl.int64) * SW_E
      mid = start + BM
      _gather_rows(lo0, a_ptr, lo_ptr, start, end, I, K, A_R, BM, a_l)
      _gather_rows(lo1, a_ptr, lo_ptr, mid, end, I, K, A_R, BM, a_l)
      if not SAME_A:
        _gather_rows(hi0, a_ptr, hi_ptr, start, end, I, K, A_R, BM, a_l)
        _gather_rows(hi1, a_ptr, hi_ptr, mid, end, I, K, A_R, BM, a_l)
      _copy_block(b_lo, wl, 0, I, O, BN, SW_I, SW_O, TRANS, NW)
      _copy_block(b_hi, wh, 0, I, O, BN, SW_I, SW_O, TRANS, NW)
      cp.commit_group()
      # each half's reduction rows (both pairs of a unit add into the lower pair's row)
      o_row0, m0 = _out_rows(lo_ptr, start, end, K, O_R, BM, red_l)
      o_row1, m1 = _out_rows(lo_ptr, mid, end, K, O_R, BM, red_l)
      sl0 = _rows_scale(scale_ptr, lo_ptr, start, end, BM, acc_l, HAS_SCALE)
      sh0 = _rows_scale(scale_ptr, hi_ptr, start, end, BM, acc_l, HAS_SCALE)
      sl1 = _rows_scale(scale_ptr, lo_ptr, mid, end, BM, acc_l, HAS_SCALE)
      sh1 = _rows_scale(scale_ptr, hi_ptr, mid, end, BM, acc_l, HAS_SCALE)
      zero = gl.zeros([BM, BN], gl.float32, layout=acc_l)

      cp.wait_group(0)                 # the rows and block 0
      fence_async_shared()
      gl.thread_barrier()
      _copy_block(b_lo, wl, 1, I, O, BN, SW_I, SW_O, TRANS, NW)
      _copy_block(b_hi, wh, 1, I, O, BN, SW_I, SW_O, TRANS, NW)
      cp.commit_group()
      c0 = warpgroup_mma(lo0, _b_view(b_lo, 0, 2, TRANS), zero, use_acc=False,
                         is_async=True)
      c1 = warpgroup_mma(hi0, _b_view(b_hi, 0, 2, TRANS), zero, use_acc=False,
                         is_async=True)                                    # (0, 0)
      c0, c1 = warpgroup_mma_wait(num_outstanding=0, deps=(c0, c1))
      epi.store((c0 * sl0[:, None] + c1 * sh0[:, None]).to(epi.dtype))
      c0 = warpgroup_mma(lo1, _b_view(b_lo, 0, 2, TRANS), zero, use_acc=False,
                         is_async=True)
      c1 = warpgroup_mma(hi1, _b_view(b_hi, 0, 2, TRANS), zero, use_acc=False,
                         is_async=True)                                    # (0, 1)
      _reduce_epi(epi, 0, o_row0, m0, out_ptr, O, BM, BN, red_l, ASM)
      for nb in range(1, n_nb):
        c0, c1 = warpgroup_mma_wait(num_outstanding=0, deps=(c0, c1))     # (nb - 1, 1)
        epi.store((c0 * sl1[:, None] + c1 * sh1[:, None]).to(epi.dtype))
        cp.wait_group(0)               # block nb is in shared memory
        fence_async_shared()
        gl.thread_barrier()            # ... for every thread; block nb - 1's buffers free
        _copy_block(b_lo, wl, nb + 1, I, O, BN, SW_I, SW_O, TRANS, NW)
        _copy_block(b_hi, wh, nb + 1, I, O, BN, SW_I, SW_O, TRANS, NW)
        cp.commit_group()
        c0 = warpgroup_mma(lo0, _b_view(b_lo, nb, 2, TRANS), zero, use_acc=False,
                           is_async=True)
        c1 = warpgroup_mma(hi0, _b_view(b_hi, nb, 2, TRANS), zero, use_acc=False,
                           is_async=True)                                  # (nb, 0)
        _reduce_epi(epi, nb - 1, o_row1, m1, out_ptr, O, BM, BN, red_l, ASM)
        c0, c1 = warpgroup_mma_wait(num_outstanding=0, deps=(c0, c1))     # (nb, 0)
        epi.store((c0 * sl0[:, None] + c1 * sh0[:, None]).to(epi.dtype))
        c0 = warpgroup_mma(lo1, _b_view(b_lo, nb, 2, TRANS), zero, use_acc=False,
                           is_async=True)
        c1 = warpgroup_mma(hi1, _b_view(b_hi, nb, 2, TRANS), zero, use_acc=False,
                           is_async=True)                                  # (nb, 1)
        _reduce_epi(epi, nb, o_row0, m0, out_ptr, O, BM, BN, red_l, ASM)
      c0, c1 = warpgroup_mma_wait(num_outstanding=0, deps=(c0, c1))       # (n_nb - 1, 1)
      epi.store((c0 * sl1[:, None] + c1 * sh1[:, None]).to(epi.dtype))
      _reduce_epi(epi, n_nb - 1, o_row1, m1, out_ptr, O, BM, BN, red_l, ASM)

  @gluon.jit
  def _rows2_sum_kernel(
      a_ptr,        # [Ra, I] rows read by the pairs (16-bit)
      w_ptr,        # expert matrices: element (e, i, o) at e*SW_E + i*SW_I + o*SW_O
      order_ptr,    # [P] int32 pair index at each sorted position
      tiles_ptr,    # [3, Z] int32 expert, start, end of each tile of up to H * BM rows
      scale_ptr,    # [P] float32 per-pair scale; unused if not HAS_SCALE
      rs_ptr,       # [Ro] float32 inverse row scales of float16 sums; unused if not FIN
      out_ptr,      # [Ro, O] 16-bit sums (zeroed)
      cnt_ptr,      # [ceil(Ro / FG)] int32 arrivals per group of rows (zeroed); if FIN
      Z: gl.constexpr, I: gl.constexpr, O: gl.constexpr, K: gl.constexpr,
      A_R: gl.constexpr, O_R: gl.constexpr,
      SW_E: gl.constexpr, SW_I: gl.constexpr, SW_O: gl.constexpr,
      BM: gl.constexpr, BN: gl.constexpr, NW: gl.constexpr,
      HAS_SCALE: gl.constexpr, F16: gl.constexpr, FIN: gl.constexpr = False,
      FG: gl.constexpr = 32, RO: gl.constexpr = 0, FIN_BF16: gl.constexpr = False,
      FIN_PROBE: gl.constexpr = 0, H: gl.constexpr = 2):
    """:func:`_rows_sum_kernel` for tiles of H * BM rows taken as H parts ("halves",
    H = 2 by default; 3 or 4) of BM: each column block of the expert's matrix is copied
    once and multiplied by every part, one after the other, so the matrices' traffic
    is that of H * BM-row tiles while only BM-row products are in registers (two
    buffers of the matrix: each block is used for H steps, long enough for the next
    one's copy).

    Steps (nb, h) for column block nb and part h; in each, the product of the step is
    issued to the tensor cores and the previous step's is reduced meanwhile. The next
    block is copied at (nb, 0), into the buffer block nb - 1 used."""
    gl.static_assert(H >= 2 and H <= 4, "H: 2, 3 or 4 parts")
    n_nb: gl.constexpr = O // BN
    ASM: gl.constexpr = _RED_F16 if F16 else _RED_BF16
    dt: gl.constexpr = a_ptr.dtype.element_ty
    acc_l: gl.constexpr = _acc_layout(BN, NW)
    a_l: gl.constexpr = _rows_layout(I, NW)
    red_l: gl.constexpr = _rows_layout(BN, NW)
    a_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BM, I], dt)
    TRANS: gl.constexpr = SW_I == 1
    b_smem = _w_smem(dt, 2, I, BN, TRANS)
    a0 = gl.allocate_shared_memory(dt, [BM, I], a_sl)
    a1 = gl.allocate_shared_memory(dt, [BM, I], a_sl)
    if H > 2:
      a2 = gl.allocate_shared_memory(dt, [BM, I], a_sl)
    else:
      a2 = a0
    if H > 3:
      a3 = gl.allocate_shared_memory(dt, [BM, I], a_sl)
    else:
      a3 = a0
    epi = _epi_smem(out_ptr.dtype.element_ty, BM, BN)

    tile = gl.program_id(0)
    e = gl.load(tiles_ptr + tile)
    start = gl.load(tiles_ptr + Z + tile)
    end = gl.load(tiles_ptr + 2 * Z + tile)
    if start < end:
      w_base = w_ptr + e.to(gl.int64) * SW_E
      mid = start + BM
      # every part's gathered rows, with block 0
      _gather_rows(a0, a_ptr, order_ptr, start, end, I, K, A_R, BM, a_l)
      _gather_rows(a1, a_ptr, order_ptr, mid, end, I, K, A_R, BM, a_l)
      if H > 2:
        _gather_rows(a2, a_ptr, order_ptr, start + 2 * BM, end, I, K, A_R, BM, a_l)
      if H > 3:
        _gather_rows(a3, a_ptr, order_ptr, start + 3 * BM, end, I, K, A_R, BM, a_l)
      _copy_block(b_smem, w_base, 0, I, O, BN, SW_I, SW_O, TRANS, NW)
      cp.commit_group()
      # each part's output rows, validity and scales
      o_row0, m0 = _out_rows(order_ptr, start, end, K, O_R, BM, red_l)
      o_row1, m1 = _out_rows(order_ptr, mid, end, K, O_R, BM, red_l)
      s0 = _rows_scale(scale_ptr, order_ptr, start, end, BM, acc_l, HAS_SCALE)
      s1 = _rows_scale(scale_ptr, order_ptr, mid, end, BM, acc_l, HAS_SCALE)
      if H > 2:
        o_row2, m2 = _out_rows(order_ptr, start + 2 * BM, end, K, O_R, BM, red_l)
        s2 = _rows_scale(scale_ptr, order_ptr, start + 2 * BM, end, BM, acc_l, HAS_SCALE)
      else:
        o_row2, m2, s2 = o_row0, m0, s0
      if H > 3:
        o_row3, m3 = _out_rows(order_ptr, start + 3 * BM, end, K, O_R, BM, red_l)
        s3 = _rows_scale(scale_ptr, order_ptr, start + 3 * BM, end, BM, acc_l, HAS_SCALE)
      else:
        o_row3, m3, s3 = o_row0, m0, s0
      zero = gl.zeros([BM, BN], gl.float32, layout=acc_l)

      cp.wait_group(0)                 # the rows and block 0
      fence_async_shared()
      gl.thread_barrier()
      _copy_block(b_smem, w_base, 1, I, O, BN, SW_I, SW_O, TRANS, NW)
      cp.commit_group()
      cur = warpgroup_mma(a0, _b_view(b_smem, 0, 2, TRANS), zero, use_acc=False,
                          is_async=True)
      prev = warpgroup_mma_wait(num_outstanding=0, deps=(cur,))          # (0, 0)
      for h in gl.static_range(1, H):
        cur = warpgroup_mma(_part(h, a0, a1, a2, a3), _b_view(b_smem, 0, 2, TRANS), zero,
                            use_acc=False, is_async=True)
        _reduce_block(prev, 0, _part(h - 1, o_row0, o_row1, o_row2, o_row3),
                      _part(h - 1, m0, m1, m2, m3), _part(h - 1, s0, s1, s2, s3), out_ptr,
                      O, BM, BN, red_l, ASM, epi)
        prev = warpgroup_mma_wait(num_outstanding=0, deps=(cur,))        # (0, h)
      for nb in range(1, n_nb):
        cp.wait_group(0)               # block nb is in shared memory
        fence_async_shared()
        gl.thread_barrier()            # ... for every thread; block nb - 1's buffer is free
        _copy_block(b_smem, w_base, nb + 1, I, O, BN, SW_I, SW_O, TRANS, NW)
        cp.commit_group()
        for h in gl.static_range(H):
          cur = warpgroup_mma(_part(h, a0, a1, a2, a3), _b_view(b_smem, nb, 2, TRANS), zero,
                              use_acc=False, is_async=True)
          # the previous step: (nb - 1, H - 1) or (nb, h - 1)
          _reduce_block(prev, nb - 1 if h == 0 else nb,
                        _part((h + H - 1) % H, o_row0, o_row1, o_row2, o_row3),
                        _part((h + H - 1) % H, m0, m1, m2, m3),
                        _part((h + H - 1) % H, s0, s1, s2, s3), out_ptr, O, BM, BN, red_l,
                        ASM, epi)
          prev = warpgroup_mma_wait(num_outstanding=0, deps=(cur,))      # (nb, h)
      _reduce_block(prev, n_nb - 1, _part(H - 1, o_row0, o_row1, o_row2, o_row3),
                    _part(H - 1, m0, m1, m2, m3), _part(H - 1, s0, s1, s2, s3), out_ptr, O,
                    BM, BN, red_l, ASM, epi)
      if FIN:
        _finish(out_ptr, rs_ptr, cnt_ptr, order_ptr, start, end, H * BM, K, O_R, K // O_R,
                O, RO, FG, FIN_BF16, NW, FIN_PROBE)

  @gluon.jit
  def _part(h: gl.constexpr, x0, x1, x2, x3):
    """x_h (h a compile-time 0..3)."""
    if h == 0:
      return x0
    elif h == 1:
      return x1
    elif h == 2:
      return x2
    else:
      return x3

  @gluon.jit
  def _finish(out_ptr, rs_ptr, cnt_ptr, idx_ptr, start, end, NR: gl.constexpr,
              K: gl.constexpr, O_R: gl.constexpr, ARR: gl.constexpr, O: gl.constexpr,
              RO: gl.constexpr, FG: gl.constexpr, FIN_BF16: gl.constexpr,
              NW: gl.constexpr, FIN_PROBE: gl.constexpr = 0):
    """Finishes the float16 sums in place, where this program added the last rows: the
    output rows come in groups of FG; each takes ARR arrivals per row (a program adds
    a row's every column at once). After its reductions, the program counts its rows'
    arrivals into their groups (``cnt_ptr``); for a group whose count it completes, it
    multiplies the group's rows by their inverse scales (``rs_ptr``) and stores them
    over the sums in the output's dtype (bf16 bits where FIN_BF16, else float16).

    The reductions are ordered before the counts by a fence in every thread and a
    barrier, and the counts are acquire-release atomics; the group's rows are read
    from L2 (``.cg``), after another fence.

    FIN_PROBE (bench/gluon_rows_probe.py only; the sums are then left unfinished): 1
    counts (fences, acquire-release atomics) but finishes nothing, 2 counts with
    relaxed atomics and no fences, 3 finishes without the fences before the counts."""
    cnt_l: gl.constexpr = gl.BlockedLayout([1], [32], [NW], [0])
    NRP: gl.constexpr = _next_pow2(NR)
    r = gl.arange(0, NRP, layout=cnt_l)
    rows = start + r
    if FIN_PROBE != 2 and FIN_PROBE != 3:
      _fence_gpu(rows)                       # this thread's reductions are performed
    gl.thread_barrier()                      # ... and every thread's
    m = (rows < end) & (r < NR)
    g = _row_of(gl.load(idx_ptr + rows, mask=m, other=0), K, O_R) // FG
    ones = gl.full([NRP], 1, gl.int32, layout=cnt_l)
    if FIN_PROBE == 2:
      old = gl.atomic_add(cnt_ptr + g, ones, mask=m, sem="relaxed", scope="gpu")
    else:
      old = gl.atomic_add(cnt_ptr + g, ones, mask=m, sem="acq_rel", scope="gpu")
    target = gl.minimum(RO - g * FG, FG) * ARR
    last = m & (old == target - 1)
    if FIN_PROBE == 1 or FIN_PROBE == 2:
      last = last & (old < 0)                # (never)
    gid = gl.where(last, g, -1)
    for _j in range(gl.sum(last.to(gl.int32), axis=0)):
      gsel = gl.max(gid, axis=0)
      gid = gl.where(gid == gsel, -1, gid)
      _finish_group(out_ptr, rs_ptr, gsel, O, RO, FG, FIN_BF16, NW)

  @gluon.jit
  def _finish_group(out_ptr, rs_ptr, g, O: gl.constexpr, RO: gl.constexpr,
                    FG: gl.constexpr, FIN_BF16: gl.constexpr, NW: gl.constexpr):
    """Rows g * FG .. of the float16 sums times their inverse scales, stored in place
    in the output's dtype (:func:`_finish`)."""
    OP: gl.constexpr = _next_pow2(O)
    fin_l: gl.constexpr = _wide_layout(OP, NW)
    CR: gl.constexpr = _finish_rows(OP, NW, FG)
    rr = gl.arange(0, CR, layout=gl.SliceLayout(1, fin_l))
    cc = gl.arange(0, OP, layout=gl.SliceLayout(0, fin_l))
    _fence_gpu(rr)                           # after the count's acquire (and barrier)
    base = g * FG
    for r0 in range(0, FG, CR):
      rows = base + r0 + rr
      rm = rows < RO
      inv = gl.load(rs_ptr + rows, mask=rm, other=1.0)
      ptrs = out_ptr + rows[:, None] * O + cc[None, :]
      mask = rm[:, None] & (cc < O)[None, :]
      v = gl.load(ptrs, mask=mask, other=0.0, cache_modifier=".cg").to(gl.float32)
      y = v * inv[:, None]
      if FIN_BF16:
        y16 = y.to(gl.bfloat16, fp_downcast_rounding="rtne").to(gl.float16, bitcast=True)
      else:
        y16 = y.to(gl.float16, fp_downcast_rounding="rtne")
      gl.store(ptrs, y16, mask=mask)

  @gluon.jit
  def _fence_gpu(t):
    """A ``fence.acq_rel.gpu`` in each thread that holds elements of t (once per
    element); returns zeros like t (int32)."""
    return gl.inline_asm_elementwise("fence.acq_rel.gpu;\n\tmov.u32 $0, 0;", "=r,r",
                                     [t], dtype=gl.int32, is_pure=False, pack=1)

  _next_pow2 = gluon.constexpr_function(next_pow2)

  @gluon.constexpr_function
  def _wide_layout(cols, nw):
    """[rows, cols] 16-bit values, eight adjacent columns per thread, up to a warp per
    row, ``nw`` warps along the rows."""
    tc = min(32, max(1, cols // 8))
    return gl.BlockedLayout([1, 8], [32 // tc, tc], [nw, 1], [1, 0])

  @gluon.constexpr_function
  def _finish_rows(cols, nw, fg):
    """Rows per step of :func:`_finish_group`: 32 values (four 16-byte loads) per
    thread."""
    return max(1, min(fg, 32 * 32 * nw // cols))

  @gluon.jit
  def _gather_rows(a_smem, a_ptr, idx_ptr, start, end, I: gl.constexpr, K: gl.constexpr,
                   A_R: gl.constexpr, BM: gl.constexpr, a_l: gl.constexpr):
    """Starts copying the input rows of the pairs ``idx_ptr`` holds at the sorted
    positions start.. (below end; the rest masked) into ``a_smem`` [BM, I]."""
    rows = start + gl.arange(0, BM, layout=gl.SliceLayout(1, a_l))
    rmask = rows < end
    pair = gl.load(idx_ptr + rows, mask=rmask, other=0)
    a_row = _row_of(pair, K, A_R)
    ka = gl.arange(0, I, layout=gl.SliceLayout(0, a_l))
    cp.async_copy_global_to_shared(a_smem, a_ptr + a_row[:, None] * I + ka[None, :],
                                   mask=rmask[:, None])

  @gluon.jit
  def _out_rows(idx_ptr, start, end, K: gl.constexpr, O_R: gl.constexpr,
                BM: gl.constexpr, red_l: gl.constexpr):
    """(output row [BM] int64, validity [BM]) of the sorted positions start.. (below
    end) in the reductions' row layout; ``idx_ptr`` holds each position's pair."""
    rows = start + gl.arange(0, BM, layout=gl.SliceLayout(1, red_l))
    m = rows < end
    return _row_of(gl.load(idx_ptr + rows, mask=m, other=0), K, O_R), m

  @gluon.jit
  def _rows_scale(scale_ptr, idx_ptr, start, end, BM: gl.constexpr,
                  acc_l: gl.constexpr, HAS_SCALE: gl.constexpr):
    """[BM] float32 scales of the pairs ``idx_ptr`` holds at the sorted positions
    start.. (below end), in the products' row layout; ones without a scale."""
    rows = start + gl.arange(0, BM, layout=gl.SliceLayout(1, acc_l))
    if HAS_SCALE:
      m = rows < end
      return gl.load(scale_ptr + gl.load(idx_ptr + rows, mask=m, other=0), mask=m,
                     other=0.0).to(gl.float32)
    else:
      return gl.full([BM], 1.0, gl.float32, layout=gl.SliceLayout(1, acc_l))

  @gluon.jit
  def _reduce_epi(epi, nb, o_row, rmask, out_ptr, O: gl.constexpr, BM: gl.constexpr,
                  BN: gl.constexpr, red_l: gl.constexpr, ASM: gl.constexpr):
    """Adds the rounded [BM, BN] block nb held in ``epi`` into the output rows."""
    v = epi.load(red_l)
    cols = nb * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, red_l))
    offs = o_row[:, None] * O + cols[None, :]
    mask = rmask[:, None] & (cols < O)[None, :]
    _red_v8(out_ptr, offs, v, mask, ASM, BM, BN)

  @gluon.constexpr_function
  def _rows_layout(cols, nw):
    """Registers of [rows, cols] 16-bit values: eight adjacent columns (16 bytes) per
    thread, a row's threads side by side, ``nw`` warps along the rows."""
    return gl.BlockedLayout([1, 8], [32 // (cols // 8), cols // 8], [nw, 1], [1, 0])

  @gluon.constexpr_function
  def _acc_layout(bn, nw):
    """The wgmma products' registers: [rows, bn] float32, ``nw`` warps along the rows."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[nw, 1],
                                     instr_shape=[16, bn, 16])

  @gluon.jit
  def _epi_smem(dt: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr):
    """The shared buffer that takes each product block, scaled and rounded to 16 bits,
    from the product's layout to the reductions' (16-byte chunks swizzled by row: no
    bank conflicts either way)."""
    sl: gl.constexpr = gl.SwizzledSharedLayout(8, 1, 8, order=[1, 0])
    return gl.allocate_shared_memory(dt, [BM, BN], sl)

  @gluon.jit
  def _row_of(pair, K: gl.constexpr, R: gl.constexpr):
    """int64 row of ``pair`` (token * K + slot) among R rows per token: slot s is row
    s // (K // R) of its token."""
    return ((pair // K) * R + (pair % K) // (K // R)).to(gl.int64)

  @gluon.jit
  def _b_view(b_smem, nb, BUF: gl.constexpr, TRANS: gl.constexpr):
    if TRANS:
      return b_smem.index(nb % BUF).permute((1, 0))
    else:
      return b_smem.index(nb % BUF)

  @gluon.jit
  def _w_smem(dt: gl.constexpr, BUF: gl.constexpr, I: gl.constexpr, BN: gl.constexpr,
              TRANS: gl.constexpr):
    """BUF shared buffers of one column block of an expert's matrix each: [BN, I] when
    the matrix is contiguous along I (TRANS), else [I, BN]; laid out for wgmma."""
    if TRANS:
      sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BN, I], dt)
      return gl.allocate_shared_memory(dt, [BUF, BN, I], sl)
    else:
      sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([I, BN], dt)
      return gl.allocate_shared_memory(dt, [BUF, I, BN], sl)

  @gluon.jit
  def _copy_block(b_smem, w_base, nb, I: gl.constexpr, O: gl.constexpr, BN: gl.constexpr,
                  SW_I: gl.constexpr, SW_O: gl.constexpr, TRANS: gl.constexpr,
                  NW: gl.constexpr):
    """Starts copying column block nb of the expert's matrix into its buffer (nothing
    past the last block: O % BN == 0, so its columns are all masked); 16 bytes per
    thread along the contiguous dimension."""
    BUF: gl.constexpr = b_smem.shape[0]
    if TRANS:   # [BN, I] in shared memory, contiguous along I
      b_l: gl.constexpr = _rows_layout(I, NW)
      cols = nb * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, b_l))
      ks = gl.arange(0, I, layout=gl.SliceLayout(0, b_l))
      ptrs = w_base + cols[:, None] * SW_O + ks[None, :] * SW_I
      m = (cols < O)[:, None]
    else:       # [I, BN], contiguous along the columns
      b_l: gl.constexpr = _rows_layout(BN, NW)
      ks = gl.arange(0, I, layout=gl.SliceLayout(1, b_l))
      cols = nb * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, b_l))
      ptrs = w_base + ks[:, None] * SW_I + cols[None, :] * SW_O
      m = (cols < O)[None, :]
    cp.async_copy_global_to_shared(b_smem.index(nb % BUF), ptrs, mask=m)

  @gluon.jit
  def _reduce_block(acc, nb, o_row, rmask, s, out_ptr, O: gl.constexpr, BM: gl.constexpr,
                    BN: gl.constexpr, red_l: gl.constexpr, ASM: gl.constexpr, epi):
    """Adds the scaled [BM, BN] product of column block nb into the output rows: scaled
    and rounded to 16 bits in the product's layout, then through shared memory (``epi``)
    into the reductions' layout."""
    epi.store((acc * s[:, None]).to(epi.dtype))
    _reduce_epi(epi, nb, o_row, rmask, out_ptr, O, BM, BN, red_l, ASM)


def _cache_dir_fallback():
  """Triton's compile cache (``triton.knobs.cache.dir``: TRITON_CACHE_DIR, else under
  $HOME). Where it is empty (TRITON_CACHE_DIR set to "", as on some batch machines) or
  cannot be written, ``triton.compile`` fails; use a temporary directory instead."""
  from triton import knobs  # noqa: PLC0415
  d = knobs.cache.dir
  if d:
    try:
      os.makedirs(d, exist_ok=True)
      if os.access(d, os.W_OK):
        return
    except OSError:
      pass
  os.environ["TRITON_CACHE_DIR"] = os.path.join(tempfile.gettempdir(), "triton_cache")


# Shared memory per SM on sm90 (228 KiB), and what each resident block reserves (1 KiB).
_SMEM_SM, _SMEM_RESERVED = 228 * 1024, 1024


def compile_gluon(fn, signature: dict, constants: dict, attrs: dict, cc: int,
                  num_warps: int, num_stages: int = 3, num_ctas: int = 1,
                  enable_fp_fusion: bool = True):
  """Compiles a ``gluon.jit`` kernel with Triton's own pipeline (no GPU needed).

  A kernel that finishes its sums (``FIN``) is compiled a second time with its
  registers capped at what keeps as many blocks per SM as its shared memory allows:
  the finishing code would otherwise take the two-half kernel from 128 to 146-200
  registers per thread, and from two blocks per SM to one (ptxas then fits the
  kernel in 128 registers without spilling)."""
  from triton.backends.compiler import GPUTarget  # noqa: PLC0415
  from triton.experimental.gluon._runtime import GluonASTSource  # noqa: PLC0415
  _cache_dir_fallback()
  options = dict(num_warps=num_warps, num_stages=num_stages, num_ctas=num_ctas,
                 enable_fp_fusion=enable_fp_fusion)

  def build(**extra):
    return triton.compile(GluonASTSource(fn, signature, constants, attrs),
                          target=GPUTarget("cuda", cc, 32), options=dict(options, **extra))

  k = build()
  if constants.get("FIN"):
    blocks = max(1, _SMEM_SM // (k.metadata.shared + _SMEM_RESERVED))
    cap = 65536 // (32 * num_warps * blocks) // 8 * 8
    if cap < 255:
      k = build(maxnreg=cap)
  return k


def install_launcher():
  """Lets ``jax_triton.triton_call`` launch ``gluon.jit`` kernels.

  jax-triton compiles every kernel through ``ASTSource`` and ``make_ttir``, which a
  Gluon kernel (it emits TTGIR itself) cannot take. Its kernel factory is wrapped here:
  Gluon kernels are compiled by :func:`compile_gluon` and their PTX handed to
  jax-triton's launch layer (``TritonKernel``); other kernels take jax-triton's path
  unchanged. Kernels that need global scratch memory are refused (jax-triton does not
  provide it). Idempotent."""
  from jax_triton import triton_lib as tlib  # noqa: PLC0415
  from triton.experimental.gluon._runtime import GluonJITFunction  # noqa: PLC0415
  orig = tlib.get_or_create_triton_kernel
  if getattr(orig, "_gluon", False):
    return
  cache = {}

  def factory(backend_init_func, platform, fn, arg_dtypes, scalar_args, *, num_warps,
              num_stages, num_ctas, compute_capability, enable_fp_fusion, metaparams,
              dump):
    if not isinstance(fn, GluonJITFunction):
      return orig(backend_init_func, platform, fn, arg_dtypes, scalar_args,
                  num_warps=num_warps, num_stages=num_stages, num_ctas=num_ctas,
                  compute_capability=compute_capability, enable_fp_fusion=enable_fp_fusion,
                  metaparams=metaparams, dump=dump)
    if platform != "cuda":
      raise NotImplementedError(f"Gluon kernels on {platform}")
    num_warps = 4 if num_warps is None else num_warps
    num_stages = 3 if num_stages is None else num_stages
    cc = compute_capability or tlib.triton_kernel_call_lib.get_compute_capability(0)
    signature = {fn.arg_names[i]: v for i, v in enumerate(arg_dtypes)}
    constants = dict(metaparams)
    constants.update({fn.arg_names[i]: None for i, _, v in scalar_args if v is None})
    constants.update({fn.arg_names[i]: 1 for i, _, v in scalar_args if v == 1})
    for name in constants:
      signature[name] = "constexpr"
    # jax-triton's arrays are 16-byte aligned (its own assumption for Triton kernels)
    attrs = {(i,): [["tt.divisibility", 16]] for i, d in enumerate(arg_dtypes)
             if d.startswith("*")}
    key = (fn, tuple(signature.items()), tuple(constants.items()), num_warps, num_stages,
           num_ctas, cc, enable_fp_fusion)
    if key not in cache:
      k = compile_gluon(fn, signature, constants, attrs, cc, num_warps, num_stages,
                        num_ctas, enable_fp_fusion)
      md = k.metadata
      if md.global_scratch_size:
        raise NotImplementedError(
            f"{md.name} needs {md.global_scratch_size} bytes of global scratch, which "
            "jax-triton does not provide")
      cache[key] = tlib.triton_kernel_call_lib.TritonKernel(
          md.name, md.num_warps, num_ctas, md.shared, k.asm["ptx"], "", cc)
    return cache[key], attrs

  factory._gluon = True
  tlib.get_or_create_triton_kernel = factory
