"""Jitted autoregressive generation on a fixed-capacity KV cache."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def sample_logits(logits: jax.Array, rng, temperature: float, top_k: int | None) -> jax.Array:
  """logits [B, V] -> token ids [B]: greedy when temperature is 0, else softmax sampling
  at ``temperature`` among the ``top_k`` most likely tokens (all when None)."""
  logits = logits.astype(jnp.float32)
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_k is not None:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]                    # [B, 1]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 5))
def _generate(model, variables, prompt, max_new_tokens, temperature, top_k, rng):
  b, t0 = prompt.shape
  cache = model.init_cache(b, t0 + max_new_tokens)
  out = model.apply(variables, prompt, kv_cache=cache)
  rng, step_rng = jax.random.split(rng)
  first = sample_logits(out.outputs[:, -1], step_rng, temperature, top_k)     # [B]

  def step(carry, _):
    token, cache, rng = carry
    out = model.apply(variables, token[:, None], kv_cache=cache)
    rng, step_rng = jax.random.split(rng)
    nxt = sample_logits(out.outputs[:, -1], step_rng, temperature, top_k)
    return (nxt, out.cache, rng), nxt

  _, rest = jax.lax.scan(step, (first, out.cache, rng), None, length=max_new_tokens - 1)
  new = jnp.concatenate([first[:, None], rest.T], axis=1)            # [B, max_new_tokens]
  return jnp.concatenate([prompt, new], axis=1)


def generate(model, variables, prompt: jax.Array, max_new_tokens: int, *,
             temperature: float = 0.0, top_k: int | None = None, rng=None) -> jax.Array:
  """Continues ``prompt`` [B, T0] (equal-length rows) by ``max_new_tokens`` tokens.

  Args:
    model: a MoEUTLM.
    variables: ``{"params": ...}``.
    temperature: 0 for greedy decoding; otherwise sampling needs ``rng``.
    top_k: sample only among the k most likely tokens.

  Returns:
    [B, T0 + max_new_tokens] int32: the prompt followed by the new tokens.
  """
  prompt = jnp.asarray(prompt)
  if prompt.ndim != 2 or prompt.shape[1] < 1 or not jnp.issubdtype(prompt.dtype, jnp.integer):
    raise ValueError(f"prompt must be integer [B, T0] with T0 >= 1, got {prompt.dtype} "
                     f"{prompt.shape}")
  if max_new_tokens < 0:
    raise ValueError(f"{max_new_tokens=} must be >= 0")
  if temperature < 0:
    raise ValueError(f"{temperature=} must be >= 0")
  if top_k is not None and not 1 <= top_k <= model.n_tokens:
    raise ValueError(f"{top_k=} must be in [1, n_tokens={model.n_tokens}]")
  if temperature > 0 and rng is None:
    raise ValueError("sampling (temperature > 0) needs rng=jax.random.PRNGKey(...)")
  lo, hi = int(np.min(np.asarray(prompt))), int(np.max(np.asarray(prompt)))
  if lo < 0 or hi >= model.n_tokens:
    raise ValueError(f"prompt token ids must be in [0, {model.n_tokens}), got {lo}..{hi}")
  prompt = prompt.astype(jnp.int32)
  if max_new_tokens == 0:
    return prompt
  rng = jax.random.PRNGKey(0) if rng is None else rng
  return _generate(model, variables, prompt, max_new_tokens, float(temperature), top_k, rng)
