"""One training run of the official PyTorch MoEUT (from a given clone) on the shared setup.

On a GPU it is the original as it trains: its Triton CVMM, float32 parameters, bf16
autocast for the forward pass (with ``dtype="bfloat16"``), the backward pass outside it.
On a CPU its CVMM op cannot run (it needs CUDA), so :func:`cvmm_standin` takes its place:
the same products and sums in plain PyTorch, float32 only.
"""
from __future__ import annotations

import contextlib
import time
import types

import numpy as np

from moeut_jax.side_by_side.shared import VOCAB, Setup, Variant


def load(path: str) -> types.ModuleType:
  """The official ``moeut`` package in folder ``path`` (kernels.cvmm_original's loader)."""
  from kernels.cvmm_original import load_original  # noqa: PLC0415
  return load_original(path)


def cvmm_standin(moeut):
  """A plain-PyTorch stand-in for the original's ``cvmm(x, sel, keys)`` (float32): what
  its op ``CVMM`` computes, written with PyTorch operations (autograd does the backward).

  Each sorted pair i multiplies input row ``sel_index[i]`` by expert ``sel[i]`` and lands
  in output row ``out_index[i]`` (``sel_index[i]`` without one); with a
  ``reduction_weight`` the rows of a token are summed with those weights."""
  import torch  # noqa: PLC0415

  def cvmm(x, sel, keys):
    if not isinstance(sel, moeut.cvmm.CVMMSel):
      sel = moeut.cvmm.cvmm_prepare_sel(sel, keys.shape[0])
    xf = x.flatten(end_dim=-2)                                        # [R, I]
    experts = sel.sel.flatten()                                       # [P] sorted
    rows = xf[sel.sel_index]                                          # [P, I]
    counts = torch.bincount(experts, minlength=keys.shape[0]).tolist()
    y = torch.cat([part @ keys[e] for e, part in enumerate(rows.split(counts))])  # [P, O]
    target = sel.sel_index if sel.out_index is None else sel.out_index
    res = y.new_zeros(y.shape).index_copy(0, target, y)
    res = res.view(*sel.sel.shape, keys.shape[-1])
    if sel.reduction_weight is not None:
      res = res.view(*sel.reduction_weight.shape, res.shape[-1])
      res = (sel.reduction_weight.unsqueeze(-2).type_as(res) @ res).squeeze(-2)
    return res

  return cvmm


@contextlib.contextmanager
def on_device(moeut, device: str):
  """The original's model module as it runs on ``device``: on a CPU its ``cvmm`` is the
  stand-in for the duration."""
  if device == "cuda":
    yield
    return
  saved = moeut.moeut.cvmm
  moeut.moeut.cvmm = cvmm_standin(moeut)
  try:
    yield
  finally:
    moeut.moeut.cvmm = saved


@contextlib.contextmanager
def attention_backends(variant: Variant):
  """PyTorch's attention backends as the variant asks: with "efficient_attention" the
  cuDNN backend is off for the duration (then as it was)."""
  import torch  # noqa: PLC0415
  if "efficient_attention" not in variant.options:
    yield
    return
  was = torch.backends.cuda.cudnn_sdp_enabled()
  torch.backends.cuda.enable_cudnn_sdp(False)
  try:
    yield
  finally:
    torch.backends.cuda.enable_cudnn_sdp(was)


def _float32(fn):
  """``fn`` with autocast off and its floating-point tensor arguments in float32."""
  import torch  # noqa: PLC0415

  def run(*args, **kwargs):
    cast = [a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
    device = next((a.device.type for a in cast if torch.is_tensor(a)), "cuda")
    with torch.autocast(device, enabled=False):
      return fn(*cast, **kwargs)
  return run


class _Functional:
  """``torch.nn.functional`` as the original's model module sees it, except that its
  ``linear`` with one of ``router_weights`` runs in float32, and with ``sdpa`` its
  ``scaled_dot_product_attention`` too."""

  def __init__(self, functional, router_weights=(), sdpa=False):
    self._functional = functional
    self._router_ids = {id(w) for w in router_weights}
    if sdpa:
      self.scaled_dot_product_attention = _float32(functional.scaled_dot_product_attention)

  def __getattr__(self, name):
    return getattr(self._functional, name)

  def linear(self, x, weight, bias=None):
    if id(weight) in self._router_ids:
      return _float32(self._functional.linear)(x, weight, bias)
    return self._functional.linear(x, weight, bias)


@contextlib.contextmanager
def float32_parts(moeut, model, variant: Variant):
  """The parts of ``model`` that the variant's float32_* options name (shared.py), out of
  autocast for the duration; nothing else changes."""
  opts = variant.options
  model_module = moeut.moeut
  saved = dict(F=model_module.F, cvmm=model_module.cvmm)
  patched = []                       # (module, the attribute set on it)
  try:
    routers = [p for name, p in model.named_parameters()
               if "float32_routers" in opts
               and name.rsplit(".", 1)[-1] in ("expert_sel", "sel_v", "sel_o")]
    if routers or "float32_sdpa" in opts:
      model_module.F = _Functional(saved["F"], routers, "float32_sdpa" in opts)
    if "float32_cvmm" in opts:
      model_module.cvmm = _float32(saved["cvmm"])
    modules = []
    for option, kind in (("float32_sigma_moe", model_module.SigmaMoE),
                         ("float32_attention", model_module.SwitchHeadCore)):
      if option in opts:
        modules += [m for m in model.modules() if isinstance(m, kind)]
    if "float32_qk" in opts:
      modules += [p for m in model.modules() if isinstance(m, model_module.SwitchHeadCore)
                  for p in (m.q, m.k)]
    patched += [(m, "forward") for m in modules]
    if "float32_rope_table" in opts:     # the table is made (and cached) by get()
      patched += [(m, "get") for m in model.modules()
                  if isinstance(m, model_module.RotaryPosEncoding)]
    for m, attr in patched:
      setattr(m, attr, _float32(getattr(m, attr)))
    yield
  finally:
    model_module.F, model_module.cvmm = saved["F"], saved["cvmm"]
    for m, attr in patched:
      if attr in vars(m):
        delattr(m, attr)


def train(setup: Setup, variant: Variant = Variant("original"), log=print,
          progress=None) -> dict:
  """Trains the original on the setup; returns its curves (see :mod:`.worker`).
  ``progress``, if given, gets the curves so far after every held-out evaluation."""
  with attention_backends(variant):
    return _train(setup, variant, log, progress)


def _train(setup: Setup, variant: Variant, log, progress=None) -> dict:
  import torch  # noqa: PLC0415
  import torch.nn.functional as F  # noqa: N812,PLC0415
  moeut = load(setup.original_path)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  bf16 = setup.dtype == "bfloat16"
  if bf16 and device != "cuda":
    raise RuntimeError("the original in bfloat16 (its autocast) needs a CUDA GPU; use "
                       "dtype float32 on a CPU")
  torch.manual_seed(setup.seed)
  model = moeut.MoEUTLM(VOCAB, **setup.model)
  model.load_state_dict({k: torch.from_numpy(v) for k, v in setup.init.items()})
  model.to(device)
  params = list(model.parameters())
  opt = torch.optim.AdamW(params, lr=float(setup.lrs[0]), betas=setup.betas, eps=setup.eps,
                          weight_decay=setup.weight_decay)
  autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else (
      contextlib.nullcontext)

  def cross_entropy(tokens):
    out = model(tokens[:, :-1])
    logits = out.outputs.float()
    ce = F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
    return ce, out.reg_loss

  def heldout() -> float:
    model.eval()
    losses = []
    with torch.no_grad(), autocast():
      for b in setup.heldout:
        losses.append(float(cross_entropy(torch.from_numpy(b).long().to(device))[0]))
    model.train()
    return float(np.mean(losses))

  train_losses, grad_norms, held, t0 = [], [], [], time.time()
  evals = set(setup.eval_steps())
  model.train()
  with on_device(moeut, device), float32_parts(moeut, model, variant):
    for s in range(setup.steps):
      tokens = torch.from_numpy(setup.train[s]).long().to(device)
      with autocast():
        ce, reg = cross_entropy(tokens)
      (ce + reg.sum()).backward()
      # the norm before clipping (an infinite bound leaves the gradients as they are)
      norm = torch.nn.utils.clip_grad_norm_(
          params, setup.grad_clip if setup.grad_clip > 0 else float("inf"))
      grad_norms.append(float(norm))
      for group in opt.param_groups:
        group["lr"] = float(setup.lrs[s])
      opt.step()
      opt.zero_grad(set_to_none=True)
      train_losses.append(float(ce))
      if s + 1 in evals:
        held.append((s + 1, heldout()))
        log(f"step {s + 1}: loss {train_losses[-1]:.4f}, held-out {held[-1][1]:.4f} "
            f"({time.time() - t0:.0f} s)")
        if progress is not None:
          progress(dict(train_loss=list(train_losses), grad_norm=list(grad_norms),
                        heldout=list(held), seconds=time.time() - t0))
  name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
  return dict(train_loss=train_losses, grad_norm=grad_norms, heldout=held,
              seconds=time.time() - t0, device=name, torch=torch.__version__)
