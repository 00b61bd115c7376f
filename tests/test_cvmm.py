"""CVMM on the CPU: the pure-JAX tiled implementation against the reference, forward and
every gradient, plus the Triton kernels' logic in Triton's CPU interpreter."""
from __future__ import annotations

import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import cvmm
from kernels.autotune import Autotuner, TileConfig
from kernels.cvmm_reference import cvmm_reference
from cvmm_cases import TOL, inputs as _inputs, outputs as _outputs, rel_err as _rel
from cvmm_cases import routing_of_kind as _routing, run_in_triton_interpreter

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


@pytest.mark.parametrize("packed", [True, False])
def test_band_tiles_cover_every_pair_once_within_a_band(monkeypatch, packed):
  from kernels import routing as routing_mod
  if not packed:   # the counting path, taken when expert * P + pair overflows int32
    monkeypatch.setattr(routing_mod, "_PACKED_KEY_LIMIT", 0)
  r = _routing("random", 37, 3, 11, jax.random.key(3))
  order = np.asarray(r.order)
  offs = np.asarray(r.group_offsets)
  for bm, band in [(16, 8), (4, 5), (64, 10), (16, 37), (16, 1000)]:
    tiles = np.asarray(r.band_tiles(bm, band))
    covered = np.zeros(r.n_pairs, int)
    last = (-1, -1)
    used = 0
    for e, s, t in tiles.T:
      assert 0 <= t - s <= bm
      if t == s:
        continue
      used += 1
      assert offs[e] <= s and t <= offs[e + 1], (e, s, t)
      bands = set(order[s:t] // r.k // band)
      assert len(bands) == 1, (e, s, t, bands)
      key = (bands.pop(), e)
      assert key >= last, (key, last)           # band by band, expert by expert
      last = key
      covered[s:t] += 1
    assert np.all(covered == 1)
    tok_band = (order // r.k) // band
    ex = np.asarray(r.sorted_expert())
    want = sum(-(-np.sum((tok_band == b) & (ex == e)) // bm)
               for b in range(-(-37 // band)) for e in range(r.n_experts))
    assert used == want, (used, want)
  with pytest.raises(ValueError):
    r.band_tiles(16, 0)


def _used_of_permuted(got: np.ndarray, plain: np.ndarray) -> np.ndarray:
  """The used tiles of ``got`` [3, Z], after checking that it holds the tiles of
  ``plain`` (whole, reordered) with the unused ones (start == end) last."""
  assert sorted(map(tuple, got.T)) == sorted(map(tuple, plain.T))   # a permutation
  used = got[:, got[2] > got[1]]
  assert np.all(got[2, used.shape[1]:] == got[1, used.shape[1]:])    # unused tiles last
  return used


def test_group_order_permutes_whole_tiles_band_by_band_then_by_expert():
  from kernels.routing import group_ordered
  r = _routing("random", 37, 3, 11, jax.random.key(3))
  order = np.asarray(r.order)
  for bm, band in [(4, 5), (16, 8), (16, 1000)]:
    plain = np.asarray(r.tiles(bm))
    got = np.asarray(group_ordered(r.tiles(bm), r, band))
    used = _used_of_permuted(got, plain)
    keys = [(order[s] // r.k // band, e, s) for e, s, _ in used.T]
    assert keys == sorted(keys), keys      # by first token's band, expert, position


def test_split_order_permutes_whole_tiles_by_expert_group_then_first_token():
  """split<G>: the same tiles, group of experts by group (expert e in group e*G // E),
  by first token within a group (ties as listed), unused tiles last; split1 is the token
  order."""
  from kernels.routing import split_ordered, token_ordered
  r = _routing("random", 37, 3, 11, jax.random.key(4))
  order = np.asarray(r.order)
  for bm, groups in [(4, 2), (16, 3), (4, 11), (16, 1)]:
    plain = np.asarray(r.tiles(bm))
    got = np.asarray(split_ordered(r.tiles(bm), r, groups))
    used = _used_of_permuted(got, plain)
    keys = [(e * groups // r.n_experts, order[s] // r.k) for e, s, _ in used.T]
    assert keys == sorted(keys), keys
    if groups == 1:
      np.testing.assert_array_equal(got, np.asarray(token_ordered(r.tiles(bm), r)))
  np.testing.assert_array_equal(np.asarray(r.ordered_tiles(4, "split2")),
                                np.asarray(split_ordered(r.tiles(4), r, 2)))
  with pytest.raises(ValueError, match="groups"):
    split_ordered(r.tiles(4), r, 0)


def test_routing_tile_lists_are_computed_once_and_reused(monkeypatch):
  from kernels.cvmm_triton import _sum_tiles
  from kernels.routing import make_routing
  idx = jax.random.randint(jax.random.key(4), (37, 3), 0, 11)
  plain = make_routing(idx, 11, tile_blocks=())
  assert plain.tile_lists == {}
  default = make_routing(idx, 11).tile_lists
  if jax.default_backend() == "gpu":
    assert set(default) == {f"{o}/{bm}" for o in ("expert", "token") for bm in (64, 128, 256)}
  else:
    assert default == {}                                  # the CPU path computes its own
  monkeypatch.setenv("CVMM_ROUTING_TILES", "yes")
  with pytest.raises(ValueError, match="CVMM_ROUTING_TILES"):
    make_routing(idx, 11)
  monkeypatch.delenv("CVMM_ROUTING_TILES")
  r = make_routing(idx, 11, tile_blocks=(16, 64))
  assert set(r.tile_lists) == {"expert/16", "expert/64", "token/16", "token/64"}
  for key, got in r.tile_lists.items():
    order, bm = key.split("/")
    np.testing.assert_array_equal(got, plain.ordered_tiles(int(bm), order))
  np.testing.assert_array_equal(r.tiles(16), plain.tiles(16))
  # a routing with lists is a pytree like any other: through jit, and the lists come along
  tok = jax.jit(lambda rr: rr.ordered_tiles(64, "token"))(r)
  np.testing.assert_array_equal(tok, plain.ordered_tiles(64, "token"))
  # the kernels take the cached list of their launch order, and compute others
  sentinel = jnp.full((3, 5), 7, jnp.int32)
  r2 = r.with_tiles((), ())
  r2.tile_lists["token/16"] = sentinel
  assert _sum_tiles(r2, 16) is sentinel
  monkeypatch.setenv("CVMM_TILE_ORDER", "group8")
  np.testing.assert_array_equal(_sum_tiles(r2, 16), plain.ordered_tiles(16, "group8"))
  with pytest.raises(ValueError, match="tile order"):
    plain.ordered_tiles(16, "tokens")


def test_tile_config_validates():
  TileConfig(64, 128, 32, 4, 3)
  two = TileConfig(128, 64, 128, 8, 2, loop_n=True, gluon=True, halves=2)
  assert TileConfig.from_json(two.to_json()) == two
  TileConfig(128, 64, 128, 8, 2, loop_n=True, gluon=True, halves=4)
  old = {k: v for k, v in TileConfig(64, 64, 32).to_json().items() if k != "halves"}
  assert TileConfig.from_json(old).halves == 1        # choices cached before the field
  for bad in [dict(block_m=48), dict(block_n=8), dict(num_warps=3), dict(num_stages=0),
              dict(splits=0), dict(halves=3), dict(halves=2),
              dict(halves=2, gluon=True, loop_n=True, num_stages=3),
              dict(halves=5, gluon=True, loop_n=True, num_stages=2)]:
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


def test_autotuner_caches_choice(tmp_path):
  path = str(tmp_path / "tune.json")
  calls = []

  def bench(cfg):
    calls.append(cfg)
    return 1.0 / cfg.block_n            # wider is "faster"

  cands = [TileConfig(64, 64, 32), TileConfig(64, 128, 32)]
  t = Autotuner(path)
  assert t.choose("k", (1, 2), jnp.bfloat16, cands, bench) == cands[1]
  assert len(calls) == 2
  assert t.choose("k", (1, 2), jnp.bfloat16, cands, bench) == cands[1]
  assert len(calls) == 2                 # cached in memory
  assert Autotuner(path).cached("k", (1, 2), jnp.bfloat16) == cands[1]   # and on disk
  assert t.choose("k", (1, 2), jnp.bfloat16, cands, None) == cands[1]


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


def test_sum_dtype_argument_checked_and_float32_off_gpu(monkeypatch):
  """sum_dtype (and CVMM_SUM_DTYPE) is validated for every implementation; off
  Hopper/Triton the sums stay float32, so "bfloat16" and "float16" give the default's
  numbers exactly."""
  from kernels import cvmm_pair
  case = ("basic", 64, 4, 4, 8, 32, 16, "random")
  x, w, g, r, _ = _inputs(case, jnp.bfloat16, True)
  with pytest.raises(ValueError, match="sum_dtype='float64'"):
    cvmm(x, r, w, g, impl="xla", sum_dtype="float64")
  with pytest.raises(ValueError, match="sum_dtype='half'"):
    cvmm_pair(x[:, 0], r, w, jnp.swapaxes(w, 1, 2), g, impl="xla", sum_dtype="half")
  monkeypatch.setenv("CVMM_SUM_DTYPE", "fp16")
  with pytest.raises(ValueError, match="CVMM_SUM_DTYPE='fp16'"):
    cvmm(x, r, w, g, impl="xla")
  monkeypatch.delenv("CVMM_SUM_DTYPE")
  a = cvmm(x, r, w, g, impl="xla")
  for sd in ("bfloat16", "float16"):
    b = cvmm(x, r, w, g, impl="xla", sum_dtype=sd)
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_sum_dtype_option(monkeypatch):
  """CVMM_SUM_DTYPE: float16 (default; any 16-bit call), float32 or bfloat16, which
  only bf16 calls with widths divisible by 8 on sm90+ take; anything else is refused,
  not silently ignored."""
  pytest.importorskip("triton")
  from kernels import cvmm_triton as ct
  monkeypatch.delenv("CVMM_SUM_DTYPE", raising=False)
  assert not ct.bf16_sums(jnp.bfloat16, 1024)
  assert ct.half_sums(jnp.bfloat16, 1024) == "float16"
  monkeypatch.setenv("CVMM_SUM_DTYPE", "float64")
  with pytest.raises(ValueError, match="CVMM_SUM_DTYPE"):
    ct.bf16_sums(jnp.bfloat16, 1024)
  monkeypatch.setenv("CVMM_SUM_DTYPE", "float16")
  assert ct.half_sums(jnp.bfloat16, 1020) == "float16"
  assert ct.half_sums(jnp.float16, 24) == "float16"
  assert ct.half_sums(jnp.float32, 1024) is None      # float32 calls keep float32 sums
  assert ct.half_sums(jnp.bfloat16, 1024, "float32") is None   # the argument wins
  assert not ct.bf16_sums(jnp.bfloat16, 1024, "float32")   # the argument wins
  monkeypatch.setenv("CVMM_SUM_DTYPE", "bfloat16")
  monkeypatch.setattr(ct, "_interpret", lambda: False)
  monkeypatch.setattr(ct, "_compute_capability", lambda: 9.0)
  assert ct.bf16_sums(jnp.bfloat16, 1024)
  assert ct._red_width(1024, jnp.bfloat16) == 8
  assert ct._red_width(1024, jnp.bfloat16, "float16") == 8   # f16x2 vectors on sm90
  assert ct._red_width(1020, jnp.bfloat16, "float16") == 1   # else scalar float16 adds
  assert not ct.bf16_sums(jnp.float32, 1024)        # float32 calls keep float32 sums
  assert not ct.bf16_sums(jnp.bfloat16, 1020)       # a vector of 8 must not straddle rows
  assert ct._red_width(1020, jnp.bfloat16) == 4
  assert not ct.bf16_sums(jnp.bfloat16, 1024, "float32")   # the argument wins
  monkeypatch.delenv("CVMM_SUM_DTYPE")
  assert ct.bf16_sums(jnp.bfloat16, 1024, "bfloat16")
  monkeypatch.setattr(ct, "_compute_capability", lambda: 8.0)
  assert not ct.bf16_sums(jnp.bfloat16, 1024, "bfloat16")  # bf16x2 vector reductions: sm90+


def test_gpu_impls_unavailable_on_cpu():
  from kernels import is_available, resolve
  if jax.default_backend() == "gpu":
    pytest.skip("runs on the CPU backend only")
  assert not is_available("triton") and not is_available("mosaic")
  assert resolve("auto") == "xla"


_INTERPRETER_SCRIPT = textwrap.dedent("""
    import os
    import jax, jax.numpy as jnp, numpy as np
    from kernels import make_routing
    from kernels.cvmm_reference import cvmm_reference
    from kernels.cvmm_triton import cvmm_triton
    cases = [(23, 4, 1, 5, 40, 24, False, True), (19, 4, 4, 5, 24, 40, True, True),
             (21, 4, 2, 3, 40, 24, True, False), (9, 1, 1, 1, 16, 16, True, True)]
    for n, k, m, e, i, o, gated, fuse in cases:
      ks = jax.random.split(jax.random.key(n), 5)
      r = make_routing(jax.random.randint(ks[0], (n, k), 0, e), e)
      x = jax.random.normal(ks[1], (n, m, i))
      w = jax.random.normal(ks[2], (e, i, o)) / np.sqrt(i)
      g = jax.random.uniform(ks[3], (n, k)) if gated else None
      ct = jax.random.normal(ks[4], (n, o) if gated else (n, k, o))
      def outs(fn):
        loss = lambda x, w, g: jnp.sum(fn(x, r, w, g) * ct)
        argn = (0, 1, 2) if gated else (0, 1)
        return (fn(x, r, w, g),) + tuple(jax.grad(loss, argnums=argn)(x, w, g))
      got = outs(lambda x, r, w, g: cvmm_triton(x, r, w, g, fuse_sum=fuse))
      ref = outs(cvmm_reference)
      for a, b in zip(got, ref):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        err = np.linalg.norm(a - b) / np.linalg.norm(b)
        assert err <= 1e-5, (n, k, m, e, i, o, gated, fuse, err)
    # One program per row tile walking every column block (loop_n), with the fused
    # gated sum and with the dgates epilogue; 40 columns = 3 blocks of 16, masked.
    from kernels.autotune import TileConfig
    from kernels.cvmm_triton import rows_matmul
    n, k, e, i, o = 21, 4, 3, 24, 40
    ks = jax.random.split(jax.random.key(7), 6)
    r = make_routing(jax.random.randint(ks[0], (n, k), 0, e), e)
    w = jax.random.normal(ks[1], (e, i, o)) / np.sqrt(i)
    g = jax.random.uniform(ks[2], (n * k,))
    we = w[r.expert_index.reshape(-1)]                                  # [P, I, O]
    cfg = TileConfig(16, 16, 32, 4, 1, loop_n=True)
    a = jax.random.normal(ks[3], (n * k, i))
    out, _ = rows_matmul(a, w, r, a_rows=k, out_rows=1, scale=g, cfg=cfg)
    y = jnp.einsum("PI,PIO->PO", a, we, precision="highest")
    ref = (y * g[:, None]).reshape(n, k, o).sum(1)
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) <= 1e-5
    a1 = jax.random.normal(ks[4], (n, i))
    c = jax.random.normal(ks[5], (n * k, o))
    out, dg = rows_matmul(a1, w, r, a_rows=1, out_rows=k, scale=g, dgate_rows=c, c_rows=k,
                          cfg=cfg)
    y = jnp.einsum("PI,PIO->PO", jnp.repeat(a1, k, axis=0), we, precision="highest")
    for got, want in ((out, y * g[:, None]), (dg, jnp.sum(y * c, axis=1))):
      assert np.linalg.norm(got - want) / np.linalg.norm(want) <= 1e-5
    # The weight gradient with each expert's rows split over 3 programs (float32
    # partials summed afterwards), against an einsum; one expert without pairs.
    from kernels.cvmm_triton import expert_gram
    idx = jax.random.randint(ks[0], (n, k), 0, e - 1)
    r2 = make_routing(idx, e)
    b = jax.random.normal(ks[5], (n * k, o))
    onehot = jax.nn.one_hot(idx.reshape(-1), e)
    ref = jnp.einsum("PE,PI,PO->EIO", onehot, jnp.repeat(a1, k, axis=0), b * g[:, None],
                     precision="highest")
    for split_sums in ("1", "0"):       # partials added by the kernel, or summed by XLA
      os.environ["CVMM_DW_RED"] = split_sums
      try:
        dw = expert_gram(a1, b, r2, a_rows=1, b_rows=k, scale=g,
                         cfg=TileConfig(16, 16, 16, 4, 1, splits=3))
      finally:
        del os.environ["CVMM_DW_RED"]
      assert float(jnp.abs(dw[e - 1]).max()) == 0.0
      assert np.linalg.norm(dw - ref) / np.linalg.norm(ref) <= 1e-5, split_sums
    # The fused σ-MoE pair (forward and backward kernels) against two reference CVMMs.
    from kernels.cvmm_reference import cvmm_pair_reference
    from kernels.cvmm_triton import cvmm_triton_pair
    for n, k, e, d, h, o in ((21, 4, 5, 24, 16, 40), (13, 2, 1, 70, 24, 20)):
      ks = jax.random.split(jax.random.key(n), 6)
      r = make_routing(jax.random.randint(ks[0], (n, k), 0, e), e)
      x = jax.random.normal(ks[1], (n, d))
      wu = jax.random.normal(ks[2], (e, d, h)) / np.sqrt(d)
      wd = jax.random.normal(ks[3], (e, h, o)) / np.sqrt(h)
      g = jax.random.uniform(ks[4], (n, k))
      ct = jax.random.normal(ks[5], (n, o))
      ref_fn = lambda x, wu, wd, g: cvmm_pair_reference(x, r, wu, wd, g)
      got_fn = lambda x, wu, wd, g: cvmm_triton_pair(x, r, wu, wd, g)
      for fn_pair in ((got_fn, ref_fn),):
        outs = [(f(x, wu, wd, g),) + tuple(jax.grad(lambda *a: jnp.sum(f(*a) * ct),
                                                    argnums=(0, 1, 2, 3))(x, wu, wd, g))
                for f in fn_pair]
        for a, b in zip(*outs):
          a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
          err = np.linalg.norm(a - b) / np.linalg.norm(b)
          assert err <= 1e-5, ("pair", n, k, e, d, h, o, err)
    # bf16 weights with float32 x: computed in float32, gradients in each input's dtype.
    wu16, wd16 = wu.astype(jnp.bfloat16), wd.astype(jnp.bfloat16)
    grads = jax.grad(lambda *a: jnp.sum(cvmm_triton_pair(a[0], r, *a[1:]) * ct),
                     argnums=(0, 1, 2, 3))(x, wu16, wd16, g)
    want = jax.grad(lambda *a: jnp.sum(ref_fn(*a) * ct), argnums=(0, 1, 2, 3))(
        x, wu16.astype(jnp.float32), wd16.astype(jnp.float32), g)
    for a, b, primal in zip(grads, want, (x, wu16, wd16, g)):
      assert a.dtype == primal.dtype, ("pair dtype", a.dtype, primal.dtype)
      tol = 1e-5 if primal.dtype == jnp.float32 else 1e-2     # bf16: its rounding
      err = np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64))
      assert err <= tol * np.linalg.norm(np.asarray(b, np.float64)), ("pair mixed", err)
    print("interpreter ok")
""")


@pytest.mark.slow
def test_triton_kernels_in_interpreter():
  """The Triton kernels and their custom_vjp, float32, run by Triton's CPU interpreter."""
  pytest.importorskip("triton")
  pytest.importorskip("torch")
  run_in_triton_interpreter(_INTERPRETER_SCRIPT, "interpreter ok")


_UNIT_STORE_SCRIPT = textwrap.dedent("""
    import os
    os.environ["CVMM_UNIT_STORE"] = "1"
    import jax, jax.numpy as jnp, numpy as np
    import kernels.cvmm_triton as kt
    from kernels import make_head_routing
    from kernels.autotune import TileConfig
    from kernels.cvmm_reference import cvmm_reference
    calls = []
    orig = kt.units_store
    kt.units_store = lambda *a, **kw: calls.append(kw["out_rows"]) or orig(*a, **kw)
    def rel(a, b):
      a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
      return np.linalg.norm(a - b) / np.linalg.norm(b)
    # SwitchHead's O through cvmm_triton: its dx (a head's two experts into the head's
    # row, with dgates) takes the unit-store kernel; every output and gradient against
    # the reference. Head 1 always picks experts 0 and 1 (in both orders); expert 3 of
    # head 2 gets nothing; O = 40 columns (masked in a 64-column block).
    n, h, ea, dh, d = 23, 3, 4, 24, 40
    ks = jax.random.split(jax.random.key(3), 6)
    idx = np.array(jax.lax.top_k(jax.random.normal(ks[0], (n, h, ea)), 2)[1])
    idx[:, 1] = np.where(np.arange(n)[:, None] % 2, [0, 1], [1, 0])
    idx[:, 2] = np.minimum(idx[:, 2], 2)
    idx[idx[:, 2, 0] == idx[:, 2, 1], 2] = [0, 2]
    r = make_head_routing(jnp.asarray(idx, jnp.int32), ea, unit_pairs=True)
    x = jax.random.normal(ks[1], (n, h, dh))
    w = jax.random.normal(ks[2], (h * ea, dh, d)) / np.sqrt(dh)
    g = jax.random.uniform(ks[3], (n, 2 * h))
    ct = jax.random.normal(ks[4], (n, d))
    def outs(fn):
      loss = lambda x, w, g: jnp.sum(fn(x, r, w, g) * ct)
      return (fn(x, r, w, g),) + tuple(jax.grad(loss, argnums=(0, 1, 2))(x, w, g))
    got = outs(kt.cvmm_triton)
    assert calls == [h], calls
    for a, b in zip(got, outs(cvmm_reference)):
      assert rel(a, b) <= 1e-5, rel(a, b)
    # rows_matmul directly: each pair its own input row (a_rows = K: the two rows of a
    # unit differ), with and without gates, dgates, 16-row tiles (several per
    # combination) and the autotuner's default tile.
    k = 2 * h
    we = w[r.expert_index.reshape(-1)]                                 # [P, I, O]
    a = jax.random.normal(ks[5], (n * k, dh))
    c = jax.random.normal(ks[4], (n * h, d))
    y = jnp.einsum("PI,PIO->PO", a, we, precision="highest")           # [P, O]
    gs = g.reshape(-1)
    for cfg in (TileConfig(16, 64, 16, 4, 1), None):
      for scale in (gs, None):
        out, dg = kt.rows_matmul(a, w, r, a_rows=k, out_rows=h, scale=scale,
                                 dgate_rows=c, c_rows=h, cfg=cfg) if cfg is None else (
            kt.units_store(a, w, r, scale, c, cfg, a_rows=k, out_rows=h, c_rows=h,
                           transpose_w=False))
        ys = y if scale is None else y * scale[:, None]
        want = ys.reshape(n, h, 2, d).sum(2).reshape(n * h, d)
        assert out.dtype == a.dtype and rel(out, want) <= 1e-5, rel(out, want)
        want_dg = jnp.sum(y * jnp.repeat(c, 2, axis=0), axis=1)
        assert rel(dg, want_dg) <= 1e-5, rel(dg, want_dg)
    # the weights used transposed, no dgates
    wt = jnp.swapaxes(w, 1, 2)
    out, dg = kt.rows_matmul(a, wt, r, a_rows=k, out_rows=h, scale=gs, transpose_w=True)
    assert dg is None and rel(out, (y * gs[:, None]).reshape(n, h, 2, d).sum(2).reshape(
        n * h, d)) <= 1e-5
    # what it refuses
    for bad in (dict(out_rows=1), dict(out_rows=h, c_rows=k)):
      try:
        kt.units_store(a, w, r, gs, c, TileConfig(16, 64, 16, 4, 1), a_rows=k,
                       transpose_w=False, **{"c_rows": h, **bad})
      except ValueError as err:
        assert "unit store" in str(err)
      else:
        raise AssertionError(bad)
    print("unit store ok")
""")


@pytest.mark.slow
def test_unit_store_in_interpreter():
  """The unit-store kernel (CVMM_UNIT_STORE=1: a unit's two products added in registers
  and stored once, SwitchHead O's dx) in Triton's CPU interpreter, float32: SwitchHead O
  through cvmm_triton (output and every gradient) against the reference, and the kernel
  directly (two input rows per unit, gates or none, dgates, several tiles per
  combination, transposed weights) against einsums; refusals."""
  pytest.importorskip("triton")
  pytest.importorskip("torch")
  run_in_triton_interpreter(_UNIT_STORE_SCRIPT, "unit store ok")


def test_float16_sum_row_scales_bound_every_row():
  """The float16 sums' row scale: a power of two that maps the bound of each row's sum
  to [2^13, 2^14) (no overflow below float16's 65504, and no precision thrown away),
  and the bound really bounds |out|: for inputs from 1e-6 to 1e4 in magnitude, and
  with one expert's weights 1e6 times the others' (bounded per expert: it does not
  shrink the rows that do not use it)."""
  from kernels import make_routing
  from kernels.cvmm_reference import cvmm_reference
  from kernels.cvmm_triton import _f16_row_scales, _max_l1, _pow2_scale
  n, k, m, e, i, o = 50, 4, 2, 6, 32, 24
  ks = jax.random.split(jax.random.key(3), 4)
  r = make_routing(jax.random.randint(ks[0], (n, k), 0, e), e)
  for mag in (1e-6, 1.0, 1e4):
    x = jax.random.normal(ks[1], (n, m, i)) * mag
    w = jax.random.normal(ks[2], (e, i, o)).at[0].multiply(1e6)
    g = jax.random.uniform(ks[3], (n, k))
    s, pair_s = _f16_row_scales(x.reshape(n * m, i), _max_l1(w, 1), r, g.reshape(-1), m, 1)
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
  got = np.asarray(_pow2_scale(b))
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
  from kernels.cvmm_triton import _f16_row_scales_checked, _sampled_max_l1
  n, k, m, e, i, o = 50, 4, 2, 6, 32, 24
  ks = jax.random.split(jax.random.key(4), 4)
  r = make_routing(jax.random.randint(ks[0], (n, k), 0, e), e)
  w = jax.random.normal(ks[2], (e, i, o)) / np.sqrt(i)
  g = jax.random.uniform(ks[3], (n, k), minval=0.1)
  hi = 15 - 2                                                      # 4 terms a row
  for mag in (1e-6, 1.0, 1e4):
    x = (jax.random.normal(ks[1], (n, m, i)) * mag).at[7].set(0.0)   # token 7: zeros
    s, pair_s, sampled = _f16_row_scales_checked(x.reshape(n * m, i), w, False, r,
                                                 g.reshape(-1), m, 1)
    s, sampled = np.asarray(s), np.asarray(sampled)
    ex = np.log2(s)
    np.testing.assert_array_equal(ex, np.round(ex))                   # powers of two
    np.testing.assert_array_equal(sampled, np.arange(n) != 7)
    west = np.asarray(_sampled_max_l1(w, False))[np.asarray(r.expert_index)]    # [N, K]
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
  np.testing.assert_allclose(_sampled_max_l1(w, False), wa[:, ::8].sum(1).max(1) * 8,
                             rtol=1e-6)
  wt = jnp.swapaxes(w, 1, 2)
  np.testing.assert_allclose(_sampled_max_l1(wt, True),
                             np.swapaxes(wa, 1, 2)[:, ::8].sum(2).max(1), rtol=1e-6)


_F16_SUMS_SCRIPT = textwrap.dedent("""
    import os
    # XLA's scale-back returns the sums' float32 values, checked here at scales whose
    # results float16 cannot hold (the Triton scale-back's float16 rows: _UNSCALE_SCRIPT)
    os.environ["CVMM_UNSCALE"] = "xla"
    import jax, jax.numpy as jnp, numpy as np
    from kernels import make_routing
    from kernels.cvmm_reference import cvmm_pair_reference, cvmm_reference
    from kernels.cvmm_triton import cvmm_triton, cvmm_triton_pair, pair_rows, rows_matmul
    rel = lambda a, b: float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(
        b, np.float64)) / np.linalg.norm(np.asarray(b, np.float64)))
    f32 = lambda t: t.astype(jnp.float32)
    hi = lambda *a: jnp.einsum(*a, precision="highest")
    n, k, m, e, i, o, d, h = 23, 4, 2, 5, 40, 24, 40, 16
    ks = jax.random.split(jax.random.key(1), 8)
    r = make_routing(jax.random.randint(ks[0], (n, k), 0, e), e)
    g = jax.random.uniform(ks[3], (n, k)).astype(jnp.float16)
    ei = r.expert_index                                                  # [N, K]
    # The kernels' float32 results at scales whose float16 sums, unscaled, would lose
    # everything in subnormals (1e-3) or overflow to inf (300).
    for mag in (1e-3, 300.0):
      x = (jax.random.normal(ks[1], (n, m, i)) * mag).astype(jnp.float16)
      w = (jax.random.normal(ks[2], (e, i, o)) * mag / np.sqrt(i)).astype(jnp.float16)
      dy = (jax.random.normal(ks[4], (n * k, o)) * mag).astype(jnp.float16)
      we = f32(w)[ei]                                                    # [N, K, I, O]
      xs = jnp.repeat(f32(x), k // m, axis=1)                            # [N, K, I]
      for sd in ("float16", "float32"):
        out = rows_matmul(x.reshape(n * m, i), w, r, a_rows=m, out_rows=1,
                          scale=g.reshape(-1), sum_dtype=sd)[0]
        want = hi("nki,nkio,nk->no", xs, we, f32(g))
        assert np.all(np.isfinite(np.asarray(out))) and rel(out, want) <= 2e-3, (sd, mag)
        dx = rows_matmul(dy, w, r, a_rows=k, out_rows=m, transpose_w=True, sum_dtype=sd)[0]
        want = hi("nko,nkio->nki", f32(dy).reshape(n, k, o), we).reshape(
            n, m, k // m, i).sum(2).reshape(n * m, i)
        assert np.all(np.isfinite(np.asarray(dx))) and rel(dx, want) <= 2e-3, (sd, mag)
        if sd == "float16":
          f16_out = out
      assert rel(f16_out, out) > 0             # the float16 sums really ran
    # The fused pair's kernels: forward output and backward dx, with the stored middles
    # (h, du) in float16's range and the sums below (tiny) or above (huge) it.
    for sx, su, sv, so in ((1e-2, 1e-2, 1e-3, 1e-1), (10.0, 10.0, 30.0, 10.0)):
      x1 = (jax.random.normal(ks[1], (n, d)) * sx).astype(jnp.float16)
      wu = (jax.random.normal(ks[5], (e, d, h)) * su).astype(jnp.float16)
      wd = (jax.random.normal(ks[6], (e, h, o)) * sv).astype(jnp.float16)
      fwd = pair_rows(x1, wu, wd, g, r, sum_dtype="float16")
      hh = jnp.maximum(hi("nd,nkdh->nkh", f32(x1), f32(wu)[ei]), 0)
      want = hi("nkh,nkho,nk->no", hh, f32(wd)[ei], f32(g))
      assert np.all(np.isfinite(np.asarray(fwd["out"]))), sx
      assert rel(fwd["out"], want) <= 2e-3, ("pair fwd", sx, rel(fwd["out"], want))
      dout = (jax.random.normal(ks[7], (n, o)) * so).astype(jnp.float16)
      bwd = pair_rows(dout, wd, wu, g, r, h=fwd["h"], sum_dtype="float16")
      du = hi("no,nkho->nkh", f32(dout), f32(wd)[ei]) * f32(g)[:, :, None] * (
          f32(fwd["h"]).reshape(n, k, h) > 0)
      want = hi("nkh,nkdh->nd", du, f32(wu)[ei])
      assert np.all(np.isfinite(np.asarray(bwd["out"]))), sx
      assert rel(bwd["out"], want) <= 2e-3, ("pair bwd", sx, rel(bwd["out"], want))
    # The ops with their gradients (float16 outputs, so at scale 1).
    x = jax.random.normal(ks[1], (n, m, i)).astype(jnp.float16)
    w = (jax.random.normal(ks[2], (e, i, o)) / np.sqrt(i)).astype(jnp.float16)
    ct = jax.random.normal(ks[4], (n, o))
    fn = lambda x, w, g: cvmm_triton(x, r, w, g, sum_dtype="float16")
    ref = lambda x, w, g: cvmm_reference(x, r, w, g)
    loss = lambda f: lambda *a: jnp.sum(f32(f(*a)) * ct)
    got = (fn(x, w, g),) + jax.grad(loss(fn), argnums=(0, 1, 2))(x, w, g)
    want = (ref(f32(x), f32(w), f32(g)),) + jax.grad(loss(ref), argnums=(0, 1, 2))(
        f32(x), f32(w), f32(g))
    for name, a, b in zip(("out", "dx", "dw", "dg"), got, want):
      assert a.dtype == jnp.float16 and rel(a, b) <= 2e-3, (name, rel(a, b))
    x1 = x[:, 0]
    wu = (jax.random.normal(ks[5], (e, d, h)) / np.sqrt(d)).astype(jnp.float16)
    wd = (jax.random.normal(ks[6], (e, h, o)) / np.sqrt(h)).astype(jnp.float16)
    fn = lambda x, wu, wd, g: cvmm_triton_pair(x, r, wu, wd, g, sum_dtype="float16")
    ref = lambda x, wu, wd, g: cvmm_pair_reference(x, r, wu, wd, g)
    got = (fn(x1, wu, wd, g),) + jax.grad(loss(fn), argnums=(0, 1, 2, 3))(x1, wu, wd, g)
    up = (f32(x1), f32(wu), f32(wd), f32(g))
    want = (ref(*up),) + jax.grad(loss(ref), argnums=(0, 1, 2, 3))(*up)
    for name, a, b in zip(("out", "dx", "dkeys", "dvalues", "dg"), got, want):
      assert a.dtype == jnp.float16 and rel(a, b) <= 2e-3, ("pair", name, rel(a, b))
    print("float16 sums ok")
""")


@pytest.mark.slow
def test_float16_sums_in_interpreter():
  """sum_dtype="float16": the scaled float16 sums of the row kernel (gated output, dx
  over slots, gated dx) and of the fused pair (output, dx), float16 inputs, run by
  Triton's CPU interpreter (scalar float16 atomics), against the float32 reference."""
  pytest.importorskip("triton")
  pytest.importorskip("torch")
  run_in_triton_interpreter(_F16_SUMS_SCRIPT, "float16 sums ok")


_UNSCALE_SCRIPT = textwrap.dedent("""
    import os
    # the scale-back of bound scales (both passes take them; checked scales: _CHECKED_SCRIPT)
    os.environ["CVMM_F16_SCALES"] = "bound"
    import jax, jax.numpy as jnp, numpy as np
    from kernels import make_routing
    from kernels.cvmm_triton import cvmm_triton, cvmm_triton_pair, unscale_rows
    bits = lambda v: np.asarray(jax.lax.bitcast_convert_type(v, jnp.uint16))
    ks = jax.random.split(jax.random.key(2), 8)
    # The kernel alone, bit for bit against XLA's pass: rows that do not fill a program,
    # columns that do not fill a block, infinities, nan, scales up to 2^120.
    for r, o in ((13, 40), (9, 1100)):
      x = (jax.random.normal(ks[0], (r, o)) * 300).astype(jnp.float16)
      x = x.at[0, :4].set(jnp.array([jnp.inf, -jnp.inf, jnp.nan, 0.0], jnp.float16))
      inv = 2.0 ** jax.random.randint(ks[1], (r,), -30, 30).astype(jnp.float32)
      inv = inv.at[1].set(2.0 ** 120)
      for dt in (jnp.bfloat16, jnp.float16):
        want = (x.astype(jnp.float32) * inv[:, None]).astype(dt)
        for rev in (True, False):
          got = unscale_rows(x, inv, dt, reverse=rev)
          assert got.dtype == jnp.dtype(dt), got.dtype
          assert np.array_equal(bits(got), bits(want)), (r, o, dt, rev)
    # Through the ops (the interpreter adds in a fixed order, so the float16 sums are the
    # same in every run): CVMM_UNSCALE=triton gives XLA's results bit for bit.
    n, k, m, e, i, o, h = 23, 4, 2, 5, 40, 24, 16
    r = make_routing(jax.random.randint(ks[2], (n, k), 0, e), e)
    g = jax.random.uniform(ks[3], (n, k)).astype(jnp.float16)
    x = jax.random.normal(ks[4], (n, m, i)).astype(jnp.float16)
    w = (jax.random.normal(ks[5], (e, i, o)) / np.sqrt(i)).astype(jnp.float16)
    wu = (jax.random.normal(ks[6], (e, i, h)) / np.sqrt(i)).astype(jnp.float16)
    wd = (jax.random.normal(ks[7], (e, h, o)) / np.sqrt(h)).astype(jnp.float16)
    ct = jax.random.normal(ks[0], (n, o))
    loss = lambda f: lambda *a: jnp.sum(f(*a).astype(jnp.float32) * ct)
    import kernels.cvmm_triton as kt
    calls, orig = [], kt.unscale_rows
    kt.unscale_rows = lambda *a, **kw: calls.append(kw["reverse"]) or orig(*a, **kw)
    runs = []
    for how in ("xla", "triton"):
      os.environ["CVMM_UNSCALE"] = how
      assert calls == []                   # XLA's pass: the kernel never ran
      fn = lambda x, w, g: cvmm_triton(x, r, w, g, sum_dtype="float16")
      pair = lambda x, wu, wd, g: cvmm_triton_pair(x, r, wu, wd, g, sum_dtype="float16")
      runs.append((fn(x, w, g),) + jax.grad(loss(fn), argnums=(0, 1, 2))(x, w, g)
                  + (pair(x[:, 0], wu, wd, g),)
                  + jax.grad(loss(pair), argnums=(0, 1, 2, 3))(x[:, 0], wu, wd, g))
    assert calls and all(calls), calls     # out and dx of both ops, last rows first
    for j, (a, b) in enumerate(zip(*runs)):
      assert a.dtype == b.dtype and np.array_equal(bits(a), bits(b)), j
    print("unscale ok")
""")


@pytest.mark.slow
def test_unscale_kernel_in_interpreter():
  """CVMM_UNSCALE=triton: the Triton scale-back of float16 sums (unscale_rows) equals
  XLA's pass bit for bit, alone (both orders, bf16 and float16, inf/nan) and through the
  gated CVMM and the fused pair with their gradients, in Triton's CPU interpreter."""
  pytest.importorskip("triton")
  pytest.importorskip("torch")
  run_in_triton_interpreter(_UNSCALE_SCRIPT, "unscale ok")


_CHECKED_SCRIPT = textwrap.dedent("""
    import os
    import jax, jax.numpy as jnp, numpy as np
    from kernels import make_routing
    from kernels.cvmm_reference import cvmm_reference
    import kernels.cvmm_triton as kt
    rel = lambda a, b: float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(
        b, np.float64)) / np.linalg.norm(np.asarray(b, np.float64)))
    f32 = lambda t: t.astype(jnp.float32)
    hi = lambda *a: jnp.einsum(*a, precision="highest")
    n, k, m, e, i, o = 23, 4, 2, 5, 40, 24
    ks = jax.random.split(jax.random.key(1), 8)
    r = make_routing(jax.random.randint(ks[0], (n, k), 0, e), e)
    ei = r.expert_index
    g = jax.random.uniform(ks[3], (n, k)).astype(jnp.float16)
    seen, orig = [], kt.unscale_rows_checked
    def spy(out, inv_s, sampled, *a, **kw):
      seen.append((np.asarray(out, np.float32), np.asarray(sampled)))
      return orig(out, inv_s, sampled, *a, **kw)
    kt.unscale_rows_checked = spy
    def down(x, w, gates):    # out [N, O] = sum_s g x[n, s // 2] @ W[e]
      want = hi("nki,nkio,nk->no", jnp.repeat(f32(x), k // m, axis=1), f32(w)[ei],
                f32(gates))
      out = kt.rows_matmul(x.reshape(n * m, i), w, r, a_rows=m, out_rows=1,
                           scale=gates.reshape(-1), sum_dtype="float16")[0]
      return out, want
    def dx(dy, w):            # dx [N * M, I] = sum over the slots of row j: dy @ W[e]^T
      want = hi("nko,nkio->nki", f32(dy).reshape(n, k, o), f32(w)[ei]).reshape(
          n, m, k // m, i).sum(2).reshape(n * m, i)
      out = kt.rows_matmul(dy, w, r, a_rows=k, out_rows=m, transpose_w=True,
                           sum_dtype="float16")[0]
      return out, want
    def check(got, want, bad_rows=()):
      sums, sampled = seen.pop()
      assert not seen and got.dtype == jnp.float16, got.dtype
      # the rows the scale-back recomputes: sums not finite, largest |sum| below 2^0
      # but not 0, or 0 where the token's sample was not
      top = np.where(np.isnan(sums), np.inf, np.abs(sums)).max(axis=1)
      bad = ~np.isfinite(top) | ((top < 1) & ((top > 0) | (sampled == 1)))
      assert np.array_equal(np.flatnonzero(bad), bad_rows), np.flatnonzero(bad)
      fin = np.isfinite(np.asarray(want))
      assert np.array_equal(np.isfinite(np.asarray(got)), fin)
      assert rel(np.asarray(got)[fin], np.asarray(want)[fin]) <= 2e-3, rel(got, want)
    w = (jax.random.normal(ks[2], (e, i, o)) / np.sqrt(i)).astype(jnp.float16)
    for mag in (0.05, 1.0, 20.0):
      check(*down((jax.random.normal(ks[1], (n, m, i)) * mag).astype(jnp.float16), w, g))
      check(*dx((jax.random.normal(ks[4], (n * k, o)) * mag).astype(jnp.float16), w))
    # An estimate 2^30 too high: every row's sums below 2^0 (they would lose precision),
    # every row recomputed in float32. (Sums that overflow float16 are repaired too;
    # Triton's interpreter refuses to round them, so a GPU test forces those.)
    x = jax.random.normal(ks[1], (n, m, i)).astype(jnp.float16)
    dy = jax.random.normal(ks[4], (n * k, o)).astype(jnp.float16)
    kt._CHECK_AIM_BELOW = 30
    check(*down(x, w, g), bad_rows=np.arange(n))
    kt._CHECK_AIM_BELOW = 2
    # dx: token 3's slot 0 (the sample of both its output rows) 2^12 larger: its second
    # row (slots 2, 3) comes out 2^12 too small, alone recomputed. Token 5's slots 2, 3
    # zero: its second row is 0 where its sample is not: recomputed (0 again).
    dy2 = dy.at[3 * k].multiply(2.0 ** 12).at[5 * k + 2:5 * k + 4].set(0)
    check(*dx(dy2, w), bad_rows=np.array([3 * m + 1, 5 * m + 1]))
    # An infinity: its row only, not finite, as in float32.
    check(*down(x.at[5, 1, 0].set(jnp.inf), w, g), bad_rows=np.array([5]))
    # Zero inputs: zero rows, none recomputed (the sample was 0 too).
    check(*down(x.at[7].set(0), w, g))
    # The scale-back alone, wider than one block of columns (O = 1100 > 1024: the rows'
    # maxima first, then the stores), W used transposed, dx's row maps (4 rows of a and
    # 2 output rows a token): an inf row, a small row, a zero row with and without its
    # sample are recomputed or kept as they should be, bf16 and float16 out.
    n2, k2, e2, i2, o2 = 6, 4, 3, 16, 1100
    r2 = make_routing(jax.random.randint(ks[6], (n2, k2), 0, e2), e2)
    a2 = jax.random.normal(ks[7], (n2 * k2, i2)).astype(jnp.float16)
    w2 = jax.random.normal(ks[0], (e2, o2, i2)).astype(jnp.float16)      # [E, O, I]
    g2 = jax.random.uniform(ks[1], (n2 * k2,))
    sums = (jax.random.normal(ks[2], (n2 * 2, o2)) * 10).astype(jnp.float16)
    sums = sums.at[0, 5].set(jnp.inf).at[1].multiply(1e-3).at[2:4].set(0)
    inv = 2.0 ** jax.random.randint(ks[3], (n2 * 2,), -3, 3).astype(jnp.float32)
    sampled = jnp.ones((n2 * 2,), jnp.int8).at[3].set(0)
    terms = np.einsum("pi,poi->po", np.asarray(a2, np.float64),
                      np.asarray(w2, np.float64)[np.asarray(r2.expert_index).reshape(-1)])
    redo = (terms * np.asarray(g2)[:, None]).reshape(n2 * 2, 2, o2).sum(1)
    kept = np.asarray(sums, np.float64) * np.asarray(inv)[:, None]
    for dt in (jnp.bfloat16, jnp.float16):
      got = np.asarray(kt.unscale_rows_checked(sums, inv, sampled, a2, w2, r2, g2, dt,
                                               a_rows=k2, out_rows=2, transpose_w=True),
                       np.float64)
      want = np.where(np.isin(np.arange(n2 * 2), [0, 1, 2])[:, None], redo, kept)
      assert rel(got, want) <= 4e-3 and np.array_equal(got[3], np.zeros(o2)), dt
    seen.clear()
    # Bound scales (CVMM_F16_SCALES=bound) give the same values within the tolerance,
    # without the check.
    os.environ["CVMM_F16_SCALES"] = "bound"
    got, want = down(x, w, g)
    assert not seen and rel(got, want) <= 2e-3
    os.environ["CVMM_F16_SCALES"] = "checked"
    # The ops and their gradients (the gated op's dx, with dgates, too).
    for gated in (True, False):
      args = (x, w, g) if gated else (x, w)
      fn = lambda *a: kt.cvmm_triton(a[0], r, a[1], *a[2:], sum_dtype="float16")
      ref = lambda *a: cvmm_reference(a[0], r, a[1], *a[2:])
      ctg = jax.random.normal(ks[5], (n, o) if gated else (n, k, o))
      loss = lambda f: lambda *a: jnp.sum(f32(f(*a)) * ctg)
      got = (fn(*args),) + jax.grad(loss(fn), argnums=tuple(range(len(args))))(*args)
      up = tuple(map(f32, args))
      want = (ref(*up),) + jax.grad(loss(ref), argnums=tuple(range(len(args))))(*up)
      for name, a, b in zip(("out", "dx", "dw", "dg"), got, want):
        assert a.dtype == jnp.float16 and rel(a, b) <= 2e-3, (gated, name, rel(a, b))
      assert seen                          # the checked scale-back ran
      seen.clear()
    print("checked ok")
""")


@pytest.mark.slow
def test_checked_f16_scales_in_interpreter():
  """CVMM_F16_SCALES=checked (the default): with the estimate right no row is
  recomputed and the sums match float32 (gated output, dx over slots, magnitudes 0.05
  to 20); with the estimate 2^30 too high every row is recomputed; a row whose sample
  misjudged it 2^12, a zero row whose sample was not, an infinity: those rows alone;
  zero inputs: none; every result as float32's; the scale-back alone over more than
  one block of columns; through the ops with their gradients. Triton's CPU
  interpreter."""
  pytest.importorskip("triton")
  pytest.importorskip("torch")
  run_in_triton_interpreter(_CHECKED_SCRIPT, "checked ok")


def test_checked_scales_where_the_input_is_the_larger():
  """Checked float16 scales where a token's input rows hold at least as many values as
  its output rows (σ-MoE down: 16 rows of 128 into 1024; up's dx likewise; SwitchHead
  V's dx: 8 rows of 128 into 1024), bound ones elsewhere (SwitchHead O's forward: 4 rows
  of 128 into 1024)."""
  from kernels.cvmm_triton import checked_scales_pay  # noqa: PLC0415
  assert checked_scales_pay(128, 1024, 16, 1) and checked_scales_pay(128, 1024, 8, 1)
  assert not checked_scales_pay(128, 1024, 4, 1)


def test_f16_scales_kind_is_validated(monkeypatch):
  from kernels.cvmm_triton import f16_scales_kind  # noqa: PLC0415
  monkeypatch.delenv("CVMM_F16_SCALES", raising=False)
  assert f16_scales_kind() == "checked"
  monkeypatch.setenv("CVMM_F16_SCALES", "bound")
  assert f16_scales_kind() == "bound"
  for bad in ("", "Checked", "1"):
    monkeypatch.setenv("CVMM_F16_SCALES", bad)
    with pytest.raises(ValueError, match="CVMM_F16_SCALES"):
      f16_scales_kind()


def test_unscale_kind_is_validated(monkeypatch):
  from kernels.cvmm_triton import unscale_kind  # noqa: PLC0415
  monkeypatch.delenv("CVMM_UNSCALE", raising=False)
  assert unscale_kind() == "triton"
  for good in ("xla", "triton", "triton_fwd"):
    monkeypatch.setenv("CVMM_UNSCALE", good)
    assert unscale_kind() == good
  for bad in ("", "Triton", "1"):
    monkeypatch.setenv("CVMM_UNSCALE", bad)
    with pytest.raises(ValueError, match="CVMM_UNSCALE"):
      unscale_kind()


_BAND_ORDER_SCRIPT = textwrap.dedent("""
    import os
    os.environ["CVMM_TILE_ORDER"] = "band6"     # 21 tokens: bands of 6, 6, 6, 3
    import jax, jax.numpy as jnp, numpy as np
    from kernels import make_routing
    from kernels.autotune import TileConfig
    from kernels.cvmm_reference import cvmm_pair_reference, cvmm_reference
    from kernels.cvmm_triton import cvmm_triton_pair, rows_matmul
    def rel(a, b):
      a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
      return np.linalg.norm(a - b) / np.linalg.norm(b)
    n, k, e, i, o = 21, 4, 3, 24, 40
    ks = jax.random.split(jax.random.key(7), 6)
    r = make_routing(jax.random.randint(ks[0], (n, k), 0, e), e)
    w = jax.random.normal(ks[1], (e, i, o)) / np.sqrt(i)
    g = jax.random.uniform(ks[2], (n, k))
    a = jax.random.normal(ks[3], (n, k, i))
    ref = cvmm_reference(a, r, w, g)
    for cfg in (TileConfig(16, 16, 32, 4, 1, loop_n=True), TileConfig(16, 16, 16, 4, 1)):
      out, _ = rows_matmul(a.reshape(n * k, i), w, r, a_rows=k, out_rows=1,
                           scale=g.reshape(-1), cfg=cfg)
      assert rel(out, ref) <= 1e-5, ("rows", cfg, rel(out, ref))
    d, h = 24, 16
    x = jax.random.normal(ks[4], (n, d))
    wu = jax.random.normal(ks[5], (e, d, h)) / np.sqrt(d)
    wd = w[:, :h] * np.sqrt(i / h)
    ct = jax.random.normal(ks[1], (n, o))
    outs = []
    for f in (cvmm_triton_pair, cvmm_pair_reference):
      fn = lambda x, wu, wd, g, f=f: f(x, r, wu, wd, g)
      grads = jax.grad(lambda *args: jnp.sum(fn(*args) * ct), argnums=(0, 1, 2, 3))(
          x, wu, wd, g)
      outs.append((fn(x, wu, wd, g),) + grads)
    for got, want in zip(*outs):
      assert rel(got, want) <= 1e-5, ("pair", rel(got, want))
    print("band order ok")
""")


@pytest.mark.slow
def test_band_order_in_interpreter():
  """CVMM_TILE_ORDER=band<W>: the fused sums of the row kernel (both tilings) and of the
  pair kernels, forward and backward, with tiles cut at token bands, in Triton's CPU
  interpreter against the float32 reference."""
  pytest.importorskip("triton")
  pytest.importorskip("torch")
  run_in_triton_interpreter(_BAND_ORDER_SCRIPT, "band order ok")


def test_tile_order_is_validated(monkeypatch):
  from kernels.routing import sum_tile_order as _tile_order
  for good in ("token", "expert", "band8192", "group4096", "split2"):
    monkeypatch.setenv("CVMM_TILE_ORDER", good)
    assert _tile_order() == good
  for bad in ("band", "bandx", "tokens", "group", "group0", "band0", "split", "split0"):
    monkeypatch.setenv("CVMM_TILE_ORDER", bad)
    with pytest.raises(ValueError, match="CVMM_TILE_ORDER"):
      _tile_order()


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


def test_cvmm_pair_composes_two_cvmms():
  """cvmm_pair off the fused path (xla here) equals relu(cvmm) then gated cvmm of the
  reference, forward and every gradient, float32; bad shapes are refused."""
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

  got = outs(lambda x, wu, wd, g: cvmm_pair(x, r, wu, wd, g, impl="xla"))
  ref = outs(lambda x, wu, wd, g: cvmm_pair_reference(x, r, wu, wd, g))
  for a, b in zip(got, ref):
    assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) <= 1e-5
  with pytest.raises(ValueError, match="do not chain"):
    cvmm_pair(x, r, wu, jnp.zeros((e, h + 1, o)), g, impl="xla")
  with pytest.raises(ValueError, match=r"x must be \[N, D\]"):
    cvmm_pair(x[:, None], r, wu, wd, g, impl="xla")


_BENCH_CALLS_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    import profiles
    from bench.cvmm_kernels import kernels
    from kernels.cvmm_reference import cvmm_reference
    def rel(a, b):
      a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
      return np.linalg.norm(a - b) / np.linalg.norm(b)
    prof = profiles.get("MoEUT_tiny")
    n = 37
    v, ks = kernels(prof, n, jnp.float32)
    run = lambda name: ks[name][0](None, v)
    ro, h = v["ro"], prof["n_heads"]
    dh, k = prof["d_head"], ro.k
    # V: y [N, K, Dh] = x @ V[e]; its gradients for the cotangent dyv
    v_ref = lambda x, w: cvmm_reference(x[:, None], ro, w)
    y, vjp = jax.vjp(v_ref, v["x"], v["vw"])
    dx, dw = vjp(v["dyv"].reshape(n, k, dh))
    # O: out [N, D] = sum over the unit's slots of g * att @ O[e]; cotangent dout
    att = v["att"].reshape(n, h, dh)
    og = v["og"].reshape(n, k)
    o_ref = lambda a, w, g: cvmm_reference(a, ro, w, g)
    out, vjp_o = jax.vjp(o_ref, att, v["ow"], og)
    datt, dow, dg = vjp_o(v["dout"])
    got_dx, got_dg = run("o_dx")
    checks = {"v_fwd": (run("v_fwd"), y.reshape(n * k, dh)),
              "v_dx": (run("v_dx"), dx.reshape(n, -1)),
              "v_dw": (run("v_dw"), dw),
              "o_fwd": (run("o_fwd"), out),
              "o_dx": (got_dx, datt.reshape(n * h, dh)),
              "o_dgates": (got_dg, dg.reshape(-1)),
              "o_dw": (run("o_dw"), dow)}
    for name, (a, b) in checks.items():
      assert np.shape(a) == np.shape(b), (name, np.shape(a), np.shape(b))
      assert rel(a, b) <= 1e-5, (name, rel(a, b))
    print("bench calls ok")
""")


def test_bench_kernels_v_and_o_calls_compute_their_gradients():
  """bench/cvmm_kernels.py's SwitchHead calls (V and O forward, dx, dW, O's dgates), run
  by Triton's interpreter in float32, against the reference CVMM and its VJP: what the
  benchmark and bench/op_profile.py time is what the names say."""
  pytest.importorskip("triton")
  run_in_triton_interpreter(_BENCH_CALLS_SCRIPT, "bench calls ok")
