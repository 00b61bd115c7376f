"""The official PyTorch MoEUT's training step on one GPU: the baseline of bench/model.py.

  python bench/torch_original.py --path ../shared/original --profile MoEUT_244M --batch 64

The model is the original's public class, ``moeut.MoEUTLM`` imported from PATH (the
official repository's folder; nothing of it is copied here), with the profile from its
own ``profiles.py``: float32 parameters, bf16 autocast, AdamW (lr 2.5e-4, weight decay
0.01), global-norm clipping (--grad-clip), random tokens of a vocabulary of 8000, the
cross-entropy plus ``reg_loss`` as in its README. Prints one JSON line last: the median
step seconds of --steps after --warmup untimed steps (the first of them builds and
autotunes the Triton kernels), tokens/s, peak memory (``torch.cuda.max_memory_allocated``
and ``max_memory_reserved``), the last loss; or ``"oom"`` with the error's first line.
bench/model.py --torch-original runs it in a child process, before JAX takes the GPU.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

VOCAB = 8000


def load_original(path: str):
  """(moeut, profiles) of the official implementation in folder ``path``."""
  path = os.path.abspath(path)
  if not os.path.isfile(os.path.join(path, "moeut", "__init__.py")):
    raise FileNotFoundError(f"{path} holds no moeut/ package: give the folder of the "
                            "official MoEUT (its moeut/, profiles.py, example.py)")
  sys.path.insert(0, path)
  import moeut  # noqa: PLC0415  pylint: disable=import-outside-toplevel
  if not os.path.abspath(moeut.__file__).startswith(path + os.sep):
    raise ImportError(f"imported moeut from {moeut.__file__}, not from {path}")
  # Its profiles.py under another name: ours is also called profiles.
  spec = importlib.util.spec_from_file_location("moeut_original_profiles",
                                                os.path.join(path, "profiles.py"))
  profiles = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(profiles)
  return moeut, profiles


def step_time(path: str, profile: str, batch: int, seq: int, steps: int, warmup: int,
              grad_clip: float, att_n_experts: int | None = None) -> dict:
  import torch  # noqa: PLC0415  pylint: disable=import-outside-toplevel
  import torch.nn.functional as F  # noqa: PLC0415,N812  pylint: disable=import-outside-toplevel
  moeut, profiles = load_original(path)
  if not torch.cuda.is_available():
    raise RuntimeError("the official MoEUT's step needs a CUDA GPU (its CVMM is a Triton "
                       "kernel)")
  torch.manual_seed(0)
  kw = dict(getattr(profiles, profile))
  if att_n_experts is not None:
    kw["att_n_experts"] = att_n_experts
  model = moeut.MoEUTLM(VOCAB, **kw).cuda()     # float32 params
  opt = torch.optim.AdamW(model.parameters(), lr=2.5e-4, weight_decay=0.01)
  toks = torch.randint(0, VOCAB, (batch, seq + 1), device="cuda")

  def train_step():
    with torch.autocast("cuda", dtype=torch.bfloat16):
      out = model(toks[:, :-1])
      loss = F.cross_entropy(out.outputs.reshape(-1, VOCAB).float(), toks[:, 1:].reshape(-1))
    (loss + out.reg_loss.sum()).backward()
    if grad_clip > 0:
      torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss

  t0 = time.perf_counter()
  for _ in range(max(warmup, 1)):
    loss = train_step()
  torch.cuda.synchronize()
  first = time.perf_counter() - t0
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    loss = train_step()
    torch.cuda.synchronize()
    times.append(time.perf_counter() - t0)
  times.sort()
  t = times[len(times) // 2]
  return dict(impl="torch", device=torch.cuda.get_device_name(), torch=torch.__version__,
              step_s=t, tokens_per_s=batch * seq / t, loss=float(loss),
              warmup_s=first, peak_bytes=torch.cuda.max_memory_allocated(),
              peak_reserved_bytes=torch.cuda.max_memory_reserved())


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--path", required=True, help="folder of the official MoEUT")
  ap.add_argument("--profile", default="MoEUT_244M")
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--seq", type=int, default=1024)
  ap.add_argument("--steps", type=int, default=10, help="timed steps")
  ap.add_argument("--warmup", type=int, default=1, help="untimed steps first (at least 1)")
  ap.add_argument("--grad-clip", type=float, default=0.25, help="0 = none")
  ap.add_argument("--att-n-experts", type=int, default=None,
                  help="override the profile's att_n_experts")
  args = ap.parse_args(argv)
  import torch  # noqa: PLC0415  pylint: disable=import-outside-toplevel
  try:
    result = step_time(args.path, args.profile, args.batch, args.seq, args.steps,
                       args.warmup, args.grad_clip, args.att_n_experts)
  except torch.cuda.OutOfMemoryError as e:
    result = dict(impl="torch", oom=str(e).strip().splitlines()[0][:300])
  print(json.dumps(result), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
