"""Times every CVMM implementation against a dense matmul with the same FLOPs.

  python -m bench.cvmm                                  # all profiles, every available impl
  python -m bench.cvmm --profiles MoEUT_244M --impls triton,mosaic --pair
  python -m bench.cvmm --check                          # also compare with the reference

Per profile (batch 64 x 1024 tokens; the 1B at 32 x 1024) it times the four CVMM
projections of MoEUT, forward and forward+backward (gradients of every float input):
  up    σ-MoE   cvmm(x [N, D], r, keys [E, D, Es])              K = ff_k
  down  σ-MoE   cvmm(u [N, K, Es], r, values [E, Es, D], gates)  (weighted sum fused)
  V     SwitchHead cvmm(x [N, D], r_v, v [H*Ea, D, Dh], gates [N, H*att_k], out_rows=H)
        (each head's att_k experts summed with their gates: [N, H, Dh])
  O     SwitchHead cvmm(att [N, H, Dh], r_o, o [H*Ea, Dh, D], gates [N, H*att_k])
and "dense", one [P, I] @ [I, O] matmul with the same FLOPs (P = N*K pairs).
``--pair`` adds the σ-MoE pair (up, ReLU, gated down) as one function. Routing is
random top-k of random logits (roughly balanced) and is computed outside the timing;
SwitchHead's routings carry unit pairs (kernels.routing.UnitPairs: O's forward and V's
dx then add a head's two experts before one reduction, O's dx stores each head's row
once) where the library's default gives them (on GPUs from 2^18 (token, head) units);
``--unit-pairs`` gives them always.
Times are medians over rounds of back-to-back calls, synchronised at the end of each
round. Prints a table; ``--json`` writes all figures.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from moeut_jax import profiles
import kernels
from kernels import cvmm, cvmm_pair, is_available, make_head_routing, make_routing


def _time(fn, *args, rounds: int = 5, calls: int = 10) -> float:
  """Median seconds per call."""
  jax.block_until_ready(fn(*args))
  jax.block_until_ready(fn(*args))
  per = []
  for _ in range(rounds):
    t0 = time.perf_counter()
    out = None
    for _ in range(calls):
      out = fn(*args)
    jax.block_until_ready(out)
    per.append((time.perf_counter() - t0) / calls)
  return statistics.median(per)


def _topk_routing(key, n, k, e):
  _, idx = jax.lax.top_k(jax.random.normal(key, (n, e)), k)
  return make_routing(idx, e)


def _head_routing(key, n, heads, experts, k, unit_pairs=None):
  """SwitchHead: each head picks k of its own experts; expert id = h * experts + j.
  unit_pairs: see :func:`kernels.make_head_routing` (None: the library's default)."""
  _, idx = jax.lax.top_k(jax.random.normal(key, (n, heads, experts)), k)   # [N, H, k]
  return make_head_routing(idx, experts, unit_pairs=unit_pairs)


def projections(profile: dict, n: int, dtype, seed: int = 0, unit_pairs=None):
  """name -> (args, routing, gates?, flops) for the four CVMM calls of one layer
  (``unit_pairs``: whether SwitchHead's routing carries unit pairs; None: the
  library's default)."""
  d, es, e, k = (profile["d_model"], profile["ff_expert_size"], profile["ff_n_experts"],
                 profile["ff_k"])
  h, ea, dh, ka = (profile["n_heads"], profile["att_n_experts"], profile["d_head"],
                   profile["att_k"])
  ks = jax.random.split(jax.random.key(seed), 12)
  nrm = lambda key, shape, scale=1.0: (jax.random.normal(key, shape) * scale).astype(dtype)  # noqa: E731
  r = _topk_routing(ks[0], n, k, e)
  rh = _head_routing(ks[1], n, h, ea, ka, unit_pairs)
  x = nrm(ks[2], (n, d))
  out = {
      "up": dict(x=x, w=nrm(ks[3], (e, d, es), d ** -0.5), r=r, g=None,
                 dense=(n * k, d, es)),
      "down": dict(x=nrm(ks[4], (n, k, es)), w=nrm(ks[5], (e, es, d), es ** -0.5), r=r,
                   g=jax.nn.softmax(jax.random.normal(ks[6], (n, k))).astype(dtype),
                   dense=(n * k, es, d)),
      "V": dict(x=x, w=nrm(ks[7], (h * ea, d, dh), d ** -0.5), r=rh,
                g=jax.random.uniform(ks[11], (n, h * ka)).astype(dtype), out_rows=h,
                dense=(n * h * ka, d, dh)),
      "O": dict(x=nrm(ks[8], (n, h, dh)), w=nrm(ks[9], (h * ea, dh, d), dh ** -0.5), r=rh,
                g=jax.random.uniform(ks[10], (n, h * ka)).astype(dtype),
                dense=(n * h * ka, dh, d)),
  }
  for v in out.values():
    p, i, o = v["dense"]
    v["flops"] = 2 * p * i * o
  return out


def _fwd_fn(impl, gated, out_rows=1):
  if gated:
    return jax.jit(lambda x, r, w, g: cvmm(x, r, w, g, out_rows=out_rows, impl=impl))
  return jax.jit(lambda x, r, w, g: cvmm(x, r, w, impl=impl))


def _cotangent(shape, dtype, key=jax.random.key(11)):
  """A random output cotangent, passed to the timed function as an argument: a constant
  one (say, the gradient of sum(y)) lets XLA fold work on it into the compilation (the
  float16 sums' row maxima of dy), which would then not be timed."""
  return (jax.random.normal(key, shape) * 1e-3).astype(dtype)


def _dot(y, ct):
  """The loss whose gradient with respect to y is the cotangent ct."""
  return jnp.sum(y.astype(jnp.float32) * ct.astype(jnp.float32))


def _fwdbwd_fn(impl, gated, out_rows=1):
  def loss(x, w, g, r, ct):
    y = (cvmm(x, r, w, g, out_rows=out_rows, impl=impl) if gated
         else cvmm(x, r, w, impl=impl))
    return _dot(y, ct)
  argn = (0, 1, 2) if gated else (0, 1)
  vg = jax.value_and_grad(loss, argnums=argn)
  return jax.jit(lambda x, r, w, g, ct: vg(x, w, g, r, ct))


def _dense(p, i, o, dtype, key):
  a = jax.random.normal(key, (p, i)).astype(dtype)
  b = (jax.random.normal(jax.random.fold_in(key, 1), (i, o)) * i ** -0.5).astype(dtype)
  fwd = jax.jit(lambda a, b: a @ b)
  fb = jax.jit(jax.value_and_grad(lambda a, b, ct: _dot(a @ b, ct), argnums=(0, 1)))
  return _time(fwd, a, b), _time(fb, a, b, _cotangent((p, o), dtype))


def _rel(a, b):
  a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
  b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def pair_fns(impl):
  """σ-MoE pair: relu(cvmm(x, keys)) then gated cvmm with values (:func:`cvmm_pair`)."""
  def pair(x, keys, values, gates, r):
    # relu(cvmm(x, keys)) then gated cvmm with values: fused for "triton"
    return cvmm_pair(x, r, keys, values, gates, impl=impl)            # [N, D]

  fwd = jax.jit(lambda x, k_, v, g, r: pair(x, k_, v, g, r))
  fb = jax.jit(jax.value_and_grad(lambda x, k_, v, g, r, ct: _dot(pair(x, k_, v, g, r), ct),
                                  argnums=(0, 1, 2, 3)))
  return fwd, fb


def run(profile_names, impls, dtype, pair, check, batch_tokens, log, unit_pairs=None):
  rows = []
  for pname in profile_names:
    prof = profiles.get(pname)
    n = batch_tokens // 2 if pname == "MoEUT_1B" else batch_tokens
    projs = projections(prof, n, dtype, unit_pairs=unit_pairs)
    for name, v in projs.items():
      gated = v["g"] is not None
      rows_out = v.get("out_rows", 1)
      p, i, o = v["dense"]
      dfw, dfb = _dense(p, i, o, dtype, jax.random.key(7))
      rows.append(dict(profile=pname, proj=name, impl="dense", fwd=dfw, fwdbwd=dfb,
                       flops=v["flops"], shape=f"{p}x{i}->{o}"))
      log(f"{pname:11s} {name:5s} dense  fwd {dfw * 1e3:8.3f} ms  fwd+bwd {dfb * 1e3:8.3f} ms")
      for impl in impls:
        args = (v["x"], v["r"], v["w"], v["g"])
        try:
          fwd = _fwd_fn(impl, gated, rows_out)
          tf = _time(fwd, *args)
          ct = _cotangent(jax.eval_shape(fwd, *args).shape, dtype)
          tb = _time(_fwdbwd_fn(impl, gated, rows_out), *args, ct)
        except Exception as err:  # report and go on: one failing impl must not hide the rest
          log(f"{pname:11s} {name:5s} {impl:6s} FAILED {type(err).__name__}: {str(err)[:300]}")
          traceback.print_exc()   # the whole error on stderr
          rows.append(dict(profile=pname, proj=name, impl=impl, error=str(err)[:300]))
          continue
        row = dict(profile=pname, proj=name, impl=impl, fwd=tf, fwdbwd=tb, flops=v["flops"],
                   fwd_vs_dense=dfw / tf, fwdbwd_vs_dense=dfb / tb)
        if check:
          ref = _fwd_fn("xla", gated, rows_out)(*args)
          row["rel_err_fwd_vs_xla"] = _rel(_fwd_fn(impl, gated, rows_out)(*args), ref)
        rows.append(row)
        log(f"{pname:11s} {name:5s} {impl:6s} fwd {tf * 1e3:8.3f} ms ({dfw / tf:5.0%} of dense)"
            f"  fwd+bwd {tb * 1e3:8.3f} ms ({dfb / tb:5.0%})"
            + (f"  err {row['rel_err_fwd_vs_xla']:.1e}" if check else ""))
    if pair:
      up, down = projs["up"], projs["down"]
      for impl in impls:
        fwd, fb = pair_fns(impl)
        args = (up["x"], up["w"], down["w"], down["g"], up["r"])
        try:
          ct = _cotangent((up["x"].shape[0], down["w"].shape[2]), dtype)
          tf, tb = _time(fwd, *args), _time(fb, *args, ct)
        except Exception as err:
          log(f"{pname:11s} pair  {impl:6s} FAILED {type(err).__name__}: {str(err)[:300]}")
          traceback.print_exc()
          rows.append(dict(profile=pname, proj="pair", impl=impl, error=str(err)[:300]))
          continue
        rows.append(dict(profile=pname, proj="pair", impl=impl, fwd=tf, fwdbwd=tb))
        log(f"{pname:11s} pair  {impl:6s} fwd {tf * 1e3:8.3f} ms  fwd+bwd {tb * 1e3:8.3f} ms")
  return rows


def table(rows) -> str:
  out = ["| profile | proj | impl | fwd ms | fwd % dense | fwd+bwd ms | fwd+bwd % dense |",
         "|---|---|---|---:|---:|---:|---:|"]
  for r in rows:
    if "error" in r:
      out.append(f"| {r['profile']} | {r['proj']} | {r['impl']} | failed | | | |")
      continue
    fd = f"{r['fwd_vs_dense']:.0%}" if "fwd_vs_dense" in r else ""
    bd = f"{r['fwdbwd_vs_dense']:.0%}" if "fwdbwd_vs_dense" in r else ""
    out.append(f"| {r['profile']} | {r['proj']} | {r['impl']} | {r['fwd'] * 1e3:.3f} | {fd} "
               f"| {r['fwdbwd'] * 1e3:.3f} | {bd} |")
  return "\n".join(out)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--profiles", default=",".join(profiles.PAPER_PROFILES))
  ap.add_argument("--impls", default="", help="comma list; default: every available one")
  ap.add_argument("--dtype", default="bfloat16")
  ap.add_argument("--tokens", type=int, default=64 * 1024)
  ap.add_argument("--pair", action="store_true")
  ap.add_argument("--check", action="store_true")
  ap.add_argument("--unit-pairs", action="store_true",
                  help="SwitchHead routings always with unit pairs (default: the library's "
                       "choice, kernels.routing.unit_pairs_wanted)")
  ap.add_argument("--json", default="")
  ap.add_argument("--tune-log", default="", help="file for the autotuner's timings")
  a = ap.parse_args(argv)
  impls = [s for s in a.impls.split(",") if s] or [
      s for s in ("xla", "triton", "triton_unfused", "mosaic") if is_available(s)]
  print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}, impls {impls}, "
        f"16-bit sums {kernels.DEFAULT.sum_dtype}, unit pairs "
        f"{'always' if a.unit_pairs else 'the default (from 2^18 units)'}", flush=True)
  tune_log = open(a.tune_log, "w") if a.tune_log else None  # noqa: SIM115
  if tune_log is not None:
    from kernels import autotune  # noqa: PLC0415
    autotune.tuner().log_stream = tune_log    # each timing as it is made
  rows = run([s for s in a.profiles.split(",") if s], impls, jnp.dtype(a.dtype), a.pair,
             a.check, a.tokens, lambda s: print(s, flush=True),
             unit_pairs=True if a.unit_pairs else None)
  print(table(rows))
  if a.json:
    with open(a.json, "w") as f:
      json.dump(rows, f, indent=1)
  if tune_log is not None:
    tune_log.close()
  return rows


if __name__ == "__main__":
  main(sys.argv[1:])
