"""Log-likelihoods of token sequences in jitted, batched, padded forward passes.

A request is a pair of token lists (context, continuation). Its score is the summed log
probability of the continuation after the context, and whether greedy decoding would have
produced every continuation token. The model sees one row per request: the last T tokens
of context + continuation[:-1] (T = ``max_length``, cut from the left as the harness's
Hugging Face model does), right-padded to a bucket length L in 16, 32, 64, ..., T. The
model is causal and routes every token on its own, so padding after a row's tokens changes
none of its positions; the padding's positions carry weight 0. Rows are sorted by length
and cut into batches of B rows (the last batch filled with empty rows), so at most
``len(buckets)`` shapes [B, L] are ever compiled, whatever the requests.

Shapes: B rows per batch, L bucket length, V vocabulary.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

SMALLEST_BUCKET = 16


def bucket_lengths(max_length: int, smallest: int = SMALLEST_BUCKET) -> tuple[int, ...]:
  """Row lengths that get compiled: powers of two from ``smallest`` below ``max_length``,
  then ``max_length`` itself."""
  if max_length < 1:
    raise ValueError(f"{max_length=} must be positive")
  out, n = [], smallest
  while n < max_length:
    out.append(n)
    n *= 2
  return tuple(out) + (max_length,)


def bucket_for(length: int, buckets: Sequence[int]) -> int:
  for b in buckets:
    if length <= b:
      return b
  raise ValueError(f"a row of {length} tokens is longer than the largest bucket {buckets[-1]}")


def put_rows(mesh, x: np.ndarray) -> jax.Array:
  """A host batch [B, ...] on the devices: rows split over the mesh's first axis."""
  if mesh is None:
    return jnp.asarray(x)
  return jax.device_put(x, NamedSharding(mesh, P(mesh.axis_names[0])))


@functools.partial(jax.jit, static_argnums=0)
def _row_scores(model, params, tokens, targets, weights):
  """tokens, targets [B, L] int32, weights [B, L] f32 -> (sum of weighted target log
  probabilities [B], every weighted target the argmax [B])."""
  logits = model.apply({"params": params}, tokens).outputs.astype(jnp.float32)   # [B, L, V]
  logp = jax.nn.log_softmax(logits, axis=-1)                                      # [B, L, V]
  target_logp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]    # [B, L]
  greedy = jnp.argmax(logits, axis=-1) == targets                                 # [B, L]
  return (jnp.sum(target_logp * weights, axis=-1),
          jnp.all(greedy | (weights == 0), axis=-1))


class Scorer:
  """Scores (context, continuation) token lists with ``model`` and ``params``.

  Args:
    model: a MoEUTLM.
    params: its parameters (as restored: possibly sharded over ``mesh``).
    max_length: T, the longest row the model sees (the context it was trained with).
    batch_size: B rows per forward pass; a multiple of the mesh's device count.
    mesh: the devices; rows are split over its first axis. None: the default device.
  """

  def __init__(self, model, params, max_length: int, batch_size: int, mesh=None):
    if batch_size < 1:
      raise ValueError(f"{batch_size=} must be positive")
    if mesh is not None and batch_size % mesh.devices.size:
      raise ValueError(f"{batch_size=} must be a multiple of the {mesh.devices.size} devices")
    self.model, self.params, self.mesh = model, params, mesh
    self.max_length, self.batch_size = max_length, batch_size
    self.buckets = bucket_lengths(max_length)

  def rows(self, context: Sequence[int], continuation: Sequence[int]
           ) -> tuple[np.ndarray, np.ndarray]:
    """(input tokens [n], targets [n]) of one request; the last len(continuation) targets
    are the continuation."""
    if not context:
      raise ValueError("a request needs at least one context token (the harness puts the "
                       "end-of-document token before an empty context)")
    if not continuation:
      raise ValueError("a request needs at least one continuation token")
    if len(continuation) > self.max_length:
      raise ValueError(f"a continuation of {len(continuation)} tokens does not fit the "
                       f"model's context of max_length={self.max_length} tokens")
    seq = np.asarray(list(context) + list(continuation), np.int64)[-(self.max_length + 1):]
    lo, hi = int(seq.min()), int(seq.max())
    if lo < 0 or hi >= self.model.n_tokens:
      raise ValueError(f"token ids must be in [0, {self.model.n_tokens}), got {lo}..{hi}")
    return seq[:-1].astype(np.int32), seq[1:].astype(np.int32)

  def batches(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]]
              ) -> Iterable[tuple[list[int], np.ndarray, np.ndarray, np.ndarray]]:
    """(request indices, tokens [B, L], targets [B, L], weights [B, L]) per forward pass,
    longest rows first."""
    rows = [self.rows(c, t) for c, t in requests]
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    for start in range(0, len(order), self.batch_size):
      idx = order[start:start + self.batch_size]
      length = bucket_for(len(rows[idx[0]][0]), self.buckets)
      tokens = np.zeros([self.batch_size, length], np.int32)                 # [B, L]
      targets = np.zeros([self.batch_size, length], np.int32)                # [B, L]
      weights = np.zeros([self.batch_size, length], np.float32)              # [B, L]
      for r, i in enumerate(idx):
        inp, tgt = rows[i]
        n, n_cont = len(inp), len(requests[i][1])
        tokens[r, :n], targets[r, :n] = inp, tgt
        weights[r, n - n_cont:n] = 1.0
      yield idx, tokens, targets, weights

  def score(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]],
            progress: Optional[Callable[[int], None]] = None) -> list[tuple[float, bool]]:
    """[(log p(continuation | context), greedy)] in the order of ``requests``.

    ``progress(n)`` is called after each batch with the number of requests it scored.
    """
    out: list[Optional[tuple[float, bool]]] = [None] * len(requests)
    with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
      for idx, tokens, targets, weights in self.batches(requests):
        logp, greedy = _row_scores(self.model, self.params, put_rows(self.mesh, tokens),
                                   put_rows(self.mesh, targets), put_rows(self.mesh, weights))
        logp, greedy = np.asarray(logp), np.asarray(greedy)
        for r, i in enumerate(idx):
          out[i] = (float(logp[r]), bool(greedy[r]))
        if progress is not None:
          progress(len(idx))
    return out

