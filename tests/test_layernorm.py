"""moeut_jax/layernorm.py: Flax's LayerNorm forward, a closed-form backward that keeps only
the input and the statistics."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moeut_jax.layernorm import LayerNorm
from moeut_jax.remat import saved_residuals


def _case(shape, offset):
  x = jax.random.normal(jax.random.PRNGKey(0), shape) * 3.0 + offset
  params = nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32).init(jax.random.PRNGKey(1), x)
  # scale and bias away from 1 and 0, so that their gradients are tested too
  params = jax.tree.map(lambda a: a + jax.random.normal(jax.random.PRNGKey(2), a.shape), params)
  cotangent = jax.random.normal(jax.random.PRNGKey(3), shape)
  return x, params, cotangent


@pytest.mark.parametrize("shape,offset", [((2, 5, 64), 1.0), ((7, 24), -40.0), ((3, 1, 1), 0.0)],
                         ids=["BTD", "ND-offset", "D=1"])
def test_forward_is_flax_bit_for_bit_and_gradients_agree(shape, offset):
  x, params, ct = _case(shape, offset)
  flax_ln = nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32)
  ours = LayerNorm(1e-5)
  assert jax.tree.structure(ours.init(jax.random.PRNGKey(1), x)) == jax.tree.structure(params)
  np.testing.assert_array_equal(ours.apply(params, x), flax_ln.apply(params, x))
  grad = lambda m: jax.grad(lambda p, x: jnp.sum(m.apply(p, x) * ct), (0, 1))(params, x)  # noqa: E731
  for got, want in zip(jax.tree.leaves(grad(ours)), jax.tree.leaves(grad(flax_ln))):
    err = float(jnp.linalg.norm(got - want) / jnp.maximum(jnp.linalg.norm(want), 1e-30))
    assert err <= 1e-6, err


def test_backward_keeps_only_the_input_and_the_statistics():
  x, params, _ = _case((4, 6, 32), 0.5)
  ours = [value.shape for value, _ in
          saved_residuals(lambda p, x: LayerNorm(1e-5).apply(p, x).sum(), params, x)
          if value.size]                           # (a zero-size array carries bias's dtype)
  flax_ln = [value.shape for value, _ in saved_residuals(
      lambda p, x: nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32).apply(p, x).sum(), params, x)]
  # x itself, the mean and 1/σ per token, the scale
  assert sorted(ours) == sorted([(4, 6, 32), (4, 6, 1), (4, 6, 1), (32,)])
  assert sum(s == x.shape for s in flax_ln) >= 2           # autodiff keeps [..., D] values
