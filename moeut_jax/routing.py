"""Expert selection and the entropy regulariser as pure functions (SPEC §2, §3, §5).

Router logits are always float32. The regulariser is accumulated as a running
log-sum-exp over time and repeats, so the scan over repeats never stores the logits:
  acc = logaddexp(acc, logsumexp_T(log_softmax_E(s)))      [B, ..., E]
and at the end  m = acc - log(T * R),  ent = -sum_E exp(m) m,  loss = -mean(ent).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp


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
  _, index = jax.lax.top_k(jax.lax.stop_gradient(choice), k)
  return jnp.take_along_axis(gate, index, axis=-1), index.astype(jnp.int32)


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
