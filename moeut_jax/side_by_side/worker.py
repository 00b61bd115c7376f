"""One variant's process: ``python -m moeut_jax.side_by_side.worker OUT LABEL VARIANT``.

Reads the setup from folder OUT, trains the variant, and writes ``OUT/LABEL.json``:
``{"label", "variant", "train_loss": [per step], "heldout": [[step, loss], ...],
"seconds", "device", ...}``, or ``{"label", "variant", "error": message}``.
"""
from __future__ import annotations

import json
import os
import sys
import traceback

from moeut_jax.side_by_side.shared import Setup, Variant, file_stem, parse_variant


def run(setup: Setup, variant: Variant, log=print) -> dict:
  """The variant's curves (in this process)."""
  if variant.kind == "original":
    from moeut_jax.side_by_side import original  # noqa: PLC0415
    return original.train(setup, variant, log=log)
  from moeut_jax.side_by_side import ours  # noqa: PLC0415
  return ours.train(setup, variant, log=log)


def main(argv=None) -> int:
  out, label, spec = (argv or sys.argv[1:])[:3]
  variant = parse_variant(spec)
  result = dict(label=label, variant=variant.name)
  try:
    result.update(run(Setup.load(out), variant,
                      log=lambda m: print(f"[{label}] {m}", flush=True)))
    code = 0
  except Exception as e:  # pylint: disable=broad-except  (reported in the JSON and the log)
    traceback.print_exc()
    first = (str(e).strip().splitlines() or [""])[0][:300]
    result["error"] = f"{type(e).__name__}: {first}"
    code = 1
  with open(os.path.join(out, f"{file_stem(label)}.json"), "w", encoding="utf-8") as f:
    json.dump(result, f)
  return code


if __name__ == "__main__":
  sys.exit(main())
