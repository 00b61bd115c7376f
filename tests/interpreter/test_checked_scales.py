"""Checked float16 scales (CvmmConfig.f16_scales="checked", the default) in Triton's
interpreter: with the estimate right no row is recomputed and the sums match float32;
with the estimate 2^30 too high every row is recomputed; a row whose sample misjudged
it, a zero row whose sample was not, an infinity: those rows alone; zero inputs: none;
bound scales give the same values without the check."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel
from kernels import CvmmConfig, make_routing
from kernels.cvmm_triton import rows, scales

N, K, M, E, I, O = 23, 4, 2, 5, 40, 24


def _f32(t):
  return t.astype(jnp.float32)


def _hi(*a):
  return jnp.einsum(*a, precision="highest")


@pytest.fixture
def setup(monkeypatch):
  ks = jax.random.split(jax.random.key(1), 8)
  r = make_routing(jax.random.randint(ks[0], (N, K), 0, E), E)
  g = jax.random.uniform(ks[3], (N, K)).astype(jnp.float16)
  w = (jax.random.normal(ks[2], (E, I, O)) / np.sqrt(I)).astype(jnp.float16)
  seen, orig = [], rows.unscale_rows_checked

  def spy(out, inv_s, sampled, *a, **kw):
    seen.append((np.asarray(out, np.float32), np.asarray(sampled)))
    return orig(out, inv_s, sampled, *a, **kw)

  monkeypatch.setattr(rows, "unscale_rows_checked", spy)
  return ks, r, g, w, seen


def _down(r, x, w, gates, config=CvmmConfig()):
  """out [N, O] = sum_s g x[n, s // 2] @ W[e], and its float32 reference."""
  want = _hi("nki,nkio,nk->no", jnp.repeat(_f32(x), K // M, axis=1),
             _f32(w)[r.expert_index], _f32(gates))
  out = rows.rows_matmul(x.reshape(N * M, I), w, r, a_rows=M, out_rows=1,
                         scale=gates.reshape(-1), config=config)[0]
  return out, want


def _dx(r, dy, w):
  """dx [N * M, I] = sum over the slots of row j of dy @ W[e]^T, and its reference."""
  want = _hi("nko,nkio->nki", _f32(dy).reshape(N, K, O), _f32(w)[r.expert_index]).reshape(
      N, M, K // M, I).sum(2).reshape(N * M, I)
  return rows.rows_matmul(dy, w, r, a_rows=K, out_rows=M, transpose_w=True)[0], want


def _check(seen, got, want, bad_rows=()):
  sums, sampled = seen.pop()
  assert not seen and got.dtype == jnp.float16, got.dtype
  # the rows the scale-back recomputes: sums not finite, largest |sum| below 2^0 but not
  # 0, or 0 where the token's sample was not
  top = np.where(np.isnan(sums), np.inf, np.abs(sums)).max(axis=1)
  bad = ~np.isfinite(top) | ((top < 1) & ((top > 0) | (sampled == 1)))
  assert np.array_equal(np.flatnonzero(bad), bad_rows), np.flatnonzero(bad)
  fin = np.isfinite(np.asarray(want))
  assert np.array_equal(np.isfinite(np.asarray(got)), fin)
  assert rel(np.asarray(got)[fin], np.asarray(want)[fin]) <= 2e-3, rel(got, want)


@pytest.mark.parametrize("mag", [0.05, 1.0, 20.0])
def test_right_estimates_recompute_nothing(setup, mag):
  ks, r, g, w, seen = setup
  _check(seen, *_down(r, (jax.random.normal(ks[1], (N, M, I)) * mag).astype(jnp.float16),
                      w, g))
  _check(seen, *_dx(r, (jax.random.normal(ks[4], (N * K, O)) * mag).astype(jnp.float16), w))


def test_wrong_estimates_recompute_their_rows(setup, monkeypatch):
  ks, r, g, w, seen = setup
  x = jax.random.normal(ks[1], (N, M, I)).astype(jnp.float16)
  dy = jax.random.normal(ks[4], (N * K, O)).astype(jnp.float16)
  # an estimate 2^30 too high: every row's sums below 2^0, every row recomputed
  monkeypatch.setattr(scales, "_CHECK_AIM_BELOW", 30)
  _check(seen, *_down(r, x, w, g), bad_rows=np.arange(N))
  monkeypatch.setattr(scales, "_CHECK_AIM_BELOW", 2)
  # token 3's slot 0 (the sample of both its dx rows) 2^12 larger: its second row comes
  # out 2^12 too small, alone recomputed; token 5's slots 2, 3 zero: its second row is 0
  # where its sample is not: recomputed (0 again)
  dy2 = dy.at[3 * K].multiply(2.0 ** 12).at[5 * K + 2:5 * K + 4].set(0)
  _check(seen, *_dx(r, dy2, w), bad_rows=np.array([3 * M + 1, 5 * M + 1]))
  # an infinity: its row only, not finite, as in float32
  _check(seen, *_down(r, x.at[5, 1, 0].set(jnp.inf), w, g), bad_rows=np.array([5]))
  # zero inputs: zero rows, none recomputed (the sample was 0 too)
  _check(seen, *_down(r, x.at[7].set(0), w, g))
  # bound scales: the same values within the tolerance, without the check
  got, want = _down(r, x, w, g, CvmmConfig(f16_scales="bound"))
  assert not seen and rel(got, want) <= 2e-3
