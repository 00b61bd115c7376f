"""Launching the Triton and Gluon kernels, and everything that touches other libraries.

On a GPU a kernel runs through ``jax_triton.triton_call``; with
``CVMM_TRITON_INTERPRET=1`` (tests on the CPU) it runs in Triton's interpreter inside a
``jax.pure_callback``. This module is the only one that knows about jax-triton's and
Triton's internals. It was written for, and tested with, jax-triton 0.3.1 and Triton 3.6:

- :func:`install_gluon_launcher` wraps jax-triton's kernel factory so that it also
  compiles ``gluon.jit`` kernels (jax-triton only knows ``triton.jit`` ones);
- :func:`_fix_interpreter_index` patches Triton 3.6's interpreter for NumPy >= 2.4.

Environment (process-level, read once at import): ``CVMM_TRITON_INTERPRET=1`` chooses
Triton's interpreter (it must be chosen before triton is first imported).
"""
from __future__ import annotations

import functools
import os
import tempfile
import threading

import jax
import jax.numpy as jnp
import numpy as np

from kernels.autotune import TileConfig

if os.environ.get("CVMM_TRITON_INTERPRET", "0") == "1":
  os.environ.setdefault("TRITON_INTERPRET", "1")

try:
  import triton
  import triton.language as tl
  jit = triton.jit
except ImportError:  # CPU-only installs: the modules import, is_available() is False
  triton = None

  class tl:  # noqa: N801  (stand-in so that the kernel signatures parse)
    @staticmethod
    def constexpr(value=None):
      return value

  def jit(fn):
    return fn


def _jax_triton():
  """jax_triton, imported without its side effect on Triton's compile cache: jax-triton
  0.3.1 sets TRITON_CACHE_DIR to "" when imported, after which every ``triton.jit``
  kernel compiled the usual way in the process (PyTorch's, the original MoEUT's) fails
  with "Could not create or locate cache dir". The variable is put back as it was."""
  before = os.environ.get("TRITON_CACHE_DIR")
  import jax_triton  # noqa: PLC0415  (needs a CUDA jaxlib; absent on CPU)
  if before is None:
    os.environ.pop("TRITON_CACHE_DIR", None)
  else:
    os.environ["TRITON_CACHE_DIR"] = before
  return jax_triton


def is_available() -> bool:
  """Whether the Triton kernels run here: Triton, jax-triton and a GPU backend, or
  Triton's interpreter (CVMM_TRITON_INTERPRET=1: tests, and tracing the GPU path on a
  CPU)."""
  if triton is not None and interpret():
    return True
  if triton is None or jax.default_backend() != "gpu":
    return False
  try:
    _jax_triton()
  except ImportError:
    return False
  return True


def compute_capability() -> float:
  """The default device's CUDA compute capability (0.0 on the CPU)."""
  return float(getattr(jax.devices()[0], "compute_capability", "0.0"))


def hopper() -> bool:
  """Whether the default device runs the sm90-only code (the Gluon kernels' wgmma, the
  16-bit vector reductions): a Hopper GPU, not Triton's interpreter."""
  return not interpret() and 9.0 <= compute_capability() < 10.0


def dummy_f32() -> jax.Array:
  """A placeholder for a kernel's unused pointer argument."""
  return jnp.zeros((1,), jnp.float32)


def interpret() -> bool:
  """CVMM_TRITON_INTERPRET=1 runs the kernels in Triton's CPU interpreter (tests)."""
  return os.environ.get("CVMM_TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _fix_interpreter_index():
  """Triton 3.6's interpreter turns scalars into 1-element arrays and converts them to
  loop bounds with int(), which NumPy >= 2.4 refuses; take the element explicitly."""
  import triton.runtime.interpreter as interp  # noqa: PLC0415
  orig = interp._patch_lang_tensor

  def patched(tensor, scope):
    orig(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

  interp._patch_lang_tensor = patched


def _to_torch(a: np.ndarray):
  import torch  # noqa: PLC0415  (interpreter only)
  if a.dtype == jnp.bfloat16:
    return torch.from_numpy(np.array(a).view(np.int16)).view(torch.bfloat16)
  return torch.from_numpy(np.array(a))


def _from_torch(t) -> np.ndarray:
  import torch  # noqa: PLC0415
  if t.dtype == torch.bfloat16:
    return t.view(torch.int16).numpy().view(jnp.bfloat16)
  return t.numpy()


# Triton's interpreter patches triton.language while a kernel runs, and XLA's CPU runtime
# may run independent host callbacks at the same time: one kernel at a time.
_INTERPRETER_LOCK = threading.Lock()


def launch(kernel, args, out_shapes, grid, cfg, zeroed=(), aliases=None, **meta):
  """jax_triton.triton_call on GPUs; a host callback into Triton's interpreter in tests.
  ``args``: arrays, and Python ints for the kernel's scalar (not constexpr) arguments,
  in the kernel's order; the output pointers follow them. ``grid``: an int or a tuple of
  up to three. ``cfg``: anything with ``num_warps`` and ``num_stages``.
  ``aliases``: {array input index: output index} whose buffers the GPU launch shares (the
  interpreter starts such an output as a copy of its input, as the GPU sees it).
  ``zeroed``: output indices that start as zeros (any other output is undefined)."""
  grid = (grid,) if isinstance(grid, int) else tuple(grid)
  if not interpret():
    jt = _jax_triton()
    return jt.triton_call(*args, kernel=kernel, out_shape=out_shapes, grid=grid,
                          num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                          zeroed_outputs=tuple(zeroed),
                          input_output_aliases=dict(aliases or {}), **meta)

  from triton.runtime.interpreter import InterpretedFunction  # noqa: PLC0415
  if not isinstance(kernel, InterpretedFunction):
    raise RuntimeError("CVMM_TRITON_INTERPRET=1 must be set before triton is imported")
  fn = kernel
  _fix_interpreter_index()
  scalars = {i: a for i, a in enumerate(args) if isinstance(a, int)}
  arrays = [a for i, a in enumerate(args) if i not in scalars]

  def host(*host_arrays):
    tensors = [_to_torch(np.asarray(a)) for a in host_arrays]
    it = iter(tensors)
    ins = [scalars[i] if i in scalars else next(it) for i in range(len(args))]
    shared = {o: i for i, o in (aliases or {}).items()}
    outs = [tensors[shared[i]].clone() if i in shared else
            _to_torch(np.zeros(s.shape, s.dtype)) if i in zeroed else
            _to_torch(np.full(s.shape, np.nan if jnp.issubdtype(s.dtype, jnp.floating)
                              else -1, s.dtype)) for i, s in enumerate(out_shapes)]
    with _INTERPRETER_LOCK:
      fn[grid](*ins, *outs, **meta)
    return tuple(_from_torch(o) for o in outs)

  return list(jax.pure_callback(host, tuple(out_shapes), *arrays))


def _cache_dir_fallback():
  """Triton's compile cache (``triton.knobs.cache.dir``: TRITON_CACHE_DIR, else under
  $HOME). Where it is empty (TRITON_CACHE_DIR set to "": jax-triton's import did that
  before :func:`_jax_triton` put it back, and a user may set it so) or cannot be
  written, ``triton.compile`` fails; use a temporary directory instead."""
  from triton import knobs  # noqa: PLC0415
  d = knobs.cache.dir
  if d:
    try:
      os.makedirs(d, exist_ok=True)
      if os.access(d, os.W_OK):
        return
    except OSError:
      pass
  os.environ["TRITON_CACHE_DIR"] = os.path.join(tempfile.gettempdir(), "triton_cache")


def compile_gluon(fn, signature: dict, constants: dict, attrs: dict, cc: int,
                  num_warps: int, num_stages: int = 3, num_ctas: int = 1,
                  enable_fp_fusion: bool = True):
  """Compiles a ``gluon.jit`` kernel with Triton's own pipeline (no GPU needed)."""
  from triton.backends.compiler import GPUTarget  # noqa: PLC0415
  from triton.experimental.gluon._runtime import GluonASTSource  # noqa: PLC0415
  _cache_dir_fallback()
  options = dict(num_warps=num_warps, num_stages=num_stages, num_ctas=num_ctas,
                 enable_fp_fusion=enable_fp_fusion)
  return triton.compile(GluonASTSource(fn, signature, constants, attrs),
                        target=GPUTarget("cuda", cc, 32), options=options)


def install_gluon_launcher():
  """Lets ``jax_triton.triton_call`` launch ``gluon.jit`` kernels (jax-triton 0.3.1).

  jax-triton compiles every kernel through ``ASTSource`` and ``make_ttir``, which a
  Gluon kernel (it emits TTGIR itself) cannot take. Its kernel factory is wrapped here:
  Gluon kernels are compiled by :func:`compile_gluon` and their PTX handed to
  jax-triton's launch layer (``TritonKernel``); other kernels take jax-triton's path
  unchanged. Kernels that need global scratch memory are refused (jax-triton does not
  provide it). Idempotent."""
  tlib = _jax_triton().triton_lib
  from triton.experimental.gluon._runtime import GluonJITFunction  # noqa: PLC0415
  orig = tlib.get_or_create_triton_kernel
  if getattr(orig, "_gluon", False):
    return
  cache = {}

  def factory(backend_init_func, platform, fn, arg_dtypes, scalar_args, *, num_warps,
              num_stages, num_ctas, compute_capability, enable_fp_fusion, metaparams,
              dump):
    if not isinstance(fn, GluonJITFunction):
      return orig(backend_init_func, platform, fn, arg_dtypes, scalar_args,
                  num_warps=num_warps, num_stages=num_stages, num_ctas=num_ctas,
                  compute_capability=compute_capability, enable_fp_fusion=enable_fp_fusion,
                  metaparams=metaparams, dump=dump)
    if platform != "cuda":
      raise NotImplementedError(f"Gluon kernels on {platform}")
    num_warps = 4 if num_warps is None else num_warps
    num_stages = 3 if num_stages is None else num_stages
    cc = compute_capability or tlib.triton_kernel_call_lib.get_compute_capability(0)
    signature = {fn.arg_names[i]: v for i, v in enumerate(arg_dtypes)}
    constants = dict(metaparams)
    constants.update({fn.arg_names[i]: None for i, _, v in scalar_args if v is None})
    constants.update({fn.arg_names[i]: 1 for i, _, v in scalar_args if v == 1})
    for name in constants:
      signature[name] = "constexpr"
    # jax-triton's arrays are 16-byte aligned (its own assumption for Triton kernels)
    attrs = {(i,): [["tt.divisibility", 16]] for i, d in enumerate(arg_dtypes)
             if d.startswith("*")}
    key = (fn, tuple(signature.items()), tuple(constants.items()), num_warps, num_stages,
           num_ctas, cc, enable_fp_fusion)
    if key not in cache:
      k = compile_gluon(fn, signature, constants, attrs, cc, num_warps, num_stages,
                        num_ctas, enable_fp_fusion)
      md = k.metadata
      if md.global_scratch_size:
        raise NotImplementedError(
            f"{md.name} needs {md.global_scratch_size} bytes of global scratch, which "
            "jax-triton does not provide")
      cache[key] = tlib.triton_kernel_call_lib.TritonKernel(
          md.name, md.num_warps, num_ctas, md.shared, k.asm["ptx"], "", cc)
    return cache[key], attrs

  factory._gluon = True
  tlib.get_or_create_triton_kernel = factory
