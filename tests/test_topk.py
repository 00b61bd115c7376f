"""kernels.topk: the jax.lax.top_k fallback and the cases both paths are checked on (the
Triton kernel itself: tests/interpreter/test_topk_kernel.py)."""
from __future__ import annotations

import textwrap

import jax.numpy as jnp
import pytest

from kernels.topk import topk_indices

# Random rows, rows full of ties, -inf rows (expert dropout), NaN/inf/±0, rows of a
# 3-D input; every index must equal jax.lax.top_k's.
CASES_SCRIPT = textwrap.dedent("""
import jax, jax.numpy as jnp, numpy as np
from kernels.topk import topk_indices
rng = np.random.default_rng(0)
cases = []
x = rng.standard_normal((37, 387)).astype(np.float32)
cases.append((x, 16))
x = np.round(rng.standard_normal((20, 50)) * 2).astype(np.float32)       # many ties
cases.append((x, 7))
x = rng.standard_normal((5, 3, 10)).astype(np.float32)
x[0, 0, :] = -np.inf
x[1, 1, 3:] = -np.inf
cases.append((x, 4))
x = rng.standard_normal((9, 12)).astype(np.float32)
x[0, 5], x[1, 2] = np.nan, np.inf
x[2, :] = 0.0
x[2, 3] = -0.0
cases.append((x, 12))
x = (np.round(rng.uniform(0, 1, (64, 40)) * 4) / 4).astype(np.float32)  # sigmoid-like ties
cases.append((x, 2))
for x, k in cases:
  got = np.asarray(topk_indices(jnp.asarray(x), k))
  want = np.asarray(jax.lax.top_k(jnp.asarray(x), k)[1])
  assert got.dtype == np.int32 and got.shape == want.shape, (got.shape, want.shape)
  assert (got == want).all(), (x.shape, k, np.argwhere(got != want)[:5])
print("topk ok")
""")


def test_topk_fallback_and_checks():
  exec(CASES_SCRIPT, {})                    # no GPU here: jax.lax.top_k itself
  x = jnp.zeros((3, 5))
  with pytest.raises(ValueError, match="k=6"):
    topk_indices(x, 6)
  with pytest.raises(ValueError, match="k=0"):
    topk_indices(x, 0)
