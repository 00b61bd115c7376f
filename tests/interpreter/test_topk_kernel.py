"""The Triton top-k kernel in Triton's interpreter: every index equals jax.lax.top_k's
on the cases of tests/test_topk.py."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from test_topk import CASES_SCRIPT  # noqa: E402

from kernels.cvmm_triton import launch  # noqa: E402


def test_topk_kernel_matches_lax_top_k():
  assert launch.interpret()                # the kernel runs, not the fallback
  exec(CASES_SCRIPT, {})
