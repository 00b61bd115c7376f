"""Scaled float16 sums: each output row's power-of-two scale, the scale-back and the repair.

A fused sum over experts adds every (token, slot) product into its token's output
row with atomics. In 16-bit calls with ``sum_dtype="float16"`` (the default) each row
is multiplied by a power of two before the adds, so that its sum fits float16's range
with float16's precision, and scaled back in a pass of its own: half the memory
traffic of float32 sums, about their accuracy.

Two ways to choose the scales (``CvmmConfig.f16_scales``):
- "checked": from an estimate (each token's first input row, every 8th slab of the
  matrices; :func:`f16_row_scales_checked`). The scale-back kernel checks every row
  and lists those that overflowed or came out too small; a second kernel recomputes
  them in float32 (:func:`unscale_rows_checked`). Used where
  :func:`checked_scales_pay`; elsewhere the bound.
- "bound": a bound on every row's terms that no sum can exceed
  (:func:`kernels.row_scales.f16_row_scales`, plain JAX, shared with the Mosaic path).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kernels import autotune
from kernels.autotune import TileConfig
from kernels.cvmm_triton.launch import compute_capability, dummy_f32, interpret, jit, launch, tl
from kernels.cvmm_triton.primitives import w_layout
from kernels.routing import Routing
from kernels.row_scales import F16_BOUND_LOG2, pow2_scale, row_and_pair_scales


def bf16_sums(dtype, o: int, sum_dtype: str) -> bool:
  """Whether the fused sums of a bf16 CVMM add into a bf16 output (``sum_dtype``
  "bfloat16"): rows rounded to bf16 are added into a bf16 output
  (``red.global.add.noftz.v4.bf16x2``, Hopper): half the L2 traffic of float32 sums and
  no cast, but each of the K additions into an output element rounds to bf16 (about
  3x the error of float32 sums rounded once), in an order that varies from run to run.
  float32 calls, widths that are not a multiple of 8, older GPUs and Triton's
  interpreter sum in float32."""
  return (sum_dtype == "bfloat16" and jnp.dtype(dtype) == jnp.bfloat16
          and o % 8 == 0 and not interpret() and compute_capability() >= 9.0)


def half_sums(dtype, o: int, sum_dtype: str) -> str | None:
  """The 16-bit dtype the fused sums of a CVMM with ``dtype`` inputs and ``o`` output
  columns add in ("float16" or "bfloat16"), or None for float32 sums.

  ``sum_dtype`` (:class:`kernels.CvmmConfig`):
    "float16"   16-bit inputs: each output row is multiplied by a power of two, the
                rows are added in float16 and scaled back in float32. The power of
                two comes from an estimate, rows that overflow or come out too small
                being recomputed in float32 (checked scales, where
                :func:`checked_scales_pay`), or from a bound on the sum of the row's
                terms (:func:`pow2_scale`; over the row's pairs, the sum of |gate|
                times the input row's largest |value| times the expert matrix's
                largest column sum of |W|), which no float16 sum can overflow. Each
                addition rounds to float16's 11-bit significand, 8x finer than bf16.
                Vector reductions on Hopper (8 per instruction), scalar float16
                atomics elsewhere and in Triton's interpreter.
    "bfloat16"  see :func:`bf16_sums`.
  """
  if sum_dtype == "float16" and jnp.dtype(dtype).itemsize == 2:
    return "float16"
  if sum_dtype == "bfloat16" and bf16_sums(dtype, o, sum_dtype):
    return "bfloat16"
  return None


def red_width(o: int, dtype=jnp.float32, sum_dtype: str = "float32") -> int:
  """Elements per atomic reduction instruction of the fused sums.

  Hopper (sm90+) has vector reductions (``red.global.add.v2/v4.f32``): one instruction
  adds 2 or 4 adjacent floats (4 measured as fast as scalar atomics on an H200, 2
  slower); elsewhere, and in Triton's interpreter, scalar ``tl.atomic_add``. The width
  divides O so that a vector never straddles a row end. 8 means 16-bit sums
  (:func:`half_sums`): eight float16 or bf16 per instruction.
  """
  half = half_sums(dtype, o, sum_dtype)
  if half is not None:
    vec = o % 8 == 0 and not interpret() and compute_capability() >= 9.0
    return 8 if vec else 1          # (bf16 sums exist only where vec holds)
  if interpret():
    return 1
  width = 4 if compute_capability() >= 9.0 else 1
  while width > 1 and o % width:
    width //= 2
  return width


def sum_out_dtype(half: str | None):
  """dtype of an output that a kernel sums into (``half``: from :func:`half_sums`)."""
  return jnp.dtype(half) if half is not None else jnp.dtype(jnp.float32)


def checked_scales_pay(i: int, o: int, a_rows: int, out_rows: int) -> bool:
  """Whether checked float16 scales (``CvmmConfig.f16_scales`` "checked") replace bound ones for a
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


def sampled_max_l1(w: jax.Array, transpose_w: bool) -> jax.Array:
  """[E] float32 estimate of :func:`max_l1` from every 8th slab along axis 1 of w
  (contiguous either way): w [E, I, O] sums the sampled contraction rows and scales
  by their share; w [E, O, I] (used transposed) sums whole contractions of the sampled
  columns."""
  ws = jnp.abs(w[:, ::_SAMPLE_STRIDE, :]).astype(jnp.float32)
  if transpose_w:
    return jnp.max(jnp.sum(ws, axis=2), axis=1)
  return jnp.max(jnp.sum(ws, axis=1), axis=1) * (w.shape[1] / ws.shape[1])


def f16_row_scales_checked(a, w, transpose_w: bool, routing: Routing, scale, a_rows: int,
                            out_rows: int):
  """Row scales of checked float16 sums (``CvmmConfig.f16_scales`` "checked"): (s [N * out_rows]
  float32, the per-pair scale [P] float32 for the kernel, as :func:`f16_row_scales`,
  and [N * out_rows] int8: 1 where the estimate's sample was not 0).

  Each output row's estimate is its token's first input row's largest |value| times
  the largest |scale[p]| * sampled column sum (:func:`sampled_max_l1`) of its pairs;
  s puts it at 2^(hi - 2) (see _CHECK_LO_LOG2). Rows whose estimate is 0 take the
  largest estimate's scale. The scale-back checks each row and repairs it where the
  estimate was wrong, so the estimate only has to be good for speed."""
  n, k = routing.n_tokens, routing.k
  kr = k // out_rows
  amax = jnp.max(jnp.abs(a.reshape(n, a_rows, -1)[:, 0, :]), axis=1).astype(jnp.float32)
  terms = sampled_max_l1(w, transpose_w)[routing.expert_index]                # [N, K]
  sc = None if scale is None else scale.astype(jnp.float32).reshape(n, k)
  if sc is not None:
    terms = terms * jnp.abs(sc)
  est = amax[:, None] * jnp.max(terms.reshape(n, out_rows, kr), axis=2)        # [N, out_rows]
  sampled = est > 0
  est = jnp.where(sampled, est, jnp.max(est))
  hi = 15 - int(np.ceil(np.log2(kr)))
  s = pow2_scale(est * 2.0 ** (F16_BOUND_LOG2 - (hi - _CHECK_AIM_BELOW)))
  return row_and_pair_scales(s, sc, kr) + (sampled.reshape(-1).astype(jnp.int8),)


def f16_unscale(out: jax.Array, row_s: jax.Array, dtype) -> jax.Array:
  """The rows of a float16 sum with each row's scale (:func:`f16_row_scales`) taken
  back out, in ``dtype`` (:func:`unscale_rows`)."""
  return unscale_rows(out, 1.0 / row_s, dtype)


# Rows per program of :func:`unscale_rows`.
UNSCALE_ROWS = 8


@jit
def unscale_kernel(x_ptr, inv_ptr, y_ptr, R, O: tl.constexpr, BR: tl.constexpr,
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
    tl.store(y_ptr + base + cols[None, :], round16(v * inv[:, None], BF16), mask=m)


@jit
def round16(v, BF16: tl.constexpr):
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
  last rows first (:func:`unscale_kernel`)."""
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
  (y,) = launch(unscale_kernel, args, shapes, -(-r // UNSCALE_ROWS), cfg, aliases={0: 0},
                 R=r, O=o, BR=UNSCALE_ROWS, BO=bo, REVERSE=reverse,
                 BF16=dtype == jnp.bfloat16)
  return y if dtype == jnp.float16 else jax.lax.bitcast_convert_type(y, dtype)


@jit
def unscale_checked_kernel(
    x_ptr, inv_ptr, nz_ptr,   # [R, O] float16 sums, [R] inverse scales, [R] int8 sampled
    y_ptr,                    # [R, O] 16-bit patterns, may be x itself
    cnt_ptr, list_ptr,        # [1] int32 (zeroed) rows to repair, [R] int32 their indices
    R, O: tl.constexpr, BR: tl.constexpr, BO: tl.constexpr, REVERSE: tl.constexpr,
    BF16: tl.constexpr, LO: tl.constexpr):
  """:func:`unscale_kernel` for checked float16 sums: a row whose sums are not all
  finite (float16 overflowed), or whose largest |sum| is below LO and not 0, or 0 where
  its token's sample was not (nz), is not scaled back but appended to the list of rows
  that :func:`repair_rows_kernel` recomputes (its count in cnt)."""
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
    tl.store(y_ptr + base + cols[None, :], round16(v * inv[:, None], BF16),
             mask=m & ok[:, None])
  else:               # several blocks: the rows' maxima first, then the stores
    for c in tl.static_range(0, O, BO):
      cols = c + tl.arange(0, BO)
      m = rmask[:, None] & ok[:, None] & (cols[None, :] < O)
      v = tl.load(x_ptr + base + cols[None, :], mask=m, other=0.0).to(tl.float32)
      tl.store(y_ptr + base + cols[None, :], round16(v * inv[:, None], BF16), mask=m)
  bad = (rmask & (ok == 0)).to(tl.int32)
  nb = tl.sum(bad, axis=0)
  if nb > 0:          # one atomic a program with rows to repair, then their places
    at = tl.atomic_add(cnt_ptr, nb)
    tl.store(list_ptr + at + tl.cumsum(bad, axis=0) - 1, rows, mask=bad > 0)


@jit
def repair_rows_kernel(
    x_ptr,                    # [R, O] 16-bit rows (aliased with y)
    cnt_ptr, list_ptr,        # [1] int32 rows to repair, [R] int32 their indices
    a_ptr, w_ptr,             # the sum's input rows [Ra, I] and matrices (strides SW_*)
    eidx_ptr, g_ptr,          # [P] expert and unscaled per-pair scale (if HAS_G)
    y_ptr,                    # [R, O] 16-bit patterns: x's buffer
    O: tl.constexpr, FO: tl.constexpr, NCOL: tl.constexpr, BF16: tl.constexpr,
    K: tl.constexpr, A_R: tl.constexpr, O_R: tl.constexpr, I: tl.constexpr,
    BI: tl.constexpr, SW_E: tl.constexpr, SW_I: tl.constexpr, SW_O: tl.constexpr,
    HAS_G: tl.constexpr):
  """The rows that :func:`unscale_checked_kernel` listed, recomputed in float32 and
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
    tl.store(y_ptr + row.to(tl.int64) * O + fcols, round16(acc, BF16), mask=fcm)


# Columns per program of a recomputed row, at most the contraction's values per step,
# and about how many programs the repair launches (:func:`unscale_rows_checked`).
CHECKED_FIX_COLS = 64
CHECKED_FIX_I = 128
CHECKED_FIX_PROGRAMS = 1024


def unscale_checked_meta(o: int, *, reverse: bool, bf16: bool) -> dict:
  """:func:`unscale_checked_kernel`'s compile-time arguments for rows of ``o`` values
  (:func:`unscale_rows_checked`, and :mod:`kernels.offline` compiling it)."""
  return dict(O=o, BR=UNSCALE_ROWS, BO=min(autotune.next_pow2(o), 1024), REVERSE=reverse,
              BF16=bf16, LO=2.0 ** _CHECK_LO_LOG2)


def repair_rows_meta(w_shape, transpose_w: bool, *, k: int, a_rows: int, out_rows: int,
                     bf16: bool, has_g: bool) -> dict:
  """:func:`repair_rows_kernel`'s compile-time arguments for expert matrices of
  ``w_shape`` (:func:`w_layout`; :func:`unscale_rows_checked`, and
  :mod:`kernels.offline` compiling it)."""
  i, o, sw = w_layout(w_shape, transpose_w)
  fo = min(CHECKED_FIX_COLS, autotune.next_pow2(o))
  return dict(O=o, FO=fo, NCOL=-(-o // fo), BF16=bf16, K=k, A_R=a_rows, O_R=out_rows, I=i,
              BI=min(CHECKED_FIX_I, autotune.next_pow2(i)), SW_E=sw[0], SW_I=sw[1],
              SW_O=sw[2], HAS_G=has_g)


def unscale_rows_checked(out: jax.Array, inv_s: jax.Array, sampled: jax.Array,
                         a: jax.Array, w: jax.Array, routing: Routing, gates, dtype, *,
                         a_rows: int, out_rows: int, transpose_w: bool,
                         reverse: bool = True):
  """:func:`unscale_rows` for checked float16 sums (``CvmmConfig.f16_scales`` "checked"): out [R, O]
  float16 sums times inv_s [R], in ``dtype``, in place. Rows that overflowed (a sum
  not finite), whose largest |sum| is below 2^0 but not 0, or that are all 0 where
  ``sampled`` [R] (int8, :func:`f16_row_scales_checked`) is 1, are recomputed in
  float32 from a, w, the routing's experts and the unscaled per-pair ``gates`` [P]
  (or None) instead, and rounded once: the scale-back lists them, and a second kernel
  (:func:`repair_rows_kernel`) spreads each listed row's columns over its programs.
  With no row listed the second kernel costs one launch."""
  r, o = out.shape
  dtype = jnp.dtype(dtype)
  n, k = routing.n_tokens, routing.k
  i, o_w, sw = w_layout(w.shape, transpose_w)
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
  y, cnt, rows = launch(unscale_checked_kernel,
                         [out, inv_s.astype(jnp.float32), sampled.astype(jnp.int8)],
                         shapes, -(-r // UNSCALE_ROWS), cfg, zeroed=(1,), aliases={0: 0},
                         R=r, **unscale_checked_meta(o, reverse=reverse, bf16=bf16))
  meta = repair_rows_meta(w.shape, transpose_w, k=k, a_rows=a_rows, out_rows=out_rows,
                          bf16=bf16, has_g=gates is not None)
  ncol = meta["NCOL"]
  programs = ncol * max(1, min(r, CHECKED_FIX_PROGRAMS // ncol))
  args = [y, cnt, rows, a, w, routing.expert_index.reshape(-1),
          gates.astype(jnp.float32) if gates is not None else dummy_f32()]
  (y,) = launch(repair_rows_kernel, args, shapes[:1], programs, cfg, aliases={0: 0},
                 **meta)
  return y if dtype == jnp.float16 else jax.lax.bitcast_convert_type(y, dtype)



