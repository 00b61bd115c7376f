"""Error of the σ-MoE pair's fused sums in float32, float16 and bf16 at a profile's shape.

  python -m bench.sum_precision --profile MoEUT_244M [--tokens 65536] [--ct-scale 1e-6]

bf16 inputs (weights scaled as at initialisation, softmax-like gates); the reference is
the same computation on the same values in float32 with float32 matmuls (XLA,
``precision="highest"``). Prints the relative error ||a - ref|| / ||ref|| of the output
and of every gradient (dx, dkeys, dvalues, dgates) for:
  triton       the fused kernels, float32 sums (the default)
  triton-f16   the same kernels with scaled float16 sums (sum_dtype="float16")
  triton-bf16  the same kernels with bf16 sums (sum_dtype="bfloat16")
  xla-bf16     XLA in bf16 (float32 accumulation inside each matmul, one rounding of
               each expert's product before the gated sum, as the PyTorch original)
  cvmm-f16-checked, cvmm-f16-bound
               two Triton cvmm calls (up, ReLU, gated down) with float16 sums whose
               row scales are checked estimates or bounds (CvmmConfig.f16_scales; the
               fused pair has scales of its own)
and how far two runs of the same call differ (atomics add in a varying order).
``--variants`` picks some of them (comma list).
``--ct-scale`` multiplies the output's cotangent (a trained model's gradients are
small: the float16 sums must scale them up, not lose them).
"""
from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

from moeut_jax import profiles
from bench.cvmm import projections
from kernels import CvmmConfig, cvmm, cvmm_pair


def _rel(a, b):
  a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
  b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _outs(impl, args, r, ct, sum_dtype="float32", scales=None):
  """(out, dx, dkeys, dvalues, dgates) of the pair with sums in ``sum_dtype``; with
  ``scales`` ("checked" or "bound": CvmmConfig.f16_scales) as two cvmm calls instead of
  the fused pair."""
  config = CvmmConfig(impl=impl, sum_dtype=sum_dtype, f16_scales=scales or "checked")

  def f(x, k_, v, g):
    if scales is None:
      return cvmm_pair(x, r, k_, v, g, config=config)
    u = jax.nn.relu(cvmm(x, r, k_, config=config))
    return cvmm(u, r, v, g, config=config)

  loss = lambda *a: jnp.sum(f(*a).astype(jnp.float32) * ct)  # noqa: E731
  out = jax.jit(f)(*args)
  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(*args)
  return (out,) + tuple(grads)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--profile", default="MoEUT_244M")
  ap.add_argument("--tokens", type=int, default=64 * 1024)
  ap.add_argument("--ct-scale", type=float, default=1.0)
  ap.add_argument("--variants", default="", help="comma list (default: every variant)")
  a = ap.parse_args(argv)
  prof = profiles.get(a.profile)
  pr = projections(prof, a.tokens, jnp.bfloat16)
  up, down = pr["up"], pr["down"]
  args = (up["x"], up["w"], down["w"], down["g"])
  r = up["r"]
  ct = jax.random.normal(jax.random.key(11), (a.tokens, prof["d_model"])) * a.ct_scale
  print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}, {a.profile}, "
        f"{a.tokens} tokens, bf16 inputs, cotangent x {a.ct_scale:g}", flush=True)
  with jax.default_matmul_precision("highest"):
    ref = _outs("xla", tuple(x.astype(jnp.float32) for x in args), r, ct)
  names = ["out", "dx", "dkeys", "dvalues", "dgates"]
  print("| variant | " + " | ".join(names) + " |")
  print("|---|" + "---:|" * len(names))
  runs = {}
  variants = (("triton", "triton", "float32", None),
              ("triton-f16", "triton", "float16", None),
              ("triton-bf16", "triton", "bfloat16", None),
              ("xla-bf16", "xla", "float32", None),
              ("cvmm-f16-checked", "triton", "float16", "checked"),
              ("cvmm-f16-bound", "triton", "float16", "bound"))
  wanted = set(filter(None, a.variants.split(","))) or {v[0] for v in variants}
  for label, impl, sd, scales in variants:
    if label not in wanted:
      continue
    try:
      got = _outs(impl, args, r, ct, sd, scales)
    except Exception as err:  # report, go on
      print(f"| {label} | FAILED {type(err).__name__}: {str(err)[:200]} |", flush=True)
      continue
    runs[label] = (impl, sd, scales, got)
    print(f"| {label} | " + " | ".join(f"{_rel(g, f):.2e}" for g, f in zip(got, ref)) + " |",
          flush=True)
  for label, (impl, sd, scales, got) in runs.items():
    if impl == "xla":                     # no atomics: the same every run
      continue
    again = _outs(impl, args, r, ct, sd, scales)
    print(f"| {label}, run 2 vs run 1 | "
          + " | ".join(f"{_rel(g2, g1):.1e}" for g2, g1 in zip(again, got)) + " |",
          flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])
