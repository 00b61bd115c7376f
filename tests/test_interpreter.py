"""Runs each module of tests/interpreter/ (the Triton kernels in Triton's CPU
interpreter) in a pytest process of its own, with the interpreter chosen before triton
is imported."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = sorted(f for f in os.listdir(os.path.join(ROOT, "tests", "interpreter"))
                 if f.startswith("test_") and f.endswith(".py"))


@pytest.mark.slow
@pytest.mark.parametrize("module", MODULES)
def test_interpreter_module(module):
  pytest.importorskip("triton")
  pytest.importorskip("torch")
  env = dict(os.environ, CVMM_TRITON_INTERPRET="1", TRITON_INTERPRET="1",
             JAX_PLATFORMS="cpu",
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "-n", "0", os.path.join("tests", "interpreter", module)],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=1800)
  assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
  assert " failed" not in res.stdout, res.stdout[-2000:]
  if " passed" not in res.stdout and " skipped" in res.stdout:
    # every test of the module skipped itself (e.g. test_original.py without a clone of
    # the official MoEUT): say so, as the module's own tests do
    pytest.skip(f"{module}: {res.stdout.strip().splitlines()[-1]}")
  assert " passed" in res.stdout, res.stdout[-2000:]
