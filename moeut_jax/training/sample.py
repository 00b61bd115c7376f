"""Text from a model: the sample at the end of training and the ``sample`` command."""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from moeut_jax.training import restore
from moeut_jax.training.errors import TokenizerError


def sample(model, params, tokenizer, prompt: str, max_new_tokens: int, temperature: float,
           top_k: Optional[int], seed: int) -> str:
  """``prompt`` followed by ``max_new_tokens`` generated tokens, decoded."""
  from moeut_jax import generate  # pylint: disable=import-outside-toplevel
  if tokenizer is None:
    raise TokenizerError("sampling needs a tokenizer (the run was trained on token files; "
                         "give --tokenizer)")
  ids = tokenizer.encode([prompt])[0] if prompt else []
  if not ids:  # An empty prompt starts a new document.
    ids = [tokenizer.eos_id if tokenizer.eos_id is not None else 0]
  prompt_tokens = jnp.asarray([ids], jnp.int32)                             # [1, T0]
  out = generate(model, {"params": params}, prompt_tokens, max_new_tokens,
                 temperature=temperature, top_k=top_k or None, rng=jax.random.PRNGKey(seed))
  new = np.asarray(out)[0, len(ids):]                                       # [max_new_tokens]
  if tokenizer.eos_id is not None and tokenizer.eos_id in new:
    new = new[:list(new).index(tokenizer.eos_id)]
  return tokenizer.decode(list(ids) + new.tolist())


def sample_from_checkpoint(workdir: str, prompt: str, max_new_tokens: int, temperature: float,
                           top_k: Optional[int], seed: int, step: Optional[int] = None) -> str:
  run = restore.load_trained(workdir, step)
  return sample(run.model, run.params, run.tokenizer, prompt, max_new_tokens, temperature,
                top_k, seed)
