"""Training MoEUT language models: ``train_and_evaluate(config, workdir)`` and friends.

Files: config (every setting), data (text/JSONL/token files -> Grain batches), tokenizer
(SentencePiece), optim (AdamW + schedule), sharding (mesh, FSDP), step (state and jitted
steps), checkpoint (orbax), metrics (progress, JSON Lines, TensorBoard, PNG), evaluate,
sample, restore, loop.
"""
from moeut_jax.training.config import Config, PROFILE_RECIPES
from moeut_jax.training.errors import (CheckpointError, DataError, NonFiniteLossError,
                                       TokenizerError, TrainingError)
from moeut_jax.training.evaluate import evaluate_checkpoint
from moeut_jax.training.loop import train_and_evaluate
from moeut_jax.training.sample import sample_from_checkpoint

__all__ = ["CheckpointError", "Config", "DataError", "NonFiniteLossError", "PROFILE_RECIPES",
           "TokenizerError", "TrainingError", "evaluate_checkpoint", "sample_from_checkpoint",
           "train_and_evaluate"]
