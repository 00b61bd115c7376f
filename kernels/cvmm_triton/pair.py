"""The fused σ-MoE pair: up, ReLU and gated down for one tile, the middle kept on chip.

``pair_body`` (launched as ``pair_fwd_kernel`` and ``pair_bwd_kernel``), one program
per expert-aligned tile of sorted pairs:
  fwd: h = relu(x[n] @ keys[e]) (stored for the backward pass);
       out[n] += g[p] * h @ values[e]
  bwd: t = dout[n] @ values[e]^T; dgates[p] = <t, h[p]>; du = g[p] * t * (h[p] > 0)
       (stored for dkeys); dx[n] += du @ keys[e]^T
The sums into out and dx are fused as in the row kernel (:mod:`kernels.cvmm_triton.rows`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels import autotune
from kernels.autotune import TileConfig
from kernels.config import DEFAULT, CvmmConfig
from kernels.cvmm_triton.launch import dummy_f32, jit, launch, tl
from kernels.cvmm_triton.primitives import gathered_matmul, mma, row_scale, rows_epilogue, sum_tiles
from kernels.cvmm_triton.scales import f16_unscale, half_sums, red_width, sum_out_dtype
from kernels.cvmm_triton.tuning import bench_or_none, sum_key, synthetic_routing
from kernels.routing import Routing
from kernels.row_scales import f16_row_scales, max_l1


@jit
def pair_body(
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
    acc = gathered_matmul(a_ptr, a_row, rmask, w1_ptr + e.to(tl.int64) * S1_E, hs, hmask,
                           D, S1_D, S1_H, BM, BH, BK, IEEE)         # [BM, BH]
    pmask = rmask[:, None] & hmask[None, :]
    mid_ptrs = pair.to(tl.int64)[:, None] * H + hs[None, :]          # [BM, BH]
    g = row_scale(gates_ptr, pair, rmask, True)                     # [BM]
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
      y = mma(mid, b2, None, IEEE)
      # fwd: scaled by the gates here; bwd: du already carries them (and float16
      # sums scale the rows).
      rows_epilogue(y, nb, pair, tok, slot, rmask, s, gates_ptr, out_ptr, dg_ptr,
                     O, K, 1, 1, BM, BN, (not BWD) or F16, True, False, RED, F16)


@jit
def pair_fwd_kernel(a_ptr, w1_ptr, w2_ptr, order_ptr, tiles_ptr, gates_ptr,  # inputs
                     out_ptr, h_ptr,                                           # outputs
                     Z: tl.constexpr, D: tl.constexpr, H: tl.constexpr, O: tl.constexpr,
                     K: tl.constexpr, S1_E: tl.constexpr, S1_D: tl.constexpr,
                     S1_H: tl.constexpr, S2_E: tl.constexpr, S2_H: tl.constexpr,
                     S2_O: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                     BK: tl.constexpr, BH: tl.constexpr, IEEE: tl.constexpr,
                     RED: tl.constexpr, F16: tl.constexpr):
  pair_body(a_ptr, w1_ptr, w2_ptr, order_ptr, tiles_ptr, gates_ptr, gates_ptr, h_ptr, h_ptr,
             out_ptr, out_ptr, Z, D, H, O, K, S1_E, S1_D, S1_H, S2_E, S2_H, S2_O, BM, BN, BK,
             BH, False, IEEE, RED, F16)


@jit
def pair_bwd_kernel(a_ptr, w1_ptr, w2_ptr, order_ptr, tiles_ptr, gates_ptr, h_ptr,  # in
                     rs_ptr,                                                       # in
                     out_ptr, du_ptr, dg_ptr,                                      # out
                     Z: tl.constexpr, D: tl.constexpr, H: tl.constexpr, O: tl.constexpr,
                     K: tl.constexpr, S1_E: tl.constexpr, S1_D: tl.constexpr,
                     S1_H: tl.constexpr, S2_E: tl.constexpr, S2_H: tl.constexpr,
                     S2_O: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                     BK: tl.constexpr, BH: tl.constexpr, IEEE: tl.constexpr,
                     RED: tl.constexpr, F16: tl.constexpr):
  pair_body(a_ptr, w1_ptr, w2_ptr, order_ptr, tiles_ptr, gates_ptr, rs_ptr, h_ptr, du_ptr,
             dg_ptr, out_ptr, Z, D, H, O, K, S1_E, S1_D, S1_H, S2_E, S2_H, S2_O, BM, BN, BK,
             BH, True, IEEE, RED, F16)


def pair_layout(w1_shape, w2_shape, bwd: bool):
  """(D, H, O, strides of the first matrices, of the second) of the fused pair kernel
  (:func:`pair_body`; strides as (expert, row, column) element strides). Forward: w1 =
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
              cfg: TileConfig | None = None, config: CvmmConfig = DEFAULT):
  """One launch of the fused pair kernel (:func:`pair_body`).

  Forward (``h`` None): a = x [N, D], w1 = keys [E, D, H], w2 = values [E, H, O].
    Returns (out [N, O]; h [P, H] in x's dtype).
  Backward (``h`` = the forward's h): a = dout [N, O], w1 = values, w2 = keys (both
    used transposed). Returns (dx [N, D], du [P, H], dgates [P] float32), as a dict
    of "out", "du", "dg". out and dx are float32 with float32 sums, else in a's dtype
    (:func:`~kernels.cvmm_triton.scales.half_sums` of ``config.sum_dtype``; float16
    sums take bound scales here).
  """
  n, k, p = routing.n_tokens, routing.k, routing.n_pairs
  bwd = h is not None
  e = w1.shape[0]
  d, hh, o, s1, s2 = pair_layout(w1.shape, w2.shape, bwd)
  assert a.shape == (n, d), (a.shape, n, d)
  if cfg is None:
    cfg = choose_pair_config(n, k, e, d, hh, o, a.dtype, bwd, config)
  tiles = sum_tiles(routing, cfg.block_m)                          # [3, Z]
  z = tiles.shape[1]
  red = red_width(o, a.dtype, config.sum_dtype)
  half = half_sums(a.dtype, o, config.sum_dtype)
  g = gates.reshape(-1)
  if half == "float16":
    # |h| <= max|x[n]| * max_h sum_d |keys[e, d, h]|, so the pair is a row product
    # whose matrix's column sums are bounded by the two matrices' product; the
    # backward's dx likewise, with dout, values^T and keys^T.
    l1 = max_l1(w1, 2 if bwd else 1) * max_l1(w2, 2 if bwd else 1)   # [E]
    row_s, gs = f16_row_scales(a, l1, routing, g, 1, 1)               # [N], [P]
    if not bwd:
      g = gs                      # the forward's gates carry the row scale
  args = [a, w1, w2, routing.order, tiles, g]
  out_shapes = [jax.ShapeDtypeStruct((n, o), sum_out_dtype(half))]      # out (summed)
  if bwd:
    args += [h, row_s if half == "float16" else dummy_f32()]
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
  kernel = pair_bwd_kernel if bwd else pair_fwd_kernel
  outs = dict(zip(names, launch(kernel, args, out_shapes, z, cfg, zeroed=(0,), **meta)))
  if half == "float16":
    outs["out"] = f16_unscale(outs["out"], row_s, a.dtype)
  return outs


def pair_candidates(d: int, h: int, o: int, dtype) -> list[TileConfig]:
  bn_max = max(16, autotune.next_pow2(o))
  bk_max = max(16, autotune.next_pow2(d))
  if jnp.dtype(dtype).itemsize >= 4:
    raw = [(64, 64, 32, 4, 2), (32, 64, 32, 4, 2)]
  else:
    # First: the fastest forward and backward at MoEUT_244M on an H200: 256-row
    # tiles read each expert's two matrices half as often as 128-row tiles.
    raw = [(256, 64, 64, 8, 4), (256, 32, 64, 8, 4), (128, 128, 64, 8, 4),
           (128, 128, 64, 8, 3), (256, 32, 32, 8, 6), (128, 64, 64, 8, 3),
           (64, 128, 64, 4, 3)]
    # A [BM, H] float32 middle of more than 256 x 128 spills registers.
    bh = max(16, autotune.next_pow2(h))
    raw = [c for c in raw if c[0] * bh <= 256 * 128]
  return list(dict.fromkeys(TileConfig(bm, min(bn, bn_max), min(bk, bk_max), w, st)
                            for bm, bn, bk, w, st in raw))


def choose_pair_config(n, k, e, d, h, o, dtype, bwd,
                       config: CvmmConfig = DEFAULT) -> TileConfig:
  """The autotuner's tile of the fused pair for this shape (timed on a random routing)."""
  shape = (n, k, e, d, h, o, int(bwd)) + sum_key(dtype, o, True, config.sum_dtype)

  def bench(cfg):
    with jax.ensure_compile_time_eval():
      r = synthetic_routing(n, k, e)
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
                                              config=config)["out"],
        a, w1, w2, g, r, hv)
    return autotune.time_call(lambda: f(a, w1, w2, g, r, hv))

  return autotune.tuner().choose("triton_pair", shape, dtype,
                                 pair_candidates(d, h, o, dtype), bench_or_none(bench),
                                 config=config)


# Widest middle (expert size) the fused pair keeps on chip: [BM, H] float32
# accumulators plus the [BM, H] operand of the second product.
PAIR_MAX_HIDDEN = 256


def pair_supported(x: jax.Array, w_up: jax.Array) -> bool:
  """Whether :func:`kernels.cvmm_triton.ops.cvmm_triton_pair` fuses this shape (else compose two cvmm calls)."""
  return x.ndim == 2 and w_up.shape[2] <= PAIR_MAX_HIDDEN


