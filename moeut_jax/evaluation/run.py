"""``train.py eval --tasks``: the harness on a checkpoint, its results JSON and table written
into ``<workdir>/harness``."""
from __future__ import annotations

import json
import os
import time
from typing import Any, Optional, Sequence

from moeut_jax.training.errors import TrainingError

RESULTS_DIR = "harness"


def _import_harness():
  try:
    import lm_eval  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError as e:
    raise TrainingError("evaluating tasks needs lm-evaluation-harness: "
                        "pip install -e \".[eval]\"") from e
  from moeut_jax.evaluation import harness  # pylint: disable=import-outside-toplevel
  return harness


def evaluate_tasks(workdir: str, tasks: Sequence[str], *, step: Optional[int] = None,
                   include_path: Optional[str] = None, num_fewshot: Optional[int] = None,
                   limit: Optional[float] = None, batch_size: Optional[int] = None,
                   bootstrap_iters: int = 100_000) -> dict[str, Any]:
  """Runs ``lm_eval.simple_evaluate`` on the checkpoint ``step`` of ``workdir``.

  Args:
    tasks: harness task or group names (``lm_eval ls tasks`` lists them).
    include_path: a folder of extra task YAMLs (local data, tasks the harness lacks).
    num_fewshot, limit, bootstrap_iters: as in ``lm_eval.simple_evaluate`` (limit: at most
      this many documents per task, or this fraction when below 1; for quick checks).
    batch_size: rows per forward pass (default: the run's micro-batch).

  Returns:
    ``results`` (the harness's dictionary), ``table`` (text), ``json_path``, ``table_path``.
  """
  if not tasks:
    raise ValueError("give at least one task")
  harness = _import_harness()
  from lm_eval import simple_evaluate, utils as lm_utils  # pylint: disable=import-outside-toplevel
  from lm_eval.tasks import TaskManager  # pylint: disable=import-outside-toplevel
  manager = TaskManager(include_path=include_path)
  unknown = [t for t in tasks if t not in manager.all_tasks]
  if unknown:
    raise ValueError(f"unknown tasks {unknown}" + ("" if include_path else
                     " (tasks of your own: --include-path DIR with their YAML files)"))
  args = {"workdir": workdir, "step": step, "batch_size": batch_size}
  lm = harness.MoEUTHarnessLM(**{k: v for k, v in args.items() if v is not None})
  results = simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot,
                            limit=limit, task_manager=manager, log_samples=False,
                            bootstrap_iters=bootstrap_iters)
  results["config"]["model"] = harness.MODEL_NAME
  results["config"]["model_args"] = {"workdir": os.path.abspath(workdir),
                                     "step": lm.run.step, "batch_size": lm.batch_size,
                                     "max_length": lm.max_length}
  table = lm_utils.make_table(results)
  if results.get("groups"):
    table += "\n" + lm_utils.make_table(results, "groups")
  out_dir = os.path.join(workdir, RESULTS_DIR)
  os.makedirs(out_dir, exist_ok=True)
  stem = os.path.join(out_dir, f"results_step{lm.run.step}_{time.strftime('%Y%m%d-%H%M%S')}")
  with open(stem + ".json", "w") as f:
    json.dump(results, f, indent=2, default=lm_utils.handle_non_serializable)
  with open(stem + ".md", "w") as f:
    f.write(table)
  return dict(results=results, table=table, json_path=stem + ".json",
              table_path=stem + ".md")
