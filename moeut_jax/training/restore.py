"""Shapes and shardings of a run's state, and loading a trained model back from a workdir."""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Optional

import jax

from moeut_jax.training import optim, sharding as sharding_lib, step as step_lib
from moeut_jax.training import tokenizer as tokenizer_lib
from moeut_jax.training.checkpoint import Checkpointer
from moeut_jax.training.config import Config
from moeut_jax.training.errors import CheckpointError, TokenizerError

CONFIG_JSON = "config.json"


def abstract_state(model, tx, config: Config, mesh) -> tuple[Any, Any]:
  """(tree of ShapeDtypeStruct with shardings, tree of NamedSharding) of the training state."""
  shapes = jax.eval_shape(functools.partial(step_lib.init_state, model, tx, config))
  shardings = sharding_lib.fsdp_shardings(shapes, mesh)
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          shapes, shardings)
  return abstract, shardings


def tokenizer_path(config: Config, workdir: str) -> Optional[str]:
  if config.tokenizer:
    return config.tokenizer
  path = os.path.join(workdir, "data", "tokenizer.model")
  return path if os.path.exists(path) else None


def load_config(workdir: str) -> Config:
  path = os.path.join(workdir, CONFIG_JSON)
  if not os.path.exists(path):
    raise CheckpointError(f"{workdir!r} is not a training workdir (no {CONFIG_JSON})")
  with open(path) as f:
    return Config.from_dict(json.load(f))


@dataclasses.dataclass
class TrainedModel:
  config: Config
  model: Any
  params: Any
  tokenizer: Optional[tokenizer_lib.Tokenizer]
  step: int
  mesh: Any


def load_trained(workdir: str, step: Optional[int] = None) -> TrainedModel:
  """The model, parameters and tokenizer of checkpoint ``step`` (default: the latest)."""
  ckpt = Checkpointer(workdir, read_only=True)
  steps = ckpt.steps()
  if not steps:
    raise CheckpointError(f"no checkpoints in {ckpt.shown}")
  step = steps[-1] if step is None else step
  if step not in steps:
    raise CheckpointError(f"no checkpoint for step {step} in {ckpt.shown}; there are "
                          f"{', '.join(map(str, steps))}")
  meta, _ = ckpt.restore_meta(step)
  config = Config.from_dict(meta["config"])
  tok_path = tokenizer_path(config, workdir)
  tok = tokenizer_lib.Tokenizer(tok_path) if tok_path else None
  if tok is not None and tok.vocab_size != meta["n_tokens"]:
    raise TokenizerError(f"tokenizer {tok_path!r} has {tok.vocab_size} pieces but the model in "
                         f"{ckpt.path(step)} has n_tokens={meta['n_tokens']}")
  model = step_lib.build_model(config, meta["n_tokens"])
  mesh = sharding_lib.make_mesh()
  abstract, _ = abstract_state(model, optim.make_optimizer(config), config, mesh)
  state = ckpt.restore_state(step, abstract)
  ckpt.close()
  return TrainedModel(config, model, state["params"], tok, step, mesh)
