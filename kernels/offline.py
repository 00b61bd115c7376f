"""The fused sums' GPU kernels compiled for a GPU that is not here (Hopper by default),
and what their machine code holds.

Triton compiles for any target without a GPU: its pipeline runs on the CPU and its
wheel carries NVIDIA's ``ptxas`` and ``cuobjdump``. That checks that a kernel variant
builds (tests/test_cvmm_gluon.py, in CI) and shows its registers, shared memory,
barriers and instruction counts before any GPU time is spent.

  compile_gluon_rows(cfg, i=128, o=1024, k=16)    the Gluon fused-sum row kernel (and,
                                                  cfg.halves 2, its two-half variant)
  compile_gluon_pairs(cfg, ...)                   the Gluon unit-pair kernel
  compile_triton("rows" | "pair_fwd" | "pair_bwd" | "units", ...)   the Triton kernels
  compile_unscale_checked(part="unscale" | "repair")  the checked scale-back's kernels
  compile_original(path, "forward" | "backward")  the official MoEUT's kernels in the
                                                  wrappers of kernels/cvmm_original.py
  sass_stats(compiled)                            registers, shared memory, counts
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile

from kernels.autotune import TileConfig

# SASS opcodes counted by sass_stats (an opcode is counted with any suffix)
SASS_OPS = ("BAR.SYNC", "STS", "STSM", "LDS", "LDSM", "LDGSTS", "REDG", "HGMMA", "HMMA",
            "F2FP", "SHFL")


def _signature(ptrs: dict, consts: dict) -> tuple[dict, dict]:
  """A kernel's signature (its runtime arguments, pointers and scalars, then ``consts``
  as constexprs) and its attributes: every pointer 16-byte aligned, as jax-triton's
  arrays are."""
  attrs = {(j,): [["tt.divisibility", 16]] for j, t in enumerate(ptrs.values())
           if t.startswith("*")}
  return {**ptrs, **{name: "constexpr" for name in consts}}, attrs


def compile_gluon_rows(cfg: TileConfig, *, i: int, o: int, k: int, transpose: bool = False,
                       f16: bool = True, has_scale: bool = True, cc: int = 90):
  """The Gluon row kernel (:func:`kernels.cvmm_triton.gluon_rows.rows_sum_kernel`; with
  ``cfg.halves`` 2 the two-half kernel, tiles of 2 * ``cfg.block_m`` rows) as the σ-MoE
  down projection calls it (every pair reads its own row, one output row per token),
  bf16 inputs, float16 (``f16``) or bf16 sums, compiled for sm``cc``."""
  from kernels.cvmm_triton import gluon_rows  # noqa: PLC0415
  from kernels.cvmm_triton.launch import compile_gluon  # noqa: PLC0415
  sig = dict(a_ptr="*bf16", w_ptr="*bf16", order_ptr="*i32", tiles_ptr="*i32",
             scale_ptr="*fp32", out_ptr="*fp16" if f16 else "*bf16")
  w_shape = (1, o, i) if transpose else (1, i, o)
  consts = gluon_rows.gluon_rows_meta(w_shape, transpose, cfg, z=1024, k=k, a_rows=k,
                                      out_rows=1, has_scale=has_scale, f16=f16)
  sig, attrs = _signature(sig, consts)
  kernel = gluon_rows.rows2_sum_kernel if cfg.halves > 1 else gluon_rows.rows_sum_kernel
  return compile_gluon(kernel, sig, consts, attrs, cc, cfg.num_warps, cfg.num_stages)


def compile_gluon_pairs(cfg: TileConfig, *, i: int = 128, o: int = 1024, k: int = 8,
                        a_rows: int = 4, transpose: bool = False, f16: bool = True,
                        cc: int = 90):
  """The Gluon unit-pair kernel (:func:`kernels.cvmm_triton.gluon_pairs.pairs_sum_kernel`)
  as SwitchHead's O projection calls it (``a_rows`` = heads: both pairs of a unit read
  one row; ``a_rows`` = ``k``: V's dx, each pair its own row), one output row per token,
  bf16 inputs, float16 (``f16``) or bf16 sums, compiled for sm``cc``."""
  from kernels.cvmm_triton import gluon_pairs  # noqa: PLC0415
  from kernels.cvmm_triton.launch import compile_gluon  # noqa: PLC0415
  sig = dict(a_ptr="*bf16", w_ptr="*bf16", lo_ptr="*i32", hi_ptr="*i32", tiles_ptr="*i32",
             scale_ptr="*fp32", out_ptr="*fp16" if f16 else "*bf16")
  w_shape = (1, o, i) if transpose else (1, i, o)
  consts = gluon_pairs.gluon_pairs_meta(w_shape, transpose, cfg, z=1024, k=k,
                                        a_rows=a_rows, out_rows=1, has_scale=True, f16=f16)
  sig, attrs = _signature(sig, consts)
  return compile_gluon(gluon_pairs.pairs_sum_kernel, sig, consts, attrs, cc, cfg.num_warps,
                       cfg.num_stages)


def compile_triton(kind: str, cfg: TileConfig, *, d: int = 1024, h: int = 128,
                   o: int = 1024, k: int = 16, f16: bool = True, cc: int = 90):
  """A Triton kernel with 16-bit fused sums (8 per reduction), bf16 inputs, compiled
  for sm``cc``: ``"rows"`` (the row kernel as σ-MoE down calls it: I = h, O = o, each
  column block in turn), ``"pair_fwd"`` or ``"pair_bwd"`` (the fused σ-MoE pair: D = d,
  H = h, O = o), or ``"units"`` (the unit-store kernel as SwitchHead O's dx calls it:
  [N, d] rows through k // 2 heads' transposed [h, d] matrices, dgates, stored in bf16;
  no 16-bit sum, ``f16`` unused)."""
  import triton  # noqa: PLC0415
  from triton.backends.compiler import GPUTarget  # noqa: PLC0415
  from triton.compiler import ASTSource  # noqa: PLC0415

  from kernels.cvmm_triton import pair, primitives, rows, units  # noqa: PLC0415
  out = "*fp16" if f16 else "*bf16"
  bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
  if kind == "rows":
    fn = rows.rows_kernel
    sig = dict(a_ptr="*bf16", w_ptr="*bf16", order_ptr="*i32", tiles_ptr="*i32",
               scale_ptr="*fp32", c_ptr="*fp32", out_ptr=out, dg_ptr="*fp32")
    i, o_, sw = primitives.w_layout((1, h, o), False)
    consts = dict(Z=1024, I=i, O=o_, K=k, A_R=k, O_R=1, C_R=1, SW_E=sw[0], SW_I=sw[1],
                  SW_O=sw[2], BM=bm, BN=bn, BK=bk, HAS_SCALE=True, ATOMIC=True,
                  DGATE=False, IEEE=False, LOOP_N=cfg.loop_n, RED=8, F16=f16)
  elif kind in ("pair_fwd", "pair_bwd"):
    sig = dict(a_ptr="*bf16", w1_ptr="*bf16", w2_ptr="*bf16", order_ptr="*i32",
               tiles_ptr="*i32", gates_ptr="*fp32")
    bwd = kind == "pair_bwd"
    if bwd:       # dout [N, o] through values^T, then keys^T into dx [N, d]
      fn = pair.pair_bwd_kernel
      sig.update(h_ptr="*bf16", rs_ptr="*fp32", out_ptr=out, du_ptr="*bf16",
                 dg_ptr="*fp32")
      shapes = (1, h, o), (1, d, h)
    else:         # x [N, d] through keys, then values into out [N, o]
      fn = pair.pair_fwd_kernel
      sig.update(out_ptr=out, h_ptr="*bf16")
      shapes = (1, d, h), (1, h, o)
    d_, h_, o_, s1, s2 = pair.pair_layout(*shapes, bwd)
    consts = dict(Z=1024, D=d_, H=h_, O=o_, K=k, S1_E=s1[0], S1_D=s1[1], S1_H=s1[2],
                  S2_E=s2[0], S2_H=s2[1], S2_O=s2[2], BM=bm, BN=bn, BK=bk, BH=h_,
                  IEEE=False, RED=8, F16=f16)
  elif kind == "units":
    fn = units.units_kernel
    sig = dict(a_ptr="*bf16", w_ptr="*bf16", lo_ptr="*i32", hi_ptr="*i32",
               tiles_ptr="*i32", scale_ptr="*fp32", c_ptr="*bf16", out_ptr="*bf16",
               dg_ptr="*fp32")
    i, o_, sw = primitives.w_layout((1, h, d), True)
    consts = dict(Z=1024, I=i, O=o_, K=k, A_R=1, O_R=k // 2, C_R=k // 2, SW_E=sw[0],
                  SW_I=sw[1], SW_O=sw[2], BM=bm, BN=bn, BK=bk, HAS_SCALE=True, DGATE=True,
                  IEEE=False)
  else:
    raise ValueError(f"kind {kind!r}: expected rows, pair_fwd, pair_bwd or units")
  sig, attrs = _signature(sig, consts)
  return triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", cc, 32),
                        options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))


def compile_original(path: str, which: str, *, dtype: str = "bf16", transpose: bool = False,
                     out_index: bool = True, cc: int = 90):
  """The official MoEUT's ``which`` kernel ("forward": products, "backward": weight
  gradient) from the clone at ``path``, in its jax-triton wrapper, with the tile
  configuration the binding takes and the arguments it passes (inputs in ``dtype``,
  float32 weights and weight gradient; scalars equal to 1 are constexprs, as jax-triton
  makes them; ``transpose``: the forward kernel on transposed weights)."""
  import triton  # noqa: PLC0415
  from triton.backends.compiler import GPUTarget  # noqa: PLC0415
  from triton.compiler import ASTSource  # noqa: PLC0415
  from kernels import cvmm_original as co  # noqa: PLC0415
  ids = {"fp32": 0, "fp16": 1, "bf16": 2}
  kernels = co.original_kernels(path)
  if which == "forward":
    fn, cfg = kernels.forward, kernels.forward_configs[co.FORWARD_CONFIG]
    w_runtime, w_one = ("stride_bn", "stride_bk") if transpose else ("stride_bk", "stride_bn")
    ptrs = {"a_ptr": f"*{dtype}", "b_ptr": "*fp32", "index_ptr": "*i32", "sel_ptr": "*i32",
            "out_index_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32", "stride_am": "i32",
            "stride_bo": "i32", w_runtime: "i32", "stride_cm": "i32",
            "stride_out_index": "i32", "c_ptr": f"*{dtype}"}
    consts = {"stride_ak": 1, w_one: 1, "stride_cn": 1, "stride_index": 1, "stride_sel": 1,
              "out_index_is_none": not out_index, "dtype_id": ids[dtype],
              "allow_tf32": False, **cfg.kwargs}
  elif which == "backward":
    fn, cfg = kernels.backward, kernels.backward_configs[co.BACKWARD_CONFIG]
    ptrs = dict(a_ptr=f"*{dtype}", b_ptr=f"*{dtype}", index_ptr="*i32", sel_ptr="*i32",
                out_index_ptr="*i32", M="i32", N="i32", K="i32", stride_ak="i32",
                stride_bk="i32", stride_co="i32", stride_cm="i32", stride_out_index="i32",
                c_ptr="*fp32")
    consts = dict(stride_am=1, stride_bn=1, stride_cn=1, stride_index=1, stride_sel=1,
                  out_index_is_none=not out_index, out_dtype_id=0, allow_tf32=False,
                  dtype_id=ids[dtype], **cfg.kwargs)
  else:
    raise ValueError(f"which={which!r}: forward or backward")
  order = [n for n in fn.arg_names if n in ptrs]
  sig, attrs = _signature({n: ptrs[n] for n in order}, consts)
  return triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", cc, 32),
                        options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))


def compile_unscale_checked(*, i: int = 128, o: int = 1024, k: int = 16, a_rows: int = 16,
                            out_rows: int = 1, transpose: bool = False, cc: int = 90,
                            part: str = "unscale", rows: int = 65536):
  """The two kernels of the scale-back of checked float16 sums
  (:func:`kernels.cvmm_triton.scales.unscale_rows_checked`): ``part`` "unscale" (the check,
  the scale-back and the list of rows to repair) or "repair" (the listed rows
  recomputed in float32), bf16 rows and matrices, gates, compiled for sm``cc`` as the
  σ-MoE down projection (or with ``transpose`` up's dx) calls them on ``rows`` output
  rows."""
  import triton  # noqa: PLC0415
  from triton.backends.compiler import GPUTarget  # noqa: PLC0415
  from triton.compiler import ASTSource  # noqa: PLC0415

  from kernels.cvmm_triton import scales  # noqa: PLC0415
  if part == "unscale":
    fn = scales.unscale_checked_kernel
    sig = dict(x_ptr="*fp16", inv_ptr="*fp32", nz_ptr="*i8", y_ptr="*fp16", cnt_ptr="*i32",
               list_ptr="*i32")
    # R, as every keyword of the launch, is a compile-time argument of jax-triton's
    consts = dict(R=rows, **scales.unscale_checked_meta(o, reverse=True, bf16=True))
  elif part == "repair":
    fn = scales.repair_rows_kernel
    sig = dict(x_ptr="*fp16", cnt_ptr="*i32", list_ptr="*i32", a_ptr="*bf16", w_ptr="*bf16",
               eidx_ptr="*i32", g_ptr="*fp32", y_ptr="*fp16")
    consts = scales.repair_rows_meta((1, o, i) if transpose else (1, i, o), transpose, k=k,
                                     a_rows=a_rows, out_rows=out_rows, bf16=True, has_g=True)
  else:
    raise ValueError(f"part {part!r}: expected unscale or repair")
  sig, attrs = _signature(sig, consts)
  return triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", cc, 32),
                        options=dict(num_warps=4, num_stages=1))


def _nvidia_tool(name: str) -> str:
  import triton.backends.nvidia as nv  # noqa: PLC0415
  return os.path.join(os.path.dirname(nv.__file__), "bin", name)


def sass_stats(compiled, cc: int = 90) -> dict:
  """{"registers", "shared" (bytes per block), "spill_stores" (bytes), "instructions",
  and a count per opcode
  of :data:`SASS_OPS`} of a kernel compiled by Triton, from ``ptxas -v`` and
  ``cuobjdump -sass``. Counts are of the code, not of executed instructions."""
  arch = f"sm_{cc}a" if cc >= 90 else f"sm_{cc}"
  with tempfile.TemporaryDirectory() as tmp:
    ptx, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
    with open(ptx, "w") as f:
      f.write(compiled.asm["ptx"])
    with open(cubin, "wb") as f:
      f.write(compiled.asm["cubin"])
    info = subprocess.run([_nvidia_tool("ptxas"), f"-arch={arch}", "-v", ptx, "-o",
                           os.devnull], capture_output=True, text=True, check=True).stderr
    sass = subprocess.run([_nvidia_tool("cuobjdump"), "-sass", cubin], capture_output=True,
                          text=True, check=True).stdout
  regs = re.findall(r"Used (\d+) registers", info)
  spills = re.findall(r"(\d+) bytes spill stores", info)
  ops = re.findall(r"^\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass,
                   flags=re.M)
  out = dict(registers=int(regs[0]) if regs else None, shared=compiled.metadata.shared,
             spill_stores=int(spills[0]) if spills else 0, instructions=len(ops))
  for name in SASS_OPS:
    out[name] = sum(1 for op in ops if op == name or op.startswith(name + "."))
  return out
