"""CVMM as Triton kernels called through jax-triton: forward and every gradient.

Two kernels do all the work (legend in :mod:`kernels.routing`):

``_rows_kernel``: one program per (expert-aligned tile of sorted pairs, block of output
  columns). It gathers the tile's input rows by index, multiplies them by the tile's
  expert matrix and writes each result row to an output row chosen by index:

      out[orow(p)] (+)= scale[p] * (a[arow(p)] @ W[e(p)])      for the pairs p of the tile

  Row maps are ``row(p) = (p // K) * R + (p % K) // (K // R)`` with R in {1, M, K} rows
  per token, so one kernel serves
    forward            a = x  (R = M),   out = y [P, O]       (R = K), stored
    forward, gated     a = x  (R = M),   out = [N, O]         (R = 1), scale = gates, atomic add
    dx                 a = dy (R = K),   W^T, out = dx (R = M), atomic when K // M > 1
    dx, gated          a = dout (R = 1), W^T, scale = gates, out = dx (R = M), plus
                       dgates[p] = <dout[n] @ W^T, x[arow(p)]> from the same product,
                       written as one partial per column block and summed afterwards.
  With gates the weighted sum over the K slots is fused: each program adds its
  gate-weighted rows into the float32 [N, O] output with relaxed atomics, so the
  [P, O] intermediate is never written. (With 16-bit sums, :func:`half_sums`, 16-bit
  calls add rows into a float16 or bf16 output instead.)

``_dw_kernel``: the ragged contraction dW[e] = sum over e's pairs of a[arow(p)]^T
  (scale[p] * b[brow(p)]). One program per (expert, split, block of I, block of O); it
  walks its share of the expert's rows. ``splits`` > 1 divides an expert's rows over
  several programs (to fill the multiprocessors when E * blocks is small); their
  float32 partials are summed afterwards. Experts without pairs write zeros.

float32 inputs use ``input_precision="ieee"`` (true float32, not tf32); bf16/fp16
accumulate in float32.
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from kernels import autotune
from kernels.autotune import TileConfig
from kernels.cvmm import sum_dtype_of
from kernels.routing import Routing, env_switch, sum_tile_order

if os.environ.get("CVMM_TRITON_INTERPRET", "0") == "1":
  # Triton's interpreter must be chosen before triton is first imported.
  os.environ.setdefault("TRITON_INTERPRET", "1")

try:
  import triton
  import triton.language as tl
  _jit = triton.jit
except ImportError:  # CPU-only installs: the module imports, is_available() is False
  triton = None

  class tl:  # noqa: N801  (stand-in so the kernel signatures below parse)
    @staticmethod
    def constexpr(value=None):
      return value

  def _jit(fn):
    return fn


def _jax_triton():
  import jax_triton  # noqa: PLC0415  (needs a CUDA jaxlib; absent on CPU)
  return jax_triton


def is_available() -> bool:
  if triton is None or jax.default_backend() != "gpu":
    return False
  try:
    _jax_triton()
  except ImportError:
    return False
  return True


# --------------------------------------------------------------------------- kernels

@_jit
def _red_v2(addr, v0, v1, mask):
  """red.global.add.v2.f32 (sm90): adds two adjacent floats in one reduction."""
  return tl.inline_asm_elementwise(
      "{ .reg .pred p; setp.ne.b32 p, $4, 0; mov.b32 $0, 0; "
      "@p red.global.gpu.relaxed.add.v2.f32 [$1], {$2, $3}; }",
      "=r,l,f,f,r", [addr, v0, v1, mask.to(tl.int32)], dtype=tl.int32, is_pure=False,
      pack=1)


@_jit
def _red_v4(addr, v0, v1, v2, v3, mask):
  """red.global.add.v4.f32 (sm90): adds four adjacent floats in one reduction."""
  return tl.inline_asm_elementwise(
      "{ .reg .pred p; setp.ne.b32 p, $6, 0; mov.b32 $0, 0; "
      "@p red.global.gpu.relaxed.add.v4.f32 [$1], {$2, $3, $4, $5}; }",
      "=r,l,f,f,f,f,r", [addr, v0, v1, v2, v3, mask.to(tl.int32)], dtype=tl.int32,
      is_pure=False, pack=1)


def _red_half_v8_asm(pair: str) -> str:
  """PTX of one 16-bit vector reduction (sm90): adds eight 16-bit values ($2..$9,
  ``pair``: f16x2 or bf16x2) to 8 adjacent elements at $1 if $10."""
  mov = " ".join(f"mov.b32 {r}, {{${2 + 2 * n}, ${3 + 2 * n}}};" for n, r in enumerate("abcd"))
  return ("{ .reg .pred p; .reg .b32 a, b, c, d; setp.ne.b32 p, $10, 0; mov.b32 $0, 0; "
          f"{mov} @p red.global.gpu.relaxed.add.noftz.v4.{pair} [$1], {{a, b, c, d}}; }}")


_RED_BF16_V8 = tl.constexpr(_red_half_v8_asm("bf16x2"))   # the opt-in bf16 sums
_RED_F16_V8 = tl.constexpr(_red_half_v8_asm("f16x2"))     # the scaled float16 sums


@_jit
def _red_half_v8(addr, v0, v1, v2, v3, v4, v5, v6, v7, mask, ASM: tl.constexpr):
  """One 16-bit vector reduction of eight 16-bit values (``ASM``: _RED_F16_V8 /
  _RED_BF16_V8)."""
  return tl.inline_asm_elementwise(
      ASM, "=r,l,h,h,h,h,h,h,h,h,r",
      [addr, v0, v1, v2, v3, v4, v5, v6, v7, mask.to(tl.int32)], dtype=tl.int32,
      is_pure=False, pack=1)


@_jit
def _mma(a, b, acc, IEEE: tl.constexpr):
  """a @ b (+ acc, may be None) in float32: true float32 products when IEEE, else the
  tensor-core default for the inputs' dtype."""
  if IEEE:
    return tl.dot(a, b, acc, input_precision="ieee")
  else:
    return tl.dot(a, b, acc)


@_jit
def _gathered_matmul(a_ptr, a_row, rmask, w_base, cols, cmask, I: tl.constexpr,
                     SW_I: tl.constexpr, SW_O: tl.constexpr, BM: tl.constexpr,
                     BN: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr):
  """[BM, BN] float32 = a[a_row] @ W[:, cols], W's element (i, o) at w_base + i*SW_I +
  o*SW_O, contracting the I columns BK at a time (rows gathered by index)."""
  acc = tl.zeros((BM, BN), dtype=tl.float32)
  for k0 in tl.range(0, I, BK):
    ks = k0 + tl.arange(0, BK)
    kmask = ks < I
    a = tl.load(a_ptr + a_row[:, None] * I + ks[None, :],
                mask=rmask[:, None] & kmask[None, :], other=0.0)    # [BM, BK]
    b = tl.load(w_base + ks[:, None] * SW_I + cols[None, :] * SW_O,
                mask=kmask[:, None] & cmask[None, :], other=0.0)    # [BK, BN]
    acc = _mma(a, b, acc, IEEE)
  return acc


@_jit
def _row_scale(scale_ptr, pair, rmask, HAS_SCALE: tl.constexpr):
  """[BM] float32 per-pair scale (gates) of a tile's rows; ones without a scale."""
  if HAS_SCALE:
    return tl.load(scale_ptr + pair, mask=rmask, other=0.0).to(tl.float32)
  else:
    return tl.full(pair.shape, 1.0, tl.float32)


@_jit
def _rows_epilogue(acc, nb, pair, tok, slot, rmask, s, c_ptr, out_ptr, dg_ptr,
                   O: tl.constexpr, K: tl.constexpr, O_R: tl.constexpr,
                   C_R: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                   HAS_SCALE: tl.constexpr, ATOMIC: tl.constexpr, DGATE: tl.constexpr,
                   RED: tl.constexpr, F16: tl.constexpr):
  """Writes (or adds) one [BM, BN] block of products: dgates partial, scale (s, [BM],
  loaded once per tile by the caller), store. RED == 8: 16-bit sums, float16 when F16
  (rows scaled by the caller), else bf16."""
  n_nb: tl.constexpr = (O + BN - 1) // BN
  cols = nb * BN + tl.arange(0, BN)                                # [BN]
  cmask = cols < O
  if DGATE:
    c_row = (tok * C_R + slot // (K // C_R)).to(tl.int64)
    c = tl.load(c_ptr + c_row[:, None] * O + cols[None, :],
                mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
    part = tl.sum(acc * c, axis=1)                                 # [BM]
    tl.store(dg_ptr + pair.to(tl.int64) * n_nb + nb, part, mask=rmask)
  if HAS_SCALE:
    acc = acc * s[:, None]
  o_row = (tok * O_R + slot // (K // O_R)).to(tl.int64)            # [BM]
  if not ATOMIC:
    tl.store(out_ptr + o_row[:, None] * O + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])
  elif RED == 8:
    # 16-bit sums: 8 adjacent columns of float16 / bf16 per instruction (O % 8 == 0;
    # out is float16 / bf16). Rounded in the product's layout, before the layout
    # change to eight columns per thread: half its shared-memory traffic.
    acc = acc.to(out_ptr.dtype.element_ty)
    t0, t1 = tl.split(tl.reshape(acc, (BM, BN // 8, 2, 2, 2)))     # column bit 0
    t00, t10 = tl.split(t0)                                         # bit 1
    t01, t11 = tl.split(t1)
    v0, v4 = tl.split(t00)                                          # bit 2
    v2, v6 = tl.split(t10)
    v1, v5 = tl.split(t01)
    v3, v7 = tl.split(t11)
    c8 = nb * BN + tl.arange(0, BN // 8) * 8
    addr = (out_ptr + o_row[:, None] * O + c8[None, :]).to(tl.int64)
    m8 = rmask[:, None] & (c8 < O)[None, :]
    if F16:
      _red_half_v8(addr, v0, v1, v2, v3, v4, v5, v6, v7, m8, _RED_F16_V8)
    else:
      _red_half_v8(addr, v0, v1, v2, v3, v4, v5, v6, v7, m8, _RED_BF16_V8)
  elif RED == 4:
    # Vector reductions: 4 adjacent columns per instruction (O % 4 == 0, so a group
    # is wholly inside or outside the matrix and 16-byte aligned).
    h0, h1 = tl.split(tl.reshape(acc, (BM, BN // 4, 2, 2)))
    v0, v2 = tl.split(h0)
    v1, v3 = tl.split(h1)
    c4 = nb * BN + tl.arange(0, BN // 4) * 4
    _red_v4((out_ptr + o_row[:, None] * O + c4[None, :]).to(tl.int64), v0, v1, v2, v3,
            rmask[:, None] & (c4 < O)[None, :])
  elif RED == 2:
    v0, v1 = tl.split(tl.reshape(acc, (BM, BN // 2, 2)))
    c2 = nb * BN + tl.arange(0, BN // 2) * 2
    _red_v2((out_ptr + o_row[:, None] * O + c2[None, :]).to(tl.int64), v0, v1,
            rmask[:, None] & (c2 < O)[None, :])
  else:
    tl.atomic_add(out_ptr + o_row[:, None] * O + cols[None, :],
                  acc.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :],
                  sem="relaxed")


@_jit
def _rows_kernel(
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
    sc = _row_scale(scale_ptr, pair, rmask, HAS_SCALE)             # [BM]
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
        acc = _mma(a, b, None, IEEE)
        _rows_epilogue(acc, nb, pair, tok, slot, rmask, sc, c_ptr, out_ptr, dg_ptr,
                       O, K, O_R, C_R, BM, BN, HAS_SCALE, ATOMIC, DGATE, RED, F16)
    else:
      nb = pid % n_nb
      cols = nb * BN + tl.arange(0, BN)                            # [BN]
      acc = _gathered_matmul(a_ptr, a_row, rmask, w_base, cols, cols < O, I, SW_I, SW_O,
                             BM, BN, BK, IEEE)                      # [BM, BN]
      _rows_epilogue(acc, nb, pair, tok, slot, rmask, sc, c_ptr, out_ptr, dg_ptr,
                     O, K, O_R, C_R, BM, BN, HAS_SCALE, ATOMIC, DGATE, RED, F16)


@_jit
def _units_kernel(
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
      acc_lo = _mma(x_lo, b_lo, acc_lo, IEEE)
      acc_hi = _mma(x_hi, b_hi, acc_hi, IEEE)
    omask = rmask[:, None] & cmask[None, :]
    if DGATE:   # both pairs of a unit dot one row: K // C_R is even (the wrapper checks)
      c_row = (tok * C_R + s_lo // (K // C_R)).to(tl.int64)
      c = tl.load(c_ptr + c_row[:, None] * O + cols[None, :], mask=omask,
                  other=0.0).to(tl.float32)
      tl.store(dg_ptr + p_lo, tl.sum(acc_lo * c, axis=1), mask=rmask)
      tl.store(dg_ptr + p_hi, tl.sum(acc_hi * c, axis=1), mask=rmask)
    o_row = (tok * O_R + s_lo // (K // O_R)).to(tl.int64)
    acc = (acc_lo * _row_scale(scale_ptr, p_lo, rmask, HAS_SCALE)[:, None]
           + acc_hi * _row_scale(scale_ptr, p_hi, rmask, HAS_SCALE)[:, None])
    tl.store(out_ptr + o_row[:, None] * O + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=omask)


@_jit
def _dw_kernel(
    a_ptr,        # [Ra, I] rows, contracted over the expert's pairs
    b_ptr,        # [Rb, O] rows
    order_ptr,    # [P] int32
    offs_ptr,     # [E + 1] int32 group offsets
    scale_ptr,    # [P] per-pair scale of b's rows; unused if not HAS_SCALE
    out_ptr,      # [S, E, I, O]; [1, E, I, O] float32 (zeroed) if RED
    E: tl.constexpr, I: tl.constexpr, O: tl.constexpr, K: tl.constexpr,
    A_R: tl.constexpr, B_R: tl.constexpr, S: tl.constexpr,
    BI: tl.constexpr, BO: tl.constexpr, BK: tl.constexpr,
    HAS_SCALE: tl.constexpr, IEEE: tl.constexpr, RED: tl.constexpr = 0,
):
  # RED 1 or 4: the S splits of an expert's rows add their partial sums into one
  # float32 output (elements per reduction: 4 needs O % 4 == 0) instead of each
  # storing its own slice for XLA to sum (0).
  n_ib: tl.constexpr = (I + BI - 1) // BI
  n_ob: tl.constexpr = (O + BO - 1) // BO
  pid = tl.program_id(0)
  ob = pid % n_ob
  t = pid // n_ob
  ib = t % n_ib
  t = t // n_ib
  split = t % S
  e = t // S
  g0 = tl.load(offs_ptr + e)
  g1 = tl.load(offs_ptr + e + 1)
  chunk = ((g1 - g0 + S - 1) // S + BK - 1) // BK * BK
  lo = g0 + split * chunk
  hi = lo + chunk
  hi = tl.where(hi < g1, hi, g1)
  ii = ib * BI + tl.arange(0, BI)
  oo = ob * BO + tl.arange(0, BO)
  imask = ii < I
  omask = oo < O
  acc = tl.zeros((BI, BO), dtype=tl.float32)
  for r0 in tl.range(lo, hi, BK):
    rows = r0 + tl.arange(0, BK)
    rmask = rows < hi
    pair = tl.load(order_ptr + rows, mask=rmask, other=0)
    tok = pair // K
    slot = pair % K
    a_row = (tok * A_R + slot // (K // A_R)).to(tl.int64)
    b_row = (tok * B_R + slot // (K // B_R)).to(tl.int64)
    a = tl.load(a_ptr + a_row[None, :] * I + ii[:, None],
                mask=imask[:, None] & rmask[None, :], other=0.0)    # [BI, BK]
    b = tl.load(b_ptr + b_row[:, None] * O + oo[None, :],
                mask=rmask[:, None] & omask[None, :], other=0.0)    # [BK, BO]
    if HAS_SCALE:
      s = _row_scale(scale_ptr, pair, rmask, True)
      b = (b.to(tl.float32) * s[:, None]).to(a.dtype)
    acc = _mma(a, b, acc, IEEE)
  if RED == 1:
    tl.atomic_add(out_ptr + (e.to(tl.int64) * I + ii[:, None]) * O + oo[None, :], acc,
                  mask=imask[:, None] & omask[None, :], sem="relaxed")
  elif RED == 4:
    h0, h1 = tl.split(tl.reshape(acc, (BI, BO // 4, 2, 2)))
    v0, v2 = tl.split(h0)
    v1, v3 = tl.split(h1)
    c4 = ob * BO + tl.arange(0, BO // 4) * 4
    _red_v4((out_ptr + (e.to(tl.int64) * I + ii[:, None]) * O + c4[None, :]).to(tl.int64),
            v0, v1, v2, v3, imask[:, None] & (c4 < O)[None, :])
  else:
    o_ptrs = (out_ptr + ((split * E + e).to(tl.int64) * I + ii[:, None]) * O + oo[None, :])
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=imask[:, None] & omask[None, :])


@_jit
def _pair_body(
    a_ptr,        # [N, D] fwd: x; bwd: dout
    w1_ptr,       # first matrices, element (e, d, h) at e*S1_E + d*S1_D + h*S1_H
    w2_ptr,       # second matrices, element (e, h, o) at e*S2_E + h*S2_H + o*S2_O
    order_ptr,    # [P] int32 pair index at each sorted position
    tiles_ptr,    # [3, Z] int32 expert, start, end of each tile
    gates_ptr,    # [P] gates, indexed by pair (fwd with F16: times the row scale)
    rs_ptr,       # [N] bwd with F16: per-token scale of the summed rows; else unused
    h_ptr,        # [P, H] fwd: output relu(x @ keys); bwd: input (the saved forward h)
    du_ptr,       # [P, H] bwd output: gates * (dout @ values^T) * (h > 0); unused in fwd
    dg_ptr,       # [P] float32 bwd output: dgates; unused in fwd
    out_ptr,      # [N, O] float32 (16-bit with 16-bit sums), summed into with atomics
    Z: tl.constexpr, D: tl.constexpr, H: tl.constexpr, O: tl.constexpr, K: tl.constexpr,
    S1_E: tl.constexpr, S1_D: tl.constexpr, S1_H: tl.constexpr,
    S2_E: tl.constexpr, S2_H: tl.constexpr, S2_O: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BH: tl.constexpr,
    BWD: tl.constexpr, IEEE: tl.constexpr, RED: tl.constexpr, F16: tl.constexpr,
):
  """The σ-MoE pair for one expert-aligned tile, the middle [BM, H] kept on chip.

  fwd: h = relu(x[n] @ keys[e]) (stored for the backward pass);
       out[n] += g[p] * h @ values[e]                          (out: the layer output)
  bwd: t = dout[n] @ values[e]^T; dgates[p] = <t, h[p]>; du = g[p] * t * (h[p] > 0)
       (stored for dkeys); out[n] += du @ keys[e]^T            (out: dx)
  """
  tile = tl.program_id(0)
  e = tl.load(tiles_ptr + tile)
  start = tl.load(tiles_ptr + Z + tile)
  end = tl.load(tiles_ptr + 2 * Z + tile)
  if start < end:
    rows = start + tl.arange(0, BM)
    rmask = rows < end
    pair = tl.load(order_ptr + rows, mask=rmask, other=0)          # [BM]
    tok = pair // K
    slot = pair % K
    a_row = tok.to(tl.int64)
    hs = tl.arange(0, BH)
    hmask = hs < H
    acc = _gathered_matmul(a_ptr, a_row, rmask, w1_ptr + e.to(tl.int64) * S1_E, hs, hmask,
                           D, S1_D, S1_H, BM, BH, BK, IEEE)         # [BM, BH]
    pmask = rmask[:, None] & hmask[None, :]
    mid_ptrs = pair.to(tl.int64)[:, None] * H + hs[None, :]          # [BM, BH]
    g = _row_scale(gates_ptr, pair, rmask, True)                     # [BM]
    if BWD:
      hv = tl.load(h_ptr + mid_ptrs, mask=pmask, other=0.0)
      tl.store(dg_ptr + pair, tl.sum(acc * hv.to(tl.float32), axis=1), mask=rmask)
      mid = tl.where(hv > 0, acc * g[:, None], 0.0).to(hv.dtype)
      tl.store(du_ptr + mid_ptrs, mid, mask=pmask)
    else:
      mid = tl.maximum(acc, 0.0).to(h_ptr.dtype.element_ty)
      tl.store(h_ptr + mid_ptrs, mid, mask=pmask)
    if BWD and F16:
      s = tl.load(rs_ptr + tok, mask=rmask, other=0.0)               # [BM] row scale
    else:
      s = g
    w2 = w2_ptr + e.to(tl.int64) * S2_E
    n_nb: tl.constexpr = (O + BN - 1) // BN
    for nb in tl.range(0, n_nb):
      cols = nb * BN + tl.arange(0, BN)
      b2 = tl.load(w2 + hs[:, None] * S2_H + cols[None, :] * S2_O,
                   mask=hmask[:, None] & (cols < O)[None, :], other=0.0)  # [BH, BN]
      y = _mma(mid, b2, None, IEEE)
      # fwd: scaled by the gates here; bwd: du already carries them (and float16
      # sums scale the rows).
      _rows_epilogue(y, nb, pair, tok, slot, rmask, s, gates_ptr, out_ptr, dg_ptr,
                     O, K, 1, 1, BM, BN, (not BWD) or F16, True, False, RED, F16)


@_jit
def _pair_fwd_kernel(a_ptr, w1_ptr, w2_ptr, order_ptr, tiles_ptr, gates_ptr,  # inputs
                     out_ptr, h_ptr,                                           # outputs
                     Z: tl.constexpr, D: tl.constexpr, H: tl.constexpr, O: tl.constexpr,
                     K: tl.constexpr, S1_E: tl.constexpr, S1_D: tl.constexpr,
                     S1_H: tl.constexpr, S2_E: tl.constexpr, S2_H: tl.constexpr,
                     S2_O: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                     BK: tl.constexpr, BH: tl.constexpr, IEEE: tl.constexpr,
                     RED: tl.constexpr, F16: tl.constexpr):
  _pair_body(a_ptr, w1_ptr, w2_ptr, order_ptr, tiles_ptr, gates_ptr, gates_ptr, h_ptr, h_ptr,
             out_ptr, out_ptr, Z, D, H, O, K, S1_E, S1_D, S1_H, S2_E, S2_H, S2_O, BM, BN, BK,
             BH, False, IEEE, RED, F16)


@_jit
def _pair_bwd_kernel(a_ptr, w1_ptr, w2_ptr, order_ptr, tiles_ptr, gates_ptr, h_ptr,  # in
                     rs_ptr,                                                       # in
                     out_ptr, du_ptr, dg_ptr,                                      # out
                     Z: tl.constexpr, D: tl.constexpr, H: tl.constexpr, O: tl.constexpr,
                     K: tl.constexpr, S1_E: tl.constexpr, S1_D: tl.constexpr,
                     S1_H: tl.constexpr, S2_E: tl.constexpr, S2_H: tl.constexpr,
                     S2_O: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                     BK: tl.constexpr, BH: tl.constexpr, IEEE: tl.constexpr,
                     RED: tl.constexpr, F16: tl.constexpr):
  _pair_body(a_ptr, w1_ptr, w2_ptr, order_ptr, tiles_ptr, gates_ptr, rs_ptr, h_ptr, du_ptr,
             dg_ptr, out_ptr, Z, D, H, O, K, S1_E, S1_D, S1_H, S2_E, S2_H, S2_O, BM, BN, BK,
             BH, True, IEEE, RED, F16)


# ------------------------------------------------------------------ launching

def _interpret() -> bool:
  """CVMM_TRITON_INTERPRET=1 runs the kernels in Triton's CPU interpreter (tests)."""
  return os.environ.get("CVMM_TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _fix_interpreter_index():
  """Triton 3.6's interpreter turns scalars into 1-element arrays and converts them to
  loop bounds with int(), which NumPy >= 2.4 refuses; take the element explicitly."""
  import triton.runtime.interpreter as interp  # noqa: PLC0415
  orig = interp._patch_lang_tensor

  def patched(tensor, scope):
    orig(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

  interp._patch_lang_tensor = patched


def _to_torch(a: np.ndarray):
  import torch  # noqa: PLC0415  (interpreter only)
  if a.dtype == jnp.bfloat16:
    return torch.from_numpy(np.array(a).view(np.int16)).view(torch.bfloat16)
  return torch.from_numpy(np.array(a))


def _from_torch(t) -> np.ndarray:
  import torch  # noqa: PLC0415
  if t.dtype == torch.bfloat16:
    return t.view(torch.int16).numpy().view(jnp.bfloat16)
  return t.numpy()


def _launch(kernel, args, out_shapes, grid: int, cfg: TileConfig, zeroed=(), aliases=None,
            **meta):
  """jax_triton.triton_call on GPUs; a host callback into Triton's interpreter in tests.
  ``aliases``: {input index: output index} whose buffers the GPU launch shares (the
  interpreter starts such an output as a copy of its input, as the GPU sees it).
  ``zeroed``: output indices that start as zeros (any other output is undefined)."""
  if not _interpret():
    jt = _jax_triton()
    return jt.triton_call(*args, kernel=kernel, out_shape=out_shapes, grid=(grid,),
                          num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                          zeroed_outputs=tuple(zeroed),
                          input_output_aliases=dict(aliases or {}), **meta)

  from triton.runtime.interpreter import InterpretedFunction  # noqa: PLC0415
  if not isinstance(kernel, InterpretedFunction):
    raise RuntimeError("CVMM_TRITON_INTERPRET=1 must be set before triton is imported")
  fn = kernel
  _fix_interpreter_index()

  def host(*arrays):
    ins = [_to_torch(np.asarray(a)) for a in arrays]
    shared = {o: i for i, o in (aliases or {}).items()}
    outs = [ins[shared[i]].clone() if i in shared else
            _to_torch(np.zeros(s.shape, s.dtype)) if i in zeroed else
            _to_torch(np.full(s.shape, np.nan if jnp.issubdtype(s.dtype, jnp.floating)
                              else -1, s.dtype)) for i, s in enumerate(out_shapes)]
    fn[(grid,)](*ins, *outs, **meta)
    return tuple(_from_torch(o) for o in outs)

  return list(jax.pure_callback(host, tuple(out_shapes), *args))


_DUMMY_F32 = lambda: jnp.zeros((1,), jnp.float32)  # noqa: E731


def rows_matmul(a: jax.Array, w: jax.Array, routing: Routing, *, a_rows: int,
                out_rows: int, transpose_w: bool = False, scale: jax.Array | None = None,
                dgate_rows: jax.Array | None = None, c_rows: int = 1,
                fuse_sum: bool = True, cfg: TileConfig | None = None,
                sum_dtype: str | None = None):
  """out[orow(p)] (+)= scale[p] * a[arow(p)] @ W_e, see the module docstring.

  a: [N * a_rows, I]; w: [E, I, O] (or [E, O, I] used transposed); scale: [P] or None;
  dgate_rows: [N * c_rows, O] rows dotted with the unscaled product, or None.
  Returns (out [N * out_rows, O], dgates [P] float32 or None). Where several pairs
  meet in one output row (out_rows < K), out is in a's dtype with 16-bit sums (bf16
  sums; float16 sums scaled back by a kernel, :func:`unscale_kind`, or finished by a
  Gluon kernel, :func:`finish_wanted`), else float32 (float32 sums; float16 sums scaled
  back by XLA); where none meet, a's dtype. With
  ``fuse_sum=False`` such rows are not added atomically: every pair's scaled row is
  stored ([P, O] in a's dtype) and XLA sums them (faster at wide outputs, but the
  intermediate is written). sum_dtype: see :func:`half_sums`. A routing with unit
  pairs (:class:`~kernels.routing.UnitPairs`) takes the unit-pair kernel for 16-bit
  fused sums where :func:`unit_pairs_config` allows (unless ``cfg`` names a row tile),
  and (unless CVMM_UNIT_STORE=0) the unit-store kernel where each output row takes
  exactly one unit (:func:`units_store`; out is then in a's dtype, each row summed in
  float32).
  """
  if out_rows < routing.k and not fuse_sum:
    out, dg = rows_matmul(a, w, routing, a_rows=a_rows, out_rows=routing.k,
                          transpose_w=transpose_w, scale=scale, dgate_rows=dgate_rows,
                          c_rows=c_rows, cfg=cfg)                        # [P, O]
    n, k = routing.n_tokens, routing.k
    out = out.reshape(n, out_rows, k // out_rows, -1).astype(jnp.float32).sum(axis=2)
    return out.reshape(n * out_rows, -1), dg
  n, k, p = routing.n_tokens, routing.k, routing.n_pairs
  e = w.shape[0]
  i, o, sw = _w_layout(w.shape, transpose_w)
  assert a.shape == (n * a_rows, i), (a.shape, n, a_rows, i)
  dgate = dgate_rows is not None
  if (cfg is None and units_store_wanted()
      and units_store_applies(routing, o, a_rows, out_rows, c_rows if dgate else None)):
    ucfg = choose_units_config(n, k, e, routing.pairs.block, i, o, a.dtype, a_rows,
                               out_rows, c_rows if dgate else None, scale is not None,
                               transpose_w)
    return units_store(a, w, routing, scale, dgate_rows, ucfg, a_rows=a_rows,
                       out_rows=out_rows, c_rows=c_rows, transpose_w=transpose_w)
  atomic = out_rows < k
  red = _red_width(o, a.dtype, sum_dtype) if atomic else 1
  half = half_sums(a.dtype, o, sum_dtype) if atomic else None
  gluon_ok = _gluon_rows_ok(i, o, a.dtype, red, dgate)
  pcfg = None
  if cfg is None and atomic:
    pcfg = unit_pairs_config(routing, i, o, a.dtype, red, dgate, out_rows, a_rows=a_rows,
                             has_scale=scale is not None, transpose_w=transpose_w,
                             sum_dtype=sum_dtype)
  if pcfg is None:
    if cfg is None:
      cfg = choose_rows_config(n, k, e, i, o, a.dtype, a_rows, out_rows, scale is not None,
                               sum_dtype)
      if cfg.gluon and not (gluon_ok(cfg) and _gluon_device()):
        cfg = _triton_rows_candidates(i, o, a.dtype)[0]   # a cached choice it cannot take
    elif cfg.gluon and not gluon_ok(cfg):
      raise ValueError(f"{cfg}: the Gluon row kernel needs a fused 16-bit sum without "
                       f"dgates, a contraction of 16..256 (a power of two), whole column "
                       f"blocks and 3 buffers at least (2 for two halves); got I={i}, O={o}, "
                       f"{jnp.dtype(a.dtype).name}, sum reductions of {red}, "
                       f"dgates={dgate}")
    elif cfg.gluon and not _gluon_device():
      raise ValueError(f"{cfg}: the Gluon row kernel runs on Hopper GPUs (sm90) only; "
                       f"this one is sm{_compute_capability():.1f}")
  out_dtype = _sum_out_dtype(half) if atomic else a.dtype
  # float16 sums of the Gluon kernels are scaled back in the kernel (finish_wanted;
  # not the two-half unit-pair kernel)
  fin = (half == "float16" and finish_wanted()
         and (pcfg.halves == 1 if pcfg is not None else cfg.gluon))
  # checked float16 scales (f16_scales_kind): the scale-back checks every row's sums
  checked = (half == "float16" and not fin and unscale_kind() != "xla"
             and f16_scales_kind() == "checked" and checked_scales_pay(i, o, a_rows,
                                                                        out_rows))
  gates, sampled = scale, None
  if checked:
    row_s, scale, sampled = _f16_row_scales_checked(a, w, transpose_w, routing, scale,
                                                    a_rows, out_rows)
  elif half == "float16":
    w_l1 = _max_l1(w, 2 if transpose_w else 1)
    row_s, scale = _f16_row_scales(a, w_l1, routing, scale, a_rows, out_rows)
  inv_s = 1.0 / row_s if fin else None
  if pcfg is not None:      # a SwitchHead routing's unit pairs: one reduction per unit
    out = gluon_pairs_sum(a, w, routing, scale, pcfg, a_rows=a_rows, out_rows=out_rows,
                          transpose_w=transpose_w, out_dtype=out_dtype, fin=inv_s)
    dg = None
  else:
    if cfg.gluon:      # tiles of halves * block_m rows
      tiles = _sum_tiles(routing, cfg.halves * cfg.block_m)
      out = gluon_rows_sum(a, w, routing, tiles, scale, cfg, a_rows=a_rows,
                           out_rows=out_rows, transpose_w=transpose_w, out_dtype=out_dtype,
                           fin=inv_s)
      dg = None
    else:
      tiles = _sum_tiles(routing, cfg.block_m) if atomic else routing.tiles(cfg.block_m)
      z = tiles.shape[1]
      n_nb = -(-o // cfg.block_n)
      loop_n = cfg.loop_n and i <= cfg.block_k
      out_shapes = [jax.ShapeDtypeStruct((n * out_rows, o), out_dtype),
                    jax.ShapeDtypeStruct((p, n_nb) if dgate else (1,), jnp.float32)]
      args = [a, w, routing.order, tiles,
              scale if scale is not None else _DUMMY_F32(),
              dgate_rows if dgate else _DUMMY_F32()]
      out, dg = _launch(
          _rows_kernel, args, out_shapes, z if loop_n else z * n_nb, cfg,
          zeroed=(0,) if atomic else (),
          Z=z, I=i, O=o, K=k, A_R=a_rows, O_R=out_rows, C_R=c_rows,
          SW_E=sw[0], SW_I=sw[1], SW_O=sw[2], BM=cfg.block_m, BN=cfg.block_n,
          BK=cfg.block_k, HAS_SCALE=scale is not None, ATOMIC=atomic, DGATE=dgate,
          IEEE=a.dtype == jnp.float32, LOOP_N=loop_n, RED=red, F16=half == "float16")
      dg = dg.sum(axis=1) if dgate else None
  if checked:
    out = unscale_rows_checked(out, 1.0 / row_s, sampled, a, w, routing, gates, a.dtype,
                               a_rows=a_rows, out_rows=out_rows, transpose_w=transpose_w,
                               reverse=unscale_kind() == "triton")
  elif half == "float16" and not fin:
    out = _f16_unscale(out, row_s, a.dtype)
  return out, dg


def _w_layout(w_shape, transpose_w: bool) -> tuple[int, int, tuple]:
  """(I, O, element strides (expert, contraction, column)) of the expert matrices of
  shape [E, I, O], or [E, O, I] used transposed."""
  if transpose_w:
    _, o, i = w_shape
    return i, o, (i * o, 1, i)          # W^T[e][i', o'] = w[e, o', i']
  _, i, o = w_shape
  return i, o, (i * o, o, 1)


def gluon_rows_sum(a, w, routing: Routing, tiles, scale, cfg: TileConfig, *, a_rows: int,
                   out_rows: int, transpose_w: bool, out_dtype, probe: int = 0,
                   fin: jax.Array | None = None) -> jax.Array:
  """One launch of a Gluon fused-sum row kernel (:mod:`kernels.cvmm_gluon`): the row
  kernel, or with ``cfg.halves`` 2 the two-half kernel (``tiles`` of 2 * block_m rows,
  each column block of the expert's matrix copied once for both halves; 3 or 4 parts
  likewise, for probes). out
  [N * out_rows, O] (zeroed, then every tile's scaled rows added in ``out_dtype``,
  float16 or bf16), for :func:`rows_matmul` (which scales float16 sums back) and the
  probe (``probe``: the row kernel's PROBE setting, bench/gluon_rows_probe.py).

  ``fin``: None, or with float16 sums the rows' inverse scales [N * out_rows] float32:
  the kernel then finishes the sums itself (:func:`_finish_args`) and out is in a's
  dtype."""
  from kernels import cvmm_gluon  # noqa: PLC0415
  cvmm_gluon.install_launcher()
  n, k = routing.n_tokens, routing.k
  z = tiles.shape[1]
  meta = gluon_rows_meta(w.shape, transpose_w, cfg, z=z, k=k, a_rows=a_rows,
                         out_rows=out_rows, has_scale=scale is not None,
                         f16=jnp.dtype(out_dtype) == jnp.float16, probe=probe,
                         fin_dtype=None if fin is None else a.dtype, n_tokens=n)
  kernel = cvmm_gluon._rows2_sum_kernel if cfg.halves > 1 else cvmm_gluon._rows_sum_kernel
  rs, shapes, zeroed = _finish_args(fin, n * out_rows, meta, out_dtype)
  out, _ = _launch(
      kernel, [a, w, routing.order, tiles, scale if scale is not None else _DUMMY_F32(), rs],
      shapes, z, cfg, zeroed=zeroed, **meta)
  return _finished(out, fin, a.dtype)


# Rows per group of a finishing kernel's arrival counts (:func:`_finish_args`).
FINISH_GROUP = 32


def finish_wanted() -> bool:
  """Whether the Gluon kernels scale their float16 sums back themselves (opt-in,
  CVMM_FINISH=1): each group of :data:`FINISH_GROUP` output rows counts its arrivals,
  and the program that completes a group multiplies its rows by their inverse scales
  and stores them in the input's dtype, in place, while the sum's other programs
  still run. By default XLA does this in a pass of its own after the kernel, which
  measured faster: on an H200 at MoEUT_244M the two-half kernel took 1.32-1.34 ms
  finishing against 1.07-1.11 ms plus XLA's 0.081 ms pass (bench/RESULTS.md,
  fifteenth session; the counts alone cost 0.07-0.1 ms in a kernel bound by L2)."""
  return env_switch("CVMM_FINISH", default=False)


def _finish_meta(fin_dtype, ro: int) -> dict:
  """The finishing kernels' compile-time arguments (none without ``fin_dtype``, the
  dtype the float16 sums are finished in: bf16 or float16)."""
  if fin_dtype is None:
    return {}
  if jnp.dtype(fin_dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    raise ValueError(f"finishing float16 sums into {jnp.dtype(fin_dtype).name}: "
                     f"expected bfloat16 or float16")
  return dict(FIN=True, FG=FINISH_GROUP, RO=ro,
              FIN_BF16=jnp.dtype(fin_dtype) == jnp.bfloat16)


def _finish_args(fin, ro: int, meta: dict, out_dtype):
  """(inverse-scales input, output shapes, zeroed outputs) of a Gluon sum kernel's
  launch: the sums [ro, O], and the groups' arrival counts (zeroed) where it finishes
  them (``fin``: the rows' inverse scales), else a placeholder."""
  o = meta["O"]
  if fin is None:
    return (_DUMMY_F32(), [jax.ShapeDtypeStruct((ro, o), out_dtype),
                           jax.ShapeDtypeStruct((1,), jnp.int32)], (0,))
  if jnp.dtype(out_dtype) != jnp.float16 or fin.shape != (ro,):
    raise ValueError(f"finishing needs float16 sums and [{ro}] inverse row scales; got "
                     f"{jnp.dtype(out_dtype).name} sums, scales {fin.shape}")
  groups = -(-ro // meta["FG"])
  return (fin.astype(jnp.float32), [jax.ShapeDtypeStruct((ro, o), out_dtype),
                                    jax.ShapeDtypeStruct((groups,), jnp.int32)], (0, 1))


def _finished(out: jax.Array, fin, dtype) -> jax.Array:
  """A Gluon sum kernel's output: the sums, or where it finished them (``fin``) their
  values in ``dtype`` (bf16 bits stored over the float16 buffer)."""
  if fin is None or jnp.dtype(dtype) == jnp.float16:
    return out
  return jax.lax.bitcast_convert_type(out, jnp.dtype(dtype))


def gluon_rows_meta(w_shape, transpose_w: bool, cfg: TileConfig, *, z: int, k: int,
                    a_rows: int, out_rows: int, has_scale: bool, f16: bool,
                    probe: int = 0, fin_dtype=None, n_tokens: int = 1024) -> dict:
  """The Gluon row kernel's compile-time arguments for expert matrices of ``w_shape``
  (:func:`_w_layout`), ``z`` tiles and the tile ``cfg`` (:func:`gluon_rows_sum`, and
  :mod:`kernels.offline` compiling it without a GPU). With ``cfg.halves`` 2 to 4 the
  two-half kernel's (``cfg.block_m`` the height of a part; two matrix buffers; probes
  of its finishing only). ``fin_dtype``: the dtype a finishing kernel stores the sums of its
  ``n_tokens`` * ``out_rows`` rows in (:func:`finish_wanted`), or None."""
  i, o, sw = _w_layout(w_shape, transpose_w)
  meta = dict(Z=z, I=i, O=o, K=k, A_R=a_rows, O_R=out_rows, SW_E=sw[0], SW_I=sw[1],
              SW_O=sw[2], BM=cfg.block_m, BN=cfg.block_n, NW=cfg.num_warps,
              HAS_SCALE=has_scale, F16=f16, **_finish_meta(fin_dtype, n_tokens * out_rows))
  if cfg.halves > 1:
    if probe and fin_dtype is None:
      raise ValueError(f"probe={probe}: the two-half kernel takes probes of its "
                       f"finishing only")
    meta = dict(meta, H=cfg.halves)
    return dict(meta, FIN_PROBE=probe) if probe else meta
  return dict(meta, BUF=cfg.num_stages, PROBE=probe)


# Tiles of the unit-pair kernel (block_m, block_n, warps, buffers per matrix), in
# heuristic order: at MoEUT_244M on an H200 128x64 with 8 warps and 2 buffers (two blocks
# per SM) was the fastest for O's forward (0.520 ms against 0.540 for 64x64, 4 warps;
# bench/RESULTS.md, twelfth session).
UNIT_PAIRS_TILES = ((128, 64, 8, 2), (64, 64, 4, 2), (128, 64, 8, 3), (128, 32, 8, 2))
UNIT_PAIRS_TILE = UNIT_PAIRS_TILES[0]


def _unit_pairs_tile() -> tuple | None:
  """CVMM_UNIT_PAIRS: unset or "1" (the autotuner's choice among
  :data:`UNIT_PAIRS_TILES`) -> (), "0" -> None, "BMxBNxWxB" -> that tile,
  "BMxBNxWx2x2" -> the two-half unit-pair kernel's tile (tiles of 2 * BM units, 2
  buffers). (Whether a routing carries unit pairs:
  :func:`kernels.routing.unit_pairs_wanted`.)"""
  env = os.environ.get("CVMM_UNIT_PAIRS", "1")
  if env == "0":
    return None
  if env == "1":
    return ()
  try:
    tile = tuple(int(v) for v in env.split("x"))
    if len(tile) not in (4, 5) or (len(tile) == 5 and tile[3:] != (2, 2)):
      raise ValueError
  except ValueError:
    raise ValueError(f"CVMM_UNIT_PAIRS={env!r}: expected 0, 1, BMxBNxWARPSxBUFFERS "
                     f"(e.g. 128x64x8x2) or BMxBNxWARPSx2x2 (two halves)") from None
  return tile


def _gluon_tile(tile, i: int) -> TileConfig:
  """The TileConfig of a Gluon kernel's tile (block_m, block_n, warps, buffers[,
  halves]) for a contraction of ``i``: the whole of it in one block, every column
  block in turn."""
  bm, bn, w, b = tile[:4]
  return TileConfig(bm, bn, max(16, autotune.next_pow2(i)), w, b, loop_n=True, gluon=True,
                    halves=tile[4] if len(tile) > 4 else 1)


def unit_pairs_config(routing: Routing, i: int, o: int, dtype, red: int, dgate: bool,
                      out_rows: int, *, a_rows: int = 1, has_scale: bool = True,
                      transpose_w: bool = False,
                      sum_dtype: str | None = None) -> TileConfig | None:
  """The tile of the unit-pair kernel (:func:`gluon_pairs_sum`) for a fused sum, or None
  where it does not apply: the routing carries no :class:`~kernels.routing.UnitPairs`,
  both pairs of a unit do not add into one output row, the sum is not a 16-bit one
  without dgates, the device is no Hopper GPU, the shape is not one the Gluon kernels
  cover, or CVMM_UNIT_PAIRS=0. CVMM_UNIT_PAIRS=BMxBNxWxB names the tile; by default the
  autotuner chooses among :data:`UNIT_PAIRS_TILES` (cached per shape)."""
  if routing.pairs is None or (routing.k // out_rows) % 2 or red != 8 or dgate:
    return None
  tile = _unit_pairs_tile()
  if tile is None or not _gluon_device():
    return None
  from kernels import cvmm_gluon  # noqa: PLC0415
  cands = [_gluon_tile(t, i) for t in ([tile] if tile else UNIT_PAIRS_TILES)
           if cvmm_gluon.rows_sum_supported(i, o, dtype, t[1])]
  if not cands:
    return None
  if tile:                      # the environment named it
    return cands[0]
  return choose_pairs_config(routing.n_tokens, routing.k, routing.n_experts,
                             routing.pairs.block, i, o, dtype, a_rows, out_rows, has_scale,
                             transpose_w, cands, sum_dtype)


def _head_bench_inputs(n, k, e, block, i, o, dtype, a_rows, has_scale, transpose_w):
  """(routing with unit pairs, a, w, scale or None) of an autotuner's timing: a random
  SwitchHead routing of k // 2 heads of ``block`` experts each and random operands."""
  from kernels.routing import make_head_routing  # noqa: PLC0415
  with jax.ensure_compile_time_eval():
    idx = jax.lax.top_k(jax.random.normal(jax.random.key(0), (n, k // 2, block)), 2)[1]
    r = make_head_routing(idx, block, unit_pairs=True)
    a = jax.random.normal(jax.random.key(1), (n * a_rows, i), dtype)
    w = jax.random.normal(jax.random.key(2), (e, o, i) if transpose_w else (e, i, o), dtype)
    sc = jax.random.uniform(jax.random.key(3), (n * k,), jnp.float32) if has_scale else None
  return r, a, w, sc


def choose_pairs_config(n, k, e, block, i, o, dtype, a_rows, out_rows, has_scale,
                        transpose_w, candidates, sum_dtype=None) -> TileConfig:
  """The autotuner's unit-pair tile for this shape (timed on a random SwitchHead
  routing of k // 2 heads of ``block`` experts each)."""
  shape = (n, k, e, block, i, o, a_rows, out_rows, int(has_scale), int(transpose_w))
  out_dtype = _sum_out_dtype(half_sums(dtype, o, sum_dtype))

  def bench(cfg):
    r, a, w, sc = _head_bench_inputs(n, k, e, block, i, o, dtype, a_rows, has_scale,
                                     transpose_w)
    f = autotune.compile_now(
        lambda a, w, r, sc: gluon_pairs_sum(a, w, r, sc, cfg, a_rows=a_rows,
                                            out_rows=out_rows, transpose_w=transpose_w,
                                            out_dtype=out_dtype),
        a, w, r, sc)
    return autotune.time_call(lambda: f(a, w, r, sc))

  return autotune.tuner().choose("gluon_pairs", shape, dtype, candidates,
                                 _bench_or_none(bench))


def gluon_pairs_sum(a, w, routing: Routing, scale, cfg: TileConfig, *, a_rows: int,
                    out_rows: int, transpose_w: bool, out_dtype,
                    fin: jax.Array | None = None) -> jax.Array:
  """One launch of the Gluon unit-pair kernel (:func:`kernels.cvmm_gluon._pairs_sum_kernel`;
  with ``cfg.halves`` 2 the two-half one, ``_pairs2_sum_kernel``, over tiles of 2 *
  block_m units): out [N * out_rows, O] (zeroed, then each tile of units adds its two
  experts' scaled products, combined, in ``out_dtype``: float16 or bf16), for
  :func:`rows_matmul`. ``fin``: as for :func:`gluon_rows_sum` (one-half tiles only)."""
  from kernels import cvmm_gluon  # noqa: PLC0415
  cvmm_gluon.install_launcher()
  pairs = routing.pairs
  n, k = routing.n_tokens, routing.k
  if cfg.halves == 2 and fin is not None:
    raise ValueError(f"{cfg}: the two-half unit-pair kernel does not finish its sums")
  tiles = pairs.tiles(cfg.halves * cfg.block_m)
  z = tiles.shape[1]
  meta = gluon_pairs_meta(w.shape, transpose_w, cfg, z=z, k=k, a_rows=a_rows,
                          out_rows=out_rows, has_scale=scale is not None,
                          f16=jnp.dtype(out_dtype) == jnp.float16,
                          fin_dtype=None if fin is None else a.dtype, n_tokens=n)
  rs, shapes, zeroed = _finish_args(fin, n * out_rows, meta, out_dtype)
  out, _ = _launch(
      cvmm_gluon._pairs2_sum_kernel if cfg.halves == 2 else cvmm_gluon._pairs_sum_kernel,
      [a, w, pairs.lo, pairs.hi, tiles, scale if scale is not None else _DUMMY_F32(), rs],
      shapes, z, cfg, zeroed=zeroed, **meta)
  return _finished(out, fin, a.dtype)


def gluon_pairs_meta(w_shape, transpose_w: bool, cfg: TileConfig, *, z: int, k: int,
                     a_rows: int, out_rows: int, has_scale: bool, f16: bool,
                     fin_dtype=None, n_tokens: int = 1024) -> dict:
  """The unit-pair kernel's compile-time arguments (:func:`gluon_pairs_sum`, and
  :mod:`kernels.offline`); ``fin_dtype`` as for :func:`gluon_rows_meta`."""
  if (k // out_rows) % 2:
    raise ValueError(f"unit pairs: both pairs of a unit must add into one output row "
                     f"(K={k}, out_rows={out_rows})")
  if cfg.halves > 2:
    raise ValueError(f"{cfg}: the unit-pair kernels take tiles of one or two halves")
  i, o, sw = _w_layout(w_shape, transpose_w)
  return dict(Z=z, I=i, O=o, K=k, A_R=a_rows, O_R=out_rows, SW_E=sw[0], SW_I=sw[1],
              SW_O=sw[2], BM=cfg.block_m, BN=cfg.block_n, BUF=cfg.num_stages,
              NW=cfg.num_warps, HAS_SCALE=has_scale, F16=f16,
              **_finish_meta(fin_dtype, n_tokens * out_rows))


# Most output columns the unit-store kernel keeps on chip: two [BM, O] float32 products.
UNITS_MAX_COLS = 256


def units_store_wanted() -> bool:
  """Sums whose output rows each take exactly one unit's two pairs (SwitchHead O's dx:
  a head's two experts into that head's row) run the unit-store kernel
  (:func:`units_store`) where the routing carries unit pairs, unless CVMM_UNIT_STORE=0.
  On an H200 at MoEUT_244M it took O's forward+backward from 1.593 to 1.423 ms
  (bench/RESULTS.md, fourteenth session)."""
  return env_switch("CVMM_UNIT_STORE")


def units_store_applies(routing: Routing, o: int, a_rows: int, out_rows: int,
                        c_rows: int | None) -> bool:
  """Whether :func:`units_store` can compute this sum: the routing carries unit pairs,
  every output row takes the two pairs of one unit (K // out_rows == 2), dgates (if
  any, ``c_rows``) dot one row per unit, and O <= :data:`UNITS_MAX_COLS`."""
  k = routing.k
  return (routing.pairs is not None and out_rows * 2 == k and o <= UNITS_MAX_COLS
          and (c_rows is None or (k // c_rows) % 2 == 0) and k % a_rows == 0)


def _units_candidates(o: int, dtype) -> list[TileConfig]:
  bn = max(16, autotune.next_pow2(o))
  if jnp.dtype(dtype).itemsize >= 4:
    raw = [(64, 32, 4, 2), (32, 32, 4, 2)]
  else:
    # Two [BM, O] float32 products per program: 64-row tiles with 8 warps compile for
    # sm90 without spills at SwitchHead O's dx (O = 128, I = 1024: 165-201 registers);
    # 128-row tiles and 4 warps spill (bench/sass_stats.py --units).
    raw = [(64, 64, 8, 3), (64, 32, 8, 4), (64, 64, 8, 4), (64, 128, 8, 2)]
  return [TileConfig(bm, bn, bk, w, st) for bm, bk, w, st in raw]


def choose_units_config(n, k, e, block, i, o, dtype, a_rows, out_rows, c_rows,
                        has_scale, transpose_w) -> TileConfig:
  """The autotuner's tile for :func:`units_store` (timed on a random SwitchHead routing
  of k // 2 heads of ``block`` experts each)."""
  shape = (n, k, e, block, i, o, a_rows, out_rows, c_rows or 0, int(has_scale),
           int(transpose_w))

  def bench(cfg):
    r, a, w, sc = _head_bench_inputs(n, k, e, block, i, o, dtype, a_rows, has_scale,
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

  return autotune.tuner().choose("triton_units", shape, dtype, _units_candidates(o, dtype),
                                 _bench_or_none(bench))


def units_store(a, w, routing: Routing, scale, dgate_rows, cfg: TileConfig, *,
                a_rows: int, out_rows: int, c_rows: int, transpose_w: bool):
  """out[orow(u)] = sum over the two pairs p of unit u of scale[p] * a[arow(p)] @ W_e(p)
  (and dgates[p] = the unscaled product . dgate_rows[crow(p)]), one launch of
  :func:`_units_kernel` over the routing's unit tiles: each output row is written once,
  so there is no zeroing, no atomic and no 16-bit sum. Returns (out [N * out_rows, O] in
  a's dtype, dgates [P] float32 or None). See :func:`units_store_applies`."""
  n, k = routing.n_tokens, routing.k
  i, o, sw = _w_layout(w.shape, transpose_w)
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
          scale if scale is not None else _DUMMY_F32(),
          dgate_rows if dgate else _DUMMY_F32()]
  out, dg = _launch(_units_kernel, args, out_shapes, z, cfg,
                    Z=z, I=i, O=o, K=k, A_R=a_rows, O_R=out_rows, C_R=c_rows,
                    SW_E=sw[0], SW_I=sw[1], SW_O=sw[2], BM=cfg.block_m, BN=cfg.block_n,
                    BK=cfg.block_k, HAS_SCALE=scale is not None, DGATE=dgate,
                    IEEE=a.dtype == jnp.float32)
  return out, (dg if dgate else None)


def _gluon_rows_ok(i: int, o: int, dtype, red: int, dgate: bool):
  """cfg -> whether the Gluon row kernel (:mod:`kernels.cvmm_gluon`) can run this call:
  a fused 16-bit sum (8-wide reductions: sm90+, not the interpreter), no dgates, and
  the shapes :func:`kernels.cvmm_gluon.rows_sum_supported` names. (The device, a
  Hopper GPU, is :func:`_gluon_device`.)"""
  def ok(cfg: TileConfig) -> bool:
    if red != 8 or dgate:
      return False
    if cfg.halves == 1 and cfg.num_stages < 3:     # the row kernel: 3 buffers at least
      return False
    from kernels import cvmm_gluon  # noqa: PLC0415
    return cvmm_gluon.rows_sum_supported(i, o, dtype, cfg.block_n)
  return ok


def _compute_capability() -> float:
  return float(getattr(jax.devices()[0], "compute_capability", "0.0"))


def _gluon_device() -> bool:
  """Whether the default device runs the Gluon row kernel: a Hopper GPU (its wgmma
  instructions are sm90's; Blackwell has others), not Triton's interpreter."""
  return not _interpret() and 9.0 <= _compute_capability() < 10.0


def bf16_sums(dtype, o: int, sum_dtype: str | None = None) -> bool:
  """Whether the fused sums of a bf16 CVMM add into a bf16 output (opt-in).

  By default the fused sums add float32 rows into a float32 output, cast to the
  input dtype at the end. ``sum_dtype="bfloat16"`` (or, when it is None, the
  environment's ``CVMM_SUM_DTYPE=bfloat16``) makes bf16 calls add rows
  rounded to bf16 into a bf16 output (``red.global.add.noftz.v4.bf16x2``, Hopper and
  newer): half the L2 traffic of the reductions and no cast, but each of the K
  additions into an output element rounds to bf16 (relative error of the sums about
  3x that of float32 sums rounded once), and the rounding depends on the order in
  which the tiles add. float32 calls, widths that are not a multiple of 8, older
  GPUs and Triton's interpreter always sum in float32.
  """
  return (sum_dtype_of(sum_dtype) == "bfloat16" and jnp.dtype(dtype) == jnp.bfloat16
          and o % 8 == 0 and not _interpret() and _compute_capability() >= 9.0)


def half_sums(dtype, o: int, sum_dtype: str | None = None) -> str | None:
  """The 16-bit dtype the fused sums of a CVMM with ``dtype`` inputs and ``o`` output
  columns add in ("float16" or "bfloat16"), or None for float32 sums.

  ``sum_dtype`` (None: the environment's CVMM_SUM_DTYPE, default "float16"):
    "float16"   16-bit inputs: each output row is multiplied by a power of two, the
                rows are added in float16 and scaled back in float32. The power of
                two comes from an estimate, rows that overflow or come out too small
                being recomputed in float32 (checked scales, :func:`f16_scales_kind`,
                where :func:`checked_scales_pay`), or from a bound on the sum of the
                row's terms (:func:`_pow2_scale`; over the row's pairs, the sum of
                |gate| times the input row's largest |value| times the expert
                matrix's largest column sum of |W|), which no float16 sum can
                overflow. Each addition rounds to float16's 11-bit
                significand, 8x finer than bf16. Vector reductions on Hopper (8 per
                instruction), scalar float16 atomics elsewhere and in Triton's
                interpreter.
    "bfloat16"  see :func:`bf16_sums`.
  """
  sd = sum_dtype_of(sum_dtype)
  if sd == "float16" and jnp.dtype(dtype).itemsize == 2:
    return "float16"
  if sd == "bfloat16" and bf16_sums(dtype, o, sd):
    return "bfloat16"
  return None


def _red_width(o: int, dtype=jnp.float32, sum_dtype: str | None = None) -> int:
  """Elements per atomic reduction instruction of the fused sums.

  Hopper (sm90+) has vector reductions (``red.global.add.v2/v4.f32``): one
  instruction adds 2 or 4 adjacent floats. Elsewhere (and in Triton's interpreter)
  scalar ``tl.atomic_add``. On the H200, v4 and scalar measured the same (the L2's
  per-element reduction rate is the limit; v2 was slower, bench/RESULTS.md); the
  benchmarks there ran with v4. CVMM_RED_VEC=1/2/4 overrides. The width must divide
  O so that a vector never straddles a row end. 8 means 16-bit sums
  (:func:`half_sums`): eight float16 or bf16 per instruction.
  """
  half = half_sums(dtype, o, sum_dtype)
  if half is not None:
    vec = o % 8 == 0 and not _interpret() and _compute_capability() >= 9.0
    return 8 if vec else 1          # (bf16 sums exist only where vec holds)
  env = os.environ.get("CVMM_RED_VEC")
  if _interpret():
    return 1
  if env:
    width = int(env)
  else:
    width = 4 if _compute_capability() >= 9.0 else 1
  while width > 1 and o % width:
    width //= 2
  return width


def _sum_out_dtype(half: str | None):
  """dtype of an output that a kernel sums into (``half``: from :func:`half_sums`)."""
  return jnp.dtype(half) if half is not None else jnp.dtype(jnp.float32)


# float16 sums scale each output row so that the bound of its sum is below 2^14
# (float16's largest finite value, 65504, is just under 2^16).
_F16_BOUND_LOG2 = 14


def _pow2_scale(bound: jax.Array) -> jax.Array:
  """float32 powers of two s with bound * s < 2^14 (s within [2^-126, 2^126]); 1 where
  the bound is 0 (every term is 0) or not finite (inf/nan inputs give inf/nan)."""
  bound = bound.astype(jnp.float32)
  _, ex = jnp.frexp(bound)                  # bound = m * 2^ex, 0.5 <= m < 1
  s = jnp.ldexp(jnp.ones_like(bound), jnp.clip(_F16_BOUND_LOG2 - ex, -126, 126))
  return jnp.where(jnp.isfinite(bound) & (bound > 0), s, 1.0)


def _max_l1(w: jax.Array, axis: int) -> jax.Array:
  """[E] float32: each expert's largest sum of absolute values along ``axis`` (the
  contracted one) of w [E, ., .], a bound on |row @ W[e]| per unit of the row's
  largest absolute value. Per expert, so that one expert's large weights do not push
  the other experts' sums down towards float16's subnormals."""
  return jnp.max(jnp.sum(jnp.abs(w).astype(jnp.float32), axis=axis), axis=1)


def _f16_row_scales(a, w_l1, routing: Routing, scale, a_rows: int, out_rows: int):
  """Row scales of float16 sums for :func:`rows_matmul`: (s [N * out_rows] float32, the
  per-pair scale [P] float32 to apply in the kernel: scale[p] * s[orow(p)]).

  The bound of output row r is the sum over its pairs p of |scale[p]| *
  max|a[arow(p)]| * w_l1[e(p)] (w_l1: :func:`_max_l1`)."""
  n, k = routing.n_tokens, routing.k
  amax = jnp.max(jnp.abs(a), axis=1).astype(jnp.float32).reshape(n, a_rows)
  terms = jnp.repeat(amax, k // a_rows, axis=1) * w_l1[routing.expert_index]  # [N, K]
  sc = None if scale is None else scale.astype(jnp.float32).reshape(n, k)
  if sc is not None:
    terms = terms * jnp.abs(sc)
  bound = terms.reshape(n, out_rows, k // out_rows).sum(axis=2)         # [N, out_rows]
  return _row_and_pair_scales(_pow2_scale(bound), sc, k // out_rows)


def _row_and_pair_scales(s: jax.Array, sc, kr: int):
  """(s [N * R], the per-pair scales [P] = sc[p] * s[orow(p)]) of row scales s [N, R]
  with KR pairs a row and per-pair scales sc [N, K] float32 (None: ones)."""
  pair_s = jnp.repeat(s, kr, axis=1)                                    # [N, K]
  return s.reshape(-1), (pair_s if sc is None else sc * pair_s).reshape(-1)


_F16_SCALES = ("checked", "bound")


def f16_scales_kind() -> str:
  """How float16 sums choose their rows' scales (CVMM_F16_SCALES):

  - "checked" (default; with the Triton scale-back, :func:`unscale_kind`, where
    :func:`checked_scales_pay`): a power of two per output row from an estimate that
    reads each token's first input row and an eighth of the matrices
    (:func:`_f16_row_scales_checked`). The scale-back checks
    every row's sums and recomputes in float32 the rows that overflowed float16 (inf
    or nan: float16 overflow is sticky) or came out too small to keep float16's
    precision (:func:`unscale_rows_checked`). No pass over all of the input or the
    matrices before the sums.
  - "bound": a bound on every term from each input row's largest value and each
    expert's largest column sum (:func:`_f16_row_scales`): two full passes, and no
    row can overflow.
  """
  how = os.environ.get("CVMM_F16_SCALES", "checked")
  if how not in _F16_SCALES:
    raise ValueError(f"CVMM_F16_SCALES={how!r}: expected one of {_F16_SCALES}")
  return how


def checked_scales_pay(i: int, o: int, a_rows: int, out_rows: int) -> bool:
  """Whether checked float16 scales (:func:`f16_scales_kind`) replace bound ones for a
  sum whose tokens have a_rows input rows of I values and out_rows output rows of O:
  where the input holds at least as many values per token as the output. The bound's
  pass over the whole input then costs more than the estimate's small steps and the
  scale-back's check together (H200, MoEUT_244M: the σ-MoE down projection's forward
  1.152 -> 1.085 ms; input rows of 2048 values a token, output rows of 1024). For
  SwitchHead O's forward (512 against 1024) the bound's passes take 0.027 ms, about
  what the check and the estimate cost, so it keeps the exact bound."""
  return a_rows * i >= out_rows * o


# Checked float16 sums: the estimate aims each row's largest term at 2^(hi - 2) with
# hi = 15 - ceil(log2 KR) for KR terms a row (so that KR such terms sum to at most 2^13,
# 2^3 below float16's largest finite value, 65504); a row whose largest |sum| is below
# 2^0 (entries down to 2^-14 of it stay float16 normals), or all zero where its token's
# sample was not, is recomputed.
_CHECK_LO_LOG2 = 0
_CHECK_AIM_BELOW = 2
# Every _SAMPLE_STRIDE-th slab along axis 1 of the matrices goes into the estimate.
_SAMPLE_STRIDE = 8


def _sampled_max_l1(w: jax.Array, transpose_w: bool) -> jax.Array:
  """[E] float32 estimate of :func:`_max_l1` from every 8th slab along axis 1 of w
  (contiguous either way): w [E, I, O] sums the sampled contraction rows and scales
  by their share; w [E, O, I] (used transposed) sums whole contractions of the sampled
  columns."""
  ws = jnp.abs(w[:, ::_SAMPLE_STRIDE, :]).astype(jnp.float32)
  if transpose_w:
    return jnp.max(jnp.sum(ws, axis=2), axis=1)
  return jnp.max(jnp.sum(ws, axis=1), axis=1) * (w.shape[1] / ws.shape[1])


def _f16_row_scales_checked(a, w, transpose_w: bool, routing: Routing, scale, a_rows: int,
                            out_rows: int):
  """Row scales of checked float16 sums (:func:`f16_scales_kind`): (s [N * out_rows]
  float32, the per-pair scale [P] float32 for the kernel, as :func:`_f16_row_scales`,
  and [N * out_rows] int8: 1 where the estimate's sample was not 0).

  Each output row's estimate is its token's first input row's largest |value| times
  the largest |scale[p]| * sampled column sum (:func:`_sampled_max_l1`) of its pairs;
  s puts it at 2^(hi - 2) (see _CHECK_LO_LOG2). Rows whose estimate is 0 take the
  largest estimate's scale. The scale-back checks each row and repairs it where the
  estimate was wrong, so the estimate only has to be good for speed."""
  n, k = routing.n_tokens, routing.k
  kr = k // out_rows
  amax = jnp.max(jnp.abs(a.reshape(n, a_rows, -1)[:, 0, :]), axis=1).astype(jnp.float32)
  terms = _sampled_max_l1(w, transpose_w)[routing.expert_index]                # [N, K]
  sc = None if scale is None else scale.astype(jnp.float32).reshape(n, k)
  if sc is not None:
    terms = terms * jnp.abs(sc)
  est = amax[:, None] * jnp.max(terms.reshape(n, out_rows, kr), axis=2)        # [N, out_rows]
  sampled = est > 0
  est = jnp.where(sampled, est, jnp.max(est))
  hi = 15 - int(np.ceil(np.log2(kr)))
  s = _pow2_scale(est * 2.0 ** (_F16_BOUND_LOG2 - (hi - _CHECK_AIM_BELOW)))
  return _row_and_pair_scales(s, sc, kr) + (sampled.reshape(-1).astype(jnp.int8),)


def _f16_unscale(out: jax.Array, row_s: jax.Array, dtype) -> jax.Array:
  """The rows of a float16 sum with each row's scale (:func:`_f16_row_scales`) taken
  back out: rows in ``dtype`` (a's: every caller casts to it) from
  :func:`unscale_rows` (the default, CVMM_UNSCALE=triton or triton_fwd), or float32
  rows from XLA's pass (CVMM_UNSCALE=xla). The same values either way."""
  how = unscale_kind()
  if how != "xla":
    return unscale_rows(out, 1.0 / row_s, dtype, reverse=how == "triton")
  return out.astype(jnp.float32) * (1.0 / row_s)[:, None]


_UNSCALE_KINDS = ("triton", "triton_fwd", "xla")


def unscale_kind() -> str:
  """How float16 sums are scaled back (CVMM_UNSCALE): "triton" (default),
  :func:`unscale_rows` in place, last rows first; "triton_fwd", the same, first rows
  first; "xla", a fused XLA pass that returns float32 rows. On an H200 at MoEUT_244M
  the kernel takes 0.063 ms per [65,536, 1024] output against XLA's 0.081 ms, and the
  two orders timed the same (bench/RESULTS.md, sixteenth session)."""
  how = os.environ.get("CVMM_UNSCALE", "triton")
  if how not in _UNSCALE_KINDS:
    raise ValueError(f"CVMM_UNSCALE={how!r}: expected one of {_UNSCALE_KINDS}")
  return how


# Rows per program of :func:`unscale_rows`.
UNSCALE_ROWS = 8


@_jit
def _unscale_kernel(x_ptr, inv_ptr, y_ptr, R, O: tl.constexpr, BR: tl.constexpr,
                    BO: tl.constexpr, REVERSE: tl.constexpr, BF16: tl.constexpr):
  """y[r] = x[r] * inv[r] for BR rows per program, rounded to bf16 (BF16) or float16
  and stored as 16-bit patterns in y (float16), which may be x itself. REVERSE: the
  last rows first, where the sums' last reductions left them in L2."""
  pid = tl.program_id(0)
  blk = tl.num_programs(0) - 1 - pid if REVERSE else pid
  rows = blk * BR + tl.arange(0, BR)
  rmask = rows < R
  inv = tl.load(inv_ptr + rows, mask=rmask, other=0.0)
  base = rows.to(tl.int64)[:, None] * O
  for c in tl.static_range(0, O, BO):
    cols = c + tl.arange(0, BO)
    m = rmask[:, None] & (cols[None, :] < O)
    v = tl.load(x_ptr + base + cols[None, :], mask=m, other=0.0).to(tl.float32)
    tl.store(y_ptr + base + cols[None, :], _round16(v * inv[:, None], BF16), mask=m)


@_jit
def _round16(v, BF16: tl.constexpr):
  """float32 v rounded to bf16 (BF16) or float16, as float16 bit patterns. bf16: to
  nearest even on the bits (Triton's interpreter truncates), nan stays a quiet nan."""
  if BF16:
    b = v.to(tl.uint32, bitcast=True)
    r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
    r = tl.where(v != v, (b >> 16) | 0x40, r)
    return r.to(tl.uint16).to(tl.float16, bitcast=True)
  else:
    return v.to(tl.float16)


def unscale_rows(out: jax.Array, inv_s: jax.Array, dtype, *, reverse: bool = True):
  """out [R, O] float16 sums times their rows' inverse scales inv_s [R], in ``dtype``
  (bf16 or float16), by a Triton kernel that writes over ``out``'s buffer (bf16 bits
  in place; XLA copies ``out`` first only where it is still used). ``reverse``: the
  last rows first (:func:`_unscale_kernel`)."""
  r, o = out.shape
  dtype = jnp.dtype(dtype)
  if out.dtype != jnp.float16 or inv_s.shape != (r,):
    raise ValueError(f"unscale_rows: float16 [R, O] sums and [R] scales; got "
                     f"{out.dtype.name} {out.shape}, scales {inv_s.shape}")
  if dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    raise ValueError(f"unscale_rows: rows in bfloat16 or float16, not {dtype.name}")
  bo = min(autotune.next_pow2(o), 1024)
  cfg = TileConfig(block_m=16, block_n=16, block_k=16, num_warps=4, num_stages=1)  # launch
  args = [out, inv_s.astype(jnp.float32)]
  shapes = [jax.ShapeDtypeStruct((r, o), jnp.float16)]
  (y,) = _launch(_unscale_kernel, args, shapes, -(-r // UNSCALE_ROWS), cfg, aliases={0: 0},
                 R=r, O=o, BR=UNSCALE_ROWS, BO=bo, REVERSE=reverse,
                 BF16=dtype == jnp.bfloat16)
  return y if dtype == jnp.float16 else jax.lax.bitcast_convert_type(y, dtype)


@_jit
def _unscale_checked_kernel(
    x_ptr, inv_ptr, nz_ptr,   # [R, O] float16 sums, [R] inverse scales, [R] int8 sampled
    y_ptr,                    # [R, O] 16-bit patterns, may be x itself
    cnt_ptr, list_ptr,        # [1] int32 (zeroed) rows to repair, [R] int32 their indices
    R, O: tl.constexpr, BR: tl.constexpr, BO: tl.constexpr, REVERSE: tl.constexpr,
    BF16: tl.constexpr, LO: tl.constexpr):
  """:func:`_unscale_kernel` for checked float16 sums: a row whose sums are not all
  finite (float16 overflowed), or whose largest |sum| is below LO and not 0, or 0 where
  its token's sample was not (nz), is not scaled back but appended to the list of rows
  that :func:`_repair_rows_kernel` recomputes (its count in cnt)."""
  pid = tl.program_id(0)
  blk = tl.num_programs(0) - 1 - pid if REVERSE else pid
  rows = blk * BR + tl.arange(0, BR)
  rmask = rows < R
  inv = tl.load(inv_ptr + rows, mask=rmask, other=0.0)
  nz = tl.load(nz_ptr + rows, mask=rmask, other=0)
  base = rows.to(tl.int64)[:, None] * O
  # each row's largest |sum| (inf where one is not finite: nan compares false)
  mx = tl.zeros((BR,), tl.float32)
  for c in tl.static_range(0, O, BO):
    cols = c + tl.arange(0, BO)
    m = rmask[:, None] & (cols[None, :] < O)
    v = tl.load(x_ptr + base + cols[None, :], mask=m, other=0.0).to(tl.float32)
    mx = tl.maximum(mx, tl.max(tl.where(v == v, tl.abs(v), float("inf")), axis=1))
  ok = (mx < float("inf")) & ((mx >= LO) | ((mx == 0) & (nz == 0)))
  if O <= BO:         # one block, still in registers (rows to recompute left alone)
    tl.store(y_ptr + base + cols[None, :], _round16(v * inv[:, None], BF16),
             mask=m & ok[:, None])
  else:               # several blocks: the rows' maxima first, then the stores
    for c in tl.static_range(0, O, BO):
      cols = c + tl.arange(0, BO)
      m = rmask[:, None] & ok[:, None] & (cols[None, :] < O)
      v = tl.load(x_ptr + base + cols[None, :], mask=m, other=0.0).to(tl.float32)
      tl.store(y_ptr + base + cols[None, :], _round16(v * inv[:, None], BF16), mask=m)
  bad = (rmask & (ok == 0)).to(tl.int32)
  nb = tl.sum(bad, axis=0)
  if nb > 0:          # one atomic a program with rows to repair, then their places
    at = tl.atomic_add(cnt_ptr, nb)
    tl.store(list_ptr + at + tl.cumsum(bad, axis=0) - 1, rows, mask=bad > 0)


@_jit
def _repair_rows_kernel(
    x_ptr,                    # [R, O] 16-bit rows (aliased with y)
    cnt_ptr, list_ptr,        # [1] int32 rows to repair, [R] int32 their indices
    a_ptr, w_ptr,             # the sum's input rows [Ra, I] and matrices (strides SW_*)
    eidx_ptr, g_ptr,          # [P] expert and unscaled per-pair scale (if HAS_G)
    y_ptr,                    # [R, O] 16-bit patterns: x's buffer
    O: tl.constexpr, FO: tl.constexpr, NCOL: tl.constexpr, BF16: tl.constexpr,
    K: tl.constexpr, A_R: tl.constexpr, O_R: tl.constexpr, I: tl.constexpr,
    BI: tl.constexpr, SW_E: tl.constexpr, SW_I: tl.constexpr, SW_O: tl.constexpr,
    HAS_G: tl.constexpr):
  """The rows that :func:`_unscale_checked_kernel` listed, recomputed in float32 and
  rounded once: y[r] = sum over r's pairs p of g[p] * a[arow(p)] @ W[e(p)]. Program
  pid takes FO columns (pid % NCOL) of every (num_programs / NCOL)-th listed row, so
  that a row's columns are recomputed side by side; with no row listed every program
  only reads the count."""
  pid = tl.program_id(0)
  col = pid % NCOL
  step = tl.num_programs(0) // NCOL
  n = tl.load(cnt_ptr)
  KR: tl.constexpr = K // O_R
  fcols = col * FO + tl.arange(0, FO)
  fcm = fcols < O
  for t in range(pid // NCOL, n, step):
    row = tl.load(list_ptr + t)
    tok = row // O_R
    first = (row % O_R) * KR                         # the row's first slot
    acc = tl.zeros((FO,), tl.float32)
    for q in range(KR):
      p = tok * K + first + q
      e = tl.load(eidx_ptr + p).to(tl.int64)
      arow = (tok * A_R + (first + q) // (K // A_R)).to(tl.int64)
      part = tl.zeros((FO,), tl.float32)
      for k0 in tl.static_range(0, I, BI):
        ks = k0 + tl.arange(0, BI)
        kmask = ks < I
        arv = tl.load(a_ptr + arow * I + ks, mask=kmask, other=0.0).to(tl.float32)
        wv = tl.load(w_ptr + e * SW_E + ks[:, None] * SW_I + fcols[None, :] * SW_O,
                     mask=kmask[:, None] & fcm[None, :], other=0.0).to(tl.float32)
        part += tl.sum(arv[:, None] * wv, axis=0)
      if HAS_G:
        part = part * tl.load(g_ptr + p).to(tl.float32)
      acc += part
    tl.store(y_ptr + row.to(tl.int64) * O + fcols, _round16(acc, BF16), mask=fcm)


# Columns per program of a recomputed row, at most the contraction's values per step,
# and about how many programs the repair launches (:func:`unscale_rows_checked`).
CHECKED_FIX_COLS = 64
CHECKED_FIX_I = 128
CHECKED_FIX_PROGRAMS = 1024


def unscale_checked_meta(o: int, *, reverse: bool, bf16: bool) -> dict:
  """:func:`_unscale_checked_kernel`'s compile-time arguments for rows of ``o`` values
  (:func:`unscale_rows_checked`, and :mod:`kernels.offline` compiling it)."""
  return dict(O=o, BR=UNSCALE_ROWS, BO=min(autotune.next_pow2(o), 1024), REVERSE=reverse,
              BF16=bf16, LO=2.0 ** _CHECK_LO_LOG2)


def repair_rows_meta(w_shape, transpose_w: bool, *, k: int, a_rows: int, out_rows: int,
                     bf16: bool, has_g: bool) -> dict:
  """:func:`_repair_rows_kernel`'s compile-time arguments for expert matrices of
  ``w_shape`` (:func:`_w_layout`; :func:`unscale_rows_checked`, and
  :mod:`kernels.offline` compiling it)."""
  i, o, sw = _w_layout(w_shape, transpose_w)
  fo = min(CHECKED_FIX_COLS, autotune.next_pow2(o))
  return dict(O=o, FO=fo, NCOL=-(-o // fo), BF16=bf16, K=k, A_R=a_rows, O_R=out_rows, I=i,
              BI=min(CHECKED_FIX_I, autotune.next_pow2(i)), SW_E=sw[0], SW_I=sw[1],
              SW_O=sw[2], HAS_G=has_g)


def unscale_rows_checked(out: jax.Array, inv_s: jax.Array, sampled: jax.Array,
                         a: jax.Array, w: jax.Array, routing: Routing, gates, dtype, *,
                         a_rows: int, out_rows: int, transpose_w: bool,
                         reverse: bool = True):
  """:func:`unscale_rows` for checked float16 sums (:func:`f16_scales_kind`): out [R, O]
  float16 sums times inv_s [R], in ``dtype``, in place. Rows that overflowed (a sum
  not finite), whose largest |sum| is below 2^0 but not 0, or that are all 0 where
  ``sampled`` [R] (int8, :func:`_f16_row_scales_checked`) is 1, are recomputed in
  float32 from a, w, the routing's experts and the unscaled per-pair ``gates`` [P]
  (or None) instead, and rounded once: the scale-back lists them, and a second kernel
  (:func:`_repair_rows_kernel`) spreads each listed row's columns over its programs.
  With no row listed the second kernel costs one launch."""
  r, o = out.shape
  dtype = jnp.dtype(dtype)
  n, k = routing.n_tokens, routing.k
  i, o_w, sw = _w_layout(w.shape, transpose_w)
  if (out.dtype != jnp.float16 or inv_s.shape != (r,) or sampled.shape != (r,)
      or r != n * out_rows or o_w != o or a.shape != (n * a_rows, i)):
    raise ValueError(f"unscale_rows_checked: float16 [N * out_rows, O] sums with [R] "
                     f"scales and sample flags, a [N * a_rows, I]; got {out.dtype.name} "
                     f"{out.shape}, scales {inv_s.shape}, flags {sampled.shape}, "
                     f"a {a.shape}, w {w.shape} (transposed: {transpose_w}), N={n}, K={k}")
  if dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    raise ValueError(f"unscale_rows_checked: rows in bfloat16 or float16, not {dtype.name}")
  bf16 = dtype == jnp.bfloat16
  cfg = TileConfig(block_m=16, block_n=16, block_k=16, num_warps=4, num_stages=1)  # launch
  shapes = [jax.ShapeDtypeStruct((r, o), jnp.float16),
            jax.ShapeDtypeStruct((1,), jnp.int32), jax.ShapeDtypeStruct((r,), jnp.int32)]
  y, cnt, rows = _launch(_unscale_checked_kernel,
                         [out, inv_s.astype(jnp.float32), sampled.astype(jnp.int8)],
                         shapes, -(-r // UNSCALE_ROWS), cfg, zeroed=(1,), aliases={0: 0},
                         R=r, **unscale_checked_meta(o, reverse=reverse, bf16=bf16))
  meta = repair_rows_meta(w.shape, transpose_w, k=k, a_rows=a_rows, out_rows=out_rows,
                          bf16=bf16, has_g=gates is not None)
  ncol = meta["NCOL"]
  programs = ncol * max(1, min(r, CHECKED_FIX_PROGRAMS // ncol))
  args = [y, cnt, rows, a, w, routing.expert_index.reshape(-1),
          gates.astype(jnp.float32) if gates is not None else _DUMMY_F32()]
  (y,) = _launch(_repair_rows_kernel, args, shapes[:1], programs, cfg, aliases={0: 0},
                 **meta)
  return y if dtype == jnp.float16 else jax.lax.bitcast_convert_type(y, dtype)


def _sum_tiles(routing: Routing, block_m: int) -> jax.Array:
  """[3, Z] tiles of a kernel that adds its rows into a shared output, in the launch
  order CVMM_TILE_ORDER names (:func:`kernels.routing.sum_tile_order`; from the
  routing's tile lists when it holds them)."""
  return routing.ordered_tiles(block_m, sum_tile_order())


def expert_gram(a: jax.Array, b: jax.Array, routing: Routing, *, a_rows: int, b_rows: int,
                scale: jax.Array | None = None, out_dtype=None,
                cfg: TileConfig | None = None) -> jax.Array:
  """dW[e] = sum_{p of e} a[arow(p)]^T (scale[p] b[brow(p)]) -> [E, I, O]."""
  k, e = routing.k, routing.n_experts
  i, o = a.shape[1], b.shape[1]
  out_dtype = out_dtype or a.dtype
  if cfg is None:
    cfg = choose_dw_config(routing.n_pairs, k, e, i, o, a.dtype, a_rows, b_rows,
                           scale is not None)
  s = cfg.splits
  grid = e * s * -(-i // cfg.block_m) * -(-o // cfg.block_n)
  red = _red_width(o) if s > 1 and dw_split_sums_wanted() else 0
  red = red if red in (0, 1, 4) else 1
  part_dtype = jnp.float32 if s > 1 else out_dtype
  out_shapes = [jax.ShapeDtypeStruct((1 if red else s, e, i, o), part_dtype)]
  args = [a, b, routing.order, routing.group_offsets,
          scale if scale is not None else _DUMMY_F32()]
  (out,) = _launch(
      _dw_kernel, args, out_shapes, grid, cfg, zeroed=(0,) if red else (),
      E=e, I=i, O=o, K=k, A_R=a_rows, B_R=b_rows, S=s,
      BI=cfg.block_m, BO=cfg.block_n, BK=cfg.block_k,
      HAS_SCALE=scale is not None, IEEE=a.dtype == jnp.float32, RED=red)
  return (out.sum(axis=0) if s > 1 and not red else out[0]).astype(out_dtype)


def dw_split_sums_wanted() -> bool:
  """Whether the weight-gradient kernel's splits of an expert's rows add their float32
  partial sums into one output with vector reductions (CVMM_DW_RED=1, the default)
  rather than store one slice each for XLA to sum (0): the slices are written and read
  back, S times the gradient's size in float32. (Scalar atomics where the vector
  reductions do not apply: before sm90, O % 4, Triton's interpreter.)"""
  return env_switch("CVMM_DW_RED")


def _pair_layout(w1_shape, w2_shape, bwd: bool):
  """(D, H, O, strides of the first matrices, of the second) of the fused pair kernel
  (:func:`_pair_body`; strides as (expert, row, column) element strides). Forward: w1 =
  keys [E, D, H], w2 = values [E, H, O]. Backward: w1 = values [E, H, D] and w2 = keys
  [E, O, H], both used transposed."""
  if bwd:
    _, hh, d = w1_shape                                  # values [E, H, D_out]
    _, o, _ = w2_shape                                   # keys [E, D_in, H]
    return d, hh, o, (hh * d, 1, d), (o * hh, 1, hh)     # values^T, keys^T
  _, d, hh = w1_shape
  _, _, o = w2_shape
  return d, hh, o, (d * hh, hh, 1), (hh * o, o, 1)


def pair_rows(a: jax.Array, w1: jax.Array, w2: jax.Array, gates: jax.Array,
              routing: Routing, *, h: jax.Array | None = None,
              cfg: TileConfig | None = None, sum_dtype: str | None = None):
  """One launch of the fused pair kernel (:func:`_pair_body`).

  Forward (``h`` None): a = x [N, D], w1 = keys [E, D, H], w2 = values [E, H, O].
    Returns (out [N, O]; h [P, H] in x's dtype).
  Backward (``h`` = the forward's h): a = dout [N, O], w1 = values, w2 = keys (both
    used transposed). Returns (dx [N, D], du [P, H], dgates [P] float32), as a dict
    of "out", "du", "dg". out and dx are float32 with float32 sums and with float16
    sums that XLA scales back (:func:`unscale_kind`), else in a's dtype. sum_dtype: see
    :func:`half_sums`.
  """
  n, k, p = routing.n_tokens, routing.k, routing.n_pairs
  bwd = h is not None
  e = w1.shape[0]
  d, hh, o, s1, s2 = _pair_layout(w1.shape, w2.shape, bwd)
  assert a.shape == (n, d), (a.shape, n, d)
  if cfg is None:
    cfg = choose_pair_config(n, k, e, d, hh, o, a.dtype, bwd, sum_dtype)
  tiles = _sum_tiles(routing, cfg.block_m)                          # [3, Z]
  z = tiles.shape[1]
  red = _red_width(o, a.dtype, sum_dtype)
  half = half_sums(a.dtype, o, sum_dtype)
  g = gates.reshape(-1)
  if half == "float16":
    # |h| <= max|x[n]| * max_h sum_d |keys[e, d, h]|, so the pair is a row product
    # whose matrix's column sums are bounded by the two matrices' product; the
    # backward's dx likewise, with dout, values^T and keys^T.
    l1 = _max_l1(w1, 2 if bwd else 1) * _max_l1(w2, 2 if bwd else 1)   # [E]
    row_s, gs = _f16_row_scales(a, l1, routing, g, 1, 1)               # [N], [P]
    if not bwd:
      g = gs                      # the forward's gates carry the row scale
  args = [a, w1, w2, routing.order, tiles, g]
  out_shapes = [jax.ShapeDtypeStruct((n, o), _sum_out_dtype(half))]      # out (summed)
  if bwd:
    args += [h, row_s if half == "float16" else _DUMMY_F32()]
    out_shapes += [jax.ShapeDtypeStruct((p, hh), a.dtype),              # du
                   jax.ShapeDtypeStruct((p,), jnp.float32)]             # dgates
    names = ("out", "du", "dg")
  else:
    out_shapes += [jax.ShapeDtypeStruct((p, hh), a.dtype)]              # h
    names = ("out", "h")
  meta = dict(Z=z, D=d, H=hh, O=o, K=k, S1_E=s1[0], S1_D=s1[1], S1_H=s1[2],
              S2_E=s2[0], S2_H=s2[1], S2_O=s2[2], BM=cfg.block_m, BN=cfg.block_n,
              BK=cfg.block_k, BH=max(16, autotune.next_pow2(hh)),
              IEEE=a.dtype == jnp.float32, RED=red, F16=half == "float16")
  kernel = _pair_bwd_kernel if bwd else _pair_fwd_kernel
  outs = dict(zip(names, _launch(kernel, args, out_shapes, z, cfg, zeroed=(0,), **meta)))
  if half == "float16":
    outs["out"] = _f16_unscale(outs["out"], row_s, a.dtype)
  return outs


# ------------------------------------------------------------------ tile choice

# Gluon row-kernel tiles (block_m, block_n, warps, buffers): candidates of the fused
# 16-bit sums on sm90+ where :func:`_gluon_rows_ok` holds (unless CVMM_GLUON=0), listed
# first, in heuristic order. At MoEUT_244M on an H200 (bench/RESULTS.md, eleventh
# session) 128x64 with 8 warps and 4 buffers was the fastest of all tiles, Triton's
# included, for down, O and up's dx (e.g. O 0.652 against 0.717 ms). 32-column blocks
# and deeper buffering were slower (ninth session).
_GLUON_ROWS = ((128, 64, 8, 4), (128, 64, 4, 4), (128, 64, 4, 3), (128, 64, 8, 3),
               (64, 64, 4, 3), (256, 64, 8, 3), (128, 128, 8, 3))


def _gluon_enabled() -> bool:
  """CVMM_GLUON=0 leaves the Gluon row kernel's tiles out of the fused sums' candidates
  (default: in, where a call can take them)."""
  return os.environ.get("CVMM_GLUON", "1") != "0"


# The two-half row kernel's tiles (BM of a half, BN, warps), first among the Gluon
# candidates unless CVMM_GLUON_ROWS2=0. On an H200 at MoEUT_244M (bench/RESULTS.md,
# fourteenth session) 128x64 took the down projection's kernel from 1.167 to 0.990 ms
# and the whole call from 1.336 to 1.181 ms (up's dx likewise); 128x32 was slower.
_GLUON_ROWS2 = ((128, 64, 8), (128, 32, 8))


def _gluon_rows2_enabled() -> bool:
  """The two-half row kernel's tiles come first among the fused sums' candidates,
  unless CVMM_GLUON_ROWS2=0."""
  return env_switch("CVMM_GLUON_ROWS2")


def _rows_candidates(i: int, o: int, dtype, gluon: bool = False) -> list[TileConfig]:
  """Tile candidates of the row kernel, in heuristic order; ``gluon``: the call can
  take the Gluon kernels (:func:`_gluon_rows_ok`), whose tiles then come first (the
  two-half kernel's before them unless CVMM_GLUON_ROWS2=0)."""
  out = _triton_rows_candidates(i, o, dtype)
  if gluon:
    ok = _gluon_rows_ok(i, o, dtype, 8, False)
    tiles = [_gluon_tile(t, i) for t in _GLUON_ROWS]
    if _gluon_rows2_enabled():
      tiles = [_gluon_tile((bm, bn, w, 2, 2), i) for bm, bn, w in _GLUON_ROWS2] + tiles
    out = [c for c in tiles if ok(c)] + out
  return out


def _triton_rows_candidates(i: int, o: int, dtype) -> list[TileConfig]:
  bn_max = max(16, autotune.next_pow2(o))
  bk_max = max(16, autotune.next_pow2(i))
  if jnp.dtype(dtype).itemsize >= 4:
    raw = [(64, 64, 32, 4, 3), (128, 64, 32, 8, 3), (64, 128, 32, 4, 3)]
  else:
    # First: the fastest at MoEUT_244M on an H200 (bench/RESULTS.md), the choice when
    # autotuning is off.
    # 256-row tiles read each tile's expert matrix from L2 once per 256 rows instead of
    # 128: at MoEUT_244M on an H200, 256x128x64 w8 s4 ran the up projection in 0.737 ms
    # (the best 128- or 64-row tile: 0.828) and V in 0.417 (0.461); BK 32 or 128 and
    # 3 stages were slower (bench/RESULTS.md, eighth session).
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


def _dw_candidates(p: int, e: int, i: int, o: int, dtype) -> list[TileConfig]:
  bi_max = max(16, autotune.next_pow2(i))
  bo_max = max(16, autotune.next_pow2(o))
  if jnp.dtype(dtype).itemsize >= 4:
    raw = [(64, 64, 32, 4, 3), (128, 64, 32, 8, 3)]
  else:
    # 256-wide blocks were slower at MoEUT_244M on an H200 (up_dw 0.915 vs 0.693 ms,
    # down_dw 1.311 vs 1.080 ms; bench/RESULTS.md, sixth session): not candidates.
    raw = [(128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (64, 128, 64, 4, 4),
           (128, 64, 64, 4, 4)]
  sms = autotune.multiprocessor_count()
  out, more = [], []
  for bi, bo, bk, w, st in raw:
    bi, bo = min(bi, bi_max), min(bo, bo_max)
    blocks = e * -(-i // bi) * -(-o // bo)
    mean_rows = max(1, p // e)
    # Split an expert's rows until about two programs per multiprocessor, keeping
    # at least a few steps of bk rows per program.
    most = max(1, min(mean_rows // (4 * bk), 32))
    splits = max(1, min(-(-2 * sms // blocks), most))
    out.append(TileConfig(bi, bo, bk, w, st, splits))
    # Two and four times as many splits, for the autotuner: with few experts the
    # programs come in few waves, and the last one can leave most multiprocessors idle
    # (SwitchHead's 40 experts at MoEUT_244M: 320 programs, 1.2 waves of two per SM;
    # 4 splits took V's forward+backward from 1.746 to 1.673 ms, bench/RESULTS.md).
    more += [TileConfig(bi, bo, bk, w, st, s) for s in (2 * splits, 4 * splits)
             if s <= most]
  return list(dict.fromkeys(out + more))


def _pair_candidates(d: int, h: int, o: int, dtype) -> list[TileConfig]:
  bn_max = max(16, autotune.next_pow2(o))
  bk_max = max(16, autotune.next_pow2(d))
  if jnp.dtype(dtype).itemsize >= 4:
    raw = [(64, 64, 32, 4, 2), (32, 64, 32, 4, 2)]
  else:
    # First: the fastest forward and backward at MoEUT_244M on an H200
    # (bench/RESULTS.md, third session): 256-row tiles read each expert's two
    # matrices half as often as 128-row tiles.
    raw = [(256, 64, 64, 8, 4), (256, 32, 64, 8, 4), (128, 128, 64, 8, 4),
           (128, 128, 64, 8, 3), (256, 32, 32, 8, 6), (128, 64, 64, 8, 3),
           (64, 128, 64, 4, 3)]
    # A [BM, H] float32 middle of more than 256 x 128 spills registers.
    bh = max(16, autotune.next_pow2(h))
    raw = [c for c in raw if c[0] * bh <= 256 * 128]
  return list(dict.fromkeys(TileConfig(bm, min(bn, bn_max), min(bk, bk_max), w, st)
                            for bm, bn, bk, w, st in raw))


def _synthetic_routing(n: int, k: int, e: int, seed: int = 0) -> Routing:
  """Random top-k of random logits: roughly balanced groups, like a trained router."""
  from kernels.routing import make_routing  # noqa: PLC0415
  logits = jax.random.normal(jax.random.key(seed), (n, e))
  _, idx = jax.lax.top_k(logits, min(k, e))
  if k > e:
    idx = jnp.tile(idx, (1, -(-k // e)))[:, :k]
  return make_routing(idx, e)


def _bench_or_none(make):
  if _interpret() or not is_available():
    return None
  return make


def _sum_key(dtype, o: int, atomic: bool, sum_dtype: str | None) -> tuple:
  """Extra autotune-key element for fused 16-bit sums (none for float32 sums, so the
  cached float32 choices keep their keys). float16 and bf16 sums move the same bytes
  and share the key."""
  return ("bf16sum",) if atomic and half_sums(dtype, o, sum_dtype) else ()


def choose_rows_config(n, k, e, i, o, dtype, a_rows, out_rows, has_scale,
                       sum_dtype: str | None = None) -> TileConfig:
  shape = (n, k, e, i, o, a_rows, out_rows, int(has_scale)) + _sum_key(
      dtype, o, out_rows < k, sum_dtype)

  def bench(cfg):
    with jax.ensure_compile_time_eval():
      r = _synthetic_routing(n, k, e)
      a = jax.random.normal(jax.random.key(1), (n * a_rows, i), dtype)
      w = jax.random.normal(jax.random.key(2), (e, i, o), dtype)
      sc = jax.random.uniform(jax.random.key(3), (n * k,), jnp.float32) if has_scale else None
    f = autotune.compile_now(
        lambda a, w, r, sc: rows_matmul(a, w, r, a_rows=a_rows, out_rows=out_rows,
                                        scale=sc, cfg=cfg, sum_dtype=sum_dtype)[0],
        a, w, r, sc)
    return autotune.time_call(lambda: f(a, w, r, sc))

  atomic = out_rows < k
  gluon = (_gluon_enabled() and atomic and _red_width(o, dtype, sum_dtype) == 8
           and _gluon_device())
  return autotune.tuner().choose("triton_rows", shape, dtype,
                                 _rows_candidates(i, o, dtype, gluon),
                                 _bench_or_none(bench))


def choose_dw_config(p, k, e, i, o, dtype, a_rows, b_rows, has_scale) -> TileConfig:
  n = p // k
  shape = (n, k, e, i, o, a_rows, b_rows, int(has_scale))

  def bench(cfg):
    with jax.ensure_compile_time_eval():
      r = _synthetic_routing(n, k, e)
      a = jax.random.normal(jax.random.key(1), (n * a_rows, i), dtype)
      b = jax.random.normal(jax.random.key(2), (n * b_rows, o), dtype)
      sc = jax.random.uniform(jax.random.key(3), (p,), jnp.float32) if has_scale else None
    f = autotune.compile_now(
        lambda a, b, r, sc: expert_gram(a, b, r, a_rows=a_rows, b_rows=b_rows,
                                        scale=sc, cfg=cfg), a, b, r, sc)
    return autotune.time_call(lambda: f(a, b, r, sc))

  return autotune.tuner().choose("triton_dw", shape, dtype, _dw_candidates(p, e, i, o, dtype),
                                 _bench_or_none(bench))


def choose_pair_config(n, k, e, d, h, o, dtype, bwd,
                       sum_dtype: str | None = None) -> TileConfig:
  shape = (n, k, e, d, h, o, int(bwd)) + _sum_key(dtype, o, True, sum_dtype)

  def bench(cfg):
    with jax.ensure_compile_time_eval():
      r = _synthetic_routing(n, k, e)
      a = jax.random.normal(jax.random.key(1), (n, d), dtype)
      if bwd:
        w1 = jax.random.normal(jax.random.key(2), (e, h, d), dtype)
        w2 = jax.random.normal(jax.random.key(3), (e, o, h), dtype)
        hv = jax.random.normal(jax.random.key(5), (n * k, h), dtype)
      else:
        w1 = jax.random.normal(jax.random.key(2), (e, d, h), dtype)
        w2 = jax.random.normal(jax.random.key(3), (e, h, o), dtype)
        hv = None
      g = jax.random.uniform(jax.random.key(4), (n, k), jnp.float32).astype(dtype)
    f = autotune.compile_now(
        lambda a, w1, w2, g, r, hv: pair_rows(a, w1, w2, g, r, h=hv, cfg=cfg,
                                              sum_dtype=sum_dtype)["out"],
        a, w1, w2, g, r, hv)
    return autotune.time_call(lambda: f(a, w1, w2, g, r, hv))

  return autotune.tuner().choose("triton_pair", shape, dtype,
                                 _pair_candidates(d, h, o, dtype), _bench_or_none(bench))


# ------------------------------------------------------------------ public op

def cvmm_triton(x: jax.Array, routing: Routing, w: jax.Array,
                gates: jax.Array | None = None, *, fuse_sum: bool = True,
                sum_dtype: str | None = None) -> jax.Array:
  """See :func:`kernels.cvmm`. x [N, M, I], w [E, I, O], gates [N, K] or None.

  fuse_sum: add the rows that share an output row (the gated sum over slots; in the
    backward pass the slots that read one x row) with float32 atomics inside the kernel
    (True: no [P, O] intermediate), or store per-pair rows and sum them in XLA (False).
  sum_dtype: "float32", "float16", "bfloat16" or None (CVMM_SUM_DTYPE), see
    :func:`half_sums`; resolved once here, so the backward pass sums the same way.
  """
  w = w.astype(x.dtype) if w.dtype != x.dtype else w
  plain, gated = _ops(fuse_sum, sum_dtype_of(sum_dtype))
  if gates is None:
    return plain(x, w, routing)
  return gated(x, w, gates, routing)


def cvmm_triton_unfused(x, routing, w, gates=None, *, sum_dtype=None):
  """:func:`cvmm_triton` with ``fuse_sum=False`` (for benchmarks and comparison)."""
  return cvmm_triton(x, routing, w, gates, fuse_sum=False, sum_dtype=sum_dtype)


@functools.lru_cache(maxsize=None)
def _ops(fuse: bool, sd: str):
  """The two custom_vjp ops (without and with gates) for one reduction strategy and
  sum dtype."""

  # Without gates: y [N, K, O].
  @jax.custom_vjp
  def plain(x, w, routing):
    return _fwd(x, w, routing)[0]

  def _fwd(x, w, routing):
    n, m, i = x.shape
    k = routing.k
    y, _ = rows_matmul(x.reshape(n * m, i), w, routing, a_rows=m, out_rows=k)   # [P, O]
    return y.reshape(n, k, w.shape[2]), (x, w, routing)

  def _bwd(res, dy):
    x, w, routing = res
    n, m, i = x.shape
    k = routing.k
    dy2 = dy.astype(x.dtype).reshape(n * k, w.shape[2])                      # [P, O]
    dx, _ = rows_matmul(dy2, w, routing, a_rows=k, out_rows=m, transpose_w=True,
                        fuse_sum=fuse, sum_dtype=sd)                         # [N*M, I]
    dw = expert_gram(x.reshape(n * m, i), dy2, routing, a_rows=m, b_rows=k,
                     out_dtype=w.dtype)                                      # [E, I, O]
    return dx.reshape(n, m, i).astype(x.dtype), dw, None

  plain.defvjp(_fwd, _bwd)

  # With gates: out [N, O] = sum_s gates[n, s] y[n, s].
  @jax.custom_vjp
  def gated(x, w, gates, routing):
    return _fwd_gated(x, w, gates, routing)[0]

  def _fwd_gated(x, w, gates, routing):
    n, m, i = x.shape
    out, _ = rows_matmul(x.reshape(n * m, i), w, routing, a_rows=m, out_rows=1,
                         scale=gates.reshape(-1), fuse_sum=fuse, sum_dtype=sd)  # [N, O]
    return out.astype(x.dtype), (x, w, gates, routing)

  def _bwd_gated(res, dout):
    x, w, gates, routing = res
    n, m, i = x.shape
    x2 = x.reshape(n * m, i)
    dout = dout.astype(x.dtype)                                              # [N, O]
    g = gates.reshape(-1)
    dx, dg = rows_matmul(dout, w, routing, a_rows=1, out_rows=m, transpose_w=True,
                         scale=g, dgate_rows=x2, c_rows=m, fuse_sum=fuse,
                         sum_dtype=sd)                                       # [N*M, I], [P]
    dw = expert_gram(_gated_rows(x, gates), dout, routing, a_rows=routing.k, b_rows=1,
                     out_dtype=w.dtype)
    return (dx.reshape(n, m, i).astype(x.dtype), dw,
            dg.reshape(n, routing.k).astype(gates.dtype), None)

  gated.defvjp(_fwd_gated, _bwd_gated)
  return plain, gated


def _gated_rows(x: jax.Array, gates: jax.Array) -> jax.Array:
  """[P, I] rows gates[n, s] * x[n, s // (K // M)] for x [N, M, I], gates [N, K]: the rows
  of a gated weight gradient, scaled once here. The weight-gradient kernel contracts
  plain rows about 1.5x as fast as rows it scales on the way (MoEUT_244M down
  projection on an H200: 0.70 vs 1.10 ms, bench/RESULTS.md sixth session)."""
  n, m, i = x.shape
  k = gates.shape[1]
  rows = x.astype(jnp.float32)[:, :, None, :] * gates.astype(jnp.float32).reshape(
      n, m, k // m, 1)
  return rows.astype(x.dtype).reshape(n * k, i)


# Widest middle (expert size) the fused pair keeps on chip: [BM, H] float32
# accumulators plus the [BM, H] operand of the second product.
PAIR_MAX_HIDDEN = 256


def pair_supported(x: jax.Array, w_up: jax.Array) -> bool:
  """Whether :func:`cvmm_triton_pair` fuses this shape (else compose two cvmm calls)."""
  return x.ndim == 2 and w_up.shape[2] <= PAIR_MAX_HIDDEN


def cvmm_triton_pair(x: jax.Array, routing: Routing, w_up: jax.Array, w_down: jax.Array,
                     gates: jax.Array, *, sum_dtype: str | None = None) -> jax.Array:
  """out[n] = sum_s gates[n, s] relu(x[n] @ w_up[e]) @ w_down[e], e = expert of (n, s).

  x [N, D], w_up [E, D, H], w_down [E, H, O], gates [N, K] -> [N, O] in x's dtype.
  Two fused kernels: the forward keeps each tile's relu(x @ w_up) on chip for the
  second product (and stores it once, [P, H], for the backward pass); the backward
  computes du = g * (dout @ w_down^T) * (h > 0) and dgates per tile and adds
  du @ w_up^T into dx the same way. The weight gradients are ragged contractions.
  The weights are cast to x's dtype outside the custom VJP, so their gradients come
  back in the weights' own dtype (as for :func:`cvmm_triton`). sum_dtype: as for
  :func:`cvmm_triton` (the output and dx sums).
  """
  op = _pair_op(sum_dtype_of(sum_dtype))
  return op(x, routing, w_up.astype(x.dtype), w_down.astype(x.dtype), gates)


@functools.lru_cache(maxsize=None)
def _pair_op(sd: str):
  """The fused pair as a custom_vjp op whose sums are in ``sd``."""

  @jax.custom_vjp
  def op(x, routing, w_up, w_down, gates):
    return _pair_fwd(x, routing, w_up, w_down, gates, sd)[0]

  op.defvjp(functools.partial(_pair_fwd, sd=sd), functools.partial(_pair_bwd, sd=sd))
  return op


def _pair_fwd(x, routing, w_up, w_down, gates, sd):
  r = pair_rows(x, w_up, w_down, gates, routing, sum_dtype=sd)
  return r["out"].astype(x.dtype), (x, w_up, w_down, gates, routing, r["h"])


def _pair_bwd(res, dout, sd):
  x, w_up, w_down, gates, routing, h = res
  k = routing.k
  dout = dout.astype(x.dtype)
  r = pair_rows(dout, w_down, w_up, gates, routing, h=h, sum_dtype=sd)
  # dvalues from rows pre-scaled by the gates (see _gated_rows): g * h per pair.
  dw_down = expert_gram(_gated_rows(h.reshape(-1, k, h.shape[1]), gates), dout, routing,
                        a_rows=k, b_rows=1, out_dtype=w_down.dtype)       # [E, H, O]
  dw_up = expert_gram(x, r["du"], routing, a_rows=1, b_rows=k, out_dtype=w_up.dtype)
  return (r["out"].astype(x.dtype), None, dw_up, dw_down,
          r["dg"].reshape(gates.shape).astype(gates.dtype))



# ------------------------------------------------------------------ benchmark entry

def main():
  """Times forward and forward+backward on the MoEUT_244M σ-MoE shapes."""
  from bench.cvmm import main as bench_main  # noqa: PLC0415
  bench_main(["--impls", "triton", "--profiles", "MoEUT_244M"])


if __name__ == "__main__":
  main()
