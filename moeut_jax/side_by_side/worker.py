"""One variant's process: ``python -m moeut_jax.side_by_side.worker OUT LABEL VARIANT``.

Reads the setup from folder OUT, trains the variant, and writes ``OUT/LABEL.json``:
``{"label", "variant", "setup_digest", "train_loss": [per step], "grad_norm": [the
global gradient norm of each step, before clipping], "heldout": [[step, loss], ...],
"seconds", "device", ...}``; with ``"error": message`` added where it
failed. The file is also written after every held-out evaluation, with ``"partial":
true``, so a run that is stopped or fails keeps its curves up to there.
"""
from __future__ import annotations

import json
import os
import sys
import traceback

from moeut_jax.side_by_side.shared import Setup, Variant, file_stem, parse_variant


def run(setup: Setup, variant: Variant, log=print, progress=None) -> dict:
  """The variant's curves (in this process)."""
  if variant.kind == "original":
    from moeut_jax.side_by_side import original  # noqa: PLC0415
    return original.train(setup, variant, log=log, progress=progress)
  from moeut_jax.side_by_side import ours  # noqa: PLC0415
  return ours.train(setup, variant, log=log, progress=progress)


def _write(path: str, result: dict) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(result, f)
  os.replace(tmp, path)     # a reader never sees half a file


def main(argv=None) -> int:
  out, label, spec = (argv or sys.argv[1:])[:3]
  variant = parse_variant(spec)
  path = os.path.join(out, f"{file_stem(label)}.json")
  result = dict(label=label, variant=variant.name)
  try:
    with open(os.path.join(out, "setup.json"), encoding="utf-8") as f:
      result["setup_digest"] = json.load(f).get("digest")
  except (OSError, ValueError):
    pass

  def progress(curves: dict) -> None:
    result.update(curves)
    _write(path, dict(result, partial=True))

  try:
    result.update(run(Setup.load(out), variant,
                      log=lambda m: print(f"[{label}] {m}", flush=True), progress=progress))
    code = 0
  except Exception as e:  # pylint: disable=broad-except  (reported in the JSON and the log)
    traceback.print_exc()
    first = (str(e).strip().splitlines() or [""])[0][:300]
    result["error"] = f"{type(e).__name__}: {first}"
    code = 1
  _write(path, result)
  return code


if __name__ == "__main__":
  sys.exit(main())
