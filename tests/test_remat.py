"""Rematerialisation of the layer group (moeut_jax/remat.py): same numbers, other residuals."""
import json
import math
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moeut_jax import MoEUT, MoEUTLM
from kernels import CvmmConfig
from moeut_jax.remat import (ATTENTION_ROUTER_LOGITS, ELEMENTWISE_PRIMITIVES, MOE_ROUTER_LOGITS,
                             NAMES, REMAT_POLICIES, SAVED_NAMES, SWITCHHEAD_CVMM, WEIGHTS,
                             checkpoint_policy, layer_group_residuals, nbytes)
from moeut_jax.training import Config
from moeut_jax.training.step import build_model

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402  pylint: disable=wrong-import-position

# R = 2 repeats of a one-layer group; every dropout on, so that the recomputed forward
# pass must draw the same masks as the first one.
TINY = dict(d_model=16, n_layers=2, n_heads=2, ff_n_experts=4, att_n_experts=3, d_head=8,
            group_size=1, ff_k=2, att_k=2, ff_expert_size=8, dropout=0.1,
            ff_expert_dropout=0.2, att_expert_dropout=0.2)
V = 40


@pytest.fixture(scope="module")
def setup():
  toks = jnp.asarray(np.random.default_rng(0).integers(0, V, (2, 7)), jnp.int32)
  params = jax.jit(MoEUTLM(V, **TINY).init)(jax.random.PRNGKey(0), toks)["params"]
  return toks, params, {}


def _loss(model, toks):
  def loss(params):
    out = model.apply({"params": params}, toks, train=True,
                      rngs={"dropout": jax.random.PRNGKey(3)})
    return out.outputs.mean() + out.reg_loss
  return loss


def _value_and_grad(remat, unroll, setup):
  toks, params, cache = setup
  if (remat, unroll) not in cache:
    model = MoEUTLM(V, **TINY, remat=remat, scan_unroll=unroll)
    with jax.default_matmul_precision("highest"):
      cache[remat, unroll] = jax.jit(jax.value_and_grad(_loss(model, toks)))(params)
  return cache[remat, unroll]


def _equations(jaxpr):
  """Every equation of a jaxpr, those of nested jaxprs (scan and remat bodies) included."""
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        sub = getattr(sub, "jaxpr", sub)                     # ClosedJaxpr -> Jaxpr
        if hasattr(sub, "eqns"):
          yield from _equations(sub)


def _checkpoints(jaxpr):
  """The params of every checkpoint (remat) equation."""
  return [e.params for e in _equations(jaxpr)
          if "policy" in e.params and "prevent_cse" in e.params]


@pytest.mark.parametrize("unroll", [1, 2], ids=["scanned", "unrolled"])
@pytest.mark.parametrize("remat", ["elementwise", "lean", "save_projections", "full"])
def test_remat_gives_the_same_loss_and_gradients(remat, unroll, setup):
  loss0, grads0 = _value_and_grad("none", unroll, setup)
  loss, grads = _value_and_grad(remat, unroll, setup)
  np.testing.assert_allclose(loss, loss0, rtol=1e-6)
  assert jax.tree.structure(grads) == jax.tree.structure(grads0)
  for (path, g), g0 in zip(jax.tree_util.tree_leaves_with_path(grads),
                          jax.tree.leaves(grads0)):
    # float32: the recomputed forward pass is the same computation, so the gradients
    # agree to rounding (relative to each leaf's norm)
    err = float(jnp.linalg.norm(g - g0) / jnp.maximum(jnp.linalg.norm(g0), 1e-30))
    assert err <= 1e-6, (jax.tree_util.keystr(path), err)


@pytest.mark.parametrize("unroll", [1, 2], ids=["scanned", "unrolled"])
@pytest.mark.parametrize("remat", REMAT_POLICIES)
def test_remat_wraps_the_layer_group_with_its_policy(remat, unroll, setup):
  toks, params, _ = setup
  model = MoEUTLM(V, **TINY, remat=remat, scan_unroll=unroll)
  # (policy None: the checkpoint of the σ-MoE pair's two CVMMs that keep no middle)
  found = [c for c in _checkpoints(jax.make_jaxpr(_loss(model, toks))(params).jaxpr)
           if c["policy"] is not None]
  if remat == "none":
    assert not found
    return
  # One checkpoint per scanned group body (the scan traces its body once, unrolled or not)
  assert len(found) == 1
  assert found[0]["policy"] == checkpoint_policy(remat)
  # Unrolled repeats are straight-line code: barriers keep XLA from merging the
  # recomputation back into the forward pass; a rolled loop needs none.
  assert found[0]["prevent_cse"] == (unroll > 1)


def test_every_name_is_in_the_model(setup):
  toks, params, _ = setup
  model = MoEUTLM(V, **TINY, remat="save_projections")
  jaxpr = jax.make_jaxpr(_loss(model, toks))(params).jaxpr
  names = {e.params["name"] for e in _equations(jaxpr) if e.primitive.name == "name"}
  assert names == set(NAMES) and set(SAVED_NAMES) < names


# Two layers per group; d_model unlike any other width of the layer (H*Dh, k*Es, ...), so
# that [N, D] values are told apart by their shape.
GROUP = dict(TINY, d_model=24, n_layers=4, group_size=2)


def _stream_copies(remat, dtype):
  """The [N, D] values (N = B*T tokens) that one application of the layer group keeps for
  its backward pass: (dtype name, origin) each."""
  b, t, d = 2, 7, GROUP["d_model"]
  stack = MoEUT(**GROUP, dtype=dtype, cvmm=CvmmConfig(impl="xla"))
  return [(str(v.dtype), origin) for v, origin in layer_group_residuals(stack, remat, b, t)
          if v.ndim >= 2 and v.shape[-1] == d and math.prod(v.shape[:-1]) == b * t]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_elementwise_keeps_the_group_input_and_the_branch_outputs_of_the_residual_stream(dtype):
  """Every [N, D] value of the layer except the products is elementwise (the sums, the
  LayerNorms, the casts): "elementwise" keeps the group's input (float32) and the outputs
  of the branches that the next sums read: each layer's attention output projection
  (SwitchHead's O CVMM) and the σ-MoE output of every layer but the last. "none" keeps
  the sums as well, but no cast of the stream and in bf16 no LayerNorm output: the
  backward passes make those again from the sums (moeut_jax/recompute.py)."""
  g = GROUP["group_size"]
  kept = _stream_copies("elementwise", dtype)
  assert [o for _, o in kept if o.startswith("from the argument")] == ["from the argument x"]
  assert sum(f"'{SWITCHHEAD_CVMM}'" in o for _, o in kept) == g
  # the σ-MoE's CVMM pair, called through recompute_input
  assert sum("kernels/" in o or "recompute.py" in o for _, o in kept) == g - 1
  assert len(kept) == 1 + g + (g - 1), kept
  none = _stream_copies("none", dtype)
  sums = [o for _, o in none if "output of add" in o and "layer.py" in o]
  assert len(sums) >= 2 * g - 1, none                     # every sum but the group's output
  assert len(none) > len(kept) + g, none
  assert not [o for _, o in none if "convert_element_type" in o], none
  if dtype == jnp.bfloat16:   # (float32 routers are one float32 product that keeps its input)
    assert not [o for _, o in none if "layernorm.py" in o], none


def test_elementwise_keeps_nothing_an_elementwise_operation_makes():
  stack = MoEUT(**GROUP, dtype=jnp.bfloat16, cvmm=CvmmConfig(impl="xla"))
  made = re.compile(r"^output of (\w+) ")
  # (outside the group: layer_group_residuals's dropout key)
  prims = lambda remat: {m.group(1) for _, o in layer_group_residuals(stack, remat, 2, 7)  # noqa: E731
                         if (m := made.match(o)) and "remat.py" not in o}
  assert prims("elementwise") & ELEMENTWISE_PRIMITIVES == set()
  # ...which "none" keeps, and the bytes drop with them
  assert {"add", "convert_element_type", "mul"} <= prims("none")
  total = lambda remat, b: sum(nbytes(v) for v, _ in layer_group_residuals(stack, remat, b, 7))  # noqa: E731
  size = lambda remat: total(remat, 2) - total(remat, 1)  # noqa: E731  (per sequence)
  assert size("full") < size("save_projections") < size("elementwise") < size("none")


def test_lean_keeps_neither_the_experts_middle_nor_q_and_k_nor_switchhead_router_logits():
  """"lean" is "elementwise" with the σ-MoE's [N, k, expert size] middle, the q|k
  product, q and k after RoPE and SwitchHead's router logits made again in the backward
  pass: none of them is kept, the σ-MoE router's float32 logits are, and it keeps less
  than "elementwise"."""
  es = 12                                          # unlike every other width of the layer
  stack = MoEUT(**dict(GROUP, ff_expert_size=es), dtype=jnp.bfloat16,
                cvmm=CvmmConfig(impl="xla"))
  b, t = 2, 7
  rows = {r: layer_group_residuals(stack, r, b, t) for r in ("elementwise", "lean")}
  # the σ-MoE's middle (rows of width Es in the xla path's tiled layout) and what its
  # CVMMs keep of the weights per tile
  middle = lambda remat: [(v, o) for v, o in rows[remat]  # noqa: E731
                          if v.shape[-1] == es and "argument" not in o
                          and f"'{WEIGHTS}'" not in o]
  assert middle("elementwise") and not middle("lean"), middle("lean")
  named_qk = lambda remat: [o for _, o in rows[remat] if "'moeut_attention_qk'" in o]  # noqa: E731
  assert named_qk("elementwise") and not named_qk("lean"), named_qk("lean")

  # float32 [B, T, width] values that are no argument and no routing, by their name
  def logits(remat, width, name):
    return [o for v, o in rows[remat]
            if f"'{name}'" in o
            or (v.dtype == jnp.float32 and v.shape[:2] == (b, t)
                and math.prod(v.shape[2:]) == width
                and "argument" not in o and "'moeut_routing'" not in o)]
  # SwitchHead's [B, T, H * Ea] (and their split into V's and O's): made again
  att = GROUP["n_heads"] * GROUP["att_n_experts"]
  assert logits("elementwise", att, ATTENTION_ROUTER_LOGITS)
  assert not logits("lean", att, ATTENTION_ROUTER_LOGITS), logits("lean", att,
                                                                  ATTENTION_ROUTER_LOGITS)
  # σ-MoE's [B, T, Ef]: kept, once per layer
  moe = lambda remat: logits(remat, GROUP["ff_n_experts"], MOE_ROUTER_LOGITS)  # noqa: E731
  assert len(moe("lean")) == len(moe("elementwise")) == GROUP["group_size"], moe("lean")
  assert all(f"'{MOE_ROUTER_LOGITS}'" in o for o in moe("lean"))
  # no other product of XLA's is kept
  assert not [o for _, o in rows["lean"] if "output of dot_general" in o]
  assert (sum(nbytes(v) for v, _ in rows["lean"])
          < sum(nbytes(v) for v, _ in rows["elementwise"]))


@pytest.mark.parametrize("cls,args", [(MoEUTLM, (V,)), (MoEUT, ())])
def test_bad_remat_name_is_refused(cls, args):
  with pytest.raises(ValueError, match=r"remat='selective' must be one of \('none', "
                                       r"'elementwise', 'lean', 'save_projections', 'full'\)"):
    cls(*args, **TINY, remat="selective")
  with pytest.raises(ValueError, match="remat=None must be one of"):
    cls(*args, **TINY, remat=None)


def test_train_flag_reaches_the_model_and_round_trips_through_the_saved_config(tmp_path):
  parse = lambda *a: train.config_from_args(  # noqa: E731
      train.make_parser().parse_args([*a, "--workdir", str(tmp_path)]))
  assert parse().remat == "auto"                                  # the documented default
  assert build_model(parse(), V).remat == parse().remat_policy()   # none here, on a CPU
  config = parse("--remat", "full")
  assert config.model_kwargs()["remat"] == "full"
  assert build_model(config, V).remat == "full"
  assert Config.from_dict(json.loads(config.to_json())) == config
  with pytest.raises(SystemExit):                                # argparse's choices
    train.make_parser().parse_args(["--remat", "selective"])
  with pytest.raises(ValueError, match="remat='selective'; choose one of"):
    Config(remat="selective")
  # A run resumes with its saved setting unless the flag is given again; a config saved
  # before the setting existed reads as the default, "auto".
  (tmp_path / "checkpoints").mkdir()
  (tmp_path / "config.json").write_text(config.to_json())
  assert parse().remat == "full"
  assert parse("--remat", "save_projections").remat == "save_projections"
  old = config.to_dict()
  del old["remat"]
  (tmp_path / "config.json").write_text(json.dumps(old))
  assert parse().remat == "auto"
