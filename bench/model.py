"""Training-step throughput of MoEUTLM: forward + backward + AdamW update, bf16 compute.

  python bench/model.py --profile MoEUT_244M --batch 16 --seq 1024 --impl auto xla
  python bench/model.py --devices 2            # data parallel, as train.py runs it
  python bench/model.py --batch 64 --remat full --grad-clip 0.25 \
      --torch-original ../shared/original      # and the official PyTorch step, same GPU
  python bench/model.py --batch 64 --remat elementwise --grad-clip 0.25 --warmup 2

--remat takes moeut_jax/remat.py's policies (what they keep: bench/residuals.py).

Prints one row per CVMM implementation: step time (median of --steps after the first
call and --warmup more untimed steps), tokens/s and the peak device memory
(``memory_stats()["peak_bytes_in_use"]``, the largest over the devices used; n/a where
the backend keeps no statistics, e.g. CPUs). The peak is the process's: with several
--impl, each row's includes the rows before it, so measure memory one case per process.
Random tokens, vocabulary 8000. Like train.py's, the step donates the parameters and
optimizer state (their buffers take the updated values), and like train.py it lets JAX
take 95% of a GPU (XLA_PYTHON_CLIENT_MEM_FRACTION) unless a memory variable is set. A case that runs out
of memory prints "out of memory" and the next one runs.
--torch-original PATH first times the official PyTorch MoEUT from that folder
(bench/torch_original.py, in a child process that has the GPU to itself: bf16 autocast,
float32 parameters, AdamW, the same --grad-clip, profile, batch and sequence length) and
prints its row (peak: ``torch.cuda.max_memory_allocated``). With --devices N the batch is --batch
sequences per device, the parameters and optimizer state are split FSDP-style and the
step runs under the context mesh, as in train.py; --no-context-mesh leaves the mesh
out of the context, so that XLA partitions the expert layers by itself (for comparison);
--replicated keeps a whole copy of the parameters and optimizer state on every device
(plain data parallel: no parameter gathers, one gradient all-reduce).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from train import set_gpu_memory_default  # noqa: E402  (the standard library only)

set_gpu_memory_default()  # before JAX is imported

import jax
import jax.numpy as jnp
import numpy as np
import optax

from moeut_jax import profiles
from kernels import CvmmConfig, resolve
from moeut_jax import MoEUTLM
from moeut_jax.remat import REMAT_POLICIES
from moeut_jax.training.memory import is_out_of_memory, oom_summary


def make_step(profile: str, batch: int, seq: int, impl: str, mesh=None,
              replicated: bool = False, sum_dtype: str = "float16",
              grad_clip: float = 0.0, **model_kw):
  """(jitted train_step, params, opt_state, tokens) of MoEUTLM on random tokens.

  train_step(params, state, toks) -> (params, state, loss): forward, backward, global-norm
  clipping (when ``grad_clip`` > 0) and the AdamW update, bf16 compute with float32
  parameters. With a ``mesh`` the tokens are split over its "data" axis and the
  parameters and optimizer state FSDP-style (or copied to every device when
  ``replicated``). As in train.py, the step donates ``params`` and ``state`` (their
  buffers take the updated values): call it again with the ones it returned.
  """
  model = MoEUTLM(8000, **{**profiles.get(profile), **model_kw}, dtype=jnp.bfloat16,
                  cvmm=CvmmConfig(impl=impl, sum_dtype=sum_dtype))
  toks = jax.random.randint(jax.random.PRNGKey(0), (batch, seq + 1), 0, 8000)
  # The parameters depend neither on the batch, nor on the scan's unrolling, nor on remat:
  # initialise through the rolled, unrematerialised model on one short sequence, which
  # compiles in a fraction of the time.
  init_model = model.clone(scan_unroll=1, remat="none")
  params = jax.jit(init_model.init)(jax.random.PRNGKey(1), toks[:1, :min(seq, 16)])["params"]
  opt = optax.adamw(2.5e-4, weight_decay=0.01)
  if grad_clip > 0:
    opt = optax.chain(optax.clip_by_global_norm(grad_clip), opt)
  state = opt.init(params)
  jit = functools.partial(jax.jit, donate_argnums=(0, 1))
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
                            out_shardings=(p_sh, s_sh, None), donate_argnums=(0, 1))

  @jit
  def train_step(params, state, toks):
    def loss_fn(p):
      out = model.apply({"params": p}, toks[:, :-1], train=True, labels=toks[:, 1:])
      ce = out.outputs.mean()
      return ce + out.reg_loss
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  return train_step, params, state, toks


def step_time(profile: str, batch: int, seq: int, impl: str, steps: int, mesh=None,
              replicated: bool = False, warmup: int = 0, grad_clip: float = 0.0,
              **model_kw):
  """(median step seconds, last loss, seconds of the first call: compile + one step).
  ``warmup`` more steps run untimed after the first call."""
  train_step, params, state, toks = make_step(profile, batch, seq, impl, mesh, replicated,
                                              grad_clip=grad_clip, **model_kw)
  t0 = time.perf_counter()
  params, state, loss = train_step(params, state, toks)
  jax.block_until_ready(loss)
  first = time.perf_counter() - t0
  for _ in range(warmup):
    params, state, loss = train_step(params, state, toks)
  jax.block_until_ready(loss)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    params, state, loss = train_step(params, state, toks)
    jax.block_until_ready(loss)
    times.append(time.perf_counter() - t0)
  if not np.isfinite(float(loss)):
    raise RuntimeError(f"non-finite loss {float(loss)} with impl={impl}")
  return float(np.median(times)), float(loss), first


def peak_memory(devices) -> str:
  """The largest ``peak_bytes_in_use`` of ``devices`` in GiB, or "n/a"."""
  peaks = []
  for d in devices:
    stats = d.memory_stats() or {}
    if "peak_bytes_in_use" in stats:
      peaks.append(stats["peak_bytes_in_use"])
  return f"{max(peaks) / 2**30:.1f}" if peaks else "n/a"


def torch_original_row(path: str, args) -> str:
  """The official PyTorch step's row, timed by bench/torch_original.py in a child process
  (before this process's JAX takes the GPU)."""
  cmd = [sys.executable, os.path.join(ROOT, "bench", "torch_original.py"), "--path", path,
         "--profile", args.profile, "--batch", str(args.batch * args.devices), "--seq",
         str(args.seq), "--steps", str(args.steps), "--warmup", str(args.warmup + 1),
         "--grad-clip", str(args.grad_clip)]
  if args.att_n_experts is not None:
    cmd += ["--att-n-experts", str(args.att_n_experts)]
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  lines = proc.stdout.strip().splitlines()
  if proc.returncode or not lines:
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return f"{'torch':>14} failed (exit {proc.returncode}): {tail[:300]}"
  r = json.loads(lines[-1])
  if "oom" in r:
    return f"{'torch':>14} out of memory: {r['oom']}"
  return (f"{'torch':>14} {'original':>14} {r['step_s'] * 1e3:10.1f} {r['tokens_per_s']:12.0f} "
          f"{r['tokens_per_s'] / args.devices:11.0f} {r['loss']:10.4f} {r['warmup_s']:13.1f} "
          f"{r['peak_bytes'] / 2**30:9.1f}   (torch {r['torch']}, reserved "
          f"{r['peak_reserved_bytes'] / 2**30:.1f} GiB)")


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--profile", default="MoEUT_244M", choices=profiles.ALL_PROFILES)
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--seq", type=int, default=1024)
  ap.add_argument("--steps", type=int, default=10, help="timed steps")
  ap.add_argument("--warmup", type=int, default=0,
                  help="untimed steps after the first call (compile + one step)")
  ap.add_argument("--impl", nargs="+", default=["auto"])
  ap.add_argument("--scan-unroll", type=int, default=None,
                  help="MoEUTLM(scan_unroll=...); default None: unrolled on GPUs")
  ap.add_argument("--remat", default="none", choices=REMAT_POLICIES,
                  help="MoEUTLM(remat=...): what the backward pass keeps (none)")
  ap.add_argument("--grad-clip", type=float, default=0.0,
                  help="global-norm gradient clipping, 0 = none (0; train.py's is 0.25)")
  ap.add_argument("--att-n-experts", type=int, default=None,
                  help="override the profile's att_n_experts (e.g. 1: one attention expert)")
  ap.add_argument("--torch-original", metavar="PATH", default=None,
                  help="folder of the official PyTorch MoEUT: time its step first")
  ap.add_argument("--devices", type=int, default=1,
                  help="data-parallel devices; --batch is per device")
  ap.add_argument("--no-context-mesh", action="store_true",
                  help="with --devices > 1: jit with shardings but no jax.set_mesh")
  ap.add_argument("--replicated", action="store_true",
                  help="with --devices > 1: parameters and optimizer state on every device "
                       "instead of split FSDP-style")
  args = ap.parse_args()
  # Before JAX starts its GPU backend: the child process needs the GPU's memory.
  torch_row = torch_original_row(args.torch_original, args) if args.torch_original else None
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
           if n_dev > 1 else "") + f", scan_unroll {args.scan_unroll}, remat {args.remat}, "
        f"grad clip {args.grad_clip}, "
        + ("" if args.att_n_experts is None else f"att_n_experts {args.att_n_experts}, ")
        + f"{args.steps} timed steps after {args.warmup + 1}")
  print(f"{'impl':>14} {'resolved':>14} {'step ms':>10} {'tokens/s':>12} {'per device':>11} "
        f"{'last loss':>10} {'first call s':>13} {'peak GiB':>9}")
  if torch_row is not None:
    print(torch_row, flush=True)
  devices = jax.devices()[:n_dev]
  for impl in args.impl:
    try:
      with jax.set_mesh(mesh) if use_mesh else contextlib.nullcontext():
        t, loss, first = step_time(args.profile, batch, args.seq, impl, args.steps, mesh,
                                   args.replicated, args.warmup, args.grad_clip,
                                   scan_unroll=args.scan_unroll, remat=args.remat,
                                   **({} if args.att_n_experts is None
                                      else dict(att_n_experts=args.att_n_experts)))
      tps = batch * args.seq / t
      print(f"{impl:>14} {resolve(impl):>14} {t * 1e3:10.1f} {tps:12.0f} {tps / n_dev:11.0f} "
            f"{loss:10.4f} {first:13.1f} {peak_memory(devices):>9}", flush=True)
    except Exception as e:  # report and go on with the next implementation
      if is_out_of_memory(e):
        peak = peak_memory(devices)
        print(f"{impl:>14} out of memory (peak {peak}{'' if peak == 'n/a' else ' GiB'}): "
              f"{oom_summary(e)}", flush=True)
      else:
        print(f"{impl:>14} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)


if __name__ == "__main__":
  main()
