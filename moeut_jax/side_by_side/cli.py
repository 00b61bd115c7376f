"""The command: prepares the shared setup, runs each variant in a process of its own (at
most ``--parallel`` at a time, each under ``--timeout``), prints their results as they
come, then the curves side by side, the held-out table and the PNG's path.

Files in ``--out``: setup.json and setup.npz (the shared setup), LABEL.json and LABEL.log
per run (LABEL with characters other than letters, digits, ``.``, ``_`` and ``-`` as
``_``: original_1.json for "original#1"), summary.json (the held-out table's numbers),
side_by_side.png.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time

from moeut_jax import profiles
from moeut_jax.side_by_side import report
from moeut_jax.side_by_side.shared import (OPTIONS, file_stem, labels, parse_variant, prepare,
                                           read_text)

DEFAULT_VARIANTS = ("original,original,jax,jax+original_routers,jax+original_cvmm,"
                    "jax+original_rope,jax+original_routers+original_cvmm+original_rope")


def make_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m moeut_jax.side_by_side",
      description="The official PyTorch MoEUT and moeut-jax trained side by side from the "
      "same initial weights on the same byte-level batches; prints both loss curves, the "
      "held-out losses and the original's run-to-run spread, and writes a PNG.",
      epilog=f"Variants: 'original' (the official model; give it twice for its spread), "
      "'original+efficient_attention' (its attention on PyTorch's memory-efficient kernel, "
      "cuDNN's off), 'original+float32_routers' (or float32_cvmm, float32_sigma_moe, "
      "float32_attention, float32_qk, float32_sdpa, float32_rope_table: that part of the "
      "original out of its bf16 autocast), "
      f"'jax', 'jax+OPTION[+OPTION]' with OPTION one of {', '.join(OPTIONS)}: "
      "original_routers = routers in the compute dtype, as the original under autocast; "
      "original_cvmm = the original's CVMM kernels (CvmmConfig(impl='original')); "
      "original_rope = RoPE angles in the compute dtype, as the original on a GPU.")
  p.add_argument("--original", required=True, metavar="PATH",
                 help="folder of a clone of the official MoEUT (its moeut/ and profiles.py)")
  p.add_argument("--text", required=True, nargs="+", metavar="PATH",
                 help="text files, or folders whose .txt/.md/.rst/.py files are read")
  p.add_argument("--profile", default="MoEUT_126M", choices=profiles.ALL_PROFILES)
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--seq", type=int, default=512)
  p.add_argument("--lr", type=float, default=2.5e-4)
  p.add_argument("--warmup", type=int, default=None, help="warm-up steps (steps // 10)")
  p.add_argument("--grad-clip", type=float, default=0.25, help="0 = none (0.25)")
  p.add_argument("--weight-decay", type=float, default=0.01)
  p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                 help="compute dtype: the original's autocast and moeut-jax's dtype; auto: "
                 "bfloat16 with a CUDA GPU, float32 otherwise")
  p.add_argument("--eval-every", type=int, default=50, help="held-out loss every N steps")
  p.add_argument("--eval-batches", type=int, default=8, help="held-out batches")
  p.add_argument("--heldout-fraction", type=float, default=0.1)
  p.add_argument("--max-bytes", type=int, default=64 << 20, help="bytes of text read")
  p.add_argument("--variants", default=DEFAULT_VARIANTS,
                 help=f"comma-separated runs ({DEFAULT_VARIANTS})")
  p.add_argument("--parallel", type=int, default=1, help="runs at the same time (1)")
  p.add_argument("--timeout", type=float, default=None,
                 help="seconds each run may take (none)")
  p.add_argument("--scan-unroll", type=int, default=1,
                 help="moeut-jax's scan_unroll (1: shortest compile; same numerics)")
  p.add_argument("--print-every", type=int, default=None,
                 help="steps per row of the curves (steps // 10)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default="runs/side_by_side", help="output folder")
  return p


def _compute_dtype(choice: str) -> str:
  if choice != "auto":
    return choice
  import torch  # noqa: PLC0415
  return "bfloat16" if torch.cuda.is_available() else "float32"


class _Run:
  """One variant's process; its output lines are printed with its label and logged."""

  def __init__(self, out: str, label: str, variant: str, env: dict):
    self.label, self.out, self.stem = label, out, file_stem(label)
    self.log = open(os.path.join(out, f"{self.stem}.log"), "w", encoding="utf-8")  # noqa: SIM115
    self.proc = subprocess.Popen(
        [sys.executable, "-m", "moeut_jax.side_by_side.worker", out, label, variant],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        start_new_session=True)
    self.start = time.time()
    self.reader = threading.Thread(target=self._read, daemon=True)
    self.reader.start()

  def _read(self):
    for line in self.proc.stdout:
      self.log.write(line)
      self.log.flush()
      if line.startswith(f"[{self.label}]"):
        print(line.rstrip(), flush=True)

  def kill(self):
    try:
      os.killpg(self.proc.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass

  def result(self) -> dict:
    self.reader.join(timeout=10)
    self.log.close()
    path = os.path.join(self.out, f"{self.stem}.json")
    if os.path.isfile(path):
      with open(path, encoding="utf-8") as f:
        return json.load(f)
    return dict(label=self.label, error=f"exited with status {self.proc.returncode} and no "
                f"result (see {self.stem}.log)")


def run_variants(out: str, runs: list[tuple[str, str]], parallel: int,
                 timeout: float | None) -> list[dict]:
  """Runs (label, variant) pairs, ``parallel`` at a time; results in the given order."""
  env = dict(os.environ)
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
  env.setdefault("PYTHONUNBUFFERED", "1")
  if parallel > 1:        # processes share the GPU: no JAX preallocation
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  pending, active, results = list(runs), [], {}
  while pending or active:
    while pending and len(active) < parallel:
      label, variant = pending.pop(0)
      print(f"[{label}] started ({variant})", flush=True)
      active.append(_Run(out, label, variant, env))
    time.sleep(0.5)
    for run in list(active):
      late = timeout is not None and time.time() - run.start > timeout
      if run.proc.poll() is None and not late:
        continue
      if late and run.proc.poll() is None:
        run.kill()
        run.proc.wait()
        res = run.result()                     # its curves up to the last evaluation
        res["error"] = f"timed out after {timeout:.0f} s"
      else:
        res = run.result()
      res.setdefault("variant", dict(runs)[run.label])
      results[run.label] = res
      active.remove(run)
      held = res.get("heldout")
      said = "; ".join(
          ([f"held-out loss {held[-1][1]:.4f} after step {held[-1][0]}"] if held else [])
          + ([res["error"]] if "error" in res else [])) or "no result"
      print(f"[{run.label}] finished in {time.time() - run.start:.0f} s: {said}", flush=True)
  return [results[label] for label, _ in runs]


def main(argv=None) -> int:
  args = make_parser().parse_args(argv)
  try:
    variants = [parse_variant(v) for v in args.variants.split(",") if v.strip()]
    if not variants:
      raise ValueError("--variants names no run")
    from kernels.config import check_original_path  # noqa: PLC0415
    check_original_path(args.original)
    if importlib.util.find_spec("matplotlib") is None:
      raise ImportError("the side-by-side PNG needs matplotlib: pip install matplotlib")
    for name in ("steps", "batch", "seq", "parallel", "eval_every", "eval_batches"):
      if getattr(args, name) < 1:
        raise ValueError(f"--{name.replace('_', '-')} must be a positive integer")
  except (ValueError, FileNotFoundError, ImportError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  text = read_text(args.text, args.max_bytes)
  dtype = _compute_dtype(args.dtype)
  model = profiles.get(args.profile)
  print(f"{args.profile}, {args.steps} steps of {args.batch} x {args.seq} bytes, {dtype}, "
        f"{len(text):,} bytes of text; runs: {', '.join(v.name for v in variants)}",
        flush=True)
  setup = prepare(model=model, original_path=args.original, text=text, steps=args.steps,
                  batch=args.batch, seq=args.seq, dtype=dtype, lr=args.lr, warmup=args.warmup,
                  grad_clip=args.grad_clip, weight_decay=args.weight_decay,
                  eval_every=args.eval_every, eval_batches=args.eval_batches,
                  heldout_fraction=args.heldout_fraction, scan_unroll=args.scan_unroll,
                  seed=args.seed)
  setup.save(args.out)
  runs = list(zip(labels(variants), (v.name for v in variants)))
  results = run_variants(args.out, runs, args.parallel, args.timeout)
  every = args.print_every or max(1, args.steps // 10)
  print("\nTraining loss (cross-entropy, mean over the steps of each row)")
  print(report.curves(results, every))
  print("\nHeld-out loss by step")
  print(report.heldout_by_step(results))
  print("\nHeld-out loss after each run's last evaluation, against the original's there")
  print(report.heldout_table(results))
  with open(os.path.join(args.out, "summary.json"), "w", encoding="utf-8") as f:
    json.dump(dict(settings=setup.settings(), **report.summary(results)), f, indent=2)
  png = report.plot(results, os.path.join(args.out, "side_by_side.png"))
  print(f"\nCurves: {png}; results: {os.path.join(args.out, 'summary.json')}")
  return 0 if all("error" not in r for r in results) else 1
