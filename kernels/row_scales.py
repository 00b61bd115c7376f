"""Power-of-two row scales of float16 sums over experts, in plain JAX (both GPU paths).

A fused sum over experts adds every (token, slot) product into its token's output row.
With float16 sums (``CvmmConfig.sum_dtype="float16"``, the default for 16-bit inputs)
each output row is multiplied by a power of two s before the adds and scaled back
after, so that the row's sum stays within float16's range and its normal numbers
whatever the magnitude of the inputs: each addition then rounds to float16's 11-bit
significand, and the traffic is half that of float32 sums. s comes from a bound on the
sum of the row's terms (|scale| times the input row's largest |value| times the expert
matrix's largest column sum of |W|) that no partial sum can exceed: the bound times s
is below 2^14, and float16's largest finite value, 65504, is just under 2^16. Powers of
two scale and unscale exactly.

The Triton path (kernels/cvmm_triton/scales.py) also has estimated scales with a check
and repair of the rows they miss; the Mosaic path uses these bounds.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.routing import Routing

# the log2 of what a row's bound times its scale stays below
F16_BOUND_LOG2 = 14


def pow2_scale(bound: jax.Array) -> jax.Array:
  """float32 powers of two s with bound * s < 2^14 (s within [2^-126, 2^126]); 1 where
  the bound is 0 (every term is 0) or not finite (inf/nan inputs give inf/nan)."""
  bound = bound.astype(jnp.float32)
  _, ex = jnp.frexp(bound)                  # bound = m * 2^ex, 0.5 <= m < 1
  s = jnp.ldexp(jnp.ones_like(bound), jnp.clip(F16_BOUND_LOG2 - ex, -126, 126))
  return jnp.where(jnp.isfinite(bound) & (bound > 0), s, 1.0)


def max_l1(w: jax.Array, axis: int) -> jax.Array:
  """[E] float32: each expert's largest sum of absolute values along ``axis`` (the
  contracted one) of w [E, ., .], a bound on |row @ W[e]| per unit of the row's
  largest absolute value. Per expert, so that one expert's large weights do not push
  the other experts' sums down towards float16's subnormals."""
  return jnp.max(jnp.sum(jnp.abs(w).astype(jnp.float32), axis=axis), axis=1)


def f16_row_scales(a, w_l1, routing: Routing, scale, a_rows: int, out_rows: int):
  """Row scales of float16 sums over the K slots of ``routing`` (R = ``out_rows`` sums per
  token, each over K // R slots; a [N * a_rows, I] the product's input rows): (s
  [N * out_rows] float32, the per-pair scale [P] float32 to apply in the kernel:
  scale[p] * s[orow(p)]; ``scale`` [P] or None).

  The bound of output row r is the sum over its pairs p of |scale[p]| *
  max|a[arow(p)]| * w_l1[e(p)] (w_l1: :func:`max_l1`)."""
  n, k = routing.n_tokens, routing.k
  amax = jnp.max(jnp.abs(a), axis=1).astype(jnp.float32).reshape(n, a_rows)
  terms = jnp.repeat(amax, k // a_rows, axis=1) * w_l1[routing.expert_index]  # [N, K]
  sc = None if scale is None else scale.astype(jnp.float32).reshape(n, k)
  if sc is not None:
    terms = terms * jnp.abs(sc)
  bound = terms.reshape(n, out_rows, k // out_rows).sum(axis=2)         # [N, out_rows]
  return row_and_pair_scales(pow2_scale(bound), sc, k // out_rows)


def row_and_pair_scales(s: jax.Array, sc, kr: int):
  """(s [N * R], the per-pair scales [P] = sc[p] * s[orow(p)]) of row scales s [N, R]
  with KR pairs a row and per-pair scales sc [N, K] float32 (None: ones)."""
  pair_s = jnp.repeat(s, kr, axis=1)                                    # [N, K]
  return s.reshape(-1), (pair_s if sc is None else sc * pair_s).reshape(-1)


def unscale(out: jax.Array, row_s: jax.Array, dtype) -> jax.Array:
  """out [R, O] (summed with row r scaled by ``row_s[r]``) with the scales taken out, in
  ``dtype``: exact, the scales being powers of two (an elementwise pass that XLA fuses
  with what reads it)."""
  inv = (1.0 / row_s.astype(jnp.float32))[:, None]
  return (out.astype(jnp.float32) * inv).astype(dtype)
