"""LayerNorm whose backward pass keeps only its input and statistics (docs/semantics.md §1).

The forward pass is Flax's ``nn.LayerNorm`` (float32, eps 1e-5, the fast variance
E[x²] - E[x]² clipped at 0; the same operations, so the same bits). The backward pass is
the closed form PyTorch's LayerNorm uses; its residuals are x, the mean and 1/σ per
token ([..., 1]) and the scale, where autodiff of the forward keeps float32 [..., D]
intermediates (x - mean, the broadcast 1/σ · scale, 2x). x is the residual stream,
which the model keeps anyway (or, with ``remat="elementwise"``, recomputes).
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
  """(x - mean) / sqrt(var + eps) * scale + bias over the last axis, in float32.

  x [..., D]; scale, bias [D]. Returns float32 [..., D]."""
  return _layer_norm_fwd(x, scale, bias, eps)[0]


def _stats(x: jax.Array, eps: float):
  mean = jnp.mean(x, axis=-1, keepdims=True)                         # [..., 1]
  mean2 = jnp.mean(jax.lax.square(x), axis=-1, keepdims=True)
  var = jnp.maximum(0.0, mean2 - jax.lax.square(mean))
  return mean, jax.lax.rsqrt(var + eps)                              # [..., 1] each


def _layer_norm_fwd(x, scale, bias, eps):
  x32 = x.astype(jnp.float32)
  mean, rstd = _stats(x32, eps)
  y = (x32 - mean) * (rstd * scale.astype(jnp.float32)) + bias.astype(jnp.float32)
  # zero-size arrays carry the dtypes of x and bias (residuals must be arrays)
  return y, (x, mean, rstd, scale, jnp.zeros((0,), bias.dtype))


def _layer_norm_bwd(eps, res, g):
  del eps
  # the barrier keeps XLA from sharing x - mean etc. with the forward pass (it would keep
  # them from there to here)
  x, mean, rstd, scale, bias_like, g = jax.lax.optimization_barrier((*res, g))
  lead = tuple(range(x.ndim - 1))
  xhat = (x.astype(jnp.float32) - mean) * rstd                       # [..., D]
  g = g.astype(jnp.float32)
  gs = g * scale.astype(jnp.float32)
  dx = rstd * (gs - jnp.mean(gs, axis=-1, keepdims=True)
               - xhat * jnp.mean(gs * xhat, axis=-1, keepdims=True))
  dscale = jnp.sum(g * xhat, axis=lead)
  dbias = jnp.sum(g, axis=lead)
  return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(bias_like.dtype)


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nn.Module):
  """``nn.LayerNorm(epsilon, dtype=float32)`` with :func:`layer_norm`'s backward pass.
  Parameters as Flax's: scale (ones) and bias (zeros), [D]."""
  epsilon: float = 1e-5
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, with_source: bool = False):
    """The normalised x [..., D] float32; with ``with_source``, (it, its
    :class:`NormSource`), for consumers that recompute it instead of keeping it."""
    d = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (d,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (d,), self.param_dtype)
    y = layer_norm(x, scale, bias, self.epsilon)
    return (y, NormSource(x, scale, bias, self.epsilon)) if with_source else y


class NormSource(NamedTuple):
  """What a LayerNorm's output is made from: ``recompute()`` gives the same values
  (the forward pass's operations), so a backward pass may keep these (x is the residual
  stream, which the model keeps anyway) instead of the float32 output."""
  x: jax.Array
  scale: jax.Array
  bias: jax.Array
  eps: float

  def recompute(self) -> jax.Array:
    return _layer_norm_fwd(self.x, self.scale, self.bias, self.eps)[0]
