"""What the Triton kernel families share for autotuning: random inputs to time
candidates on, and the parts of a cache key that depend on the sums."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.cvmm_triton.launch import interpret, is_available
from kernels.cvmm_triton.scales import half_sums
from kernels.routing import make_head_routing, synthetic_routing  # noqa: F401


def head_bench_inputs(n, k, e, block, i, o, dtype, a_rows, has_scale, transpose_w):
  """(routing with unit pairs, a, w, scale or None) of an autotuner's timing: a random
  SwitchHead routing of k // 2 heads of ``block`` experts each and random operands."""
  with jax.ensure_compile_time_eval():
    idx = jax.lax.top_k(jax.random.normal(jax.random.key(0), (n, k // 2, block)), 2)[1]
    r = make_head_routing(idx, block, unit_pairs=True)
    a = jax.random.normal(jax.random.key(1), (n * a_rows, i), dtype)
    w = jax.random.normal(jax.random.key(2), (e, o, i) if transpose_w else (e, i, o), dtype)
    sc = jax.random.uniform(jax.random.key(3), (n * k,), jnp.float32) if has_scale else None
  return r, a, w, sc


def bench_or_none(make):
  """``make`` where candidates can be timed (a GPU with the Triton kernels), else None
  (the autotuner then takes the first candidate: the heuristic choice)."""
  if interpret() or not is_available():
    return None
  return make


def sum_key(dtype, o: int, atomic: bool, sum_dtype: str) -> tuple:
  """Extra autotune-key element for fused 16-bit sums (none for float32 sums, so the
  cached float32 choices keep their keys). float16 and bf16 sums move the same bytes
  and share the key."""
  return ("bf16sum",) if atomic and half_sums(dtype, o, sum_dtype) else ()


