"""Where a MoEUTLM training step spends its GPU time: a profiler trace, summed per op.

  python -m bench.profile_model --profile MoEUT_244M --batch 16 --seq 1024 --out /tmp/prof

Traces ``--steps`` jitted training steps (forward + backward + AdamW, bf16 compute, the
step of bench/model.py) with ``jax.profiler``, then sums the device time of every kernel
by the HLO instruction that launched it. The compiled HLO maps each instruction to the
JAX source op that made it (its ``op_name``), so the tables say which part of the model
the time belongs to:
  1. totals: step wall time, device busy time, idle time;
  2. by part of the model (σ-MoE, attention, routing, norms, optimizer, ...), fwd / bwd;
  3. the ``--top`` instructions, with their kernels and source ops.
The trace (``perfetto_trace.json.gz``) and the HLO text are kept under ``--out``.
Kernels that XLA runs inside a command buffer (a CUDA graph) report the buffer, not their
instruction; those whose kernel name does not name the instruction (cuBLAS, cuDNN, custom
calls) stay unattributed unless ``--no-command-buffers`` turns the buffers off.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# XLA reads its flags when JAX starts: --no-command-buffers is acted on here, before
# the import, and parsed with the other arguments in main()
if "--no-command-buffers" in sys.argv[1:]:
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_gpu_enable_command_buffer=").strip()

import jax  # noqa: E402

from kernels.config import SUM_DTYPES  # noqa: E402
from model import make_step  # noqa: E402  (bench/model.py)

_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{op_name=\"([^\"]*)\"", re.M)


def hlo_op_names(hlo_text: str) -> dict:
  """{instruction name: op_name} over every computation of the HLO module."""
  return {m.group(1): m.group(2) for m in _INSTR.finditer(hlo_text)}


def device_events(trace: dict):
  """Complete events ('X') that carry an ``hlo_op``: those of the GPU device processes,
  or on a machine without GPU, the CPU client's (for trying the script out)."""
  ev = trace["traceEvents"]
  gpu_pids = {e["pid"] for e in ev if e.get("ph") == "M" and e.get("name") == "process_name"
              and str(e.get("args", {}).get("name", "")).startswith("/device:GPU")}
  ops = [e for e in ev if e.get("ph") == "X" and "hlo_op" in e.get("args", {})]
  return [e for e in ops if e["pid"] in gpu_pids] if gpu_pids else ops


def busy_time(events) -> float:
  """Length of the union of the events' intervals (µs): device time with a kernel running."""
  spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in events)
  total, cur_s, cur_e = 0.0, None, None
  for s, e in spans:
    if cur_e is None or s > cur_e:
      if cur_e is not None:
        total += cur_e - cur_s
      cur_s, cur_e = s, e
    else:
      cur_e = max(cur_e, e)
  if cur_e is not None:
    total += cur_e - cur_s
  return total


def short_op(op_name: str) -> str:
  """op_name without the jit/scan wrappers: 'layers/layer_0/ffn/.../dot_general'."""
  s = re.sub(r"jit\(train_step\)/", "", op_name)
  s = re.sub(r"(transpose\()?(jvp\()?MoEUTLM\)*/", "", s)
  s = re.sub(r"transformer/while/body/(closed_call|eval_jaxpr)/", "", s)
  s = s.replace("transformer/while/", "")
  return s


def part_of(op_name: str) -> str:
  """Coarse model part of an op, with its direction: 'bwd ffn: cvmm', 'fwd attention: ...'."""
  dirn = "bwd" if "transpose(" in op_name else "fwd"
  s = short_op(op_name)
  if s.startswith("state[") or "adam" in s or "optax" in s or s.startswith("params"):
    return "optimizer"
  m = re.search(r"layer_\d+/(\w+)", s)
  if m:
    mod = m.group(1)
    rest = s[m.end():]
    if "cvmm" in rest or "triton" in rest:
      what = "cvmm kernels"
    elif "top_k" in rest or "sigmoid_topk" in rest:
      what = "top-k"
    elif "make_routing" in rest or "sort" in rest:
      what = "routing sort"
    elif "dot_product_attention" in rest or "cudnn" in rest:
      what = "attention core"
    elif "dot_general" in rest:
      what = "matmuls"
    else:
      what = "elementwise/reductions"
    return f"{dirn} {mod}: {what}"
  for key in ("embedding", "lm_head", "out_norm", "softmax_cross_entropy", "reg"):
    if key in s:
      return f"{dirn} {key}"
  return f"{dirn} other"


def instruction_of(event, names: dict) -> str:
  """The HLO instruction behind a kernel event. Kernels inside an XLA command buffer
  (a CUDA graph) report the buffer as their ``hlo_op``; their kernel name is the fusion's
  name with '.' written '_' ('loop_add_fusion_37' for loop_add_fusion.37, 'sort_321_1'
  for part 1 of sort.321), which finds the instruction."""
  op = event["args"]["hlo_op"]
  if not op.startswith("command_buffer"):
    return op
  kern = event["name"]
  for pat in (r"^(.*)_(\d+)$", r"^(.*)_(\d+)_\d+$"):
    m = re.match(pat, kern)
    if m and f"{m.group(1)}.{m.group(2)}" in names:
      return f"{m.group(1)}.{m.group(2)}"
  return kern if kern in names else f"{op}:{kern[:40]}"


def summarize(events, names: dict, steps: int, wall_ms: float, top: int) -> str:
  per_op = collections.defaultdict(float)
  kernels = collections.defaultdict(collections.Counter)
  per_kernel = collections.defaultdict(float)
  for e in events:
    op = instruction_of(e, names)
    per_op[op] += e["dur"]
    kernels[op][e["name"]] += 1
    per_kernel[e["name"]] += e["dur"]
  busy = busy_time(events) / 1e3 / steps
  total = sum(per_op.values()) / 1e3 / steps
  lines = [f"step wall {wall_ms:.1f} ms; device busy {busy:.1f} ms "
           f"(kernel time summed {total:.1f} ms); idle {wall_ms - busy:.1f} ms", ""]
  parts = collections.defaultdict(float)
  for op, us in per_op.items():
    parts[part_of(names[op]) if op in names else "unattributed (in command buffers)"] += us
  lines.append(f"{'part':48s} {'ms/step':>9s} {'share':>6s}")
  for p, us in sorted(parts.items(), key=lambda kv: -kv[1]):
    ms = us / 1e3 / steps
    lines.append(f"{p:48s} {ms:9.2f} {ms / total:6.1%}")
  lines += ["", f"{'kernel':60s} {'ms/step':>8s}"]
  for k, us in sorted(per_kernel.items(), key=lambda kv: -kv[1])[:top]:
    lines.append(f"{k[:60]:60s} {us / 1e3 / steps:8.3f}")
  lines += ["", f"{'hlo op':32s} {'ms/step':>8s} {'launches':>8s}  kernel | source op"]
  for op, us in sorted(per_op.items(), key=lambda kv: -kv[1])[:top]:
    kern, n = kernels[op].most_common(1)[0]
    launches = sum(kernels[op].values()) // steps
    lines.append(f"{op[:32]:32s} {us / 1e3 / steps:8.3f} {launches:8d}  {kern[:50]} | "
                 f"{short_op(names.get(op, '?'))[-110:]}")
  return "\n".join(lines)


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--profile", default="MoEUT_244M")
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--seq", type=int, default=1024)
  ap.add_argument("--impl", default="auto")
  ap.add_argument("--sum-dtype", default="float16", choices=SUM_DTYPES,
                  help="the CVMM kernels' sums over experts (CvmmConfig.sum_dtype)")
  ap.add_argument("--grad-clip", type=float, default=0.25)
  ap.add_argument("--remat", default="none", help="MoEUTLM's remat policy")
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--top", type=int, default=40)
  ap.add_argument("--out", default="/tmp/moeut_profile")
  ap.add_argument("--no-command-buffers", action="store_true",
                  help="XLA without command buffers (CUDA graphs): every kernel then names "
                       "its HLO instruction, none is left unattributed; the step may take "
                       "longer than with them")
  a = ap.parse_args()
  os.makedirs(a.out, exist_ok=True)
  step, params, state, toks = make_step(a.profile, a.batch, a.seq, a.impl,
                                        sum_dtype=a.sum_dtype, grad_clip=a.grad_clip,
                                        remat=a.remat)
  hlo = step.lower(params, state, toks).compile().as_text()
  with open(os.path.join(a.out, "train_step.hlo.txt"), "w") as f:
    f.write(hlo)
  for _ in range(2):                                    # compile and warm up
    params, state, loss = step(params, state, toks)
  jax.block_until_ready(loss)
  trace_dir = os.path.join(a.out, "trace")
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    t0 = time.perf_counter()
    for _ in range(a.steps):
      params, state, loss = step(params, state, toks)
    jax.block_until_ready(loss)
    wall_ms = (time.perf_counter() - t0) * 1e3 / a.steps
  path = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"),
                          recursive=True))[-1]
  with gzip.open(path) as f:
    trace = json.load(f)
  shutil.copy(path, os.path.join(a.out, "perfetto_trace.json.gz"))
  events = device_events(trace)
  print(f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}; {a.profile}, "
        f"batch {a.batch} x {a.seq}, impl {a.impl}, sum dtype {a.sum_dtype}, remat {a.remat}, grad clip {a.grad_clip}, "
        f"command buffers {'off' if a.no_command_buffers else 'on'}; "
        f"{a.steps} traced steps, {len(events)} kernel events; trace {path}")
  if not events:
    print("no device kernel events in the trace (no GPU?)")
    return
  print(summarize(events, hlo_op_names(hlo), a.steps, wall_ms, a.top))


if __name__ == "__main__":
  main()
