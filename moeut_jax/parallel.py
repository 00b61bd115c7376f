"""Running the token-local parts of the model on each device's share of the batch.

Routing (top-k, the sort of token-expert pairs) and the CVMM kernels treat every token on
its own, but XLA's SPMD partitioner cannot see that. In front of a sort over the pairs
and in front of a custom kernel call it all-gathers the batch, and then every device
routes and multiplies the whole global batch. So under data parallelism the expert
layers would do N times the work on N devices.

Under a context mesh (``jax.set_mesh(mesh)``, as ``train.py`` uses),
:func:`per_device` runs such a function through ``jax.shard_map`` instead. Each device
gets its rows of the batch and the whole of the shared arrays (the weights, gathered
from their FSDP shards by XLA, as for any other matmul). The batch is split over every
mesh axis of size > 1 that is not already manual. Without a mesh, with a one-device mesh,
or when the batch does not divide over the devices, the function is simply called.
That is correct everywhere, and slow only in that last case.

The results are the same as without the mesh: per-token outputs do not depend on the
other tokens of the batch. Statistics over the batch, such as the entropy regulariser,
stay outside.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
from jax.sharding import AxisType, PartitionSpec as P


def _context_axes() -> list[tuple[str, int, AxisType]]:
  """(name, size, type) of each axis of size > 1 of the context mesh; [] without one."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return []
  return [(name, mesh.shape[name], kind) for name, kind in zip(mesh.axis_names,
                                                                mesh.axis_types)
          if mesh.shape[name] > 1]


def batch_axes() -> tuple[tuple[str, ...], int]:
  """(names, total size) of the context mesh's axes that :func:`per_device` splits the
  batch over: every non-manual axis of size > 1. ((), 1) without a mesh."""
  axes = [(name, size) for name, size, kind in _context_axes() if kind != AxisType.Manual]
  return tuple(name for name, _ in axes), math.prod(size for _, size in axes)


def check_mesh_axes() -> None:
  """Refuses a context mesh with Explicit axes of size > 1 (``jax.make_mesh``'s default).

  In explicit-sharding mode every operation must name the sharding of its result, and
  the model is written for Auto axes, where XLA places arrays itself. Without this check
  the first ambiguous operation (the embedding lookup of a split batch) fails with a
  ShardingTypeError that does not say what to change.
  """
  explicit = [name for name, _, kind in _context_axes() if kind == AxisType.Explicit]
  if explicit:
    raise ValueError(
        f"MoEUT needs the context mesh's axes to be Auto, but {explicit} are Explicit "
        "(the default of jax.make_mesh). Create the mesh with "
        "axis_types=(jax.sharding.AxisType.Auto,) * len(axis_names), or with "
        "jax.sharding.Mesh(devices, axis_names).")


def per_device(fn: Callable[..., Any], batched: Sequence[jax.Array | None],
               shared: Sequence[Any] = ()) -> Any:
  """``fn(*batched, *shared)``, run on each device's rows of the batch under a mesh.

  batched: arrays whose leading axis is the batch, split over :func:`batch_axes`; None
    entries are passed to ``fn`` as None.
  shared: arrays (or trees) every device gets whole (e.g. the expert weights).
  Every output of ``fn`` must have the batch as its leading axis.
  """
  names, size = batch_axes()
  present = [i for i, a in enumerate(batched) if a is not None]
  rows = {batched[i].shape[0] for i in present}
  if len(rows) != 1:
    raise ValueError(f"per_device: batched arrays disagree on the batch size: {sorted(rows)}")
  if size == 1 or rows.pop() % size:
    return fn(*batched, *shared)

  def local(*args):
    full = [None] * len(batched)
    for i, a in zip(present, args):
      full[i] = a
    return fn(*full, *args[len(present):])

  spec = P(names)
  in_specs = (spec,) * len(present) + (P(),) * len(shared)
  # check_vma=False: the Triton kernels' custom calls carry no replication rules. The
  # transpose then sums the shared inputs' gradients over the devices, as it must.
  return jax.shard_map(local, in_specs=in_specs, out_specs=spec, check_vma=False)(
      *(batched[i] for i in present), *shared)
