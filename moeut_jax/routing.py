"""Expert selection and the entropy regulariser as pure functions (docs/semantics.md §2, §3,
§5).

Router logits are always float32 (:func:`router_logits`). The regulariser is accumulated
as a running log-sum-exp over time and repeats, so the scan over repeats never stores the
logits:
  acc = logaddexp(acc, logsumexp_T(log_softmax_E(s)))      [B, ..., E]
and at the end  m = acc - log(T * R),  ent = -sum_E exp(m) m,  loss = -mean(ent).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from kernels.arrays import pad_to
from kernels.topk import topk_indices


def _split_bf16(a: jax.Array):
  """a (float32) = hi + lo + r with hi, lo bf16, |lo| <= 2^-9 |a| and |r| <= 2^-17 |a|.

  hi is a rounded to its top 16 bits by integer arithmetic on the bits (exact in bf16,
  and not a float32 -> bf16 -> float32 round trip, which XLA on GPUs removes as excess
  precision); lo = a - hi is exact in float32 and rounded once to bf16. (Finite inputs
  below 3e38, as router inputs and weights are.)"""
  bits = jax.lax.bitcast_convert_type(a, jnp.uint32)
  bits = (bits + jnp.uint32(0x8000)) & jnp.uint32(0xFFFF0000)
  hi = jax.lax.bitcast_convert_type(bits, jnp.float32)
  return hi.astype(jnp.bfloat16), (a - hi).astype(jnp.bfloat16)


def _dot_bf16x3(a: jax.Array, b: jax.Array, contract_a: int, contract_b: int) -> jax.Array:
  """Float32 product of 2-D float32 arrays a, b contracted over the given axes, from
  three bf16 products accumulated in float32: ah@bh + ah@bl + al@bh. What is left out
  (al@bl and the rounding of lo, each about 2^-18 relative) gives errors of a few 1e-6.
  Two matrix products: ah @ [bh | bl] and al @ bh."""
  ah, al = _split_bf16(a)
  bh, bl = _split_bf16(b)
  n_out = b.shape[1 - contract_b]
  dims = (((contract_a,), (contract_b,)), ((), ()))
  both = jax.lax.dot_general(ah, jnp.concatenate([bh, bl], axis=1 - contract_b), dims,
                             preferred_element_type=jnp.float32)       # [.., 2 * n_out]
  cross = jax.lax.dot_general(al, bh, dims, preferred_element_type=jnp.float32)
  return both[:, :n_out] + (both[:, n_out:] + cross)


# The expert axis is padded with zero columns to a multiple of this: unaligned widths
# (387 experts = 774-byte bf16 rows) push GPU matrix products onto slow paths.
_E_ALIGN = 16


@jax.custom_vjp
def _logits_bf16x3(x: jax.Array, w: jax.Array) -> jax.Array:
  return _logits_bf16x3_fwd(x, w)[0]


def _logits_bf16x3_fwd(x, w):
  e = w.shape[1]
  y = _dot_bf16x3(x, pad_to(w, 1, _E_ALIGN), 1, 0)[:, :e]             # [N, E]
  return y, (x, w)


def _logits_bf16x3_bwd(res, g):
  x, w = res
  e = w.shape[1]
  g = pad_to(g, 1, _E_ALIGN)                                          # [N, Ep]
  dx = _dot_bf16x3(g, pad_to(w, 1, _E_ALIGN), 1, 1)                   # [N, D]
  dw = _dot_bf16x3(x, g, 0, 0)[:, :e]                                  # [D, E]
  return dx, dw


_logits_bf16x3.defvjp(_logits_bf16x3_fwd, _logits_bf16x3_bwd)


def router_logits(x: jax.Array, w: jax.Array, compute_dtype) -> jax.Array:
  """Router logits x [..., D] @ w [D, E] in float32, and their gradients.

  With a float32 ``compute_dtype`` this is one float32 product (``Precision.HIGHEST``),
  as the parity tests require. With a 16-bit ``compute_dtype`` the product is split into
  three bf16 products accumulated in float32 (x = xh + xl, w = wh + wl; xh@wh + xh@wl +
  xl@wh), forward and for both gradients: relative error a few 1e-6 against float64
  (a float32 product's own is about 6e-7), on tensor cores instead of the float32
  units, which are many times slower on GPUs. Either way the logits are far more exact
  than the original's bf16 routers, so near-ties in the top-k resolve as in float32.
  """
  x = x.astype(jnp.float32)
  w = w.astype(jnp.float32)
  if jnp.dtype(compute_dtype) == jnp.float32:
    return jnp.einsum("...D,DE->...E", x, w, precision=jax.lax.Precision.HIGHEST)
  lead = x.shape[:-1]
  return _logits_bf16x3(x.reshape(-1, x.shape[-1]), w).reshape(*lead, w.shape[-1])


def sigmoid_topk(logits: jax.Array, k: int, drop_mask: jax.Array | None = None):
  """Top-k of sigmoid(logits) over the last axis.

  Args:
    logits: [..., E] float32 router logits.
    k: experts to select.
    drop_mask: optional [..., E] bool, True = expert excluded from the choice (expert
      dropout). The weights are the sigmoid of the chosen experts either way.

  Returns:
    (gates [..., k] float32, index [..., k] int32).
  """
  gate = jax.nn.sigmoid(logits)
  choice = gate if drop_mask is None else jnp.where(drop_mask, -jnp.inf, gate)
  index = topk_indices(jax.lax.stop_gradient(choice), k)             # lax.top_k's order
  return jnp.take_along_axis(gate, index, axis=-1), index


def entropy_init(shape) -> jax.Array:
  """An empty log-sum-exp accumulator."""
  return jnp.full(shape, -jnp.inf, jnp.float32)


def entropy_accumulate(acc: jax.Array, logits: jax.Array, time_axis: int = 1) -> jax.Array:
  """Adds logits [B, T, ..., E] to acc [B, ..., E]: log-mean-exp numerator over time."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.logaddexp(acc, jax.nn.logsumexp(logp, axis=time_axis))


def entropy_loss(acc: jax.Array, n_steps: int) -> jax.Array:
  """-mean entropy of the mean expert distribution; acc [B, ..., E] over n_steps = T*R."""
  m = acc - math.log(n_steps)
  ent = -jnp.sum(jnp.exp(m) * m, axis=-1)                            # [B, ...]
  return -jnp.mean(ent)
