"""CPU tests of the fused sums' GPU kernels, compiled for sm90 with Triton's own pipeline
and ptxas (no GPU): the Gluon row kernel (kernels/cvmm_gluon.py) with every tile
candidate, and the Triton kernels' 16-bit sums; and the tile candidates list the Gluon
kernel first where a call can take it. Their numerics are tested on the GPU
(tests/test_cvmm_gpu.py)."""
from __future__ import annotations

import re

import jax.numpy as jnp
import pytest

from kernels import cvmm_gluon, offline
from kernels import cvmm_triton as ct

pytestmark = pytest.mark.skipif(not cvmm_gluon.available(), reason="Triton without Gluon")

# Hopper's shared memory per block (227 KiB), and per SM for two blocks (228 KiB)
_SMEM_BLOCK = 227 * 1024


def _gluon_tiles(i, o):
  """The row kernel's tile candidates (the two-half kernel's have their own tests)."""
  return [c for c in ct._rows_candidates(i, o, jnp.bfloat16, gluon=True)
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
  assert kern.metadata.shared <= _SMEM_BLOCK, kern.metadata.shared
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
  pair = "f16x2" if f16 else "bf16x2"
  assert f"red.global.gpu.relaxed.add.noftz.v4.{pair}" in kern.asm["ptx"]


def test_gluon_tiles_come_first_where_a_call_takes_them(monkeypatch):
  """The fused 16-bit sums' candidates start with the Gluon tiles: the two-half
  kernel's (128x64, 8 warps first), then the row kernel's (128x64, 8 warps, 4 buffers
  first); shapes it cannot take (O not a multiple of 64, I above 256) and CVMM_GLUON=0
  leave them out, CVMM_GLUON_ROWS2=0 the two-half tiles."""
  cands2 = ct._rows_candidates(128, 1024, jnp.bfloat16, gluon=True)
  n2 = len(ct._GLUON_ROWS2)
  assert [c.halves for c in cands2[:n2 + 1]] == [2] * n2 + [1]
  assert all(c.gluon and c.num_stages == 2 for c in cands2[:n2])
  assert (cands2[0].block_m, cands2[0].block_n, cands2[0].num_warps) == (128, 64, 8)
  monkeypatch.setenv("CVMM_GLUON_ROWS2", "0")
  cands = ct._rows_candidates(128, 1024, jnp.bfloat16, gluon=True)
  assert cands2[n2:] == cands
  assert not any(c.halves == 2 for c in cands)
  first = cands[0]
  assert first.gluon and (first.block_m, first.block_n, first.num_warps,
                          first.num_stages) == (128, 64, 8, 4)
  n_gluon = sum(c.gluon for c in cands)
  assert n_gluon == len(ct._GLUON_ROWS)
  assert all(c.gluon for c in cands[:n_gluon]) and not any(c.gluon for c in cands[n_gluon:])
  monkeypatch.delenv("CVMM_GLUON_ROWS2")
  assert not any(c.gluon for c in ct._rows_candidates(128, 412, jnp.bfloat16, gluon=True))
  assert not any(c.gluon for c in ct._rows_candidates(512, 1024, jnp.bfloat16, gluon=True))
  assert not any(c.gluon for c in ct._rows_candidates(128, 1024, jnp.bfloat16))
  assert ct._gluon_enabled()
  monkeypatch.setenv("CVMM_GLUON", "0")
  assert not ct._gluon_enabled()
  monkeypatch.setenv("CVMM_GLUON_ROWS2", "yes")
  with pytest.raises(ValueError, match="CVMM_GLUON_ROWS2"):
    ct._rows_candidates(128, 1024, jnp.bfloat16, gluon=True)


@pytest.mark.parametrize("finish", ["1", "0"])
def test_rows_matmul_hands_two_half_tiles_to_their_kernel(monkeypatch, finish):
  """A two-half tile (halves 2) launches the two-half kernel over tiles of 2 * block_m
  rows (in the fused sums' launch order), with the float16 sums' scales; a row tile
  launches the row kernel over block_m-row tiles. Kernels that finish their sums
  (CVMM_FINISH=1, opt-in) also get zeroed arrival counts, one per 32 rows."""
  monkeypatch.setenv("CVMM_FINISH", finish)
  monkeypatch.setenv("CVMM_UNSCALE", "xla")     # (the Triton scale-back: jax-triton, GPUs)
  import jax  # noqa: PLC0415
  from kernels import make_routing  # noqa: PLC0415
  monkeypatch.setattr(ct, "_compute_capability", lambda: 9.0)
  monkeypatch.setattr(ct, "_interpret", lambda: False)
  monkeypatch.setattr(cvmm_gluon, "install_launcher", lambda: None)   # (jax-triton: GPUs)
  launched = []

  def launch(kernel, args, out_shapes, grid, cfg, zeroed=(), **meta):
    launched.append((kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__,
                     grid, meta["BM"], args[3].shape[1], zeroed,
                     tuple(s.shape for s in out_shapes), meta.get("FIN", False)))
    return [jnp.zeros(s.shape, s.dtype) for s in out_shapes]

  monkeypatch.setattr(ct, "_launch", launch)
  n, k, e, i, o = 300, 4, 8, 128, 256
  r = make_routing(jax.random.randint(jax.random.key(0), (n, k), 0, e), e,
                   tile_blocks=())
  a = jnp.ones((n * k, i), jnp.bfloat16)
  w = jnp.ones((e, i, o), jnp.bfloat16)
  g = jnp.ones((n * k,), jnp.float32)
  two = ct.TileConfig(64, 64, i, 8, 2, loop_n=True, gluon=True, halves=2)
  ct.rows_matmul(a, w, r, a_rows=k, out_rows=1, scale=g, cfg=two)
  ct.rows_matmul(a, w, r, a_rows=k, out_rows=1, scale=g,
                 cfg=ct.TileConfig(64, 64, i, 8, 3, loop_n=True, gluon=True))
  z128 = r.ordered_tiles(128, "token").shape[1]
  z64 = r.ordered_tiles(64, "token").shape[1]
  fin = finish == "1"
  zeroed, shapes = ((0, 1), ((n, o), (-(-n // 32),))) if fin else ((0,), ((n, o), (1,)))
  assert launched == [("_rows2_sum_kernel", z128, 64, z128, zeroed, shapes, fin),
                      ("_rows_sum_kernel", z64, 64, z64, zeroed, shapes, fin)], launched


@pytest.mark.parametrize("kind", ["rows", "pair_fwd", "pair_bwd"])
@pytest.mark.parametrize("f16", [True, False], ids=["f16", "bf16"])
def test_triton_fused_sum_kernels_compile_for_sm90(kind, f16):
  """The Triton kernels' 16-bit fused sums (RED=8) compile for sm90: the rows, already
  rounded to 16 bits, are added eight per reduction instruction."""
  cfg = ct.TileConfig(128, 64, 128 if kind == "rows" else 64, 4, 3, loop_n=kind == "rows")
  kern = offline.compile_triton(kind, cfg, d=256, h=128, o=256, k=4, f16=f16)
  pair = "f16x2" if f16 else "bf16x2"
  assert f"red.global.gpu.relaxed.add.noftz.v4.{pair}" in kern.asm["ptx"]


@pytest.mark.parametrize("transpose", [False, True], ids=["w", "wT"])
@pytest.mark.parametrize("f16", [True, False], ids=["f16", "bf16"])
def test_gluon_rows2_kernel_compiles_for_sm90(transpose, f16):
  """The two-half row kernel compiles for sm90 with its probe tilings (tests/
  test_cvmm_gpu.py GLUON_ROWS2_TILES), on wgmma and 16-byte reductions; at 128x64 with
  8 warps it holds two blocks per SM without spills (one accumulator in flight, the
  halves' rows and two matrix buffers: 112 KiB)."""
  for bm, bn, w in ((128, 64, 8), (64, 64, 4), (128, 32, 8)):
    cfg = ct.TileConfig(bm, bn, 128, w, 2, loop_n=True, gluon=True, halves=2)
    kern = offline.compile_gluon_rows(cfg, i=128, o=1024, k=16, transpose=transpose,
                                      f16=f16)
    pair = "f16x2" if f16 else "bf16x2"
    assert f"red.global.gpu.relaxed.add.noftz.v4.{pair}" in kern.asm["ptx"]
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


@pytest.mark.parametrize("fin", ["bfloat16", "float16"])
@pytest.mark.parametrize("kind", ["rows", "rows2", "pairs_O", "pairs_V_dx"])
def test_finishing_kernels_compile_for_sm90(kind, fin):
  """The Gluon kernels that finish their float16 sums (CVMM_FINISH) compile for sm90 at
  their first tiles: after the reductions a gpu-scope fence, one acquire-release count
  per row, and the finished groups read from L2 and stored 16 bytes at a time; no
  spills, and the registers capped so that the blocks per SM stay what shared memory
  allows (two for the 112 KiB of the two-half and O's unit-pair tiles: 128 per
  thread)."""
  from kernels.autotune import TileConfig  # noqa: PLC0415
  if kind.startswith("pairs"):
    cfg = TileConfig(*ct.UNIT_PAIRS_TILE[:2], 128, *ct.UNIT_PAIRS_TILE[2:], loop_n=True,
                     gluon=True)
    v_dx = kind == "pairs_V_dx"
    kern = offline.compile_gluon_pairs(cfg, a_rows=8 if v_dx else 4, transpose=v_dx,
                                       fin=fin)
  else:
    cfg = [c for c in ct._rows_candidates(128, 1024, jnp.bfloat16, gluon=True)
           if c.gluon and c.halves == (2 if kind == "rows2" else 1)][0]
    kern = offline.compile_gluon_rows(cfg, i=128, o=1024, k=16, fin=fin)
  ptx = kern.asm["ptx"]
  assert "red.global.gpu.relaxed.add.noftz.v4.f16x2" in ptx
  assert "fence.acq_rel.gpu;" in ptx
  assert "atom.global.gpu.acq_rel.add.u32" in ptx
  assert "ld.global.cg.v4.b32" in ptx and "st.global.v4.b32" in ptx
  st = offline.sass_stats(kern)
  assert st["spill_stores"] == 0, st
  blocks = (228 * 1024) // (st["shared"] + 1024)
  assert st["registers"] * 32 * cfg.num_warps * blocks <= 65536, (blocks, st)
  if kind in ("rows2", "pairs_O"):
    assert blocks == 2, st


@pytest.mark.parametrize("parts", [3, 4])
def test_gluon_rows2_kernel_with_more_parts_compiles_for_sm90(parts):
  """The two-half row kernel with 3 or 4 parts of 128 rows (tiles of 384 or 512 rows:
  a third or half less of the matrices' L2 traffic than two halves; one block per SM)
  compiles for sm90: 16 wgmma and 8 reductions per part in the code, no spills, the
  parts' rows within one block's shared memory."""
  cfg = ct.TileConfig(128, 64, 128, 8, 2, loop_n=True, gluon=True, halves=parts)
  st = offline.sass_stats(offline.compile_gluon_rows(cfg, i=128, o=1024, k=16))
  assert st["HGMMA"] == 16 * parts and st["REDG"] == 8 * parts, st
  assert st["spill_stores"] == 0 and st["shared"] <= _SMEM_BLOCK, st


def test_unit_store_candidates_compile_for_sm90_without_spills():
  """The unit-store kernel (SwitchHead O's dx: two [64, 128] float32 products and the
  dgates per program) compiles for sm90 with each bf16 candidate tile, on wgmma, with no
  register spills."""
  for cfg in ct._units_candidates(128, jnp.bfloat16):
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
  monkeypatch.setattr(ct, "_compute_capability", lambda: cc)
  monkeypatch.setattr(ct, "_interpret", lambda: False)
  assert ct._gluon_device() is hopper
  if hopper or cc < 9.0:   # (no 16-byte 16-bit reductions below sm90)
    return
  import jax  # noqa: PLC0415
  from kernels import make_routing  # noqa: PLC0415
  n, k, e, i, o = 32, 4, 8, 64, 128
  r = make_routing(jax.random.randint(jax.random.key(0), (n, k), 0, e), e)
  a = jnp.ones((n * k, i), jnp.bfloat16)
  w = jnp.ones((e, i, o), jnp.bfloat16)
  cfg = _gluon_tiles(i, o)[0]
  with pytest.raises(ValueError, match="Hopper"):
    ct.rows_matmul(a, w, r, a_rows=k, out_rows=1, cfg=cfg)


_PAIR_TILES = [(128, 64, 8, 2), (128, 32, 8, 2), (64, 64, 4, 2), (128, 64, 8, 3)]


@pytest.mark.parametrize("tile", _PAIR_TILES, ids=str)
@pytest.mark.parametrize("use", ["O", "V_dx"])
@pytest.mark.parametrize("f16", [True, False], ids=["f16", "bf16"])
def test_unit_pair_kernel_compiles_for_sm90(tile, use, f16):
  """The unit-pair kernel as SwitchHead's O forward calls it (both pairs read one row)
  and as V's dx does (each pair its own row, the matrices transposed): two wgmma per
  column block and one 16-byte reduction of eight sums; the default tile fits two
  blocks per SM for O."""
  from kernels.autotune import TileConfig  # noqa: PLC0415
  bm, bn, w, b = tile
  cfg = TileConfig(bm, bn, 128, w, b, loop_n=True, gluon=True)
  kern = offline.compile_gluon_pairs(cfg, a_rows=4 if use == "O" else 8,
                                     transpose=use == "V_dx", f16=f16)
  ptx = kern.asm["ptx"]
  pair = "f16x2" if f16 else "bf16x2"
  assert f"red.global.gpu.relaxed.add.noftz.v4.{pair}" in ptx
  assert len(re.findall(r"wgmma\.mma_async\.sync\.aligned", ptx)) >= 2
  assert kern.metadata.shared <= _SMEM_BLOCK, kern.metadata.shared
  if tile == ct.UNIT_PAIRS_TILE and use == "O":
    assert 2 * kern.metadata.shared <= 228 * 1024, kern.metadata.shared


@pytest.mark.parametrize("use", ["O", "V_dx"])
def test_two_half_unit_pair_kernel_compiles_for_sm90(use):
  """The two-half unit-pair kernel (tiles of two 128-unit halves sharing each block of
  both matrices) compiles for sm90 as SwitchHead's O and V's dx call it: four wgmma per
  column block and half (64 in the code), one 16-byte reduction per half's block, no
  spills, within one block's shared memory (O 144 KiB; V's dx, whose pairs read their
  own rows, 208 KiB)."""
  cfg = ct._gluon_tile((128, 64, 8, 2, 2), 128)
  kern = offline.compile_gluon_pairs(cfg, a_rows=4 if use == "O" else 8,
                                     transpose=use == "V_dx")
  st = offline.sass_stats(kern)
  assert st["HGMMA"] == 64 and st["REDG"] == 16 and st["spill_stores"] == 0, st
  assert st["shared"] <= _SMEM_BLOCK, st
  with pytest.raises(ValueError, match="one or two halves"):    # no three-part kernel
    offline.compile_gluon_pairs(ct._gluon_tile((128, 64, 8, 2, 3), 128))


def test_unit_pairs_config(monkeypatch):
  """CVMM_UNIT_PAIRS: on by default (the default tile) where the routing carries unit
  pairs and the call is a 16-bit fused sum into one row per unit on Hopper; 0 turns it
  off, BMxBNxWxB names a tile, anything else is refused."""
  import jax  # noqa: PLC0415
  from kernels import make_head_routing  # noqa: PLC0415
  monkeypatch.setattr(ct, "_compute_capability", lambda: 9.0)
  monkeypatch.setattr(ct, "_interpret", lambda: False)
  idx = jax.lax.top_k(jax.random.normal(jax.random.key(0), (16, 4, 10)), 2)[1]
  r = make_head_routing(idx, 10, unit_pairs=True)
  cfg = ct.unit_pairs_config(r, 128, 1024, jnp.bfloat16, 8, False, 1)
  assert (cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages) == ct.UNIT_PAIRS_TILE
  assert cfg == ct._gluon_tile(ct.UNIT_PAIRS_TILES[0], 128)
  assert ct.unit_pairs_config(r, 128, 1024, jnp.bfloat16, 8, True, 1) is None    # dgates
  assert ct.unit_pairs_config(r, 128, 1024, jnp.bfloat16, 4, False, 1) is None   # f32 sums
  assert ct.unit_pairs_config(r, 128, 1024, jnp.bfloat16, 8, False, 8) is None   # per pair
  assert ct.unit_pairs_config(r, 128, 412, jnp.bfloat16, 8, False, 1) is None    # O % 64
  r0 = make_head_routing(idx, 10, unit_pairs=False)
  assert ct.unit_pairs_config(r0, 128, 1024, jnp.bfloat16, 8, False, 1) is None
  monkeypatch.setenv("CVMM_UNIT_PAIRS", "64x64x4x2")
  cfg = ct.unit_pairs_config(r, 128, 1024, jnp.bfloat16, 8, False, 1)
  assert (cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages) == (64, 64, 4, 2)
  monkeypatch.setenv("CVMM_UNIT_PAIRS", "0")
  assert ct.unit_pairs_config(r, 128, 1024, jnp.bfloat16, 8, False, 1) is None
  monkeypatch.setenv("CVMM_UNIT_PAIRS", "128x64x8x2x2")      # the two-half kernel's tile
  cfg = ct.unit_pairs_config(r, 128, 1024, jnp.bfloat16, 8, False, 1)
  assert (cfg.block_m, cfg.num_stages, cfg.halves) == (128, 2, 2)
  for bad in ("fast", "128x64x8x3x2", "128x64x8x2x3", "128x64x8"):
    monkeypatch.setenv("CVMM_UNIT_PAIRS", bad)
    with pytest.raises(ValueError, match="CVMM_UNIT_PAIRS"):
      ct.unit_pairs_config(r, 128, 1024, jnp.bfloat16, 8, False, 1)
  monkeypatch.setattr(ct, "_compute_capability", lambda: 8.0)
  monkeypatch.setenv("CVMM_UNIT_PAIRS", "1")
  assert ct.unit_pairs_config(r, 128, 1024, jnp.bfloat16, 8, False, 1) is None


@pytest.mark.parametrize("finish", ["1", "0"])
def test_rows_matmul_hands_unit_pairs_to_their_kernel(monkeypatch, finish):
  """On Hopper a 16-bit fused sum whose routing carries unit pairs goes to the
  unit-pair kernel, whose float16 output rows are scaled back by the kernel with the
  inverse scales it gets (CVMM_FINISH=1) or by rows_matmul (0): with the kernel
  replaced by the same sums in float32 (scaled as the kernel gets them, and finished
  so), the result is the reference; an explicit row tile or CVMM_UNIT_PAIRS=0 keeps
  the row kernels."""
  monkeypatch.setenv("CVMM_FINISH", finish)
  monkeypatch.setenv("CVMM_UNSCALE", "xla")     # (the Triton scale-back: jax-triton, GPUs)
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  from kernels import make_head_routing  # noqa: PLC0415
  monkeypatch.setattr(ct, "_compute_capability", lambda: 9.0)
  monkeypatch.setattr(ct, "_interpret", lambda: False)
  n, h, ea, i, o = 24, 4, 10, 128, 256
  ks = jax.random.split(jax.random.key(5), 4)
  r = make_head_routing(jax.lax.top_k(jax.random.normal(ks[0], (n, h, ea)), 2)[1], ea,
                        unit_pairs=True)
  a = jax.random.normal(ks[1], (n * h, i)).astype(jnp.bfloat16)        # O: [N*H, Dh]
  w = (jax.random.normal(ks[2], (h * ea, i, o)) * 0.1).astype(jnp.bfloat16)
  g = jax.random.uniform(ks[3], (n * 2 * h,))
  p = np.arange(n * 2 * h)
  we = np.asarray(w, np.float32)[np.asarray(r.expert_index).reshape(-1)]
  rows = np.asarray(a, np.float32)[(p // (2 * h)) * h + (p % (2 * h)) // 2]
  terms = np.einsum("pi,pio->po", rows, we)                             # [P, O]
  seen = []

  def fake(a_, w_, routing, scale, cfg, *, a_rows, out_rows, transpose_w, out_dtype,
           fin=None):
    seen.append((cfg, a_rows, out_rows, out_dtype, fin is not None))
    s = np.asarray(scale)[:, None] * terms
    out = jnp.asarray(s.reshape(n, 2 * h, o).sum(1)).astype(out_dtype)
    if fin is None:
      return out
    return (out.astype(jnp.float32) * fin[:, None]).astype(a_.dtype)

  monkeypatch.setattr(ct, "gluon_pairs_sum", fake)
  out, dg = ct.rows_matmul(a, w, r, a_rows=h, out_rows=1, scale=g)
  assert dg is None and len(seen) == 1
  cfg, a_rows, out_rows, out_dtype, fin = seen[0]
  assert (a_rows, out_rows, jnp.dtype(out_dtype), fin) == (h, 1, jnp.float16,
                                                           finish == "1")
  assert out.dtype == (jnp.bfloat16 if fin else jnp.float32)
  ref = (np.asarray(g)[:, None] * terms).reshape(n, 2 * h, o).sum(1)
  tol = 5e-3 if fin else 2e-3          # + bf16's rounding where finished in bf16
  np.testing.assert_allclose(np.asarray(out, np.float32), ref, rtol=tol,
                             atol=tol * np.abs(ref).max())
  launched = []

  def launch(kernel, args, out_shapes, grid, cfg, zeroed=(), **meta):
    launched.append(getattr(kernel, "__name__", None) or kernel.fn.__name__)
    return [jnp.zeros(s.shape, s.dtype) for s in out_shapes]

  monkeypatch.setattr(ct, "_launch", launch)
  monkeypatch.setattr(cvmm_gluon, "install_launcher", lambda: None)   # (jax-triton: GPUs)
  monkeypatch.setenv("CVMM_UNIT_PAIRS", "0")
  ct.rows_matmul(a, w, r, a_rows=h, out_rows=1, scale=g)
  monkeypatch.setenv("CVMM_UNIT_PAIRS", "1")
  ct.rows_matmul(a, w, r, a_rows=h, out_rows=1, scale=g, cfg=_gluon_tiles(i, o)[0])
  # without unit pairs the first candidate (the two-half row kernel), then the named tile
  assert len(seen) == 1 and launched == ["_rows2_sum_kernel", "_rows_sum_kernel"], launched
