"""Merges tile choices from an autotune cache written on the GPU machine (the device
call's ``$OUT/autotune.json``) into ``bench/autotune_cache.json``.

  python -m bench.merge_autotune /work/.device/N/autotune.json            # new keys only
  python -m bench.merge_autotune /work/.device/N/autotune.json --replace  # changed too

Prints every key it adds or (with ``--replace``) changes, old and new choice, so the
commit that lands the merge can say what moved. Entries are validated as
:class:`kernels.autotune.TileConfig` (tiles) or as an implementation's name ("auto"'s
choices, ``{"impl": name}``) before anything is written.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from kernels.autotune import cache_entry

CACHE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "autotune_cache.json")


def _fmt(d: dict) -> str:
  c = cache_entry(d)
  if isinstance(c, str):                    # "auto"'s choice of implementation
    return f"impl {c}"
  s = f"{c.block_m}x{c.block_n}x{c.block_k} w{c.num_warps} s{c.num_stages}"
  return (s + (f" S{c.splits}" if c.splits > 1 else "") + (" loopN" if c.loop_n else "")
          + (" gluon" if c.gluon else "") + (f" x{c.halves}" if c.halves > 1 else "")
          + (f" p{c.producers}" if c.producers > 1 else ""))


def merge(new: dict, old: dict, replace: bool) -> tuple[dict, list[str]]:
  """(merged cache, one line per added or changed key)."""
  out, lines = dict(old), []
  for key, cfg in sorted(new.items()):
    _fmt(cfg)                     # refuses entries that are neither tiles nor impls
    if key not in old:
      out[key] = cfg
      lines.append(f"+ {key}: {_fmt(cfg)}")
    elif old[key] != cfg and replace:
      out[key] = cfg
      lines.append(f"~ {key}: {_fmt(old[key])} -> {_fmt(cfg)}")
  return out, lines


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("source", help="autotune.json written by a device call")
  ap.add_argument("--cache", default=CACHE)
  ap.add_argument("--replace", action="store_true",
                  help="also replace keys whose choice differs (default: add new keys)")
  a = ap.parse_args(argv)
  with open(a.source) as f:
    new = json.load(f)
  with open(a.cache) as f:
    old = json.load(f)
  merged, lines = merge(new, old, a.replace)
  print("\n".join(lines) if lines else "nothing to merge")
  if lines:
    with open(a.cache, "w") as f:
      json.dump(merged, f, indent=1, sort_keys=True)
      f.write("\n")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
