"""One mesh over all devices: the batch over the "data" axis, parameters and optimizer state
FSDP-style (each array split along one dimension over the same axis; XLA gathers it where it
is used). Multi-host runs start ``jax.distributed`` first.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moeut_jax.training.config import Config
from moeut_jax.training.errors import TrainingError

DATA_AXIS = "data"
# Arrays smaller than this stay replicated: splitting them saves nothing.
FSDP_MIN_SIZE = 1 << 14


def maybe_initialize_distributed(config: Config) -> bool:
  """Starts jax.distributed when asked by flags or by a multi-process environment."""
  if jax.distributed.is_initialized():
    return True
  if config.coordinator_address:
    jax.distributed.initialize(config.coordinator_address, config.num_processes,
                               config.process_id)
    return True
  if config.num_processes is not None or config.process_id is not None:
    raise TrainingError("--num-processes/--process-id need --coordinator-address")
  env = os.environ
  if ("JAX_COORDINATOR_ADDRESS" in env or int(env.get("SLURM_NTASKS", "1")) > 1
      or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1):
    jax.distributed.initialize()
    return True
  return False


def make_mesh() -> Mesh:
  return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def fsdp_spec(shape: tuple[int, ...], n: int) -> P:
  """Split the largest dimension divisible by ``n``; replicate small or indivisible arrays."""
  if n == 1 or int(np.prod(shape, dtype=np.int64)) < FSDP_MIN_SIZE:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % n == 0:
      spec = [None] * len(shape)
      spec[dim] = DATA_AXIS
      return P(*spec)
  return P()


def fsdp_shardings(abstract_tree: Any, mesh: Mesh) -> Any:
  """NamedShardings for a tree of arrays (or ShapeDtypeStructs)."""
  n = mesh.shape[DATA_AXIS]
  return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), n)),
                      abstract_tree)


def train_batch_sharding(mesh: Mesh) -> NamedSharding:
  """[A, M, T + 1]: the micro-batch rows over the data axis."""
  return NamedSharding(mesh, P(None, DATA_AXIS, None))


def eval_batch_sharding(mesh: Mesh) -> NamedSharding:
  """[M, T + 1] and [M, T]: rows over the data axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def check_divisible(micro_batch: int, mesh: Mesh, what: str) -> None:
  n, p = mesh.shape[DATA_AXIS], jax.process_count()
  if micro_batch % n or micro_batch % p:
    raise TrainingError(
        f"{what}: {micro_batch} sequences per micro-batch do not divide over {n} devices"
        + (f" in {p} processes" if p > 1 else "")
        + "; choose --batch-size / --grad-accum as a multiple of the device count")


def global_array(local: np.ndarray, sharding: NamedSharding, global_rows: int,
                 row_axis: int) -> jax.Array:
  """This process's rows -> one global array (rows along ``row_axis``)."""
  shape = list(local.shape)
  shape[row_axis] = global_rows
  return jax.make_array_from_process_local_data(sharding, local, tuple(shape))
