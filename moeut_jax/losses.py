"""The language-modelling loss, with a backward pass that keeps little.

``optax.softmax_cross_entropy_with_integer_labels`` on float32 logits keeps exp of the
logits ([tokens, vocabulary] float32) between the forward and the backward pass: 2 GiB at
64 x 1024 tokens and a vocabulary of 8000. :func:`token_nll` computes the same values
and gradients from the logits as they are (bf16 under a 16-bit compute dtype: half of
that) and one float32 log-sum-exp per token.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


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
