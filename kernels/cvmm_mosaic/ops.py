"""The Mosaic GPU path's custom_vjp ops: CVMM forward and backward, every product and
gradient a Pallas kernel (:mod:`kernels.cvmm_mosaic.rows`, :mod:`kernels.cvmm_mosaic.gram`,
and for the σ-MoE pair :mod:`kernels.cvmm_mosaic.pair` and
:mod:`kernels.cvmm_mosaic.pair_bwd`).

A projection's forward is one row-kernel launch (the gated sum over slots fused: rows
added into the [N, O] output). Its backward is one row-kernel launch for dx (and, gated,
dgates from the same product) and one weight-gradient launch. The σ-MoE pair is one
kernel forward and three backward (the inputs' gradients, then each weight's). As in
the Triton path (kernels/cvmm_triton/ops.py) the gated weight gradient contracts rows
pre-scaled by their gates (``gated_rows``) and the residuals are the inputs (and the
pair's middle).

Sums over slots (the gated forward, dx where several slots read one input row) add in
the config's ``sum_dtype``: "float16" (the default) scales each output row by a power
of two from a bound on its sum (:mod:`kernels.row_scales`: one pass over the product's
input rows), adds in float16 and takes the scale back out in plain JAX, which XLA fuses
with what reads the sum; "bfloat16" adds in bfloat16; "float32" in float32. 16-bit rows
are added by every thread's vector atomics, float32 rows by one TMA reduction each. The
Triton path's estimated ("checked") float16 scales are not implemented here: the bound
is used whatever ``f16_scales`` says.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels.arrays import gated_rows
from kernels.config import DEFAULT, CvmmConfig
from kernels.cvmm_mosaic.common import CHUNK, check_dtype
from kernels.cvmm_mosaic.gram import expert_gram
from kernels.cvmm_mosaic.pair import hidden_fits, pair_candidates, pair_forward
from kernels.cvmm_mosaic.pair_bwd import pair_backward, pair_bwd_candidates
from kernels.cvmm_mosaic.rows import rows_matmul
from kernels.routing import Routing, check_out_rows
from kernels.row_scales import f16_row_scales, max_l1, unscale


def sum_dtype(config: CvmmConfig):
  """The dtype the Mosaic kernels add rows in for ``config`` (float16: scaled rows)."""
  return jnp.dtype(config.sum_dtype)


def summed_rows(a, w, routing: Routing, *, a_rows: int, out_rows: int, out_dtype,
                sums: str, transpose_w: bool = False, scale=None, dgate_rows=None,
                c_rows: int = 1):
  """:func:`~kernels.cvmm_mosaic.rows.rows_matmul` (same arguments) with its output in
  ``out_dtype``, adding rows in ``sums`` where several pairs meet in an output row
  (``out_rows`` < K): "float32", "bfloat16", or "float16" with each output row scaled
  by its bound's power of two (:func:`kernels.row_scales.f16_row_scales`) in the
  kernel's per-pair scale and unscaled after. dgates come from the unscaled product."""
  kw = dict(a_rows=a_rows, out_rows=out_rows, transpose_w=transpose_w,
            dgate_rows=dgate_rows, c_rows=c_rows)
  if sums != "float16" or out_rows == routing.k:
    out, dg = rows_matmul(a, w, routing, scale=scale, sum_dtype=sums, **kw)
    return out.astype(out_dtype), dg
  row_s, pair_s = f16_row_scales(a, max_l1(w, 2 if transpose_w else 1), routing, scale,
                                 a_rows, out_rows)
  out, dg = rows_matmul(a, w, routing, scale=pair_s, sum_dtype=jnp.float16, **kw)
  return unscale(out, row_s, out_dtype), dg


def cvmm_mosaic(x: jax.Array, routing: Routing, w: jax.Array,
                gates: jax.Array | None = None, *, out_rows: int = 1,
                config: CvmmConfig = DEFAULT) -> jax.Array:
  """See :func:`kernels.cvmm`. x [N, M, I], w [E, I, O], gates [N, K] or None; 16-bit
  inputs (wgmma multiplies float32 only as tf32). With gates, ``out_rows`` R sums of
  K // R slots each per token, added in the kernel: [N, O] for R = 1, else [N, R, O]
  (SwitchHead V's sums per head). Runs on Hopper GPUs and in Pallas's Mosaic GPU
  interpreter (tests on a CPU)."""
  check_dtype(x.dtype)
  w = w.astype(x.dtype) if w.dtype != x.dtype else w
  sums = sum_dtype(config).name
  check_out_rows(out_rows, routing.k, gates is not None)
  if gates is None:
    return _plain_op(sums)(x, w, routing)
  return _gated_op(sums, out_rows)(x, w, gates, routing)


def plain_grads(x, w, routing: Routing, dy, sums: str):
  """(dx [N, M, I], dw [E, I, O]) of y = cvmm(x, routing, w) [N, K, O] for dy, dx's
  sums over slots in ``sums``."""
  n, m, i = x.shape
  k = routing.k
  dy2 = dy.astype(x.dtype).reshape(n * k, w.shape[2])                        # [P, O]
  dx, _ = summed_rows(dy2, w, routing, a_rows=k, out_rows=m, transpose_w=True,
                      out_dtype=x.dtype, sums=sums)                         # [N*M, I]
  dw = expert_gram(x.reshape(n * m, i), dy2, routing, a_rows=m, b_rows=k,
                   out_dtype=w.dtype)                                        # [E, I, O]
  return dx.reshape(n, m, i), dw


def gated_grads(x, w, gates, routing: Routing, dout, sums: str):
  """(dx [N, M, I], dw [E, I, O], dgates [N, K]) of out = cvmm(x, routing, w, gates,
  out_rows=R) ([N, O] or [N, R, O]) for dout, dx's sums over slots in ``sums``."""
  # tied to dout: gated_rows below reads only forward values, and XLA could otherwise
  # compute it in the forward pass and keep it until here (kernels/cvmm_triton/ops.py)
  x, gates, dout = jax.lax.optimization_barrier((x, gates, dout))
  n, m, i = x.shape
  r = 1 if dout.ndim == 2 else dout.shape[1]
  x2 = x.reshape(n * m, i)
  dout = dout.astype(x.dtype).reshape(n * r, w.shape[2])                    # [N*R, O]
  dx, dg = summed_rows(dout, w, routing, a_rows=r, out_rows=m, transpose_w=True,
                       scale=gates.reshape(-1), dgate_rows=x2, c_rows=m,
                       out_dtype=x.dtype, sums=sums)                         # [N*M, I], [P]
  dw = expert_gram(gated_rows(x, gates), dout, routing, a_rows=routing.k, b_rows=r,
                   out_dtype=w.dtype)
  return dx.reshape(n, m, i), dw, dg.reshape(n, routing.k).astype(gates.dtype)


@functools.lru_cache(maxsize=None)
def _plain_op(sums: str):
  """The custom_vjp op of ungated products ([N, K, O] stored), dx's sums in ``sums``
  (:func:`summed_rows`)."""

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
    return (*plain_grads(x, w, routing, dy, sums), None)

  plain.defvjp(_fwd, _bwd)
  return plain


@functools.lru_cache(maxsize=None)
def _gated_op(sums: str, out_rows: int):
  """The custom_vjp op of the gated sums, ``out_rows`` per token, added in ``sums``."""

  @jax.custom_vjp
  def gated(x, w, gates, routing):
    return _fwd(x, w, gates, routing)[0]

  def _fwd(x, w, gates, routing):
    n, m, i = x.shape
    out, _ = summed_rows(x.reshape(n * m, i), w, routing, a_rows=m, out_rows=out_rows,
                         scale=gates.reshape(-1), out_dtype=x.dtype, sums=sums)  # [N*R, O]
    shape = (n, w.shape[2]) if out_rows == 1 else (n, out_rows, w.shape[2])
    return out.reshape(shape), (x, w, gates, routing)

  def _bwd(res, dout):
    x, w, gates, routing = res
    return (*gated_grads(x, w, gates, routing, dout, sums), None)

  gated.defvjp(_fwd, _bwd)
  return gated


def cvmm_mosaic_pair(x: jax.Array, routing: Routing, w_up: jax.Array, w_down: jax.Array,
                     gates: jax.Array, *, keep_middle: bool = True,
                     config: CvmmConfig = DEFAULT) -> jax.Array:
  """The σ-MoE pair (:func:`kernels.cvmm_pair`) with its forward in one kernel
  (:mod:`kernels.cvmm_mosaic.pair`: up, ReLU and the gated down projection of a tile,
  the middle on chip) and the gradients of its inputs in another
  (:mod:`kernels.cvmm_mosaic.pair_bwd`: through the down projection, the ReLU and the up
  projection, the middle's gradient on chip), reading the stored middle
  (``keep_middle``) or making it again with the row kernel; the weight gradients are
  the weight-gradient kernel's.
  x [N, D] 16-bit; a middle width :func:`pair_supported` takes."""
  check_dtype(x.dtype)
  w_up, w_down = (w if w.dtype == x.dtype else w.astype(x.dtype) for w in (w_up, w_down))
  return _pair_op(sum_dtype(config).name, keep_middle)(x, w_up, w_down, gates, routing)


def pair_supported(h: int, config: CvmmConfig = DEFAULT) -> bool:
  """Whether the fused pair kernels take a middle of width ``h`` with ``config``'s sums:
  it fits one accumulator and both kernels have a tile within shared memory (the
  widest tiles' columns, the most memory; at most 192 columns a middle with float32
  sums)."""
  if not hidden_fits(h):
    return False
  hp = -(-h // CHUNK) * CHUNK
  itemsize = sum_dtype(config).itemsize
  return bool(pair_candidates(hp, 256, itemsize)) and bool(
      pair_bwd_candidates(hp, 256, itemsize))


def pair_sums(x, w1, w2, routing: Routing, gates, sums: str):
  """(out [N, O] in x's dtype, the middle h [P, H]) of the fused forward, the gated
  sums in ``sums``; float16 rows scaled by a bound through both matrices (the ReLU
  does not grow a row: sum of |gate| * max|x[n]| * l1(W1[e]) * l1(W2[e]))."""
  g = gates.reshape(-1).astype(jnp.float32)
  if sums != "float16":
    out, h = pair_forward(x, w1, w2, routing, g, sum_dtype=sums)
    return out.astype(x.dtype), h
  row_s, pair_s = f16_row_scales(x, max_l1(w1, 1) * max_l1(w2, 1), routing, g, 1, 1)
  out, h = pair_forward(x, w1, w2, routing, pair_s, sum_dtype=jnp.float16)
  return unscale(out, row_s, x.dtype), h


def pair_grads(dout, h, w1, w2, routing: Routing, gates, out_dtype, sums: str):
  """(dx [N, D] in ``out_dtype``, du [P, H], dgates [P] float32) of the pair's backward
  kernel (:mod:`kernels.cvmm_mosaic.pair_bwd`), dx summed in ``sums``; float16 rows
  scaled by a bound through both matrices (sum of |gate| * max|dout[n]| *
  l1(W2[e] along O) * l1(W1[e] along H))."""
  g = gates.reshape(-1).astype(jnp.float32)
  dout = dout.astype(h.dtype)
  if sums != "float16":
    dx, du, dg = pair_backward(dout, h, w1, w2, routing, g, jnp.ones_like(g),
                               sum_dtype=sums)
    return dx.astype(out_dtype), du, dg
  row_s, _ = f16_row_scales(dout, max_l1(w2, 2) * max_l1(w1, 2), routing, g, 1, 1)
  dx, du, dg = pair_backward(dout, h, w1, w2, routing, g, jnp.repeat(row_s, routing.k),
                             sum_dtype=jnp.float16)
  return unscale(dx, row_s, out_dtype), du, dg


@functools.lru_cache(maxsize=None)
def _pair_op(sums: str, keep_middle: bool):

  @jax.custom_vjp
  def pair(x, w1, w2, gates, routing):
    return pair_sums(x, w1, w2, routing, gates, sums)[0]

  def _fwd(x, w1, w2, gates, routing):
    out, h = pair_sums(x, w1, w2, routing, gates, sums)
    return out, (x, w1, w2, gates, routing, h if keep_middle else None)

  def _bwd(res, dout):
    x, w1, w2, gates, routing, h = res
    # tied to dout: gated_rows below reads only forward values (as in gated_grads)
    x, gates, dout = jax.lax.optimization_barrier((x, gates, dout))
    n, k = routing.n_tokens, routing.k
    if h is None:   # made again: relu(x @ W1[e]) as the forward rounded it
      h = jax.nn.relu(rows_matmul(x, w1, routing, a_rows=1, out_rows=k)[0])
    dx, du, dg = pair_grads(dout, h, w1, w2, routing, gates, x.dtype, sums)
    dw1 = expert_gram(x, du, routing, a_rows=1, b_rows=k, out_dtype=w1.dtype)
    dw2 = expert_gram(gated_rows(h.reshape(n, k, -1), gates), dout.astype(x.dtype), routing,
                      a_rows=k, b_rows=1, out_dtype=w2.dtype)
    return dx, dw1, dw2, dg.reshape(n, k).astype(gates.dtype), None

  pair.defvjp(_fwd, _bwd)
  return pair
