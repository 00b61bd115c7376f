"""Batched generation from prompts of different lengths, on a fixed-capacity KV cache.

``moeut_jax.generate`` continues prompts of one length. Here the prompts of a batch are
left-padded to a bucket length P, so that every row's last prompt token sits at P - 1 and
all rows decode in step. The padding is masked out as keys (``src_length_mask``) and a
causal ``position_mask`` stands in for the default causal mask that any explicit mask
replaces. A row's tokens then sit at positions shifted by its padding; rotary embeddings
depend only on the distance between a query and a key, so the shift changes nothing but
rounding. One jitted call prefills the cache and scans ``max_new_tokens`` decode steps;
the compiled shapes are [B, P] for the buckets P (and each distinct ``max_new_tokens``).

Shapes: B rows, P prompt bucket, N new tokens, S = P + N cache capacity.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from moeut_jax.evaluation.scoring import bucket_for, bucket_lengths, put_rows
from moeut_jax.generate import sample_logits
from moeut_jax.masks import AttentionMask, causal_mask


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6))
def _generate_padded(model, params, tokens, pad, max_new_tokens, temperature, top_k, rng):
  """tokens [B, P] left-padded, pad [B, P] True at padding -> new tokens [B, N]."""
  b, p = tokens.shape
  variables = {"params": params}
  cache = model.init_cache(b, p + max_new_tokens)
  key_pad = jnp.concatenate([pad, jnp.zeros((b, max_new_tokens), bool)], axis=1)  # [B, S]
  out = model.apply(variables, tokens, mask=AttentionMask(key_pad, causal_mask(p)),
                    kv_cache=cache)
  rng, step_rng = jax.random.split(rng)
  first = sample_logits(out.outputs[:, -1], step_rng, temperature, top_k)           # [B]
  one = AttentionMask(key_pad, jnp.zeros((1, 1), bool))  # later keys: blocked by the cache

  def step(carry, _):
    token, cache, rng = carry
    out = model.apply(variables, token[:, None], mask=one, kv_cache=cache)
    rng, step_rng = jax.random.split(rng)
    nxt = sample_logits(out.outputs[:, -1], step_rng, temperature, top_k)
    return (nxt, out.cache, rng), nxt

  _, rest = jax.lax.scan(step, (first, out.cache, rng), None, length=max_new_tokens - 1)
  return jnp.concatenate([first[:, None], rest.T], axis=1)                         # [B, N]


def generate_batches(model, params, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                     max_length: int, batch_size: int, temperature: float = 0.0,
                     top_k: Optional[int] = None, seed: int = 0, mesh=None
                     ) -> list[list[int]]:
  """The ``max_new_tokens`` tokens that follow each prompt, in the order of ``prompts``.

  Prompts keep their last ``max_length - max_new_tokens`` tokens (the harness's rule), so
  that prompt and continuation fit the context the model was trained with.
  """
  if not 1 <= max_new_tokens < max_length:
    raise ValueError(f"{max_new_tokens=} must be in [1, max_length={max_length})")
  if batch_size < 1 or (mesh is not None and batch_size % mesh.devices.size):
    raise ValueError(f"{batch_size=} must be a positive multiple of the device count")
  if any(len(p) == 0 for p in prompts):
    raise ValueError("every prompt needs at least one token")
  room = max_length - max_new_tokens
  prompts = [list(p)[-room:] for p in prompts]
  buckets = bucket_lengths(room)
  order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
  out: list[Optional[list[int]]] = [None] * len(prompts)
  rng = jax.random.PRNGKey(seed)
  with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
    for start in range(0, len(order), batch_size):
      idx = order[start:start + batch_size]
      p = bucket_for(len(prompts[idx[0]]), buckets)
      tokens = np.zeros([batch_size, p], np.int32)                          # [B, P]
      pad = np.ones([batch_size, p], bool)                                  # [B, P]
      for r, i in enumerate(idx):
        tokens[r, p - len(prompts[i]):] = prompts[i]
        pad[r, p - len(prompts[i]):] = False
      lo, hi = int(tokens.min()), int(tokens.max())
      if lo < 0 or hi >= model.n_tokens:
        raise ValueError(f"token ids must be in [0, {model.n_tokens}), got {lo}..{hi}")
      rng, call_rng = jax.random.split(rng)
      new = _generate_padded(model, params, put_rows(mesh, tokens), put_rows(mesh, pad),
                             max_new_tokens, float(temperature), top_k, call_rng)   # [B, N]
      new = np.asarray(new)
      for r, i in enumerate(idx):
        out[i] = new[r].tolist()
  return out
