"""One run of every Mosaic GPU CVMM kernel on a small problem, each checked against XLA
and reported on its own (a failure prints its whole traceback and the next one runs):

  python3 -m bench.mosaic_probe          # about a minute on an H100, mostly compiles

Kernels: the row kernel stored (forward), added with gates (gated forward, float32 and
bfloat16 sums), transposed and added (dx), transposed with gates and dgates (gated dx),
the weight gradient; then cvmm_mosaic forward and gradients against the reference.
Tiles: each kernel's heuristic first candidate and its two-warpgroup and one-warpgroup
variants (block_m 128 and 64).
"""
from __future__ import annotations

import dataclasses
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np


def _rel(a, b):
  a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
  b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def main():
  from kernels import cvmm_mosaic as cm, make_routing  # noqa: PLC0415
  from kernels.cvmm_mosaic.gram import expert_gram, gram_candidates  # noqa: PLC0415
  from kernels.cvmm_mosaic.rows import rows_candidates, rows_matmul  # noqa: PLC0415
  from kernels.cvmm_reference import cvmm_reference  # noqa: PLC0415
  print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}, "
        f"mosaic available: {cm.is_available()}", flush=True)
  n, k, e, i, o = 1000, 4, 16, 256, 192
  ks = jax.random.split(jax.random.key(0), 6)
  r = make_routing(jax.lax.top_k(jax.random.normal(ks[0], (n, e)), k)[1], e)
  x = jax.random.normal(ks[1], (n, i)).astype(jnp.bfloat16)
  xk = jax.random.normal(ks[1], (n * k, i)).astype(jnp.bfloat16)
  w = (jax.random.normal(ks[2], (e, i, o)) * i ** -0.5).astype(jnp.bfloat16)
  g = jax.random.uniform(ks[3], (n * k,))
  dy = jax.random.normal(ks[4], (n * k, o)).astype(jnp.bfloat16)
  dout = jax.random.normal(ks[5], (n, o)).astype(jnp.bfloat16)
  ex = r.expert_index.reshape(-1)
  f32 = lambda v: v.astype(jnp.float32)  # noqa: E731
  hi = jax.lax.Precision.HIGHEST
  y_ref = jnp.einsum("pi,pio->po", f32(x)[jnp.arange(n * k) // k], f32(w)[ex], precision=hi)
  t_ref = jnp.einsum("po,pio->pi", f32(dout)[jnp.arange(n * k) // k], f32(w)[ex],
                     precision=hi)                                       # dout @ W^T
  dyw = jnp.einsum("po,pio->pi", f32(dy), f32(w)[ex], precision=hi)
  dw_ref = jnp.zeros((e, i, o)).at[ex].add(
      jnp.einsum("pi,po->pio", f32(x)[jnp.arange(n * k) // k], f32(dy), precision=hi))
  cases = {
      "rows fwd (stored)": (lambda cfg: rows_matmul(x, w, r, a_rows=1, out_rows=k, cfg=cfg)[0],
                            y_ref, rows_candidates(o, 2, False)),
      "rows gated fwd f32 sums": (
          lambda cfg: rows_matmul(x, w, r, a_rows=1, out_rows=1, scale=g, cfg=cfg)[0],
          (y_ref * g[:, None]).reshape(n, k, o).sum(1), rows_candidates(o, 4, False)),
      "rows gated fwd bf16 sums": (
          lambda cfg: rows_matmul(x, w, r, a_rows=1, out_rows=1, scale=g,
                                  sum_dtype=jnp.bfloat16, cfg=cfg)[0],
          (y_ref * g[:, None]).reshape(n, k, o).sum(1), rows_candidates(o, 2, False)),
      "rows dx (W^T, added)": (
          lambda cfg: rows_matmul(dy, w, r, a_rows=k, out_rows=1, transpose_w=True,
                                  cfg=cfg)[0],
          dyw.reshape(n, k, i).sum(1), rows_candidates(i, 4, False)),
      "rows gated dx + dgates": (
          lambda cfg: rows_matmul(dout, w, r, a_rows=1, out_rows=k, transpose_w=True,
                                  scale=g, dgate_rows=xk, c_rows=k, cfg=cfg),
          (t_ref * g[:, None], jnp.sum(t_ref * f32(xk), axis=1)), rows_candidates(i, 2, True)),
      "gram dW": (lambda cfg: expert_gram(x, dy, r, a_rows=1, b_rows=k, out_dtype=jnp.float32,
                                          cfg=cfg), dw_ref, gram_candidates(o)),
  }
  failed = 0
  for name, (fn, ref, cands) in cases.items():
    tiles = [cands[0]] + [dataclasses.replace(cands[0], block_m=bm) for bm in (128, 64)
                          if bm != cands[0].block_m]
    for cfg in tiles:
      label = f"{name:26s} {cfg.block_m}x{cfg.block_n} s{cfg.num_stages}"
      try:
        t0 = time.perf_counter()
        got = jax.block_until_ready(jax.jit(lambda: fn(cfg))())
        dt = time.perf_counter() - t0
        errs = [_rel(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref))]
        ok = all(err < 2e-2 for err in errs)
        failed += not ok
        print(f"{'ok  ' if ok else 'BAD '} {label}  rel err {errs}  ({dt:.1f} s with compile)",
              flush=True)
      except Exception:  # report every failure in full and go on
        failed += 1
        print(f"FAIL {label}", flush=True)
        traceback.print_exc()
        sys.stderr.flush()
  for gated in (False, True):
    name = f"cvmm_mosaic {'gated' if gated else 'plain'} fwd+grads"
    try:
      xg = xk.reshape(n, k, i) if gated else x[:, None]
      gg = g.reshape(n, k) if gated else None
      ct = jax.random.normal(ks[5], (n, o) if gated else (n, k, o))

      def outs(f, xg, w, gg):
        loss = lambda *a: jnp.sum(f(*a).astype(jnp.float32) * ct)  # noqa: E731
        argn = (0, 1, 2) if gated else (0, 1)
        return (jax.jit(f)(xg, w, gg),) + jax.jit(jax.grad(loss, argnums=argn))(xg, w, gg)

      got = outs(lambda a, b, c: cm.cvmm_mosaic(a, r, b, c), xg, w, gg)
      ref = outs(lambda a, b, c: cvmm_reference(f32(a), r, f32(b), c), xg, w, gg)
      errs = [_rel(a, b) for a, b in zip(got, ref)]
      ok = all(err < 2e-2 for err in errs)
      failed += not ok
      print(f"{'ok  ' if ok else 'BAD '} {name}  rel err (out, dx, dw[, dgates]) {errs}",
            flush=True)
    except Exception:
      failed += 1
      print(f"FAIL {name}", flush=True)
      traceback.print_exc()
  print(f"# {failed} failed", flush=True)
  return failed


if __name__ == "__main__":
  sys.exit(1 if main() else 0)
