"""The Triton scale-back of float16 sums (scales.unscale_rows) in Triton's interpreter:
bit for bit XLA's float32 multiply rounded to the output dtype, for rows that do not
fill a program, columns that do not fill a block, infinities, nan and scales up to
2^120, both launch orders, bf16 and float16 out."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.cvmm_triton.scales import unscale_rows


def _bits(v):
  return np.asarray(jax.lax.bitcast_convert_type(v, jnp.uint16))


@pytest.mark.parametrize("r, o", [(13, 40), (9, 1100)])
def test_unscale_rows_equals_xla_bit_for_bit(r, o):
  ks = jax.random.split(jax.random.key(2), 2)
  x = (jax.random.normal(ks[0], (r, o)) * 300).astype(jnp.float16)
  x = x.at[0, :4].set(jnp.array([jnp.inf, -jnp.inf, jnp.nan, 0.0], jnp.float16))
  inv = 2.0 ** jax.random.randint(ks[1], (r,), -30, 30).astype(jnp.float32)
  inv = inv.at[1].set(2.0 ** 120)
  for dt in (jnp.bfloat16, jnp.float16):
    want = (x.astype(jnp.float32) * inv[:, None]).astype(dt)
    for rev in (True, False):
      got = unscale_rows(x, inv, dt, reverse=rev)
      assert got.dtype == jnp.dtype(dt), got.dtype
      assert np.array_equal(_bits(got), _bits(want)), (r, o, dt, rev)
