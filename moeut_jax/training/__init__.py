"""Training MoEUT language models: ``train_and_evaluate(config, workdir)`` and friends.

Files: config (every setting), data (text/JSONL/token files -> Grain batches), tokenizer
(SentencePiece), optim (AdamW + schedule), sharding (mesh, FSDP), step (state and jitted
steps), checkpoint (orbax), metrics (progress, JSON Lines, TensorBoard, PNG), evaluate,
sample, restore, loop.
"""
from moeut_jax.training.config import Config, PROFILE_RECIPES
from moeut_jax.training.errors import (CheckpointError, DataError, NonFiniteLossError,
                                       TokenizerError, TrainingError)
import importlib

# The entry points below need Grain (the data pipeline): imported on first use, so that the
# model-side modules (memory, sharding, config) work without it, e.g. in bench/.
_LAZY = {"evaluate_checkpoint": "evaluate", "train_and_evaluate": "loop",
         "sample_from_checkpoint": "sample"}


def __getattr__(name):
  if name in _LAZY:
    return getattr(importlib.import_module(f"moeut_jax.training.{_LAZY[name]}"), name)
  raise AttributeError(f"module 'moeut_jax.training' has no attribute {name!r}")

__all__ = ["CheckpointError", "Config", "DataError", "NonFiniteLossError", "PROFILE_RECIPES",
           "TokenizerError", "TrainingError", "evaluate_checkpoint", "sample_from_checkpoint",
           "train_and_evaluate"]
