"""The lm-evaluation-harness model ``moeut-jax``: a checkpoint of a train.py workdir.

Importing this module registers the model with the harness (it needs the ``eval`` extra:
``pip install -e ".[eval]"``); ``moeut_jax`` itself never imports it. Then::

    lm_eval.simple_evaluate(model="moeut-jax", model_args="workdir=runs/244m", tasks=[...])

or ``python train.py eval --workdir runs/244m --tasks lambada_openai,piqa``.

Model arguments: ``workdir`` (required), ``step`` (default: the latest checkpoint),
``batch_size`` (default: the run's micro-batch), ``max_length`` (default: the run's
``seq_len``, the context it was trained with), ``max_gen_toks`` (default for generation
tasks that set none: 256, at most half of ``max_length``), ``seed`` (sampling, 0).

Scoring follows the harness's Hugging Face model: an empty context becomes the
end-of-document token (the run's documents are separated by it), inputs longer than
``max_length`` keep their last tokens, and ``loglikelihood_rolling`` cuts a text into the
harness's disjoint windows (``get_rolling_token_windows`` with one token of context), the
first predicted from the end-of-document token, the last given a full context.
"""
from __future__ import annotations

import json
from typing import Optional

import jax
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from moeut_jax.evaluation.generation import generate_batches
from moeut_jax.evaluation.scoring import Scorer
from moeut_jax.training import restore
from moeut_jax.training.errors import TokenizerError, TrainingError

MODEL_NAME = "moeut-jax"
DEFAULT_MAX_GEN_TOKS = 256
# Generation settings understood by generate_until (the harness's names).
GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_k")


def _positive_int(name: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{name}={value!r} must be a positive integer")
  return value


@register_model(MODEL_NAME)
class MoEUTHarnessLM(TemplateLM):
  """A moeut-jax checkpoint behind the harness's ``LM`` interface."""

  def __init__(self, workdir: str, step: Optional[int] = None, batch_size: Optional[int] = None,
               max_length: Optional[int] = None, max_gen_toks: Optional[int] = None,
               seed: int = 0):
    super().__init__()
    if jax.process_count() > 1:
      raise TrainingError("the harness runs in one process; start it without "
                          "jax.distributed (all local devices are used)")
    run = restore.load_trained(workdir, step)
    if run.tokenizer is None:
      raise TokenizerError(f"the run in {workdir!r} has no tokenizer (it was trained on token "
                           "files without --tokenizer); the harness needs one to read text")
    if run.tokenizer.eos_id is None:
      raise TokenizerError(f"tokenizer {run.tokenizer.path!r} has no end-of-document token, "
                           "which the harness puts before empty contexts")
    self.run, self.model, self.params = run, run.model, run.params
    self.tokenizer = run.tokenizer
    self._max_length = _positive_int(
        "max_length", run.config.seq_len if max_length is None else max_length)
    self._batch_size = _positive_int(
        "batch_size", run.config.micro_batch_size if batch_size is None else batch_size)
    self.max_gen_toks = _positive_int(
        "max_gen_toks", min(DEFAULT_MAX_GEN_TOKS, max(self._max_length // 2, 1))
        if max_gen_toks is None else max_gen_toks)
    self.seed = seed
    self.scorer = Scorer(self.model, self.params, self._max_length, self._batch_size,
                         run.mesh)

  @classmethod
  def create_from_arg_string(cls, arg_string: str, additional_config: Optional[dict] = None):
    """``workdir=...,step=...``; of the harness's own settings only ``batch_size`` applies."""
    args = lm_utils.simple_parse_args_string(arg_string)
    return cls.create_from_arg_obj(args, additional_config)

  @classmethod
  def create_from_arg_obj(cls, arg_dict: dict, additional_config: Optional[dict] = None):
    extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
    unknown = sorted(set(extra) - {"batch_size"})
    if unknown:
      raise ValueError(f"{MODEL_NAME} does not take {unknown} (JAX picks the devices; "
                       "batch_size must be a number)")
    return cls(**arg_dict, **extra)

  # --- What the harness asks of a model ---------------------------------------------------
  @property
  def eot_token_id(self) -> int:
    return self.tokenizer.eos_id

  @property
  def max_length(self) -> int:
    return self._max_length

  @property
  def batch_size(self) -> int:
    return self._batch_size

  @property
  def tokenizer_name(self) -> str:
    return self.tokenizer.path

  def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None,
                 **kwargs) -> list[int]:
    del add_special_tokens, kwargs  # SentencePiece here adds no special tokens.
    return self.tokenizer.encode([string])[0]

  def tok_decode(self, tokens) -> str:
    return self.tokenizer.decode(tokens)

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs
                            ) -> list[tuple[float, bool]]:
    """requests: ((context, continuation) strings, context ids, continuation ids)."""
    del kwargs
    with tqdm(total=len(requests), disable=disable_tqdm, desc="Scoring") as bar:
      out = self.scorer.score([(ctx, cont) for _, ctx, cont in requests], bar.update)
    for (key, _, _), result in zip(requests, out):
      if key is not None:
        self.cache_hook.add_partial("loglikelihood", key, result)
    return out

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    windows, owner = [], []
    for i, (text,) in enumerate(req.args for req in requests):
      for pair in lm_utils.get_rolling_token_windows(
          token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
          max_seq_len=self.max_length, context_len=1):
        windows.append(lm_utils.make_disjoint_window(pair))
        owner.append(i)
    with tqdm(total=len(windows), disable=disable_tqdm, desc="Scoring windows") as bar:
      scores = self.scorer.score(windows, bar.update)
    totals = [0.0] * len(requests)
    for i, (logp, _) in zip(owner, scores):
      totals[i] += logp
    for req, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
    return totals

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Continuations up to the first stop string (or end-of-document token), one batch
    per distinct set of generation settings."""
    groups: dict[str, list[int]] = {}
    for i, req in enumerate(requests):
      groups.setdefault(json.dumps(req.args[1], sort_keys=True), []).append(i)
    out: list[Optional[str]] = [None] * len(requests)
    bar = tqdm(total=len(requests), disable=disable_tqdm, desc="Generating")
    for key, idx in groups.items():
      until, max_new, temperature, top_k = self._generation_settings(json.loads(key))
      prompts = [self.tok_encode(requests[i].args[0]) or [self.prefix_token_id] for i in idx]
      news = generate_batches(self.model, self.params, prompts, max_new,
                              max_length=self.max_length, batch_size=self.batch_size,
                              temperature=temperature, top_k=top_k, seed=self.seed,
                              mesh=self.run.mesh)
      for i, new in zip(idx, news):
        if self.eot_token_id in new:
          new = new[:new.index(self.eot_token_id)]
        text = self.tok_decode(new)
        for stop in until:
          if stop and stop in text:
            text = text[:text.index(stop)]
        out[i] = text
        self.cache_hook.add_partial("generate_until", requests[i].args, text)
        bar.update(1)
    bar.close()
    return out

  def _generation_settings(self, kwargs: dict) -> tuple[list[str], int, float, Optional[int]]:
    unknown = sorted(set(kwargs) - set(GEN_KWARGS))
    if unknown:
      raise ValueError(f"{MODEL_NAME} does not support the generation settings {unknown} "
                       f"(it knows {', '.join(GEN_KWARGS)})")
    until = kwargs.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    max_new = _positive_int("max_gen_toks", kwargs.get("max_gen_toks", self.max_gen_toks))
    temperature = float(kwargs.get("temperature", 1.0)) if kwargs.get("do_sample") else 0.0
    top_k = kwargs.get("top_k")
    if top_k is not None:
      top_k = _positive_int("top_k", top_k)
    return until, max_new, temperature, top_k
