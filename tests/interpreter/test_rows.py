"""The Triton kernels and their custom_vjp ops in float32, in Triton's interpreter: the
row kernel (stored, fused sums, loop_n, dgates), the weight gradient with split rows,
and the fused σ-MoE pair, against the reference CVMM."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel
from kernels import make_routing
from kernels.autotune import TileConfig
from kernels.cvmm_reference import cvmm_pair_reference, cvmm_reference
from kernels.cvmm_triton import cvmm_triton, cvmm_triton_pair
from kernels.cvmm_triton.dw import expert_gram
from kernels.cvmm_triton.rows import rows_matmul


@pytest.mark.parametrize("case", [(23, 4, 1, 5, 40, 24, False, True),
                                  (19, 4, 4, 5, 24, 40, True, True),
                                  (21, 4, 2, 3, 40, 24, True, False),
                                  (9, 1, 1, 1, 16, 16, True, True)])
def test_ops_match_reference(case):
  n, k, m, e, i, o, gated, fuse = case
  ks = jax.random.split(jax.random.key(n), 5)
  r = make_routing(jax.random.randint(ks[0], (n, k), 0, e), e)
  x = jax.random.normal(ks[1], (n, m, i))
  w = jax.random.normal(ks[2], (e, i, o)) / np.sqrt(i)
  g = jax.random.uniform(ks[3], (n, k)) if gated else None
  ct = jax.random.normal(ks[4], (n, o) if gated else (n, k, o))

  def outs(fn):
    loss = lambda x, w, g: jnp.sum(fn(x, r, w, g) * ct)  # noqa: E731
    argn = (0, 1, 2) if gated else (0, 1)
    return (fn(x, r, w, g),) + tuple(jax.grad(loss, argnums=argn)(x, w, g))

  got = outs(lambda x, r, w, g: cvmm_triton(x, r, w, g, fuse_sum=fuse))
  for a, b in zip(got, outs(cvmm_reference)):
    assert rel(a, b) <= 1e-5, (case, rel(a, b))


def test_loop_n_tiles_fused_sum_and_dgates():
  """One program per row tile walking every column block (loop_n), with the fused gated
  sum and with the dgates epilogue; 40 columns = 3 blocks of 16, masked."""
  n, k, e, i, o = 21, 4, 3, 24, 40
  ks = jax.random.split(jax.random.key(7), 6)
  r = make_routing(jax.random.randint(ks[0], (n, k), 0, e), e)
  w = jax.random.normal(ks[1], (e, i, o)) / np.sqrt(i)
  g = jax.random.uniform(ks[2], (n * k,))
  we = w[r.expert_index.reshape(-1)]                                  # [P, I, O]
  cfg = TileConfig(16, 16, 32, 4, 1, loop_n=True)
  a = jax.random.normal(ks[3], (n * k, i))
  out, _ = rows_matmul(a, w, r, a_rows=k, out_rows=1, scale=g, cfg=cfg)
  y = jnp.einsum("PI,PIO->PO", a, we, precision="highest")
  assert rel(out, (y * g[:, None]).reshape(n, k, o).sum(1)) <= 1e-5
  a1 = jax.random.normal(ks[4], (n, i))
  c = jax.random.normal(ks[5], (n * k, o))
  out, dg = rows_matmul(a1, w, r, a_rows=1, out_rows=k, scale=g, dgate_rows=c, c_rows=k,
                        cfg=cfg)
  y = jnp.einsum("PI,PIO->PO", jnp.repeat(a1, k, axis=0), we, precision="highest")
  assert rel(out, y * g[:, None]) <= 1e-5
  assert rel(dg, jnp.sum(y * c, axis=1)) <= 1e-5


def test_weight_gradient_with_split_rows():
  """Each expert's rows split over 3 programs (their float32 partials added by the
  kernel), against an einsum; one expert without pairs gets zeros."""
  n, k, e, i, o = 21, 4, 3, 24, 40
  ks = jax.random.split(jax.random.key(7), 6)
  idx = jax.random.randint(ks[0], (n, k), 0, e - 1)
  r = make_routing(idx, e)
  a1 = jax.random.normal(ks[4], (n, i))
  b = jax.random.normal(ks[5], (n * k, o))
  g = jax.random.uniform(ks[2], (n * k,))
  onehot = jax.nn.one_hot(idx.reshape(-1), e)
  ref = jnp.einsum("PE,PI,PO->EIO", onehot, jnp.repeat(a1, k, axis=0), b * g[:, None],
                   precision="highest")
  dw = expert_gram(a1, b, r, a_rows=1, b_rows=k, scale=g,
                   cfg=TileConfig(16, 16, 16, 4, 1, splits=3))
  assert float(jnp.abs(dw[e - 1]).max()) == 0.0
  assert rel(dw, ref) <= 1e-5


@pytest.mark.parametrize("keep_middle", [True, False], ids=["kept", "remade"])
@pytest.mark.parametrize("shape", [(21, 4, 5, 24, 16, 40), (13, 2, 1, 70, 24, 20)])
def test_fused_pair_matches_two_reference_cvmms(shape, keep_middle):
  """The fused pair kernels against two reference CVMMs, forward and every gradient, with
  the [P, H] middle kept for the backward pass or made again there by the row kernel
  (then no [P, H] array is among the saved residuals)."""
  from moeut_jax.remat import saved_residuals
  n, k, e, d, h, o = shape
  ks = jax.random.split(jax.random.key(n), 6)
  r = make_routing(jax.random.randint(ks[0], (n, k), 0, e), e)
  x = jax.random.normal(ks[1], (n, d))
  wu = jax.random.normal(ks[2], (e, d, h)) / np.sqrt(d)
  wd = jax.random.normal(ks[3], (e, h, o)) / np.sqrt(h)
  g = jax.random.uniform(ks[4], (n, k))
  ct = jax.random.normal(ks[5], (n, o))
  ref_fn = lambda x, wu, wd, g: cvmm_pair_reference(x, r, wu, wd, g)  # noqa: E731
  got_fn = lambda x, wu, wd, g: cvmm_triton_pair(x, r, wu, wd, g,     # noqa: E731
                                                 keep_middle=keep_middle)
  outs = [(f(x, wu, wd, g),) + tuple(jax.grad(lambda *a: jnp.sum(f(*a) * ct),
                                              argnums=(0, 1, 2, 3))(x, wu, wd, g))
          for f in (got_fn, ref_fn)]
  for a, b in zip(*outs):
    assert rel(a, b) <= 1e-5, (shape, rel(a, b))
  middles = [v for v, _ in saved_residuals(got_fn, x, wu, wd, g) if v.shape == (n * k, h)]
  assert len(middles) == (1 if keep_middle else 0), middles
  if not keep_middle:
    return
  # bf16 weights with float32 x: computed in float32, gradients in each input's dtype.
  wu16, wd16 = wu.astype(jnp.bfloat16), wd.astype(jnp.bfloat16)
  grads = jax.grad(lambda *a: jnp.sum(cvmm_triton_pair(a[0], r, *a[1:]) * ct),
                   argnums=(0, 1, 2, 3))(x, wu16, wd16, g)
  want = jax.grad(lambda *a: jnp.sum(ref_fn(*a) * ct), argnums=(0, 1, 2, 3))(
      x, wu16.astype(jnp.float32), wd16.astype(jnp.float32), g)
  for a, b, primal in zip(grads, want, (x, wu16, wd16, g)):
    assert a.dtype == primal.dtype, ("pair dtype", a.dtype, primal.dtype)
    tol = 1e-5 if primal.dtype == jnp.float32 else 1e-2     # bf16: its rounding
    assert rel(a, b) <= tol, ("pair mixed", rel(a, b))


@pytest.mark.parametrize("io", [(40, 24), (24, 40)], ids=["narrow_out", "wide_out"])
@pytest.mark.parametrize("units", [True, False], ids=["unit_pairs", "pairs"])
@pytest.mark.parametrize("m", [1, 2])
def test_grouped_gated_sums_match_reference(m, units, io, monkeypatch):
  """cvmm's gated sums per group of slots (SwitchHead V: out_rows = heads, each head's
  two experts): the output and every gradient against the reference's grouped sums.
  With unit pairs the unit-store kernel writes the forward sums and, in the backward
  pass, makes the products again for the dgates. Where the products are not narrower
  than the input rows (``wide_out``) the products are stored and summed in XLA, and
  cvmm_triton refuses the grouped sums."""
  from kernels import cvmm, make_head_routing
  from kernels.cvmm_triton import rows as rows_mod
  calls = []
  orig = rows_mod.units_store
  monkeypatch.setattr(rows_mod, "units_store",
                      lambda *a, **kw: calls.append(a[4] is None) or orig(*a, **kw))
  n, h, ea = 37, 4, 5
  i, o = io
  ks = jax.random.split(jax.random.key(3), 5)
  idx = jax.lax.top_k(jax.random.normal(ks[0], (n, h, ea)), 2)[1]
  r = make_head_routing(idx, ea, unit_pairs=units)
  assert (r.pairs is not None) == units
  x = jax.random.normal(ks[1], (n, m, i))
  w = jax.random.normal(ks[2], (h * ea, i, o)) / np.sqrt(i)
  g = jax.random.uniform(ks[3], (n, 2 * h))
  ct = jax.random.normal(ks[4], (n, h, o))

  def grouped_reference(x, r, w, g):
    y = cvmm_reference(x, r, w)                                        # [N, K, O]
    return jnp.einsum("NHSO,NHS->NHO", y.reshape(n, h, 2, o), g.reshape(n, h, 2),
                      precision="highest")

  def outs(fn):
    loss = lambda x, w, g: jnp.sum(fn(x, r, w, g) * ct)  # noqa: E731
    return (fn(x, r, w, g),) + tuple(jax.grad(loss, argnums=(0, 1, 2))(x, w, g))

  got = outs(lambda x, r, w, g: cvmm(x, r, w, g, out_rows=h, impl="triton"))
  # with unit pairs: the forward; grad's forward, then its dgates (dgate rows given)
  assert calls == ([True, True, False] if units and o < i else [])
  if o >= i:
    with pytest.raises(ValueError, match="narrower"):
      cvmm_triton(x, r, w, g, out_rows=h)
  assert got[0].shape == (n, h, o)
  for name, a, b in zip(["out", "dx", "dw", "dgates"], got, outs(grouped_reference)):
    assert rel(a, b) <= 1e-5, (name, rel(a, b))
