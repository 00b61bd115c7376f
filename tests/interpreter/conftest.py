"""Tests of the Triton kernels in Triton's CPU interpreter.

The interpreter must be chosen before triton is first imported (CVMM_TRITON_INTERPRET=1,
read by kernels/cvmm_triton/launch.py), so these modules run in a process of their own:
tests/test_interpreter.py starts one pytest per module with the variable set. Run one
directly with

  CVMM_TRITON_INTERPRET=1 JAX_PLATFORMS=cpu python -m pytest tests/interpreter/test_rows.py
"""
import os

import numpy as np
import pytest

if os.environ.get("CVMM_TRITON_INTERPRET") != "1":
  raise pytest.UsageError("tests/interpreter runs with CVMM_TRITON_INTERPRET=1 (see "
                          "tests/test_interpreter.py)")
os.environ.setdefault("TRITON_INTERPRET", "1")      # before triton is first imported

pytest.importorskip("triton")
pytest.importorskip("torch")


def rel(a, b) -> float:
  """||a - b|| / ||b|| in float64."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))
