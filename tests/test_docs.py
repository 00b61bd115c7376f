"""The repository cites only what it ships: docs/semantics.md sections, no machine paths."""
from __future__ import annotations

import glob
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTE = os.path.join(ROOT, "docs", "semantics.md")
# Code, help and tests of the package (bench/ and kernels/ are documented on their own).
SOURCES = sorted(glob.glob(os.path.join(ROOT, "moeut_jax", "**", "*.py"), recursive=True)
                 + glob.glob(os.path.join(ROOT, "tests", "*.py"))
                 + [os.path.join(ROOT, "train.py"), os.path.join(ROOT, "profiles.py")])
# Spelled apart so that this file does not match itself.
OLD_NAME, MACHINE_PATH = "SP" + "EC", "/" + "work/"


def _read(path: str) -> str:
  with open(path, encoding="utf-8") as f:
    return f.read()


def test_no_citation_of_a_document_outside_the_repository():
  bad = [f"{os.path.relpath(p, ROOT)}:{n}: {line.strip()}"
         for p in SOURCES for n, line in enumerate(_read(p).splitlines(), 1)
         if re.search(rf"\b{OLD_NAME}\b", line) or MACHINE_PATH in line]
  assert not bad, "\n".join(bad)


def test_every_cited_section_of_the_semantics_note_exists():
  sections = set(re.findall(r"^## §(\d+) ", _read(NOTE), re.MULTILINE))
  assert sections == {str(i) for i in range(1, 10)}
  cited = {}
  for p in SOURCES:
    for group in re.findall(r"docs/semantics\.md ((?:§\d+(?:, )?)+)", _read(p)):
      for number in re.findall(r"§(\d+)", group):
        cited.setdefault(number, []).append(os.path.relpath(p, ROOT))
  assert cited, "no file cites docs/semantics.md"
  missing = {n: files for n, files in cited.items() if n not in sections}
  assert not missing, missing
