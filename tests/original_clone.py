"""Where the tests find the official MoEUT: a clone in the repository's ``.orig`` folder
(ignored by git; how the GPU scripts carry it) or the workspace's ``../shared/original``.
Tests that need it skip when neither holds one."""
from __future__ import annotations

import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CANDIDATES = (os.path.join(ROOT, ".orig"),
              os.path.join(os.path.dirname(ROOT), "shared", "original"))


def find() -> str | None:
  """The first candidate folder that holds moeut/cvmm.py, or None."""
  for path in CANDIDATES:
    if os.path.isfile(os.path.join(path, "moeut", "cvmm.py")):
      return path
  return None


def required() -> str:
  """The clone's folder; skips the test when there is none."""
  path = find()
  if path is None:
    pytest.skip(f"no clone of the official MoEUT in {' or '.join(CANDIDATES)}")
  return path
