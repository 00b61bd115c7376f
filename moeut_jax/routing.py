"""Expert selection and the entropy regulariser as pure functions (docs/semantics.md §2, §3,
§5).

Router logits are float32 (:func:`router_logits`) unless a model asks for the original's
16-bit routers (``router_dtype``, docs/semantics.md §7). The regulariser is accumulated
as a running log-sum-exp over time and repeats, so the scan over repeats never stores the
logits:
  acc = logaddexp(acc, logsumexp_T(log_softmax_E(s)))      [B, ..., E]
and at the end  m = acc - log(T * R),  ent = -sum_E exp(m) m,  loss = -mean(ent).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from kernels.arrays import pad_to
from kernels.topk import topk_indices
from moeut_jax.layernorm import NormSource


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
  # x [..., D] is kept as given (not reshaped): routers of one input share it
  e = w.shape[1]
  x2 = x.reshape(-1, x.shape[-1])
  y = _dot_bf16x3(x2, pad_to(w, 1, _E_ALIGN), 1, 0)[:, :e]            # [N, E]
  return y.reshape(*x.shape[:-1], e), (x, w)


def _logits_bf16x3_bwd(res, g):
  # the barrier keeps XLA from sharing the bf16 splits below with the forward pass's
  # (the same operations on the same arrays): it would keep both halves of x's split
  # from the forward to here, beside x itself
  x, w, g = jax.lax.optimization_barrier((*res, g))    # tied to g: not before the backward
  e = w.shape[1]
  x2 = x.reshape(-1, x.shape[-1])
  g = pad_to(g.reshape(-1, e), 1, _E_ALIGN)                           # [N, Ep]
  dx = _dot_bf16x3(g, pad_to(w, 1, _E_ALIGN), 1, 1)                   # [N, D]
  dw = _dot_bf16x3(x2, g, 0, 0)[:, :e]                                 # [D, E]
  return dx.reshape(x.shape), dw


_logits_bf16x3.defvjp(_logits_bf16x3_fwd, _logits_bf16x3_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _logits_bf16x3_normed(x, source_x, scale, bias, w, eps):
  """_logits_bf16x3 of a LayerNorm's output x = layer_norm(source_x, scale, bias, eps),
  keeping source_x (the residual stream, kept anyway), scale and bias instead of x: the
  backward pass recomputes x for w's gradient. x's gradient is x's alone (the LayerNorm's
  own backward takes it further); source_x, scale and bias get none from here."""
  return _logits_bf16x3_fwd(x, w)[0]


def _logits_bf16x3_normed_fwd(x, source_x, scale, bias, w, eps):
  return _logits_bf16x3_fwd(x, w)[0], (source_x, scale, bias, w)


def _logits_bf16x3_normed_bwd(eps, res, g):
  # the barrier keeps XLA from replacing the recomputation with the forward pass's output
  # (the same operations on the same arrays), which it would then keep until here
  # (tied to g, it cannot move into the forward pass either)
  source_x, scale, bias, w, g = jax.lax.optimization_barrier((*res, g))
  x = NormSource(source_x, scale, bias, eps).recompute()
  dx, dw = _logits_bf16x3_bwd((x, w), g)
  return dx, None, None, None, dw


_logits_bf16x3_normed.defvjp(_logits_bf16x3_normed_fwd, _logits_bf16x3_normed_bwd)


def router_logits(x: jax.Array, w: jax.Array, compute_dtype,
                  router_dtype=jnp.float32, source: NormSource | None = None) -> jax.Array:
  """Router logits x [..., D] @ w [D, E] in ``router_dtype``, and their gradients.

  float32 (the default; docs/semantics.md §7): with a float32 ``compute_dtype`` one
  float32 product (``Precision.HIGHEST``), as the parity tests require. With a 16-bit
  ``compute_dtype`` the product is split into three bf16 products accumulated in float32
  (x = xh + xl, w = wh + wl; xh@wh + xh@wl + xl@wh), forward and for both gradients:
  relative error a few 1e-6 against float64 (a float32 product's own is about 6e-7), on
  tensor cores instead of the float32 units, which are many times slower on GPUs. Either
  way the logits are far more exact than the original's bf16 routers, so near-ties in the
  top-k resolve as in float32.

  A 16-bit ``router_dtype`` is the original's router under autocast: x and w rounded to
  it, a float32 sum of the products, the logits rounded to it (their gradients too).

  ``source``: when x is a LayerNorm's output, what it is made from (``LayerNorm(...,
  with_source=True)``). With the three bf16 products the backward pass then keeps that
  (the residual stream, which the model keeps anyway) and recomputes x for w's gradient,
  instead of keeping x in float32: 4 bytes per token and d_model per router input (8 MiB
  per layer and 1024 tokens at MoEUT_244M), for a pass over x in the backward. The
  values are the same.
  """
  if jnp.dtype(router_dtype) != jnp.float32:
    return _logits_16bit(x, w, jnp.dtype(router_dtype))
  x = x.astype(jnp.float32)
  w = w.astype(jnp.float32)
  if jnp.dtype(compute_dtype) == jnp.float32:
    return jnp.einsum("...D,DE->...E", x, w, precision=jax.lax.Precision.HIGHEST)
  if source is not None:
    return _logits_bf16x3_normed(x, source.x, source.scale, source.bias, w, source.eps)
  return _logits_bf16x3(x, w)


def round_in_float32(x: jax.Array, dtype) -> jax.Array:
  """x rounded to the 16-bit ``dtype`` (to nearest even), kept in float32.

  Through ``reduce_precision``: XLA removes float32 -> 16-bit -> float32 round trips
  (it allows "excess precision"), which would skip roundings that PyTorch does."""
  f = jnp.finfo(dtype)
  return jax.lax.reduce_precision(x.astype(jnp.float32), exponent_bits=f.nexp,
                                  mantissa_bits=f.nmant)


def _round(x: jax.Array, dtype) -> jax.Array:
  """x rounded to the 16-bit ``dtype``, as an array of that dtype."""
  return round_in_float32(x, dtype).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _logits_16bit(x: jax.Array, w: jax.Array, dtype) -> jax.Array:
  return _logits_16bit_fwd(x, w, dtype)[0]


def _logits_16bit_fwd(x, w, dtype):
  xr, wr = _round(x, dtype), _round(w, dtype)
  y = jnp.einsum("...D,DE->...E", xr, wr, precision=jax.lax.Precision.HIGHEST,
                 preferred_element_type=jnp.float32)
  # zero-size arrays carry x's and w's dtypes (residuals must be arrays)
  return _round(y, dtype), (xr, wr, jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype))


def _logits_16bit_bwd(dtype, res, g):
  xr, wr, x_like, w_like = res
  g = _round(g, dtype)                                # the gradients' sum, rounded
  dx = jnp.einsum("...E,DE->...D", g, wr, precision=jax.lax.Precision.HIGHEST,
                  preferred_element_type=jnp.float32)
  lead = "".join(chr(ord("a") + i) for i in range(xr.ndim - 1))
  dw = jnp.einsum(f"{lead}D,{lead}E->DE", xr, g, precision=jax.lax.Precision.HIGHEST,
                  preferred_element_type=jnp.float32)
  return _round(dx, dtype).astype(x_like.dtype), _round(dw, dtype).astype(w_like.dtype)


_logits_16bit.defvjp(_logits_16bit_fwd, _logits_16bit_bwd)


@jax.custom_vjp
def _sigmoid_16bit(x: jax.Array) -> jax.Array:
  return _sigmoid_16bit_fwd(x)[0]


def _sigmoid_16bit_fwd(x):
  y = _round(1.0 / (1.0 + jnp.exp(-x.astype(jnp.float32))), x.dtype)
  return y, y


def _sigmoid_16bit_bwd(y, g):
  y32 = y.astype(jnp.float32)
  return (_round(g.astype(jnp.float32) * (1.0 - y32) * y32, y.dtype),)


_sigmoid_16bit.defvjp(_sigmoid_16bit_fwd, _sigmoid_16bit_bwd)


@jax.custom_vjp
def _upcast_16bit(x: jax.Array) -> jax.Array:
  return x.astype(jnp.float32)


def _upcast_16bit_fwd(x):
  return x.astype(jnp.float32), jnp.zeros((0,), x.dtype)


def _upcast_16bit_bwd(like, g):
  return (_round(g, like.dtype),)


_upcast_16bit.defvjp(_upcast_16bit_fwd, _upcast_16bit_bwd)


def upcast(x: jax.Array) -> jax.Array:
  """x as float32; the gradient of a 16-bit x is rounded to its dtype (explicitly, as
  PyTorch's casts do; XLA would otherwise keep it in float32)."""
  if jnp.dtype(x.dtype).itemsize >= 4:
    return x.astype(jnp.float32)
  return _upcast_16bit(x)


def gate_sigmoid(logits: jax.Array) -> jax.Array:
  """sigmoid of router logits in their dtype. 16-bit logits are taken as PyTorch takes
  its bf16 sigmoid (the original's σ-MoE router under autocast): 1 / (1 + exp(-x)) in
  float32, rounded once; the gradient g (1 - y) y in float32 from the rounded y, rounded
  once. (XLA's own 16-bit logistic rounds differently near 0.5, where the ties are.)"""
  if jnp.dtype(logits.dtype).itemsize >= 4:
    return _sigmoid_keep_input(logits)
  return _sigmoid_16bit(logits)


@jax.custom_vjp
def _sigmoid_keep_input(x: jax.Array) -> jax.Array:
  """jax.nn.sigmoid whose backward keeps its input instead of its output: the router
  logits are kept anyway (the regulariser's backward recomputes from them), so the gates
  [..., E] cost no memory of their own between the passes."""
  return jax.nn.sigmoid(x)


def _sigmoid_keep_input_fwd(x):
  return jax.nn.sigmoid(x), x


def _sigmoid_keep_input_bwd(x, g):
  x, g = jax.lax.optimization_barrier((x, g))     # tied to g: not merged with the forward
  y = jax.nn.sigmoid(x)
  return (g * y * (1 - y),)


_sigmoid_keep_input.defvjp(_sigmoid_keep_input_fwd, _sigmoid_keep_input_bwd)


def sigmoid_topk(logits: jax.Array, k: int, drop_mask: jax.Array | None = None):
  """Top-k of sigmoid(logits) over the last axis.

  Args:
    logits: [..., E] router logits (float32, or 16-bit for the original's σ-MoE router,
      whose sigmoid and top-k then run in that dtype, with its ties).
    k: experts to select.
    drop_mask: optional [..., E] bool, True = expert excluded from the choice (expert
      dropout). The weights are the sigmoid of the chosen experts either way.

  Returns:
    (gates [..., k] in the logits' dtype, index [..., k] int32).
  """
  gate = gate_sigmoid(logits)
  index = _topk_choice(gate, k, drop_mask)
  return jnp.take_along_axis(gate, index, axis=-1), index


def _topk_choice(gate: jax.Array, k: int, drop_mask: jax.Array | None) -> jax.Array:
  """Indices [..., k] of the k largest gates [..., E] not excluded by drop_mask."""
  choice = gate if drop_mask is None else jnp.where(drop_mask, -jnp.inf, gate)
  # 16-bit gates are compared as float32 (exact; same order and ties)
  return topk_indices(jax.lax.stop_gradient(choice).astype(jnp.float32), k)


def sigmoid_topk_balanced(logits: jax.Array, k: int, drop_mask: jax.Array | None = None,
                          time_axis: int = 1):
  """:func:`sigmoid_topk` and the entropy regulariser's term of the same logits.

  Returns (gates [..., k], index [..., k], term [B, ..., E] float32), term =
  logsumexp over ``time_axis`` of log_softmax(logits) over the last axis: what
  :func:`entropy_accumulate_term` adds to the regulariser's accumulator. The values and
  gradients are those of ``sigmoid_topk(logits, k, drop_mask)`` and
  ``entropy_accumulate(acc, logits, time_axis)``.

  Why one function: the regulariser's cotangent exists from the start of the backward
  pass (the loss reads the accumulators after the last layer), so XLA could compute every
  layer's [B, T, ..., E] float32 gradient of it there and keep them all until each
  layer's router takes them. Float32 logits go through one backward that also takes the
  gates' cotangent, which only the layer's own backward makes, and it computes both
  gradients then, into one [B, T, ..., E] array. (16-bit logits, the original's routers,
  take the two functions one after the other.)
  """
  if jnp.dtype(logits.dtype).itemsize < 4:
    gates, index = sigmoid_topk(logits, k, drop_mask)
    return gates, index, _entropy_term(logits, time_axis)
  index = _topk_choice(jax.nn.sigmoid(logits), k, drop_mask)
  gates, term = _gates_and_term(logits, index, time_axis)
  return gates, index, term


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _gates_and_term(s: jax.Array, index: jax.Array, time_axis: int):
  """(sigmoid(s) at index, logsumexp over time of log_softmax(s)); float32 s."""
  return _gates_and_term_fwd(s, index, time_axis)[0]


def _gates_and_term_fwd(s, index, time_axis):
  gates = jax.nn.sigmoid(jnp.take_along_axis(s, index, axis=-1))
  term = jax.nn.logsumexp(jax.nn.log_softmax(s, axis=-1), axis=time_axis)
  return (gates, term), (s, index, term)


def _gates_and_term_bwd(time_axis, res, g):
  # tied to the gates' cotangent: computed in the layer's backward, not where the
  # regulariser's cotangent appears
  s, index, term, g_gates, g_term = jax.lax.optimization_barrier((*res, *g))
  ds = _time_lse_grad(s, term, g_term, time_axis)                     # [B, T, ..., E]
  y = jax.nn.sigmoid(jnp.take_along_axis(s, index, axis=-1))
  picked = jnp.take_along_axis(ds, index, axis=-1) + g_gates * y * (1 - y)
  # the k indices of a row are distinct: setting the picked entries adds the gates' part
  ds = jnp.put_along_axis(ds, index, picked, axis=-1, inplace=False)
  return ds, None


_gates_and_term.defvjp(_gates_and_term_fwd, _gates_and_term_bwd)


def entropy_accumulate_term(acc: jax.Array, term: jax.Array) -> jax.Array:
  """Adds a term of :func:`sigmoid_topk_balanced` to acc [B, ..., E]."""
  return jnp.logaddexp(acc, term)


def entropy_init(shape) -> jax.Array:
  """An empty log-sum-exp accumulator."""
  return jnp.full(shape, -jnp.inf, jnp.float32)


def entropy_accumulate(acc: jax.Array, logits: jax.Array, time_axis: int = 1) -> jax.Array:
  """Adds logits [B, T, ..., E] to acc [B, ..., E]: log-mean-exp numerator over time."""
  return entropy_accumulate_term(acc, _entropy_term(logits, time_axis))


def _entropy_term(logits: jax.Array, time_axis: int) -> jax.Array:
  """What logits [B, T, ..., E] add to the accumulator, [B, ..., E] float32."""
  return _time_logsumexp_of_log_softmax(upcast(logits), time_axis)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _time_logsumexp_of_log_softmax(s: jax.Array, time_axis: int) -> jax.Array:
  """logsumexp over ``time_axis`` of log_softmax(s) over the last axis (float32 s).

  Its backward keeps s and the [B, ..., E] result and recomputes log_softmax, where
  automatic differentiation would keep log_softmax(s) and exp of it: two more
  [B, T, ..., E] float32 arrays per router between the passes."""
  return jax.nn.logsumexp(jax.nn.log_softmax(s, axis=-1), axis=time_axis)


def _time_lse_fwd(s, time_axis):
  out = _time_logsumexp_of_log_softmax(s, time_axis)
  return out, (s, out)


def _time_lse_grad(s, out, g, time_axis):
  """s's gradient of out = logsumexp over time of log_softmax(s), for out's cotangent g."""
  logp = jax.nn.log_softmax(s, axis=-1)
  # d out / d logp: softmax of logp over time; d logp / d s: (1 - softmax over E)
  dlogp = jnp.expand_dims(g, time_axis) * jnp.exp(logp - jnp.expand_dims(out, time_axis))
  return dlogp - jnp.exp(logp) * jnp.sum(dlogp, axis=-1, keepdims=True)


def _time_lse_bwd(time_axis, res, g):
  s, out, g = jax.lax.optimization_barrier((*res, g))    # recomputed in the backward
  return (_time_lse_grad(s, out, g, time_axis),)


_time_logsumexp_of_log_softmax.defvjp(_time_lse_fwd, _time_lse_bwd)


def entropy_loss(acc: jax.Array, n_steps: int) -> jax.Array:
  """-mean entropy of the mean expert distribution; acc [B, ..., E] over n_steps = T*R."""
  m = acc - math.log(n_steps)
  ent = -jnp.sum(jnp.exp(m) * m, axis=-1)                            # [B, ...]
  return -jnp.mean(ent)
