"""What the fused sums' kernels compile to for Hopper, without a GPU: one table row per
kernel and tiling (registers, shared memory per block, blocks per SM those two allow,
and counts in the machine code).

  python -m bench.probes.sass_stats               the Gluon row kernel's tile candidates
                                                  (and its two-half variant's),
                                                  the unit-pair kernel's (SwitchHead's O
                                                  forward, V's dx), the Triton
                                                  kernels' cached tiles and the
                                                  unit-store kernel's candidates
                                                  (SwitchHead O's dx)
  python -m bench.probes.sass_stats --gluon 128x64x8x4,128x64x4x4 --triton ""
  python -m bench.probes.sass_stats --shape 128,1024,16  (I or H, O, K)

Counts are of instructions in the code, not executed ones (loops count once). See
kernels/offline.py. Compiling needs Triton (with Gluon) only; it runs on the CPU.
"""
from __future__ import annotations

import argparse

from kernels.cvmm_triton import gluon_pairs, gluon_rows, units
from kernels import offline
from kernels.autotune import TileConfig

# Hopper: 64K registers and 228 KiB of shared memory per SM, 227 KiB per block
_REGS_SM, _SMEM_SM = 65536, 228 * 1024
# The Triton kernels' tiles cached for MoEUT_244M (bench/autotune_cache.json)
_TRITON_DEFAULT = "rows:128x64x128x4x3,pair_fwd:256x64x64x8x4,pair_bwd:256x64x64x8x4"


def _blocks_per_sm(st: dict, warps: int) -> int:
  by_regs = _REGS_SM // (max(st["registers"], 1) * 32 * warps)
  by_smem = _SMEM_SM // max(st["shared"], 1)
  return min(by_regs, by_smem)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--gluon", default=",".join(
      f"{bm}x{bn}x{w}x{b}" for bm, bn, w, b in gluon_rows.GLUON_ROWS_TILES),
      help="comma list of BMxBNxWARPSxBUFFERS for the Gluon row kernel")
  ap.add_argument("--pairs", default=",".join(
      f"{bm}x{bn}x{w}x{b}" for bm, bn, w, b in gluon_pairs.UNIT_PAIRS_TILES),
      help="comma list of BMxBNxWARPSxBUFFERS for the unit-pair kernel (SwitchHead's "
           "shapes: 4 heads, k = 2, I = 128, O = d_model)")
  ap.add_argument("--triton", default=_TRITON_DEFAULT,
                  help="comma list of KIND:BMxBNxBKxWARPSxSTAGES (KIND rows, pair_fwd, "
                       "pair_bwd; rows walks the column blocks)")
  ap.add_argument("--rows2", default=",".join(f"{bm}x{bn}x{w}" for bm, bn, w in gluon_rows.GLUON_ROWS2_TILES),
                  help="comma list of BMxBNxWARPS (BM: a half) for the two-half row kernel")
  ap.add_argument("--units", default=",".join(
      f"{c.block_m}x{c.block_n}x{c.block_k}x{c.num_warps}x{c.num_stages}"
      for c in units.units_candidates(128, "bfloat16")),
                  help="comma list of BMxBNxBKxWARPSxSTAGES for the unit-store kernel "
                       "(SwitchHead O's dx: I = d_model, O = 128, 4 heads, k = 2)")
  ap.add_argument("--shape", default="128,1024,16",
                  help="I (the pair's hidden width H), O (d_model), K")
  ap.add_argument("--bf16-sums", action="store_true", help="bf16 sums, not float16")
  a = ap.parse_args(argv)
  i, o, k = (int(x) for x in a.shape.split(","))
  f16 = not a.bf16_sums
  cols = ["registers", "shared", "spill_stores", "instructions"] + list(offline.SASS_OPS)
  print("| kernel | tiling | blocks/SM | " + " | ".join(cols) + " |")
  print("|---|---|---:|" + "---:|" * len(cols))

  def row(name, tiling, cfg, st):
    vals = " | ".join(str(st[c]) for c in cols)
    print(f"| {name} | {tiling} | {_blocks_per_sm(st, cfg.num_warps)} | {vals} |",
          flush=True)

  for t in filter(None, a.gluon.split(",")):
    bm, bn, w, b = (int(x) for x in t.split("x"))
    cfg = TileConfig(bm, bn, i, w, b, loop_n=True, gluon=True)
    row("gluon rows", t, cfg, offline.sass_stats(
        offline.compile_gluon_rows(cfg, i=i, o=o, k=k, f16=f16)))
  for t in filter(None, a.rows2.split(",")):
    bm, bn, w = (int(x) for x in t.split("x"))
    cfg = TileConfig(bm, bn, i, w, 2, loop_n=True, gluon=True, halves=2)
    row("gluon rows2", t, cfg, offline.sass_stats(
        offline.compile_gluon_rows(cfg, i=i, o=o, k=k, f16=f16)))
  for t in filter(None, a.pairs.split(",")):
    bm, bn, w, b = (int(x) for x in t.split("x"))
    cfg = TileConfig(bm, bn, 128, w, b, loop_n=True, gluon=True)
    for use, a_rows, tr in (("O fwd", 4, False), ("V dx", 8, True)):
      row(f"gluon pairs, {use}", t, cfg, offline.sass_stats(
          offline.compile_gluon_pairs(cfg, i=128, o=o, k=8, a_rows=a_rows, transpose=tr,
                                      f16=f16)))
  for t in filter(None, a.triton.split(",")):
    kind, tiles = t.split(":")
    bm, bn, bk, w, s = (int(x) for x in tiles.split("x"))
    cfg = TileConfig(bm, bn, bk, w, s, loop_n=kind == "rows")
    row(f"triton {kind}", tiles, cfg, offline.sass_stats(
        offline.compile_triton(kind, cfg, d=o, h=i, o=o, k=k, f16=f16)))
  for t in filter(None, a.units.split(",")):
    bm, bn, bk, w, s = (int(x) for x in t.split("x"))
    cfg = TileConfig(bm, bn, bk, w, s)
    row("triton units, O dx", t, cfg, offline.sass_stats(
        offline.compile_triton("units", cfg, d=o, h=i, k=8)))


if __name__ == "__main__":
  main()
