"""The Triton kernel behind :func:`kernels.topk.topk_indices` (imports Triton; see there)."""
from __future__ import annotations

from kernels.cvmm_triton.launch import tl, triton

_jit = triton.jit if triton is not None else (lambda fn: fn)


@_jit
def topk_kernel(x_ptr, idx_ptr, R, E, K: tl.constexpr, BR: tl.constexpr, BE: tl.constexpr):
  rows = tl.program_id(0) * BR + tl.arange(0, BR)                     # [BR]
  cols = tl.arange(0, BE)                                             # [BE]
  inb = (rows[:, None] < R) & (cols[None, :] < E)
  x = tl.load(x_ptr + rows[:, None] * E + cols[None, :], mask=inb, other=0.0)
  bits = x.to(tl.int32, bitcast=True)
  key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)                  # total order of floats
  taken = -2147483647 - 1                                             # below every float's key
  key = tl.where(inb, key, taken)
  for j in tl.static_range(K):
    best = tl.max(key, axis=1)                                        # [BR]
    first = tl.min(tl.where(key == best[:, None], cols[None, :], BE), axis=1)
    tl.store(idx_ptr + rows * K + j, first, mask=rows < R)
    key = tl.where(cols[None, :] == first[:, None], taken, key)
