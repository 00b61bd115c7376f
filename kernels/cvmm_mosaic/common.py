"""What the Mosaic GPU CVMM kernels share: availability, shared-memory layouts of gathered
rows, compiler parameters, the interpreter hook. Legend in :mod:`kernels.routing`.

Gathered rows. Hopper's TMA copies rectangles (no row gather; that is Blackwell's
``gather4``), so the kernels gather a tile's rows as one TMA copy per row and 64-column
chunk: a box of [1, 64] 16-bit values, 128 bytes, into row r of a [T, 64] shared-memory
buffer with the 128-byte swizzle. The swizzle permutes the eight 16-byte pieces of a
128-byte row by the row's index modulo 8, which the TMA engine takes from the
destination address, so a one-row copy lands exactly where a whole [8, 64]-tiled copy
would have put that row: the buffer's physical layout is the tiled, swizzled layout that
``wgmma`` reads. Pallas cannot slice a tiled buffer at one row, so each gather buffer is
allocated as a :class:`~jax.experimental.pallas.mosaic_gpu.RefUnion` of two views of
the same bytes: [T, 64] swizzled without tiling (the copies' destination, sliced per row)
and [T, 64] tiled (8, 64) and swizzled (the matmul operand). Both views are one group
of one buffer each, so they start at the union's offset 0 (checked at trace time).

Padding rows of a tile (past the tile's end) copy row R of an [R, C] source: out of
bounds, so the TMA engine fills zeros (and a store to row R of an output is dropped).
Tiles therefore need no masks, and the weight gradient's sums over rows add zeros.

Pallas's Mosaic GPU interpreter (jax >= 0.11, CPU) allocates every view of a union
separately, so under it (:func:`interpreting`) a gather buffer is one swizzled [T, 64]
buffer used by the copies and the matmul alike (the interpreter keeps logical layouts).
"""
from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp

try:
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError:  # a jax without Pallas Mosaic GPU
  pl = plgpu = None

SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16)
CHUNK = 64            # columns of one gathered row copy: 128 bytes of a 16-bit dtype
SWIZZLE = 128         # bytes
ROWS_PER_WG = 64      # rows of one wgmma (one consumer warpgroup)
# Shared memory a kernel may plan for (sm90 has 227 KiB per block).
SMEM_BUDGET = 220 * 1024
# Registers per thread: producer warpgroups give theirs up to the consumers'
# accumulators, within the multiprocessor's 64K (setmaxnreg takes multiples of 8).
PRODUCER_REGISTERS = 40
_REGISTER_FILE = 65536


def consumer_registers(n_cons: int, n_prod: int) -> int:
  """Registers per consumer thread beside ``n_prod`` producer warpgroups at
  PRODUCER_REGISTERS: 232 (what a [64, 256] float32 accumulator needs, with room) where
  the register file allows it."""
  per_thread = _REGISTER_FILE // 128 - n_prod * PRODUCER_REGISTERS
  return min(232, per_thread // n_cons // 8 * 8)


def is_available() -> bool:
  if plgpu is None or jax.default_backend() != "gpu":
    return False
  cc = getattr(jax.devices()[0], "compute_capability", "")
  return str(cc).startswith("9.")


def interpreting() -> bool:
  """Whether Pallas's Mosaic GPU interpreter runs the kernels traced now (tests on CPU:
  ``jax._src.pallas.mosaic_gpu.interpret.params.force_gpu_interpret_mode``)."""
  try:
    from jax._src import config  # noqa: PLC0415
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # noqa: PLC0415
  except ImportError:
    return False
  return isinstance(config.pallas_tpu_interpret_mode_context_manager.value,
                    InterpretGPUParams)


def tiled(dtype):
  """The (8, 64) tiling and 128-byte swizzle of wgmma operands of a 16-bit dtype."""
  elems = SWIZZLE // jnp.dtype(dtype).itemsize
  return (plgpu.TilingTransform((8, elems)), plgpu.SwizzleTransform(SWIZZLE))


def gather_buffer(shape, dtype):
  """Scratch for gathered rows: ``shape`` (..., T, 64); see the module docstring."""
  rows = plgpu.SMEM(shape, dtype, transforms=(plgpu.SwizzleTransform(SWIZZLE),))
  if interpreting():
    return rows
  return plgpu.RefUnion(plgpu.SMEM(shape, dtype, transforms=tiled(dtype)), rows)


def gather_views(buf):
  """(matmul view, row-copy view) of a :func:`gather_buffer`."""
  if interpreting():
    return buf, buf
  mma, rows = buf
  for view in (mma, rows):
    offsets = [getattr(t, "offset", 0) for t in getattr(view, "transforms", ())]
    if any(offsets):
      raise AssertionError(f"gather buffer views must both start at offset 0: {offsets}")
  return mma, rows


def load(ref, layout):
  """``plgpu.load(ref, layout=layout)`` on jax 0.10 (which takes an index) and later."""
  params = inspect.signature(plgpu.load).parameters
  if params["idx"].default is inspect.Parameter.empty:
    return plgpu.load(ref, (), layout=layout)
  return plgpu.load(ref, layout=layout)


def compiler_params():
  return plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane,
                              unsafe_no_auto_barriers=True)


def launch(body, inputs, out_types, scratch, n_blocks: int, n_threads: int):
  """Runs ``body(*input_refs, *output_refs, *scratch_refs)`` on ``n_blocks`` blocks
  (axis "sm") of ``n_threads`` warpgroups (axis "wg"). Mutable arrays among
  ``inputs`` (``jax.new_ref``) are outputs too: the kernels add into zeros that way.
  (``pl.kernel`` with a Mosaic GPU mesh; ``plgpu.kernel`` would do the same but wraps
  the call in a ``custom_vmap``, which jax 0.10 refuses mutable arrays in.)"""
  mesh = plgpu.Mesh(grid=(n_blocks,), grid_names=("sm",), num_threads=n_threads,
                    thread_name="wg")

  def kernel_body(*refs):
    pl.run_scoped(functools.partial(body, *refs), *scratch, collective_axes="wg")

  return pl.kernel(kernel_body, out_type=tuple(out_types), mesh=mesh,
                   compiler_params=compiler_params(), name=body.__name__)(*inputs)


def check_dtype(dtype):
  if jnp.dtype(dtype) not in [jnp.dtype(d) for d in SUPPORTED_DTYPES]:
    raise NotImplementedError(
        f"cvmm_mosaic supports {[jnp.dtype(d).name for d in SUPPORTED_DTYPES]} (wgmma "
        f"multiplies float32 only as tf32); got {jnp.dtype(dtype).name}: use impl='triton'")
