"""What every run of a comparison shares: tokens, initial weights, learning rates, settings.

:func:`prepare` writes them once into the output folder (``setup.json`` and ``setup.npz``);
each variant's process reads them back with :meth:`Setup.load`. Tokens are bytes (a
vocabulary of 256): the text's first part trains, its last ``heldout_fraction`` is held
out. Training batch s takes ``batch`` windows of ``seq + 1`` bytes at offsets drawn from
``seed``; the held-out batches take windows spread evenly over the held-out part.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from typing import Any, Optional

import numpy as np

VOCAB = 256
OPTIONS = ("original_routers", "original_cvmm", "original_rope")
# Options of the original's runs: "efficient_attention" turns PyTorch's cuDNN attention
# backend off, so that its scaled_dot_product_attention (called with a boolean mask) runs
# the memory-efficient kernel (PyTorch prefers cuDNN's on Hopper with a recent cuDNN).
# The float32_* options take one part of the original out of its bf16 autocast (inputs
# cast to float32, autocast off inside), to find which part's 16-bit rounding changes its
# training: float32_routers its routers' logits (the F.linear of SigmaMoE.forward and
# SwitchHeadCore.get_sel: moeut-jax's default router_dtype), float32_cvmm every CVMM call
# (its Triton kernels then run in float32), float32_sigma_moe the whole σ-MoE modules,
# float32_attention the whole SwitchHead modules (projections, RoPE, attention),
# float32_qk its q and k projections, float32_sdpa its scaled_dot_product_attention,
# float32_rope_table its RoPE angle table (which CUDA's autocast makes in bf16:
# docs/semantics.md §7).
ORIGINAL_OPTIONS = ("efficient_attention", "float32_routers", "float32_cvmm",
                    "float32_sigma_moe", "float32_attention", "float32_qk", "float32_sdpa",
                    "float32_rope_table")
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py")


@dataclasses.dataclass(frozen=True)
class Variant:
  """One run: ``kind`` "original" (with ``ORIGINAL_OPTIONS``) or "jax" (with
  ``OPTIONS``)."""
  kind: str
  options: tuple[str, ...] = ()

  @property
  def name(self) -> str:
    return "+".join((self.kind,) + self.options)


def file_stem(label: str) -> str:
  """A run's label as a file name: characters other than letters, digits, ``.``, ``_``
  and ``-`` become ``_`` ("original#1" -> "original_1", "jax+original_cvmm" ->
  "jax_original_cvmm"), so that the files copy and archive anywhere."""
  return re.sub(r"[^A-Za-z0-9._-]", "_", label)


def parse_variant(text: str) -> Variant:
  """"original[+OPTION]" (ORIGINAL_OPTIONS), "jax" or "jax+OPTION[+OPTION...]" (OPTIONS);
  a clear error otherwise."""
  kind, *options = text.strip().split("+")
  if kind not in ("original", "jax"):
    raise ValueError(f"variant {text!r}: expected 'original[+OPTION]' with OPTION one of "
                     f"{ORIGINAL_OPTIONS}, 'jax' or 'jax+OPTION' with OPTION one of {OPTIONS}")
  allowed = ORIGINAL_OPTIONS if kind == "original" else OPTIONS
  bad = [o for o in options if o not in allowed]
  if bad or len(set(options)) != len(options):
    raise ValueError(f"variant {text!r}: options must be distinct, from {allowed}")
  return Variant(kind, tuple(sorted(options, key=allowed.index)))


def labels(variants: list[Variant]) -> list[str]:
  """Names of the runs; a variant given more than once is numbered (original#1, #2)."""
  counts = {}
  for v in variants:
    counts[v.name] = counts.get(v.name, 0) + 1
  seen, out = {}, []
  for v in variants:
    seen[v.name] = seen.get(v.name, 0) + 1
    out.append(f"{v.name}#{seen[v.name]}" if counts[v.name] > 1 else v.name)
  return out


def learning_rates(lr: float, steps: int, warmup: int, min_ratio: float = 0.1) -> np.ndarray:
  """[steps] float32: linear warm-up to ``lr`` over ``warmup`` steps, then cosine decay to
  ``min_ratio * lr`` (train.py's schedule; entry s is the rate of update s)."""
  out = []
  floor = lr * min_ratio
  for s in range(steps):
    if s < warmup:
      out.append(lr * min((s + 1) / max(warmup, 1), 1.0))
    else:
      progress = min(max((s - warmup) / max(steps - warmup, 1), 0.0), 1.0)
      out.append(floor + 0.5 * (lr - floor) * (1 + math.cos(math.pi * progress)))
  return np.asarray(out, np.float32)


def read_text(paths: list[str], max_bytes: int) -> bytes:
  """The bytes of the given files, and of the text files (TEXT_SUFFIXES) under the given
  folders, in sorted order, joined by newlines, at most ``max_bytes``."""
  files = []
  for path in paths:
    if os.path.isdir(path):
      for folder, dirs, names in os.walk(path):
        dirs.sort()
        files += [os.path.join(folder, n) for n in sorted(names) if n.endswith(TEXT_SUFFIXES)]
    elif os.path.isfile(path):
      files.append(path)
    else:
      raise FileNotFoundError(f"--text {path!r}: no such file or folder")
  parts, size = [], 0
  for f in files:
    with open(f, "rb") as fh:
      data = fh.read(max_bytes - size)
    parts.append(data)
    size += len(data) + 1
    if size >= max_bytes:
      break
  return b"\n".join(parts)[:max_bytes]


def batches(text: bytes, *, batch: int, seq: int, steps: int, eval_batches: int,
            heldout_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(train [steps, B, seq+1], heldout [eval_batches, B, seq+1]) int32 byte tokens."""
  tokens = np.frombuffer(text, np.uint8).astype(np.int32)
  cut = int(len(tokens) * (1 - heldout_fraction))
  train, held = tokens[:cut], tokens[cut:]
  need = seq + 1
  if len(train) < need or len(held) < need:
    raise ValueError(f"the text has {len(tokens):,} bytes: too few for windows of "
                     f"{need} bytes in both the training part and the held-out "
                     f"{heldout_fraction:.0%}")
  rng = np.random.default_rng(seed)
  starts = rng.integers(0, len(train) - need + 1, (steps, batch))
  train_b = train[starts[..., None] + np.arange(need)]                  # [S, B, T+1]
  n = eval_batches * batch
  held_starts = np.linspace(0, len(held) - need, n).astype(np.int64)
  held_b = held[held_starts[:, None] + np.arange(need)].reshape(eval_batches, batch, need)
  return train_b, held_b


@dataclasses.dataclass
class Setup:
  """Everything the runs share. ``model`` holds MoEUTLM's keyword arguments."""
  model: dict
  original_path: str
  steps: int
  batch: int
  seq: int
  dtype: str                       # "float32" or "bfloat16" (compute; the original's autocast)
  grad_clip: float
  weight_decay: float
  betas: tuple
  eps: float
  eval_every: int
  scan_unroll: int
  seed: int
  train: Optional[np.ndarray] = None       # [steps, B, seq+1]
  heldout: Optional[np.ndarray] = None     # [eval_batches, B, seq+1]
  lrs: Optional[np.ndarray] = None         # [steps] float32
  init: Optional[dict] = None              # the original's state dict (numpy)

  _ARRAYS = ("train", "heldout", "lrs")

  def settings(self) -> dict[str, Any]:
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    for name in self._ARRAYS + ("init",):
      del d[name]
    d["betas"] = list(self.betas)
    return d

  def eval_steps(self) -> list[int]:
    """Steps after which the held-out loss is measured (every eval_every, and the last)."""
    return sorted(set(range(self.eval_every, self.steps + 1, self.eval_every)) | {self.steps})

  def digest(self) -> str:
    """sha256 of the batches, learning rates and initial weights: runs whose setups have
    the same digest and settings can be compared, whichever folder or call made them."""
    h = hashlib.sha256()
    arrays = [("train", self.train), ("heldout", self.heldout), ("lrs", self.lrs)]
    arrays += sorted(("init/" + k, v) for k, v in self.init.items())
    for name, a in arrays:
      a = np.ascontiguousarray(a)
      h.update(f"{name}:{a.dtype.str}:{a.shape};".encode())
      h.update(a.tobytes())
    return h.hexdigest()

  def save(self, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "setup.json"), "w", encoding="utf-8") as f:
      json.dump(dict(self.settings(), digest=self.digest()), f, indent=2)
    np.savez(os.path.join(out, "setup.npz"), train=self.train, heldout=self.heldout,
             lrs=self.lrs, **{"init/" + k: v for k, v in self.init.items()})

  @classmethod
  def load(cls, out: str) -> "Setup":
    with open(os.path.join(out, "setup.json"), encoding="utf-8") as f:
      d = json.load(f)
    d["betas"] = tuple(d["betas"])
    d.pop("digest", None)
    with np.load(os.path.join(out, "setup.npz")) as z:
      arrays = {k: z[k] for k in z.files}
    init = {k[len("init/"):]: v for k, v in arrays.items() if k.startswith("init/")}
    return cls(**d, train=arrays["train"], heldout=arrays["heldout"], lrs=arrays["lrs"],
               init=init)


def prepare(*, model: dict, original_path: str, text: bytes, steps: int, batch: int, seq: int,
            dtype: str, lr: float = 2.5e-4, warmup: Optional[int] = None,
            grad_clip: float = 0.25, weight_decay: float = 0.01,
            betas: tuple = (0.9, 0.999), eps: float = 1e-8, eval_every: int = 50,
            eval_batches: int = 8, heldout_fraction: float = 0.1, scan_unroll: int = 1,
            seed: int = 0) -> Setup:
  """The shared setup: batches of ``text``, the learning rates (warm-up: ``steps // 10``
  unless given), and the initial weights, made by the original's own initialisation
  (``torch.manual_seed(seed)``, on the CPU)."""
  import torch  # noqa: PLC0415
  from moeut_jax.side_by_side.original import load  # noqa: PLC0415
  if dtype not in ("float32", "bfloat16"):
    raise ValueError(f"dtype={dtype!r}: float32 or bfloat16")
  for name, value in (("steps", steps), ("batch", batch), ("seq", seq),
                      ("eval_every", eval_every), ("eval_batches", eval_batches)):
    if value < 1:
      raise ValueError(f"{name}={value} must be a positive integer")
  warmup = steps // 10 if warmup is None else warmup
  train, held = batches(text, batch=batch, seq=seq, steps=steps, eval_batches=eval_batches,
                        heldout_fraction=heldout_fraction, seed=seed)
  moeut = load(original_path)
  torch.manual_seed(seed)
  init = {k: v.detach().numpy().copy()
          for k, v in moeut.MoEUTLM(VOCAB, **model).state_dict().items()}
  return Setup(model=dict(model), original_path=original_path, steps=steps, batch=batch,
               seq=seq, dtype=dtype, grad_clip=grad_clip, weight_decay=weight_decay,
               betas=tuple(betas), eps=eps, eval_every=eval_every, scan_unroll=scan_unroll,
               seed=seed, train=train, heldout=held,
               lrs=learning_rates(lr, steps, warmup), init=init)
