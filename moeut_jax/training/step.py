"""The model, the training state, and the jitted train and eval steps (pure functions).

State (a dict, so that orbax saves it as is): ``params``, ``opt_state``, ``step`` (int32, number
of completed updates) and ``rng`` (uint32[2], the run's dropout key; step s uses
fold_in(rng, s), so a resumed run draws the same numbers as one that never stopped).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from moeut_jax.training.config import Config

State = dict[str, Any]


def compute_dtype(config: Config) -> jnp.dtype:
  if config.compute_dtype == "auto":
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
  return jnp.dtype(config.compute_dtype)


def build_model(config: Config, n_tokens: int):
  from moeut_jax import MoEUTLM  # pylint: disable=import-outside-toplevel
  return MoEUTLM(n_tokens=n_tokens, **config.model_kwargs(), dtype=compute_dtype(config),
                 param_dtype=jnp.dtype(config.param_dtype))


def init_state(model, tx: optax.GradientTransformation, config: Config) -> State:
  """Fresh state from ``config.seed`` (jit it with out_shardings to create it sharded)."""
  params_key, rng = jax.random.split(jax.random.PRNGKey(config.seed))
  tokens = jnp.zeros([1, config.seq_len], jnp.int32)                       # [1, T]
  params = model.init({"params": params_key}, tokens)["params"]
  return dict(params=params, opt_state=tx.init(params), step=jnp.zeros([], jnp.int32),
              rng=rng)


def _losses(model, params, tokens, weights, rng, train: bool):
  """tokens [M, T + 1], weights [M, T] -> (cross-entropy sum, weight sum, reg_loss)."""
  rngs = {"dropout": rng} if train else None
  out = model.apply({"params": params}, tokens[:, :-1], train=train, rngs=rngs,
                    labels=tokens[:, 1:])
  nll = out.outputs                                                         # [M, T]
  return jnp.sum(nll * weights), jnp.sum(weights), out.reg_loss


def make_train_step(model, tx: optax.GradientTransformation,
                    schedule: Callable) -> Callable[[State, jax.Array], tuple[State, dict]]:
  """(state, batch [A, M, T + 1]) -> (state, metrics); gradients averaged over the A
  micro-batches, then one optimizer update."""

  def micro_loss(params, tokens, rng):
    weights = jnp.ones(tokens[:, 1:].shape, jnp.float32)
    nll, count, reg = _losses(model, params, tokens, weights, rng, train=True)
    ce = nll / count
    return ce + reg, (ce, reg)

  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

  def train_step(state: State, batch: jax.Array) -> tuple[State, dict]:
    params = state["params"]
    n_micro = batch.shape[0]
    keys = jax.random.split(jax.random.fold_in(state["rng"], state["step"]), n_micro)

    def accumulate(acc, xs):
      tokens, key = xs                                                      # [M, T + 1]
      (_, (ce, reg)), grads = grad_fn(params, tokens, key)
      acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc, grads)
      return acc, (ce, reg)

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    grads, (ce, reg) = jax.lax.scan(accumulate, zeros, (batch, keys))      # ce, reg: [A]
    grads = jax.tree.map(lambda g, p: (g / n_micro).astype(p.dtype), grads, params)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    params = optax.apply_updates(params, updates)
    metrics = dict(loss=jnp.mean(ce), reg_loss=jnp.mean(reg), grad_norm=optax.tree.norm(grads),
                   param_norm=optax.tree.norm(params), lr=schedule(state["step"]))
    new_state = dict(params=params, opt_state=opt_state, step=state["step"] + 1,
                     rng=state["rng"])
    return new_state, metrics

  return train_step


def make_eval_step(model) -> Callable:
  """(params, tokens [M, T + 1], weights [M, T]) -> (sum of NLL, number of tokens)."""

  def eval_step(params, tokens, weights):
    nll, count, _ = _losses(model, params, tokens, weights, None, train=False)
    return nll, count

  return eval_step
