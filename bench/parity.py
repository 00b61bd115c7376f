"""Prints the parity errors against the PyTorch reference, per case (float32, CPU).

  python bench/parity.py

Reuses the cases of tests/test_parity.py; the tests assert the bounds, this prints the
measured relative errors for reports.
"""
import os
import sys

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [root, os.path.join(root, "tests")]

import test_parity as tp  # noqa: E402
from moeut_jax.convert import to_torch_state_dict  # noqa: E402


def main():
  print(f"{'case':>15} {'mask':>16} {'logits':>9} {'reg_loss':>9} {'max grad':>9}")
  for case in sorted(tp.CASES):
    for mask_kind in ("default", "none", "padding", "custom_position"):
      tm, jm, variables = tp.make_pair(tp.CASES[case])
      toks = tp.tokens(b=tp.B, t=tp.T + 1)
      tmask, jmask = tp.masks(mask_kind)
      want_logits, want_reg, want_grads = tp.torch_loss(tm, toks, tmask)
      (_, (logits, reg)), grads = tp.jax_loss(jm, variables, toks, jmask)
      got = to_torch_state_dict(grads)
      g = max(tp.rel_err(got[k], want_grads[k]) for k in want_grads)
      print(f"{case:>15} {mask_kind:>16} {tp.rel_err(logits, want_logits):9.1e} "
            f"{tp.rel_err(reg, want_reg):9.1e} {g:9.1e}", flush=True)


if __name__ == "__main__":
  main()
