"""What a compiled step holds at its peak: a liveness walk over XLA's scheduled program.

  XLA_FLAGS="--xla_dump_to=/tmp/dump --xla_dump_hlo_as_text --xla_dump_hlo_module_re=train_step" \\
    python3 bench/model.py --profile MoEUT_244M --batch 64 --steps 1
  python3 bench/hlo_memory.py /tmp/dump                 # the largest train_step module there

Reads the module after XLA's optimizations (``*after_optimizations.txt``, scheduled: its
entry computation lists the kernels in the order they run), gives every instruction that
makes a new buffer its size, frees it after its last reader, and prints the largest sum
of live buffers, where in the step it happens (forward, backward or the update after
them, from the JAX names in XLA's metadata) and what is live there, grouped by the JAX
operation that made it (layer numbers folded) and shape. Bitcasts, tuples and their
elements are views of their operands, and so is an output that a kernel writes into one
of its operands (``output_to_operand_aliasing``: the Triton kernels' atomic sums into
zeroed buffers); the step's inputs (parameters, optimizer state,
tokens) are counted apart, as XLA's memory analysis does. An optimization barrier's
output (where the dump still has one) and a tuple's elements are followed element by
element, so that a barrier over many arrays keeps each alive only as long as its own
readers.

It is an estimate of XLA's own buffer assignment, which packs the same live ranges into
one heap: on a CPU, MoEUT_44M's step (batch 2 x 256) comes to 817 MiB here against the
791 MiB of ``memory_analysis().temp_size_in_bytes``. Kernels inside a called computation
(the GPU's command buffers) count with their outputs only.
"""
from __future__ import annotations

import argparse
import collections
import gzip
import os
import re
import sys

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
          "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "f8e4m3fn": 1, "f8e5m2": 1}
_SHAPE = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([0-9,]*)\]")
_INSTRUCTION = re.compile(r"^(?:ROOT )?%(\S+) = (.*?) ([a-z][a-z0-9\-]*)\((.*)$")
_BARRIERS = {"opt-barrier", "optimization-barrier"}      # HLO text prints the first
_VIEWS = {"bitcast", "get-tuple-element", "tuple"} | _BARRIERS
GIB, MIB = 2 ** 30, 2 ** 20


def nbytes(type_text: str) -> int:
  """Bytes of an HLO type: 'bf16[64,1024]{1,0}' or a tuple of them."""
  total = 0
  for dtype, dims in _SHAPE.findall(type_text):
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    total += n * _BYTES[dtype]
  return total


def _operand_list(rest: str) -> str:
  """The operand list that opens ``rest``, up to and with its closing parenthesis."""
  depth, i = 1, 0
  while depth and i < len(rest):
    depth += {"(": 1, ")": -1}.get(rest[i], 0)
    i += 1
  return rest[:i]


def _operands(rest: str) -> list[str]:
  """Names in the operand list that opens ``rest``. An operand that reads one element of
  a tuple-shaped output directly (``%fusion#1``, how newer XLA prints what a
  get-tuple-element would read) keeps its ``#k``."""
  return ["#".join(filter(None, m)) for m in
          re.findall(r"%([\w.\-]+)(?:#(\d+))?", _operand_list(rest))]


def tuple_elements(type_text: str) -> list[str]:
  """The top-level element types of a tuple type, or [type_text] for an array."""
  t = type_text.strip()
  if not t.startswith("("):
    return [t]
  parts, depth, start = [], 0, 1
  for i, ch in enumerate(t):
    if ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
      if depth == 0:
        parts.append(t[start:i])
    elif ch == "," and depth == 1:
      parts.append(t[start:i])
      start = i + 1
  return [p.strip() for p in parts if p.strip()]


def entry_instructions(text: str):
  """[(name, bytes, opcode, operand names, JAX op name, type, tuple index or None)] of the
  entry computation."""
  start = text.index("\nENTRY")
  body = text[start:text.index("\n}", start)]
  out = []
  for line in body.split("\n")[1:]:
    m = _INSTRUCTION.match(line.strip())
    if m:
      name, typ, op, rest = m.groups()
      op_name = re.search(r'op_name="([^"]*)"', line)
      index = re.search(r"\bindex=(\d+)", rest) if op == "get-tuple-element" else None
      out.append((name, 0 if op in _VIEWS else nbytes(typ), op, _operands(rest),
                  op_name.group(1) if op_name else "", typ,
                  int(index.group(1)) if index else None, aliasing(rest)))
  return out


def _braced(text: str, key: str) -> str | None:
  """The text inside ``key={...}`` (nested braces matched), or None."""
  start = text.find(key + "={")
  if start < 0:
    return None
  i, depth = start + len(key) + 1, 0
  while i < len(text):
    depth += {"{": 1, "}": -1}.get(text[i], 0)
    if depth == 0:
      return text[start + len(key) + 2:i]
    i += 1
  return None


def aliasing(rest: str) -> tuple[tuple[int | None, int], ...]:
  """An instruction's ``output_to_operand_aliasing`` (kernels that write into an operand's
  buffer, e.g. atomic sums into zeros): (output tuple index, or None for the whole
  output; operand number) pairs."""
  body = _braced(rest, "output_to_operand_aliasing")
  if not body:
    return ()
  pairs = []
  for out_index, operand in re.findall(r"\{([0-9,\s]*)\}:\s*\((\d+),", body):
    first = out_index.split(",")[0].strip()
    pairs.append((int(first) if first else None, int(operand)))
  return tuple(pairs)


def strip_module(text: str) -> str:
  """The module cut to what :func:`report` reads: its first line and the entry
  computation, each instruction with its name, type, opcode, operands, tuple index and
  JAX op name (kernels' backend configs, other metadata and the called computations
  dropped: a tenth of the size or less, so that it comes back from a GPU machine)."""
  start = text.index("\nENTRY")
  end = text.index("\n}", start)
  lines = [text.split("\n", 1)[0], ""] + [text[start + 1:].split("\n", 1)[0]]
  for line in text[start:end].split("\n")[2:]:
    stripped = line.strip()
    m = _INSTRUCTION.match(stripped)
    if not m:
      lines.append(line)
      continue
    name, typ, op, rest = m.groups()
    root = "ROOT " if stripped.startswith("ROOT ") else ""
    out = f"{root}%{name} = {typ} {op}({_operand_list(rest)}"
    index = re.search(r"\bindex=(\d+)", rest) if op == "get-tuple-element" else None
    if index:
      out += f", index={index.group(1)}"
    alias = _braced(rest, "output_to_operand_aliasing")
    if alias:
      out += f", output_to_operand_aliasing={{{alias}}}"
    op_name = re.search(r'op_name="([^"]*)"', line)
    if op_name:
      out += f', metadata={{op_name="{op_name.group(1)}"}}'
    lines.append("  " + out)
  return "\n".join(lines) + "\n}\n"


def phase(op_name: str) -> str:
  if "transpose(" in op_name:
    return "backward"
  if "jvp(" in op_name:
    return "forward"
  return "update" if op_name else "-"


def walk(instructions):
  """(peak bytes, index of the peak, live buffers at the peak, curve of live bytes, sizes).

  A buffer is an instruction's output, or one element of a tuple-shaped output (what a
  get-tuple-element of it reads), so that each element is freed after its own last
  reader."""
  sources, size, made_at = {}, {}, {}   # name -> {buffer}; buffer -> bytes; buffer -> index
  parts = {}   # a tuple's (or a barrier of a tuple's) buffers element by element

  def element(name: str, index: int | None) -> set:
    """The buffers of element ``index`` of name's tuple-shaped output (all of them
    when that is not known)."""
    src = sources.get(name, set())
    if index is None:
      return src
    if name in parts and index < len(parts[name]):
      return parts[name][index]
    return {b for b in src if b.endswith(f"#{index}")} or src

  def of(operand: str) -> set:
    """The buffers an operand reads: ``name``, or ``name#k`` for one element."""
    name, _, k = operand.partition("#")
    return element(name, int(k) if k else None)

  for i, (name, s, op, ops, _, typ, index, aliases) in enumerate(instructions):
    if aliases:   # outputs written into operands' buffers: views of those, not new
      elements = tuple_elements(typ)
      tupled = len(elements) > 1 or typ.strip().startswith("(")
      by_out = {o: ops[j] for o, j in aliases if j < len(ops)}
      if not tupled or None in by_out:
        sources[name] = of(by_out.get(None, by_out.get(0)) or "")
        continue
      parts[name] = []
      for k, t in enumerate(elements):
        if k in by_out:
          parts[name].append(of(by_out[k]))
        else:
          parts[name].append({f"{name}#{k}"})
          size[f"{name}#{k}"], made_at[f"{name}#{k}"] = nbytes(t), i
      sources[name] = set().union(*parts[name])
      continue
    if op == "parameter":
      sources[name] = set()
    elif op == "tuple":
      parts[name] = [of(o) for o in ops]
      sources[name] = set().union(*parts[name]) if ops else set()
    elif op in _BARRIERS and len(ops) == 1:
      # its output aliases its operand, element by element
      if ops[0] in parts:
        parts[name] = parts[ops[0]]
      sources[name] = of(ops[0])
    elif op == "get-tuple-element" and ops:
      sources[name] = element(ops[0], index)
    elif op in _VIEWS:
      sources[name] = set().union(*(of(o) for o in ops)) if ops else set()
    else:
      elements = tuple_elements(typ)
      if len(elements) > 1 or typ.strip().startswith("("):
        sources[name] = {f"{name}#{k}" for k in range(len(elements))}
        for k, t in enumerate(elements):
          size[f"{name}#{k}"], made_at[f"{name}#{k}"] = nbytes(t), i
      else:
        sources[name] = {name}
        size[name], made_at[name] = s, i
  last = {}
  for i, (_, _, _, ops, *_rest) in enumerate(instructions):
    for o in ops:
      for b in of(o):
        last[b] = i
  for b in sources.get(instructions[-1][0], ()):   # the step's outputs live to the end
    last[b] = len(instructions)
  for b, i in made_at.items():   # read by nothing (a GEMM's workspace): freed when made
    last.setdefault(b, i)
  frees, makes = collections.defaultdict(list), collections.defaultdict(list)
  for b, i in last.items():
    frees[i].append(b)
  for b, i in made_at.items():
    makes[i].append(b)
  live, current, peak, peak_at, at_peak, curve = set(), 0, -1, 0, set(), []
  for i in range(len(instructions)):
    for b in makes.get(i, ()):
      if size[b]:
        live.add(b)
        current += size[b]
    if current > peak:
      peak, peak_at, at_peak = current, i, set(live)
    curve.append(current)
    for b in frees.get(i, ()):
      if b in live:
        live.discard(b)
        current -= size[b]
  return peak, peak_at, at_peak, curve, size


def _group(op_name: str, typ: str) -> str:
  name = re.sub(r"layer_\d+", "layer_*", op_name)
  name = re.sub(r"^jit\([^)]*\)/", "", name).replace("closed_call/", "")
  m = _SHAPE.search(typ)
  return f"{name[-80:]}  {m.group(0) if m else typ[:40]}"


def read_module(path: str) -> str:
  """The module's text, from a .txt or a gzipped .txt.gz."""
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt") as f:
    return f.read()


def defer(instructions, pattern: str):
  """The schedule with every instruction whose JAX op name and type (``"op_name type"``)
  match the regex ``pattern``, and the bitcasts of it, moved to just before the first
  other instruction that reads them: what an optimization barrier tied to a later value
  asks of XLA, to see what it would take off the peak before compiling it.
  Returns (the instructions, how many were moved)."""
  ins = list(instructions)
  wanted = [d[0] for d in ins if d[2] not in _VIEWS | {"parameter"}
            and re.search(pattern, f"{d[4]} {d[5]}")]
  for name in wanted:
    group = {name}
    for d in ins:   # views of the group, in schedule order
      if d[2] == "bitcast" and d[3] and d[3][0].partition("#")[0] in group:
        group.add(d[0])
    rest = [d for d in ins if d[0] not in group]
    first = next((k for k, d in enumerate(rest)
                  if any(o.partition("#")[0] in group for o in d[3])), None)
    if first is None:
      continue
    ins = rest[:first] + [d for d in ins if d[0] in group] + rest[first:]
  return ins, len(wanted)


def report(path: str, top: int = 30, points: int = 12, defer_pattern: str = "") -> None:
  ins = entry_instructions(read_module(path))
  if defer_pattern:
    ins, moved = defer(ins, defer_pattern)
    print(f"deferred to their first reader: {moved} instructions matching {defer_pattern!r}")
  args = sum(nbytes(d[5]) for d in ins if d[2] == "parameter")
  peak, at, live, curve, size = walk(ins)
  by = {d[0]: (d[4], d[5]) for d in ins}
  print(f"{os.path.basename(path)}: {len(ins)} instructions; inputs {args / GIB:.2f} GiB")
  print(f"peak of the buffers it makes: {peak / GIB:.2f} GiB at instruction {at} "
        f"({phase(ins[at][4])}: {ins[at][4][-90:]})")
  calls = sum(1 for d in ins if d[2] == "call")
  if calls:
    print(f"({calls} called computations counted with their outputs only)")
  print("\nlive GiB through the step (instruction: GiB, phase)")
  for k in range(points + 1):
    i = min(len(ins) - 1, k * (len(ins) - 1) // points)
    print(f"  {i:7d}: {curve[i] / GIB:7.2f}  {phase(ins[i][4])}")
  groups, counts = collections.Counter(), collections.Counter()
  for b in live:
    name, _, k = b.partition("#")
    op_name, typ = by[name]
    if k:
      typ = tuple_elements(typ)[int(k)]
    key = f"{phase(op_name):9s} {_group(op_name, typ)}"
    groups[key] += size[b]
    counts[key] += 1
  print(f"\nlive at the peak, largest first (MiB, buffers, phase, JAX operation, shape)")
  for key, s in groups.most_common(top):
    print(f"{s / MIB:10.1f} {counts[key]:5d}  {key}")


def find_module(path: str, pattern: str) -> str:
  if os.path.isfile(path):
    return path
  files = [os.path.join(path, f) for f in os.listdir(path)
           if re.search(pattern, f) and f.endswith("after_optimizations.txt")]
  if not files:
    sys.exit(f"no *{pattern}*after_optimizations.txt in {path}: dump with "
             "--xla_dump_to=DIR --xla_dump_hlo_as_text")
  return max(files, key=os.path.getsize)


def main():
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("path", help="an XLA dump folder or one *after_optimizations.txt file "
                  "(or .txt.gz, as bench/memory.sh's HLO_KEEP=1 keeps it)")
  ap.add_argument("--module", default="train_step", help="regex of the module's file name")
  ap.add_argument("--top", type=int, default=30, help="groups listed at the peak")
  ap.add_argument("--strip-to", default="", metavar="FILE.txt.gz",
                  help="write the module cut to what this walk reads (strip_module), "
                       "gzipped, instead of reporting")
  ap.add_argument("--defer", default="", metavar="REGEX",
                  help="first move the instructions whose 'op_name type' matches REGEX to "
                       "just before their first reader (defer(); a what-if, not XLA's)")
  args = ap.parse_args()
  path = find_module(args.path, args.module)
  if args.strip_to:
    with gzip.open(args.strip_to, "wt", compresslevel=9) as f:
      f.write(strip_module(read_module(path)))
    return
  report(path, args.top, defer_pattern=args.defer)


if __name__ == "__main__":
  main()
