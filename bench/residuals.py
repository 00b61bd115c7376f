"""What the backward pass keeps per layer, for each remat policy (moeut_jax/remat.py).

  python bench/residuals.py                          # MoEUT_244M, every policy, ~15 s
  python bench/residuals.py --remat none elementwise --details     # value by value

Traces one layer group of MoEUT (bf16 compute) abstractly on the CPU (nothing runs) and
lists JAX's saved residuals (``jax.ad_checkpoint.print_saved_residuals``). With Triton
installed the GPU path is traced (``impl="triton"`` through Triton's interpreter, whose
kernels never run here); otherwise ``impl="xla"``, whose gathers keep much more.
Columns: MiB per layer and ``--seq`` tokens of the residuals that grow with the batch
(a trace at batch 2 minus one at batch 1), and that times the layers; the attention
matrices [B, H, T, S] of XLA's attention (what runs on CPUs), apart: on GPUs cuDNN's
fused attention keeps q, k, v and its output (counted already) and float32 [B, H, T]
statistics instead; what is kept once per step whatever the batch (the expert weights'
bf16 copies). Last, what the whole model's loss keeps outside the scan over the layer
groups (embedding, output LayerNorm, head, cross-entropy), per ``--seq`` tokens.

To predict a GPU's peak, multiply the per-layer figures by the layers and the batch; XLA
may keep less than these lists where it fuses an elementwise residual's producer into
both the forward and the backward consumer instead of keeping its output ("none").
"""
from __future__ import annotations

import argparse
import collections
import importlib.util
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if importlib.util.find_spec("triton") is not None:
  # the Triton path, traced through Triton's interpreter (chosen before triton loads),
  # with the heuristic tiles (no timing)
  os.environ["CVMM_TRITON_INTERPRET"] = "1"
  os.environ["CVMM_AUTOTUNE"] = "0"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from kernels import CvmmConfig, is_available  # noqa: E402
from moeut_jax import MoEUT, MoEUTLM, profiles  # noqa: E402
from moeut_jax.remat import (REMAT_POLICIES, layer_group_residuals, nbytes,  # noqa: E402
                             saved_residuals)

MIB = 2 ** 20


def _origin(text: str) -> str:
  """An origin without the repository's path and the column."""
  text = text.replace(ROOT + os.sep, "")
  return re.sub(r"(\.py:\d+):\d+", r"\1", text)


def _per_token(rows1, rows2):
  """{(origin, dtype, shape at batch 1): (count, bytes that grow with the batch)} from
  the same program traced at batch 1 and 2 (the same residuals, in the same order)."""
  if [o for _, o in rows1] != [o for _, o in rows2]:
    raise RuntimeError("the traces at batch 1 and 2 keep different residuals")
  grown = collections.defaultdict(lambda: [0, 0])
  for (v1, origin), (v2, _) in zip(rows1, rows2):
    if nbytes(v2) > nbytes(v1):
      entry = grown[_origin(origin), str(v1.dtype), tuple(v1.shape)]
      entry[0] += 1
      entry[1] += nbytes(v2) - nbytes(v1)
  return {k: tuple(v) for k, v in grown.items()}


def _is_attention_matrix(origin: str, shape, seq: int) -> bool:
  """A [B, H, T, S] array of XLA's attention (attention.py's dot_attention)."""
  return "(dot_attention)" in origin and len(shape) == 4 and tuple(shape[-2:]) == (seq, seq)


def _batch_independent(rows1, rows2) -> int:
  """Bytes that do not grow with the batch, the parameters themselves left out."""
  total = lambda rows: sum(nbytes(v) for v, o in rows  # noqa: E731
                           if not o.startswith("from the argument params"))
  return 2 * total(rows1) - total(rows2)


def layer_report(stack, remat: str, seq: int, details: bool):
  """(MiB per layer and seq tokens, MiB of XLA attention matrices, MiB kept once)."""
  g = stack.group_size
  rows1 = layer_group_residuals(stack, remat, 1, seq)
  rows2 = layer_group_residuals(stack, remat, 2, seq)
  per_token = _per_token(rows1, rows2)
  matrices = {k for k in per_token if _is_attention_matrix(k[0], k[2], seq)}
  kept = {k: v for k, v in per_token.items() if k not in matrices}
  if details:
    print(f"\n{remat}: residuals that grow with the batch, per layer and {seq} tokens "
          "(count per group, shape at batch 1)")
    for (origin, dtype, shape), (n, b) in sorted(kept.items(), key=lambda kv: -kv[1][1]):
      if b / g >= 0.01 * MIB:
        print(f"  {b / g / MIB:7.2f} MiB {n:2d} x {dtype:>8} {str(list(shape)):>18}  {origin}")
  return (sum(b for _, b in kept.values()) / g / MIB,
          sum(per_token[k][1] for k in matrices) / g / MIB,
          _batch_independent(rows1, rows2) / MIB)


def outside_layers(lm, seq: int) -> tuple[float, float]:
  """(MiB per seq tokens that the whole loss keeps outside the scan over the layer
  groups, remat "none"; of them, MiB of XLA's [B, H, T, S] attention arrays, which the
  CPU's attention keeps and cuDNN's does not)."""
  def loss(params, toks):
    out = lm.apply({"params": params}, toks[:, :-1], train=True, labels=toks[:, 1:])
    return out.outputs.mean() + out.reg_loss

  def traced(batch):
    toks = jax.ShapeDtypeStruct((batch, seq + 1), jnp.int32)
    params = jax.eval_shape(lambda t: lm.init(jax.random.PRNGKey(0), t[:, :8]), toks)
    return saved_residuals(loss, params["params"], toks)

  per_token = _per_token(traced(1), traced(2))
  outside = {k: b for k, (_, b) in per_token.items() if not k[0].startswith("output of scan")}
  matrices = sum(b for (origin, _, shape), b in outside.items()
                 if _is_attention_matrix(origin, shape, seq))
  return sum(outside.values()) / MIB, matrices / MIB


def main():
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--profile", default="MoEUT_244M", choices=profiles.ALL_PROFILES)
  ap.add_argument("--seq", type=int, default=1024, help="tokens per sequence (1024)")
  ap.add_argument("--remat", nargs="+", default=list(REMAT_POLICIES), choices=REMAT_POLICIES)
  ap.add_argument("--details", action="store_true", help="every residual, by origin")
  args = ap.parse_args()
  impl = "triton" if is_available("triton") else "xla"
  kw = dict(profiles.get(args.profile), dtype=jnp.bfloat16, cvmm=CvmmConfig(impl=impl),
            scan_unroll=1)
  stack = MoEUT(**kw)
  lm = MoEUTLM(8000, **kw)
  print(f"{args.profile}, bf16, CVMM impl {impl}, traced on the CPU; per layer and "
        f"{args.seq} tokens ({stack.n_layers} layers, groups of {stack.group_size})")
  rows = [(remat, *layer_report(stack, remat, args.seq, args.details))
          for remat in args.remat]
  print(f"\n{'remat':>18} {'MiB/layer':>10} {'x layers':>9} {'XLA attention':>14} "
        f"{'once per step':>14}")
  for remat, per_layer, matrices, fixed in rows:
    print(f"{remat:>18} {per_layer:10.2f} {per_layer * stack.n_layers:9.1f} "
          f"{matrices:14.2f} {fixed:14.1f}")
  outside, matrices = outside_layers(lm, args.seq)
  print(f"outside the layers (embedding, output norm, head, loss): {outside - matrices:.1f} "
        f"MiB per {args.seq} tokens, and {matrices:.1f} MiB of XLA attention arrays")


if __name__ == "__main__":
  main()
