"""``impl="auto"`` on GPUs: each CVMM operation's implementation, chosen by measurement.

Where more than one GPU implementation can run an operation (the Triton kernels and, on
Hopper with 16-bit inputs, the Pallas Mosaic GPU ones), the first trace of that
operation times each one's forward and backward pass on random inputs of its shapes and
a random routing of its structure, each with its kernels' cached or first tiles (one
compile each; the winner's tiles are tuned when it runs), and the autotuner
(:mod:`kernels.autotune`) keeps the fastest per device, operation, shapes, dtype and
the config's :meth:`~kernels.CvmmConfig.tune_key`: in memory, and across processes in
the file ``CVMM_AUTOTUNE_CACHE`` names. With autotuning off (``CVMM_AUTOTUNE=0``) the
first of :data:`GPU_ORDER` that can run the operation is taken, unmeasured.

The σ-MoE pair (:func:`kernels.cvmm_pair`) is one operation: Triton's fused pair against
Mosaic's. An operation's forward and backward pass always run the same implementation
(each implementation is its own custom_vjp). The timing runs double as a check: an
implementation whose output or gradients differ from the first one's on the same inputs
(:func:`check_agreement`) is left out, with a warning.
"""
from __future__ import annotations

import warnings
from typing import Callable

import jax
import jax.numpy as jnp

from kernels import autotune
from kernels.config import CvmmConfig
from kernels.routing import Routing, make_head_routing, synthetic_routing

# The GPU implementations "auto" chooses between, in the order taken without measuring
# (bench/RESULTS.md: Triton is the faster on most operations at MoEUT's shapes).
GPU_ORDER = ("triton", "mosaic")


def candidates(dtype) -> list[str]:
  """The implementations of :data:`GPU_ORDER` that can run a call with inputs of
  ``dtype`` here (the Mosaic kernels multiply 16-bit inputs only)."""
  from kernels.cvmm import is_available  # noqa: PLC0415  (kernels.cvmm imports this module)
  names = [n for n in GPU_ORDER if is_available(n)]
  if "mosaic" in names and jnp.dtype(dtype).itemsize != 2:
    names.remove("mosaic")
  return names


def choose_cvmm(config: CvmmConfig, x: jax.Array, routing: Routing, w: jax.Array,
                gates: jax.Array | None, out_rows: int) -> str | None:
  """The implementation of one :func:`kernels.cvmm` call (x [N, M, I]) under "auto" on a
  GPU, or None where no GPU implementation can run it."""
  n, m, i = x.shape
  e, _, o = w.shape
  gated = gates is not None

  def args():
    return (_normal(1, x.shape, x.dtype), _normal(2, w.shape, w.dtype, i ** -0.5),
            jax.random.uniform(jax.random.key(3), gates.shape, gates.dtype) if gated
            else None)

  def call(cfg, r, xs, ws, gs):
    from kernels.cvmm import cvmm  # noqa: PLC0415
    return cvmm(xs, r, ws, gs, out_rows=out_rows, config=cfg)

  shape = (n, m, routing.k, e, i, o, int(gated), out_rows, _pairs_block(routing))
  return _choose("cvmm_impl", shape, x.dtype, config, routing, args, call)


def choose_pair(config: CvmmConfig, x: jax.Array, routing: Routing, w_up: jax.Array,
                w_down: jax.Array, keep_middle: bool) -> str | None:
  """The implementation of one :func:`kernels.cvmm_pair` call (x [N, D]) under "auto" on
  a GPU, or None where no GPU implementation can run it."""
  n, d = x.shape
  e, _, h = w_up.shape
  o = w_down.shape[2]

  def args():
    return (_normal(1, x.shape, x.dtype), _normal(2, w_up.shape, w_up.dtype, d ** -0.5),
            _normal(3, w_down.shape, w_down.dtype, h ** -0.5),
            jax.random.uniform(jax.random.key(4), (n, routing.k), jnp.float32))

  def call(cfg, r, xs, wu, wd, gs):
    from kernels.cvmm import cvmm_pair  # noqa: PLC0415
    return cvmm_pair(xs, r, wu, wd, gs, keep_middle=keep_middle, config=cfg)

  shape = (n, routing.k, e, d, h, o, int(keep_middle))
  return _choose("cvmm_pair_impl", shape, x.dtype, config, routing, args, call)


def _choose(kernel: str, shape: tuple, dtype, config: CvmmConfig, routing: Routing,
            args: Callable[[], tuple], call: Callable) -> str | None:
  """The autotuner's choice among :func:`candidates` for an operation ``call(config, r,
  *args())``, each timed forward and backward on a random routing like ``routing``
  (the arrays ``args()`` makes); None where no GPU implementation can run it."""
  names = candidates(dtype)
  if len(names) <= 1:
    return names[0] if names else None

  first: list = []          # (name, results) of the first implementation that ran

  def bench(name: str) -> float:
    cfg = config.replace(impl=name)
    with jax.ensure_compile_time_eval():
      r, xs = _bench_routing(routing), args()

    def step(r, *xs):
      out, pull = jax.vjp(lambda *a: call(cfg, r, *a), *xs)
      return out, pull(jnp.ones_like(out))
    f = autotune.compile_now(step, r, *xs)
    got = f(r, *xs)
    if first:
      check_agreement(kernel, name, got, *first[0])
    else:
      first.append((name, got))
    return autotune.time_call(lambda: f(r, *xs))

  return autotune.tuner().choose_impl(kernel, shape, dtype, names, bench, config)


# Largest relative difference (norm) between two implementations' results on the timing
# inputs: two right ones differ by their roundings (16-bit results: below 1e-2); a wrong
# one by about 1.
AGREEMENT_TOL = 5e-2


def check_agreement(kernel: str, name: str, got, ref_name: str, ref) -> None:
  """Raises (and warns) where ``name``'s output or gradients on the timing inputs differ
  from ``ref_name``'s by more than AGREEMENT_TOL: "auto" never chooses an
  implementation that disagrees with the first one it ran (a kernel that is wrong on
  this GPU is left out, not silently used)."""
  for i, (a, b) in enumerate(zip(jax.tree.leaves(got), jax.tree.leaves(ref))):
    with jax.ensure_compile_time_eval():   # on the device, also while a jit traces
      a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
      rel = float(jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(b), 1e-30))
    if not rel <= AGREEMENT_TOL:
      msg = (f'CVMM impl="auto": {name}\'s results for {kernel} differ from {ref_name}\'s '
             f"by {rel:.1e} (relative, result {i} of output and gradients); {name} is not "
             "chosen for it. Please report this with the GPU and the shapes.")
      warnings.warn(msg, RuntimeWarning, stacklevel=2)
      raise RuntimeError(msg)


def _normal(seed: int, shape, dtype, scale: float = 1.0) -> jax.Array:
  return (jax.random.normal(jax.random.key(seed), shape, jnp.float32) * scale).astype(dtype)


def _pairs_block(routing: Routing) -> int:
  """The experts per block of the routing's unit pairs (SwitchHead), 0 without them."""
  return 0 if routing.pairs is None else routing.pairs.block


def _bench_routing(routing: Routing) -> Routing:
  """A random routing of ``routing``'s tokens, slots and experts, with unit pairs of the
  same block where it has them (the kernels then take their unit-pair paths)."""
  n, k, e = routing.n_tokens, routing.k, routing.n_experts
  b = _pairs_block(routing)
  if b:
    idx = jax.lax.top_k(jax.random.normal(jax.random.key(0), (n, k // 2, b)), 2)[1]
    return make_head_routing(idx, b, unit_pairs=True)
  return synthetic_routing(n, k, e)
