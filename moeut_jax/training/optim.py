"""The paper's optimizer: global-norm clipping, then AdamW with warm-up and cosine decay."""
from __future__ import annotations

import jax.numpy as jnp
import optax

from moeut_jax.training.config import Config


def learning_rate(config: Config):
  """step -> lr: linear warm-up to ``lr`` (reached at the end of warm-up), cosine to
  ``min_lr_ratio * lr`` at ``steps``. ``step`` counts completed updates (0 first)."""
  peak, floor = config.lr, config.lr * config.min_lr_ratio
  warmup, total = config.warmup_steps, config.steps

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = peak * jnp.minimum((step + 1.0) / max(warmup, 1), 1.0)
    progress = jnp.clip((step - warmup) / max(total - warmup, 1), 0.0, 1.0)
    cosine = floor + 0.5 * (peak - floor) * (1.0 + jnp.cos(jnp.pi * progress))
    return jnp.where(step < warmup, warm, cosine)

  return schedule


def make_optimizer(config: Config) -> optax.GradientTransformation:
  parts = []
  if config.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(config.grad_clip))
  parts.append(optax.adamw(learning_rate(config), b1=config.b1, b2=config.b2, eps=config.eps,
                           weight_decay=config.weight_decay))
  return optax.chain(*parts)
