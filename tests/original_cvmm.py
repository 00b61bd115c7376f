"""The official MoEUT in tests: where the clone is, and its CVMM op on given inputs.

The clone is looked for in the repository's ``.orig`` folder (ignored by git; how the GPU
scripts carry it) and in the workspace's ``../shared/original``; tests that need it skip
when neither holds one. :func:`original_op` runs the original's autograd op
``moeut.cvmm.CVMM`` on CUDA, or, in Triton's interpreter, on the CPU (its ``.cuda()``
calls then keep tensors where they are).
"""
from __future__ import annotations

import contextlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CANDIDATES = (os.path.join(ROOT, ".orig"),
              os.path.join(os.path.dirname(ROOT), "shared", "original"))


def find() -> str | None:
  """The first candidate folder that holds moeut/cvmm.py, or None."""
  for path in CANDIDATES:
    if os.path.isfile(os.path.join(path, "moeut", "cvmm.py")):
      return path
  return None


def required() -> str:
  """The clone's folder; skips the test when there is none."""
  path = find()
  if path is None:
    pytest.skip(f"no clone of the official MoEUT in {' or '.join(CANDIDATES)}")
  return path


def load(config):
  """The ``moeut`` package of a CvmmConfig's original_path."""
  from kernels.cvmm_original import load_original  # noqa: PLC0415
  return load_original(config.original_path)


def device() -> str:
  import torch  # noqa: PLC0415
  return "cuda" if torch.cuda.is_available() else "cpu"


@contextlib.contextmanager
def one_tile_configuration(moeut):
  """The original's autotuners hold only the configurations the binding launches (an
  autotuner with one configuration runs it without timing)."""
  from kernels import cvmm_original as co  # noqa: PLC0415
  tuners = [(moeut.cvmm.cvmm_kernel, co.FORWARD_CONFIG),
            (moeut.cvmm.cvmm_backward_kernel3, co.BACKWARD_CONFIG)]
  saved = [t.configs for t, _ in tuners]
  try:
    for t, i in tuners:
      t.configs = [t.configs[i]]
    yield
  finally:
    for (t, _), configs in zip(tuners, saved):
      t.configs = configs


def to_torch(a):
  import torch  # noqa: PLC0415
  a = np.asarray(a)
  if a.dtype == jnp.bfloat16:
    return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16).to(device())
  return torch.from_numpy(a.copy()).to(device())


def to_numpy(t):
  import torch  # noqa: PLC0415
  t = t.detach().cpu()
  if t.dtype == torch.bfloat16:
    return t.view(torch.int16).numpy().view(jnp.bfloat16)
  return t.numpy()


@contextlib.contextmanager
def _on_cpu():
  """The original's CVMM op on the CPU (Triton's interpreter): its ``.cuda()`` calls
  keep tensors on the CPU, and the interpreter takes NumPy >= 2.4's scalars."""
  import torch  # noqa: PLC0415
  from kernels.cvmm_triton.launch import _fix_interpreter_index  # noqa: PLC0415
  _fix_interpreter_index()
  cuda = torch.Tensor.cuda
  torch.Tensor.cuda = lambda self, *args, **kwargs: self
  try:
    yield
  finally:
    torch.Tensor.cuda = cuda


def original_op(moeut, x, w, g, routing, ct, dtype):
  """The original's ``CVMM`` on x [N, M, I], w [E, I, O], gates g [N, K] or None with the
  same sorted routing as the binding, the output's gradient ct; under bf16 autocast when
  ``dtype`` is bfloat16 (CUDA only), as the original trains. Its autotuners must hold one
  configuration (:func:`one_tile_configuration`). Returns (out, dx, dw[, dgates])."""
  import torch  # noqa: PLC0415
  from kernels.cvmm_original import original_sel  # noqa: PLC0415
  n, m, _ = x.shape
  sel, index, out_index = original_sel(routing, m)
  xt, wt = to_torch(x).requires_grad_(), to_torch(w).requires_grad_()
  gt = None if g is None else to_torch(g).requires_grad_()
  sel_t = to_torch(sel).reshape(n, routing.k)                # sorted experts, as [N, K]
  index_t = to_torch(index).long()                           # the original's sort: int64
  out_t = None if out_index is None else to_torch(out_index).long()
  autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if dtype == jnp.bfloat16
              else contextlib.nullcontext())
  place = contextlib.nullcontext() if device() == "cuda" else _on_cpu()
  with place:
    with autocast:
      out = moeut.cvmm.CVMM.apply(xt, index_t, sel_t, wt, out_t, gt)
    grads = torch.autograd.grad(out, [xt, wt] + ([gt] if g is not None else []),
                                to_torch(ct).to(out.dtype))
  return (to_numpy(out),) + tuple(to_numpy(a) for a in grads)


def binding(config, x, w, g, routing, ct):
  """The binding (or another impl the config names): (out, dx, dw[, dgates]) for the
  output's gradient ct."""
  from kernels import cvmm  # noqa: PLC0415
  if g is None:
    out, vjp = jax.vjp(lambda x, w: cvmm(x, routing, w, config=config), x, w)
  else:
    out, vjp = jax.vjp(lambda x, w, g: cvmm(x, routing, w, g, config=config), x, w, g)
  return (out,) + tuple(vjp(ct.astype(out.dtype)))
