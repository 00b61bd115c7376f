"""Times each Triton CVMM kernel of one layer on its own, for every tile candidate.

  python -m bench.cvmm_kernels --profile MoEUT_244M
  python -m bench.cvmm_kernels --kernels down_fwd,up_dx --sums float16,float32

The σ-MoE pair (up, ReLU, gated down) runs six kernels, forward and backward:
  up_fwd    y[p] = x[n] @ keys[e]                 rows, I = D, O = Es, stored
  down_fwd  out[n] += g[p] h[p] @ values[e]       rows, I = Es, O = D, fused sum (atomic)
  down_dh   dh[p] = g[p] dout[n] @ values[e]^T    rows, I = D, O = Es, + dgates
  down_dw   dvalues[e] = sum_p h[p]^T g[p] dout[n]         ragged contraction
  up_dx     dx[n] += dy[p] @ keys[e]^T            rows, I = Es, O = D, fused sum (atomic)
  up_dw     dkeys[e] = sum_p x[n]^T dy[p]                  ragged contraction
and SwitchHead's V and O projections, forward and backward:
  v_fwd     v[n, h] += g[p] x[n] @ V[e]            fused sum over the head's experts
                                                   (unit store with unit pairs)
  v_dg      dg[p] = (x[n] @ V[e]) . dv[n, h]      rows again, + dgates
  v_dx      dx[n] += g[p] dv[n, h] @ V[e]^T        fused sum over heads × experts
  v_dw      dV[e] = sum_p x[n]^T g[p] dv[n, h]            ragged contraction (the gated
            rows scaled first)
  o_fwd     out[n] += g[p] att[n, h] @ O[e]        fused sum over heads × experts
  o_dx      datt[n, h] = sum_p g[p] dout[n] @ O[e]^T + dgates (unit store with unit pairs)
  o_dw      dO[e] = sum_p (g[p] att[n, h])^T dout[n]      ragged contraction (the gated
            rows scaled first, as the op's backward does);
the fused pair kernels do up_fwd + down_fwd (pair_fwd) and down_dh + up_dx
(pair_bwd) in one launch each ("dense" there: one matmul with the FLOPs of both products).
Each kernel is timed with every tile candidate the autotuner would consider, with the
sums of the first of ``--sums`` (a CvmmConfig's sum_dtype: float16, float32 or
bfloat16), and the three fastest tilings once more with each other one. "dense %"
compares with one dense matmul of the same FLOPs timed in the same run. Prints a line
per (kernel, tile, sums); ``--json`` saves all.
"""
from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp

from moeut_jax import profiles
from bench.cvmm import _time, projections
from kernels import CvmmConfig
from kernels.cvmm_triton import dw, gluon_rows, ops, pair, rows, scales
from kernels.cvmm_triton.units import units_store_applies


def _dense_ms(p, i, o, dtype):
  a = jax.random.normal(jax.random.key(0), (p, i)).astype(dtype)
  b = jax.random.normal(jax.random.key(1), (i, o)).astype(dtype)
  return _time(jax.jit(lambda a, b: a @ b), a, b) * 1e3


def kernels(prof: dict, n: int, dtype):
  """(arrays, name -> (fn(cfg, arrays) -> output, (P, I, O) of the equal-FLOPs dense
  matmul, kind))."""
  pr = projections(prof, n, dtype)
  up, down, o_ = pr["up"], pr["down"], pr["O"]
  r = up["r"]
  k, d, es = r.k, prof["d_model"], prof["ff_expert_size"]
  p = r.n_pairs
  keys, values = up["w"], down["w"]
  x = up["x"]                                                   # [N, D]
  h = down["x"].reshape(n * k, es)                              # [P, Es]
  g = down["g"].reshape(-1)
  dout = jax.random.normal(jax.random.key(5), (n, d)).astype(dtype)
  dy = jax.random.normal(jax.random.key(6), (p, es)).astype(dtype)
  ro = o_["r"]
  att = o_["x"].reshape(-1, o_["x"].shape[-1])                  # [N*H, Dh]
  heads = att.shape[0] // n
  dh = att.shape[1]
  dyv = jax.random.normal(jax.random.key(7), (ro.n_pairs, dh)).astype(dtype)
  dv = jax.random.normal(jax.random.key(8), (n * heads, dh)).astype(dtype)
  rm = rows.rows_matmul
  # The arrays are passed to each jitted call as arguments: closed over, they would be
  # constants, and XLA would fold the work on them (the float16 sums' row maxima) into
  # the compilation instead of timing it.
  v = dict(x=x, keys=keys, values=values, h=h, g=g, g2=down["g"], dout=dout, dy=dy,
           hv=jax.nn.relu(h), att=att, ow=o_["w"], og=o_["g"].reshape(-1),
           vw=pr["V"]["w"], r=r, ro=ro, dyv=dyv, dv=dv)
  return v, {
      "pair_fwd": (lambda c, k_, v: pair.pair_rows(v["x"], v["keys"], v["values"], v["g2"],
                                             v["r"], cfg=c, config=k_)["out"],
                   (p, d + d, es), "pair"),
      "pair_bwd": (lambda c, k_, v: pair.pair_rows(v["dout"], v["values"], v["keys"], v["g2"],
                                             v["r"], h=v["hv"], cfg=c, config=k_),
                   (p, d + d, es), "pair"),
      "up_fwd": (lambda c, k_, v: rm(v["x"], v["keys"], v["r"], a_rows=1, out_rows=k,
                                 cfg=c, config=k_)[0],
                 (p, d, es), "rows"),
      "down_fwd": (lambda c, k_, v: rm(v["h"], v["values"], v["r"], a_rows=k, out_rows=1,
                                   scale=v["g"], cfg=c, config=k_)[0],
                   (p, es, d), "atomic"),
      "down_dh": (lambda c, k_, v: rm(v["dout"], v["values"], v["r"], a_rows=1, out_rows=k,
                                  transpose_w=True, scale=v["g"], dgate_rows=v["h"],
                                  c_rows=k, cfg=c, config=k_),
                  (p, d, es), "rows"),
      "down_dw": (lambda c, k_, v: dw.expert_gram(v["h"], v["dout"], v["r"], a_rows=k,
                                              b_rows=1, scale=v["g"], cfg=c),
                  (p, es, d), "dw"),
      # down_dw without the gate scale: what pre-scaled rows would cost
      "down_dw_noscale": (lambda c, k_, v: dw.expert_gram(v["h"], v["dout"], v["r"], a_rows=k,
                                                      b_rows=1, cfg=c),
                          (p, es, d), "dw"),
      "up_dx": (lambda c, k_, v: rm(v["dy"], v["keys"], v["r"], a_rows=k, out_rows=1,
                                transpose_w=True, cfg=c, config=k_)[0],
                (p, es, d), "atomic"),
      "up_dw": (lambda c, k_, v: dw.expert_gram(v["x"], v["dy"], v["r"], a_rows=1, b_rows=k,
                                            cfg=c),
                (p, d, es), "dw"),
      # SwitchHead V: each head's two experts summed with their gates (cvmm's out_rows);
      # the unit-store kernel where unit pairs allow (cfg None: the library's choice)
      "v_fwd": (lambda c, k_, v: rm(v["x"], v["vw"], v["ro"], a_rows=1, out_rows=heads,
                                scale=v["og"], cfg=c, config=k_)[0],
                (ro.n_pairs, d, pr["V"]["w"].shape[2]), "atomic"),
      # the backward's dgates: the products again, dotted with the output gradient
      "v_dg": (lambda c, k_, v: rm(v["x"], v["vw"], v["ro"], a_rows=1,
                               out_rows=heads if units_store_applies(
                                   v["ro"], dh, 1, heads, heads) else ro.k,
                               dgate_rows=v["dv"], c_rows=heads, cfg=c, config=k_)[1],
               (ro.n_pairs, d, pr["V"]["w"].shape[2]), "rows"),
      "v_dx": (lambda c, k_, v: rm(v["dv"], v["vw"], v["ro"], a_rows=heads, out_rows=1,
                               transpose_w=True, scale=v["og"], cfg=c, config=k_)[0],
               (ro.n_pairs, dh, d), "atomic"),
      "v_dw": (lambda c, k_, v: dw.expert_gram(v["x"], v["dyv"], v["ro"], a_rows=1,
                                           b_rows=ro.k, cfg=c),
               (ro.n_pairs, d, dh), "dw"),
      "o_fwd": (lambda c, k_, v: rm(v["att"], v["ow"], v["ro"], a_rows=heads,
                                out_rows=1, scale=v["og"], cfg=c, config=k_)[0],
                (ro.n_pairs, dh, d), "atomic"),
      # the row kernel's tiles ("rows": with dgates the Gluon kernels do not apply);
      # cfg None: the library's choice (the unit-store kernel where unit pairs allow)
      "o_dx": (lambda c, k_, v: rm(v["dout"], v["ow"], v["ro"], a_rows=1, out_rows=heads,
                               transpose_w=True, scale=v["og"], dgate_rows=v["att"],
                               c_rows=heads, cfg=c, config=k_),
               (ro.n_pairs, d, dh), "rows"),
      "o_dw": (lambda c, k_, v: dw.expert_gram(
                   ops.gated_rows(v["att"].reshape(n, heads, dh), v["og"].reshape(n, ro.k)),
                   v["dout"], v["ro"], a_rows=ro.k, b_rows=1, cfg=c),
               (ro.n_pairs, dh, d), "dw"),
  }


def candidates(kind, p, i, o, e, dtype, sum_dtype):
  if kind == "dw":
    return dw.dw_candidates(p, e, i, o, dtype)
  if kind == "pair":
    return pair.pair_candidates(i // 2, o, i // 2, dtype)
  # the fused sums (kind "atomic") also with the Gluon kernels where they run
  gluon = kind == "atomic" and scales.red_width(o, dtype, sum_dtype) == 8
  return rows.rows_candidates(i, o, dtype, gluon=gluon)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--profile", default="MoEUT_244M")
  ap.add_argument("--tokens", type=int, default=64 * 1024)
  ap.add_argument("--kernels", default="")
  ap.add_argument("--block-m", default="",
                  help="comma list: time only the candidates with these row-tile sizes "
                       "(0: none, e.g. with --cached)")
  ap.add_argument("--max-cands", type=int, default=0,
                  help="time only the first N tile candidates (0: all)")
  ap.add_argument("--sums", default="float16",
                  help="comma list of float16, float32, bfloat16: the fused sums' dtypes "
                       "(the first for every candidate, the others for the three fastest)")
  ap.add_argument("--gluon", action="store_true",
                  help="time only the Gluon tile candidates (with --cached: and the cached "
                       "choice)")
  ap.add_argument("--cached", action="store_true",
                  help="time the cached tile choice too, first")
  ap.add_argument("--json", default="")
  a = ap.parse_args(argv)
  dtype = jnp.bfloat16
  prof = profiles.get(a.profile)
  arrays, ks = kernels(prof, a.tokens, dtype)
  names = [s for s in a.kernels.split(",") if s] or list(ks)
  sums = [s for s in a.sums.split(",") if s]
  configs = [CvmmConfig(sum_dtype=sd) for sd in sums]
  print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}, {a.profile}, "
        f"{a.tokens} tokens, sums {sums[0]} (unless a row says otherwise)", flush=True)
  rows_out = []
  for name in names:
    fn, (p, i, o), kind = ks[name]
    e = (prof["att_n_experts"] * prof["n_heads"] if name[:2] in ("o_", "v_")
         else prof["ff_n_experts"])
    dense = _dense_ms(p, i, o, dtype)
    flops = 2 * p * i * o
    print(f"## {name}: P={p} I={i} O={o}  dense {dense:.3f} ms "
          f"({flops / dense / 1e9:.0f} TFLOP/s)", flush=True)
    cands = candidates(kind, p, i, o, e, dtype, sums[0])
    if a.block_m:
      cands = [c for c in cands if str(c.block_m) in a.block_m.split(",")]
    if a.gluon:
      cands = [c for c in cands if c.gluon]
    cfgs = ([None] if a.cached else []) + cands[:a.max_cands or None]
    done = [_run(name, fn, arrays, cfg, configs[0], dense, flops) for cfg in cfgs]
    ok = sorted((d for d in done if "ms" in d), key=lambda d: d["ms"])
    if kind in ("atomic", "pair"):
      for config in configs[1:]:
        done += [_run(name, fn, arrays, d["cfg"], config, dense, flops) for d in ok[:3]]
    rows_out += done
  if a.json:
    with open(a.json, "w") as f:
      json.dump(rows_out, f, indent=1,
                default=lambda c: c.to_json() if hasattr(c, "to_json") else str(c))
  return rows_out


def _run(name, fn, arrays, cfg, config, dense, flops):
  row = dict(kernel=name, cfg=cfg, sums=config.sum_dtype, dense_ms=dense)
  try:
    f = jax.jit(lambda v: fn(cfg, config, v))
    row["ms"] = _time(f, arrays) * 1e3
    print(f"{name:9s} {_fmt(cfg):34s} sums {config.sum_dtype:8s} {row['ms']:7.3f} ms "
          f"{dense / row['ms']:5.0%} of dense  {flops / row['ms'] / 1e9:5.0f} TFLOP/s",
          flush=True)
  except Exception as err:  # a candidate that does not compile: report, go on
    row["error"] = f"{type(err).__name__}: {str(err)[:200]}"
    print(f"{name:9s} {_fmt(cfg):34s} sums {config.sum_dtype:8s} FAILED {row['error']}",
          flush=True)
  return row


def _fmt(c):
  if c is None:
    return "cached choice"
  s = f"{c.block_m}x{c.block_n}x{c.block_k} w{c.num_warps} s{c.num_stages}"
  if c.splits > 1:
    s += f" S{c.splits}"
  if c.gluon:
    s += " gluon" + (f" x{c.halves}" if c.halves > 1 else "")
  elif c.loop_n:
    s += " loopN"
  return s


if __name__ == "__main__":
  main(sys.argv[1:])
