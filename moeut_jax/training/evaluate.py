"""Held-out loss and perplexity: during training, and of a checkpoint on given text."""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import jax

from moeut_jax.training import data as data_lib, restore, sharding as sharding_lib
from moeut_jax.training import step as step_lib
from moeut_jax.training.errors import DataError, TokenizerError


def evaluate(eval_step: Callable, params, stream: data_lib.TokenStream, seq_len: int, rows: int,
             max_batches: Optional[int], mesh) -> dict[str, float]:
  """Mean NLL per token over consecutive windows of ``stream`` (rows sequences a batch)."""
  sh = sharding_lib.eval_batch_sharding(mesh)
  total, count = 0.0, 0.0
  for tokens, weights in data_lib.eval_batches(stream, seq_len, rows, max_batches,
                                               jax.process_index(), jax.process_count()):
    nll, n = eval_step(params, sharding_lib.global_array(tokens, sh, rows, 0),
                       sharding_lib.global_array(weights, sh, rows, 0))
    total, count = total + float(nll), count + float(n)
  if count == 0:
    raise DataError(f"nothing to evaluate: the held-out text has {len(stream)} tokens")
  loss = total / count
  return dict(loss=loss, perplexity=math.exp(min(loss, 700.0)), tokens=int(count))


def evaluate_checkpoint(workdir: str, data: Sequence[str] = (), step: Optional[int] = None,
                        max_batches: Optional[int] = None,
                        allow_binary_text: bool = False) -> dict[str, float]:
  """Perplexity of a checkpoint on ``data`` (files/folders; default: the run's held-out split).
  Text files that look binary are refused unless ``allow_binary_text``."""
  run = restore.load_trained(workdir, step)
  cfg = run.config
  if not data:
    stream = data_lib.prepare(cfg, workdir, has_checkpoint=True).valid
  else:
    kind, files = data_lib.resolve_sources(data)
    if kind == "tokens":
      stream = data_lib.TokenStream([data_lib._load_token_file(f, cfg.token_dtype)  # pylint: disable=protected-access
                                     for f in files])
    else:
      if run.tokenizer is None:
        raise TokenizerError(f"the run in {workdir!r} has no tokenizer; give token files")
      docs = data_lib.read_documents(files, cfg.text_field, allow_binary_text)
      if not docs:
        raise DataError(f"the data {', '.join(data)} is empty")
      stream = data_lib.TokenStream([run.tokenizer.encode_documents(docs)])
    if len(stream) < 2:
      raise DataError(f"the data {', '.join(data)} has {len(stream)} tokens; need at least 2")
  if len(stream) and stream.max_token() >= run.model.n_tokens:
    raise TokenizerError(f"token id {stream.max_token()} is outside the model's vocabulary of "
                         f"{run.model.n_tokens}")
  rows = cfg.micro_batch_size
  sharding_lib.check_divisible(rows, run.mesh, "evaluation")
  eval_step = jax.jit(step_lib.make_eval_step(run.model))
  with jax.set_mesh(run.mesh):
    out = evaluate(eval_step, run.params, stream, cfg.seq_len, rows, max_batches, run.mesh)
  out["step"] = run.step
  return out
