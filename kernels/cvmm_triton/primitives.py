"""Device functions and layout helpers shared by the Triton kernel families.

- vector reductions in inline PTX (sm90): ``red_v2`` / ``red_v4`` add 2 or 4 adjacent
  float32 values, ``red_half_v8`` eight float16 or bf16 values, in one instruction;
- ``mma``, ``gathered_matmul``: a tile's rows gathered by index times a matrix block;
- ``row_scale``, ``rows_epilogue``: per-pair scales, and writing or adding a product
  block into its output rows (stores, atomics, vector reductions; dgates partials);
- ``w_layout``, ``sum_tiles``: the expert matrices' strides and the launch order of the
  tiles of a fused sum.
"""
from __future__ import annotations

import jax

from kernels.cvmm_triton.launch import jit, tl
from kernels.routing import Routing


@jit
def red_v2(addr, v0, v1, mask):
  """red.global.add.v2.f32 (sm90): adds two adjacent floats in one reduction."""
  return tl.inline_asm_elementwise(
      "{ .reg .pred p; setp.ne.b32 p, $4, 0; mov.b32 $0, 0; "
      "@p red.global.gpu.relaxed.add.v2.f32 [$1], {$2, $3}; }",
      "=r,l,f,f,r", [addr, v0, v1, mask.to(tl.int32)], dtype=tl.int32, is_pure=False,
      pack=1)


@jit
def red_v4(addr, v0, v1, v2, v3, mask):
  """red.global.add.v4.f32 (sm90): adds four adjacent floats in one reduction."""
  return tl.inline_asm_elementwise(
      "{ .reg .pred p; setp.ne.b32 p, $6, 0; mov.b32 $0, 0; "
      "@p red.global.gpu.relaxed.add.v4.f32 [$1], {$2, $3, $4, $5}; }",
      "=r,l,f,f,f,f,r", [addr, v0, v1, v2, v3, mask.to(tl.int32)], dtype=tl.int32,
      is_pure=False, pack=1)


def red_half_v8_asm(pair: str) -> str:
  """PTX of one 16-bit vector reduction (sm90): adds eight 16-bit values ($2..$9,
  ``pair``: f16x2 or bf16x2) to 8 adjacent elements at $1 if $10."""
  mov = " ".join(f"mov.b32 {r}, {{${2 + 2 * n}, ${3 + 2 * n}}};" for n, r in enumerate("abcd"))
  return ("{ .reg .pred p; .reg .b32 a, b, c, d; setp.ne.b32 p, $10, 0; mov.b32 $0, 0; "
          f"{mov} @p red.global.gpu.relaxed.add.noftz.v4.{pair} [$1], {{a, b, c, d}}; }}")


RED_BF16_V8 = tl.constexpr(red_half_v8_asm("bf16x2"))   # the opt-in bf16 sums
RED_F16_V8 = tl.constexpr(red_half_v8_asm("f16x2"))     # the scaled float16 sums


@jit
def red_half_v8(addr, v0, v1, v2, v3, v4, v5, v6, v7, mask, ASM: tl.constexpr):
  """One 16-bit vector reduction of eight 16-bit values (``ASM``: RED_F16_V8 /
  RED_BF16_V8)."""
  return tl.inline_asm_elementwise(
      ASM, "=r,l,h,h,h,h,h,h,h,h,r",
      [addr, v0, v1, v2, v3, v4, v5, v6, v7, mask.to(tl.int32)], dtype=tl.int32,
      is_pure=False, pack=1)


@jit
def mma(a, b, acc, IEEE: tl.constexpr):
  """a @ b (+ acc, may be None) in float32: true float32 products when IEEE, else the
  tensor-core default for the inputs' dtype."""
  if IEEE:
    return tl.dot(a, b, acc, input_precision="ieee")
  else:
    return tl.dot(a, b, acc)


@jit
def gathered_matmul(a_ptr, a_row, rmask, w_base, cols, cmask, I: tl.constexpr,
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
    acc = mma(a, b, acc, IEEE)
  return acc


@jit
def row_scale(scale_ptr, pair, rmask, HAS_SCALE: tl.constexpr):
  """[BM] float32 per-pair scale (gates) of a tile's rows; ones without a scale."""
  if HAS_SCALE:
    return tl.load(scale_ptr + pair, mask=rmask, other=0.0).to(tl.float32)
  else:
    return tl.full(pair.shape, 1.0, tl.float32)


@jit
def rows_epilogue(acc, nb, pair, tok, slot, rmask, s, c_ptr, out_ptr, dg_ptr,
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
      red_half_v8(addr, v0, v1, v2, v3, v4, v5, v6, v7, m8, RED_F16_V8)
    else:
      red_half_v8(addr, v0, v1, v2, v3, v4, v5, v6, v7, m8, RED_BF16_V8)
  elif RED == 4:
    # Vector reductions: 4 adjacent columns per instruction (O % 4 == 0, so a group
    # is wholly inside or outside the matrix and 16-byte aligned).
    h0, h1 = tl.split(tl.reshape(acc, (BM, BN // 4, 2, 2)))
    v0, v2 = tl.split(h0)
    v1, v3 = tl.split(h1)
    c4 = nb * BN + tl.arange(0, BN // 4) * 4
    red_v4((out_ptr + o_row[:, None] * O + c4[None, :]).to(tl.int64), v0, v1, v2, v3,
            rmask[:, None] & (c4 < O)[None, :])
  elif RED == 2:
    v0, v1 = tl.split(tl.reshape(acc, (BM, BN // 2, 2)))
    c2 = nb * BN + tl.arange(0, BN // 2) * 2
    red_v2((out_ptr + o_row[:, None] * O + c2[None, :]).to(tl.int64), v0, v1,
            rmask[:, None] & (c2 < O)[None, :])
  else:
    tl.atomic_add(out_ptr + o_row[:, None] * O + cols[None, :],
                  acc.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :],
                  sem="relaxed")




def w_layout(w_shape, transpose_w: bool) -> tuple[int, int, tuple]:
  """(I, O, element strides (expert, contraction, column)) of the expert matrices of
  shape [E, I, O], or [E, O, I] used transposed."""
  if transpose_w:
    _, o, i = w_shape
    return i, o, (i * o, 1, i)          # W^T[e][i', o'] = w[e, o', i']
  _, i, o = w_shape
  return i, o, (i * o, o, 1)


def sum_tiles(routing: Routing, block_m: int) -> jax.Array:
  """[3, Z] tiles of a kernel that adds its rows into a shared output, launched by the
  first token they hold (:meth:`kernels.routing.Routing.ordered_tiles`: the programs
  in flight add into one band of output rows, which stays in L2)."""
  return routing.ordered_tiles(block_m, "token")


