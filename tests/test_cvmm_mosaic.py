"""The Pallas Mosaic GPU kernels on a CPU host (kernels/cvmm_mosaic/): their slot maps
against plain definitions, their lowering to CUDA (jax's Python side of Mosaic GPU:
layout inference and lowering to NVVM, arch sm90), and forward and every gradient in
Pallas's Mosaic GPU interpreter against the reference (jax >= 0.11, whose interpreter
fills out-of-bounds TMA reads with zeros). On GPUs: tests/test_cvmm_gpu.py."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvmm_cases import inputs as _inputs, outputs as _outputs, rel_err as _rel
from cvmm_cases import producers_only, routing_of_kind as _routing
import mosaic_interpret

pytest.importorskip("jax.experimental.pallas.mosaic_gpu")

# (name, N, K, M, E, I, O, routing kind): small enough for the interpreter
CASES = [
    ("gated_m1", 40, 4, 1, 5, 64, 72, "random"),
    ("plain_m_eq_k", 40, 4, 4, 5, 64, 72, "random"),
    ("gated_m_divisor", 40, 4, 2, 5, 64, 72, "random"),
    ("k1_empty_experts", 24, 1, 1, 40, 64, 64, "random"),
    ("odd_sizes_one_expert", 30, 2, 1, 3, 100, 36, "one"),
]


def test_slot_maps():
  """Slot pairs cover every pair once, in tile order; rows follow the row map; padding
  slots read row N * R (out of bounds) and gate 0; used tiles come first."""
  from kernels.cvmm_mosaic import slots  # noqa: PLC0415
  n, k, e, t = 37, 3, 11, 16
  r = _routing("random", n, k, e, jax.random.key(3))
  tiles = r.ordered_tiles(t, "token")
  pairs = np.asarray(slots.slot_pairs(r, tiles, t))
  got = np.sort(pairs[pairs >= 0])
  np.testing.assert_array_equal(got, np.arange(n * k))
  tz = np.asarray(tiles)
  order = np.asarray(r.order)
  for z in range(tz.shape[1]):
    _, start, end = tz[:, z]
    np.testing.assert_array_equal(pairs[z * t:z * t + end - start], order[start:end])
    assert np.all(pairs[z * t + end - start:(z + 1) * t] == -1)
  for rows_per_token in (1, 3):
    rows = np.asarray(slots.slot_rows(jnp.asarray(pairs), r, rows_per_token))
    p = pairs[pairs >= 0]
    np.testing.assert_array_equal(rows[pairs >= 0], (p // k) * rows_per_token
                                  + (p % k) // (k // rows_per_token))
    assert np.all(rows[pairs < 0] == n * rows_per_token)
  g = jax.random.uniform(jax.random.key(1), (n * k,))
  v = np.asarray(slots.slot_values(jnp.asarray(pairs), g))
  np.testing.assert_allclose(v[pairs >= 0], np.asarray(g)[pairs[pairs >= 0]])
  assert np.all(v[pairs < 0] == 0)
  used = int(slots.used_tiles(tiles)[0])
  assert np.all(tz[2, :used] > tz[1, :used]) and np.all(tz[2, used:] == tz[1, used:])
  srt = np.asarray(slots.sorted_rows(r, 1, 5))
  np.testing.assert_array_equal(srt[:n * k], order // k)
  assert np.all(srt[n * k:] == n)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_mosaic_lowers_forward_and_backward(case):
  """cvmm_mosaic's forward and its gradients (every kernel: the row kernel stored,
  added, gated, with dgates; the weight gradient) lower to CUDA for sm90."""
  from kernels.cvmm_mosaic import cvmm_mosaic  # noqa: PLC0415
  gated = case[0].startswith("gated") or "odd" in case[0]
  x, w, g, r, _ = _inputs(case, jnp.bfloat16, gated)

  def loss(x, w, g):
    return jnp.sum(cvmm_mosaic(x, r, w, g).astype(jnp.float32))

  argn = (0, 1, 2) if gated else (0, 1)
  text = jax.jit(jax.value_and_grad(loss, argnums=argn)).trace(x, w, g).lower(
      lowering_platforms=("cuda",)).as_text()
  assert text.count("mosaic_gpu") >= 3      # forward, dx, dW


def test_mosaic_refuses_float32():
  from kernels.cvmm_mosaic import cvmm_mosaic  # noqa: PLC0415
  x, w, g, r, _ = _inputs(CASES[0], jnp.float32, True)
  with pytest.raises(NotImplementedError, match="tf32"):
    cvmm_mosaic(x, r, w, g)


def _layers_in_a_scan(cvmm_fn, n_layers: int = 2):
  """(value_and_grad of a loss through ``n_layers`` residual layers h + cvmm(h) in a
  ``lax.scan``, its inputs): the shape of MoEUT's layer groups under jax.grad, the
  routing and gates loop-invariant, the rows carried."""
  from kernels import make_routing  # noqa: PLC0415
  n, k, e, i = 64, 4, 5, 128
  ks = jax.random.split(jax.random.key(0), 4)
  r = make_routing(jax.lax.top_k(jax.random.normal(ks[0], (n, e)), k)[1], e)
  x = (jax.random.normal(ks[1], (n, 1, i)) * 0.1).astype(jnp.bfloat16)
  w = (jax.random.normal(ks[2], (e, i, i)) * 0.1).astype(jnp.bfloat16)
  g = jax.random.uniform(ks[3], (n, k))

  def loss(x, w):
    def layer(h, _):
      return h + cvmm_fn(h, r, w, g)[:, None, :], None
    h, _ = jax.lax.scan(layer, x, None, length=n_layers)
    return jnp.sum(h.astype(jnp.float32) ** 2)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), (x, w)


def test_mosaic_added_outputs_stay_in_a_differentiated_scan():
  """Lowered for CUDA, the value and gradients of layers in a lax.scan (MoEUT's layer
  groups under jax.grad): every Mosaic kernel that adds rows into an output adds into
  a buffer made for that call, and its result is used. Before kernels/cvmm_mosaic/
  common.py's zeros_after, JAX's partial evaluation hoisted the zeros and their read
  out of the loop: the kernels' results went unused and the sums read as zeros."""
  import re  # noqa: PLC0415
  from kernels.cvmm_mosaic import cvmm_mosaic  # noqa: PLC0415
  fn, args = _layers_in_a_scan(cvmm_mosaic)
  text = fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  calls = 0
  for body in re.split(r"\n  func\.func ", text):
    for m in re.finditer(r"(%[\w]+)(?::\d+)? = stablehlo\.custom_call @mosaic_gpu\w*\("
                         r"([^)]*)\)(.*)", body):
      alias = re.search(r"operand_index = (\d+)", m.group(3))
      if alias is None:
        continue
      calls += 1
      result, operand = m.group(1), m.group(2).split(", ")[int(alias.group(1))]
      assert re.search(re.escape(result) + r"(?![\w])", body[m.end():]), \
          f"the result {result} of a kernel that adds rows is never used"
      made = re.search(re.escape(operand.split("#")[0]) + r"(?::\d+)? = ([\w.]+)", body)
      assert made is not None and made.group(1) == "stablehlo.optimization_barrier", \
          f"a kernel adds into {operand}, made by {made and made.group(1)}"
  assert calls >= 2, calls           # the forward's gated sum and the backward's dx


@pytest.mark.skipif(not mosaic_interpret.SUPPORTED,
                    reason="the Mosaic GPU interpreter of jax < 0.11 fills no out-of-bounds TMA reads")
def test_mosaic_interpreted_in_a_differentiated_scan_matches_xla():
  """The value and gradients of residual layers in a lax.scan under jax.grad, through
  the Mosaic kernels in the interpreter, against the same through the XLA path. (The
  training step of MoEUT_244M with impl="mosaic" stopped learning on an H100 while each
  call alone was right: inside the layers' scan the gated sums read as zeros.)"""
  from kernels import cvmm  # noqa: PLC0415
  from kernels.cvmm_mosaic import cvmm_mosaic  # noqa: PLC0415
  ref_fn, args = _layers_in_a_scan(lambda *a: cvmm(*a, impl="xla"))
  want = ref_fn(*args)
  fn, args = _layers_in_a_scan(cvmm_mosaic)
  with mosaic_interpret.interpret():
    got = fn(*args)
  assert abs(float(got[0]) - float(want[0])) <= 1e-2 * abs(float(want[0]))
  for name, a, b in zip(["dx", "dw"], got[1], want[1]):
    err = _rel(a, b)
    assert err <= 1e-2, f"{name}: rel err {err:.2e}"


@pytest.mark.skipif(not mosaic_interpret.SUPPORTED,
                    reason="the Mosaic GPU interpreter of jax < 0.11 fills no out-of-bounds TMA reads")
@pytest.mark.parametrize("sums", ["float16", "float32", "bfloat16"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_mosaic_interpreted_matches_reference(case, sums, monkeypatch):
  """Forward and every gradient (x, w, gates) through the Mosaic GPU kernels in Pallas's
  interpreter, bf16 inputs, against the float32 reference: sums over slots in scaled
  float16 (the default), float32 or bfloat16 (the config's sum_dtype). Tiles with one
  producer warpgroup; the default tiles, with two, in the next test (on fewer cases:
  the interpreter runs a thread per warpgroup)."""
  from kernels import CvmmConfig  # noqa: PLC0415
  from kernels.cvmm_mosaic import cvmm_mosaic  # noqa: PLC0415
  from kernels.cvmm_reference import cvmm_reference  # noqa: PLC0415
  gated = case[0].startswith("gated") or "odd" in case[0]
  if sums != "float32" and not gated and case[3] == case[2]:
    pytest.skip("16-bit sums change only calls that add rows (none here: M = K)")
  producers_only(monkeypatch, 1)
  x, w, g, r, ct = _inputs(case, jnp.bfloat16, gated)
  config = CvmmConfig(sum_dtype=sums)
  with mosaic_interpret.interpret():
    got = _outputs(lambda x, r, w, g: cvmm_mosaic(x, r, w, g, config=config), x, w, g, r, ct)
  up = lambda a: None if a is None else a.astype(jnp.float32)  # noqa: E731
  ref = _outputs(cvmm_reference, up(x), up(w), up(g), r, ct)
  tol = 2e-2 if sums == "bfloat16" else 1e-2
  for name, a, b in zip(["out", "dx", "dw", "dgates"], got, ref):
    assert a.dtype == jnp.bfloat16 and a.shape == b.shape, (name, a.dtype, a.shape)
    err = _rel(a, b)
    assert err <= tol, f"{case[0]} {name}: rel err {err:.2e}"


@pytest.mark.skipif(not mosaic_interpret.SUPPORTED,
                    reason="the Mosaic GPU interpreter of jax < 0.11 fills no out-of-bounds TMA reads")
@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[4]],
                         ids=[CASES[0][0], CASES[1][0], CASES[4][0]])
def test_mosaic_two_producers_interpreted_matches_reference(case, monkeypatch):
  """The row and weight-gradient kernels with two producer warpgroups (the default
  tiles; each producer copies every other row of a tile, with its own index buffers; in
  the row kernel the first also copies the matrix block): forward and every gradient
  (x, w, gates; stored, added and gated rows, dgates) against the reference.

  The interpreter runs each warpgroup as a thread whose XLA executions wait at the
  barriers; with four warpgroups on a 2-core host busy with another process it has hung
  (its threads blocked in XLA's dispatch behind those waits: once in about eight runs of
  this file under ``-n 2``, never alone: 10 of 10 calls of this case's kernels)."""
  from kernels.cvmm_mosaic import cvmm_mosaic  # noqa: PLC0415
  from kernels.cvmm_reference import cvmm_reference  # noqa: PLC0415
  producers_only(monkeypatch, 2)
  gated = case[0].startswith("gated") or "odd" in case[0]
  x, w, g, r, ct = _inputs(case, jnp.bfloat16, gated)
  with mosaic_interpret.interpret():
    got = _outputs(cvmm_mosaic, x, w, g, r, ct)
  up = lambda a: None if a is None else a.astype(jnp.float32)  # noqa: E731
  ref = _outputs(cvmm_reference, up(x), up(w), up(g), r, ct)
  for name, a, b in zip(["out", "dx", "dw", "dgates"], got, ref):
    assert a.dtype == jnp.bfloat16 and a.shape == b.shape, (name, a.dtype, a.shape)
    assert _rel(a, b) <= 1e-2, f"{case[0]} {name}: rel err {_rel(a, b):.2e}"


@pytest.mark.skipif(not mosaic_interpret.SUPPORTED,
                    reason="the Mosaic GPU interpreter of jax < 0.11 fills no out-of-bounds TMA reads")
@pytest.mark.parametrize("mag", [1e-6, 1e5], ids=["tiny", "huge"])
def test_mosaic_float16_sums_scale_rows_into_range(mag, monkeypatch):
  """Scaled float16 sums (the default) with inputs 1e-6 or 1e5 in magnitude: summed
  unscaled in float16, the huge rows' sums overflow (float16's largest is 65504) and the
  tiny ones fall among float16's subnormals (below 6.1e-5); scaled by each row's bound,
  the output and dx (both summed over slots) are as close to the float32 reference as
  at magnitude 1. The cotangent is divided by the magnitude, so that dx's sums meet the
  same ranges."""
  from kernels import CvmmConfig  # noqa: PLC0415
  from kernels.cvmm_mosaic import cvmm_mosaic  # noqa: PLC0415
  from kernels.cvmm_reference import cvmm_reference  # noqa: PLC0415
  producers_only(monkeypatch, 1)
  case = ("gated_m1_mag", 40, 4, 1, 5, 64, 72, "random")
  x, w, g, r, ct = _inputs(case, jnp.bfloat16, True)
  x = (x.astype(jnp.float32) * mag).astype(jnp.bfloat16)
  ct = ct / mag
  with mosaic_interpret.interpret():
    got = _outputs(lambda x, r, w, g: cvmm_mosaic(x, r, w, g, config=CvmmConfig()),
                   x, w, g, r, ct)
  up = lambda a: None if a is None else a.astype(jnp.float32)  # noqa: E731
  ref = _outputs(cvmm_reference, up(x), up(w), up(g), r, ct)
  for name, a, b in zip(["out", "dx", "dw", "dgates"], got, ref):
    assert bool(jnp.all(jnp.isfinite(a.astype(jnp.float32)))), name
    err = _rel(a, b)
    assert err <= 1e-2, f"{mag} {name}: rel err {err:.2e}"


@pytest.mark.skipif(not mosaic_interpret.SUPPORTED,
                    reason="the Mosaic GPU interpreter of jax < 0.11 fills no out-of-bounds TMA reads")
@pytest.mark.parametrize("sums", ["float16", "float32"])
def test_mosaic_head_sums_interpreted_match_reference(sums, monkeypatch):
  """SwitchHead's V with its gated sums per head (cvmm's out_rows = heads; 2 heads of 4
  experts, 2 slots each) through kernels.cvmm with impl="mosaic": the row kernel adds
  each head's two rows into the head's output row, and its backward takes dgates from
  dx's product (dout's head row against W^T, dotted with x). Forward and every gradient
  against the float32 reference, in the interpreter."""
  import importlib  # noqa: PLC0415
  from kernels import CvmmConfig, cvmm, make_head_routing  # noqa: PLC0415
  from kernels.cvmm_mosaic import ops  # noqa: PLC0415
  from kernels.cvmm_reference import cvmm_reference  # noqa: PLC0415
  producers_only(monkeypatch, 1)
  kc = importlib.import_module("kernels.cvmm")
  monkeypatch.setattr(kc, "is_available", lambda name: name in ("mosaic", "xla", "reference"))
  made = []
  every = ops._gated_op
  monkeypatch.setattr(ops, "_gated_op", lambda *a: made.append(a) or every(*a))
  n, h, ea, d, dh = 40, 2, 4, 128, 72
  ks = jax.random.split(jax.random.key(7), 5)
  r = make_head_routing(jax.lax.top_k(jax.random.normal(ks[0], (n, h, ea)), 2)[1], ea,
                        unit_pairs=False)
  x = jax.random.normal(ks[1], (n, 1, d)).astype(jnp.bfloat16)
  w = (jax.random.normal(ks[2], (h * ea, d, dh)) * d ** -0.5).astype(jnp.bfloat16)
  g = jax.random.uniform(ks[3], (n, 2 * h)).astype(jnp.bfloat16)
  ct = jax.random.normal(ks[4], (n, h, dh))
  config = CvmmConfig(impl="mosaic", sum_dtype=sums)
  with mosaic_interpret.interpret():
    got = _outputs(lambda x, r, w, g: cvmm(x, r, w, g, out_rows=h, config=config),
                   x, w, g, r, ct)
  assert made and all(a == (sums, h) for a in made), made   # the sums in the kernel

  def ref_fn(x, r, w, g):
    y = cvmm_reference(x, r, w)                                       # [N, K, O]
    return jnp.einsum("NHSO,NHS->NHO", y.reshape(n, h, 2, dh), g.reshape(n, h, 2),
                      precision=jax.lax.Precision.HIGHEST)
  up = lambda a: a.astype(jnp.float32)  # noqa: E731
  ref = _outputs(ref_fn, up(x), up(w), up(g), r, ct)
  for name, a, b in zip(["out", "dx", "dw", "dgates"], got, ref):
    assert a.dtype == jnp.bfloat16 and a.shape == b.shape, (name, a.dtype, a.shape)
    err = _rel(a, b)
    assert err <= 1e-2, f"{sums} {name}: rel err {err:.2e}"


# (name, N, K, E, D, H, O, sums, producers, keep_middle): the σ-MoE pair's fused forward
PAIR_CASES = [
    ("f16_two_producers", 40, 4, 5, 64, 64, 72, "float16", 2, True),
    ("f32_one_producer_remade", 40, 4, 5, 64, 64, 72, "float32", 1, False),
    ("odd_sizes_bf16", 30, 2, 3, 100, 40, 36, "bfloat16", 1, True),
]


@pytest.mark.skipif(not mosaic_interpret.SUPPORTED,
                    reason="the Mosaic GPU interpreter of jax < 0.11 fills no out-of-bounds TMA reads")
@pytest.mark.parametrize("case", PAIR_CASES, ids=[c[0] for c in PAIR_CASES])
def test_mosaic_pair_interpreted_matches_reference(case, monkeypatch):
  """The σ-MoE pair through the Mosaic path (its fused forward: up, ReLU and gated down
  of a tile in one kernel, several tiles a block; its fused gradient of the inputs and
  the weight-gradient kernels, the middle kept or made again) in the interpreter,
  bf16, against the float32 reference: output and every gradient."""
  from kernels import CvmmConfig, make_routing  # noqa: PLC0415
  from kernels.cvmm_mosaic import cvmm_mosaic_pair, pair, pair_bwd  # noqa: PLC0415
  from kernels.cvmm_reference import cvmm_pair_reference  # noqa: PLC0415
  name, n, k, e, d, h, o, sums, producers, keep = case
  producers_only(monkeypatch, producers)
  for mod, name in ((pair, "pair_candidates"), (pair_bwd, "pair_bwd_candidates")):
    every = getattr(mod, name)
    monkeypatch.setattr(mod, name, lambda *a, every=every, **kw: [
        c for c in every(*a, **kw) if c.producers == producers])
  ks = jax.random.split(jax.random.key(0), 6)
  r = make_routing(jax.lax.top_k(jax.random.normal(ks[0], (n, e)), k)[1], e)
  x = jax.random.normal(ks[1], (n, d)).astype(jnp.bfloat16)
  wu = (jax.random.normal(ks[2], (e, d, h)) * d ** -0.5).astype(jnp.bfloat16)
  wd = (jax.random.normal(ks[3], (e, h, o)) * h ** -0.5).astype(jnp.bfloat16)
  g = jax.random.uniform(ks[4], (n, k)).astype(jnp.bfloat16)
  ct = jax.random.normal(ks[5], (n, o))
  config = CvmmConfig(impl="mosaic", sum_dtype=sums)

  def outs(fn, *args):
    loss = lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * ct)  # noqa: E731
    return (fn(*args),) + tuple(jax.grad(loss, argnums=(0, 1, 2, 3))(*args))

  with mosaic_interpret.interpret():
    got = outs(lambda x, wu, wd, g: cvmm_mosaic_pair(x, r, wu, wd, g, keep_middle=keep,
                                                     config=config), x, wu, wd, g)
  ref = outs(lambda x, wu, wd, g: cvmm_pair_reference(x, r, wu, wd, g),
             *(a.astype(jnp.float32) for a in (x, wu, wd, g)))
  tol = 2e-2 if sums == "bfloat16" else 1e-2
  for nm, a, b in zip(["out", "dx", "dw_up", "dw_down", "dgates"], got, ref):
    assert a.dtype == jnp.bfloat16 and a.shape == b.shape, (nm, a.dtype, a.shape)
    assert _rel(a, b) <= tol, f"{name} {nm}: rel err {_rel(a, b):.2e}"


@pytest.mark.parametrize("sums", ["float16", "bfloat16", "float32"])
def test_mosaic_pair_takes_the_middles_it_has_tiles_for(sums):
  """pair_supported says yes exactly where both fused kernels have a tile within shared
  memory (checked by their own config checks) for the widest output blocks: every
  profile's expert size (64, 128) with every sum dtype; 320 columns never (one wgmma
  accumulator holds 256)."""
  from kernels import CvmmConfig  # noqa: PLC0415
  from kernels.cvmm_mosaic import pair, pair_bwd, pair_supported  # noqa: PLC0415
  config = CvmmConfig(sum_dtype=sums)
  itemsize = jnp.dtype(sums).itemsize
  for h in (64, 100, 128, 192, 256, 320):
    hp = -(-h // 64) * 64
    fwd = pair.pair_candidates(hp, 256, itemsize) if hp <= 256 else []
    bwd = pair_bwd.pair_bwd_candidates(hp, 256, itemsize) if hp <= 256 else []
    for c in fwd:
      pair.check_pair_config(c, hp, itemsize)
    for c in bwd:
      pair_bwd.check_pair_bwd_config(c, hp, itemsize)
    assert pair_supported(h, config) == bool(fwd and bwd), (h, sums)
  assert pair_supported(128, config) and not pair_supported(320, config)


@pytest.mark.parametrize("sums", ["float16", "float32"])
def test_mosaic_pair_is_fused_at_moeut_244m(sums, monkeypatch):
  """The σ-MoE pair of MoEUT_244M (65,536 tokens, abstract inputs) through the Mosaic
  path lowers to CUDA with its kernels' first tile candidates, within sm90's shared
  memory: its forward one kernel, its forward and backward four (the fused forward, the
  fused gradient of the inputs, the two weight gradients): no middle or middle's
  gradient written by one kernel for another but the stored h and du the weight
  gradients read. kernels.cvmm_pair takes this path for impl="mosaic" (availability
  stood in for: no Mosaic GPU here)."""
  import importlib  # noqa: PLC0415
  from kernels import CvmmConfig, cvmm_pair, make_routing  # noqa: PLC0415
  from kernels.cvmm_mosaic import pair, pair_bwd  # noqa: PLC0415
  from kernels.cvmm_mosaic.common import SMEM_BUDGET  # noqa: PLC0415
  from moeut_jax import profiles  # noqa: PLC0415
  p = profiles.get("MoEUT_244M")
  n, d, es, e, k = 65536, p["d_model"], p["ff_expert_size"], p["ff_n_experts"], p["ff_k"]
  assert pair.hidden_fits(es)
  it = jnp.dtype(sums).itemsize
  assert pair.smem_bytes(pair.pair_candidates(es, d, it)[0], es, it) <= SMEM_BUDGET
  assert pair_bwd.smem_bytes(pair_bwd.pair_bwd_candidates(es, d, it)[0], es, it) <= SMEM_BUDGET
  r = jax.eval_shape(lambda i: make_routing(i, e, tile_blocks=()),
                     jax.ShapeDtypeStruct((n, k), jnp.int32))
  bf = jnp.bfloat16
  args = (jax.ShapeDtypeStruct((n, d), bf), jax.ShapeDtypeStruct((e, d, es), bf),
          jax.ShapeDtypeStruct((e, es, d), bf), jax.ShapeDtypeStruct((n, k), bf))
  config = CvmmConfig(impl="mosaic", sum_dtype=sums)
  kc = importlib.import_module("kernels.cvmm")
  monkeypatch.setattr(kc, "is_available", lambda name: name in ("mosaic", "xla", "reference"))

  def fwd(x, wu, wd, g, r):
    return cvmm_pair(x, r, wu, wd, g, config=config)

  def loss(x, wu, wd, g, r):
    return jnp.sum(fwd(x, wu, wd, g, r).astype(jnp.float32))

  kernel = "stablehlo.custom_call @mosaic_gpu"
  text = jax.jit(fwd).trace(*args, r).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count(kernel) == 1
  text = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3))).trace(*args, r).lower(
      lowering_platforms=("cuda",)).as_text()
  assert text.count(kernel) == 4


def test_mosaic_one_producer_lowers_at_moeut_244m_up(monkeypatch):
  """The σ-MoE up projection of MoEUT_244M with one producer warpgroup (the autotuner's
  other tiles; the default's two in the next test) lowers to CUDA (forward and
  gradients: row and weight-gradient kernels), and the register split of 2 consumers
  with 1 or 2 producers fits the register file."""
  from kernels import make_routing  # noqa: PLC0415
  from kernels.cvmm_mosaic import cvmm_mosaic  # noqa: PLC0415
  from kernels.cvmm_mosaic.common import consumer_registers  # noqa: PLC0415
  producers_only(monkeypatch, 1)
  assert consumer_registers(2, 1) == 232 and consumer_registers(2, 2) == 216
  assert 2 * 128 * 216 + 2 * 128 * 40 <= 65536
  n, d, es, e, k = 65536, 1024, 128, 387, 16
  r = jax.eval_shape(lambda i: make_routing(i, e, tile_blocks=()),
                     jax.ShapeDtypeStruct((n, k), jnp.int32))
  x = jax.ShapeDtypeStruct((n, 1, d), jnp.bfloat16)
  w = jax.ShapeDtypeStruct((e, d, es), jnp.bfloat16)

  def loss(x, w, r):
    return jnp.sum(cvmm_mosaic(x, r, w, None).astype(jnp.float32))

  text = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).trace(x, w, r).lower(
      lowering_platforms=("cuda",)).as_text()
  assert text.count("mosaic_gpu") >= 3


@pytest.mark.parametrize("proj", ["up", "down", "V", "V_heads", "O"])
def test_mosaic_lowers_at_moeut_244m(proj):
  """Every projection of MoEUT_244M (65,536 tokens), forward and gradients, lowers to
  CUDA with the kernels' first tile candidates (two producer warpgroups; abstract
  inputs: nothing is computed), within sm90's shared memory. V_heads: V with its gated
  sums per head added in the kernels (three kernels: forward, dx with dgates, dw)."""
  from kernels import make_head_routing, make_routing  # noqa: PLC0415
  from kernels.cvmm_mosaic import cvmm_mosaic  # noqa: PLC0415
  from moeut_jax import profiles  # noqa: PLC0415
  p = profiles.get("MoEUT_244M")
  n, d, es, e, k = 65536, p["d_model"], p["ff_expert_size"], p["ff_n_experts"], p["ff_k"]
  h, ea, dh, ka = p["n_heads"], p["att_n_experts"], p["d_head"], p["att_k"]
  bf = jnp.bfloat16
  if proj in ("up", "down"):
    r = jax.eval_shape(lambda i: make_routing(i, e, tile_blocks=()),
                       jax.ShapeDtypeStruct((n, k), jnp.int32))
    m, i, o, ne, gated = (1, d, es, e, False) if proj == "up" else (k, es, d, e, True)
  else:
    r = jax.eval_shape(lambda i: make_head_routing(i, ea, tile_blocks=(), unit_pairs=False),
                       jax.ShapeDtypeStruct((n, h, ka), jnp.int32))
    m, i, o, ne, gated = ((1, d, dh, h * ea, proj == "V_heads") if proj.startswith("V")
                          else (h, dh, d, h * ea, True))
  x = jax.ShapeDtypeStruct((n, m, i), bf)
  w = jax.ShapeDtypeStruct((ne, i, o), bf)
  g = jax.ShapeDtypeStruct((n, r.k), bf) if gated else None
  out_rows = h if proj == "V_heads" else 1

  def loss(x, w, g, r):
    return jnp.sum(cvmm_mosaic(x, r, w, g, out_rows=out_rows).astype(jnp.float32))

  argn = (0, 1, 2) if gated else (0, 1)
  text = jax.jit(jax.value_and_grad(loss, argnums=argn)).trace(x, w, g, r).lower(
      lowering_platforms=("cuda",)).as_text()
  assert text.count("stablehlo.custom_call @mosaic_gpu") == 3


def test_mosaic_kernels_write_whole_blocks_and_align_index_reads():
  """Two GPU traps Pallas's interpreter does not model (found on an H100,
  bench/probes/mosaic_variants.py; bench/RESULTS.md, 'Pallas Mosaic GPU'):
  - a stored (not added) TMA copy of a row is a linear bulk copy, which is clamped only
    at the end of the whole array: a partial last column block would run into the next
    row. So the weight gradient's output is allocated in whole blocks and cut after the
    kernel. The row kernel's threads write its rows and skip columns past the output
    (kernels/cvmm_mosaic/common.py: store_rows): its output has the output's width
    (192 columns in blocks of 128, not 256).
  - a TMA copy whose start is not 16-byte aligned traps (illegal instruction): the weight
    gradient reads its int32 row indices from 4-aligned starts, so the index lists carry
    STEP + IDX_SLACK entries of padding."""
  from kernels import make_routing  # noqa: PLC0415
  from kernels.cvmm_mosaic import gram, slots  # noqa: PLC0415
  from kernels.cvmm_mosaic.rows import rows_candidates, rows_matmul  # noqa: PLC0415
  n, k, e, i, o = 40, 4, 5, 64, 192
  ks = jax.random.split(jax.random.key(0), 3)
  r = make_routing(jax.lax.top_k(jax.random.normal(ks[0], (n, e)), k)[1], e)
  x = jax.random.normal(ks[1], (n, i)).astype(jnp.bfloat16)
  w = jax.random.normal(ks[2], (e, i, o)).astype(jnp.bfloat16)
  cfg = next(c for c in rows_candidates(o, 2, False) if c.block_n == 128)
  text = jax.jit(lambda x, w: rows_matmul(x, w, r, a_rows=1, out_rows=k, cfg=cfg)[0]).trace(
      x, w).lower(lowering_platforms=("cuda",)).as_text()
  assert f"tensor<{n * k}x256xbf16>" not in text and f"tensor<{n * k}x{o}xbf16>" in text

  dy = jnp.ones((n * k, 100), jnp.bfloat16)
  gcfg = next(c for c in gram.gram_candidates(100) if c.block_n == 64)   # bo 64, I 64 x 2
  xi = jnp.ones((n, 100), jnp.bfloat16)
  text = jax.jit(lambda a, b: gram.expert_gram(a, b, r, a_rows=1, b_rows=k,
                                               out_dtype=jnp.float32, cfg=gcfg)).trace(
      xi, dy).lower(lowering_platforms=("cuda",)).as_text()
  bi = gcfg.block_m
  whole_i = -(-100 // bi) * bi
  assert f"tensor<{e}x{whole_i}x128xf32>" in text
  assert gram.IDX_SLACK % gram.IDX_ALIGN == 0 and gram.IDX_ALIGN * 4 == 16
  pos = np.asarray(slots.sorted_rows(r, 1, gram.STEP + gram.IDX_SLACK))
  assert pos.shape[0] >= n * k + gram.STEP + gram.IDX_SLACK


def test_mosaic_kernels_gather_rows_with_cp_async():
  """The row kernel and the weight gradient gather rows with cp.async (every thread of a
  warpgroup 16-byte pieces, kernels/cvmm_mosaic/common.py), not one TMA copy per row, and
  wait for them by commit group."""
  from kernels import make_routing  # noqa: PLC0415
  from kernels.cvmm_mosaic import gram  # noqa: PLC0415
  from kernels.cvmm_mosaic.rows import rows_matmul  # noqa: PLC0415
  n, k, e, i, o = 40, 4, 5, 128, 64
  ks = jax.random.split(jax.random.key(0), 3)
  r = make_routing(jax.lax.top_k(jax.random.normal(ks[0], (n, e)), k)[1], e)
  x = jax.random.normal(ks[1], (n, i)).astype(jnp.bfloat16)
  w = jax.random.normal(ks[2], (e, i, o)).astype(jnp.bfloat16)
  dy = jnp.ones((n * k, o), jnp.bfloat16)
  calls = [lambda x, w, dy: rows_matmul(x, w, r, a_rows=1, out_rows=k)[0],
           lambda x, w, dy: gram.expert_gram(x, dy, r, a_rows=1, b_rows=k,
                                             out_dtype=jnp.float32)]
  for f in calls:
    text = jax.jit(f).trace(x, w, dy).lower(lowering_platforms=("cuda",)).as_text()
    for op in ("nvvm.cp.async.shared.global", "nvvm.cp.async.commit.group",
               "nvvm.cp.async.wait.group", "nvvm.fence.proxy"):
      assert op in text, op


def test_mosaic_row_kernel_stores_and_adds_rows_as_measured_fastest():
  """The row kernel's epilogue (kernels/cvmm_mosaic/common.py: stored and added rows):
  stored outputs are written by every thread of a consumer warpgroup in 16-byte pieces
  (st.global.v4), with no bulk copy into global memory; float32 sums (forward and dx)
  are added by TMA tensor reductions, with no thread stores and no vector atomics;
  16-bit sums by every thread's 16-bit vector atomics (red.global.add.noftz.v4.bf16x2 or
  .f16x2), with no TMA reductions."""
  from kernels import make_routing  # noqa: PLC0415
  from kernels.cvmm_mosaic.rows import rows_matmul  # noqa: PLC0415
  n, k, e, i, o = 40, 4, 5, 128, 72
  ks = jax.random.split(jax.random.key(0), 4)
  r = make_routing(jax.lax.top_k(jax.random.normal(ks[0], (n, e)), k)[1], e)
  x = jax.random.normal(ks[1], (n, i)).astype(jnp.bfloat16)
  w = jax.random.normal(ks[2], (e, i, o)).astype(jnp.bfloat16)
  g = jax.random.uniform(ks[3], (n * k,))
  dy = jnp.ones((n * k, o), jnp.bfloat16)
  store, reduce, red = "st.global.v4.b32", "cp.reduce.async.bulk.tensor", "red.global.add"
  calls = {
      "stored": (lambda: rows_matmul(x, w, r, a_rows=1, out_rows=k)[0], {store}),
      "added f32": (lambda: rows_matmul(x, w, r, a_rows=1, out_rows=1, scale=g)[0],
                    {reduce}),
      "added bf16": (lambda: rows_matmul(x, w, r, a_rows=1, out_rows=1, scale=g,
                                         sum_dtype=jnp.bfloat16)[0],
                     {"red.global.add.noftz.v4.bf16x2", red}),
      "dx added": (lambda: rows_matmul(dy, w, r, a_rows=k, out_rows=1,
                                       transpose_w=True)[0], {reduce}),
      "added f16": (lambda: rows_matmul(x.astype(jnp.float16), w.astype(jnp.float16), r,
                                        a_rows=1, out_rows=1, scale=g,
                                        sum_dtype=jnp.float16)[0],
                    {"red.global.add.noftz.v4.f16x2", red}),
      "dx added f16": (lambda: rows_matmul(dy, w, r, a_rows=k, out_rows=1, transpose_w=True,
                                           sum_dtype=jnp.float16)[0],
                       {"red.global.add.noftz.v4.f16x2", red}),
  }
  for name, (f, present) in calls.items():
    text = jax.jit(f).trace().lower(lowering_platforms=("cuda",)).as_text()
    for op in {store, reduce, red} | present:
      assert (op in text) == (op in present), (name, op)
    if name == "stored":   # nor a bulk copy of any kind
      assert "nvvm.cp.async.bulk.commit.group" not in text
