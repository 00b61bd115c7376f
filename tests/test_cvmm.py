"""CVMM on the CPU: the pure-JAX tiled implementation against the reference, forward and
every gradient; routing tiles, tile configs, the autotuner and the kernels' settings.
(The Triton kernels in Triton's CPU interpreter: tests/interpreter/.)"""
from __future__ import annotations

import json
import os
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import cvmm
from kernels.autotune import Autotuner, TileConfig
from kernels.cvmm_reference import cvmm_reference
from cvmm_cases import TOL, inputs as _inputs, outputs as _outputs, rel_err as _rel
from cvmm_cases import by_expert_reference
from cvmm_cases import routing_of_kind as _routing

# (name, N, K, M, E, I, O, routing kind)
CASES = [
    ("basic", 60, 4, 1, 8, 32, 24, "random"),
    ("m_eq_k", 50, 4, 4, 8, 24, 32, "random"),
    ("m_divisor", 37, 6, 3, 5, 20, 12, "random"),
    ("m_divisor_2", 41, 4, 2, 6, 16, 16, "random"),
    ("k1", 45, 1, 1, 6, 16, 20, "random"),
    ("one_expert", 30, 2, 2, 1, 16, 16, "random"),
    ("empty_experts", 6, 2, 1, 40, 16, 16, "random"),
    ("all_one_expert", 33, 3, 1, 7, 16, 24, "one"),
    ("odd_sizes", 53, 5, 1, 9, 17, 13, "random"),
    ("one_token", 1, 3, 1, 4, 8, 8, "random"),
]


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_xla_matches_reference(case, dtype, gated):
  x, w, g, r, ct = _inputs(case, dtype, gated)
  got = _outputs(jax.jit(lambda x, r, w, g: cvmm(x, r, w, g, impl="xla")), x, w, g, r, ct)
  up = lambda a: None if a is None else a.astype(jnp.float32)  # noqa: E731
  ref = _outputs(cvmm_reference, up(x), up(w), up(g), r, ct)
  for name, a, b in zip(["out", "dx", "dw", "dgates"], got, ref):
    assert a.dtype == dtype, (name, a.dtype)
    assert a.shape == b.shape, (name, a.shape, b.shape)
    err = _rel(a, b)
    assert err <= TOL[dtype], f"xla {case[0]} {name}: rel err {err:.2e} > {TOL[dtype]:.0e}"


def test_reference_definition():
  """y[n, s] = x[n, s // (K // M)] @ w[expert_index[n, s]], written out by loops."""
  x, w, g, r, _ = _inputs(CASES[2], jnp.float32, True)
  n, m, _ = x.shape
  k = r.k
  ei = np.asarray(r.expert_index)
  y = np.zeros((n, k, w.shape[2]), np.float64)
  for t in range(n):
    for s in range(k):
      y[t, s] = np.asarray(x, np.float64)[t, s // (k // m)] @ np.asarray(w, np.float64)[ei[t, s]]
  assert _rel(cvmm_reference(x, r, w), y) < 1e-6
  out = np.einsum("NK,NKO->NO", np.asarray(g, np.float64), y)
  assert _rel(cvmm_reference(x, r, w, g), out) < 1e-6


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("case", [c for c in CASES if c[0] in ("basic", "m_divisor",
                                                               "empty_experts", "odd_sizes")],
                         ids=lambda c: c[0])
def test_by_expert_reference_matches_reference(case, gated):
  """The GPU tests' memory-light reference of large cases (every row times every
  expert's matrix, then each slot's taken) against the defining one, forward and every
  gradient, float32."""
  x, w, g, r, ct = _inputs(case, jnp.float32, gated)
  got = _outputs(by_expert_reference, x, w, g, r, ct)
  ref = _outputs(cvmm_reference, x, w, g, r, ct)
  for name, a, b in zip(["out", "dx", "dw", "dgates"], got, ref):
    assert a.shape == b.shape, (name, a.shape, b.shape)
    assert _rel(a, b) < 1e-6, (case[0], name, _rel(a, b))


@pytest.mark.parametrize("impl", ["xla", "reference"])
@pytest.mark.parametrize("out_rows", [2, 3, 6])
def test_gated_sums_per_group_of_slots(impl, out_rows):
  """cvmm's out_rows: out[n, r] = sum of gates[n, s] y[n, s] over the K // R slots of
  group r, written out by loops in float64; gradients equal those of the products
  summed by an einsum; bad out_rows are refused."""
  x, w, g, r, _ = _inputs(CASES[2], jnp.float32, True)      # K = 6, M = 3
  n, k, o = x.shape[0], r.k, w.shape[2]
  y = np.asarray(cvmm_reference(x, r, w), np.float64)
  gn = np.asarray(g, np.float64)
  want = np.zeros((n, out_rows, o))
  for t in range(n):
    for s in range(k):
      want[t, s // (k // out_rows)] += gn[t, s] * y[t, s]
  got = cvmm(x, r, w, g, out_rows=out_rows, impl=impl)
  assert got.shape == (n, out_rows, o)
  assert _rel(got, want) < 1e-6
  ct = jax.random.normal(jax.random.key(0), (n, out_rows, o))
  split = lambda x, r, w, g: jnp.einsum(  # noqa: E731
      "NRSO,NRS->NRO", cvmm(x, r, w, impl=impl).reshape(n, out_rows, -1, o),
      g.reshape(n, out_rows, -1), precision="highest")
  loss = lambda fn: lambda x, w, g: jnp.sum(fn(x, r, w, g) * ct)  # noqa: E731
  grads = jax.grad(loss(lambda x, r, w, g: cvmm(x, r, w, g, out_rows=out_rows, impl=impl)),
                   argnums=(0, 1, 2))(x, w, g)
  for a, b in zip(grads, jax.grad(loss(split), argnums=(0, 1, 2))(x, w, g)):
    assert _rel(a, b) < 1e-5
  with pytest.raises(ValueError, match="divide"):
    cvmm(x, r, w, g, out_rows=4, impl=impl)
  with pytest.raises(ValueError, match="needs gates"):
    cvmm(x, r, w, out_rows=out_rows, impl=impl)


def test_routing_tiles_cover_every_pair_once():
  r = _routing("random", 37, 3, 11, jax.random.key(3))
  for bm in (16, 64):
    tiles = np.asarray(r.tiles(bm))
    sizes = np.asarray(r.group_sizes)
    covered = np.zeros(r.n_pairs, int)
    for e, s, t in tiles.T:
      assert 0 <= t - s <= bm
      if t > s:
        offs = np.asarray(r.group_offsets)
        assert offs[e] <= s and t <= offs[e + 1], (e, s, t)
        covered[s:t] += 1
    assert np.all(covered == 1) and sizes.sum() == r.n_pairs


def test_routing_tile_lists_are_computed_once_and_reused():
  from kernels.cvmm_triton.primitives import sum_tiles
  from kernels.routing import make_routing
  idx = jax.random.randint(jax.random.key(4), (37, 3), 0, 11)
  plain = make_routing(idx, 11, tile_blocks=())
  assert plain.tile_lists == {}
  default = make_routing(idx, 11).tile_lists
  if jax.default_backend() == "gpu":
    assert set(default) == {f"{o}/{bm}" for o in ("expert", "token") for bm in (64, 128, 256)}
  else:
    assert default == {}                                  # the CPU path computes its own
  r = make_routing(idx, 11, tile_blocks=(16, 64))
  assert set(r.tile_lists) == {"expert/16", "expert/64", "token/16", "token/64"}
  for key, got in r.tile_lists.items():
    order, bm = key.split("/")
    np.testing.assert_array_equal(got, plain.ordered_tiles(int(bm), order))
  np.testing.assert_array_equal(r.tiles(16), plain.tiles(16))
  # a routing with lists is a pytree like any other: through jit, and the lists come along
  tok = jax.jit(lambda rr: rr.ordered_tiles(64, "token"))(r)
  np.testing.assert_array_equal(tok, plain.ordered_tiles(64, "token"))
  # the fused sums take the cached list of their launch order (token)
  sentinel = jnp.full((3, 5), 7, jnp.int32)
  r2 = r.with_tiles((), ())
  r2.tile_lists["token/16"] = sentinel
  assert sum_tiles(r2, 16) is sentinel
  with pytest.raises(ValueError, match="tile order"):
    plain.ordered_tiles(16, "band8")


def test_tile_config_validates():
  TileConfig(64, 128, 32, 4, 3)
  two = TileConfig(128, 64, 128, 8, 2, loop_n=True, gluon=True, halves=2)
  assert TileConfig.from_json(two.to_json()) == two
  old = {k: v for k, v in TileConfig(64, 64, 32).to_json().items() if k != "halves"}
  assert TileConfig.from_json(old).halves == 1        # choices cached before the field
  for bad in [dict(block_m=48), dict(block_n=8), dict(num_warps=3), dict(num_stages=0),
              dict(splits=0), dict(halves=3), dict(halves=2),
              dict(halves=2, gluon=True, loop_n=True, num_stages=3),
              dict(halves=4, gluon=True, loop_n=True, num_stages=2)]:
    kw = dict(block_m=64, block_n=64, block_k=32) | bad
    with pytest.raises(ValueError):
      TileConfig(**kw)


def test_merge_autotune_adds_new_keys_and_replaces_only_when_asked():
  from bench.merge_autotune import merge
  a = dict(block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=4, splits=1,
           loop_n=False)
  b = dict(a, block_m=256, num_warps=8)
  old = {"k1": a, "k2": a}
  merged, lines = merge({"k2": b, "k3": b}, old, replace=False)
  assert merged == {"k1": a, "k2": a, "k3": b} and len(lines) == 1
  merged, lines = merge({"k2": b, "k3": b}, old, replace=True)
  assert merged == {"k1": a, "k2": b, "k3": b} and len(lines) == 2
  assert old == {"k1": a, "k2": a}                         # the input is not modified
  with pytest.raises(ValueError):
    merge({"k4": dict(a, block_m=48)}, old, replace=False)


def _wide_is_fast(calls):
  def bench(cfg):
    calls.append(cfg)
    return 1.0 / cfg.block_n            # wider is "faster"
  return bench


def test_autotuner_caches_choice(tmp_path):
  path = str(tmp_path / "tune.json")
  calls = []
  bench = _wide_is_fast(calls)
  cands = [TileConfig(64, 64, 32), TileConfig(64, 128, 32)]
  t = Autotuner(path)
  assert t.choose("k", (1, 2), jnp.bfloat16, cands, bench) == cands[1]
  assert len(calls) == 2
  assert t.choose("k", (1, 2), jnp.bfloat16, cands, bench) == cands[1]
  assert len(calls) == 2                 # cached in memory
  assert Autotuner(path).cached("k", (1, 2), jnp.bfloat16) == cands[1]   # and on disk
  assert t.choose("k", (1, 2), jnp.bfloat16, cands, None) == cands[1]


def test_autotuner_keeps_choices_per_user_and_kernel_code_by_default(tmp_path, monkeypatch):
  """With CVMM_AUTOTUNE_CACHE unset the choices go to
  $XDG_CACHE_HOME/moeut_jax/autotune-<hash of the kernels' code>.json, which the next
  process reads; CVMM_AUTOTUNE_CACHE="" keeps them in memory only. The hash follows
  the code: one changed byte of a source changes it."""
  from kernels import autotune
  monkeypatch.delenv("CVMM_AUTOTUNE_CACHE", raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  want = tmp_path / "cache" / "moeut_jax" / f"autotune-{autotune.kernels_code_hash()}.json"
  cands = [TileConfig(64, 64, 32), TileConfig(64, 128, 32)]
  calls = []
  t = Autotuner()
  assert t.cache_file == str(want) and not want.exists()
  assert t.choose("k", (1, 2), jnp.bfloat16, cands, _wide_is_fast(calls)) == cands[1]
  assert want.exists() and len(calls) == 2
  assert Autotuner().choose("k", (1, 2), jnp.bfloat16, cands, _wide_is_fast(calls)) == cands[1]
  assert len(calls) == 2                                   # read back, not timed again
  monkeypatch.setenv("CVMM_AUTOTUNE_CACHE", "")
  t = Autotuner()
  assert t.cache_file == ""
  t.choose("k2", (1, 2), jnp.bfloat16, cands, _wide_is_fast(calls))
  assert len(calls) == 4 and "k2" not in want.read_text()
  src = tmp_path / "src"
  (src / "sub").mkdir(parents=True)
  (src / "a.py").write_text("x = 1\n")
  (src / "sub" / "b.py").write_text("y = 2\n")
  before = autotune.sources_hash(src)
  assert len(before) == 12 and autotune.sources_hash(src) == before
  (src / "sub" / "b.py").write_text("y = 3\n")
  assert autotune.sources_hash(src) != before


def test_autotuner_times_again_a_cached_tile_that_is_no_candidate(tmp_path):
  """A cached tile that the kernel no longer offers (a file from other code, or edited)
  is not used: the candidates are timed and the new choice replaces it on disk."""
  path = tmp_path / "tune.json"
  t = Autotuner(str(path))
  stale = TileConfig(32, 32, 32)
  path.write_text(json.dumps({t.key("k", (1, 2), jnp.bfloat16): stale.to_json()}))
  cands = [TileConfig(64, 64, 32), TileConfig(64, 128, 32)]
  calls = []
  t = Autotuner(str(path))
  assert t.cached("k", (1, 2), jnp.bfloat16) == stale
  assert t.choose("k", (1, 2), jnp.bfloat16, cands, _wide_is_fast(calls)) == cands[1]
  assert calls == cands
  assert Autotuner(str(path)).cached("k", (1, 2), jnp.bfloat16) == cands[1]


def test_autotuner_goes_on_where_its_cache_cannot_be_written(tmp_path):
  """A cache file that cannot be written (here its folder is a file) costs a warning,
  once, not the run: the choice is made and kept in memory. An invalid cache file is
  an error that names it."""
  blocker = tmp_path / "not_a_folder"
  blocker.write_text("")
  t = Autotuner(str(blocker / "tune.json"))
  cands = [TileConfig(64, 64, 32), TileConfig(64, 128, 32)]
  with pytest.warns(RuntimeWarning, match="not written"):
    assert t.choose("k", (1, 2), jnp.bfloat16, cands, _wide_is_fast([])) == cands[1]
  assert t.cached("k", (1, 2), jnp.bfloat16) == cands[1]
  bad = tmp_path / "bad.json"
  bad.write_text("{not json")
  with pytest.raises(ValueError, match="bad.json"):
    Autotuner(str(bad))


def test_time_call_amortizes_sync_over_back_to_back_calls(monkeypatch):
  from kernels import autotune
  clock = [0.0]
  n_calls = [0]
  monkeypatch.setattr(autotune.time, "perf_counter", lambda: clock[0])

  def fn():                              # each call "takes" 2 ms
    n_calls[0] += 1
    clock[0] += 2e-3
    return jnp.zeros(())

  def sync(outs):                        # one sync per round "costs" 0.5 ms
    clock[0] += 5e-4
    return outs

  monkeypatch.setattr(autotune.jax, "block_until_ready", sync)
  t = autotune.time_call(fn, warmup=1, reps=3, calls=5)
  assert n_calls[0] == 1 + 3 * 5
  assert abs(t - (2e-3 + 5e-4 / 5)) < 1e-12


def test_config_is_validated_hashable_and_keys_the_autotuner(tmp_path):
  """CvmmConfig refuses unknown settings; equal configs are one op (hashable, static),
  and the autotuner's cache keys carry the settings that change a kernel's work."""
  from kernels import CvmmConfig, DEFAULT
  for bad in (dict(impl="cuda"), dict(sum_dtype="float64"), dict(f16_scales="Checked"),
              dict(gluon=1), dict(unit_pairs="yes")):
    with pytest.raises(ValueError, match=list(bad)[0]):
      CvmmConfig(**bad)
  assert CvmmConfig() == DEFAULT and hash(CvmmConfig()) == hash(DEFAULT)
  assert CvmmConfig(sum_dtype="float32").tune_key() != DEFAULT.tune_key()
  assert CvmmConfig(f16_scales="bound").tune_key() != DEFAULT.tune_key()
  assert CvmmConfig(gluon=False).tune_key() != DEFAULT.tune_key()
  t = Autotuner(str(tmp_path / "t.json"))
  k16 = t.key("triton_rows", (1, 2), jnp.bfloat16, DEFAULT)
  assert k16.endswith("|" + DEFAULT.tune_key())
  assert k16 != t.key("triton_rows", (1, 2), jnp.bfloat16, CvmmConfig(sum_dtype="float32"))
  with pytest.raises(TypeError, match="CvmmConfig"):
    cvmm(jnp.zeros((2, 1, 4)), _routing("random", 2, 1, 2, jax.random.key(0)),
         jnp.zeros((2, 4, 4)), config="xla")


def test_sum_dtype_off_gpu_gives_float32_sums():
  """Off Hopper/Triton the sums stay float32, so every sum_dtype gives the default's
  numbers exactly."""
  from kernels import CvmmConfig
  case = ("basic", 64, 4, 4, 8, 32, 16, "random")
  x, w, g, r, _ = _inputs(case, jnp.bfloat16, True)
  a = cvmm(x, r, w, g, impl="xla")
  for sd in ("bfloat16", "float16"):
    b = cvmm(x, r, w, g, config=CvmmConfig(impl="xla", sum_dtype=sd))
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_sum_dtype_option(monkeypatch):
  """sum_dtype float16 (any 16-bit call), float32, or bfloat16, which only bf16 calls
  with widths divisible by 8 on sm90+ take."""
  pytest.importorskip("triton")
  from kernels.cvmm_triton import scales
  assert not scales.bf16_sums(jnp.bfloat16, 1024, "float16")
  assert scales.half_sums(jnp.bfloat16, 1024, "float16") == "float16"
  assert scales.half_sums(jnp.bfloat16, 1020, "float16") == "float16"
  assert scales.half_sums(jnp.float16, 24, "float16") == "float16"
  assert scales.half_sums(jnp.float32, 1024, "float16") is None   # float32 calls: float32
  assert scales.half_sums(jnp.bfloat16, 1024, "float32") is None
  monkeypatch.setattr(scales, "interpret", lambda: False)
  monkeypatch.setattr(scales, "compute_capability", lambda: 9.0)
  assert scales.bf16_sums(jnp.bfloat16, 1024, "bfloat16")
  assert scales.red_width(1024, jnp.bfloat16, "bfloat16") == 8
  assert scales.red_width(1024, jnp.bfloat16, "float16") == 8     # f16x2 vectors on sm90
  assert scales.red_width(1020, jnp.bfloat16, "float16") == 1     # else scalar adds
  assert not scales.bf16_sums(jnp.float32, 1024, "bfloat16")
  assert not scales.bf16_sums(jnp.bfloat16, 1020, "bfloat16")   # 8 must not straddle rows
  assert scales.red_width(1020, jnp.bfloat16, "bfloat16") == 4
  assert scales.red_width(1022, jnp.float32, "float32") == 2
  monkeypatch.setattr(scales, "compute_capability", lambda: 8.0)
  assert not scales.bf16_sums(jnp.bfloat16, 1024, "bfloat16")   # bf16x2 reductions: sm90+


def test_gpu_impls_unavailable_on_cpu():
  from kernels import is_available, resolve
  if jax.default_backend() == "gpu":
    pytest.skip("runs on the CPU backend only")
  assert not is_available("triton") and not is_available("mosaic")
  assert resolve("auto") == "xla"


def test_float16_sum_row_scales_bound_every_row():
  """The float16 sums' row scale: a power of two that maps the bound of each row's sum
  to [2^13, 2^14) (no overflow below float16's 65504, and no precision thrown away),
  and the bound really bounds |out|: for inputs from 1e-6 to 1e4 in magnitude, and
  with one expert's weights 1e6 times the others' (bounded per expert: it does not
  shrink the rows that do not use it)."""
  from kernels import make_routing
  from kernels.cvmm_reference import cvmm_reference
  from kernels.row_scales import f16_row_scales, max_l1, pow2_scale
  n, k, m, e, i, o = 50, 4, 2, 6, 32, 24
  ks = jax.random.split(jax.random.key(3), 4)
  r = make_routing(jax.random.randint(ks[0], (n, k), 0, e), e)
  for mag in (1e-6, 1.0, 1e4):
    x = jax.random.normal(ks[1], (n, m, i)) * mag
    w = jax.random.normal(ks[2], (e, i, o)).at[0].multiply(1e6)
    g = jax.random.uniform(ks[3], (n, k))
    s, pair_s = f16_row_scales(x.reshape(n * m, i), max_l1(w, 1), r, g.reshape(-1), m, 1)
    out = cvmm_reference(x, r, w, g)                                  # [N, O]
    scaled = np.abs(np.asarray(out)).max(axis=1) * np.asarray(s)
    assert scaled.max() < 2.0 ** 14, mag
    free = ~np.any(np.asarray(r.expert_index) == 0, axis=1)           # rows without expert 0
    assert free.any() and scaled[free].min() > 2.0 ** 4, (mag, scaled[free].min())
    ex = np.log2(np.asarray(s))
    np.testing.assert_array_equal(ex, np.round(ex))                   # powers of two
    np.testing.assert_allclose(np.asarray(pair_s).reshape(n, k),
                               np.asarray(g) * np.asarray(s)[:, None], rtol=1e-7)
  b = jnp.array([2.0 ** 14, 2.0 ** 14 - 1, 3.0, 0.0, jnp.inf, jnp.nan, 1e-37, 1e38])
  got = np.asarray(pow2_scale(b))
  np.testing.assert_array_equal(got[:6], [0.5, 1.0, 4096.0, 1.0, 1.0, 1.0])
  assert got[6] == 2.0 ** 126 and got[7] * 1e38 < 2.0 ** 14 <= got[7] * 2e38


def test_checked_f16_row_scales_aim_the_estimate():
  """Checked float16 scales: powers of two that put each output row's estimate (its
  token's first input row's largest |value| times its pairs' largest |gate| * sampled
  column sum) at [2^(hi - 3), 2^(hi - 2)), hi = 15 - log2(terms per row); the real
  sums then land between 2^0 and float16's overflow for inputs from 1e-6 to 1e4 (no
  row to repair); rows whose sample is 0 take the largest estimate's scale and are
  flagged as unsampled; the per-pair scales are the gates times the row's."""
  from kernels import make_routing
  from kernels.cvmm_reference import cvmm_reference
  from kernels.cvmm_triton.scales import f16_row_scales_checked, sampled_max_l1
  n, k, m, e, i, o = 50, 4, 2, 6, 32, 24
  ks = jax.random.split(jax.random.key(4), 4)
  r = make_routing(jax.random.randint(ks[0], (n, k), 0, e), e)
  w = jax.random.normal(ks[2], (e, i, o)) / np.sqrt(i)
  g = jax.random.uniform(ks[3], (n, k), minval=0.1)
  hi = 15 - 2                                                      # 4 terms a row
  for mag in (1e-6, 1.0, 1e4):
    x = (jax.random.normal(ks[1], (n, m, i)) * mag).at[7].set(0.0)   # token 7: zeros
    s, pair_s, sampled = f16_row_scales_checked(x.reshape(n * m, i), w, False, r,
                                                 g.reshape(-1), m, 1)
    s, sampled = np.asarray(s), np.asarray(sampled)
    ex = np.log2(s)
    np.testing.assert_array_equal(ex, np.round(ex))                   # powers of two
    np.testing.assert_array_equal(sampled, np.arange(n) != 7)
    west = np.asarray(sampled_max_l1(w, False))[np.asarray(r.expert_index)]    # [N, K]
    est = np.abs(np.asarray(x)[:, 0]).max(axis=1) * (np.asarray(g) * west).max(axis=1)
    aimed = est * s
    assert np.all(aimed[sampled == 1] >= 2.0 ** (hi - 3)), mag
    assert np.all(aimed[sampled == 1] < 2.0 ** (hi - 2)), mag
    assert s[7] == s[sampled == 1].min()          # the largest estimate's scale
    top = np.abs(np.asarray(cvmm_reference(x, r, w, g))).max(axis=1) * s
    assert np.all(top[sampled == 1] >= 1) and np.all(top < 2.0 ** 15), (mag, top.min())
    np.testing.assert_allclose(np.asarray(pair_s).reshape(n, k),
                               np.asarray(g) * s[:, None], rtol=1e-7)
  # The sampled column sums: every 8th contraction row scaled by 8 ([E, I, O]); whole
  # contractions of every 8th column ([E, O, I], used transposed).
  wa = np.abs(np.asarray(w))
  np.testing.assert_allclose(sampled_max_l1(w, False), wa[:, ::8].sum(1).max(1) * 8,
                             rtol=1e-6)
  wt = jnp.swapaxes(w, 1, 2)
  np.testing.assert_allclose(sampled_max_l1(wt, True),
                             np.swapaxes(wa, 1, 2)[:, ::8].sum(2).max(1), rtol=1e-6)


def test_checked_scales_where_the_input_is_the_larger():
  """Checked float16 scales where a token's input rows hold at least as many values as
  its output rows (σ-MoE down: 16 rows of 128 into 1024; up's dx likewise; SwitchHead
  V's dx: 8 rows of 128 into 1024), bound ones elsewhere (SwitchHead O's forward: 4 rows
  of 128 into 1024)."""
  from kernels.cvmm_triton.scales import checked_scales_pay  # noqa: PLC0415
  assert checked_scales_pay(128, 1024, 16, 1) and checked_scales_pay(128, 1024, 8, 1)
  assert not checked_scales_pay(128, 1024, 4, 1)


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_mosaic_lowers_for_cuda(gated):
  """The Pallas Mosaic GPU kernels, forward and backward, lower to CUDA on any host."""
  pytest.importorskip("jax.experimental.pallas.mosaic_gpu")
  from kernels.cvmm_mosaic import cvmm_mosaic
  n, k, m, e, i, o = 64, 4, (4 if gated else 1), 5, 100, 72
  r = _routing("random", n, k, e, jax.random.key(0))
  x = jnp.ones((n, m, i), jnp.bfloat16)
  w = jnp.ones((e, i, o), jnp.bfloat16)
  g = jnp.ones((n, k), jnp.bfloat16) if gated else None

  def loss(x, w, g):
    return jnp.sum(cvmm_mosaic(x, r, w, g).astype(jnp.float32))

  argn = (0, 1, 2) if gated else (0, 1)
  lowered = jax.jit(jax.grad(loss, argnums=argn)).trace(x, w, g).lower(
      lowering_platforms=("cuda",))
  assert "mosaic_gpu" in lowered.as_text()


@pytest.mark.parametrize("keep_middle", [True, False], ids=["kept", "remade"])
def test_cvmm_pair_composes_two_cvmms(keep_middle):
  """cvmm_pair off the fused path (xla here) equals relu(cvmm) then gated cvmm of the
  reference, forward and every gradient, float32, with the [N, K, H] middle kept for
  the backward pass or made again there (then not among the saved residuals); bad
  shapes are refused."""
  from moeut_jax.remat import saved_residuals
  from kernels import cvmm_pair, make_routing
  from kernels.cvmm_reference import cvmm_pair_reference
  n, k, e, d, h, o = 37, 3, 6, 20, 12, 28
  ks = jax.random.split(jax.random.key(3), 6)
  _, idx = jax.lax.top_k(jax.random.normal(ks[0], (n, e)), k)
  r = make_routing(idx, e)
  x = jax.random.normal(ks[1], (n, d))
  wu = jax.random.normal(ks[2], (e, d, h)) / np.sqrt(d)
  wd = jax.random.normal(ks[3], (e, h, o)) / np.sqrt(h)
  g = jax.random.uniform(ks[4], (n, k))
  ct = jax.random.normal(ks[5], (n, o))

  def outs(fn):
    loss = lambda *a: jnp.sum(fn(*a) * ct)  # noqa: E731
    return (fn(x, wu, wd, g),) + jax.grad(loss, argnums=(0, 1, 2, 3))(x, wu, wd, g)

  pair = lambda x, wu, wd, g: cvmm_pair(x, r, wu, wd, g, keep_middle=keep_middle,  # noqa: E731
                                        impl="xla")
  got = outs(pair)
  ref = outs(lambda x, wu, wd, g: cvmm_pair_reference(x, r, wu, wd, g))
  for a, b in zip(got, ref):
    assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) <= 1e-5
  # (the xla path keeps the middle in its tiles' layout: rows of width H)
  middles = [(v, o) for v, o in saved_residuals(pair, x, wu, wd, g)
             if v.shape[-1] == h and v.size >= n * k * h and "argument" not in o]
  assert bool(middles) == keep_middle, middles
  with pytest.raises(ValueError, match="do not chain"):
    cvmm_pair(x, r, wu, jnp.zeros((e, h + 1, o)), g, impl="xla")
  with pytest.raises(ValueError, match=r"x must be \[N, D\]"):
    cvmm_pair(x[:, None], r, wu, wd, g, impl="xla")




def test_original_impl_needs_the_path_of_a_clone(tmp_path):
  """impl="original" names a folder holding the official moeut/cvmm.py; other impls take
  no path; off the GPU (and without the interpreter) it is not available."""
  from kernels import CvmmConfig, is_available
  import original_cvmm
  with pytest.raises(ValueError, match="pass original_path"):
    CvmmConfig(impl="original")
  with pytest.raises(FileNotFoundError, match="no such folder"):
    CvmmConfig(impl="original", original_path=str(tmp_path / "missing"))
  with pytest.raises(FileNotFoundError, match="holds no moeut/cvmm.py"):
    CvmmConfig(impl="original", original_path=str(tmp_path))
  with pytest.raises(ValueError, match='used only by impl="original"'):
    CvmmConfig(impl="xla", original_path=str(tmp_path))
  path = original_cvmm.required()
  cfg = CvmmConfig(impl="original", original_path=path)
  assert cfg == CvmmConfig(impl="original", original_path=path)
  if jax.default_backend() != "gpu":
    assert not is_available("original")
    with pytest.raises(RuntimeError, match="'original' is not available"):
      cvmm(jnp.zeros((2, 1, 4)), _routing("random", 2, 1, 2, jax.random.key(0)),
           jnp.zeros((2, 4, 4)), config=cfg)


@pytest.mark.parametrize("which, dtype, transpose, out_index",
                         [("forward", "bf16", False, True), ("forward", "bf16", True, False),
                          ("forward", "fp32", False, False), ("backward", "bf16", False, True),
                          ("backward", "fp32", False, False)])
def test_original_kernels_compile_for_hopper_in_their_wrappers(which, dtype, transpose,
                                                               out_index):
  """The wrappers of kernels/cvmm_original.py (the original's kernel called from a kernel
  that takes the output pointer last) go through Triton's GPU pipeline to PTX and a
  cubin, as jax-triton compiles them on the GPU."""
  pytest.importorskip("triton")
  pytest.importorskip("torch")
  import original_cvmm
  from kernels import offline
  kern = offline.compile_original(original_cvmm.required(), which, dtype=dtype,
                                  transpose=transpose, out_index=out_index)
  assert kern.metadata.name == f"_{which}_wrapper"
  assert kern.asm["cubin"] and ".entry _" + which + "_wrapper" in kern.asm["ptx"]


def test_kernels_import_no_benchmark_and_read_only_tooling_variables():
  """Library code never imports a benchmark, and the environment holds only the
  process-level tooling switches; everything else is a CvmmConfig field."""
  import re
  import subprocess
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  code = ("import kernels, kernels.cvmm_triton, kernels.offline, kernels.topk, sys; "
          "assert not any(m.startswith('bench') for m in sys.modules), 'bench imported'")
  res = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert res.returncode == 0, res.stderr[-2000:]
  names = set()
  for folder, _, files in os.walk(os.path.join(root, "kernels")):
    for f in files:
      if f.endswith(".py"):
        with open(os.path.join(folder, f), encoding="utf-8") as fh:
          names |= set(re.findall(r"\bCVMM_[A-Z0-9_]+", fh.read()))
  assert names <= {"CVMM_AUTOTUNE", "CVMM_AUTOTUNE_CACHE", "CVMM_TRITON_INTERPRET"}, names


def test_importing_jax_triton_keeps_triton_compile_cache(tmp_path, monkeypatch):
  """jax-triton 0.3.1 sets TRITON_CACHE_DIR to "" on import, which breaks every other
  Triton kernel compiled in the process (the original MoEUT's op in the binding's GPU
  tests); kernels import it through launch._jax_triton, which puts the variable back."""
  from kernels.cvmm_triton import launch  # noqa: PLC0415
  fake = tmp_path / "jax_triton"
  fake.mkdir()
  (fake / "__init__.py").write_text('import os\nos.environ["TRITON_CACHE_DIR"] = ""\n')
  monkeypatch.syspath_prepend(str(tmp_path))
  for value in (None, str(tmp_path / "cache")):
    monkeypatch.delitem(sys.modules, "jax_triton", raising=False)
    if value is None:
      monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    else:
      monkeypatch.setenv("TRITON_CACHE_DIR", value)
    assert launch._jax_triton().__file__ == str(fake / "__init__.py")
    assert os.environ.get("TRITON_CACHE_DIR") == value


def test_auto_on_gpus_is_triton_then_xla(monkeypatch):
  """resolve("auto") on a GPU is Triton, else XLA (what calls take that no GPU path of
  kernels/auto.py runs: the Mosaic path is 16-bit only). Falling back to XLA on a GPU
  warns once, saying why; on a CPU it is the path and says nothing."""
  import importlib  # noqa: PLC0415
  kc = importlib.import_module("kernels.cvmm")     # the module, not the function
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(kc, "is_available", lambda name: True)
  assert kc.resolve("auto") == "triton"
  monkeypatch.setattr(kc, "is_available", lambda name: name != "triton")
  monkeypatch.setattr(kc, "_warned_xla_on_gpu", False)
  with pytest.warns(RuntimeWarning, match='runs the pure-JAX "xla" path on this GPU'):
    assert kc.resolve("auto") == "xla"
  with warnings.catch_warnings():          # once per process
    warnings.simplefilter("error")
    assert kc.resolve("auto") == "xla"
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  monkeypatch.setattr(kc, "_warned_xla_on_gpu", False)
  with warnings.catch_warnings():          # the CPU's own path: nothing to say
    warnings.simplefilter("error")
    assert kc.resolve("auto") == "xla"


def _auto_on_a_fake_gpu(monkeypatch, tmp_path, names, times):
  """"auto" as on a GPU whose implementations are ``names`` (ones that run on the CPU),
  with a fresh autotuner on a file in tmp_path whose timings return ``times`` in turn
  (each timing still compiles the implementation's forward and backward pass)."""
  import importlib  # noqa: PLC0415
  from kernels import auto, autotune  # noqa: PLC0415
  kc = importlib.import_module("kernels.cvmm")
  monkeypatch.setattr(auto, "candidates", lambda dtype: list(names))
  monkeypatch.setattr(kc.jax, "default_backend", lambda: "gpu")
  monkeypatch.setenv("CVMM_AUTOTUNE", "1")
  tuner = Autotuner(str(tmp_path / "tune.json"))
  monkeypatch.setattr(autotune, "_TUNER", tuner)
  left = list(times)
  timed = []

  def fake_time(fn, **kw):
    jax.block_until_ready(fn())           # the compiled step runs
    timed.append(left[0])
    return left.pop(0)

  monkeypatch.setattr(autotune, "time_call", fake_time)
  return tuner, timed


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_auto_times_each_implementation_once_and_takes_the_faster(monkeypatch, tmp_path,
                                                                  gated):
  """Under "auto" on a GPU each operation's implementation is chosen by timing its
  forward and backward pass on random inputs of the call's shapes; the choice is cached
  (in memory and in the autotuner's file) and the call runs the chosen implementation."""
  x, w, g, r, _ = _inputs(CASES[0], jnp.bfloat16, gated)
  want = cvmm(x, r, w, g, impl="xla")
  tuner, timed = _auto_on_a_fake_gpu(monkeypatch, tmp_path, ["reference", "xla"],
                                     [2e-3, 1e-3])
  got = jax.jit(lambda x, r, w, g: cvmm(x, r, w, g))(x, r, w, g)
  assert timed == [2e-3, 1e-3]                       # both timed, in order
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
  shape = (x.shape[0], 1, r.k, w.shape[0], w.shape[1], w.shape[2], int(gated), 1, 0)
  key = tuner.key("cvmm_impl", shape, jnp.bfloat16, cvmm_config_default())
  with open(tmp_path / "tune.json") as f:
    assert json.load(f) == {key: {"impl": "xla"}}
  cvmm(x, r, w, g)                                   # cached: not timed again
  assert len(timed) == 2
  assert Autotuner(str(tmp_path / "tune.json")).choose_impl(
      "cvmm_impl", shape, jnp.bfloat16, ["reference", "xla"], None,
      cvmm_config_default()) == "xla"                 # read back from the file


def test_auto_pair_is_one_choice_and_skips_an_implementation_that_fails(monkeypatch,
                                                                       tmp_path):
  """The σ-MoE pair is timed as one operation; an implementation whose timing fails is
  left out; with autotuning off the first candidate runs unmeasured."""
  from kernels import auto, cvmm_pair  # noqa: PLC0415
  x, w, g, r, _ = _inputs(CASES[0], jnp.bfloat16, True)
  x2 = x[:, 0]
  w_down = jax.random.normal(jax.random.key(5), (w.shape[0], w.shape[2], 16), w.dtype)
  want = cvmm_pair(x2, r, w, w_down, g, impl="xla")
  tuner, timed = _auto_on_a_fake_gpu(monkeypatch, tmp_path, ["mosaic", "xla"], [1e-3])
  # "mosaic" cannot run on the CPU: its timing fails and it is left out
  got = cvmm_pair(x2, r, w, w_down, g)
  assert timed == [1e-3]
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
  assert list(tuner._impls.values()) == ["xla"]
  assert "mosaic: failed" in "\n".join(tuner.log)
  monkeypatch.setenv("CVMM_AUTOTUNE", "0")
  monkeypatch.setattr(auto, "candidates", lambda dtype: ["reference", "xla"])
  got = cvmm_pair(x2[:7], r_first(r, 7), w, w_down, g[:7])      # a new shape, unmeasured
  assert len(timed) == 1
  np.testing.assert_allclose(np.asarray(got, np.float32),
                             np.asarray(cvmm_pair(x2[:7], r_first(r, 7), w, w_down, g[:7],
                                                  impl="reference"), np.float32))


def test_auto_leaves_out_an_implementation_whose_results_disagree(monkeypatch, tmp_path):
  """An implementation whose output on the timing inputs differs from the first one's
  (here "xla" made 1.5x too large) is not chosen, faster or not, and the user is warned;
  one that agrees is (the previous test)."""
  import importlib  # noqa: PLC0415
  kc = importlib.import_module("kernels.cvmm")
  x, w, g, r, _ = _inputs(CASES[0], jnp.bfloat16, True)
  want = cvmm(x, r, w, g, impl="reference")
  get = kc._get

  def wrong_xla(impl):
    f = get(impl)
    return (lambda *a, **kw: f(*a, **kw) * 1.5) if impl == "xla" else f

  monkeypatch.setattr(kc, "_get", wrong_xla)
  tuner, timed = _auto_on_a_fake_gpu(monkeypatch, tmp_path, ["reference", "xla"],
                                     [2e-3, 1e-3])
  with pytest.warns(RuntimeWarning, match="xla's results for cvmm_impl differ from reference"):
    got = jax.jit(lambda x, r, w, g: cvmm(x, r, w, g))(x, r, w, g)
  assert timed == [2e-3]                             # xla never timed
  assert list(tuner._impls.values()) == ["reference"]
  assert "xla: failed (RuntimeError" in "\n".join(tuner.log)
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_auto_keeps_mosaic_to_16_bit_inputs(monkeypatch):
  from kernels import auto  # noqa: PLC0415
  import importlib  # noqa: PLC0415
  kc = importlib.import_module("kernels.cvmm")
  monkeypatch.setattr(kc, "is_available", lambda name: name in ("triton", "mosaic"))
  assert auto.candidates(jnp.bfloat16) == ["triton", "mosaic"]
  assert auto.candidates(jnp.float16) == ["triton", "mosaic"]
  assert auto.candidates(jnp.float32) == ["triton"]
  monkeypatch.setattr(kc, "is_available", lambda name: name == "mosaic")
  assert auto.candidates(jnp.float32) == []


def test_merge_autotune_takes_implementation_choices():
  from bench.merge_autotune import merge  # noqa: PLC0415
  merged, lines = merge({"k": {"impl": "mosaic"}}, {}, replace=False)
  assert merged == {"k": {"impl": "mosaic"}} and lines == ["+ k: impl mosaic"]
  for bad in ({"impl": "auto"}, {"impl": "cuda"}):
    with pytest.raises(ValueError):
      merge({"k": bad}, {}, replace=False)


def test_autotune_cache_file_is_read_through_the_same_validation(tmp_path):
  """The autotuner's loader and bench/merge_autotune accept the same entries."""
  good = tmp_path / "good.json"
  good.write_text(json.dumps({"a": {"impl": "mosaic"}, "b": TileConfig(64, 64, 32).to_json()}))
  t = Autotuner(str(good))
  assert t._impls == {"a": "mosaic"} and t._mem == {"b": TileConfig(64, 64, 32)}
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps({"a": {"impl": "auto"}}))
  with pytest.raises(ValueError, match="not an implementation"):
    Autotuner(str(bad))


def cvmm_config_default():
  from kernels.config import DEFAULT  # noqa: PLC0415
  return DEFAULT


def r_first(routing, n):
  """The routing of the first ``n`` tokens of ``routing``."""
  from kernels.routing import make_routing  # noqa: PLC0415
  return make_routing(routing.expert_index[:n], routing.n_experts)


def test_implementations_are_timed_with_their_first_tiles(tmp_path, monkeypatch):
  """choose_impl times each implementation with its kernels' cached or first tiles (one
  compile each, no tile search inside); outside, tiles are timed again as usual."""
  monkeypatch.setenv("CVMM_AUTOTUNE", "1")
  t = Autotuner(str(tmp_path / "tune.json"))
  cands = [TileConfig(64, 64, 32), TileConfig(64, 128, 32)]
  tile_benches = []

  def tile_bench(cfg):
    tile_benches.append(cfg)
    return 1.0 / cfg.block_n

  def impl_bench(name):
    assert t.choose("k", (1,), jnp.bfloat16, cands, tile_bench) == cands[0]
    return {"a": 2.0, "b": 1.0}[name]

  assert t.choose_impl("op", (1,), jnp.bfloat16, ["a", "b"], impl_bench) == "b"
  assert tile_benches == [] and t.cached("k", (1,), jnp.bfloat16) is None
  assert t.choose("k", (1,), jnp.bfloat16, cands, tile_bench) == cands[1]
  assert len(tile_benches) == 2


def test_auto_on_hopper_without_triton_runs_mosaic_for_16_bit_calls_only(monkeypatch):
  """Where the Mosaic path is the only GPU path, "auto" gives it the 16-bit calls
  (unmeasured: nothing to compare) and the float32 calls, which it cannot run, to XLA."""
  import importlib  # noqa: PLC0415
  from kernels import auto  # noqa: PLC0415
  from kernels.config import DEFAULT  # noqa: PLC0415
  kc = importlib.import_module("kernels.cvmm")
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(kc, "is_available", lambda name: name in ("mosaic", "xla"))
  monkeypatch.setattr(kc, "_warned_xla_on_gpu", True)        # (its warning: tested above)
  for dtype, want in ((jnp.bfloat16, "mosaic"), (jnp.float32, "xla")):
    x, w, g, r, _ = _inputs(CASES[0], dtype, True)
    assert kc._call_impl(DEFAULT, lambda: auto.choose_cvmm(DEFAULT, x, r, w, g, 1)) == want
