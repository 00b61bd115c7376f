"""Where the fused sums' time goes: the Gluon row kernel with parts taken out.

  python -m bench.gluon_rows_probe [--profile MoEUT_244M] [--tokens 65536]

At the σ-MoE down projection's shape (float16 sums), times the Gluon fused-sum row
kernel (kernels/cvmm_gluon.py) as it is and with its ``PROBE`` settings: the
reductions predicated off (gathers, matrix stream and products only), plain 16-byte
stores instead of reductions, and no products (gathers, matrix stream and reductions
of zeros), no copies of the expert's matrix (the products read stale buffers), and
neither copies nor reductions (the gathers, products and layout changes alone). Prints
one row per (tiling, variant) and the dense matmul of the same FLOPs. ``--variants``
and ``--tilings`` narrow the runs (e.g. for Nsight Compute: ``--variants 0 --tilings
128x64x4x4 --no-triton``). ``--calls down_fwd,o_fwd,up_dx`` also times those whole
CVMM calls (bench/cvmm_kernels.py, float16 bookkeeping included) with each Gluon tiling,
against the cached tile choice (the Gluon kernel's own at MoEUT_244M since the eleventh
session; Triton's before). ``--rows2 128x64x8,128x32x8,128x64x8x4`` times the two-half
row kernel (kernels/cvmm_gluon.py, _rows2_sum_kernel: tiles of two halves, or with a
fourth number H parts, of BM rows sharing each
matrix block; BMxBNxWARPS) at down_fwd, with its output's difference from the row
kernel's (the first tiling), and with ``--calls`` the whole calls with its tiles too.
``--fin off,on,counts,relaxed,nofence`` times the two-half kernel (the first ``--rows2``
tiling) without and with finishing its float16 sums, and with parts of the finishing
(its FIN_PROBE settings).
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import profiles
from bench.cvmm import _time
from bench.cvmm_kernels import _dense_ms, kernels
from kernels import cvmm_triton as ct
from kernels.autotune import TileConfig

VARIANTS = {0: "as is", 1: "no reductions", 2: "stores, not adds", 3: "no products",
            4: "no matrix copies", 5: "no copies, no reds"}


def _probe_fn(cfg: TileConfig, probe: int):
  """down_fwd (out[n] += g h @ values[e]) through the Gluon kernel with PROBE set."""
  def fn(v):
    h, w, r, g = v["h"], v["values"], v["r"], v["g"]
    return ct.gluon_rows_sum(h, w, r, ct._sum_tiles(r, cfg.block_m), g.astype(jnp.float32),
                             cfg, a_rows=r.k, out_rows=1, transpose_w=False,
                             out_dtype=jnp.float16, probe=probe)
  return fn


def _parts_cfg(spec: str, i: int) -> tuple[str, TileConfig]:
  """(spec, tile) of a ``--rows2`` tiling BMxBNxWARPS[xPARTS] (2 parts unless named)."""
  v = [int(x) for x in spec.split("x")]
  if len(v) not in (3, 4):
    raise SystemExit(f"--rows2 {spec!r}: expected BMxBNxWARPS or BMxBNxWARPSxPARTS")
  return spec, ct._gluon_tile((*v[:3], 2, v[3] if len(v) == 4 else 2), i)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--profile", default="MoEUT_244M")
  ap.add_argument("--tokens", type=int, default=64 * 1024)
  ap.add_argument("--variants", default=",".join(map(str, VARIANTS)),
                  help="comma list of PROBE values")
  ap.add_argument("--tilings", default="128x64x4x4,256x64x8x3",
                  help="comma list of BMxBNxWARPSxBUFFERS")
  ap.add_argument("--no-triton", action="store_true",
                  help="skip the timing with the cached tile choice")
  ap.add_argument("--calls", default="", help="comma list of whole calls to time too")
  ap.add_argument("--rows2", default="", help="comma list of BMxBNxWARPS[xPARTS] of the "
                  "two-half row kernel (2 parts unless named) to time at down_fwd")
  ap.add_argument("--fin", default="", help="comma list of the two-half kernel's "
                  "finishing settings to time at down_fwd (first --rows2 tiling): off, "
                  "on, or the probes counts (fences and counts, nothing finished), "
                  "relaxed (counts alone), nofence (finished, no fences before the "
                  "counts)")
  a = ap.parse_args(argv)
  variants = [int(v) for v in a.variants.split(",")]
  if any(v not in VARIANTS for v in variants):
    raise SystemExit(f"--variants: expected some of {sorted(VARIANTS)}")
  tilings = [tuple(int(x) for x in t.split("x")) for t in a.tilings.split(",")]
  prof = profiles.get(a.profile)
  arrays, ks = kernels(prof, a.tokens, jnp.bfloat16)
  fn, (p, i, o), _ = ks["down_fwd"]
  dense = _dense_ms(p, i, o, jnp.bfloat16)
  print(f"# {jax.devices()[0].device_kind}, {a.profile}, down_fwd P={p} I={i} O={o}, "
        f"dense {dense:.3f} ms")
  if not a.no_triton:
    t = _time(jax.jit(lambda v: fn(None, v)), arrays) * 1e3
    print(f"cached tile choice                         {t:7.3f} ms")
  for bm, bn, w, b in tilings:
    cfg = TileConfig(bm, bn, i, w, b, loop_n=True, gluon=True)
    for probe in variants:
      name = VARIANTS[probe]
      t = _time(jax.jit(_probe_fn(cfg, probe)), arrays) * 1e3
      print(f"gluon {bm}x{bn} w{w} b{b}  {name:18s} {t:7.3f} ms", flush=True)
  parts = [_parts_cfg(t2, i) for t2 in filter(None, a.rows2.split(","))]
  # the routing with the tile lists of every parts tiling (as the routing of a model
  # whose kernels use them would carry them), outside the timed calls
  arrays = dict(arrays, r=arrays["r"].with_tiles(
      sorted({c.halves * c.block_m for _, c in parts})))
  if a.rows2:
    bm, bn, w, b = tilings[0]
    base = jax.jit(_probe_fn(TileConfig(bm, bn, i, w, b, loop_n=True, gluon=True), 0))(
        arrays).astype(jnp.float32)
    for t2, cfg in parts:
      bm, bn, w = cfg.block_m, cfg.block_n, cfg.num_warps

      def fn2(v, cfg=cfg):
        r = v["r"]
        return ct.gluon_rows_sum(v["h"], v["values"], r,
                                 ct._sum_tiles(r, cfg.halves * cfg.block_m),
                                 v["g"].astype(jnp.float32), cfg, a_rows=r.k, out_rows=1,
                                 transpose_w=False, out_dtype=jnp.float16)
      try:
        out = jax.jit(fn2)(arrays).astype(jnp.float32)
        t = _time(jax.jit(fn2), arrays) * 1e3
      except Exception as err:  # report and go on
        print(f"rows2 {t2}: FAILED {type(err).__name__}: {str(err)[:300]}", flush=True)
        continue
      diff = float(jnp.linalg.norm(out - base) / jnp.linalg.norm(base))
      print(f"gluon rows2 {bm}x{cfg.halves}x{bn} w{w}  as is              {t:7.3f} ms "
            f"(vs the first tiling's output: {diff:.1e})", flush=True)
  fin_probes = {"on": 0, "counts": 1, "relaxed": 2, "nofence": 3}
  for setting in filter(None, a.fin.split(",")):
    cfg = parts[0][1]
    bm, bn, w = cfg.block_m, cfg.block_n, cfg.num_warps

    def fn3(v, cfg=cfg, setting=setting):
      r, h = v["r"], v["h"]
      # the call's own scales (their bookkeeping is timed in every setting)
      row_s, g = ct._f16_row_scales(h, ct._max_l1(v["values"], 1), r,
                                    v["g"].astype(jnp.float32), r.k, 1)
      fin = None if setting == "off" else 1.0 / row_s
      return ct.gluon_rows_sum(h, v["values"], r, ct._sum_tiles(r, cfg.halves * cfg.block_m), g,
                               cfg, a_rows=r.k, out_rows=1, transpose_w=False,
                               out_dtype=jnp.float16, fin=fin,
                               probe=fin_probes.get(setting, 0))
    t = _time(jax.jit(fn3), arrays) * 1e3
    print(f"rows2 {bm}x{cfg.halves}x{bn} w{w} finishing {setting:8s} {t:7.3f} ms (the scales' "
          f"bookkeeping included)", flush=True)
  for call in filter(None, a.calls.split(",")):
    cfn, (p, i, o), _ = ks[call]
    dense = _dense_ms(p, i, o, jnp.bfloat16)
    t = _time(jax.jit(lambda v: cfn(None, v)), arrays) * 1e3
    print(f"call {call}: dense {dense:.3f} ms; cached tile choice {t:7.3f} ms "
          f"({dense / t:.0%} of dense)", flush=True)
    cfgs = [(f"gluon {bm}x{bn} w{w} b{b}", TileConfig(bm, bn, i, w, b, loop_n=True,
                                                       gluon=True))
            for bm, bn, w, b in tilings]
    for t2, cfg in parts:
      cfgs.append((f"gluon rows2 {t2}", cfg))
    for name, cfg in cfgs:
      try:
        t = _time(jax.jit(lambda v, cfg=cfg: cfn(cfg, v)), arrays) * 1e3
      except ValueError as err:     # a tiling this call's shapes cannot take
        print(f"call {call} {name}: {err}")
        continue
      print(f"call {call} {name}  {t:7.3f} ms ({dense / t:.0%} of dense)", flush=True)


if __name__ == "__main__":
  main()
