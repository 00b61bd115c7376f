"""What checked float16 scales cost when their estimate misses: the σ-MoE down
projection's forward (a gated cvmm call) with no row, a share of the rows, or every
row recomputed in float32 by the scale-back's repair (kernels.cvmm_triton.unscale_rows_checked).

  python -m bench.probes.checked_repair --profile MoEUT_244M [--tokens 65536] [--shares 0.001,0.01]

A share s of the tokens gets its last input row 2^16 times larger than the others: the
estimate, which samples each token's first row, then puts that row's sums past
float16's range and the scale-back repairs them. "every row" forces an estimate 2^20
too low. Prints the call's time against the bound scales (CVMM_F16_SCALES=bound) and a
dense matmul of the same FLOPs, and how many rows came out repaired.
"""
from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

import profiles
from bench.cvmm import _time, projections
from kernels import cvmm
import kernels.cvmm_triton as ct


def _call(v):
  return jax.jit(lambda x, w, g: cvmm(x, v["r"], w, g, impl="triton"))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--profile", default="MoEUT_244M")
  ap.add_argument("--tokens", type=int, default=64 * 1024)
  ap.add_argument("--shares", default="0.001,0.01,0.1",
                  help="comma list of the shares of tokens with a row the estimate misses")
  a = ap.parse_args(argv)
  prof = profiles.get(a.profile)
  v = projections(prof, a.tokens, jnp.bfloat16)["down"]
  x, w, g = v["x"], v["w"], v["g"]
  n, k = x.shape[0], x.shape[1]
  p, i, o = v["dense"]
  da = jax.random.normal(jax.random.key(0), (p, i)).astype(jnp.bfloat16)
  db = jax.random.normal(jax.random.key(1), (i, o)).astype(jnp.bfloat16)
  dense = _time(jax.jit(lambda a_, b_: a_ @ b_), da, db) * 1e3
  print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}, {a.profile} down "
        f"forward, {n} tokens; dense {dense:.3f} ms", flush=True)
  print("| scales | rows repaired | ms | % of dense |\n|---|---:|---:|---:|")
  repaired = []
  orig = ct.unscale_rows_checked

  def spy(out, inv_s, sampled, *args_, **kw):     # counts the rows the check repairs
    top = jnp.max(jnp.where(jnp.isnan(out), jnp.inf, jnp.abs(out.astype(jnp.float32))),
                  axis=1)
    bad = ~jnp.isfinite(top) | ((top < 2.0 ** ct._CHECK_LO_LOG2)
                                & ((top > 0) | (sampled == 1)))
    repaired.append(int(jnp.sum(bad)))
    return orig(out, inv_s, sampled, *args_, **kw)

  def row(label, x_, scales="checked", aim=None):
    before = os.environ.get("CVMM_F16_SCALES"), ct._CHECK_AIM_BELOW
    os.environ["CVMM_F16_SCALES"] = scales
    if aim is not None:
      ct._CHECK_AIM_BELOW = aim
    try:
      t = _time(_call(v), x_, w, g) * 1e3
      repaired.clear()
      ct.unscale_rows_checked = spy
      ct.rows_matmul(x_.reshape(n * k, i), w, v["r"], a_rows=k, out_rows=1,
                     scale=g.reshape(-1))                # eager: the spy sees arrays
    finally:
      ct.unscale_rows_checked = orig
      ct._CHECK_AIM_BELOW = before[1]
      if before[0] is None:
        os.environ.pop("CVMM_F16_SCALES")
      else:
        os.environ["CVMM_F16_SCALES"] = before[0]
    count = f"{repaired[0]}" if repaired else "(bound: no check)"
    print(f"| {label} | {count} | {t:.3f} | {dense / t:.0%} |", flush=True)

  row("bound", x, scales="bound")
  row("checked, estimate right", x)
  for share in [float(s) for s in a.shares.split(",") if s]:
    m = int(round(share * n))
    idx = np.random.default_rng(0).choice(n, m, replace=False)
    row(f"checked, {share:g} of the tokens missed", x.at[idx, k - 1].multiply(2.0 ** 16))
  row("checked, every row (estimate 2^20 too low)", x, aim=-20)


if __name__ == "__main__":
  main(sys.argv[1:])
