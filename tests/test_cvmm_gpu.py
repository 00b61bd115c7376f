"""GPU kernels (Triton, Mosaic GPU) against the pure-JAX reference: forward and gradients.

Run on the GPU machine: ``python -m pytest tests/test_cvmm_gpu.py -q``. Skipped exactly
when JAX has no GPU backend.
"""
from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import CvmmConfig, cvmm, is_available
from kernels.cvmm_reference import cvmm_pair_reference, cvmm_reference
from cvmm_cases import TOL, inputs as _inputs, outputs as _outputs, reference, rel_err as _rel
from cvmm_cases import producers_only

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU")]


def _sums(sum_dtype: str | None, impl: str | None = None) -> CvmmConfig:
  """The kernels' config with the fused sums in ``sum_dtype`` (None: the default's)."""
  cfg = CvmmConfig() if sum_dtype is None else CvmmConfig(sum_dtype=sum_dtype)
  return cfg if impl is None else cfg.replace(impl=impl)


def _hopper() -> bool:
  """Whether the Gluon kernels (wgmma, sm90) run on this GPU."""
  from kernels.cvmm_triton.launch import hopper  # noqa: PLC0415
  return hopper()


# (name, N, K, M, E, I, O, routing kind)
CASES = [
    ("basic", 300, 4, 1, 8, 128, 64, "random"),
    ("m_eq_k", 300, 4, 4, 8, 64, 128, "random"),
    ("m_divisor", 257, 6, 3, 5, 96, 80, "random"),
    ("k1", 200, 1, 1, 6, 64, 64, "random"),
    ("one_expert", 150, 2, 2, 1, 64, 64, "random"),
    ("empty_experts", 40, 2, 1, 64, 64, 64, "random"),
    ("all_one_expert", 190, 3, 1, 7, 64, 64, "one"),
    ("odd_sizes", 333, 5, 1, 9, 100, 72, "random"),
    ("switchhead_like", 256, 8, 4, 40, 128, 128, "random"),
    # outputs of several column blocks, 16 slots a row: the σ-MoE pair's forward and dx
    # shapes at MoEUT_244M, narrowed
    ("wide_many_slots", 600, 16, 1, 16, 512, 1024, "random"),
    # a contraction of two 64-column chunks (the σ-MoE down projection, up's dx) and many
    # work items per block (the Mosaic producers' warps once ran apart by whole items
    # here and gathered the next item's rows)
    ("narrow_many_items", 8192, 16, 1, 16, 128, 1024, "random"),
]


def _assert_bf16_results(label, got, x, w, g, r, ct):
  """``got`` (a bf16 call's output and gradients, :func:`_outputs`) bf16, each within
  the bf16 tolerance of the float32 reference's on the same inputs."""
  up = lambda a: None if a is None else a.astype(jnp.float32)  # noqa: E731
  ref = _outputs(cvmm_reference, up(x), up(w), up(g), r, ct)
  for name, a, b in zip(["out", "dx", "dw", "dgates"], got, ref):
    assert a.dtype == jnp.bfloat16, (name, a.dtype)
    err = _rel(a, b)
    assert err <= TOL[jnp.bfloat16], f"{label} {name}: rel err {err:.2e}"


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("impl", ["triton", "triton_unfused", "mosaic"])
def test_gpu_impl_matches_reference(impl, case, dtype, gated):
  if not is_available(impl):
    pytest.skip(f"{impl} not available on this GPU")
  x, w, g, r, ct = _inputs(case, dtype, gated)

  fn = jax.jit(lambda x, r, w, g: cvmm(x, r, w, g, impl=impl))
  if impl == "mosaic" and dtype == jnp.float32:
    # wgmma multiplies float32 only as tf32 (about 3e-4): the Mosaic path refuses it.
    with pytest.raises(NotImplementedError, match="tf32"):
      fn(x, r, w, g)
    return
  got = _outputs(fn, x, w, g, r, ct)
  up = lambda a: None if a is None else a.astype(jnp.float32)  # noqa: E731
  ref = _outputs(reference, up(x), up(w), up(g), r, ct)   # narrow_many_items: by expert
  names = ["out", "dx", "dw", "dgates"]
  for name, a, b in zip(names, got, ref):
    assert a.dtype == dtype, (name, a.dtype)
    assert np.all(np.isfinite(np.asarray(a, np.float32))), name
    err = _rel(a, b)
    assert err <= TOL[dtype], f"{impl} {case[0]} {name}: rel err {err:.2e} > {TOL[dtype]:.0e}"


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("case", [c for c in CASES if c[0] in ("m_divisor", "empty_experts",
                                                               "odd_sizes", "switchhead_like")],
                         ids=lambda c: c[0])
def test_mosaic_one_producer_matches_reference(case, gated, monkeypatch):
  """The Mosaic row and weight-gradient kernels with one producer warpgroup
  (TileConfig.producers=1: the autotuner's candidates after the default's two):
  forward and every gradient, bf16, against the reference. The CPU interpreter checks
  the same (tests/test_cvmm_mosaic.py); here the copies, barriers and registers run on
  the GPU."""
  if not is_available("mosaic"):
    pytest.skip("mosaic not available on this GPU")
  producers_only(monkeypatch, 1)
  x, w, g, r, ct = _inputs(case, jnp.bfloat16, gated)
  got = _outputs(jax.jit(lambda x, r, w, g: cvmm(x, r, w, g, impl="mosaic")), x, w, g, r, ct)
  _assert_bf16_results(case[0], got, x, w, g, r, ct)


def test_auto_resolves_to_a_gpu_kernel():
  from kernels import resolve
  assert resolve("auto") == ("triton" if is_available("triton") else "xla")


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_auto_times_the_gpu_implementations_and_runs_the_faster(gated, monkeypatch,
                                                                tmp_path):
  """Under "auto" with both GPU paths here (Hopper, bf16), the call's implementation is
  timed on the GPU (forward and backward, tiles unmeasured: each kernel's first
  candidate) and the faster runs; its outputs and gradients match the reference."""
  from kernels import auto, autotune  # noqa: PLC0415
  from kernels.autotune import Autotuner  # noqa: PLC0415
  if auto.candidates(jnp.bfloat16) != ["triton", "mosaic"]:
    pytest.skip("needs both the Triton and the Mosaic path (Hopper)")
  tuner = Autotuner(str(tmp_path / "tune.json"))
  monkeypatch.setattr(autotune, "_TUNER", tuner)
  monkeypatch.setenv("CVMM_AUTOTUNE", "1")
  x, w, g, r, ct = _inputs(CASES[0], jnp.bfloat16, gated)
  with tuner.first_tiles():
    got = _outputs(jax.jit(lambda x, r, w, g: cvmm(x, r, w, g)), x, w, g, r, ct)
  timed = [line for line in tuner.log if "cvmm_impl" in line]
  assert [line.rsplit(" ", 3)[1] for line in timed] == ["triton:", "mosaic:"], timed
  assert list(tuner._impls.values())[0] in ("triton", "mosaic")
  up = lambda a: None if a is None else a.astype(jnp.float32)  # noqa: E731
  ref = _outputs(reference, up(x), up(w), up(g), r, ct)
  for name, a, b in zip(["out", "dx", "dw", "dgates"], got, ref):
    err = _rel(a, b)
    assert err <= TOL[jnp.bfloat16], f"auto {name}: rel err {err:.2e}"


# (name, N, K, E, D, H, O, routing kind) for the σ-MoE pair
PAIR_CASES = [
    ("basic", 300, 4, 8, 128, 64, 128, "random"),
    ("k1", 200, 1, 6, 64, 128, 64, "random"),
    ("one_expert", 150, 2, 1, 64, 64, 64, "random"),
    ("empty_experts", 40, 2, 64, 64, 64, 64, "random"),
    ("all_one_expert", 190, 3, 7, 64, 32, 64, "one"),
    ("odd_sizes", 333, 5, 9, 100, 40, 72, "random"),
    ("sigma_moe_like", 512, 16, 61, 256, 128, 256, "random"),
]


def _pair_outputs(case, dtype, sum_dtype=None, mag=1.0, impl="triton", keep_middle=True):
  """(got, ref): the fused pair's output and gradients (x, w_up, w_down, gates) through
  the Triton kernels, and the reference's in float32; x scaled by ``mag``; the backward
  pass keeps the forward's middle or makes it again (``keep_middle``)."""
  import zlib  # noqa: PLC0415
  from kernels import cvmm_pair  # noqa: PLC0415
  from cvmm_cases import routing_of_kind  # noqa: PLC0415
  _, n, k, e, d, h, o, kind = case
  ks = jax.random.split(jax.random.key(zlib.crc32(repr(case).encode())), 6)
  r = routing_of_kind(kind, n, k, e, ks[0])
  x = (jax.random.normal(ks[1], (n, d)) * mag).astype(dtype)
  wu = (jax.random.normal(ks[2], (e, d, h)) * d ** -0.5).astype(dtype)
  wd = (jax.random.normal(ks[3], (e, h, o)) * h ** -0.5).astype(dtype)
  g = jax.random.uniform(ks[4], (n, k)).astype(dtype)
  ct = jax.random.normal(ks[5], (n, o)) / mag

  def outs(fn, *args):
    loss = lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * ct)  # noqa: E731
    return (jax.jit(fn)(*args),) + tuple(jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(*args))

  config = _sums(sum_dtype, impl=impl)
  got = outs(lambda x, wu, wd, g: cvmm_pair(x, r, wu, wd, g, keep_middle=keep_middle,
                                            config=config), x, wu, wd, g)
  ref = outs(lambda x, wu, wd, g: cvmm_pair_reference(x, r, wu, wd, g),
             *(a.astype(jnp.float32) for a in (x, wu, wd, g)))
  return got, ref


PAIR_NAMES = ["out", "dx", "dw_up", "dw_down", "dgates"]


def _assert_pair_matches(case, dtype, sum_dtype=None, impl="triton", keep_middle=True):
  """The fused pair's output and gradients (sums in ``sum_dtype``) in ``dtype``, finite
  and within its tolerance of the float32 reference."""
  got, ref = _pair_outputs(case, dtype, sum_dtype, impl=impl, keep_middle=keep_middle)
  for name, a, b in zip(PAIR_NAMES, got, ref):
    assert a.dtype == dtype, (name, a.dtype)
    assert np.all(np.isfinite(np.asarray(a, np.float32))), name
    err = _rel(a, b)
    assert err <= TOL[dtype], f"pair {case[0]} {name}: rel err {err:.2e} > {TOL[dtype]:.0e}"


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", PAIR_CASES, ids=[c[0] for c in PAIR_CASES])
def test_fused_pair_matches_reference(case, dtype):
  """cvmm_pair through the fused Triton kernels against two reference CVMMs (float32)."""
  if not is_available("triton"):
    pytest.skip("triton not available on this GPU")
  _assert_pair_matches(case, dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", PAIR_CASES, ids=[c[0] for c in PAIR_CASES])
def test_fused_pair_remaking_the_middle_matches_reference(case, dtype):
  """The same with ``keep_middle=False`` (remat="lean"): the backward pass makes the
  [P, H] middle again with the row kernel instead of keeping the forward's."""
  if not is_available("triton"):
    pytest.skip("triton not available on this GPU")
  _assert_pair_matches(case, dtype, keep_middle=False)


@pytest.mark.parametrize("keep_middle", [True, False], ids=["kept", "remade"])
@pytest.mark.parametrize("case", PAIR_CASES, ids=[c[0] for c in PAIR_CASES])
def test_mosaic_pair_matches_reference(case, keep_middle):
  """cvmm_pair through the Mosaic GPU kernels (the fused forward, the backward from the
  row and weight-gradient kernels, the middle kept or made again), bf16, against the
  float32 reference: output and every gradient."""
  if not is_available("mosaic"):
    pytest.skip("mosaic not available on this GPU")
  _assert_pair_matches(case, jnp.bfloat16, impl="mosaic", keep_middle=keep_middle)


def _row_candidate_cases(i: int = 128, o: int = 200):
  """Every tile candidate of the row kernel for I = i, O = o, bf16 (at the default
  narrow contraction: loop_n and one program per column block)."""
  if jax.default_backend() != "gpu":
    return []
  from kernels.cvmm_triton.rows import rows_candidates  # noqa: PLC0415
  return rows_candidates(i, o, jnp.bfloat16)


def _sum_inputs(seed, n, k, e, i, o, a_rows, transpose):
  """Random routing (N tokens, top-K of E), bf16 rows a [N * a_rows, I], bf16 expert
  matrices w [E, I, O] (and w as the kernel takes it: [E, O, I] when transposed) and
  float32 gates [N * K] for a fused-sum row kernel test."""
  from kernels import make_routing  # noqa: PLC0415
  ks = jax.random.split(jax.random.key(seed), 4)
  r = make_routing(jax.random.randint(ks[0], (n, k), 0, e), e)
  a = jax.random.normal(ks[1], (n * a_rows, i)).astype(jnp.bfloat16)
  w = (jax.random.normal(ks[2], (e, i, o)) * i ** -0.5).astype(jnp.bfloat16)
  g = jax.random.uniform(ks[3], (n * k,))
  return r, a, w, g, (jnp.swapaxes(w, 1, 2) if transpose else w)


def _pair_products(rows, w, expert):
  """[P, O] float32: rows [P, I] times their experts' matrices w[expert[p]] [E, I, O],
  in float32 at full precision, one expert at a time (a gathered [P, I, O] copy of the
  matrices takes GiBs at the test shapes: out of memory with several test workers
  sharing the GPU)."""
  rows = rows.astype(jnp.float32)

  def one(e, acc):
    y = jnp.dot(rows, w[e].astype(jnp.float32), precision="highest")
    return jnp.where((expert == e)[:, None], y, acc)

  return jax.jit(lambda: jax.lax.fori_loop(
      0, w.shape[0], one, jnp.zeros((rows.shape[0], w.shape[2]), jnp.float32)))()


def _gated_sum_reference(r, a, w, g, a_rows, out_rows):
  """[N * out_rows, O] float32: the gated sums of a fused-sum row kernel's pairs (pair
  p reads row p // K * a_rows + (p % K) // (K // a_rows) of a and adds into output
  row p // K * out_rows + (p % K) // (K // out_rows)), an einsum in float32."""
  n, k, o = r.n_tokens, r.k, w.shape[2]
  p = jnp.arange(n * k)
  arow = (p // k) * a_rows + (p % k) // (k // a_rows)
  y = _pair_products(a[arow], w, r.expert_index.reshape(-1))          # [P, O]
  return (y * g[:, None]).reshape(n, out_rows, k // out_rows, o).sum(2).reshape(-1, o)


# Largest error of the row kernel's sums of K = 4 rows: float32 sums only reorder
# float32 adds; float16 sums round each add to 11 bits (unit roundoff 2^-11 = 4.9e-4).
SUM_TOL = {"float32": 1e-5, "float16": 1e-3}


def _f16_tol(out, ref) -> float:
  """The float16 sums' tolerance for an output that the Triton scale-back returned in
  a 16-bit dtype: the sums' error plus that of rounding the exact result to out's dtype
  (0 for float32 outputs)."""
  return SUM_TOL["float16"] + _rel(ref.astype(out.dtype), ref)


def _sums_dtype(sums: str, a_dtype):
  """The dtype rows_matmul returns a fused sum in: a's with 16-bit sums (bf16 sums add
  into it; float16 sums are scaled back into it by the Triton kernel), float32 with
  float32 sums."""
  return jnp.dtype(a_dtype) if sums in ("float16", "bfloat16") else jnp.dtype(jnp.float32)


@pytest.mark.parametrize("sums", ["float32", "float16"])
@pytest.mark.parametrize("transpose", [False, True], ids=["w", "wT"])
@pytest.mark.parametrize("cfg", _row_candidate_cases(), ids=str)
def test_row_kernel_candidates_match_reference(cfg, transpose, sums):
  """rows_matmul with each tile candidate: gated sum over slots (out [N, O], atomics in
  float32 or in scaled float16) against an einsum of the same bf16 inputs in float32.
  O = 200 leaves a partly masked last column block (and takes scalar float16 atomics:
  no vector of 8 fits its rows)."""
  if not is_available("triton"):
    pytest.skip("triton not available on this GPU")
  from kernels.cvmm_triton.rows import rows_matmul  # noqa: PLC0415
  n, k, e, i, o = 300, 4, 8, 128, 200
  r, a, w, g, w_arg = _sum_inputs(3, n, k, e, i, o, k, transpose)
  config = CvmmConfig(sum_dtype=sums)
  out, _ = jax.jit(lambda a, w_, g: rows_matmul(a, w_, r, a_rows=k, out_rows=1,
                                                transpose_w=transpose, scale=g,
                                                cfg=cfg, config=config))(a, w_arg, g)
  y = _pair_products(a, w, r.expert_index.reshape(-1))                # [P, O]
  ref = (y * g[:, None]).reshape(n, k, o).sum(1)
  err = _rel(out, ref)
  assert out.dtype == _sums_dtype(sums, a.dtype), out.dtype
  tol = _f16_tol(out, ref) if sums == "float16" else SUM_TOL[sums]
  assert err <= tol, f"{cfg}: rel err {err:.2e}"


def _gluon_row_cases():
  """The Gluon row kernel's tile candidates (empty without a GPU that runs it; the
  two-half kernel's are tested with ROWS2_TILES)."""
  if jax.default_backend() != "gpu":
    return []
  from kernels.cvmm_triton.rows import rows_candidates  # noqa: PLC0415
  return [c for c in rows_candidates(128, 256, jnp.bfloat16, gluon=True)
          if c.gluon and c.halves == 1]


# (N, K, E, I, O, rows of a per token, output rows per token): σ-MoE down's sum over
# all slots; experts without pairs (E > N * K / 2) and I = 64; SwitchHead O's sum
# over the slots of each of 2 heads (4 pairs per output row), 40 experts.
GLUON_SHAPES = [(300, 4, 8, 128, 256, 4, 1), (40, 2, 64, 64, 128, 2, 1),
                (257, 8, 40, 128, 128, 8, 2)]


@pytest.mark.parametrize("sums", ["float16", "bfloat16"])
@pytest.mark.parametrize("transpose", [False, True], ids=["w", "wT"])
@pytest.mark.parametrize("shape", GLUON_SHAPES, ids=str)
@pytest.mark.parametrize("cfg", _gluon_row_cases(), ids=str)
def test_gluon_row_kernel_matches_reference(cfg, shape, transpose, sums):
  """The Gluon fused-sum row kernel (kernels/cvmm_triton/gluon_rows.py) with each of
  its tile candidates: gated sums over slots into 16-bit outputs, against an einsum of
  the same bf16 inputs in float32. Row counts are not multiples of the tiles (partial
  tiles); float16 sums within the float16 sums' tolerance, bf16 sums within bf16's."""
  if not is_available("triton"):
    pytest.skip("triton not available on this GPU")
  if not _hopper():
    pytest.skip("the Gluon kernels run on Hopper GPUs only")
  from kernels.cvmm_triton.rows import rows_matmul  # noqa: PLC0415
  n, k, e, i, o, a_rows, out_rows = shape
  cfg = dataclasses.replace(cfg, block_n=min(cfg.block_n, o), block_k=i)
  r, a, w, g, w_arg = _sum_inputs(5, n, k, e, i, o, a_rows, transpose)
  config = CvmmConfig(sum_dtype=sums)
  out, _ = jax.jit(lambda a, w_, g: rows_matmul(a, w_, r, a_rows=a_rows,
                                                out_rows=out_rows, transpose_w=transpose,
                                                scale=g, cfg=cfg, config=config))(
                                                    a, w_arg, g)
  ref = _gated_sum_reference(r, a, w, g, a_rows, out_rows)
  err = _rel(out, ref)
  assert out.dtype == _sums_dtype(sums, a.dtype), out.dtype
  assert np.all(np.isfinite(np.asarray(out, np.float32)))
  assert err <= (_f16_tol(out, ref) if sums == "float16" else TOL[jnp.bfloat16]), (
      f"{cfg} {shape}: rel err {err:.2e}")


# the two-half row kernel's tilings (BM of a half, BN, warps)
ROWS2_TILES = [(128, 64, 8), (64, 64, 4), (128, 32, 8)]


@pytest.mark.parametrize("sums", ["float16", "bfloat16"])
@pytest.mark.parametrize("transpose", [False, True], ids=["w", "wT"])
@pytest.mark.parametrize("shape", GLUON_SHAPES, ids=str)
@pytest.mark.parametrize("tile", ROWS2_TILES, ids=str)
def test_gluon_rows2_kernel_matches_reference(tile, shape, transpose, sums, monkeypatch):
  """The Gluon two-half row kernel (each column block of the expert's matrix used for
  two halves of a tile) through rows_matmul with its tile: gated sums over slots into
  16-bit outputs, against an einsum of the same bf16 inputs in float32; partial tiles
  and halves, experts without pairs; float16 sums scaled back by the Triton kernel."""
  if not is_available("triton"):
    pytest.skip("triton not available on this GPU")
  if not _hopper():
    pytest.skip("the Gluon kernels run on Hopper GPUs only")
  from kernels.autotune import TileConfig  # noqa: PLC0415
  from kernels.cvmm_triton import rows as rows_mod  # noqa: PLC0415
  n, k, e, i, o, a_rows, out_rows = shape
  bm, bn, nw = tile
  cfg = TileConfig(bm, min(bn, o), i, nw, 2, loop_n=True, gluon=True, halves=2)
  r, a, w, g, w_arg = _sum_inputs(5, n, k, e, i, o, a_rows, transpose)
  launched = []
  orig = rows_mod.gluon_rows_sum
  monkeypatch.setattr(rows_mod, "gluon_rows_sum",     # records each launch's halves
                      lambda *a_, **kw: launched.append(a_[5].halves) or orig(*a_, **kw))
  config = CvmmConfig(sum_dtype=sums)
  out, _ = jax.jit(lambda a, w_, g: rows_mod.rows_matmul(
      a, w_, r, a_rows=a_rows, out_rows=out_rows, transpose_w=transpose, scale=g,
      cfg=cfg, config=config))(a, w_arg, g)
  assert launched == [2]
  ref = _gated_sum_reference(r, a, w, g, a_rows, out_rows)
  err = _rel(out, ref)
  assert out.dtype == _sums_dtype(sums, a.dtype), out.dtype
  assert np.all(np.isfinite(np.asarray(out, np.float32)))
  assert err <= (_f16_tol(out, ref) if sums == "float16" else TOL[jnp.bfloat16]), (
      f"{tile} {shape}: rel err {err:.2e}")


@pytest.mark.parametrize("transpose", [False, True], ids=["w", "wT"])
# a wide contraction (the up and V projections': several steps over I, one column block)
@pytest.mark.parametrize("cfg", _row_candidate_cases(520, 136), ids=str)
def test_plain_row_kernel_candidates_match_reference(cfg, transpose):
  """rows_matmul with each tile candidate, one product per pair (out [P, O] in bf16, no
  sum), I = 520 (a partial last step over I) and O = 136 (a partial column block),
  against an einsum of the same bf16 inputs in float32: within bf16's rounding."""
  if not is_available("triton"):
    pytest.skip("triton not available on this GPU")
  from kernels import make_routing  # noqa: PLC0415
  from kernels.cvmm_triton.rows import rows_matmul  # noqa: PLC0415
  n, k, e, i, o = 700, 2, 5, 520, 136
  ks = jax.random.split(jax.random.key(4), 3)
  r = make_routing(jax.random.randint(ks[0], (n, k), 0, e), e)
  a = jax.random.normal(ks[1], (n, i)).astype(jnp.bfloat16)
  w = (jax.random.normal(ks[2], (e, i, o)) * i ** -0.5).astype(jnp.bfloat16)
  w_arg = jnp.swapaxes(w, 1, 2) if transpose else w
  out, _ = jax.jit(lambda a, w_: rows_matmul(a, w_, r, a_rows=1, out_rows=k,
                                             transpose_w=transpose, cfg=cfg))(a, w_arg)
  ref = _pair_products(jnp.repeat(a, k, axis=0), w, r.expert_index.reshape(-1))
  assert out.dtype == jnp.bfloat16
  err = _rel(out, ref)
  assert err <= 1e-2, f"{cfg}: rel err {err:.2e}"


def _dw_candidate_cases():
  """Every tile candidate of the weight-gradient kernel, bf16, for the shapes below."""
  if jax.default_backend() != "gpu":
    return []
  from kernels.cvmm_triton.dw import dw_candidates  # noqa: PLC0415
  cands = dw_candidates(300 * 4, 8, 200, 136, jnp.bfloat16)
  # and each expert's rows split over 2 and 4 programs (at this shape the heuristic
  # keeps 1; the autotuner's split candidates appear at larger ones)
  return cands + [dataclasses.replace(cands[0], splits=s) for s in (2, 4)]


@pytest.mark.parametrize("cfg", _dw_candidate_cases(), ids=str)
def test_dw_kernel_candidates_match_reference(cfg):
  """expert_gram with each tile candidate (gathered rows, scaled, I = 200 and O = 136
  leave partly masked blocks, one expert without pairs) against a float32 einsum."""
  if not is_available("triton"):
    pytest.skip("triton not available on this GPU")
  from kernels import make_routing  # noqa: PLC0415
  from kernels.cvmm_triton.dw import expert_gram  # noqa: PLC0415
  n, k, e, i, o = 300, 4, 8, 200, 136
  ks = jax.random.split(jax.random.key(4), 4)
  idx = jax.random.randint(ks[0], (n, k), 0, e - 1)              # expert e-1 gets none
  r = make_routing(idx, e)
  a = jax.random.normal(ks[1], (n, i)).astype(jnp.bfloat16)      # one row per token
  b = jax.random.normal(ks[2], (n * k, o)).astype(jnp.bfloat16)  # one row per pair
  g = jax.random.uniform(ks[3], (n * k,))
  dw = jax.jit(lambda a, b, g: expert_gram(a, b, r, a_rows=1, b_rows=k, scale=g,
                                           out_dtype=jnp.float32, cfg=cfg))(a, b, g)
  onehot = jax.nn.one_hot(idx.reshape(-1), e, dtype=jnp.float32)   # [P, E]
  bs = b.astype(jnp.float32) * g[:, None]
  ref = jnp.einsum("PE,PI,PO->EIO", onehot, jnp.repeat(a.astype(jnp.float32), k, axis=0),
                   bs, precision="highest")
  assert float(jnp.abs(dw[e - 1]).max()) == 0.0
  err = _rel(dw, ref)
  assert err <= 1e-2, f"{cfg}: rel err {err:.2e}"


@pytest.mark.parametrize("case", [c for c in CASES if c[6] % 8 == 0 and c[2] > 1],
                         ids=lambda c: c[0])
def test_bf16_sums_match_reference(case):
  """sum_dtype="bfloat16": the gated sums (and the backward's sums over slots) add
  bf16 rows into a bf16 output. Same tolerance as every bf16 result."""
  if not is_available("triton"):
    pytest.skip("triton not available on this GPU")
  from kernels.cvmm_triton.rows import rows_matmul  # noqa: PLC0415
  from kernels.cvmm_triton.scales import bf16_sums  # noqa: PLC0415
  if not bf16_sums(jnp.bfloat16, case[6], "bfloat16"):
    pytest.skip("bf16 sums need sm90+")
  x, w, g, r, ct = _inputs(case, jnp.bfloat16, True)
  n, m, i = x.shape
  rows = lambda config: (lambda x, w, g: rows_matmul(  # noqa: E731
      x.reshape(n * m, i), w, r, a_rows=m, out_rows=1, scale=g.reshape(-1),
      config=config)[0])
  bf16 = CvmmConfig(sum_dtype="bfloat16")
  assert jax.jit(rows(bf16))(x, w, g).dtype == jnp.bfloat16
  assert not _ran_float16_sums(rows(bf16), x, w, g)     # the bf16 sums ran ...
  assert _ran_float16_sums(rows(CvmmConfig()), x, w, g)  # ... and are not the default
  got = _outputs(jax.jit(lambda x, r, w, g: cvmm(x, r, w, g, config=bf16.replace(
      impl="triton"))), x, w, g, r, ct)
  _assert_bf16_results(case[0], got, x, w, g, r, ct)


@pytest.mark.parametrize("sums", ["bfloat16", "float32"])
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("case", [c for c in CASES if c[0] in (
    "basic", "m_divisor", "odd_sizes", "empty_experts", "wide_many_slots")], ids=lambda c: c[0])
def test_mosaic_sums_match_reference(case, gated, sums):
  """The Mosaic path with sum_dtype="bfloat16" (gated sums in the forward and the sums
  over slots of dx add bf16 rows into a bf16 output) and "float32" (TMA reductions into
  float32; the default scaled float16 sums: test_gpu_impl_matches_reference). Same
  tolerance as every bf16 result."""
  if not is_available("mosaic"):
    pytest.skip("mosaic not available on this GPU")
  x, w, g, r, ct = _inputs(case, jnp.bfloat16, gated)
  got = _outputs(jax.jit(lambda x, r, w, g: cvmm(x, r, w, g, config=_sums(sums, "mosaic"))),
                 x, w, g, r, ct)
  _assert_bf16_results(case[0], got, x, w, g, r, ct)


@pytest.mark.parametrize("case", [c for c in PAIR_CASES if c[6] % 8 == 0],
                         ids=lambda c: c[0])
def test_bf16_sums_fused_pair(case):
  """The fused pair with CvmmConfig(sum_dtype="bfloat16") (output and dx summed in
  bf16): the fused pair's matches the reference as with the default sums."""
  if not is_available("triton"):
    pytest.skip("triton not available on this GPU")
  from kernels import make_routing  # noqa: PLC0415
  from kernels.cvmm_triton.pair import pair_rows  # noqa: PLC0415
  from kernels.cvmm_triton.scales import bf16_sums  # noqa: PLC0415
  if not bf16_sums(jnp.bfloat16, case[6], "bfloat16"):
    pytest.skip("bf16 sums need sm90+")
  _, n, k, e, d, h, o, _ = case
  r = make_routing(jax.random.randint(jax.random.key(0), (n, k), 0, e), e)
  z = lambda *s: jnp.zeros(s, jnp.bfloat16)  # noqa: E731
  config = CvmmConfig(sum_dtype="bfloat16")
  out = jax.jit(lambda: pair_rows(z(n, d), z(e, d, h), z(e, h, o), z(n, k), r,
                                  config=config)["out"])()
  assert out.dtype == jnp.bfloat16               # the config switched the sums
  _assert_pair_matches(case, jnp.bfloat16, "bfloat16")


def _ran_float16_sums(fn, *args) -> bool:
  """Whether the compiled computation of fn has a float16 array (the summed output of
  a kernel; nothing else in these bf16 computations is float16)."""
  return re.search(r"(?<!b)f16\[", str(jax.make_jaxpr(fn)(*args))) is not None


def _assert_half_sums_close(label, names, got, ref, f32s, finite=True):
  """Every result of a 16-bit-sum computation (``got``) bf16, finite (``finite``) and
  within bf16's tolerance of the float32 reference ``ref``; output and dx no further
  from it than 1.5x the same computation's with float32 sums (``f32s``)."""
  for name, a, b, c in zip(names, got, ref, f32s):
    assert a.dtype == jnp.bfloat16, (label, name, a.dtype)
    if finite:
      assert np.all(np.isfinite(np.asarray(a, np.float32))), (label, name)
    err = _rel(a, b)
    assert err <= TOL[jnp.bfloat16], f"{label} {name}: rel err {err:.2e}"
    if name in ("out", "dx"):
      assert err <= 1.5 * _rel(c, b), (label, name, err, _rel(c, b))


def _impl_sums(impl: str, sum_dtype: str):
  """cvmm through ``impl``'s kernels with the fused sums in ``sum_dtype``."""
  config = CvmmConfig(impl=impl, sum_dtype=sum_dtype)
  return lambda x, r, w, g: cvmm(x, r, w, g, config=config)


@pytest.mark.parametrize("impl", ["triton", "mosaic"])
@pytest.mark.parametrize("case", [c for c in CASES if c[2] > c[3]], ids=lambda c: c[0])
def test_float16_sums_match_reference(case, impl):
  """sum_dtype="float16" (scaled float16 sums), bf16 inputs: every result within the
  bf16 tolerance, and the output and dx no more than 1.5x as far from the float32
  reference as with float32 sums (bf16 sums: about 2.3x, bench/RESULTS.md)."""
  if not is_available(impl):
    pytest.skip(f"{impl} not available on this GPU")
  x, w, g, r, ct = _inputs(case, jnp.bfloat16, True)
  fn = lambda sd: jax.jit(_impl_sums(impl, sd))  # noqa: E731
  assert _ran_float16_sums(fn("float16"), x, r, w, g)
  assert not _ran_float16_sums(fn("float32"), x, r, w, g)
  got = _outputs(fn("float16"), x, w, g, r, ct)
  f32s = _outputs(fn("float32"), x, w, g, r, ct)
  up = lambda a: a.astype(jnp.float32)  # noqa: E731
  ref = _outputs(cvmm_reference, up(x), up(w), up(g), r, ct)
  _assert_half_sums_close(case[0], ["out", "dx", "dw", "dgates"], got, ref, f32s,
                          finite=False)


@pytest.mark.parametrize("impl", ["triton", "mosaic"])
@pytest.mark.parametrize("mag", [1e-6, 1e4], ids=["tiny", "huge"])
@pytest.mark.parametrize("case", [c for c in PAIR_CASES if c[0] in ("basic", "odd_sizes",
                                                                   "sigma_moe_like")],
                         ids=lambda c: c[0])
def test_float16_sums_pair(case, mag, impl):
  """The σ-MoE pair (fused on both paths) with float16 sums, inputs 1e-6
  or 1e4 in magnitude (their sums would underflow or overflow float16 unscaled; bf16
  holds them): every result within the bf16 tolerance, finite, and the output and dx
  within 1.5x the float32 sums' error."""
  if not is_available(impl):
    pytest.skip(f"{impl} not available on this GPU")
  got, ref = _pair_outputs(case, jnp.bfloat16, "float16", mag, impl=impl)
  f32s, _ = _pair_outputs(case, jnp.bfloat16, "float32", mag, impl=impl)
  _assert_half_sums_close(f"pair {impl} {case[0]} {mag}", PAIR_NAMES, got, ref, f32s)


# SwitchHead's projections with k = 2 per head, whose fused sums take the unit-pair
# kernel (kernels/cvmm_triton/gluon_pairs.py, pairs_sum_kernel): (name, N, H, Ea, Dh, D,
# kind). "sparse": most expert combinations get no unit; "one_combination": every head
# picks its experts 0 and 1, in either order.
UNIT_PAIR_CASES = [
    ("basic", 300, 4, 10, 128, 256, "random"),
    ("two_heads", 257, 2, 8, 64, 128, "random"),
    ("sparse", 40, 4, 10, 128, 128, "random"),
    ("one_combination", 190, 4, 10, 128, 128, "one"),
]
# Tiles of the unit-pair kernel (BM, BN, warps, buffers): None the autotuner's, then
# every candidate (kernels.cvmm_triton.gluon_pairs.UNIT_PAIRS_TILES)
UNIT_PAIR_TILES = [None, (128, 64, 8, 2), (64, 64, 4, 2), (128, 64, 8, 3), (128, 32, 8, 2)]


def _head_inputs(case, gated):
  """x, w, gates, routing (with unit pairs) and cotangent of SwitchHead's O (gated: x
  [N, H, Dh], w [H*Ea, Dh, D]) or V (plain: x [N, 1, D], w [H*Ea, D, Dh])."""
  from kernels import make_head_routing  # noqa: PLC0415
  _, n, h, ea, dh, d, kind = case
  ks = jax.random.split(jax.random.key(len(case[0]) + n), 6)
  if kind == "one":
    flip = jax.random.uniform(ks[0], (n, h, 1)) < 0.5
    idx = jnp.where(flip, jnp.array([1, 0]), jnp.array([0, 1])).astype(jnp.int32)
  else:
    idx = jax.lax.top_k(jax.random.normal(ks[0], (n, h, ea)), 2)[1]
  r = make_head_routing(idx, ea, unit_pairs=True)
  if gated:
    x = jax.random.normal(ks[1], (n, h, dh)).astype(jnp.bfloat16)
    w = (jax.random.normal(ks[2], (h * ea, dh, d)) * dh ** -0.5).astype(jnp.bfloat16)
    g = jax.random.uniform(ks[3], (n, h * 2)).astype(jnp.bfloat16)
    ct = jax.random.normal(ks[4], (n, d))
  else:
    x = jax.random.normal(ks[1], (n, 1, d)).astype(jnp.bfloat16)
    w = (jax.random.normal(ks[2], (h * ea, d, dh)) * d ** -0.5).astype(jnp.bfloat16)
    g = None
    ct = jax.random.normal(ks[4], (n, h * 2, dh))
  return x, w, g, r, ct


@pytest.mark.parametrize("tile", UNIT_PAIR_TILES,
                         ids=lambda t: "default" if t is None else "x".join(map(str, t)))
@pytest.mark.parametrize("gated", [False, True], ids=["V", "O"])
@pytest.mark.parametrize("case", UNIT_PAIR_CASES, ids=[c[0] for c in UNIT_PAIR_CASES])
def test_unit_pairs_match_reference(case, gated, tile, monkeypatch):
  """SwitchHead's O (gated: its forward sums over the heads' two experts) and V (plain:
  its dx sums so) with unit pairs: forward and every gradient against the float32
  reference within bf16's tolerance, output and dx no further from it than 1.5x the
  float32 sums' error, and the unit-pair kernel did run (O's forwards, V's dx), with
  the autotuner's tile or the one named."""
  if not is_available("triton"):
    pytest.skip("triton not available on this GPU")
  if not _hopper():
    pytest.skip("the unit-pair kernel runs on Hopper GPUs only")
  from kernels.cvmm_triton import rows as rows_mod  # noqa: PLC0415
  from kernels.cvmm_triton.gluon_rows import gluon_tile  # noqa: PLC0415
  calls = []
  orig = rows_mod.gluon_pairs_sum

  def spy(*a, **kw):         # records each launch's tile (replaced by the one named)
    if tile is not None:
      a = a[:4] + (gluon_tile(tile, a[0].shape[1]),) + a[5:]
    calls.append(a[4])
    return orig(*a, **kw)

  monkeypatch.setattr(rows_mod, "gluon_pairs_sum", spy)
  x, w, g, r, ct = _head_inputs(case, gated)
  assert r.pairs is not None
  got = _outputs(_impl_sums("triton", "float16"), x, w, g, r, ct)
  assert len(calls) == (2 if gated else 1), calls   # O: two forwards; V: one dx
  if tile is not None:
    assert all((c.block_m, c.block_n, c.num_warps, c.num_stages) == tile for c in calls)
  f32s = _outputs(_impl_sums("triton", "float32"), x, w, g, r, ct)
  up = lambda a: None if a is None else a.astype(jnp.float32)  # noqa: E731
  ref = _outputs(cvmm_reference, up(x), up(w), up(g), r, ct)
  _assert_half_sums_close(case[0], ["out", "dx", "dw", "dgates"], got, ref, f32s)


def _grouped_reference(h):
  """The float32 reference of SwitchHead V's gated sums per head (cvmm with out_rows=h)."""
  def fn(x, r, w, g):
    y = cvmm_reference(x, r, w).astype(jnp.float32)                  # [N, K, O]
    n, k, o = y.shape
    return jnp.einsum("NHSO,NHS->NHO", y.reshape(n, h, k // h, o),
                      g.astype(jnp.float32).reshape(n, h, k // h),
                      precision=jax.lax.Precision.HIGHEST)
  return fn


@pytest.mark.parametrize("units", [True, False], ids=["unit_pairs", "pairs"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", UNIT_PAIR_CASES, ids=[c[0] for c in UNIT_PAIR_CASES])
def test_head_sums_match_reference(case, dtype, units, monkeypatch):
  """SwitchHead's V with its gated sum per head (cvmm's out_rows = heads) through the
  Triton kernels, the routing with and without unit pairs: forward and every gradient
  (x, w, gates) against the float32 reference within the dtype's tolerance; in bf16
  the output and dx no further from it than 1.5x the float32 sums'. With unit pairs
  and d_head < d_model the unit-store kernel writes the forward sums and makes the
  backward's dgates (d_head == d_model: the per-slot products, summed in XLA)."""
  if not is_available("triton"):
    pytest.skip("triton not available on this GPU")
  from kernels import make_routing  # noqa: PLC0415
  from kernels.cvmm_triton import rows as rows_mod  # noqa: PLC0415
  calls = []
  orig = rows_mod.units_store
  monkeypatch.setattr(rows_mod, "units_store",
                      lambda *a, **kw: calls.append(a[4] is None) or orig(*a, **kw))
  x, w, _, r, _ = _head_inputs(case, False)
  if not units:
    r = make_routing(r.expert_index, r.n_experts)
  _, n, h, _, dh, _, _ = case
  ks = jax.random.split(jax.random.key(n), 2)
  g = jax.random.uniform(ks[0], (n, 2 * h)).astype(dtype)
  ct = jax.random.normal(ks[1], (n, h, dh))
  x, w = x.astype(dtype), w.astype(dtype)

  def sums(sum_dtype):
    config = CvmmConfig(impl="triton", sum_dtype=sum_dtype)
    return lambda x, r, w, g: cvmm(x, r, w, g, out_rows=h, config=config)

  got = _outputs(sums("float16"), x, w, g, r, ct)
  # the forward; grad's forward and its dgates (dgate rows given)
  assert calls == ([True, True, False] if units and dh < case[5] else []), calls
  assert got[0].shape == (n, h, dh) and got[0].dtype == dtype
  up = lambda a: a.astype(jnp.float32)  # noqa: E731
  ref = _outputs(_grouped_reference(h), up(x), up(w), up(g), r, ct)
  f32s = _outputs(sums("float32"), x, w, g, r, ct)
  for name, a, b, c in zip(["out", "dx", "dw", "dgates"], got, ref, f32s):
    err = _rel(a, b)
    assert err <= TOL[dtype], f"{case[0]} {name}: rel err {err:.2e}"
    if dtype == jnp.bfloat16 and name in ("out", "dx"):
      assert err <= 1.5 * _rel(c, b), (case[0], name, err, _rel(c, b))


@pytest.mark.parametrize("case", UNIT_PAIR_CASES, ids=[c[0] for c in UNIT_PAIR_CASES])
def test_mosaic_head_sums_match_reference(case):
  """SwitchHead's V with its gated sum per head (cvmm's out_rows = heads) through the
  Mosaic kernels, which add each head's rows in the row kernel and take dgates from
  dx's product: forward and every gradient (x, w, gates) against the float32 reference
  within bf16's tolerance, the output and dx with float16 sums (the default) no further
  from it than 1.5x the float32 sums'."""
  if not is_available("mosaic"):
    pytest.skip("mosaic not available on this GPU")
  x, w, _, r, _ = _head_inputs(case, False)
  _, n, h, _, dh, _, _ = case
  ks = jax.random.split(jax.random.key(n), 2)
  g = jax.random.uniform(ks[0], (n, 2 * h)).astype(jnp.bfloat16)
  ct = jax.random.normal(ks[1], (n, h, dh))

  def sums(sum_dtype):
    config = CvmmConfig(impl="mosaic", sum_dtype=sum_dtype)
    return lambda x, r, w, g: cvmm(x, r, w, g, out_rows=h, config=config)

  got = _outputs(sums("float16"), x, w, g, r, ct)
  assert got[0].shape == (n, h, dh)
  up = lambda a: a.astype(jnp.float32)  # noqa: E731
  ref = _outputs(_grouped_reference(h), up(x), up(w), up(g), r, ct)
  f32s = _outputs(sums("float32"), x, w, g, r, ct)
  _assert_half_sums_close(f"mosaic heads {case[0]}", ["out", "dx", "dw", "dgates"], got,
                          ref, f32s)


# unit-store tiles: the autotuner's and every candidate (units_candidates' index)
UNIT_STORE_TILES = [None, 0, 1, 2, 3]


@pytest.mark.parametrize("tile", UNIT_STORE_TILES, ids=lambda t: "default" if t is None
                         else f"cand{t}")
@pytest.mark.parametrize("case", UNIT_PAIR_CASES, ids=[c[0] for c in UNIT_PAIR_CASES])
def test_unit_store_matches_reference(case, tile, monkeypatch):
  """SwitchHead's O with unit pairs: its dx (a head's two experts into the head's row,
  with dgates) runs the unit-store kernel once; forward and every gradient against the
  float32 reference within bf16's tolerance, and dx no further from it than 1.5x that
  of float32 sums through the row kernels (the same routing without unit pairs; the
  unit-store kernel adds in float32 and rounds once)."""
  if not is_available("triton"):
    pytest.skip("triton not available on this GPU")
  from kernels import make_routing  # noqa: PLC0415
  from kernels.cvmm_triton import rows as rows_mod  # noqa: PLC0415
  from kernels.cvmm_triton.units import units_candidates  # noqa: PLC0415
  calls = []
  orig = rows_mod.units_store
  if tile is None:
    wrap = lambda *a, **kw: calls.append(a[5]) or orig(*a, **kw)  # noqa: E731
  else:
    cfg = units_candidates(case[4], jnp.bfloat16)[tile]
    wrap = lambda *a, **kw: calls.append(cfg) or orig(*a[:5], cfg, *a[6:], **kw)  # noqa: E731
  monkeypatch.setattr(rows_mod, "units_store", wrap)
  x, w, g, r, ct = _head_inputs(case, True)
  got = _outputs(_impl_sums("triton", "float16"), x, w, g, r, ct)
  assert len(calls) == 1, calls                        # O's dx
  plain = make_routing(r.expert_index, r.n_experts)    # no unit pairs: the row kernels
  assert plain.pairs is None
  f32s = _outputs(_impl_sums("triton", "float32"), x, w, g, plain, ct)
  assert len(calls) == 1, calls
  up = lambda a: a.astype(jnp.float32)  # noqa: E731
  ref = _outputs(cvmm_reference, up(x), up(w), up(g), r, ct)
  _assert_half_sums_close(f"{case[0]} {tile}", ["out", "dx", "dw", "dgates"], got, ref,
                          f32s)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("reverse", [True, False], ids=["last_first", "first_first"])
@pytest.mark.parametrize("shape", [(65, 1024), (300, 200), (8, 8)], ids=str)
def test_unscale_kernel_matches_xla(shape, reverse, dtype):
  """unscale_rows (the Triton scale-back of float16 sums) equals XLA's pass bit for
  bit, in place (its input dead after the call) and where the input is used again (XLA
  must copy it first: the input then comes back unchanged); infinities, nan and 2^120
  scales included."""
  if not is_available("triton"):
    pytest.skip("triton not available on this GPU")
  from kernels.cvmm_triton.scales import unscale_rows  # noqa: PLC0415
  r, o = shape
  ks = jax.random.split(jax.random.key(r + o), 2)
  x = (jax.random.normal(ks[0], (r, o)) * 300).astype(jnp.float16)
  x = x.at[0, :4].set(jnp.array([jnp.inf, -jnp.inf, jnp.nan, 0.0], jnp.float16))
  inv = 2.0 ** jax.random.randint(ks[1], (r,), -30, 30).astype(jnp.float32)
  inv = inv.at[r // 2].set(2.0 ** 120)
  want = (x.astype(jnp.float32) * inv[:, None]).astype(dtype)
  bits = lambda v: np.asarray(jax.lax.bitcast_convert_type(v, jnp.uint16))  # noqa: E731
  f = jax.jit(lambda x, s: unscale_rows(x * jnp.float16(1), s, dtype, reverse=reverse))
  got = f(x, inv)
  assert got.dtype == jnp.dtype(dtype)
  np.testing.assert_array_equal(bits(got), bits(want))
  g = jax.jit(lambda x, s: (unscale_rows(x, s, dtype, reverse=reverse), x))
  got2, x_after = g(x, inv)
  np.testing.assert_array_equal(bits(got2), bits(want))
  np.testing.assert_array_equal(bits(x_after), bits(x))


@pytest.mark.parametrize("case", ["down", "switchhead_o", "pair"])
def test_unscale_kernel_in_cvmm(case):
  """The float16 sums scaled back by the Triton kernels through the library: the σ-MoE
  down projection (gated rows, forward and dx), SwitchHead's O (unit pairs where the
  routing carries them) and the fused pair, forward and every gradient in bf16,
  against the float32 reference; the outputs' dtype is the inputs'."""
  if not is_available("triton"):
    pytest.skip("triton not available on this GPU")
  from kernels import make_head_routing, make_routing  # noqa: PLC0415
  config = CvmmConfig(impl="triton", sum_dtype="float16")
  ks = jax.random.split(jax.random.key(3), 6)
  if case == "pair":
    n, k, e, d, h = 700, 8, 40, 256, 128
    r = make_routing(jax.random.randint(ks[0], (n, k), 0, e), e)
    x = jax.random.normal(ks[1], (n, d)).astype(jnp.bfloat16)
    wu = (jax.random.normal(ks[2], (e, d, h)) * d ** -0.5).astype(jnp.bfloat16)
    wd = (jax.random.normal(ks[3], (e, h, d)) * h ** -0.5).astype(jnp.bfloat16)
    g = jax.random.uniform(ks[4], (n, k))
    ct = jax.random.normal(ks[5], (n, d))
    from kernels.cvmm_triton import cvmm_triton_pair  # noqa: PLC0415
    f32 = lambda v: v.astype(jnp.float32)  # noqa: E731
    fns = [lambda x, wu, wd, g: cvmm_triton_pair(x, r, wu, wd, g, config=config),
           lambda x, wu, wd, g: cvmm_pair_reference(f32(x), r, f32(wu), f32(wd), g)]
    args = (x, wu, wd, g)
  else:
    if case == "down":                     # x: each pair's own row
      n, m, k, e, i, o = 200, 16, 16, 60, 128, 512      # (the reference gathers [N, K, I, O])
      r = make_routing(jax.lax.top_k(jax.random.normal(ks[0], (n, e)), k)[1], e)
    else:                                  # x: each head's row, k = 2 per head
      n, m, e, i, o = 1200, 4, 10, 64, 256
      k = 2 * m
      idx = jax.lax.top_k(jax.random.normal(ks[0], (n, m, e)), 2)[1]
      r = make_head_routing(idx, e, unit_pairs=True)
    x = jax.random.normal(ks[1], (n, m, i)).astype(jnp.bfloat16)
    w = (jax.random.normal(ks[2], (r.n_experts, i, o)) * i ** -0.5).astype(jnp.bfloat16)
    g = jax.random.uniform(ks[4], (n, k))
    ct = jax.random.normal(ks[5], (n, o))
    fns = [lambda x, w, g: cvmm(x, r, w, g, config=config),
           lambda x, w, g: cvmm_reference(x.astype(jnp.float32), r,
                                          w.astype(jnp.float32), g)]
    args = (x, w, g)
  outs = []
  for f in fns:
    loss = lambda *a, f=f: jnp.sum(f(*a).astype(jnp.float32) * ct)  # noqa: E731
    outs.append((jax.jit(f)(*args),) + jax.jit(jax.grad(loss, argnums=tuple(
        range(len(args)))))(*args))
  assert outs[0][0].dtype == jnp.bfloat16
  for j, (got, want) in enumerate(zip(*outs)):
    err = _rel(got, want)
    assert np.all(np.isfinite(np.asarray(got, np.float32))), (case, j)
    assert err <= TOL[jnp.bfloat16], (case, j, err)


# (N, K, E, I, O, a_rows, out_rows, transposed): σ-MoE down (each pair's own row, one
# output row per token) and up's dx (W^T, 16 slots into one row); SwitchHead O's shape
CHECKED_SHAPES = [(700, 16, 40, 128, 1024, 16, 1, False),
                  (700, 16, 40, 128, 1024, 16, 1, True),
                  (257, 8, 40, 128, 128, 8, 2, False)]


@pytest.mark.parametrize("kernel", ["rows2", "triton"])
@pytest.mark.parametrize("shape", CHECKED_SHAPES, ids=str)
def test_checked_f16_scales_repair_rows(shape, kernel, monkeypatch):
  """Checked float16 scales (CvmmConfig(f16_scales="checked"), the default) through
  rows_matmul with the two-half Gluon kernel and with a Triton row tile, bf16 in and
  out: with the estimate right no row is recomputed and the sums match float32; with
  the estimate 2^20 too low (every row's sums overflow float16) or 2^30 too high (every
  row below float16's precision) every row is recomputed in float32; a row 2^16 above
  its token's sample (its sums overflow), or holding an infinity, alone."""
  if not is_available("triton"):
    pytest.skip("triton not available on this GPU")
  if kernel == "rows2" and not _hopper():
    pytest.skip("the Gluon kernels run on Hopper GPUs only")
  from kernels.autotune import TileConfig  # noqa: PLC0415
  from kernels.cvmm_triton import rows as rows_mod, scales  # noqa: PLC0415
  n, k, e, i, o, a_rows, out_rows, transpose = shape
  cfg = (TileConfig(128, 64, i, 8, 2, loop_n=True, gluon=True, halves=2)
         if kernel == "rows2" else rows_mod.triton_rows_candidates(i, o, jnp.bfloat16)[0])
  config = CvmmConfig(sum_dtype="float16", f16_scales="checked")
  r, a, w, g, w_arg = _sum_inputs(9, n, k, e, i, o, a_rows, transpose)
  seen, orig = [], rows_mod.unscale_rows_checked

  def spy(out, inv_s, sampled, *args, **kw):
    seen.append((np.asarray(out, np.float32), np.asarray(sampled)))
    return orig(out, inv_s, sampled, *args, **kw)

  monkeypatch.setattr(rows_mod, "unscale_rows_checked", spy)
  p = jnp.arange(n * k)

  def run(a, bad_rows=()):
    out, _ = rows_mod.rows_matmul(a, w_arg, r, a_rows=a_rows, out_rows=out_rows,
                                  transpose_w=transpose, scale=g, cfg=cfg, config=config)
    sums, sampled = seen.pop()
    assert not seen and out.dtype == jnp.bfloat16
    top = np.where(np.isnan(sums), np.inf, np.abs(sums)).max(axis=1)
    bad = ~np.isfinite(top) | ((top < 1) & ((top > 0) | (sampled == 1)))
    np.testing.assert_array_equal(np.flatnonzero(bad), bad_rows)
    y = _pair_products(a[(p // k) * a_rows + (p % k) // (k // a_rows)], w,
                       r.expert_index.reshape(-1)) * g[:, None]         # [P, O] terms
    ref = np.asarray(y.reshape(n, out_rows, k // out_rows, o).sum(2).reshape(-1, o))
    rows_ok = np.all(np.isfinite(ref), axis=1)
    got = np.asarray(out, np.float32)
    assert np.array_equal(np.all(np.isfinite(got), axis=1), rows_ok)
    ref = ref[rows_ok]
    err = _rel(got[rows_ok], ref)
    assert err <= SUM_TOL["float16"] + _rel(ref.astype(jnp.bfloat16), ref), err

  run(a)
  # the estimate's aim (a private constant of the scales: no other way to make it wrong)
  for aim in (-20, 30):
    monkeypatch.setattr(scales, "_CHECK_AIM_BELOW", aim)
    run(a, bad_rows=np.arange(n * out_rows))
  monkeypatch.setattr(scales, "_CHECK_AIM_BELOW", 2)
  # token 3's last row (not the estimate's sample) 2^16 larger; token 5's with an inf
  last = lambda t: t * a_rows + a_rows - 1  # noqa: E731
  run(a.at[last(3)].multiply(2.0 ** 16), bad_rows=[3 * out_rows + out_rows - 1])
  run(a.at[last(5), 0].set(jnp.inf), bad_rows=[5 * out_rows + out_rows - 1])
