"""token_nll: values and gradients against PyTorch's cross-entropy, bad inputs, and what its
backward keeps."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from cvmm_cases import rel_err
from moeut_jax import token_nll
from moeut_jax.remat import nbytes, saved_residuals


def _torch_nll_and_grad(logits: np.ndarray, labels: np.ndarray, cot: np.ndarray):
  t = torch.from_numpy(logits.astype(np.float64)).requires_grad_()
  nll = torch.nn.functional.cross_entropy(t.reshape(-1, t.shape[-1]),
                                          torch.from_numpy(labels).reshape(-1).long(),
                                          reduction="none").reshape(labels.shape)
  (nll * torch.from_numpy(cot.astype(np.float64))).sum().backward()
  return nll.detach().numpy(), t.grad.numpy()


@pytest.mark.parametrize("shape, vocab", [((3, 7), 11), ((2, 4, 5), 300), ((9,), 2)])
def test_values_and_gradients_match_torch_in_float32(shape, vocab):
  rng = np.random.default_rng(0)
  logits = (rng.standard_normal(shape + (vocab,)) * 4).astype(np.float32)
  labels = rng.integers(0, vocab, shape).astype(np.int32)
  cot = rng.standard_normal(shape).astype(np.float32)
  nll, vjp = jax.vjp(lambda x: token_nll(x, jnp.asarray(labels)), jnp.asarray(logits))
  (grad,) = vjp(jnp.asarray(cot))
  want_nll, want_grad = _torch_nll_and_grad(logits, labels, cot)
  assert nll.dtype == jnp.float32 and grad.dtype == jnp.float32
  assert rel_err(nll, want_nll) <= 1e-6
  assert rel_err(grad, want_grad) <= 1e-6


def test_bf16_logits_give_float32_losses_and_a_once_rounded_bf16_gradient():
  """As optax on the logits taken to float32: the same losses, and the float32 gradient
  rounded once to bf16 (optax's flows back through the cast)."""
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.standard_normal((4, 16, 500)) * 3, jnp.bfloat16)
  labels = jnp.asarray(rng.integers(0, 500, (4, 16)), jnp.int32)

  def theirs(x):
    return optax.softmax_cross_entropy_with_integer_labels(x.astype(jnp.float32), labels)

  ours_nll, ours_grad = jax.value_and_grad(lambda x: token_nll(x, labels).mean())(logits)
  want_nll, want_grad = jax.value_and_grad(lambda x: theirs(x).mean())(logits)
  assert ours_grad.dtype == jnp.bfloat16
  assert rel_err(ours_nll, want_nll) <= 1e-6
  diff = np.abs(np.asarray(ours_grad, np.float32) - np.asarray(want_grad, np.float32))
  ulp = np.abs(np.asarray(want_grad, np.float32)) * 2.0 ** -7 + 1e-30
  assert np.all(diff <= ulp)


def test_backward_keeps_the_logits_as_they_are_and_no_float32_copy():
  logits = jax.ShapeDtypeStruct((2, 64, 1000), jnp.bfloat16)
  labels = jax.ShapeDtypeStruct((2, 64), jnp.int32)
  kept = saved_residuals(lambda x, y: token_nll(x, y).sum(), logits, labels)
  big = [v for v, _ in kept if v.size >= 2 * 64 * 1000]
  assert [(v.shape, v.dtype) for v in big] == [((2, 64, 1000), jnp.bfloat16)]
  theirs = saved_residuals(
      lambda x, y: optax.softmax_cross_entropy_with_integer_labels(
          x.astype(jnp.float32), y).sum(), logits, labels)
  assert sum(map(nbytes, (v for v, _ in kept))) < sum(map(nbytes, (v for v, _ in theirs)))


def test_bad_inputs_are_refused():
  logits = jnp.zeros((2, 3, 5))
  with pytest.raises(ValueError, match="labels of shape"):
    token_nll(logits, jnp.zeros((2, 4), jnp.int32))
  with pytest.raises(TypeError, match="integers"):
    token_nll(logits, jnp.zeros((2, 3), jnp.float32))
