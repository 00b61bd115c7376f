"""The official MoEUT's CVMM kernels through the binding (kernels/cvmm_original.py) in
Triton's interpreter: forward and every gradient against the original's own PyTorch op
(its kernels also in the interpreter) and against the reference CVMM, and a model whose
every CVMM runs them against the same model on the pure-JAX kernels."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import original_cvmm
from cvmm_cases import TOL, inputs, outputs, rel_err
from kernels import CvmmConfig, cvmm
from kernels.cvmm_reference import cvmm_reference

# (name, N, K, M, E, I, O, routing kind): M = 1 (σ-MoE up, SwitchHead V), M = K (σ-MoE
# down: no out_index), M a divisor (SwitchHead O); sizes that are not block multiples,
# experts without pairs, one expert, every pair on one expert.
CASES = [
    ("up", 23, 4, 1, 5, 40, 24, "random"),
    ("down", 19, 4, 4, 5, 24, 40, "random"),
    ("heads", 21, 4, 2, 3, 40, 24, "random"),
    ("odd_sizes", 37, 3, 1, 7, 17, 13, "random"),
    ("empty_experts", 6, 2, 1, 40, 16, 16, "random"),
    ("one_expert", 15, 2, 2, 1, 16, 16, "random"),
    ("all_one_expert", 33, 3, 1, 7, 16, 24, "one"),
]


@pytest.fixture(scope="module")
def config():
  return CvmmConfig(impl="original", original_path=original_cvmm.required())


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_original_kernels_match_reference(config, case, gated):
  x, w, g, r, ct = inputs(case, jnp.float32, gated)
  got = outputs(lambda x, r, w, g: cvmm(x, r, w, g, config=config), x, w, g, r, ct)
  want = outputs(cvmm_reference, x, w, g, r, ct)
  for name, a, b in zip(["out", "dx", "dw", "dgates"], got, want):
    assert a.shape == b.shape and a.dtype == b.dtype, (name, a.shape, a.dtype)
    assert rel_err(a, b) <= TOL[jnp.float32], (case[0], name, rel_err(a, b))


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("case", CASES[:4], ids=[c[0] for c in CASES[:4]])
def test_binding_equals_the_original_op(config, case, gated):
  """float32, the same sorted routing and tile configuration on both sides: what one
  kernel launch computes is the same bits (the per-pair rows, dx without a sum over
  slots, the weight gradient: the interpreter adds in a fixed order); the sums outside
  the kernels (PyTorch's matmuls, XLA's einsums) within float32 rounding."""
  moeut = original_cvmm.load(config)
  x, w, g, r, ct = inputs(case, jnp.float32, gated)
  with original_cvmm.one_tile_configuration(moeut):
    want = original_cvmm.original_op(moeut, x, w, g, r, ct, jnp.float32)
  got = original_cvmm.binding(config, x, w, g, r, ct)
  k, m = case[2], case[3]
  for name, a, b in zip(["out", "dx", "dw", "dgates"], got, want):
    a = np.asarray(a)
    assert a.shape == b.shape and a.dtype == b.dtype, (name, a.shape, b.shape)
    if name == "dw" or not gated and (name == "out" or k == m):
      assert np.array_equal(a, b), (case[0], name, rel_err(a, b))
    else:
      assert rel_err(a, b) <= TOL[jnp.float32], (case[0], name, rel_err(a, b))


def test_float16_inputs_with_float32_weights_and_gates(config):
  """As the model calls it under 16-bit compute: x in float16, the float32 parameters
  rounded in the kernels, their gradient in float32; gates and their gradient float32."""
  x, w, g, r, ct = inputs(("heads", 21, 4, 2, 3, 40, 24, "random"), jnp.float32, True)
  x16 = x.astype(jnp.float16)
  got = outputs(lambda x, r, w, g: cvmm(x, r, w, g, config=config), x16, w, g, r, ct)
  assert [a.dtype for a in got] == [jnp.float16, jnp.float16, jnp.float32, jnp.float32]
  want = outputs(cvmm_reference, x16.astype(jnp.float32),
                 w.astype(jnp.float16).astype(jnp.float32), g, r, ct)
  for name, a, b in zip(["out", "dx", "dw", "dgates"], got, want):
    assert rel_err(a, b) <= TOL[jnp.float16], (name, rel_err(a, b))


def test_model_with_the_original_kernels_matches_pure_jax(config):
  """A small MoEUTLM in float32: logits, reg_loss and every gradient with all its CVMMs
  (σ-MoE up and down, SwitchHead V and O) on the original's kernels, against XLA's."""
  from moeut_jax import MoEUTLM
  cfg = dict(d_model=32, n_layers=2, n_heads=2, ff_n_experts=6, att_n_experts=3, d_head=16,
             ff_k=2, att_k=2, ff_expert_size=16)
  toks = jnp.asarray(np.random.default_rng(0).integers(0, 40, (2, 9)), jnp.int32)
  variables = MoEUTLM(40, **cfg).init(jax.random.key(0), toks[:, :-1])

  def run(cvmm_config):
    model = MoEUTLM(40, **cfg, cvmm=cvmm_config)

    def loss(params):
      out = model.apply({"params": params}, toks[:, :-1], train=True)
      logp = jax.nn.log_softmax(out.outputs, axis=-1)
      ce = -jnp.mean(jnp.take_along_axis(logp, toks[:, 1:, None], -1))
      return ce + out.reg_loss, out.outputs
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])

  (l_got, logits_got), g_got = run(config)
  (l_want, logits_want), g_want = run(CvmmConfig(impl="xla"))
  assert rel_err(logits_got, logits_want) <= TOL[jnp.float32]
  assert rel_err(l_got, l_want) <= TOL[jnp.float32]
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_got),
                          jax.tree_util.tree_leaves(g_want)):
    assert rel_err(a, b) <= 10 * TOL[jnp.float32], (jax.tree_util.keystr(path), rel_err(a, b))


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("case", CASES[:3], ids=[c[0] for c in CASES[:3]])
def test_cpu_standin_equals_the_original_op(config, case, gated):
  """The side-by-side tool's plain-PyTorch stand-in for the original's CVMM op (its CPU
  runs) against the op itself: output and gradients within float32 rounding."""
  import torch
  from moeut_jax.side_by_side.original import cvmm_standin
  moeut = original_cvmm.load(config)
  x, w, g, r, ct = inputs(case, jnp.float32, gated)
  with original_cvmm.one_tile_configuration(moeut):
    want = original_cvmm.original_op(moeut, x, w, g, r, ct, jnp.float32)
  from kernels.cvmm_original import original_sel
  n, m, _ = x.shape
  sel, index, out_index = original_sel(r, m)
  t = original_cvmm.to_torch
  xt, wt = t(x).requires_grad_(), t(w).requires_grad_()
  gt = None if g is None else t(g).requires_grad_()
  choice = moeut.cvmm.CVMMSel(None, t(sel).reshape(n, r.k), t(index).long(),
                              None if out_index is None else t(out_index).long(), gt)
  out = cvmm_standin(moeut)(xt, choice, wt)
  grads = torch.autograd.grad(out, [xt, wt] + ([gt] if gated else []), t(ct))
  for name, a, b in zip(["out", "dx", "dw", "dgates"], (out,) + grads, want):
    a = original_cvmm.to_numpy(a)
    assert a.shape == b.shape, (name, a.shape, b.shape)
    assert rel_err(a, b) <= TOL[jnp.float32], (case[0], name, rel_err(a, b))
