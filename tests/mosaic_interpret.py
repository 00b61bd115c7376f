"""Pallas's Mosaic GPU interpreter for the CPU tests of kernels/cvmm_mosaic/.

``interpret()`` runs the Mosaic GPU kernels traced inside it in Pallas's GPU
interpreter (simulated shared memory, barriers, TMA copies and wgmma; logical layouts).
The interpreter of jax 0.11 lacks one thing the kernels use, the TMA copy that adds into
global memory (``copy_smem_to_gmem(..., reduction_op="add")``): this module adds it, as
a read, an add and a write of the destination (in float32 for 16-bit destinations, then
rounded, as the TMA engine's reduction does per element). Older interpreters (jax 0.10)
fill no out-of-bounds TMA reads with zeros, which the kernels rely on:
``SUPPORTED`` is False there.
"""
from __future__ import annotations

import contextlib

import jax
import numpy as np

SUPPORTED = tuple(int(v) for v in jax.__version__.split(".")[:2]) >= (0, 11)


def _add_copy(orig):
  from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks as gc  # noqa: PLC0415

  def copy_smem_to_gmem(*, token, mesh_location, thread, src_allocation_key_as_array,
                        src_transforms, dst_allocation_key_as_array, dst_transforms,
                        predicate, source_info, commit_group, reduction_op):
    if reduction_op is None:
      return orig(token=token, mesh_location=mesh_location, thread=thread,
                  src_allocation_key_as_array=src_allocation_key_as_array,
                  src_transforms=src_transforms,
                  dst_allocation_key_as_array=dst_allocation_key_as_array,
                  dst_transforms=dst_transforms, predicate=predicate,
                  source_info=source_info, commit_group=commit_group,
                  reduction_op=reduction_op)
    assert reduction_op == "add" and predicate is None, (reduction_op, predicate)
    mem = gc._get_shared_memory()
    src_key = gc.HostAllocationKey.from_array(src_allocation_key_as_array)
    dst_key = gc.HostAllocationKey.from_array(dst_allocation_key_as_array)
    src_access = mem.access(src_key, jax.tree.map(int, gc._remove_noop_transforms(
        src_transforms)))
    dst_access = mem.access(dst_key, jax.tree.map(int, gc._remove_noop_transforms(
        dst_transforms)))
    val, _, _ = mem.get_buffer_content(src_key, src_access, thread)
    shape = tuple(mem.buffer_shape_and_dtype(dst_key).shape)
    store = gc._clip_store_to_shape(dst_access, val, shape)
    if store is not None:
      access, v = store
      old, _, _ = mem.get_buffer_content(dst_key, access, thread)
      new = (np.asarray(old, np.float32) + np.asarray(v, np.float32)).astype(old.dtype)
      mem.store_buffer_content(dst_key, access, new, thread)
    return token

  return copy_smem_to_gmem


@contextlib.contextmanager
def interpret():
  """Runs the Mosaic GPU kernels traced inside in Pallas's GPU interpreter."""
  from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks as gc  # noqa: PLC0415
  from jax._src.pallas.mosaic_gpu.interpret.params import (  # noqa: PLC0415
      InterpretGPUParams, force_gpu_interpret_mode)
  orig = gc.copy_smem_to_gmem
  gc.copy_smem_to_gmem = _add_copy(orig)
  try:
    with force_gpu_interpret_mode(InterpretGPUParams()):
      yield
  finally:
    gc.copy_smem_to_gmem = orig
