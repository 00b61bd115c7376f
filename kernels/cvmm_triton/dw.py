"""The weight-gradient kernel: the ragged contraction dW[e] = sum over e's pairs.

``dw_kernel``: dW[e] = sum over e's pairs of a[arow(p)]^T (scale[p] * b[brow(p)]).
One program per (expert, split, block of I, block of O) walks its share of the
expert's rows. ``splits`` > 1 divides an expert's rows over several programs (to fill
the multiprocessors when E * blocks is small); they add their float32 partial sums
into one output with vector reductions. Experts without pairs write zeros.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels import autotune
from kernels.autotune import TileConfig
from kernels.cvmm_triton.launch import dummy_f32, jit, launch, tl
from kernels.cvmm_triton.primitives import mma, red_v4, row_scale
from kernels.cvmm_triton.scales import red_width
from kernels.cvmm_triton.tuning import bench_or_none, synthetic_routing
from kernels.routing import Routing


@jit
def dw_kernel(
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
      s = row_scale(scale_ptr, pair, rmask, True)
      b = (b.to(tl.float32) * s[:, None]).to(a.dtype)
    acc = mma(a, b, acc, IEEE)
  if RED == 1:
    tl.atomic_add(out_ptr + (e.to(tl.int64) * I + ii[:, None]) * O + oo[None, :], acc,
                  mask=imask[:, None] & omask[None, :], sem="relaxed")
  elif RED == 4:
    h0, h1 = tl.split(tl.reshape(acc, (BI, BO // 4, 2, 2)))
    v0, v2 = tl.split(h0)
    v1, v3 = tl.split(h1)
    c4 = ob * BO + tl.arange(0, BO // 4) * 4
    red_v4((out_ptr + (e.to(tl.int64) * I + ii[:, None]) * O + c4[None, :]).to(tl.int64),
            v0, v1, v2, v3, imask[:, None] & (c4 < O)[None, :])
  else:
    o_ptrs = (out_ptr + ((split * E + e).to(tl.int64) * I + ii[:, None]) * O + oo[None, :])
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=imask[:, None] & omask[None, :])


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
  red = red_width(o) if s > 1 else 0
  red = red if red in (0, 1, 4) else 1
  part_dtype = jnp.float32 if s > 1 else out_dtype
  out_shapes = [jax.ShapeDtypeStruct((1 if red else s, e, i, o), part_dtype)]
  args = [a, b, routing.order, routing.group_offsets,
          scale if scale is not None else dummy_f32()]
  (out,) = launch(
      dw_kernel, args, out_shapes, grid, cfg, zeroed=(0,) if red else (),
      E=e, I=i, O=o, K=k, A_R=a_rows, B_R=b_rows, S=s,
      BI=cfg.block_m, BO=cfg.block_n, BK=cfg.block_k,
      HAS_SCALE=scale is not None, IEEE=a.dtype == jnp.float32, RED=red)
  return (out.sum(axis=0) if s > 1 and not red else out[0]).astype(out_dtype)


def dw_candidates(p: int, e: int, i: int, o: int, dtype) -> list[TileConfig]:
  bi_max = max(16, autotune.next_pow2(i))
  bo_max = max(16, autotune.next_pow2(o))
  if jnp.dtype(dtype).itemsize >= 4:
    raw = [(64, 64, 32, 4, 3), (128, 64, 32, 8, 3)]
  else:
    # 256-wide blocks were slower at MoEUT_244M on an H200 (up_dw 0.915 vs 0.693 ms,
    # down_dw 1.311 vs 1.080 ms): not candidates.
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
    # 4 splits took V's forward+backward from 1.746 to 1.673 ms on an H200).
    more += [TileConfig(bi, bo, bk, w, st, s) for s in (2 * splits, 4 * splits)
             if s <= most]
  return list(dict.fromkeys(out + more))


def choose_dw_config(p, k, e, i, o, dtype, a_rows, b_rows, has_scale) -> TileConfig:
  n = p // k
  shape = (n, k, e, i, o, a_rows, b_rows, int(has_scale))

  def bench(cfg):
    with jax.ensure_compile_time_eval():
      r = synthetic_routing(n, k, e)
      a = jax.random.normal(jax.random.key(1), (n * a_rows, i), dtype)
      b = jax.random.normal(jax.random.key(2), (n * b_rows, o), dtype)
      sc = jax.random.uniform(jax.random.key(3), (p,), jnp.float32) if has_scale else None
    f = autotune.compile_now(
        lambda a, b, r, sc: expert_gram(a, b, r, a_rows=a_rows, b_rows=b_rows,
                                        scale=sc, cfg=cfg), a, b, r, sc)
    return autotune.time_call(lambda: f(a, b, r, sc))

  return autotune.tuner().choose("triton_dw", shape, dtype, dw_candidates(p, e, i, o, dtype),
                                 bench_or_none(bench))


