"""The Triton path's custom_vjp ops: CVMM and the fused σ-MoE pair, forward and backward.

:func:`cvmm_triton` is one row-kernel launch forward (:func:`~kernels.cvmm_triton.rows.rows_matmul`)
and, backward, one for dx and one weight-gradient contraction
(:func:`~kernels.cvmm_triton.dw.expert_gram`). :func:`cvmm_triton_pair` is the σ-MoE
MLP with the middle kept on chip (:mod:`kernels.cvmm_triton.pair`). Each op is built
once per :class:`~kernels.CvmmConfig`, so forward and backward sum the same way. The
residuals are the inputs in the compute dtype (and, for the pair, the [P, H] middle).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels.arrays import gated_rows
from kernels.config import DEFAULT, CvmmConfig
from kernels.cvmm_triton.dw import expert_gram
from kernels.cvmm_triton.pair import pair_rows
from kernels.cvmm_triton.rows import rows_matmul
from kernels.cvmm_triton.units import units_store_applies
from kernels.routing import Routing


def cvmm_triton(x: jax.Array, routing: Routing, w: jax.Array,
                gates: jax.Array | None = None, *, out_rows: int = 1, fuse_sum: bool = True,
                config: CvmmConfig = DEFAULT) -> jax.Array:
  """See :func:`kernels.cvmm`. x [N, M, I], w [E, I, O], gates [N, K] or None; with
  gates, ``out_rows`` R sums of K // R slots each per token ([N, O] for R = 1, else
  [N, R, O], which needs O < I: SwitchHead V's d_head against d_model).

  fuse_sum: add the rows that share an output row (the gated sum over slots; in the
    backward pass the slots that read one x row) with float32 atomics inside the kernel
    (True: no [P, O] intermediate), or store per-pair rows and sum them in XLA (False).
  config: the kernels' settings (the sums' dtype, float16 scales, Gluon kernels); one
    custom_vjp op per config, so the backward pass sums the same way.
  """
  if gates is not None and out_rows > 1 and w.shape[2] >= x.shape[2]:
    raise ValueError(f"cvmm_triton sums groups of slots (out_rows={out_rows}) where the "
                     f"products are narrower than the input rows; got I={x.shape[2]}, "
                     f"O={w.shape[2]} (kernels.cvmm adds the products in XLA there)")
  w = w.astype(x.dtype) if w.dtype != x.dtype else w
  plain, gated = _ops(fuse_sum, config, out_rows)
  if gates is None:
    return plain(x, w, routing)
  return gated(x, w, gates, routing)


def cvmm_triton_unfused(x, routing, w, gates=None, *, out_rows: int = 1,
                        config: CvmmConfig = DEFAULT):
  """:func:`cvmm_triton` with ``fuse_sum=False`` (for benchmarks and comparison)."""
  return cvmm_triton(x, routing, w, gates, out_rows=out_rows, fuse_sum=False, config=config)


@functools.lru_cache(maxsize=None)
def _ops(fuse: bool, config: CvmmConfig, r: int = 1):
  """The two custom_vjp ops (without and with gates, the latter summing into ``r`` rows
  per token) for one reduction strategy and kernel config."""

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
                        fuse_sum=fuse, config=config)                         # [N*M, I]
    dw = expert_gram(x.reshape(n * m, i), dy2, routing, a_rows=m, b_rows=k,
                     out_dtype=w.dtype)                                      # [E, I, O]
    return dx.reshape(n, m, i).astype(x.dtype), dw, None

  plain.defvjp(_fwd, _bwd)

  # With gates: out [N, R, O], out[n, r] = sum of gates[n, s] y[n, s] over the K // R
  # slots s of group r ([N, O] for R = 1).
  @jax.custom_vjp
  def gated(x, w, gates, routing):
    return _fwd_gated(x, w, gates, routing)[0]

  def _fwd_gated(x, w, gates, routing):
    n, m, i = x.shape
    out, _ = rows_matmul(x.reshape(n * m, i), w, routing, a_rows=m, out_rows=r,
                         scale=gates.reshape(-1), fuse_sum=fuse, config=config)  # [N*R, O]
    shape = (n, w.shape[2]) if r == 1 else (n, r, w.shape[2])
    return out.reshape(shape).astype(x.dtype), (x, w, gates, routing)

  def _bwd_gated(res, dout):
    x, w, gates, routing = res
    # everything below that reads only forward values (gated_rows, the products again):
    # tied to dout by the barrier, XLA cannot compute it in the forward pass (on an H100
    # it did for SwitchHead's O projection, keeping every layer's [N*k, I] rows from
    # there to the backward pass: 3.4 GiB at MoEUT_1B, batch 32)
    x, gates, dout = jax.lax.optimization_barrier((x, gates, dout))
    n, m, i = x.shape
    k, o = routing.k, w.shape[2]
    x2 = x.reshape(n * m, i)
    dout2 = dout.astype(x.dtype).reshape(n * r, o)                          # [N*R, O]
    g = gates.reshape(-1)
    if r > 1:
      # The forward's products are the narrower (SwitchHead V: d_head against d_model;
      # cvmm_triton checks): dgates dot them, made again, with the output gradient rows
      # (per unit with unit pairs, else stored per pair and dropped), and dx needs no
      # dgates epilogue, so its sums take the Gluon kernels.
      units = units_store_applies(routing, o, m, r, r)
      _, dg = rows_matmul(x2, w, routing, a_rows=m, out_rows=r if units else k,
                          dgate_rows=dout2, c_rows=r, config=config)
      dx, _ = rows_matmul(dout2, w, routing, a_rows=r, out_rows=m, transpose_w=True,
                          scale=g, fuse_sum=fuse, config=config)            # [N*M, I]
      # the weight gradient's rows g * dout per pair ([P, O], narrower than g * x)
      dw = expert_gram(x2, gated_rows(dout2.reshape(n, r, o), gates), routing, a_rows=m,
                       b_rows=k, out_dtype=w.dtype)
    else:
      dx, dg = rows_matmul(dout2, w, routing, a_rows=1, out_rows=m, transpose_w=True,
                           scale=g, dgate_rows=x2, c_rows=m, fuse_sum=fuse,
                           config=config)                                   # [N*M, I], [P]
      dw = expert_gram(gated_rows(x, gates), dout2, routing, a_rows=k, b_rows=1,
                       out_dtype=w.dtype)
    return (dx.reshape(n, m, i).astype(x.dtype), dw,
            dg.reshape(n, k).astype(gates.dtype), None)

  gated.defvjp(_fwd_gated, _bwd_gated)
  return plain, gated



def cvmm_triton_pair(x: jax.Array, routing: Routing, w_up: jax.Array, w_down: jax.Array,
                     gates: jax.Array, *, keep_middle: bool = True,
                     config: CvmmConfig = DEFAULT) -> jax.Array:
  """out[n] = sum_s gates[n, s] relu(x[n] @ w_up[e]) @ w_down[e], e = expert of (n, s).

  x [N, D], w_up [E, D, H], w_down [E, H, O], gates [N, K] -> [N, O] in x's dtype.
  Two fused kernels: the forward keeps each tile's relu(x @ w_up) on chip for the
  second product (and stores it once, [P, H], for the backward pass); the backward
  computes du = g * (dout @ w_down^T) * (h > 0) and dgates per tile and adds
  du @ w_up^T into dx the same way. The weight gradients are ragged contractions.
  The weights are cast to x's dtype outside the custom VJP, so their gradients come
  back in the weights' own dtype (as for :func:`cvmm_triton`). config: as for
  :func:`cvmm_triton` (the output and dx sums). keep_middle False: the backward pass
  makes the [P, H] middle again with the row kernel (x @ w_up, ReLU) instead of keeping
  the forward's.
  """
  op = _pair_op(config, keep_middle)
  return op(x, routing, w_up.astype(x.dtype), w_down.astype(x.dtype), gates)


@functools.lru_cache(maxsize=None)
def _pair_op(config: CvmmConfig, keep_middle: bool = True):
  """The fused pair as a custom_vjp op for one kernel config."""

  @jax.custom_vjp
  def op(x, routing, w_up, w_down, gates):
    return _pair_fwd(x, routing, w_up, w_down, gates, config, keep_middle)[0]

  op.defvjp(functools.partial(_pair_fwd, config=config, keep_middle=keep_middle),
            functools.partial(_pair_bwd, config=config))
  return op


def _pair_fwd(x, routing, w_up, w_down, gates, config, keep_middle):
  r = pair_rows(x, w_up, w_down, gates, routing, config=config)
  h = r["h"] if keep_middle else None
  return r["out"].astype(x.dtype), (x, w_up, w_down, gates, routing, h)


def _pair_bwd(res, dout, config):
  x, w_up, w_down, gates, routing, h = res
  k = routing.k
  dout = dout.astype(x.dtype)
  # gated_rows below (and the middle made again) read only forward values: tied to dout
  # by the barrier, XLA cannot move them into the forward pass (on an H100 it did,
  # keeping a second [N*k, H] array per layer from the forward to the backward pass:
  # 4.5 GiB at MoEUT_244M, batch 64)
  if h is None:
    x, gates, dout = jax.lax.optimization_barrier((x, gates, dout))
    y, _ = rows_matmul(x, w_up, routing, a_rows=1, out_rows=k)           # [P, H]
    h = jax.nn.relu(y).astype(x.dtype)
  else:
    h, gates, dout = jax.lax.optimization_barrier((h, gates, dout))
  r = pair_rows(dout, w_down, w_up, gates, routing, h=h, config=config)
  # dvalues from rows pre-scaled by the gates (see gated_rows): g * h per pair.
  dw_down = expert_gram(gated_rows(h.reshape(-1, k, h.shape[1]), gates), dout, routing,
                        a_rows=k, b_rows=1, out_dtype=w_down.dtype)       # [E, H, O]
  dw_up = expert_gram(x, r["du"], routing, a_rows=1, b_rows=k, out_dtype=w_up.dtype)
  return (r["out"].astype(x.dtype), None, dw_up, dw_down,
          r["dg"].reshape(gates.shape).astype(gates.dtype))




