"""Orbax checkpoints of a run: ``<workdir>/checkpoints/<step>/{state,data,meta}``.

Saved every N steps and at the end, asynchronously, keeping the last K; orbax writes each step
into a temporary folder and renames it when complete, so a crash never leaves a half-written
checkpoint that looks finished. ``meta`` holds the config and vocabulary, checked before the
state is read; ``data`` holds the Grain iterator state. A checkpoint that cannot be read stops
the run with a message; training never starts over in a folder that holds checkpoints.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import orbax.checkpoint as ocp

from moeut_jax.training.errors import CheckpointError

FORMAT_VERSION = 1


class Checkpointer:

  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True,
               read_only: bool = False):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    if read_only and not os.path.isdir(self.directory):
      raise CheckpointError(f"no checkpoints in {workdir!r} (expected {self.directory})")
    # (orbax's own read_only option logs warnings; this class simply never saves then.)
    self._read_only = read_only
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only,
                                           enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> Optional[int]:
    steps = self.steps()
    return steps[-1] if steps else None

  def path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def save(self, step: int, state: Any, data_state: dict, meta: dict) -> None:
    if self._read_only:
      raise CheckpointError(f"this checkpointer of {self.directory} is read-only")
    if step in self.steps():
      raise CheckpointError(f"refusing to overwrite the existing checkpoint {self.path(step)}")
    meta = dict(meta, format=FORMAT_VERSION, step=step)
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(meta)), force=True)

  def restore_meta(self, step: int) -> tuple[dict, dict]:
    """(meta, data_state) of checkpoint ``step``, without reading the arrays."""
    try:
      out = self._manager.restore(step, args=ocp.args.Composite(
          data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
      meta, data_state = out["meta"], out["data"]
    except Exception as e:  # pylint: disable=broad-except
      raise self._corrupt(step, e) from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION or "config" not in meta:
      raise CheckpointError(f"checkpoint {self.path(step)} has unknown metadata {meta!r}; it was "
                            f"not written by this version of train.py")
    return meta, data_state

  def restore_state(self, step: int, abstract_state: Any) -> Any:
    """The state arrays of checkpoint ``step``, with the shapes, dtypes and shardings of
    ``abstract_state`` (a tree of jax.ShapeDtypeStruct)."""
    try:
      out = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state)))
    except Exception as e:  # pylint: disable=broad-except
      raise self._corrupt(step, e) from e
    return out["state"]

  def _corrupt(self, step: int, error: Exception) -> CheckpointError:
    others = [s for s in self.steps() if s != step]
    hint = (f"; move it away to resume from an earlier one ({', '.join(map(str, others))})"
            if others else "")
    first_line = str(error).strip().splitlines()[0][:500] if str(error).strip() else ""
    return CheckpointError(f"cannot restore checkpoint {self.path(step)}: it is corrupt or does "
                           f"not match this model ({type(error).__name__}: {first_line})"
                           f"{hint}. Nothing was overwritten")

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
