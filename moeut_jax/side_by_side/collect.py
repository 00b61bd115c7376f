"""One comparison from runs made in several commands (for machines that give each command
little time): ``python -m moeut_jax.side_by_side.collect FOLDER... [--out FOLDER]``.

Each FOLDER is the ``--out`` of a ``python -m moeut_jax.side_by_side`` command run with
the same settings (its runs' ``LABEL.json`` files and ``setup.json`` are all it reads).
The setups must agree: the same settings (the original's path aside) and the same digest
of batches, learning rates and initial weights; runs whose ``setup_digest`` differs from
their folder's are refused. Labels repeated across folders get ``@FOLDER`` appended.
Prints the training losses side by side, the held-out losses by step and against the
original's; with ``--out``, writes summary.json and side_by_side.png there.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

from moeut_jax.side_by_side import report

_NOT_RUNS = ("setup.json", "summary.json")


def _read_json(path: str) -> dict:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def load_runs(folders: list[str]) -> tuple[dict, list[dict]]:
  """(the common settings, every run's result) of the folders; ValueError where their
  setups differ or a run does not belong to its folder's setup."""
  if not folders:
    raise ValueError("name at least one folder")
  settings, first, results, seen = None, None, [], set()
  for folder in folders:
    path = os.path.join(folder, "setup.json")
    if not os.path.isfile(path):
      raise ValueError(f"{folder} holds no setup.json: not a side-by-side output folder")
    here = _read_json(path)
    if "digest" not in here:
      raise ValueError(f"{path} has no digest (written before runs could be collected)")
    here.pop("original_path", None)
    if settings is None:
      settings, first = here, folder
    elif here != settings:
      keys = sorted(k for k in set(here) | set(settings) if here.get(k) != settings.get(k))
      raise ValueError(f"{folder} and {first} differ in {', '.join(keys)}: their runs "
                       "cannot be compared")
    for run_path in sorted(glob.glob(os.path.join(folder, "*.json"))):
      if os.path.basename(run_path) in _NOT_RUNS:
        continue
      r = _read_json(run_path)
      if "label" not in r or "variant" not in r:
        raise ValueError(f"{run_path} is not a run's result")
      if r.get("setup_digest", here["digest"]) != here["digest"]:
        raise ValueError(f"{run_path} was trained on another setup than {path}")
      if r["label"] in seen:
        r["label"] = f"{r['label']}@{os.path.basename(os.path.normpath(folder))}"
      seen.add(r["label"])
      results.append(r)
  return settings, results


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m moeut_jax.side_by_side.collect",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("folders", nargs="+", metavar="FOLDER")
  p.add_argument("--out", help="folder for summary.json and side_by_side.png")
  p.add_argument("--print-every", type=int, default=None,
                 help="steps per row of the training losses (a tenth of the steps)")
  args = p.parse_args(argv)
  try:
    settings, results = load_runs(args.folders)
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"{len(results)} runs from {len(args.folders)} folders; {settings['steps']} steps "
        f"of {settings['batch']} x {settings['seq']}, {settings['dtype']}")
  every = args.print_every or max(1, settings["steps"] // 10)
  print("\nTraining loss (cross-entropy, mean over the steps of each row)")
  print(report.curves(results, every))
  print("\nHeld-out loss by step")
  print(report.heldout_by_step(results))
  print("\nHeld-out loss after each run's last evaluation, against the original's there")
  print(report.heldout_table(results))
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "summary.json"), "w", encoding="utf-8") as f:
      json.dump(dict(settings=settings, folders=args.folders, **report.summary(results)),
                f, indent=2)
    report.plot(results, os.path.join(args.out, "side_by_side.png"))
  return 0


if __name__ == "__main__":
  sys.exit(main())
