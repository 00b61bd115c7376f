"""The language-modelling loss, with a backward pass that keeps little.

``optax.softmax_cross_entropy_with_integer_labels`` on float32 logits keeps exp of the
logits ([tokens, vocabulary] float32) between the forward and the backward pass: 2 GiB at
64 x 1024 tokens and a vocabulary of 8000. :func:`token_nll` computes the same values
and gradients from the logits as they are (bf16 under a 16-bit compute dtype: half of
that) and one float32 log-sum-exp per token.

:func:`head_nll` takes the output head into the loss: it makes the logits a block of
positions at a time, in the forward pass and again in the backward pass, so that neither
the logits nor their gradient ([tokens, vocabulary], 1 GiB each in bf16 at 64 x 1024
tokens and 8000 words) is ever whole in memory; it keeps the head's input and one
float32 log-sum-exp per token. ``MoEUTLM(...)(tokens, labels=...)`` uses it.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax


def token_nll(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Negative log-likelihood of ``labels`` under softmax(``logits``), per position.

  Args:
    logits: [..., V], any float dtype; the softmax is taken in float32.
    labels: [...] integers in [0, V).

  Returns:
    [...] float32. The gradient with respect to ``logits`` has their dtype (computed in
    float32 and rounded once).
  """
  if logits.shape[:-1] != labels.shape:
    raise ValueError(f"logits {logits.shape} need labels of shape {logits.shape[:-1]}, "
                     f"got {labels.shape}")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(f"labels must be integers, got {labels.dtype}")
  return _token_nll(logits, labels)


@jax.custom_vjp
def _token_nll(logits, labels):
  return _token_nll_fwd(logits, labels)[0]


def _token_nll_fwd(logits, labels):
  x = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(x, axis=-1)
  picked = jnp.take_along_axis(x, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return lse - picked, (logits, labels, lse)


def _token_nll_bwd(res, g):
  logits, labels, lse = res
  p = jnp.exp(logits.astype(jnp.float32) - lse[..., None])
  hot = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
  d = (g[..., None] * (p - hot)).astype(logits.dtype)
  return d, None


_token_nll.defvjp(_token_nll_fwd, _token_nll_bwd)


# Logits per block of :func:`head_nll`: [B, T / n_blocks, V] holds at most this many
# values (bf16 logits and their float32 softmax: 64 + 128 MiB).
HEAD_BLOCK_VALUES = 1 << 25


def head_nll(h: jax.Array, kernel: jax.Array, bias: jax.Array | None, labels: jax.Array,
             *, n_blocks: int | None = None) -> jax.Array:
  """``token_nll(h @ kernel + bias, labels)`` without the whole logits in memory.

  The logits are made in ``h``'s dtype as ``flax.linen.Dense(dtype=h.dtype)`` makes them
  (the product rounded to that dtype, then the bias added), for a block of positions at a
  time: in the forward pass for the log-sum-exps, in the backward pass again for the
  softmax. The gradients are those of :func:`token_nll` on those logits; ``kernel``'s
  and ``bias``'s are summed over the blocks in float32 and rounded once.

  Args:
    h: [..., T, D] floating; the leading axes are kept whole in every block (a batch
      axis sharded over devices stays so).
    kernel: [D, V], ``h``'s dtype. bias: [V], ``h``'s dtype, or None.
    labels: [..., T] integers in [0, V).
    n_blocks: blocks of positions (at most T; T is padded to a multiple); None: enough
      that a block's logits hold at most ``HEAD_BLOCK_VALUES`` values.

  Returns:
    [..., T] float32.
  """
  if h.ndim < 2 or kernel.ndim != 2 or kernel.shape[0] != h.shape[-1]:
    raise ValueError(f"h [..., T, D] {h.shape} and kernel [D, V] {kernel.shape} do not fit")
  if labels.shape != h.shape[:-1]:
    raise ValueError(f"h {h.shape} needs labels of shape {h.shape[:-1]}, got {labels.shape}")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(f"labels must be integers, got {labels.dtype}")
  if kernel.dtype != h.dtype or (bias is not None and bias.dtype != h.dtype):
    raise TypeError(f"kernel ({kernel.dtype}) and bias must have h's dtype ({h.dtype})")
  lead, (t, d), v = h.shape[:-2], h.shape[-2:], kernel.shape[1]
  if bias is None:
    bias = jnp.zeros([v], h.dtype)
  if bias.shape != (v,):
    raise ValueError(f"bias {bias.shape} must be [V] = [{v}]")
  b = math.prod(lead)
  if n_blocks is not None and int(n_blocks) < 1:
    raise ValueError(f"n_blocks={n_blocks} must be a positive integer or None")
  if n_blocks is None:
    n_blocks = max(1, math.ceil(b * t * v / HEAD_BLOCK_VALUES))
  n_blocks = max(1, min(int(n_blocks), t))
  width = -(-t // n_blocks)
  h3, l2 = h.reshape(b, t, d), labels.reshape(b, t).astype(jnp.int32)
  pad = width * n_blocks - t
  if pad:   # padded positions get no cotangent, so they add nothing to the gradients
    h3 = jnp.pad(h3, ((0, 0), (0, pad), (0, 0)))
    l2 = jnp.pad(l2, ((0, 0), (0, pad)))
  nll = _head_nll(h3, kernel, bias, l2, width)
  return nll[:, :t].reshape(labels.shape)


def _logits(h, kernel, bias):
  """[B, W, D] -> [B, W, V] in h's dtype, as flax's Dense: product, then the bias."""
  return lax.dot_general(h, kernel, (((2,), (0,)), ((), ()))) + bias


def _block(x, i, width):
  return lax.dynamic_slice_in_dim(x, i * width, width, axis=1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _head_nll(h, kernel, bias, labels, width):
  return _head_nll_fwd(h, kernel, bias, labels, width)[0]


def _head_nll_fwd(h, kernel, bias, labels, width):
  b, t = labels.shape

  def block(i, out):
    nll, lse = out
    logits = _logits(_block(h, i, width), kernel, bias)                    # [B, W, V]
    nll_b, (_, _, lse_b) = _token_nll_fwd(logits, _block(labels, i, width))
    return (lax.dynamic_update_slice_in_dim(nll, nll_b, i * width, axis=1),
            lax.dynamic_update_slice_in_dim(lse, lse_b, i * width, axis=1))

  zeros = jnp.zeros([b, t], jnp.float32)
  nll, lse = lax.fori_loop(0, t // width, block, (zeros, zeros))
  return nll, (h, kernel, bias, labels, lse)


def _head_nll_bwd(width, res, g):
  h, kernel, bias, labels, lse = res

  def block(i, out):
    dh, dk, db = out
    hb = _block(h, i, width)
    logits = _logits(hb, kernel, bias)                                     # [B, W, V]
    dx, _ = _token_nll_bwd((logits, _block(labels, i, width), _block(lse, i, width)),
                           _block(g, i, width))                            # h's dtype
    dhb = lax.dot_general(dx, kernel, (((2,), (1,)), ((), ())))            # [B, W, D]
    dk = dk + lax.dot_general(hb, dx, (((0, 1), (0, 1)), ((), ())),
                              preferred_element_type=jnp.float32)          # [D, V]
    db = db + jnp.sum(dx.astype(jnp.float32), axis=(0, 1))
    return lax.dynamic_update_slice_in_dim(dh, dhb, i * width, axis=1), dk, db

  init = (jnp.zeros_like(h), jnp.zeros(kernel.shape, jnp.float32),
          jnp.zeros(bias.shape, jnp.float32))
  dh, dk, db = lax.fori_loop(0, h.shape[1] // width, block, init)
  return dh, dk.astype(kernel.dtype), db.astype(bias.dtype), None


_head_nll.defvjp(_head_nll_fwd, _head_nll_bwd)
