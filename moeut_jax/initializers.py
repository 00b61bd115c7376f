"""Initialisation of docs/semantics.md §6 (the distributions of the original; values need
not match)."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def normal(std: float):
  def init(key, shape, dtype=jnp.float32):
    return (jax.random.normal(key, shape, jnp.float32) * std).astype(dtype)
  return init


def uniform(bound: float):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)
  return init


def normalized_router(std: float, axis: int, per_row_std: bool):
  """N(0, std), each expert's vector (along ``axis``, the model-width axis) scaled to unit
  L2 norm, then rescaled: by the whole matrix's former std (σ-MoE, ``per_row_std=False``)
  or by each row's former std over the std of the normalised matrix (SwitchHead)."""
  def init(key, shape, dtype=jnp.float32):
    w = jax.random.normal(key, shape, jnp.float32) * std
    wn = w / jnp.linalg.norm(w, axis=axis, keepdims=True)
    if per_row_std:
      wn = wn * (jnp.std(w, axis=axis, keepdims=True) / jnp.std(wn))
    else:
      wn = wn * (jnp.std(w) / jnp.std(wn))
    return wn.astype(dtype)
  return init


def layer_scale(n_layers: int) -> float:
  return math.sqrt(2.0 / n_layers)
