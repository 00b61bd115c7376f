"""The model's own contract: sizes, errors, precision, caches and generation."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from moeut_jax import profiles
import torch_reference as ref
from cvmm_cases import rel_err
from moeut_jax import AttentionMask, MoEUT, MoEUTLM, generate, token_nll

SMALL = dict(d_model=32, n_layers=4, n_heads=2, ff_n_experts=8, att_n_experts=4, d_head=16,
             group_size=2, ff_k=3, att_k=2, ff_expert_size=16)
V = 40


def n_params(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


@functools.partial(jax.jit, static_argnums=0, static_argnames="train")
def apply(model, variables, toks, mask=None, train=False, rngs=None):
  """model.apply compiled once per model, shapes and mode (an eager call compiles the
  layer-group scan again each time). Eager calls are kept where eager behaviour is what
  a test checks (errors raised from concrete values)."""
  return model.apply(variables, toks, mask, train=train, rngs=rngs)


@pytest.fixture(scope="module")
def small():
  model = MoEUTLM(V, **SMALL)
  toks = jnp.asarray(np.random.default_rng(0).integers(0, V, (2, 10)), jnp.int32)
  return model, jax.jit(model.init)(jax.random.PRNGKey(0), toks), toks


@pytest.mark.parametrize("name", profiles.PAPER_PROFILES)
def test_profile_parameter_counts_match_the_reference(name):
  shapes = jax.eval_shape(MoEUTLM(8000, **profiles.get(name)).init, jax.random.PRNGKey(0),
                          jnp.zeros((1, 4), jnp.int32))
  with torch.device("meta"):
    want = sum(p.numel() for p in ref.MoEUTLM(8000, **profiles.get(name)).parameters())
  assert n_params(shapes) == want


def test_published_counts():
  count = lambda n: n_params(jax.eval_shape(MoEUTLM(8000, **profiles.get(n)).init,
                                            jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32)))
  assert count("MoEUT_244M") == 243_326_784
  assert count("MoEUT_1B") == 1_040_319_296


def test_parameters_stored_once_per_distinct_layer():
  model = MoEUTLM(V, **dict(SMALL, n_layers=8))                     # R = 4 repeats of G = 2
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
  assert sorted(params["params"]["transformer"]["layers"]) == ["layer_0", "layer_1"]
  shallow = jax.eval_shape(MoEUTLM(V, **SMALL).init, jax.random.PRNGKey(0),
                           jnp.zeros((1, 4), jnp.int32))
  assert n_params(params) == n_params(shallow)


def test_moeut_44m_with_odd_rotary_width_runs():
  model = MoEUTLM(100, **profiles.MoEUT_44M)
  toks = jnp.arange(6, dtype=jnp.int32)[None]
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), toks)
  out = apply(model, variables, toks)
  assert out.outputs.shape == (1, 6, 100)
  assert bool(jnp.all(jnp.isfinite(out.outputs)))


@pytest.mark.parametrize("kwargs, message", [
    (dict(SMALL, n_layers=5), "n_layers=5 must be divisible by group_size=2"),
    (dict(SMALL, d_model=30, n_heads=4, d_head=None), "d_model=30 is not divisible by n_heads=4"),
    (dict(SMALL, ff_k=9), "ff_k=9 cannot exceed ff_n_experts=8"),
    (dict(SMALL, att_k=5), "att_k=5 cannot exceed att_n_experts=4"),
    (dict(SMALL, dropout=1.5), "dropout=1.5 must be in"),
    (dict(SMALL, scan_unroll=0), "scan_unroll=0 must be None or a positive integer"),
    (dict(SMALL, rope_table_dtype="int8"), "rope_table_dtype='int8' must be one of"),
])
def test_bad_configs_raise_clear_errors(kwargs, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    MoEUTLM(V, **kwargs)


def test_cvmm_config_reaches_every_cvmm_call(monkeypatch):
  """The model's CvmmConfig is passed to the σ-MoE pair and to SwitchHead's V and O
  calls (on the CPU they sum in float32 whatever it says, so the calls are recorded while
  tracing); anything but a CvmmConfig is refused."""
  from kernels import CvmmConfig
  from moeut_jax import attention, sigma_moe
  seen = []

  def spy(fn):
    def wrapped(*args, **kwargs):
      seen.append((fn.__name__, kwargs.get("config")))
      return fn(*args, **kwargs)
    return wrapped

  monkeypatch.setattr(sigma_moe, "cvmm_pair", spy(sigma_moe.cvmm_pair))
  monkeypatch.setattr(attention, "cvmm", spy(attention.cvmm))
  toks = jnp.arange(6, dtype=jnp.int32)[None]
  for config in (CvmmConfig(), CvmmConfig(impl="xla", sum_dtype="bfloat16")):
    seen.clear()
    model = MoEUTLM(V, **dict(SMALL, cvmm=config))
    jax.eval_shape(model.apply, jax.eval_shape(model.init, jax.random.PRNGKey(0), toks), toks)
    assert {name for name, _ in seen} == {"cvmm_pair", "cvmm"}
    assert all(got == config for _, got in seen), seen
  with pytest.raises(TypeError, match="cvmm must be a kernels.CvmmConfig"):
    MoEUTLM(V, **dict(SMALL, cvmm="xla"))


def test_bad_inputs_raise_clear_errors(small):
  model, variables, toks = small
  with pytest.raises(ValueError, match=r"token ids must be in \[0, n_tokens=40\), got min 0 "
                                       r"and max 40"):
    model.apply(variables, toks.at[0, 0].set(V))
  with pytest.raises(ValueError, match="token ids must be in"):
    model.apply(variables, toks.at[0, 0].set(-1))
  with pytest.raises(ValueError, match=r"position_mask must be \[T, T\] or \[T, S\]"):
    model.apply(variables, toks, AttentionMask(None, jnp.zeros((3, 3), bool)))
  with pytest.raises(ValueError, match=r"src_length_mask must be \[B, S\] = \(2, 10\)"):
    model.apply(variables, toks, AttentionMask(jnp.zeros((2, 7), bool), None))
  with pytest.raises(TypeError, match="kv_cache must be None, {}"):
    model.apply(variables, toks, kv_cache={"0": 1})
  with pytest.raises(ValueError, match=r"x must be \[B, T, d_model=32\]"):
    MoEUT(**SMALL).init(jax.random.PRNGKey(0), jnp.zeros((2, 3, 31)))


def test_labels_give_the_losses_and_gradients_of_the_logits(small):
  """MoEUTLM(..., labels=...) (the head inside the loss, blocked) against the logits'
  token_nll, float32: the same losses, and the same gradients of every parameter."""
  model, variables, toks = small
  labels = jnp.roll(toks, -1, axis=1)
  g = jnp.asarray(np.random.default_rng(5).standard_normal(toks.shape), jnp.float32)
  rngs = {"dropout": jax.random.PRNGKey(2)}

  def through_logits(params):
    out = model.apply({"params": params}, toks, train=True, rngs=rngs)
    nll = token_nll(out.outputs, labels)
    return jnp.sum(nll * g) + out.reg_loss, nll

  def with_labels(params):
    out = model.apply({"params": params}, toks, train=True, rngs=rngs, labels=labels)
    return jnp.sum(out.outputs * g) + out.reg_loss, out.outputs

  (_, want), want_grads = jax.jit(jax.value_and_grad(through_logits, has_aux=True))(
      variables["params"])
  (_, got), grads = jax.jit(jax.value_and_grad(with_labels, has_aux=True))(
      variables["params"])
  assert got.shape == toks.shape and got.dtype == jnp.float32
  assert rel_err(got, want) <= 1e-6
  for path, want_leaf in jax.tree_util.tree_leaves_with_path(want_grads):
    got_leaf = functools.reduce(lambda t, k: t[k.key], path, grads)
    assert rel_err(got_leaf, want_leaf) <= 1e-5, jax.tree_util.keystr(path)
  with pytest.raises(ValueError, match="labels must be in"):
    model.apply(variables, toks, labels=labels.at[0, 0].set(V))
  with pytest.raises(ValueError, match="must have the tokens' shape"):
    model.apply(variables, toks, labels=labels[:, 1:])


def test_fixed_cache_overflow(small):
  model, variables, toks = small
  cache = model.init_cache(2, 12)
  out = model.apply(variables, toks, kv_cache=cache)                # 10 of 12 positions
  with pytest.raises(ValueError, match="KV cache overflow: 10 cached \\+ 3 new positions "
                                       "exceed its capacity 12"):
    model.apply(variables, toks[:, :3], kv_cache=out.cache)
  # Under jit the length is not known while tracing: the overflowing output is NaN, loudly.
  step = jax.jit(lambda c, x: model.apply(variables, x, kv_cache=c).outputs)
  assert bool(jnp.all(jnp.isnan(step(out.cache, toks[:, :3]))))
  assert bool(jnp.all(jnp.isfinite(step(out.cache, toks[:, :2]))))


def test_bf16_compute_with_float32_params(small):
  model, variables, toks = small
  fast = MoEUTLM(V, **SMALL, dtype=jnp.bfloat16)
  out32 = apply(model, variables, toks, train=True)

  def mean_output(params):
    out = fast.apply({"params": params}, toks, train=True)
    return out.outputs.astype(jnp.float32).mean(), out
  (_, out16), grads = jax.jit(jax.value_and_grad(mean_output, has_aux=True))(
      variables["params"])                                 # the outputs and their gradient
  assert out16.outputs.dtype == jnp.bfloat16
  assert out16.reg_loss.dtype == jnp.float32
  err = jnp.linalg.norm(out16.outputs.astype(jnp.float32) - out32.outputs) / jnp.linalg.norm(
      out32.outputs)
  assert float(err) < 2e-2
  leaves = jax.tree_util.tree_leaves(grads)
  assert all(g.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(g))) for g in leaves)


def _loss_and_grads(model, params, toks):
  """(loss, outputs), grads of outputs.mean() + reg_loss in training mode, compiled.

  True float32 products: on GPUs XLA's default precision is TF32, and graphs that fuse
  differently would round differently."""
  def run(p):
    out = model.apply({"params": p}, toks, train=True)
    return out.outputs.mean() + out.reg_loss, out
  with jax.default_matmul_precision("highest"):
    return jax.jit(jax.value_and_grad(run, has_aux=True))(params)


@pytest.fixture(scope="module")
def scanned(small):
  """The scanned loop's (scan_unroll=1) loss, outputs and gradients, for both unrolls."""
  _, variables, toks = small
  return _loss_and_grads(MoEUTLM(V, **SMALL, scan_unroll=1), variables["params"], toks)


@pytest.mark.parametrize("unroll", [2, 5])
def test_scan_unroll_changes_nothing_but_the_loop(small, scanned, unroll):
  """scan_unroll=2 (the whole scan: R = 2) and 5 (clamped to R): the same parameters,
  outputs, regulariser and gradients as the scanned loop."""
  model, variables, toks = small
  assert model.effective_scan_unroll() == (2 if jax.default_backend() == "gpu" else 1)
  unrolled = MoEUTLM(V, **SMALL, scan_unroll=unroll)
  assert unrolled.effective_scan_unroll() == 2
  assert jax.tree_util.tree_structure(
      jax.eval_shape(unrolled.init, jax.random.PRNGKey(0), toks)) == \
      jax.tree_util.tree_structure(variables)

  (l1, o1), g1 = scanned
  (l2, o2), g2 = _loss_and_grads(unrolled, variables["params"], toks)
  np.testing.assert_allclose(o2.outputs, o1.outputs, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(o2.reg_loss, o1.reg_loss, rtol=1e-5)
  # Per leaf, relative to its norm: on GPUs the CVMM kernels sum over experts with float32
  # atomics in a varying order, so single small elements differ at the 1e-7 level.
  for a, b in zip(jax.tree_util.tree_leaves(g2), jax.tree_util.tree_leaves(g1)):
    assert rel_err(a, b) <= 1e-5


def test_dropout_is_active_only_in_training(small):
  _, variables, toks = small
  model = MoEUTLM(V, **dict(SMALL, dropout=0.5, ff_expert_dropout=0.3, att_expert_dropout=0.3))
  e1 = apply(model, variables, toks).outputs
  e2 = apply(model, variables, toks).outputs
  assert bool(jnp.array_equal(e1, e2))
  t1 = apply(model, variables, toks, train=True, rngs={"dropout": jax.random.PRNGKey(1)}).outputs
  t2 = apply(model, variables, toks, train=True, rngs={"dropout": jax.random.PRNGKey(2)}).outputs
  assert not bool(jnp.allclose(t1, t2))
  assert not bool(jnp.allclose(t1, e1))


def test_fully_masked_rows_give_zeros_not_nan(small):
  model, variables, toks = small
  blocked = jnp.zeros((2, 10), bool).at[1].set(True)              # every key of row 1
  out = apply(model, variables, toks, AttentionMask(blocked, None))
  assert bool(jnp.all(jnp.isfinite(out.outputs)))


def test_generate_greedy_agrees_with_full_forward(small):
  model, variables, toks = small
  seq = generate(model, variables, toks[:, :4], 6)
  assert seq.shape == (2, 10) and bool(jnp.array_equal(seq[:, :4], toks[:, :4]))
  logits = apply(model, variables, seq).outputs
  assert bool(jnp.array_equal(jnp.argmax(logits[:, 3:-1], -1), seq[:, 4:]))


def test_generate_top_k_sampling(small):
  model, variables, toks = small
  seq = generate(model, variables, toks[:, :4], 5, temperature=1.0, top_k=2,
                 rng=jax.random.PRNGKey(0))
  logits = apply(model, variables, seq).outputs[:, 3:-1]           # [B, 5, V]
  top2 = jax.lax.top_k(logits, 2)[1]
  assert bool(jnp.all(jnp.any(top2 == seq[:, 4:, None], axis=-1)))
  with pytest.raises(ValueError, match="needs rng"):
    generate(model, variables, toks[:, :4], 3, temperature=0.7)
  with pytest.raises(ValueError, match="prompt token ids must be in"):
    generate(model, variables, toks[:, :4] + V, 3)


def test_tokens_captured_as_constants_under_jit(small):
  model, variables, toks = small
  out = jax.jit(lambda p: model.apply({"params": p}, toks).outputs)(variables["params"])
  assert bool(jnp.allclose(out, model.apply(variables, toks).outputs, atol=1e-5))


def test_kv_cache_from_torch_rejects_bad_caches():
  from moeut_jax.convert import ConversionError, kv_cache_from_torch
  kv = {"k": np.zeros((1, 2, 3, 4), np.float32), "v": np.zeros((1, 2, 3, 4), np.float32)}
  with pytest.raises(ConversionError, match=r"cache\[1\]: missing 'v'"):
    kv_cache_from_torch({0: kv, 1: {"k": kv["k"]}}, 2)
  with pytest.raises(ConversionError, match="not 0..n_layers-1"):
    kv_cache_from_torch({0: kv, 1: kv, 2: kv}, 2)
  with pytest.raises(ConversionError, match=r"cache\[1\]: k \(1, 2, 5, 4\)"):
    kv_cache_from_torch({0: kv, 1: {"k": np.zeros((1, 2, 5, 4)), "v": kv["v"]}}, 2)
  cache = kv_cache_from_torch({0: kv, 1: kv}, 2)
  assert cache.k[0].shape == (1, 1, 3, 2, 4) and int(cache.length) == 3
