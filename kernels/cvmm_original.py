"""CVMM by the original σ-MoE Triton kernels, loaded from a clone of the official MoEUT.

``CvmmConfig(impl="original", original_path=PATH)`` runs the kernels of the official
implementation's ``moeut/cvmm.py`` (MIT licence; loaded from PATH at run time, nothing of
it is copied here) through jax-triton, with the numerics of its autograd function
``CVMM``:

  forward   ``cvmm_kernel``: each sorted (token, slot) pair's row times its expert's
            matrix, both rounded to the output dtype in the kernel (x's dtype here; the
            original's autocast dtype), float32 accumulation, [P, O] rounded to that
            dtype. With gates (the original's ``reduction_weight``) the slots are then
            summed as ``gates.type_as(y) @ y``: gates rounded to x's dtype, a float32
            sum of K products, rounded once.
  backward  the weight gradient by ``cvmm_backward_kernel3`` (float32 atomics into w's
            dtype: the original's parameters are float32 and so is their gradient), the
            input gradient by ``cvmm_kernel`` on the transposed weights, and, with gates,
            the gates' gradient as dot products of its unscaled rows with x, in the gates'
            dtype; as ``CVMM.backward`` does.

w may be float32 while x is 16-bit (the model passes its float32 parameters): the kernels
round w in registers, as the original does with its float32 parameters under autocast.

Launching. The original's kernels take their output pointer third, and jax-triton
passes output pointers after every input and scalar, so each kernel is called through a
wrapper kernel whose only body is a call of the original's (inlined by Triton: the
compiled code is the original's). The original picks a tile configuration per shape with
``triton.autotune`` (timed on first use, so it can differ from run to run and GPU to
GPU); here the configuration is fixed, taken from the original's own lists by index
(:data:`FORWARD_CONFIG`, :data:`BACKWARD_CONFIG`), so that runs repeat and compile one
kernel per call site. The GPU tests run the original's op with the same configuration
and compare bit for bit.

Routing: the original sorts the flattened expert indices (``sel``) and reads input row
``sel_index`` and writes output row ``out_index`` of each sorted pair. From a
:class:`~kernels.Routing`: ``sel = routing.sorted_expert()``, ``out_index = order`` and
``sel_index = order // (K // M)``; with M = K (σ-MoE's down projection) the two are equal
and the original passes no ``out_index``, as here.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import sys
import types

import jax
import jax.numpy as jnp

from kernels.config import check_original_path
from kernels.cvmm_triton import launch as _launch
from kernels.cvmm_triton.launch import tl
from kernels.routing import Routing

# Indices into the original's autotune lists (cvmm_kernel.configs and
# cvmm_backward_kernel3.configs of its moeut/cvmm.py): BLOCK 128 x 128 x 32, 4 warps,
# 4 stages for the products, and 64 x 64 x 16 with K_BLOCKS 64 for the weight gradient.
FORWARD_CONFIG = 3
BACKWARD_CONFIG = 0

# The original's dtype ids (its dtype_to_type_id).
_DTYPE_IDS = {jnp.dtype(jnp.float32): 0, jnp.dtype(jnp.float16): 1,
              jnp.dtype(jnp.bfloat16): 2}

_FORWARD_NAME, _BACKWARD_NAME = "cvmm_kernel", "cvmm_backward_kernel3"


def is_available() -> bool:
  """Whether the original's kernels can run here: Triton with jax-triton on a GPU, or
  Triton's interpreter (CVMM_TRITON_INTERPRET=1, tests)."""
  return _launch.triton is not None and (_launch.interpret() or _launch.is_available())


def load_original(path: str) -> types.ModuleType:
  """The ``moeut`` package of the official MoEUT in folder ``path``, imported once.

  It is imported under its own name ``moeut`` (its ``cvmm.py`` registers a PyTorch
  operator, which can happen once per process), without adding ``path`` to
  ``sys.path`` (the folder also holds a ``profiles.py``). It needs torch and triton.
  """
  return _load(check_original_path(path))


@functools.lru_cache(maxsize=None)
def _load(full: str) -> types.ModuleType:
  loaded = sys.modules.get("moeut")
  if loaded is not None:
    where = os.path.abspath(getattr(loaded, "__file__", "") or "")
    if not where.startswith(os.path.join(full, "moeut") + os.sep):
      raise ImportError(f"a package 'moeut' is already imported from {where}, not from "
                        f"{full}: one process can load one copy of the original")
    return loaded
  for dep in ("torch", "triton"):
    if importlib.util.find_spec(dep) is None:
      raise ImportError(f"the official MoEUT in {full} imports {dep}, which is not "
                        f"installed (pip install {dep})")
  pkg_dir = os.path.join(full, "moeut")
  spec = importlib.util.spec_from_file_location(
      "moeut", os.path.join(pkg_dir, "__init__.py"), submodule_search_locations=[pkg_dir])
  module = importlib.util.module_from_spec(spec)
  sys.modules["moeut"] = module
  try:
    spec.loader.exec_module(module)
  except BaseException:
    for name in [n for n in sys.modules if n == "moeut" or n.startswith("moeut.")]:
      del sys.modules[name]
    raise
  return module


# The wrappers: the original's kernels with their output pointer moved behind the
# inputs and scalars (jax-triton's argument order). ORIGINAL is the original's kernel,
# set in each wrapper's own globals by _wrapped (Triton resolves it at compile time).
def _forward_wrapper(
    a_ptr, b_ptr, index_ptr, sel_ptr, out_index_ptr, M, N, K,
    stride_am, stride_ak, stride_bo, stride_bk, stride_bn, stride_cm, stride_cn,
    stride_index, stride_sel, stride_out_index,
    c_ptr,
    out_index_is_none: tl.constexpr, dtype_id: tl.constexpr, allow_tf32: tl.constexpr,
    BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_K: tl.constexpr,
    GROUP_SIZE_M: tl.constexpr):
  ORIGINAL(a_ptr, b_ptr, c_ptr, index_ptr, sel_ptr, out_index_ptr, M, N, K,  # noqa: F821
           stride_am, stride_ak, stride_bo, stride_bk, stride_bn, stride_cm, stride_cn,
           stride_index, stride_sel, stride_out_index,
           out_index_is_none=out_index_is_none, dtype_id=dtype_id, allow_tf32=allow_tf32,
           BLOCK_SIZE_M=BLOCK_SIZE_M, BLOCK_SIZE_N=BLOCK_SIZE_N,
           BLOCK_SIZE_K=BLOCK_SIZE_K, GROUP_SIZE_M=GROUP_SIZE_M)


def _backward_wrapper(
    a_ptr, b_ptr, index_ptr, sel_ptr, out_index_ptr, M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_co, stride_cm, stride_cn,
    stride_index, stride_sel, stride_out_index,
    c_ptr,
    out_index_is_none: tl.constexpr, out_dtype_id: tl.constexpr, allow_tf32: tl.constexpr,
    dtype_id: tl.constexpr,
    BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_K: tl.constexpr,
    GROUP_SIZE_M: tl.constexpr, K_BLOCKS: tl.constexpr):
  ORIGINAL(a_ptr, b_ptr, c_ptr, index_ptr, sel_ptr, out_index_ptr, M, N, K,  # noqa: F821
           stride_am, stride_ak, stride_bk, stride_bn, stride_co, stride_cm, stride_cn,
           stride_index, stride_sel, stride_out_index,
           out_index_is_none=out_index_is_none, out_dtype_id=out_dtype_id,
           allow_tf32=allow_tf32, dtype_id=dtype_id,
           BLOCK_SIZE_M=BLOCK_SIZE_M, BLOCK_SIZE_N=BLOCK_SIZE_N,
           BLOCK_SIZE_K=BLOCK_SIZE_K, GROUP_SIZE_M=GROUP_SIZE_M, K_BLOCKS=K_BLOCKS)


class OriginalKernels(types.SimpleNamespace):
  """The original's two kernels, wrapped for jax-triton, and their autotune lists.

  forward, backward: the wrapper kernels; forward_configs, backward_configs: the
  original's ``triton.Config`` lists, in its order."""


def _wrapped(template, original_kernel):
  """A copy of ``template`` whose ORIGINAL is ``original_kernel``, jitted."""
  scope = dict(template.__globals__, ORIGINAL=original_kernel)
  fn = types.FunctionType(template.__code__, scope, template.__name__)
  return _launch.triton.jit(fn)


@functools.lru_cache(maxsize=None)
def original_kernels(path: str) -> OriginalKernels:
  """The kernels of the official MoEUT in folder ``path`` (see the module docstring)."""
  module = load_original(path)
  found = {}
  for name in (_FORWARD_NAME, _BACKWARD_NAME):
    tuner = getattr(module.cvmm, name, None)
    if tuner is None or not hasattr(tuner, "fn") or not getattr(tuner, "configs", None):
      raise ImportError(f"{module.cvmm.__file__} has no autotuned Triton kernel {name}: "
                        "not the official MoEUT's moeut/cvmm.py")
    found[name] = tuner
  fwd, bwd = found[_FORWARD_NAME], found[_BACKWARD_NAME]
  return OriginalKernels(forward=_wrapped(_forward_wrapper, fwd.fn),
                         backward=_wrapped(_backward_wrapper, bwd.fn),
                         forward_configs=list(fwd.configs), backward_configs=list(bwd.configs))


def _dtype_id(dtype) -> int:
  dtype = jnp.dtype(dtype)
  if dtype not in _DTYPE_IDS:
    raise TypeError(f"the original's CVMM kernels take float32, float16 or bfloat16, "
                    f"not {dtype}")
  return _DTYPE_IDS[dtype]


def _cdiv(a: int, b: int) -> int:
  return -(-a // b)


def forward_rows(kernels: OriginalKernels, a: jax.Array, w: jax.Array, index: jax.Array,
                 sel: jax.Array, out_index: jax.Array | None, *, transpose_w: bool = False,
                 config: int = FORWARD_CONFIG) -> jax.Array:
  """The original's ``cvmm_triton``: out[out_index[p]] = a[index[p]] @ w[sel[p]] (or
  w[sel[p]]^T), rows [P, O'] in a's dtype; out_index None: out[index[p]].

  a [R, I'] (I' = O with ``transpose_w``), w [E, I, O], index, sel, out_index [P] int32.
  """
  cfg = kernels.forward_configs[config]
  e, i, o = w.shape
  k_in, n_out = (o, i) if transpose_w else (i, o)
  # strides of w, or of its transposed view [E, O, I] (the same memory, as the original's
  # keys.transpose(1, 2))
  stride_bk, stride_bn = (1, o) if transpose_w else (o, 1)
  p = sel.shape[0]
  none = out_index is None
  grid = _cdiv(p, cfg.kwargs["BLOCK_SIZE_M"]) * _cdiv(n_out, cfg.kwargs["BLOCK_SIZE_N"])
  args = [a, w, index, sel, index if none else out_index,
          p, n_out, k_in, a.shape[1], 1, i * o, stride_bk, stride_bn, n_out, 1,
          1, 1, 0 if none else 1]
  (out,) = _launch.launch(kernels.forward, args,
                          [jax.ShapeDtypeStruct((p, n_out), a.dtype)], grid, cfg,
                          out_index_is_none=none, dtype_id=_dtype_id(a.dtype),
                          allow_tf32=False, **cfg.kwargs)
  return out


def weight_grad(kernels: OriginalKernels, x: jax.Array, g: jax.Array, index: jax.Array,
                sel: jax.Array, out_index: jax.Array | None, n_experts: int, out_dtype,
                *, config: int = BACKWARD_CONFIG) -> jax.Array:
  """The original's ``cvmm_triton_backward``: dW[e] = sum over sorted pairs p of expert
  e of x[index[p]]^T g[out_index[p]] (out_index None: g[index[p]]), products in x's
  dtype, float32 atomics into [E, I, O] of ``out_dtype``.

  x [R, I], g [P, O], index, sel, out_index [P] int32.
  """
  cfg = kernels.backward_configs[config]
  i, o = x.shape[1], g.shape[1]
  p = g.shape[0]
  none = out_index is None
  kw = cfg.kwargs
  grid = (_cdiv(i, kw["BLOCK_SIZE_M"]) * _cdiv(o, kw["BLOCK_SIZE_N"]),
          _cdiv(p, kw["BLOCK_SIZE_K"] * kw["K_BLOCKS"]))
  # x enters transposed, [I, R] (strides 1, I), as the original's x.transpose(0, 1)
  args = [x, g, index, sel, index if none else out_index,
          i, o, p, 1, i, o, 1, i * o, o, 1, 1, 1, 0 if none else 1]
  (out,) = _launch.launch(kernels.backward, args,
                          [jax.ShapeDtypeStruct((n_experts, i, o), out_dtype)], grid, cfg,
                          zeroed=(0,), out_index_is_none=none,
                          out_dtype_id=_dtype_id(out_dtype), allow_tf32=False,
                          dtype_id=_dtype_id(x.dtype), **kw)
  return out


def original_sel(routing: Routing, m: int):
  """(sel, sel_index, out_index or None) of the original for x of M rows per token."""
  r = routing.k // m
  order = routing.order
  sel = routing.sorted_expert()
  if r == 1:
    return sel, order, None
  return sel, order // r, order


def cvmm_original(x: jax.Array, routing: Routing, w: jax.Array,
                  gates: jax.Array | None = None, *, config) -> jax.Array:
  """See :func:`kernels.cvmm`. x [N, M, I] (float32, float16 or bfloat16), w [E, I, O]
  in any of those (rounded to x's dtype in the kernels; its gradient in w's dtype),
  gates [N, K] or None. ``config``: a CvmmConfig with ``original_path``."""
  _dtype_id(x.dtype)
  _dtype_id(w.dtype)
  plain, gated = _ops(config.original_path, FORWARD_CONFIG, BACKWARD_CONFIG)
  if gates is None:
    return plain(x, w, routing)
  _dtype_id(gates.dtype)
  return gated(x, w, gates, routing)


_HIGHEST = jax.lax.Precision.HIGHEST


def _rounded_dot(spec: str, a: jax.Array, b: jax.Array, dtype) -> jax.Array:
  """einsum of a and b in ``dtype``, float32 accumulation, rounded once to ``dtype``:
  the original's small batched matmuls (cuBLAS accumulates in float32; float32 ones
  without TF32, PyTorch's default)."""
  return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), precision=_HIGHEST,
                    preferred_element_type=jnp.float32).astype(dtype)


@functools.lru_cache(maxsize=None)
def _ops(path: str, fwd_config: int, bwd_config: int):
  """The custom_vjp ops (without and with gates) of the original's kernels in ``path``
  with the given tile configurations."""
  kernels = original_kernels(path)

  def rows(x, w, routing):
    """Per-pair rows [P, O] in x's dtype."""
    n, m, i = x.shape
    sel, index, out_index = original_sel(routing, m)
    return forward_rows(kernels, x.reshape(n * m, i), w, index, sel, out_index,
                        config=fwd_config)

  def dx_rows(g_rows, w, routing, per_token: bool, dtype):
    """The input gradient's unscaled rows [P, I] by slot: g_rows [P, O] by slot, or
    [N, O] by token (``per_token``, the gated case)."""
    sel, order = routing.sorted_expert(), routing.order
    if per_token:       # the original's bw_index = out_index // K, out at out_index
      return forward_rows(kernels, g_rows.astype(dtype), w, order // routing.k, sel, order,
                          transpose_w=True, config=fwd_config)
    return forward_rows(kernels, g_rows.astype(dtype), w, order, sel, None,
                        transpose_w=True, config=fwd_config)

  def dw(x, g_rows, w, routing):
    n, m, i = x.shape
    sel, index, out_index = original_sel(routing, m)
    return weight_grad(kernels, x.reshape(n * m, i), g_rows, index, sel, out_index,
                       w.shape[0], w.dtype, config=bwd_config)

  # Without gates: y [N, K, O].
  @jax.custom_vjp
  def plain(x, w, routing):
    return _fwd(x, w, routing)[0]

  def _fwd(x, w, routing):
    n = x.shape[0]
    return rows(x, w, routing).reshape(n, routing.k, w.shape[2]), (x, w, routing)

  def _bwd(res, dy):
    x, w, routing = res
    n, m, i = x.shape
    k = routing.k
    dy2 = dy.astype(x.dtype).reshape(n * k, w.shape[2])                   # [P, O]
    full = dx_rows(dy2, w, routing, False, x.dtype).reshape(n, m, k // m, i)
    # the original sums a token's slots (M = 1) in x's dtype, float32 accumulation
    dx = full[:, :, 0] if k == m else full.astype(jnp.float32).sum(2).astype(x.dtype)
    return dx, dw(x, dy2, w, routing), None

  plain.defvjp(_fwd, _bwd)

  # With gates: out [N, O] = sum_s gates[n, s] y[n, s], in x's dtype.
  @jax.custom_vjp
  def gated(x, w, gates, routing):
    return _fwd_gated(x, w, gates, routing)[0]

  def _fwd_gated(x, w, gates, routing):
    n = x.shape[0]
    y = rows(x, w, routing).reshape(n, routing.k, w.shape[2])               # [N, K, O]
    out = _rounded_dot("NK,NKO->NO", gates, y, x.dtype)
    return out, (x, w, gates, routing)

  def _bwd_gated(res, dout):
    x, w, gates, routing = res
    n, m, i = x.shape
    k = routing.k
    dt = x.dtype
    dout = dout.astype(dt)                                                 # [N, O]
    # the weight gradient's rows: gates times the output gradient, rounded to x's dtype
    g_rows = (gates.astype(dt)[:, :, None] * dout[:, None, :]).reshape(n * k, -1)
    full = dx_rows(dout, w, routing, True, dt).reshape(n, m, k // m, i)   # unscaled
    dx = _rounded_dot("NMR,NMRI->NMI", gates.reshape(n, m, k // m), full, dt)
    dg = _rounded_dot("NMRI,NMI->NMR", full, x, gates.dtype).reshape(n, k)
    return dx, dw(x, g_rows, w, routing), dg, None

  gated.defvjp(_fwd_gated, _bwd_gated)
  return plain, gated
