"""token_nll and head_nll: values and gradients against PyTorch's cross-entropy, bad inputs,
and what their backward passes keep."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from cvmm_cases import rel_err
from moeut_jax import head_nll, token_nll
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


def _torch_head_nll_and_grads(h, kernel, bias, labels, cot):
  """float64 PyTorch: cross-entropy of h @ kernel + bias; values and the gradients of
  sum(nll * cot) with respect to h, kernel and bias."""
  th, tk, tb = (torch.from_numpy(x.astype(np.float64)).requires_grad_()
                for x in (h, kernel, bias))
  logits = th @ tk + tb
  nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                          torch.from_numpy(labels).reshape(-1).long(),
                                          reduction="none").reshape(labels.shape)
  (nll * torch.from_numpy(cot.astype(np.float64))).sum().backward()
  return nll.detach().numpy(), (th.grad.numpy(), tk.grad.numpy(), tb.grad.numpy())


def _head_case(shape, d, vocab, seed=0, dtype=np.float32):
  rng = np.random.default_rng(seed)
  h = rng.standard_normal(shape + (d,)).astype(dtype)
  kernel = (rng.standard_normal((d, vocab)) * d ** -0.5 * 3).astype(dtype)
  bias = rng.standard_normal(vocab).astype(dtype)
  labels = rng.integers(0, vocab, shape).astype(np.int32)
  cot = rng.standard_normal(shape).astype(np.float32)
  return h, kernel, bias, labels, cot


@pytest.mark.parametrize("shape, vocab, n_blocks", [
    ((2, 12), 50, 1), ((2, 12), 50, 4), ((3, 13), 50, 5),    # 13 positions: padded to 15
    ((1, 7), 300, 7), ((2, 3, 9), 20, None)])
def test_head_nll_matches_torch_linear_and_cross_entropy_in_float32(shape, vocab, n_blocks):
  h, kernel, bias, labels, cot = _head_case(shape, 16, vocab)
  f = lambda h, k, b: head_nll(h, k, b, jnp.asarray(labels), n_blocks=n_blocks)
  nll, vjp = jax.vjp(f, *map(jnp.asarray, (h, kernel, bias)))
  grads = vjp(jnp.asarray(cot))
  want_nll, want_grads = _torch_head_nll_and_grads(h, kernel, bias, labels, cot)
  assert nll.shape == labels.shape and nll.dtype == jnp.float32
  assert rel_err(nll, want_nll) <= 1e-6
  for got, want in zip(grads, want_grads):
    assert got.dtype == jnp.float32 and got.shape == want.shape
    assert rel_err(got, want) <= 1e-5


def test_head_nll_in_bf16_is_as_close_to_float64_as_flax_dense_and_token_nll():
  """bf16 logits made as flax's Dense makes them: losses and gradients no further from
  float64 PyTorch (on the same bf16 inputs) than those of token_nll on Dense's logits
  (the matrices' gradients, summed over blocks in float32 and rounded once, are nearer). (XLA may keep excess precision in fused bf16 roundings, so the two do not
  match bit for bit.)"""
  import flax.linen as nn  # noqa: PLC0415
  h, kernel, bias, labels, cot = _head_case((4, 64), 32, 500, seed=3)
  hb, kb, bb = (jnp.asarray(x, jnp.bfloat16) for x in (h, kernel, bias))
  lab, g = jnp.asarray(labels), jnp.asarray(cot)
  dense = nn.Dense(500, dtype=jnp.bfloat16)

  def unblocked(h, k, b):
    return token_nll(dense.apply({"params": {"kernel": k, "bias": b}}, h), lab)

  def blocked(h, k, b):
    return head_nll(h, k, b, lab, n_blocks=4)

  want_nll, want = _torch_head_nll_and_grads(
      *(np.asarray(x, np.float32) for x in (hb, kb, bb)), labels, cot)
  errors = []
  for f in (unblocked, blocked):
    nll, vjp = jax.vjp(f, hb, kb, bb)
    grads = vjp(g)
    assert nll.dtype == jnp.float32 and all(x.dtype == jnp.bfloat16 for x in grads)
    errors.append([rel_err(nll, want_nll)] + [rel_err(x, w) for x, w in zip(grads, want)])
  print("relative errors (nll, dh, dkernel, dbias): Dense + token_nll", errors[0],
        "head_nll", errors[1])
  for ours, theirs in zip(*errors[::-1]):
    assert ours <= 2 ** -7                 # bf16's relative spacing
    assert ours <= theirs + 2 ** -10       # no further than Dense + token_nll


def test_head_nll_backward_keeps_no_vocabulary_sized_array():
  h = jax.ShapeDtypeStruct((2, 64, 32), jnp.bfloat16)
  kernel = jax.ShapeDtypeStruct((32, 1000), jnp.bfloat16)
  bias = jax.ShapeDtypeStruct((1000,), jnp.bfloat16)
  labels = jax.ShapeDtypeStruct((2, 64), jnp.int32)
  kept = saved_residuals(lambda h, k, b, y: head_nll(h, k, b, y, n_blocks=4).sum(),
                         h, kernel, bias, labels)
  assert all(v.size < 2 * 64 * 1000 // 4 or v.shape == (32, 1000) for v, _ in kept), kept
  assert ((2, 64, 32), jnp.bfloat16) in [(v.shape, v.dtype) for v, _ in kept]


def test_head_nll_refuses_bad_inputs():
  h, k, b = jnp.zeros((2, 3, 4)), jnp.zeros((4, 5)), jnp.zeros(5)
  with pytest.raises(ValueError, match="labels of shape"):
    head_nll(h, k, b, jnp.zeros((2, 4), jnp.int32))
  with pytest.raises(TypeError, match="integers"):
    head_nll(h, k, b, jnp.zeros((2, 3), jnp.float32))
  with pytest.raises(ValueError, match="do not fit"):
    head_nll(h, jnp.zeros((5, 5)), b, jnp.zeros((2, 3), jnp.int32))
  with pytest.raises(TypeError, match="dtype"):
    head_nll(h, k.astype(jnp.bfloat16), b, jnp.zeros((2, 3), jnp.int32))
  with pytest.raises(ValueError, match="bias"):
    head_nll(h, k, jnp.zeros(6), jnp.zeros((2, 3), jnp.int32))
  with pytest.raises(ValueError, match="n_blocks"):
    head_nll(h, k, b, jnp.zeros((2, 3), jnp.int32), n_blocks=0)
