"""The KV cache of a MoEUT stack.

Keys are stored rotated at their absolute positions and pre-scaled; values after the
expert mix. One array pair per distinct layer g of the group, stacked over the R
repeats that share it (the absolute layer r * G + g is ``k[g][r]``):
  k[g], v[g]: [R, B, S, H, Dh]
Two kinds:
  growing  (``kv_cache={}`` starts one, as in the original): every call appends T
           positions; S = positions so far. Shapes change, so each call retraces.
  fixed    (``model.init_cache(B, capacity)``): S = capacity, ``length`` positions
           filled; calls write in place, so one jitted step serves the whole decode.
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class KVCache:
  k: tuple
  v: tuple
  length: jax.Array                       # int32 scalar: positions filled so far
  fixed: bool = flax.struct.field(pytree_node=False, default=False)

  @property
  def capacity(self) -> int:
    """S: positions the arrays hold."""
    return self.k[0].shape[2]

  @classmethod
  def empty(cls, *, group_size: int, repeats: int, batch: int, n_heads: int, d_head: int,
            capacity: int = 0, fixed: bool = False, dtype=jnp.float32) -> "KVCache":
    shape = (repeats, batch, capacity, n_heads, d_head)
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(group_size))
    return cls(k=zeros, v=tuple(jnp.zeros(shape, dtype) for _ in range(group_size)),
               length=jnp.zeros((), jnp.int32), fixed=fixed)

  def layer(self, index: int, group_size: int) -> tuple[jax.Array, jax.Array]:
    """(k, v) of absolute layer ``index``, each [B, S, H, Dh] (filled up to ``length``)."""
    r, g = divmod(index, group_size)
    return self.k[g][r], self.v[g][r]
