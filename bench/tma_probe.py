"""Can jax-triton run Triton kernels that use in-kernel TMA descriptors, or clusters?

  python3 -m bench.tma_probe        (on the GPU machine, jax-triton installed)

Two questions for the next CVMM kernel (expert weights shared by a two-CTA cluster
through TMA multicast):
  descriptor  ``tl.make_tensor_descriptor`` inside the kernel (Triton may then need a
              global scratch buffer from the launcher); a [256, 64] block copy, doubled
  num_ctas=2  a plain tl.dot kernel launched with clusters of two programs
Prints one line per question: ok with the max error, or the error.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import triton
import triton.language as tl


@triton.jit
def _desc_copy(x_ptr, out_ptr, M: tl.constexpr, N: tl.constexpr, BM: tl.constexpr,
               BN: tl.constexpr):
  pid = tl.program_id(0)
  xd = tl.make_tensor_descriptor(x_ptr, shape=[M, N], strides=[N, 1], block_shape=[BM, BN])
  od = tl.make_tensor_descriptor(out_ptr, shape=[M, N], strides=[N, 1],
                                 block_shape=[BM, BN])
  od.store([pid * BM, 0], xd.load([pid * BM, 0]) * 2.0)


@triton.jit
def _dot(a_ptr, b_ptr, out_ptr, K: tl.constexpr, N: tl.constexpr, BM: tl.constexpr):
  pid = tl.program_id(0)
  rows = pid * BM + tl.arange(0, BM)
  ks = tl.arange(0, K)
  ns = tl.arange(0, N)
  a = tl.load(a_ptr + rows[:, None] * K + ks[None, :])
  b = tl.load(b_ptr + ks[:, None] * N + ns[None, :])
  tl.store(out_ptr + rows[:, None] * N + ns[None, :], tl.dot(a, b))


def main():
  import jax_triton as jt  # noqa: PLC0415
  print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}, triton "
        f"{triton.__version__}, jax-triton {getattr(jt, '__version__', '?')}", flush=True)
  x = jnp.arange(256 * 64, dtype=jnp.float32).reshape(256, 64) / 100
  try:
    out = jt.triton_call(x, kernel=_desc_copy, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
                         grid=(4,), M=256, N=64, BM=64, BN=64)
    err = float(jnp.max(jnp.abs(out - 2 * x)))
    print(f"descriptor: ok, max error {err:.1e}", flush=True)
  except Exception as e:  # report, go on
    print(f"descriptor: FAILED {type(e).__name__}: {str(e)[:400]}", flush=True)
  a = jax.random.normal(jax.random.key(0), (512, 64)).astype(jnp.bfloat16)
  b = jax.random.normal(jax.random.key(1), (64, 64)).astype(jnp.bfloat16)
  ref = np.asarray(a, np.float32) @ np.asarray(b, np.float32)
  for ctas in (1, 2):
    try:
      out = jt.triton_call(a, b, kernel=_dot,
                           out_shape=jax.ShapeDtypeStruct((512, 64), jnp.float32),
                           grid=(4,), num_ctas=ctas, K=64, N=64, BM=128)
      err = float(np.max(np.abs(np.asarray(out) - ref)))
      print(f"num_ctas={ctas}: ok, max error {err:.1e}", flush=True)
    except Exception as e:  # report, go on
      print(f"num_ctas={ctas}: FAILED {type(e).__name__}: {str(e)[:400]}", flush=True)


if __name__ == "__main__":
  main()
