"""CPU tests of the fused sums' GPU kernels, compiled for sm90 with Triton's own pipeline
and ptxas (no GPU): the Gluon row kernel (kernels/cvmm_gluon.py) with every tile
candidate, and the Triton kernels' 16-bit sums; and the tile candidates list the Gluon
kernel first where a call can take it. Their numerics are tested on the GPU
(tests/test_cvmm_gpu.py)."""
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


@pytest.mark.parametrize("kernel", ["rows", "pair_fwd", "pair_bwd"])
@pytest.mark.parametrize("f16", [True, False], ids=["f16", "bf16"])
def test_triton_fused_sum_kernels_compile_for_sm90(kernel, f16):
  """The Triton kernels' 16-bit fused sums (RED=8) compile for sm90: the rows, already
  rounded to 16 bits, are added eight per reduction instruction."""
  import triton  # noqa: PLC0415
  from triton.backends.compiler import GPUTarget  # noqa: PLC0415
  from triton.compiler import ASTSource  # noqa: PLC0415
  d, h, o, k = 256, 128, 256, 4
  out = "*fp16" if f16 else "*bf16"
  if kernel == "rows":
    fn = ct._rows_kernel
    sig = dict(a_ptr="*bf16", w_ptr="*bf16", order_ptr="*i32", tiles_ptr="*i32",
               scale_ptr="*fp32", c_ptr="*fp32", out_ptr=out, dg_ptr="*fp32")
    consts = dict(Z=100, I=h, O=o, K=k, A_R=k, O_R=1, C_R=1, SW_E=h * o, SW_I=o, SW_O=1,
                  BM=128, BN=64, BK=h, HAS_SCALE=True, ATOMIC=True, DGATE=False,
                  IEEE=False, LOOP_N=True, RED=8, F16=f16)
  else:
    bwd = kernel == "pair_bwd"
    sig = dict(a_ptr="*bf16", w1_ptr="*bf16", w2_ptr="*bf16", order_ptr="*i32",
               tiles_ptr="*i32", gates_ptr="*fp32")
    if bwd:
      fn = ct._pair_bwd_kernel
      sig.update(h_ptr="*bf16", rs_ptr="*fp32", out_ptr=out, du_ptr="*bf16",
                 dg_ptr="*fp32")
      s1, s2 = (h * d, 1, d), (o * h, 1, h)
    else:
      fn = ct._pair_fwd_kernel
      sig.update(out_ptr=out, h_ptr="*bf16")
      s1, s2 = (d * h, h, 1), (h * o, o, 1)
    consts = dict(Z=100, D=d, H=h, O=o, K=k, S1_E=s1[0], S1_D=s1[1], S1_H=s1[2],
                  S2_E=s2[0], S2_H=s2[1], S2_O=s2[2], BM=128, BN=64, BK=64, BH=h,
                  IEEE=False, RED=8, F16=f16)
  n_args = len(sig)
  sig.update({name: "constexpr" for name in consts})
  attrs = {(j,): [["tt.divisibility", 16]] for j in range(n_args)}
  kern = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                        options=dict(num_warps=4, num_stages=3))
  pair = "f16x2" if f16 else "bf16x2"
  assert f"red.global.gpu.relaxed.add.noftz.v4.{pair}" in kern.asm["ptx"]


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
