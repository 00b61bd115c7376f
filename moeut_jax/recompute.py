"""Calls whose backward pass recomputes a 16-bit input instead of keeping it.

The projections and CVMM kernels read their inputs in the compute dtype, and their backward
passes need those inputs again (for the weights' gradients). Kept, every layer holds bf16
copies of the residual stream ([N, D] each) from the forward pass to the backward pass:
the cast of LN1's output (q and k), of the stream (SwitchHead's V) and of the stream after
attention (the σ-MoE's experts); 10 GiB at MoEUT_1B, batch 32 x 1024. The float32 stream
they are made from is kept anyway (the LayerNorms' backward passes read it), and a cast is
one cheap pass over it. :func:`recompute_input` calls a function with the cast and hands
its backward pass the cast made again from its source.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp


@jax.tree_util.register_pytree_node_class
class Cast:
  """``source`` (a float32 array, or a :class:`~moeut_jax.layernorm.NormSource` whose
  output is recomputed), reshaped to ``shape`` (None: as it is) and cast to ``dtype``."""

  def __init__(self, source: Any, dtype: Any, shape: tuple[int, ...] | None = None):
    self.source = source
    self.dtype = jnp.dtype(dtype)
    self.shape = None if shape is None else tuple(shape)

  def value(self) -> jax.Array:
    src = self.source
    src = src.recompute() if hasattr(src, "recompute") else src
    return (src if self.shape is None else src.reshape(self.shape)).astype(self.dtype)

  def tree_flatten(self):
    return (self.source,), (self.dtype, self.shape)

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(children[0], *aux)


@jax.tree_util.register_pytree_node_class
class _Kept:
  """The residuals of a ``jax.vjp`` with those that are the recomputed input left out:
  ``leaves`` and, static, the pytree structure and the positions of the left-out ones."""

  def __init__(self, leaves, treedef, slots):
    self.leaves, self.treedef, self.slots = list(leaves), treedef, slots

  def tree_flatten(self):
    return self.leaves, (self.treedef, self.slots)

  @classmethod
  def tree_unflatten(cls, aux, leaves):
    return cls(leaves, *aux)

  def rebuild(self, x: jax.Array):
    leaves, rest = [], iter(self.leaves)
    for i in range(self.treedef.num_leaves):
      leaves.append(x if i in self.slots else next(rest))
    return jax.tree_util.tree_unflatten(self.treedef, leaves)


def recompute_input(fn: Callable, x: jax.Array, source: Cast | None, *args) -> Any:
  """``fn(x, *args)``, whose backward pass makes x again from ``source`` instead of keeping
  it (``source`` None: simply ``fn(x, *args)``). ``source.value()`` must equal x (it is
  x's own computation, from arrays that are kept anyway). Gradients flow to x and
  ``args`` as through ``fn``; none to ``source``.

  fn: a function of arrays (not closing over traced values), e.g. a ``functools.partial``
  of a kernel with its static settings. Where fn's backward pass does not keep x itself
  (its saved residuals are other arrays made from it), this is ``fn(x, *args)`` with
  nothing left out. Without a cast (``source`` a float32 array and ``dtype`` float32),
  fn is simply called.
  """
  if source is None:
    return fn(x, *args)
  src = source.source
  if not hasattr(src, "recompute") and src.dtype == source.dtype:   # no cast: x is src
    return fn(x, *args)
  return _recompute_input(fn, x, source, *args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _recompute_input(fn, x, source, *args):
  return fn(x, *args)


def _fwd(fn, x, source, *args):
  out, vjp_fn = jax.vjp(fn, x, *args)
  leaves, treedef = jax.tree_util.tree_flatten(vjp_fn)
  slots = frozenset(i for i, leaf in enumerate(leaves) if leaf is x)
  kept = _Kept([leaf for i, leaf in enumerate(leaves) if i not in slots], treedef, slots)
  return out, (kept, source)


def _bwd(fn, res, g):
  del fn
  kept, source = res
  # tied to g: the recomputation cannot move into the forward pass, and XLA cannot merge
  # it with the forward pass's cast (the same operations on the same arrays), which it
  # would then keep until here
  source, g = jax.lax.optimization_barrier((source, g))
  grads = kept.rebuild(source.value())(g)
  return (grads[0], None, *grads[1:])


_recompute_input.defvjp(_fwd, _bwd)
