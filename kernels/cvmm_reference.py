"""The defining pure-JAX CVMM: every pair gathers its expert's matrix.

Obviously right and memory-hungry ([N, K, I, O] weights are materialised): it is the
reference that every other implementation is tested against, not a path for real runs.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.routing import Routing


def is_available() -> bool:
  return True


def expand_rows(x: jax.Array, k: int) -> jax.Array:
  """[N, M, I] -> [N, K, I]: slot s reads row s // (K // M)."""
  m = x.shape[1]
  return jnp.repeat(x, k // m, axis=1)


def cvmm_reference(x: jax.Array, routing: Routing, w: jax.Array,
                   gates: jax.Array | None = None) -> jax.Array:
  """See :func:`kernels.cvmm`. x [N, M, I], w [E, I, O], gates [N, K] or None."""
  k = routing.k
  xe = expand_rows(x, k)                                             # [N, K, I]
  we = w[routing.expert_index]                                       # [N, K, I, O]
  y = jnp.einsum("NKI,NKIO->NKO", xe, we, preferred_element_type=jnp.float32,
                 precision=jax.lax.Precision.HIGHEST)                # [N, K, O]
  if gates is None:
    return y.astype(x.dtype)
  out = jnp.einsum("NK,NKO->NO", gates.astype(jnp.float32), y,
                   precision=jax.lax.Precision.HIGHEST)              # [N, O]
  return out.astype(x.dtype)


def cvmm_pair_reference(x: jax.Array, routing: Routing, w_up: jax.Array, w_down: jax.Array,
                        gates: jax.Array) -> jax.Array:
  """The σ-MoE pair by its definition: gated CVMM of relu(CVMM(x [N, D], w_up))."""
  u = jax.nn.relu(cvmm_reference(x[:, None], routing, w_up))              # [N, K, H]
  return cvmm_reference(u, routing, w_down, gates)                        # [N, O]
