"""Checks and times the Mosaic GPU row kernel's epilogue (kernels/cvmm_mosaic/common.py:
stored and added rows: stored rows written by every thread in 16-byte pieces, float32
sums added by one TMA reduction a row, 16-bit sums by every thread's vector atomics) at
MoEUT_244M's shapes: the four CVMM projections of a layer
with bench/cvmm.py's inputs and routings (65,536 tokens, bfloat16):

  CVMM_AUTOTUNE=0 python3 -m bench.mosaic_epilogue_check    # about 4 minutes on an H100

The row kernel's writes, by projection (forward; backward dx):
  up    stored [P, Es]                  added into dx [N, D]
  down  added into [N, D] (gated)       stored [P, Es], with dgates
  V     stored [P, Dh] (then summed)    added into dx [N, D]
  O     added into [N, D] (gated)       added into [N, H, Dh], with dgates
Sums of added rows in scaled float16 (the default ``sum_dtype``), float32 and bfloat16.

Each forward and its gradients (x, w, gates) through cvmm_mosaic and, where available,
through the Triton path with the same sum dtype are compared with XLA's (impl="xla") on
the inputs in float32: relative error (norm) and largest absolute error of each. A
Mosaic result is bad where its relative error is above the tolerance of its sums, or
above twice the Triton path's plus 1e-3 (a yardstick that sums the same way). Then the
median times of both, forward and forward+backward, on the same device in the same run.
One line per (projection, sums); a failure prints its traceback and the next one runs.
"""
from __future__ import annotations

import argparse
import sys
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from bench.cvmm import _cotangent, _dot, _time, projections
from kernels import CvmmConfig, cvmm, is_available
from moeut_jax import profiles

_TOL = {"float16": 1e-2, "float32": 1e-2, "bfloat16": 2e-2}   # relative error (norm) against XLA, float32


def _fns(config: CvmmConfig, gated: bool, out_rows: int):
  """Jitted forward and forward+backward (value and gradients of x, w[, gates])."""
  def fwd(x, r, w, g):
    return cvmm(x, r, w, g, out_rows=out_rows, config=config) if gated else cvmm(
        x, r, w, config=config)

  argn = (0, 1, 2) if gated else (0, 1)
  grads = jax.grad(lambda x, w, g, r, ct: _dot(fwd(x, r, w, g), ct), argnums=argn)
  return jax.jit(fwd), jax.jit(lambda x, r, w, g, ct: (fwd(x, r, w, g), *grads(x, w, g, r, ct)))


def _errors(got, ref):
  """[(relative error (norm), largest absolute error)] of each array, in float64."""
  out = []
  for a, b in zip(got, ref):
    a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
    b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
    out.append((float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)),
                float(np.max(np.abs(a - b)))))
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--projs", default="up,down,V,O")
  ap.add_argument("--sums", default="float16,float32,bfloat16")
  ap.add_argument("--tokens", type=int, default=64 * 1024)
  a = ap.parse_args(argv)
  triton = is_available("triton")
  print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}, MoEUT_244M, "
        f"{a.tokens} tokens, bf16; Triton {'timed' if triton else 'not available'}",
        flush=True)
  projs = projections(profiles.get("MoEUT_244M"), a.tokens, jnp.bfloat16)
  f32 = lambda v: None if v is None else v.astype(jnp.float32)  # noqa: E731
  failed = 0
  for name in a.projs.split(","):
    v = projs[name]
    gated, out_rows = v["g"] is not None, v.get("out_rows", 1)
    args = (v["x"], v["r"], v["w"], v["g"])
    names = ["out", "dx", "dw"] + (["dgates"] if gated else [])
    try:
      fwd_x, fb_x = _fns(CvmmConfig(impl="xla"), gated, out_rows)
      ct = _cotangent(jax.eval_shape(fwd_x, *args).shape, jnp.bfloat16)
      ref = fb_x(f32(v["x"]), v["r"], f32(v["w"]), f32(v["g"]), ct)
    except Exception:  # report every failure in full and go on
      failed += 1
      print(f"FAIL {name} XLA reference", flush=True)
      traceback.print_exc()
      continue
    for sums in a.sums.split(","):
      label = f"{name:4s} {sums:8s} sums"
      t_triton = e_triton = None
      if triton:
        try:
          fwd_t, fb_t = _fns(CvmmConfig(impl="triton", sum_dtype=sums), gated, out_rows)
          e_triton = _errors(jax.block_until_ready(fb_t(*args, ct)), ref)
          t_triton = (_time(fwd_t, *args), _time(fb_t, *args, ct))
        except Exception:
          print(f"FAIL {label} Triton (not counted: the yardstick)", flush=True)
          traceback.print_exc()
      try:
        fwd_m, fb_m = _fns(CvmmConfig(impl="mosaic", sum_dtype=sums), gated, out_rows)
        errs = _errors(jax.block_until_ready(fb_m(*args, ct)), ref)
        t_mosaic = (_time(fwd_m, *args), _time(fb_m, *args, ct))
      except Exception:
        failed += 1
        print(f"FAIL {label}", flush=True)
        traceback.print_exc()
        sys.stderr.flush()
        continue
      ok = all(rel <= _TOL[sums] for rel, _ in errs)
      if e_triton is not None:
        ok = ok and all(rel <= 2 * rt + 1e-3 for (rel, _), (rt, _) in zip(errs, e_triton))
      failed += not ok
      err_text = "  ".join(f"{n} {rel:.1e} (max {mx:.1e})" for n, (rel, mx) in zip(names, errs))
      if e_triton is not None:
        err_text += "  [triton " + " ".join(f"{rel:.1e}" for rel, _ in e_triton) + "]"
      time_text = (f"mosaic fwd {t_mosaic[0] * 1e3:.3f} ms, fwd+bwd {t_mosaic[1] * 1e3:.3f} ms")
      if t_triton is not None:
        time_text += (f"; triton fwd {t_triton[0] * 1e3:.3f} ms, fwd+bwd "
                      f"{t_triton[1] * 1e3:.3f} ms; mosaic/triton fwd "
                      f"{t_mosaic[0] / t_triton[0]:.2f}x, fwd+bwd "
                      f"{t_mosaic[1] / t_triton[1]:.2f}x")
      print(f"{'ok  ' if ok else 'BAD '} {label}  rel err {err_text}  |  {time_text}",
            flush=True)
  print(f"# {failed} failed", flush=True)
  return failed


if __name__ == "__main__":
  sys.exit(1 if main(sys.argv[1:]) else 0)
