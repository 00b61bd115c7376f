"""Shared helpers of the tests (CPU and GPU): CVMM routing kinds, inputs and outputs, the
relative error used throughout."""
from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np

from kernels import make_routing
from kernels.cvmm_reference import cvmm_reference

# Largest allowed ||out - ref|| / ||ref|| per input dtype (reference: float32, HIGHEST).
TOL = {jnp.float32: 1e-5, jnp.float16: 2e-3, jnp.bfloat16: 1e-2}


def routing_of_kind(kind, n, k, e, key):
  """"one": every pair on expert e // 2; "random": top-k of random logits (or random
  indices with repeats when k > e)."""
  if kind == "one":
    idx = jnp.full((n, k), e // 2, jnp.int32)
  elif k <= e:
    _, idx = jax.lax.top_k(jax.random.normal(key, (n, e)), k)
  else:
    idx = jax.random.randint(key, (n, k), 0, e)
  return make_routing(idx, e)


def rel_err(a, b):
  """||a - b|| / ||b|| in float64 (every float input, bf16 to float64, converts exactly)."""
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# cvmm_reference materialises [N, K, I, O] (and as much again for its gradient); above
# this many elements the tests take the product with every expert instead
_GATHERED_LIMIT = 1 << 27


def by_expert_reference(x, r, w, g=None):
  """The CVMM by its definition, the other way round: every row times every expert's
  matrix ([N, M, E, O]), then each slot takes its expert's product (and the gated sum
  over the slots): memory of N * M * E * O and N * K * O instead of N * K * I * O.
  float32, HIGHEST."""
  k, m = r.k, x.shape[1]
  y = jnp.einsum("NMI,EIO->NMEO", x, w, preferred_element_type=jnp.float32,
                 precision=jax.lax.Precision.HIGHEST)
  n = x.shape[0]
  row = (jnp.arange(k) // (k // m))[None, :]          # slot s reads row s // (K // M)
  y = y[jnp.arange(n)[:, None], row, r.expert_index]  # [N, K, O]
  if g is None:
    return y.astype(x.dtype)
  return jnp.einsum("NK,NKO->NO", g.astype(jnp.float32), y,
                    precision=jax.lax.Precision.HIGHEST).astype(x.dtype)


def reference(x, r, w, g=None):
  """:func:`kernels.cvmm_reference.cvmm_reference`, or :func:`by_expert_reference` where
  that would materialise more than ``_GATHERED_LIMIT`` elements."""
  n, k = r.expert_index.shape
  if n * k * w.shape[1] * w.shape[2] <= _GATHERED_LIMIT:
    return cvmm_reference(x, r, w, g)
  return by_expert_reference(x, r, w, g)


def outputs(fn, x, w, g, r, ct):
  """Forward output and the gradients of <out, ct> w.r.t. x, w (and gates)."""
  def loss(x, w, g):
    return jnp.sum(fn(x, r, w, g).astype(jnp.float32) * ct)

  argn = (0, 1, 2) if g is not None else (0, 1)
  y = jax.jit(lambda x, w, g: fn(x, r, w, g))(x, w, g)
  return (y,) + tuple(jax.jit(jax.grad(loss, argnums=argn))(x, w, g))


def inputs(case, dtype, gated):
  """x [N, M, I], w [E, I, O], gates [N, K] or None, routing, cotangent of one case
  (name, N, K, M, E, I, O, routing kind); seeded by the case itself."""
  _, n, k, m, e, i, o, kind = case
  ks = jax.random.split(jax.random.key(zlib.crc32(repr(case).encode())), 5)
  r = routing_of_kind(kind, n, k, e, ks[0])
  x = jax.random.normal(ks[1], (n, m, i)).astype(dtype)
  w = (jax.random.normal(ks[2], (e, i, o)) * i ** -0.5).astype(dtype)
  g = jax.random.uniform(ks[3], (n, k)).astype(dtype) if gated else None
  ct = jax.random.normal(ks[4], (n, o) if gated else (n, k, o))
  return x, w, g, r, ct


def producers_only(monkeypatch, producers: int):
  """The Mosaic row and weight-gradient kernels' tiles restricted to those with
  ``producers`` producer warpgroups (``TileConfig.producers``, 1 or 2), chosen without
  timing by a tuner of their own (the first of those candidates, whatever another test
  cached)."""
  from kernels import autotune  # noqa: PLC0415
  from kernels.cvmm_mosaic import gram, rows  # noqa: PLC0415
  every_rows, every_gram = rows.rows_candidates, gram.gram_candidates
  monkeypatch.setattr(rows, "rows_candidates", lambda *a, **kw: [
      c for c in every_rows(*a, **kw) if c.producers == producers])
  monkeypatch.setattr(gram, "gram_candidates", lambda *a, **kw: [
      c for c in every_gram(*a, **kw) if c.producers == producers])
  assert rows.rows_candidates(72, 2, False) and rows.rows_candidates(64, 4, True)
  assert gram.gram_candidates(72) and gram.gram_candidates(1024)
  monkeypatch.setenv("CVMM_AUTOTUNE", "0")
  monkeypatch.setattr(autotune, "_TUNER", autotune.Autotuner(cache_file=""))
