"""Training-step throughput of MoEUTLM: forward + backward + AdamW update, bf16 compute.

  python bench/model.py --profile MoEUT_244M --batch 16 --seq 1024 --impl auto xla
  python bench/model.py --devices 2            # data parallel, as train.py runs it

Prints one row per CVMM implementation: step time (median of --steps after warm-up)
and tokens/s. Random tokens, vocabulary 8000. With --devices N the batch is --batch
sequences per device, the parameters and optimizer state are split FSDP-style and the
step runs under the context mesh, as in train.py; --no-context-mesh leaves the mesh
out of the context, so that XLA partitions the expert layers by itself (for comparison);
--replicated keeps a whole copy of the parameters and optimizer state on every device
(plain data parallel: no parameter gathers, one gradient all-reduce).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
import optax

from moeut_jax import profiles
from kernels import CvmmConfig, resolve
from moeut_jax import MoEUTLM


def make_step(profile: str, batch: int, seq: int, impl: str, mesh=None,
              replicated: bool = False, sum_dtype: str = "float16", **model_kw):
  """(jitted train_step, params, opt_state, tokens) of MoEUTLM on random tokens.

  train_step(params, state, toks) -> (params, state, loss): forward, backward and the
  AdamW update, bf16 compute with float32 parameters. With a ``mesh`` the tokens are
  split over its "data" axis and the parameters and optimizer state FSDP-style (or
  copied to every device when ``replicated``).
  """
  model = MoEUTLM(8000, **profiles.get(profile), dtype=jnp.bfloat16,
                  cvmm=CvmmConfig(impl=impl, sum_dtype=sum_dtype), **model_kw)
  toks = jax.random.randint(jax.random.PRNGKey(0), (batch, seq + 1), 0, 8000)
  params = jax.jit(model.init)(jax.random.PRNGKey(1), toks[:, :-1])["params"]
  opt = optax.adamw(2.5e-4, weight_decay=0.01)
  state = opt.init(params)
  jit = jax.jit
  if mesh is not None:
    from jax.sharding import NamedSharding, PartitionSpec  # noqa: PLC0415
    from moeut_jax.training.sharding import DATA_AXIS, fsdp_shardings  # noqa: PLC0415
    if replicated:
      rep = NamedSharding(mesh, PartitionSpec())
      p_sh, s_sh = jax.tree.map(lambda _: rep, params), jax.tree.map(lambda _: rep, state)
    else:
      p_sh, s_sh = fsdp_shardings(params, mesh), fsdp_shardings(state, mesh)
    t_sh = NamedSharding(mesh, PartitionSpec(DATA_AXIS))
    params, state, toks = (jax.device_put(params, p_sh), jax.device_put(state, s_sh),
                           jax.device_put(toks, t_sh))
    jit = lambda f: jax.jit(f, in_shardings=(p_sh, s_sh, t_sh),  # noqa: E731
                            out_shardings=(p_sh, s_sh, None))

  @jit
  def train_step(params, state, toks):
    def loss_fn(p):
      out = model.apply({"params": p}, toks[:, :-1], train=True)
      ce = optax.softmax_cross_entropy_with_integer_labels(
          out.outputs.astype(jnp.float32), toks[:, 1:]).mean()
      return ce + out.reg_loss
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  return train_step, params, state, toks


def step_time(profile: str, batch: int, seq: int, impl: str, steps: int, mesh=None,
              replicated: bool = False, **model_kw):
  """(median step seconds, last loss, seconds of the first call: compile + one step)."""
  train_step, params, state, toks = make_step(profile, batch, seq, impl, mesh, replicated,
                                              **model_kw)
  t0 = time.perf_counter()
  params, state, loss = train_step(params, state, toks)
  jax.block_until_ready(loss)
  first = time.perf_counter() - t0
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    params, state, loss = train_step(params, state, toks)
    jax.block_until_ready(loss)
    times.append(time.perf_counter() - t0)
  if not np.isfinite(float(loss)):
    raise RuntimeError(f"non-finite loss {float(loss)} with impl={impl}")
  return float(np.median(times)), float(loss), first


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--profile", default="MoEUT_244M", choices=profiles.ALL_PROFILES)
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--seq", type=int, default=1024)
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--impl", nargs="+", default=["auto"])
  ap.add_argument("--scan-unroll", type=int, default=None,
                  help="MoEUTLM(scan_unroll=...); default None: unrolled on GPUs")
  ap.add_argument("--devices", type=int, default=1,
                  help="data-parallel devices; --batch is per device")
  ap.add_argument("--no-context-mesh", action="store_true",
                  help="with --devices > 1: jit with shardings but no jax.set_mesh")
  ap.add_argument("--replicated", action="store_true",
                  help="with --devices > 1: parameters and optimizer state on every device "
                       "instead of split FSDP-style")
  args = ap.parse_args()
  n_dev = args.devices
  if not 1 <= n_dev <= len(jax.devices()):
    ap.error(f"--devices {n_dev}: this machine has {len(jax.devices())}")
  batch = args.batch * n_dev
  mesh = None
  if n_dev > 1:
    from jax.sharding import Mesh  # noqa: PLC0415
    from moeut_jax.training.sharding import DATA_AXIS  # noqa: PLC0415
    mesh = Mesh(np.asarray(jax.devices()[:n_dev]), (DATA_AXIS,))
  use_mesh = mesh is not None and not args.no_context_mesh
  print(f"device: {n_dev} x {jax.devices()[0].device_kind}; jax {jax.__version__}; "
        f"{args.profile}, batch {batch} x {args.seq}"
        + (f" ({args.batch} per device, context mesh {not args.no_context_mesh}, "
           f"parameters {'replicated' if args.replicated else 'FSDP'})"
           if n_dev > 1 else "") + f", scan_unroll {args.scan_unroll}")
  print(f"{'impl':>14} {'resolved':>14} {'step ms':>10} {'tokens/s':>12} {'per device':>11} "
        f"{'last loss':>10} {'first call s':>13}")
  for impl in args.impl:
    try:
      with jax.set_mesh(mesh) if use_mesh else contextlib.nullcontext():
        t, loss, first = step_time(args.profile, batch, args.seq, impl, args.steps, mesh,
                                   args.replicated, scan_unroll=args.scan_unroll)
      tps = batch * args.seq / t
      print(f"{impl:>14} {resolve(impl):>14} {t * 1e3:10.1f} {tps:12.0f} {tps / n_dev:11.0f} "
            f"{loss:10.4f} {first:13.1f}", flush=True)
    except Exception as e:  # report and go on with the next implementation
      print(f"{impl:>14} failed: {type(e).__name__}: {str(e)[:300]}")


if __name__ == "__main__":
  main()
