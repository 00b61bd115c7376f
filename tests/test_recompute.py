"""recompute_input: the same values and gradients as calling the function on the cast, with
the cast left out of what the backward pass keeps."""
import contextlib
import functools
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from kernels import CvmmConfig, cvmm, make_routing
from moeut_jax.layernorm import NormSource, layer_norm
from moeut_jax.recompute import Cast, recompute_input

N, D, O, E, K = 12, 16, 8, 4, 2


def _inputs():
  keys = jax.random.split(jax.random.PRNGKey(0), 5)
  x = jax.random.normal(keys[0], (N, D))
  w = (jax.random.normal(keys[1], (D, O)) / D ** 0.5).astype(jnp.bfloat16)
  scale = 1 + 0.1 * jax.random.normal(keys[2], (D,))
  bias = 0.1 * jax.random.normal(keys[3], (D,))
  idx = jax.random.randint(keys[4], (N, K), 0, E)
  return x, w, scale, bias, idx


def _dense(x, w):
  return jnp.einsum("nd,do->no", x, w, preferred_element_type=jnp.float32)


def _saved(f, *args) -> str:
  """JAX's list of what f's backward pass keeps, as printed."""
  buf = io.StringIO()
  with contextlib.redirect_stdout(buf):
    print_saved_residuals(f, *args)
  return buf.getvalue()


def _normed_loss(use: bool):
  def loss(x, w, scale, bias):
    xs = layer_norm(x, scale, bias, 1e-5).astype(jnp.bfloat16)
    if use:
      y = recompute_input(_dense, xs, Cast(NormSource(x, scale, bias, 1e-5), jnp.bfloat16), w)
    else:
      y = _dense(xs, w)
    return jnp.sum(jnp.sin(y))
  return loss


def test_layernorm_source_same_gradients_and_the_cast_is_not_kept():
  x, w, scale, bias, _ = _inputs()
  grad = lambda use: jax.jit(jax.grad(_normed_loss(use), argnums=(0, 1, 2, 3)))(  # noqa: E731
      x, w, scale, bias)
  for a, b in zip(grad(True), grad(False)):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
  kept = _saved(_normed_loss(True), x, w, scale, bias)
  plain = _saved(_normed_loss(False), x, w, scale, bias)
  assert f"bf16[{N},{D}]" in plain                       # without it, the cast is kept
  assert f"bf16[{N},{D}]" not in kept, kept
  assert f"f32[{N},{D}] from the argument x" in kept


def test_reshaped_stream_source_through_a_cvmm_kernel():
  """The V projection's use: x [B, T, D] float32, the kernel reads it as [N, 1, D] bf16."""
  x, _, _, _, idx = _inputs()
  x3 = x.reshape(3, N // 3, D)
  w = (jax.random.normal(jax.random.PRNGKey(7), (E, D, O)) / D ** 0.5).astype(jnp.bfloat16)
  routing = make_routing(idx, E)
  project = functools.partial(cvmm, config=CvmmConfig(impl="xla"))

  def loss(x3, w, use):
    xr = x3.reshape(N, 1, D)
    if use:
      y = recompute_input(project, xr.astype(jnp.bfloat16),
                          Cast(x3, jnp.bfloat16, xr.shape), routing, w)
    else:
      y = project(xr.astype(jnp.bfloat16), routing, w)
    return jnp.sum(jnp.sin(y.astype(jnp.float32)))

  grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
  for a, b in zip(grad(x3, w, True), grad(x3, w, False)):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
  assert loss(x3, w, True) == loss(x3, w, False)


def test_a_function_that_keeps_other_values_is_unchanged():
  """fn's residuals are made from x (sin, cos), not x itself: nothing to leave out, and
  the gradients are fn's."""
  x, w, _, _, _ = _inputs()
  fn = lambda xs, w: _dense(jnp.sin(xs), w)  # noqa: E731

  def loss(x, w, use):
    xs = x.astype(jnp.bfloat16)
    y = recompute_input(fn, xs, Cast(x, jnp.bfloat16), w) if use else fn(xs, w)
    return jnp.sum(y ** 2)

  g = lambda use: jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(x, w, use)  # noqa: E731
  for a, b in zip(g(True), g(False)):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_without_a_cast_the_function_is_called_directly():
  x, w, _, _, _ = _inputs()
  w = w.astype(jnp.float32)
  calls = []

  def fn(xs, w):
    calls.append(xs)
    return _dense(xs, w)

  y = recompute_input(fn, x, Cast(x, jnp.float32), w)
  assert len(calls) == 1 and calls[0] is x
  np.testing.assert_array_equal(y, _dense(x, w))
  jaxpr = jax.make_jaxpr(lambda x: recompute_input(fn, x, Cast(x, jnp.float32), w))(x)
  assert "custom_vjp" not in str(jaxpr)
  jaxpr = jax.make_jaxpr(lambda x: recompute_input(fn, x.astype(jnp.bfloat16), None, w))(x)
  assert "custom_vjp" not in str(jaxpr)                  # no source: a plain call


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_source_value_is_the_cast(dtype):
  x, _, scale, bias, _ = _inputs()
  np.testing.assert_array_equal(Cast(x, dtype).value(), x.astype(dtype))
  src = NormSource(x, scale, bias, 1e-5)
  expected = layer_norm(x, scale, bias, 1e-5).reshape(N // 2, 2, D).astype(dtype)
  np.testing.assert_array_equal(Cast(src, dtype, (N // 2, 2, D)).value(), expected)
