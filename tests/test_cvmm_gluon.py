"""CPU tests of the Gluon fused-sum row kernel (kernels/cvmm_gluon.py): it compiles for
sm90 with every tile candidate (Triton's own pipeline and ptxas, no GPU), and the tile
candidates list it first where a call can take it. Its numerics are tested on the GPU
(tests/test_cvmm_gpu.py::test_gluon_row_kernel_matches_reference)."""
from __future__ import annotations

import re

import jax.numpy as jnp
import pytest

from kernels import cvmm_gluon
from kernels import cvmm_triton as ct

pytestmark = pytest.mark.skipif(not cvmm_gluon.available(), reason="Triton without Gluon")

# Hopper's shared memory per block (227 KiB), and per SM for two blocks (228 KiB)
_SMEM_BLOCK = 227 * 1024


def _compile(cfg, *, i, o, k, transpose, f16, has_scale):
  sw = (i * o, 1, i) if transpose else (i * o, o, 1)
  sig = dict(a_ptr="*bf16", w_ptr="*bf16", order_ptr="*i32", tiles_ptr="*i32",
             scale_ptr="*fp32", out_ptr="*fp16" if f16 else "*bf16")
  consts = dict(Z=100, I=i, O=o, K=k, A_R=k, O_R=1, SW_E=sw[0], SW_I=sw[1], SW_O=sw[2],
                BM=cfg.block_m, BN=cfg.block_n, BUF=cfg.num_stages, NW=cfg.num_warps,
                HAS_SCALE=has_scale, F16=f16, PROBE=0)
  for name in consts:
    sig[name] = "constexpr"
  attrs = {(j,): [["tt.divisibility", 16]] for j in range(6)}
  return cvmm_gluon.compile_gluon(cvmm_gluon._rows_sum_kernel, sig, consts, attrs, 90,
                                  cfg.num_warps, cfg.num_stages)


def _gluon_tiles(i, o):
  return [c for c in ct._rows_candidates(i, o, jnp.bfloat16, gluon=True) if c.gluon]


@pytest.mark.parametrize("cfg", _gluon_tiles(128, 1024), ids=str)
def test_gluon_row_kernel_compiles_for_sm90(cfg):
  """Each tile candidate at MoEUT_244M's down projection (I=128, O=1024): the PTX adds
  eight float16 per reduction, multiplies with wgmma, and the block's shared memory fits
  (two blocks per SM for the 128-row tiles of 64 columns)."""
  kern = _compile(cfg, i=128, o=1024, k=16, transpose=False, f16=True, has_scale=True)
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
  kern = _compile(cfg, i=64, o=256, k=4, transpose=transpose, f16=f16, has_scale=False)
  pair = "f16x2" if f16 else "bf16x2"
  assert f"red.global.gpu.relaxed.add.noftz.v4.{pair}" in kern.asm["ptx"]


def test_gluon_tiles_come_first_where_a_call_takes_them(monkeypatch):
  """The fused 16-bit sums' candidates start with the Gluon tiles (128x64, 8 warps, 4
  buffers first); shapes it cannot take (O not a multiple of 64, I above 256) and
  CVMM_GLUON=0 leave them out."""
  cands = ct._rows_candidates(128, 1024, jnp.bfloat16, gluon=True)
  first = cands[0]
  assert first.gluon and (first.block_m, first.block_n, first.num_warps,
                          first.num_stages) == (128, 64, 8, 4)
  n_gluon = sum(c.gluon for c in cands)
  assert n_gluon == len(ct._GLUON_ROWS)
  assert all(c.gluon for c in cands[:n_gluon]) and not any(c.gluon for c in cands[n_gluon:])
  assert not any(c.gluon for c in ct._rows_candidates(128, 412, jnp.bfloat16, gluon=True))
  assert not any(c.gluon for c in ct._rows_candidates(512, 1024, jnp.bfloat16, gluon=True))
  assert not any(c.gluon for c in ct._rows_candidates(128, 1024, jnp.bfloat16))
  assert ct._gluon_enabled()
  monkeypatch.setenv("CVMM_GLUON", "0")
  assert not ct._gluon_enabled()
