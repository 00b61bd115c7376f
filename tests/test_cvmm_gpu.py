"""GPU kernels (Triton, Mosaic GPU) against the pure-JAX reference: forward and gradients.

Run on the GPU machine: ``python -m pytest tests/test_cvmm_gpu.py -q``. Skipped exactly
when JAX has no GPU backend.
"""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import cvmm, is_available
from kernels.cvmm_reference import cvmm_reference
from cvmm_cases import TOL, inputs as _inputs, outputs as _outputs, rel_err as _rel

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU")]

# (name, N, K, M, E, I, O, routing kind)
CASES = [
    ("basic", 300, 4, 1, 8, 128, 64, "random"),
    ("m_eq_k", 300, 4, 4, 8, 64, 128, "random"),
    ("m_divisor", 257, 6, 3, 5, 96, 80, "random"),
    ("k1", 200, 1, 1, 6, 64, 64, "random"),
    ("one_expert", 150, 2, 2, 1, 64, 64, "random"),
    ("empty_experts", 40, 2, 1, 64, 64, 64, "random"),
    ("all_one_expert", 190, 3, 1, 7, 64, 64, "one"),
    ("odd_sizes", 333, 5, 1, 9, 100, 72, "random"),
    ("switchhead_like", 256, 8, 4, 40, 128, 128, "random"),
]


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("impl", ["triton", "triton_unfused", "mosaic"])
def test_gpu_impl_matches_reference(impl, case, dtype, gated):
  if not is_available(impl):
    pytest.skip(f"{impl} not available on this GPU")
  x, w, g, r, ct = _inputs(case, dtype, gated)

  fn = jax.jit(lambda x, r, w, g: cvmm(x, r, w, g, impl=impl))
  if impl == "mosaic" and dtype == jnp.float32:
    # wgmma multiplies float32 only as tf32 (about 3e-4): the Mosaic path refuses it.
    with pytest.raises(NotImplementedError, match="tf32"):
      fn(x, r, w, g)
    return
  got = _outputs(fn, x, w, g, r, ct)
  up = lambda a: None if a is None else a.astype(jnp.float32)  # noqa: E731
  ref = _outputs(cvmm_reference, up(x), up(w), up(g), r, ct)
  names = ["out", "dx", "dw", "dgates"]
  for name, a, b in zip(names, got, ref):
    assert a.dtype == dtype, (name, a.dtype)
    assert np.all(np.isfinite(np.asarray(a, np.float32))), name
    err = _rel(a, b)
    assert err <= TOL[dtype], f"{impl} {case[0]} {name}: rel err {err:.2e} > {TOL[dtype]:.0e}"


def test_auto_resolves_to_a_gpu_kernel():
  from kernels import resolve
  assert resolve("auto") in ("triton", "mosaic")
