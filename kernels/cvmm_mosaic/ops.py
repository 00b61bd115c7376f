"""The Mosaic GPU path's custom_vjp ops: CVMM forward and backward, every product and
gradient a Pallas kernel (:mod:`kernels.cvmm_mosaic.rows`, :mod:`kernels.cvmm_mosaic.gram`).

Forward: one row-kernel launch (the gated sum over slots fused: rows are added into the
[N, O] output by TMA reductions). Backward: one row-kernel launch for dx (and, gated,
dgates from the same product) and one weight-gradient launch. As in the Triton path
(kernels/cvmm_triton/ops.py) the gated weight gradient contracts rows pre-scaled by their
gates (``gated_rows``) and the residuals are the inputs. Sums over slots are float32,
or bfloat16 where the config's ``sum_dtype`` is "bfloat16" (rows added in bfloat16); the
Triton path's scaled float16 sums are not implemented here.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels.arrays import gated_rows
from kernels.config import DEFAULT, CvmmConfig
from kernels.cvmm_mosaic.common import check_dtype
from kernels.cvmm_mosaic.gram import expert_gram
from kernels.cvmm_mosaic.rows import rows_matmul
from kernels.routing import Routing


def sum_dtype(config: CvmmConfig):
  """The dtype the Mosaic kernels add rows in for ``config``."""
  return jnp.bfloat16 if config.sum_dtype == "bfloat16" else jnp.float32


def cvmm_mosaic(x: jax.Array, routing: Routing, w: jax.Array,
                gates: jax.Array | None = None, *, config: CvmmConfig = DEFAULT) -> jax.Array:
  """See :func:`kernels.cvmm`. x [N, M, I], w [E, I, O], gates [N, K] or None; 16-bit
  inputs (wgmma multiplies float32 only as tf32). Runs on Hopper GPUs and in Pallas's
  Mosaic GPU interpreter (tests on a CPU)."""
  check_dtype(x.dtype)
  w = w.astype(x.dtype) if w.dtype != x.dtype else w
  plain, gated = _ops(jnp.dtype(sum_dtype(config)).name)
  if gates is None:
    return plain(x, w, routing)
  return gated(x, w, gates, routing)


@functools.lru_cache(maxsize=None)
def _ops(sums: str):
  """The two custom_vjp ops (without and with gates) adding rows in ``sums``."""

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
                        sum_dtype=sums)                                     # [N*M, I]
    dw = expert_gram(x.reshape(n * m, i), dy2, routing, a_rows=m, b_rows=k,
                     out_dtype=w.dtype)                                      # [E, I, O]
    return dx.reshape(n, m, i).astype(x.dtype), dw, None

  plain.defvjp(_fwd, _bwd)

  @jax.custom_vjp
  def gated(x, w, gates, routing):
    return _fwd_gated(x, w, gates, routing)[0]

  def _fwd_gated(x, w, gates, routing):
    n, m, i = x.shape
    out, _ = rows_matmul(x.reshape(n * m, i), w, routing, a_rows=m, out_rows=1,
                         scale=gates.reshape(-1), sum_dtype=sums)             # [N, O]
    return out.astype(x.dtype), (x, w, gates, routing)

  def _bwd_gated(res, dout):
    x, w, gates, routing = res
    # tied to dout: gated_rows below reads only forward values, and XLA could otherwise
    # compute it in the forward pass and keep it until here (kernels/cvmm_triton/ops.py)
    x, gates, dout = jax.lax.optimization_barrier((x, gates, dout))
    n, m, i = x.shape
    x2 = x.reshape(n * m, i)
    dout = dout.astype(x.dtype)                                              # [N, O]
    dx, dg = rows_matmul(dout, w, routing, a_rows=1, out_rows=m, transpose_w=True,
                         scale=gates.reshape(-1), dgate_rows=x2, c_rows=m,
                         sum_dtype=sums)                                     # [N*M, I], [P]
    dw = expert_gram(gated_rows(x, gates), dout, routing, a_rows=routing.k, b_rows=1,
                     out_dtype=w.dtype)
    return (dx.reshape(n, m, i).astype(x.dtype), dw,
            dg.reshape(n, routing.k).astype(gates.dtype), None)

  gated.defvjp(_fwd_gated, _bwd_gated)
  return plain, gated
