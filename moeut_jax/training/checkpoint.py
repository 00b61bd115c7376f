"""Orbax checkpoints of a run: ``<workdir>/checkpoints/<step>/{state,data,meta}``.

Saved every N steps and at the end, asynchronously, keeping the last K; orbax writes each step
into a temporary folder and renames it when complete, so a crash never leaves a half-written
checkpoint that looks finished. ``meta`` holds the config and vocabulary, checked before the
state is read; ``data`` holds the Grain iterator state. A checkpoint that cannot be read stops
the run with a message; training never starts over in a folder that holds checkpoints.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Any, Callable, Optional

import orbax.checkpoint as ocp

from moeut_jax.training.errors import CheckpointError

FORMAT_VERSION = 1

# When one array of a restore cannot be read, orbax raises at once and closes its event loop
# while the reads of the other arrays are still running in TensorStore. Those finish later and
# report through channels that bypass our error: unraisable exceptions ("Exception ignored in:
# <coroutine object _read_array_index_and_device_put ...>", "RuntimeError: Event loop is
# closed") and asyncio's log ("Task exception was never retrieved" and "Future exception was
# never retrieved", with TensorStore's whole JSON spec), from a few to thousands of lines,
# mostly at interpreter exit. Only those reports are dropped, during a restore and, once a
# restore failed, for the rest of the process.
# orbax's coroutines of one read: an array's index read and device_put, and the
# deserialisation of an array (whose failure is TensorStore's error, with its JSON spec)
_ORBAX_READS = ("_read_array_index_and_device_put", "async_deserialize")
_ORBAX_READ_ERROR = "Encountered error while reading array index"
# TensorStore's errors end with the spec of the store they were reading; a future that
# held one and was never awaited is reported as "Future exception was never retrieved"
_TENSORSTORE_SPEC = "[tensorstore_spec="


def _is_orphaned_read_error(exc: Optional[BaseException]) -> bool:
  seen = set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    text = str(exc)
    if ((isinstance(exc, RuntimeError) and text == "Event loop is closed")
        or text.startswith(_ORBAX_READ_ERROR) or _TENSORSTORE_SPEC in text):
      return True
    exc = exc.__cause__ or exc.__context__
  return False


class _OrphanedReadLogFilter(logging.Filter):
  """Drops asyncio's reports of orbax's abandoned reads (tasks and gathers)."""

  def filter(self, record: logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    message = record.getMessage()
    return not (_is_orphaned_read_error(exc) or any(name in message for name in _ORBAX_READS))


def _silence_orphaned_reads() -> Callable[[], None]:
  """Installs the filters of the abandoned reads' reports (unless in place already);
  returns their removal, which a failed restore never calls."""
  removals = []
  if not getattr(sys.unraisablehook, "drops_orphaned_reads", False):
    previous = sys.unraisablehook

    def hook(unraisable):
      if not _is_orphaned_read_error(unraisable.exc_value):
        previous(unraisable)

    hook.drops_orphaned_reads = True
    sys.unraisablehook = hook

    def restore_hook():
      if sys.unraisablehook is hook:
        sys.unraisablehook = previous

    removals.append(restore_hook)
  logger = logging.getLogger("asyncio")
  if not any(isinstance(f, _OrphanedReadLogFilter) for f in logger.filters):
    log_filter = _OrphanedReadLogFilter()
    logger.addFilter(log_filter)
    removals.append(lambda: logger.removeFilter(log_filter))

  def remove():
    for removal in removals:
      removal()

  return remove


class Checkpointer:

  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True,
               read_only: bool = False):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.shown = os.path.join(workdir, "checkpoints")   # in messages: the path as given
    if read_only and not os.path.isdir(self.directory):
      raise CheckpointError(f"no checkpoints in {workdir!r} (expected {self.shown})")
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
    """The folder of checkpoint ``step``, relative where the workdir was given relative."""
    return os.path.join(self.shown, str(step))

  def save(self, step: int, state: Any, data_state: dict, meta: dict) -> None:
    if self._read_only:
      raise CheckpointError(f"this checkpointer of {self.shown} is read-only")
    if step in self.steps():
      raise CheckpointError(f"refusing to overwrite the existing checkpoint {self.path(step)}")
    meta = dict(meta, format=FORMAT_VERSION, step=step)
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(meta)), force=True)

  def _restore(self, step: int, **items) -> dict:
    """orbax's restore of ``items``; a CheckpointError with one clear message if it fails."""
    remove_filters = _silence_orphaned_reads()
    try:
      out = self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # pylint: disable=broad-except
      # The filters stay: the abandoned reads report until the process exits.
      raise self._corrupt(step, e) from e
    remove_filters()
    return out

  def restore_meta(self, step: int) -> tuple[dict, dict]:
    """(meta, data_state) of checkpoint ``step``, without reading the arrays."""
    out = self._restore(step, data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore())
    meta, data_state = out["meta"], out["data"]
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION or "config" not in meta:
      raise CheckpointError(f"checkpoint {self.path(step)} has unknown metadata {meta!r}; it was "
                            f"not written by this version of train.py")
    return meta, data_state

  def restore_state(self, step: int, abstract_state: Any) -> Any:
    """The state arrays of checkpoint ``step``, with the shapes, dtypes and shardings of
    ``abstract_state`` (a tree of jax.ShapeDtypeStruct)."""
    return self._restore(step, state=ocp.args.StandardRestore(abstract_state))["state"]

  def _corrupt(self, step: int, error: Exception) -> CheckpointError:
    others = [s for s in self.steps() if s != step]
    hint = (f"; move it away to resume from an earlier one ({', '.join(map(str, others))})"
            if others else "")
    # The innermost cause says what is wrong (orbax's own message is a TensorStore spec).
    cause, seen = error, set()
    while (cause.__cause__ or cause.__context__) is not None and id(cause) not in seen:
      seen.add(id(cause))
      cause = cause.__cause__ or cause.__context__
    text = str(cause).strip()
    first_line = text.splitlines()[0][:300] if text else ""
    return CheckpointError(f"cannot restore checkpoint {self.path(step)}: it is corrupt or does "
                           f"not match this model ({type(cause).__name__}: {first_line})"
                           f"{hint}. Nothing was overwritten")

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
