"""What the Gluon kernels share: availability, supported shapes, and device functions.

The Gluon kernels (:mod:`kernels.cvmm_triton.gluon_rows`,
:mod:`kernels.cvmm_triton.gluon_pairs`) are the fused 16-bit sums of the row
projections whose output rows are summed over experts (σ-MoE down, SwitchHead O, and
the dx of σ-MoE up and SwitchHead V) on Hopper (sm90: wgmma). They do the work of the
Triton row kernel's ``loop_n`` tiles with the order made explicit:
- the tile's gathered rows go to shared memory once (``cp.async``);
- the expert's matrix streams through shared buffers, one column block each;
- block n+1's product is issued to the tensor cores (asynchronous ``wgmma``) before
  block n's reductions, so that the two overlap within one program;
- each product block is scaled and rounded to 16 bits where the tensor cores leave it,
  and goes through a shared buffer of its own (swizzled rows, 16-byte loads) to the
  reductions' layout of eight adjacent columns per thread.
jax-triton cannot compile Gluon kernels itself:
:func:`kernels.cvmm_triton.launch.install_gluon_launcher` lets it.
"""
from __future__ import annotations

import jax.numpy as jnp

from kernels.cvmm_triton.primitives import red_half_v8_asm

try:
  from triton.experimental import gluon
  from triton.experimental.gluon import language as gl
  from triton.experimental.gluon.language.nvidia.hopper import (async_copy as cp,
                                                                fence_async_shared,
                                                                warpgroup_mma,
                                                                warpgroup_mma_wait)
except ImportError:  # no Triton (CPU-only installs), or a Triton without Gluon
  gluon = gl = cp = fence_async_shared = warpgroup_mma = warpgroup_mma_wait = None


def available() -> bool:
  """Whether Triton with Gluon is installed (the device is checked by the callers)."""
  return gluon is not None


def rows_sum_supported(i: int, o: int, dtype, block_n: int) -> bool:
  """Shapes the Gluon kernels cover: the whole contraction in one block (I a power of
  two in [16, 256]), whole column blocks and 16-byte reductions (O % block_n == 0),
  16-bit inputs."""
  return (available() and jnp.dtype(dtype).itemsize == 2 and 16 <= i <= 256
          and i & (i - 1) == 0 and o % block_n == 0 and block_n % 8 == 0)


if gluon is not None:
  RED_F16 = gl.constexpr(red_half_v8_asm("f16x2"))
  RED_BF16 = gl.constexpr(red_half_v8_asm("bf16x2"))

  @gluon.jit
  def red_v8(out_ptr, offs, v, mask, ASM: gl.constexpr, BM: gl.constexpr,
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
    p0 = (out_ptr + first8(offs, BM, BN)).to(gl.int64)
    m0 = first8(mask.to(gl.int32), BM, BN)
    gl.inline_asm_elementwise(
        ASM, "=r,l,h,h,h,h,h,h,h,h,r", [p0, c0, c1, c2, c3, c4, c5, c6, c7, m0],
        dtype=gl.int32, is_pure=False, pack=1)

  @gluon.jit
  def unit_tile(tiles_ptr, Z: gl.constexpr):
    """This program's unit-pair tile: (lower expert, higher expert, start, end) from the
    [4, Z] tile list."""
    tile = gl.program_id(0)
    return (gl.load(tiles_ptr + tile), gl.load(tiles_ptr + Z + tile),
            gl.load(tiles_ptr + 2 * Z + tile), gl.load(tiles_ptr + 3 * Z + tile))

  @gluon.jit
  def first8(t, BM: gl.constexpr, BN: gl.constexpr):
    """[BM, BN // 8]: the first of every eight adjacent columns of t."""
    x = gl.reshape(t, [BM, BN // 8, 2, 2, 2])
    a, _b = gl.split(x)
    a, _b = gl.split(a)
    a, _b = gl.split(a)
    return a

  @gluon.jit
  def gather_rows(a_smem, a_ptr, idx_ptr, start, end, I: gl.constexpr, K: gl.constexpr,
                   A_R: gl.constexpr, BM: gl.constexpr, a_l: gl.constexpr):
    """Starts copying the input rows of the pairs ``idx_ptr`` holds at the sorted
    positions start.. (below end; the rest masked) into ``a_smem`` [BM, I]."""
    rows = start + gl.arange(0, BM, layout=gl.SliceLayout(1, a_l))
    rmask = rows < end
    pair = gl.load(idx_ptr + rows, mask=rmask, other=0)
    a_row = row_of(pair, K, A_R)
    ka = gl.arange(0, I, layout=gl.SliceLayout(0, a_l))
    cp.async_copy_global_to_shared(a_smem, a_ptr + a_row[:, None] * I + ka[None, :],
                                   mask=rmask[:, None])

  @gluon.jit
  def output_rows(idx_ptr, start, end, K: gl.constexpr, O_R: gl.constexpr,
                BM: gl.constexpr, red_l: gl.constexpr):
    """(output row [BM] int64, validity [BM]) of the sorted positions start.. (below
    end) in the reductions' row layout; ``idx_ptr`` holds each position's pair."""
    rows = start + gl.arange(0, BM, layout=gl.SliceLayout(1, red_l))
    m = rows < end
    return row_of(gl.load(idx_ptr + rows, mask=m, other=0), K, O_R), m

  @gluon.jit
  def rows_scale(scale_ptr, idx_ptr, start, end, BM: gl.constexpr,
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
  def reduce_epi(epi, nb, o_row, rmask, out_ptr, O: gl.constexpr, BM: gl.constexpr,
                  BN: gl.constexpr, red_l: gl.constexpr, ASM: gl.constexpr):
    """Adds the rounded [BM, BN] block nb held in ``epi`` into the output rows."""
    v = epi.load(red_l)
    cols = nb * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, red_l))
    offs = o_row[:, None] * O + cols[None, :]
    mask = rmask[:, None] & (cols < O)[None, :]
    red_v8(out_ptr, offs, v, mask, ASM, BM, BN)

  @gluon.constexpr_function
  def rows_layout(cols, nw):
    """Registers of [rows, cols] 16-bit values: eight adjacent columns (16 bytes) per
    thread, a row's threads side by side, ``nw`` warps along the rows."""
    return gl.BlockedLayout([1, 8], [32 // (cols // 8), cols // 8], [nw, 1], [1, 0])

  @gluon.constexpr_function
  def acc_layout(bn, nw):
    """The wgmma products' registers: [rows, bn] float32, ``nw`` warps along the rows."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[nw, 1],
                                     instr_shape=[16, bn, 16])

  @gluon.jit
  def epi_smem(dt: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr):
    """The shared buffer that takes each product block, scaled and rounded to 16 bits,
    from the product's layout to the reductions' (16-byte chunks swizzled by row: no
    bank conflicts either way)."""
    sl: gl.constexpr = gl.SwizzledSharedLayout(8, 1, 8, order=[1, 0])
    return gl.allocate_shared_memory(dt, [BM, BN], sl)

  @gluon.jit
  def row_of(pair, K: gl.constexpr, R: gl.constexpr):
    """int64 row of ``pair`` (token * K + slot) among R rows per token: slot s is row
    s // (K // R) of its token."""
    return ((pair // K) * R + (pair % K) // (K // R)).to(gl.int64)

  @gluon.jit
  def b_view(b_smem, nb, BUF: gl.constexpr, TRANS: gl.constexpr):
    if TRANS:
      return b_smem.index(nb % BUF).permute((1, 0))
    else:
      return b_smem.index(nb % BUF)

  @gluon.jit
  def w_smem(dt: gl.constexpr, BUF: gl.constexpr, I: gl.constexpr, BN: gl.constexpr,
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
  def copy_block(b_smem, w_base, nb, I: gl.constexpr, O: gl.constexpr, BN: gl.constexpr,
                  SW_I: gl.constexpr, SW_O: gl.constexpr, TRANS: gl.constexpr,
                  NW: gl.constexpr):
    """Starts copying column block nb of the expert's matrix into its buffer (nothing
    past the last block: O % BN == 0, so its columns are all masked); 16 bytes per
    thread along the contiguous dimension."""
    BUF: gl.constexpr = b_smem.shape[0]
    if TRANS:   # [BN, I] in shared memory, contiguous along I
      b_l: gl.constexpr = rows_layout(I, NW)
      cols = nb * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, b_l))
      ks = gl.arange(0, I, layout=gl.SliceLayout(0, b_l))
      ptrs = w_base + cols[:, None] * SW_O + ks[None, :] * SW_I
      m = (cols < O)[:, None]
    else:       # [I, BN], contiguous along the columns
      b_l: gl.constexpr = rows_layout(BN, NW)
      ks = gl.arange(0, I, layout=gl.SliceLayout(1, b_l))
      cols = nb * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, b_l))
      ptrs = w_base + ks[:, None] * SW_I + cols[None, :] * SW_O
      m = (cols < O)[None, :]
    cp.async_copy_global_to_shared(b_smem.index(nb % BUF), ptrs, mask=m)

  @gluon.jit
  def reduce_block(acc, nb, o_row, rmask, s, out_ptr, O: gl.constexpr, BM: gl.constexpr,
                    BN: gl.constexpr, red_l: gl.constexpr, ASM: gl.constexpr, epi):
    """Adds the scaled [BM, BN] product of column block nb into the output rows: scaled
    and rounded to 16 bits in the product's layout, then through shared memory (``epi``)
    into the reductions' layout."""
    epi.store((acc * s[:, None]).to(epi.dtype))
    reduce_epi(epi, nb, o_row, rmask, out_ptr, O, BM, BN, red_l, ASM)

