"""How far each bf16 path's gradient is from the float32 one, the official MoEUT and moeut-jax
side by side on one GPU, per kind of parameter.

  python -m bench.probes.grad_precision --original .orig          # MoEUT_126M, 16 x 512

One batch of the side-by-side tool's text (the Python standard library's sources, byte
tokens), the original's initial weights (``moeut_jax.side_by_side.prepare``), optionally
moved first by ``--after`` AdamW steps of moeut-jax in float32, or of the original as it
trains on a GPU (``--moved-by original``); both sides then start from those weights.
The gradient of ce + reg of every parameter, for:

  original f32         the official model in float32, TF32 off: the reference
  original bf16        under bf16 autocast, as it trains (twice: the second run shows its
                       run-to-run spread, from its atomic weight-gradient sums)
  original bf16 +fr    the same with cuBLAS's reduced-precision bf16 reductions off
                       (``allow_bf16_reduced_precision_reduction = False``)
  original bf16 +pt    the same with its CVMM op replaced by plain PyTorch (the
                       side-by-side tool's stand-in) under autocast: without its kernels
  jax f32              moeut-jax in float32 (should equal the reference to rounding)
  jax bf16             moeut-jax in bf16, and with each original-numerics option

Printed: ‖g - g_ref‖ / ‖g_ref‖ per kind of parameter (summed over layers) and over all,
and the cosine between g and g_ref over all; and for every mode after the first, its
distance over all from the first mode's gradient (two paths equally far from float32
may still be far from each other: this says whether they round the same way). A path whose distance is far above another's
moves the weights differently in every step.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import os
import re
import sys
import sysconfig
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from moeut_jax import profiles  # noqa: E402
from moeut_jax.side_by_side.shared import VOCAB, Variant, prepare, read_text  # noqa: E402


def kind_of(name: str) -> str:
  """'transformer.layers.3.ffn.keys' -> 'ffn.keys'; top-level names unchanged."""
  return re.sub(r"^transformer\.layers\.\d+\.", "", name)


def _original(setup, params: dict):
  """(moeut package, the official MoEUTLM holding ``params`` on the GPU or else the CPU,
  its device)."""
  import torch  # noqa: PLC0415
  from moeut_jax.side_by_side.original import load  # noqa: PLC0415
  moeut = load(setup.original_path)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  model = moeut.MoEUTLM(VOCAB, **setup.model)
  model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in params.items()})
  return moeut, model.to(device).train(), device


def _original_loss(model, tokens, bf16: bool, device: str):
  """(ce + reg, ce) of the official model on ``tokens``, under bf16 autocast if asked."""
  import torch  # noqa: PLC0415
  import torch.nn.functional as F  # noqa: N812,PLC0415
  ctx = torch.autocast(device, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
  with ctx:
    out = model(tokens[:, :-1])
    ce = F.cross_entropy(out.outputs.float().reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
    return ce + out.reg_loss.sum(), ce


@contextlib.contextmanager
def _cvmm_standin(moeut, on: bool):
  """The official model's CVMM op replaced by the plain-PyTorch stand-in while ``on``."""
  from moeut_jax.side_by_side.original import cvmm_standin  # noqa: PLC0415
  saved = moeut.moeut.cvmm
  if on:
    moeut.moeut.cvmm = cvmm_standin(moeut)
  try:
    yield
  finally:
    moeut.moeut.cvmm = saved


def original_grads(setup, params: dict, mode: str) -> tuple[dict, float]:
  """{state-dict name: gradient} and the loss of the official model on the first batch."""
  import torch  # noqa: PLC0415
  from moeut_jax.side_by_side.original import on_device  # noqa: PLC0415
  torch.backends.cuda.matmul.allow_tf32 = False
  torch.backends.cudnn.allow_tf32 = False
  torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = "+fr" not in mode
  moeut, model, device = _original(setup, params)   # on a CPU: float32 and the stand-in
  tokens = torch.from_numpy(setup.train[0]).long().to(device)
  with on_device(moeut, device), _cvmm_standin(moeut, "+pt" in mode and device == "cuda"):
    loss, ce = _original_loss(model, tokens, mode.startswith("bf16"), device)
    loss.backward()
  grads = {k: p.grad.detach().float().cpu().numpy() for k, p in model.named_parameters()}
  return grads, float(ce)


def _jax_model(setup, params: dict, dtype: str, options: tuple = ()):
  """(moeut-jax model of the variant, ``params`` as its parameter tree)."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  from moeut_jax.convert import from_torch_state_dict  # noqa: PLC0415
  from moeut_jax.side_by_side.ours import build_model  # noqa: PLC0415
  model = build_model(dataclasses.replace(setup, dtype=dtype), Variant("jax", options))
  return model, jax.tree_util.tree_map(jnp.asarray, from_torch_state_dict(params, model=model))


def _jax_loss(model, p, tokens):
  """(ce + reg, ce) of moeut-jax on ``tokens``."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  out = model.apply({"params": p}, tokens[:, :-1], train=True)
  logp = jax.nn.log_softmax(out.outputs.astype(jnp.float32), axis=-1)
  ce = -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))
  return ce + out.reg_loss, ce


def _state_dict(tree) -> dict:
  from moeut_jax.convert import to_torch_state_dict  # noqa: PLC0415
  return {k: np.asarray(v, np.float32) for k, v in to_torch_state_dict(tree).items()}


def jax_grads(setup, params: dict, dtype: str, options: tuple = ()) -> tuple[dict, float]:
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  model, tree = _jax_model(setup, params, dtype, options)
  tokens = jnp.asarray(setup.train[0])
  grad = jax.jit(jax.value_and_grad(lambda p: _jax_loss(model, p, tokens), has_aux=True))
  (_, ce), g = grad(tree)
  return _state_dict(g), float(ce)


def moved(setup, steps: int, by: str = "jax") -> dict:
  """The initial weights after ``steps`` AdamW steps (lr 1e-3, the setup's clipping and
  decay) on the setup's next batches, as a state dict: by moeut-jax in float32 (``by``
  "jax") or by the official model as it trains on a GPU, under bf16 autocast (``by``
  "original"; float32 with the CVMM stand-in where there is no GPU)."""
  if steps == 0:
    return setup.init
  if by == "original":
    return _moved_by_original(setup, steps)
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import optax  # noqa: PLC0415
  model, p = _jax_model(setup, setup.init, "float32")
  tx = optax.chain(optax.clip_by_global_norm(setup.grad_clip),
                   optax.adamw(1e-3, b1=setup.betas[0], b2=setup.betas[1], eps=setup.eps,
                               weight_decay=setup.weight_decay))
  state = tx.init(p)

  @jax.jit
  def step(p, state, tokens):
    g = jax.grad(lambda p: _jax_loss(model, p, tokens)[0])(p)
    u, state = tx.update(g, state, p)
    return optax.apply_updates(p, u), state

  for s in range(steps):
    p, state = step(p, state, jnp.asarray(setup.train[1 + s]))
  return _state_dict(p)


def _moved_by_original(setup, steps: int) -> dict:
  import torch  # noqa: PLC0415
  from moeut_jax.side_by_side.original import on_device  # noqa: PLC0415
  moeut, model, device = _original(setup, setup.init)
  params = list(model.parameters())
  opt = torch.optim.AdamW(params, lr=1e-3, betas=setup.betas, eps=setup.eps,
                          weight_decay=setup.weight_decay)
  with on_device(moeut, device):
    for s in range(steps):
      tokens = torch.from_numpy(setup.train[1 + s]).long().to(device)
      _original_loss(model, tokens, device == "cuda", device)[0].backward()
      torch.nn.utils.clip_grad_norm_(params, setup.grad_clip)
      opt.step()
      opt.zero_grad(set_to_none=True)
  return {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}


def distances(g: dict, ref: dict) -> dict:
  """{kind: rel distance} plus 'all' and 'cos'."""
  num, den = collections.defaultdict(float), collections.defaultdict(float)
  dot = na = 0.0
  for k, r in ref.items():
    a, r = g[k].astype(np.float64), r.astype(np.float64)
    num[kind_of(k)] += float(np.sum((a - r) ** 2))
    den[kind_of(k)] += float(np.sum(r * r))
    dot += float(np.sum(a * r))
    na += float(np.sum(a * a))
  out = {k: (num[k] / den[k]) ** 0.5 if den[k] > 0 else float("nan") for k in num}
  out["all"] = (sum(num.values()) / sum(den.values())) ** 0.5
  out["cos"] = dot / (na * sum(den.values())) ** 0.5
  return out


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--original", default=".orig", help="folder of a clone of the official MoEUT")
  ap.add_argument("--profile", default="MoEUT_126M")
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--seq", type=int, default=512)
  ap.add_argument("--moved-by", choices=("jax", "original"), default="jax",
                  help="who trains the --after steps: moeut-jax in float32, or the original "
                  "under bf16 autocast (as it trains on a GPU)")
  ap.add_argument("--after", type=int, default=0,
                  help="AdamW steps (lr 1e-3) before the comparison (by --moved-by)")
  ap.add_argument("--modes", default="original:bf16,original:bf16,original:bf16+fr,"
                  "original:bf16+pt,jax:f32,jax:bf16,jax:bf16+original_routers,"
                  "jax:bf16+original_cvmm")
  args = ap.parse_args(argv)
  text = read_text([sysconfig.get_paths()["stdlib"]], 12_000_000)
  setup = prepare(model=profiles.get(args.profile), original_path=args.original, text=text,
                  steps=args.after + 1, batch=args.batch, seq=args.seq, dtype="bfloat16")
  params = moved(setup, args.after, args.moved_by)
  t0 = time.time()
  ref, ref_ce = original_grads(setup, params, "f32")
  print(f"{args.profile}, {args.batch} x {args.seq} bytes, weights after {args.after} "
        f"steps by {args.moved_by} ({time.time() - t0:.0f} s); reference: the original in "
        f"float32, ce {ref_ce:.5f}", flush=True)
  rows, first = [], None
  for mode in args.modes.split(","):
    side, how = mode.split(":")
    if side == "original":
      g, ce = original_grads(setup, params, how)
    else:
      dtype, *opts = how.split("+")
      g, ce = jax_grads(setup, params, "float32" if dtype == "f32" else "bfloat16", tuple(opts))
    rows.append((mode, ce, distances(g, ref)))
    d = rows[-1][2]
    if first is None:
      first, versus = (mode, g), ""
    else:
      v = distances(g, first[1])
      d["vs_first"] = v["all"]
      versus = f"  from {first[0]}: {v['all']:.5f}"
    print(f"  {mode:32s} {time.time() - t0:5.0f} s  ce {ce:.6f}  all {d['all']:.5f}  "
          f"cos {d['cos']:.7f}{versus}  " + json.dumps(d), flush=True)
  kinds = sorted(k for k in rows[0][2] if k not in ("all", "cos", "vs_first"))
  print("\nrelative distance from the float32 original's gradient, by parameter")
  w = max(len(m) for m, _, _ in rows) + 2
  print(f"{'parameter':24s}" + "".join(f"{m:>{w}s}" for m, _, _ in rows))
  for k in kinds + ["all", "cos"]:
    print(f"{k:24s}" + "".join(f"{r[k]:{w}.3g}" for _, _, r in rows))
  print(f"{'from ' + rows[0][0]:24s}" + "".join(
      f"{r.get('vs_first', 0.0):{w}.3g}" for _, _, r in rows))
  return 0


if __name__ == "__main__":
  sys.exit(main())
