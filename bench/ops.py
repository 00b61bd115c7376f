"""Timings and errors of the model's non-CVMM pieces, one variant against another.

  python -m bench.ops --profile MoEUT_244M --batch 16 --seq 1024

Prints one table per piece, forward and forward+backward ms (median of --iters rounds):
  attention  the attention core softmax(q k^T) v, causal: XLA vs cuDNN (fused), and
             the relative difference of their outputs and gradients;
  router     the σ-MoE and SwitchHead router logits x @ sel in float32: one float32
             product (HIGHEST), XLA's default (TF32), and the model's bf16x3 product
             (moeut_jax.routing.router_logits), with the relative error against float64
             and how many tokens' top-k sets differ from float64's;
  top-k      jax.lax.top_k of the σ-MoE router's sigmoid;
  sort       make_routing's sort of the (token, slot) pairs by expert.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from moeut_jax import profiles  # noqa: E402
from kernels.autotune import time_call  # noqa: E402
from moeut_jax.routing import router_logits  # noqa: E402


def bench(fn, *args, iters=20):
  """(seconds per call of a jitted fn, its output): the autotuner's timer
  (:func:`kernels.autotune.time_call`), ``iters`` rounds of back-to-back calls."""
  out = fn(*args)
  return time_call(lambda: fn(*args), reps=iters), out


def rel(a, b):
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def attention(b, t, h, dh, iters):
  ks = jax.random.split(jax.random.PRNGKey(0), 4)
  q, k, v, g = (jax.random.normal(kk, (b, t, h, dh), jnp.bfloat16) for kk in ks)
  print(f"\nattention core  q, k, v [{b}, {t}, {h}, {dh}] bf16, causal")
  print(f"{'impl':>8} {'fwd ms':>8} {'fwd+bwd ms':>11} {'out diff':>9} {'dq diff':>8}")
  res = {}
  for impl in ("xla", "cudnn"):
    def f(q, k, v, impl=impl):
      return jax.nn.dot_product_attention(q, k, v, scale=dh ** -0.5, is_causal=True,
                                          implementation=impl)

    def loss(q, k, v, f=f):
      return jnp.sum(f(q, k, v).astype(jnp.float32) * g.astype(jnp.float32))
    try:
      tf, out = bench(jax.jit(f), q, k, v, iters=iters)
      tb, grads = bench(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), q, k, v, iters=iters)
    except Exception as e:  # report and go on
      print(f"{impl:>8} failed: {type(e).__name__}: {str(e)[:200]}")
      continue
    res[impl] = (out, grads)
    d_out = rel(out, res["xla"][0]) if "xla" in res else 0.0
    d_dq = rel(grads[0], res["xla"][1][0]) if "xla" in res else 0.0
    print(f"{impl:>8} {tf * 1e3:8.3f} {tb * 1e3:11.3f} {d_out:9.2e} {d_dq:8.2e}")


ALGORITHMS = ("highest", "default", "router_logits")


def _precision(name):
  if name == "router_logits":  # the model's router product in 16-bit compute (bf16x3)
    return None
  if name == "highest":
    return jax.lax.Precision.HIGHEST
  if name == "default":
    return jax.lax.Precision.DEFAULT
  return getattr(jax.lax.DotAlgorithmPreset, name)


def router(n, d, e, k, iters, bf16_src, heads=1):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((n, d), dtype=np.float32)
  if bf16_src:  # the model's router input is a bf16 activation cast to float32
    x = np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))
  w = (rng.standard_normal((d, e), dtype=np.float32) / np.sqrt(d)).astype(np.float32)
  gy = rng.standard_normal((n, e), dtype=np.float32)
  ref = x.astype(np.float64) @ w.astype(np.float64)
  ref_dx = gy.astype(np.float64) @ w.T.astype(np.float64)
  def topk_sets(y):  # top-k per head: [n * heads, k]
    return np.sort(np.argsort(-np.asarray(y).reshape(n * heads, e // heads), axis=1)[:, :k], axis=1)
  ref_top = topk_sets(ref)
  print(f"\nrouter logits  x [{n}, {d}] @ sel [{d}, {e}] float32"
        f"{' (x bf16-valued)' if bf16_src else ''}, top-{k}"
        f"{f' of each of {heads} heads' if heads > 1 else ''}")
  print(f"{'algorithm':>18} {'fwd ms':>8} {'fwd+bwd ms':>11} {'rel err':>9} {'dx err':>9} "
        f"{'top-k sets differing':>21}")
  xj, wj, gj = jnp.asarray(x), jnp.asarray(w), jnp.asarray(gy)
  for name in ALGORITHMS:
    prec = _precision(name)

    def f(x, w, prec=prec):
      if prec is None:
        return router_logits(x, w, jnp.bfloat16)
      return jnp.einsum("ND,DE->NE", x, w, precision=prec, preferred_element_type=jnp.float32)

    def fb(x, w, f=f):
      y, vjp = jax.vjp(f, x, w)
      return (y,) + vjp(gj)
    try:
      tf, y = bench(jax.jit(f), xj, wj, iters=iters)
      tb, (_, dx, _) = bench(jax.jit(fb), xj, wj, iters=iters)
    except Exception as err:  # report and go on
      print(f"{name:>18} failed: {type(err).__name__}: {str(err)[:200]}")
      continue
    differ = np.mean(np.any(topk_sets(y) != ref_top, axis=1))
    print(f"{name:>18} {tf * 1e3:8.3f} {tb * 1e3:11.3f} {rel(y, ref):9.2e} "
          f"{rel(dx, ref_dx):9.2e} {differ:21.2%}")


def topk_and_sort(n, e, k, iters):
  from kernels.routing import make_routing
  from kernels.topk import topk_indices
  logits = jax.random.normal(jax.random.PRNGKey(3), (n, e), jnp.float32)
  tk, (_, idx) = bench(jax.jit(lambda s: jax.lax.top_k(jax.nn.sigmoid(s), k)), logits,
                       iters=iters)
  tt, idx2 = bench(jax.jit(lambda s: topk_indices(jax.nn.sigmoid(s), k)), logits, iters=iters)
  same = bool(jnp.all(idx == idx2))
  print(f"\ntop-k  [{n}, {e}] float32, k={k}: jax.lax.top_k {tk * 1e3:.3f} ms, "
        f"kernels.topk {tt * 1e3:.3f} ms (same indices: {same})")
  ts, _ = bench(jax.jit(lambda i: make_routing(i, e)), idx, iters=iters)
  print(f"make_routing  [{n}, {k}] pairs, {e} experts (order, sizes, offsets): "
        f"{ts * 1e3:.3f} ms")


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--profile", default="MoEUT_244M", choices=profiles.ALL_PROFILES)
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--seq", type=int, default=1024)
  ap.add_argument("--iters", type=int, default=20)
  ap.add_argument("--parts", default="attention,router,topk")
  a = ap.parse_args()
  p = profiles.get(a.profile)
  n = a.batch * a.seq
  parts = a.parts.split(",")
  print(f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}; {a.profile}, "
        f"batch {a.batch} x {a.seq}")
  if "attention" in parts:
    attention(a.batch, a.seq, p["n_heads"], p["d_head"], a.iters)
  if "router" in parts:
    router(n, p["d_model"], p["ff_n_experts"], p["ff_k"], a.iters, bf16_src=False)
    router(n, p["d_model"], p["n_heads"] * p["att_n_experts"], p["att_k"], a.iters,
           bf16_src=False, heads=p["n_heads"])
  if "topk" in parts:
    topk_and_sort(n, p["ff_n_experts"], p["ff_k"], a.iters)


if __name__ == "__main__":
  main()
