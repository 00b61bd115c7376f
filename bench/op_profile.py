"""Where one CVMM call's GPU time goes: a profiler trace of the jitted call, per kernel.

  python -m bench.op_profile --kernels down_fwd,o_fwd,up_dx [--profile MoEUT_244M]
  python -m bench.op_profile --kernels v_fwd,v_dx,v_dw,o_fwd,o_dx,o_dw

For each named call of bench/cvmm_kernels.py (the cached tile choice), traces ``--iters``
back-to-back calls with ``jax.profiler`` and prints the device time per HLO instruction
(kernel) per call, with the JAX source op that made it: the Triton kernel itself and
the XLA work around it (tiles, the float16 sums' row scales, zeroing, scaling back).
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from moeut_jax import profiles  # noqa: E402
from bench.cvmm_kernels import kernels  # noqa: E402
from profile_model import busy_time, device_events, hlo_op_names, instruction_of  # noqa: E402


def profile_call(f, args, iters: int, top: int) -> str:
  hlo = f.lower(args).compile().as_text()
  names = hlo_op_names(hlo)
  for _ in range(3):
    jax.block_until_ready(f(args))
  d = tempfile.mkdtemp()
  try:
    with jax.profiler.trace(d, create_perfetto_trace=True):
      for _ in range(iters):
        out = f(args)
      jax.block_until_ready(out)
    path = sorted(glob.glob(os.path.join(d, "**", "perfetto_trace.json.gz"),
                            recursive=True))[-1]
    with gzip.open(path) as fh:
      events = device_events(json.load(fh))
  finally:
    shutil.rmtree(d, ignore_errors=True)
  per_op = collections.defaultdict(float)
  kern = {}
  for e in events:
    op = instruction_of(e, names)
    per_op[op] += e["dur"]
    kern[op] = e["name"]
  total = sum(per_op.values()) / iters
  lines = [f"  device busy {busy_time(events) / iters / 1e3:.3f} ms per call, kernels "
           f"summed {total / 1e3:.3f} ms"]
  for op, us in sorted(per_op.items(), key=lambda kv: -kv[1])[:top]:
    src = names.get(op, "?")
    lines.append(f"  {us / iters / 1e3:7.3f} ms  {op[:28]:28s} {kern[op][:30]:30s} "
                 f"{src[-90:]}")
  return "\n".join(lines)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--profile", default="MoEUT_244M")
  ap.add_argument("--tokens", type=int, default=64 * 1024)
  ap.add_argument("--kernels", default="down_fwd,o_fwd,up_dx")
  ap.add_argument("--iters", type=int, default=10)
  ap.add_argument("--top", type=int, default=14)
  a = ap.parse_args(argv)
  arrays, ks = kernels(profiles.get(a.profile), a.tokens, jnp.bfloat16)
  print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}, {a.profile}, "
        f"{a.tokens} tokens, cached tile choices", flush=True)
  for name in a.kernels.split(","):
    fn = ks[name][0]
    # the call as the op makes it: the output cast to the inputs' dtype
    f = jax.jit(lambda v, fn=fn: jax.tree.map(lambda t: t.astype(jnp.bfloat16)
                                             if t.dtype == jnp.float32 and t.ndim == 2
                                             else t, fn(None, v)))
    print(f"## {name}", flush=True)
    print(profile_call(f, arrays, a.iters, a.top), flush=True)


if __name__ == "__main__":
  main()
