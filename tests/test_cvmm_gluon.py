"""CPU tests of the fused sums' GPU kernels, compiled for sm90 with Triton's own pipeline
and ptxas (no GPU): the Gluon row kernels (kernels/cvmm_triton/gluon_rows.py) with every
tile candidate, the Gluon unit-pair kernel (gluon_pairs.py), and the Triton kernels'
16-bit sums; the tile candidates list the Gluon kernels first where a call can take
them; and rows_matmul hands each tile to its kernel (launches recorded, not run). Their
numerics are tested on the GPU (tests/test_cvmm_gpu.py)."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import CvmmConfig, make_head_routing, make_routing, offline
from kernels.autotune import TileConfig
from kernels.cvmm_triton import (dw, gluon_common, gluon_pairs, gluon_rows, launch, pair,
                                 rows, scales, tuning, units)

pytestmark = pytest.mark.skipif(not gluon_common.available(), reason="Triton without Gluon")

# Hopper's shared memory per block (227 KiB), and per SM for two blocks (228 KiB)
SMEM_BLOCK = 227 * 1024

# The modules of kernels.cvmm_triton that bind the device queries and the launcher by name
KERNEL_MODULES = (launch, scales, tuning, rows, units, dw, pair, gluon_rows, gluon_pairs)


def pretend_gpu(monkeypatch, cc: float = 9.0):
  """Makes the kernels see a GPU of compute capability ``cc``, outside Triton's
  interpreter (the device queries patched wherever a module bound them)."""
  for mod in KERNEL_MODULES:
    for name, value in (("compute_capability", lambda: cc), ("interpret", lambda: False)):
      if hasattr(mod, name):
        monkeypatch.setattr(mod, name, value)


def record_launches(monkeypatch) -> list:
  """Replaces every launch (jax-triton: GPUs only) by one that records (kernel name,
  grid, meta, args, zeroed, output shapes) and returns zeros; returns the record."""
  launched = []

  def fake(kernel, args, out_shapes, grid, cfg, zeroed=(), aliases=None, **meta):
    name = kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__
    launched.append((name, grid, meta, args, tuple(zeroed),
                     tuple(s.shape for s in out_shapes)))
    return [jnp.zeros(s.shape, s.dtype) for s in out_shapes]

  for mod in KERNEL_MODULES:
    if mod is not launch and hasattr(mod, "launch"):
      monkeypatch.setattr(mod, "launch", fake)
  for mod in (gluon_rows, gluon_pairs):          # (jax-triton's kernel factory: GPUs)
    monkeypatch.setattr(mod, "install_gluon_launcher", lambda: None)
  return launched


def _gluon_tiles(i, o):
  """The row kernel's tile candidates (the two-half kernel's have their own tests)."""
  return [c for c in rows.rows_candidates(i, o, jnp.bfloat16, gluon=True)
          if c.gluon and c.halves == 1]


@pytest.mark.parametrize("cfg", _gluon_tiles(128, 1024), ids=str)
def test_gluon_row_kernel_compiles_for_sm90(cfg):
  """Each tile candidate at MoEUT_244M's down projection (I=128, O=1024): the PTX adds
  eight float16 per reduction, multiplies with wgmma, and the block's shared memory fits
  (two blocks per SM for the 128-row tiles of 64 columns)."""
  kern = offline.compile_gluon_rows(cfg, i=128, o=1024, k=16)
  ptx = kern.asm["ptx"]
  assert "red.global.gpu.relaxed.add.noftz.v4.f16x2" in ptx
  assert re.search(r"wgmma\.mma_async\.sync\.aligned\.m64n\d+k16\.f32\.bf16\.bf16", ptx)
  assert "cp.async" in ptx
  assert kern.metadata.shared <= SMEM_BLOCK, kern.metadata.shared
  if (cfg.block_m, cfg.block_n) == (128, 64):
    assert 2 * kern.metadata.shared <= 228 * 1024, kern.metadata.shared


@pytest.mark.parametrize("transpose", [False, True], ids=["w", "wT"])
@pytest.mark.parametrize("f16", [True, False], ids=["f16", "bf16"])
def test_gluon_row_kernel_variants_compile(transpose, f16):
  """The first tile with both matrix layouts, float16 and bf16 sums, and no scales
  (the dx of σ-MoE up): bf16 sums add bf16x2 pairs."""
  cfg = _gluon_tiles(64, 256)[0]
  kern = offline.compile_gluon_rows(cfg, i=64, o=256, k=4, transpose=transpose, f16=f16,
                                    has_scale=False)
  pair_ = "f16x2" if f16 else "bf16x2"
  assert f"red.global.gpu.relaxed.add.noftz.v4.{pair_}" in kern.asm["ptx"]


def test_gluon_tiles_come_first_where_a_call_takes_them(monkeypatch):
  """The fused 16-bit sums' candidates start with the Gluon tiles: the two-half
  kernel's (128x64, 8 warps first), then the row kernel's (128x64, 8 warps, 4 buffers
  first); shapes it cannot take (O not a multiple of 64, I above 256) leave them out.
  On Hopper the autotuner's choice (without timing: the first candidate) is the
  two-half tile; with CvmmConfig(gluon=False) a Triton tile."""
  cands = rows.rows_candidates(128, 1024, jnp.bfloat16, gluon=True)
  n2 = len(gluon_rows.GLUON_ROWS2_TILES)
  assert [c.halves for c in cands[:n2 + 1]] == [2] * n2 + [1]
  assert all(c.gluon and c.num_stages == 2 for c in cands[:n2])
  assert (cands[0].block_m, cands[0].block_n, cands[0].num_warps) == (128, 64, 8)
  first = cands[n2]
  assert first.gluon and (first.block_m, first.block_n, first.num_warps,
                          first.num_stages) == (128, 64, 8, 4)
  n_gluon = sum(c.gluon for c in cands)
  assert n_gluon == n2 + len(gluon_rows.GLUON_ROWS_TILES)
  assert all(c.gluon for c in cands[:n_gluon]) and not any(c.gluon for c in cands[n_gluon:])
  assert cands[n_gluon:] == rows.triton_rows_candidates(128, 1024, jnp.bfloat16)
  assert not any(c.gluon for c in rows.rows_candidates(128, 412, jnp.bfloat16, gluon=True))
  assert not any(c.gluon for c in rows.rows_candidates(512, 1024, jnp.bfloat16, gluon=True))
  assert not any(c.gluon for c in rows.rows_candidates(128, 1024, jnp.bfloat16))
  pretend_gpu(monkeypatch, 9.0)
  shape = (300, 16, 40, 128, 1024, jnp.bfloat16, 16, 1, True)   # σ-MoE down's fused sum
  assert rows.choose_rows_config(*shape, CvmmConfig()) == cands[0]
  assert not rows.choose_rows_config(*shape, CvmmConfig(gluon=False)).gluon


def test_rows_matmul_hands_two_half_tiles_to_their_kernel(monkeypatch):
  """A two-half tile (halves 2) launches the two-half kernel over tiles of 2 * block_m
  rows (in the fused sums' launch order), with the float16 sums' scales; a row tile
  launches the row kernel over block_m-row tiles. Each zeroes its output, and each
  float16 sum is scaled back by the Triton kernels (the checked scale-back, then its
  repair) in the inputs' dtype."""
  pretend_gpu(monkeypatch, 9.0)
  launched = record_launches(monkeypatch)
  n, k, e, i, o = 300, 4, 8, 128, 256
  r = make_routing(jax.random.randint(jax.random.key(0), (n, k), 0, e), e,
                   tile_blocks=())
  a = jnp.ones((n * k, i), jnp.bfloat16)
  w = jnp.ones((e, i, o), jnp.bfloat16)
  g = jnp.ones((n * k,), jnp.float32)
  two = TileConfig(64, 64, i, 8, 2, loop_n=True, gluon=True, halves=2)
  out2, _ = rows.rows_matmul(a, w, r, a_rows=k, out_rows=1, scale=g, cfg=two)
  out1, _ = rows.rows_matmul(a, w, r, a_rows=k, out_rows=1, scale=g,
                             cfg=TileConfig(64, 64, i, 8, 3, loop_n=True, gluon=True))
  assert out2.dtype == out1.dtype == jnp.bfloat16
  z128 = r.ordered_tiles(128, "token").shape[1]
  z64 = r.ordered_tiles(64, "token").shape[1]
  sums = [(name, grid, meta["BM"], args[3].shape[1], zeroed, shapes, meta["F16"])
          for name, grid, meta, args, zeroed, shapes in launched
          if name.endswith("_sum_kernel")]
  assert sums == [("rows2_sum_kernel", z128, 64, z128, (0,), ((n, o),), True),
                  ("rows_sum_kernel", z64, 64, z64, (0,), ((n, o),), True)], sums
  back = ["unscale_checked_kernel", "repair_rows_kernel"]
  assert [x[0] for x in launched] == (["rows2_sum_kernel"] + back + ["rows_sum_kernel"]
                                      + back), launched


@pytest.mark.parametrize("kind", ["rows", "pair_fwd", "pair_bwd"])
@pytest.mark.parametrize("f16", [True, False], ids=["f16", "bf16"])
def test_triton_fused_sum_kernels_compile_for_sm90(kind, f16):
  """The Triton kernels' 16-bit fused sums (RED=8) compile for sm90: the rows, already
  rounded to 16 bits, are added eight per reduction instruction."""
  cfg = TileConfig(128, 64, 128 if kind == "rows" else 64, 4, 3, loop_n=kind == "rows")
  kern = offline.compile_triton(kind, cfg, d=256, h=128, o=256, k=4, f16=f16)
  pair_ = "f16x2" if f16 else "bf16x2"
  assert f"red.global.gpu.relaxed.add.noftz.v4.{pair_}" in kern.asm["ptx"]


@pytest.mark.parametrize("transpose", [False, True], ids=["w", "wT"])
@pytest.mark.parametrize("f16", [True, False], ids=["f16", "bf16"])
def test_gluon_rows2_kernel_compiles_for_sm90(transpose, f16):
  """The two-half row kernel compiles for sm90 with the tilings tests/test_cvmm_gpu.py
  runs (ROWS2_TILES), on wgmma and 16-byte reductions; at 128x64 with 8 warps it holds
  two blocks per SM without spills (one accumulator in flight, the halves' rows and two
  matrix buffers: 112 KiB)."""
  for bm, bn, w in ((128, 64, 8), (64, 64, 4), (128, 32, 8)):
    cfg = TileConfig(bm, bn, 128, w, 2, loop_n=True, gluon=True, halves=2)
    kern = offline.compile_gluon_rows(cfg, i=128, o=1024, k=16, transpose=transpose,
                                      f16=f16)
    pair_ = "f16x2" if f16 else "bf16x2"
    assert f"red.global.gpu.relaxed.add.noftz.v4.{pair_}" in kern.asm["ptx"]
    st = offline.sass_stats(kern)
    assert st["HGMMA"] > 0 and st["spill_stores"] == 0, ((bm, bn, w), st)
    if (bm, bn, w) == (128, 64, 8):
      assert st["shared"] <= 114688 and st["registers"] <= 128, st


def test_checked_scale_back_compiles_for_sm90():
  """The scale-back of checked float16 sums and its float32 repair of the rows it lists
  (σ-MoE down, up's dx, SwitchHead O's shape) compile for sm90 without spills: the
  scale-back in at most 56 registers (the plain one: 43), the repair in at most 64."""
  for tr, shape in ((False, {}), (True, {}),
                    (False, dict(o=128, k=8, a_rows=8, out_rows=2))):
    for part, regs in (("unscale", 56), ("repair", 64)):
      st = offline.sass_stats(offline.compile_unscale_checked(transpose=tr, part=part,
                                                              **shape))
      assert st["spill_stores"] == 0 and st["registers"] <= regs, (tr, shape, part, st)


def test_unit_store_candidates_compile_for_sm90_without_spills():
  """The unit-store kernel (SwitchHead O's dx: two [64, 128] float32 products and the
  dgates per program) compiles for sm90 with each bf16 candidate tile, on wgmma, with no
  register spills."""
  for cfg in units.units_candidates(128, jnp.bfloat16):
    st = offline.sass_stats(offline.compile_triton("units", cfg, d=1024, h=128, k=8))
    assert st["spill_stores"] == 0 and st["registers"] <= 255, (cfg, st)
    assert st["HGMMA"] > 0 and st["HMMA"] == 0, (cfg, st)


def test_sass_stats_reads_the_machine_code():
  """sass_stats counts what the Gluon kernel is built from: 16-byte float16 reductions,
  wgmma (HGMMA), stmatrix and barriers, its registers (at most 255) and shared memory."""
  cfg = _gluon_tiles(128, 1024)[0]
  st = offline.sass_stats(offline.compile_gluon_rows(cfg, i=128, o=1024, k=16))
  assert 0 < st["registers"] <= 255
  assert st["shared"] > 0 and st["instructions"] > 500
  for op in ("REDG", "HGMMA", "STSM", "BAR.SYNC", "LDGSTS"):
    assert st[op] > 0, (op, st)
  assert st["HMMA"] == 0          # Hopper's wgmma, not the older mma


@pytest.mark.parametrize("cc,hopper", [(8.0, False), (9.0, True), (10.0, False),
                                       (12.0, False)])
def test_gluon_kernel_only_on_hopper(monkeypatch, cc, hopper):
  """The Gluon kernel's wgmma is sm90's: on other GPUs the autotuner leaves its tiles
  out, and a call given one raises a clear error before anything is launched."""
  pretend_gpu(monkeypatch, cc)
  assert launch.hopper() is hopper
  if hopper or cc < 9.0:   # (no 16-byte 16-bit reductions below sm90)
    return
  launched = record_launches(monkeypatch)
  n, k, e, i, o = 32, 4, 8, 64, 128
  r = make_routing(jax.random.randint(jax.random.key(0), (n, k), 0, e), e)
  a = jnp.ones((n * k, i), jnp.bfloat16)
  w = jnp.ones((e, i, o), jnp.bfloat16)
  cfg = _gluon_tiles(i, o)[0]
  with pytest.raises(ValueError, match="Hopper"):
    rows.rows_matmul(a, w, r, a_rows=k, out_rows=1, cfg=cfg)
  assert not launched
  assert not rows.choose_rows_config(n, k, e, i, o, jnp.bfloat16, k, 1, False).gluon


@pytest.mark.parametrize("tile", gluon_pairs.UNIT_PAIRS_TILES, ids=str)
@pytest.mark.parametrize("use", ["O", "V_dx"])
@pytest.mark.parametrize("f16", [True, False], ids=["f16", "bf16"])
def test_unit_pair_kernel_compiles_for_sm90(tile, use, f16):
  """The unit-pair kernel with each of its tiles, as SwitchHead's O forward calls it
  (both pairs read one row) and as V's dx does (each pair its own row, the matrices
  transposed): two wgmma per column block and one 16-byte reduction of eight sums; the
  default tile fits two blocks per SM for O."""
  bm, bn, w, b = tile
  cfg = TileConfig(bm, bn, 128, w, b, loop_n=True, gluon=True)
  kern = offline.compile_gluon_pairs(cfg, a_rows=4 if use == "O" else 8,
                                     transpose=use == "V_dx", f16=f16)
  ptx = kern.asm["ptx"]
  pair_ = "f16x2" if f16 else "bf16x2"
  assert f"red.global.gpu.relaxed.add.noftz.v4.{pair_}" in ptx
  assert len(re.findall(r"wgmma\.mma_async\.sync\.aligned", ptx)) >= 2
  assert kern.metadata.shared <= SMEM_BLOCK, kern.metadata.shared
  if tile == gluon_pairs.UNIT_PAIRS_TILES[0] and use == "O":
    assert 2 * kern.metadata.shared <= 228 * 1024, kern.metadata.shared


def test_unit_pair_kernel_takes_tiles_of_one_part():
  """The unit-pair kernel has no two-half variant: a two-half tile is refused before
  anything is compiled."""
  with pytest.raises(ValueError, match="one part"):
    offline.compile_gluon_pairs(gluon_rows.gluon_tile((128, 64, 8, 2, 2), 128))


def _unit_routing(n=16, h=4, ea=10, unit_pairs=True):
  idx = jax.lax.top_k(jax.random.normal(jax.random.key(0), (n, h, ea)), 2)[1]
  return make_head_routing(idx, ea, unit_pairs=unit_pairs)


def test_unit_pairs_config(monkeypatch):
  """The unit-pair kernel's tile: on Hopper, where the routing carries unit pairs and
  the call is a 16-bit fused sum into one row per unit, the autotuner's (without
  timing: the first of UNIT_PAIRS_TILES); None for dgates, float32 sums, a row per
  pair, O not a multiple of the tiles' columns, a routing without unit pairs, and on
  other GPUs."""
  pretend_gpu(monkeypatch, 9.0)
  r = _unit_routing()
  cfg = gluon_pairs.unit_pairs_config(r, 128, 1024, jnp.bfloat16, 8, False, 1)
  assert (cfg.block_m, cfg.block_n, cfg.num_warps,
          cfg.num_stages) == gluon_pairs.UNIT_PAIRS_TILES[0]
  assert cfg == gluon_rows.gluon_tile(gluon_pairs.UNIT_PAIRS_TILES[0], 128)
  assert gluon_pairs.unit_pairs_config(r, 128, 1024, jnp.bfloat16, 8, True, 1) is None   # dgates
  assert gluon_pairs.unit_pairs_config(r, 128, 1024, jnp.bfloat16, 4, False, 1) is None  # f32 sums
  assert gluon_pairs.unit_pairs_config(r, 128, 1024, jnp.bfloat16, 8, False, 8) is None  # per pair
  assert gluon_pairs.unit_pairs_config(r, 128, 412, jnp.bfloat16, 8, False, 1) is None   # O % 32
  r0 = _unit_routing(unit_pairs=False)
  assert gluon_pairs.unit_pairs_config(r0, 128, 1024, jnp.bfloat16, 8, False, 1) is None
  pretend_gpu(monkeypatch, 8.0)
  assert gluon_pairs.unit_pairs_config(r, 128, 1024, jnp.bfloat16, 8, False, 1) is None


def test_rows_matmul_hands_unit_pairs_to_their_kernel(monkeypatch):
  """On Hopper a 16-bit fused sum whose routing carries unit pairs goes to the
  unit-pair kernel, whose float16 output rows rows_matmul scales back: with the kernel
  replaced by the same sums in float32 (scaled as the kernel gets them) and the
  scale-back by XLA's, the result is the reference, in bf16. An explicit row tile,
  CvmmConfig(gluon=False) or a routing without unit pairs keeps the row kernels."""
  pretend_gpu(monkeypatch, 9.0)
  n, h, ea, i, o = 24, 4, 10, 128, 256
  ks = jax.random.split(jax.random.key(5), 4)
  idx = jax.lax.top_k(jax.random.normal(ks[0], (n, h, ea)), 2)[1]
  r = make_head_routing(idx, ea, unit_pairs=True)
  a = jax.random.normal(ks[1], (n * h, i)).astype(jnp.bfloat16)        # O: [N*H, Dh]
  w = (jax.random.normal(ks[2], (h * ea, i, o)) * 0.1).astype(jnp.bfloat16)
  g = jax.random.uniform(ks[3], (n * 2 * h,))
  p = np.arange(n * 2 * h)
  we = np.asarray(w, np.float32)[np.asarray(r.expert_index).reshape(-1)]
  rows_ = np.asarray(a, np.float32)[(p // (2 * h)) * h + (p % (2 * h)) // 2]
  terms = np.einsum("pi,pio->po", rows_, we)                             # [P, O]
  seen, unscaled = [], []

  def fake(a_, w_, routing, scale, cfg, *, a_rows, out_rows, transpose_w, out_dtype):
    seen.append((cfg, a_rows, out_rows, out_dtype))
    s = np.asarray(scale)[:, None] * terms
    return jnp.asarray(s.reshape(n, 2 * h, o).sum(1)).astype(out_dtype)

  def unscale(out, inv_s, sampled, a_, w_, routing, gates, dtype, **kw):
    unscaled.append(out.dtype)
    return (out.astype(jnp.float32) * inv_s[:, None]).astype(dtype)

  monkeypatch.setattr(rows, "gluon_pairs_sum", fake)
  monkeypatch.setattr(rows, "unscale_rows_checked", unscale)
  monkeypatch.setattr(rows, "f16_unscale",
                      lambda out, row_s, dtype: unscale(out, 1.0 / row_s, *[None] * 5, dtype))
  out, dg = rows.rows_matmul(a, w, r, a_rows=h, out_rows=1, scale=g)
  assert dg is None and len(seen) == 1
  cfg, a_rows, out_rows, out_dtype = seen[0]
  assert cfg == gluon_rows.gluon_tile(gluon_pairs.UNIT_PAIRS_TILES[0], i)
  assert (a_rows, out_rows, jnp.dtype(out_dtype)) == (h, 1, jnp.float16)
  assert unscaled == [jnp.float16] and out.dtype == jnp.bfloat16
  ref = (np.asarray(g)[:, None] * terms).reshape(n, 2 * h, o).sum(1)
  tol = 5e-3                           # the float16 sums + bf16's rounding
  np.testing.assert_allclose(np.asarray(out, np.float32), ref, rtol=tol,
                             atol=tol * np.abs(ref).max())
  launched = record_launches(monkeypatch)
  rows.rows_matmul(a, w, r, a_rows=h, out_rows=1, scale=g, config=CvmmConfig(gluon=False))
  rows.rows_matmul(a, w, r, a_rows=h, out_rows=1, scale=g, cfg=_gluon_tiles(i, o)[0])
  rows.rows_matmul(a, w, make_head_routing(idx, ea, unit_pairs=False), a_rows=h,
                   out_rows=1, scale=g)
  # the Triton row kernel, the named Gluon tile, the first candidate (the two-half kernel)
  assert len(seen) == 1, seen
  assert [x[0] for x in launched] == ["rows_kernel", "rows_sum_kernel",
                                      "rows2_sum_kernel"], launched
