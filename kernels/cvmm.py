"""The one CVMM entry point: each token times the matrices of its selected experts.

  y[n, s] = x[n, s // (K // M)] @ w[expert_index[n, s]]            -> [N, K, O]
  with gates:  out[n] = sum_s gates[n, s] * y[n, s]                -> [N, O]
  with gates and out_rows R:  out[n, r] = the same sum over the slots of group r
               (s // (K // R) == r)                                 -> [N, R, O]

σ-MoE uses it twice per layer with one :class:`Routing`: up (M = 1, no gates, then
ReLU) and down (M = K, gates: the weighted sum over the K experts is fused). SwitchHead
uses it for V (M = 1, slots are head × expert, gates, out_rows = heads: each head's
experts summed) and O (M = heads, gates).

Implementations are interchangeable and chosen by :class:`kernels.CvmmConfig`'s
``impl`` (or the ``impl`` argument, which overrides it):
  "reference"  the defining gather-everything version (tests only)
  "xla"        pure JAX over expert-aligned tiles (CPU, fallback)
  "triton"     Triton kernels through jax-triton (CUDA sm80+; on Hopper the fused sums
               also run Gluon kernels): kernels/cvmm_triton/
  "triton_unfused"  the same kernels, but sums over slots go through a stored
               [N*K, O] intermediate (for comparison; not chosen by "auto")
  "mosaic"     Pallas on the Mosaic GPU backend (Hopper, sm90): kernels/cvmm_mosaic/, rows
               gathered by cp.async, sums over slots fused (also per head); 16-bit
               inputs only
  "original"   the official MoEUT's own Triton kernels and the numerics of its CVMM op,
               from the clone the config's ``original_path`` names
               (kernels/cvmm_original.py; for comparisons; not chosen by "auto")
  "auto"       on GPUs the faster of "triton" and "mosaic" for each operation, timed
               on its first trace (kernels/auto.py; "mosaic" only for 16-bit inputs
               on Hopper; with autotuning off "triton" where available), else "xla"

:func:`cvmm_pair` is the σ-MoE MLP (up, ReLU, gated down) as one op: with "triton"
and "mosaic" it runs fused kernels that keep each tile's middle on chip, forward and
backward; otherwise two cvmm calls.

The GPU kernels add the sums over slots into their output rows (no [N*K, O]
intermediate), in the dtype the config's ``sum_dtype`` names (16-bit calls only;
float32 calls and the other implementations sum in float32): "float16" (default;
scaled rows, kernels/row_scales.py), "float32" or "bfloat16".
"""
from __future__ import annotations

import importlib
import warnings
from typing import Callable

import jax
import jax.numpy as jnp

from kernels import auto
from kernels.config import DEFAULT, IMPLEMENTATIONS, CvmmConfig
from kernels.routing import Routing, check_out_rows

# name -> (module, function). A module also defines ``is_available() -> bool``.
_IMPLEMENTATIONS: dict[str, tuple[str, str]] = {
    "reference": ("kernels.cvmm_reference", "cvmm_reference"),
    "xla": ("kernels.cvmm_xla", "cvmm_xla"),
    "triton": ("kernels.cvmm_triton", "cvmm_triton"),
    # Triton without the fused sum: per-pair rows are stored and summed by XLA.
    "triton_unfused": ("kernels.cvmm_triton", "cvmm_triton_unfused"),
    "mosaic": ("kernels.cvmm_mosaic", "cvmm_mosaic"),
    "original": ("kernels.cvmm_original", "cvmm_original"),
}
# What :func:`resolve` answers for "auto" on GPUs: the first available, whatever the
# dtype (the Mosaic path, 16-bit only, is chosen per call by kernels/auto.py); on any
# other backend "xla".
_AUTO_GPU_ORDER = ("triton", "xla")


def _module(name: str):
  mod_name, _ = _IMPLEMENTATIONS[name]
  try:
    return importlib.import_module(mod_name)
  except ImportError:
    return None


def is_available(name: str) -> bool:
  """Whether implementation ``name`` can run on the default backend here."""
  if name == "auto":
    return True
  if name not in _IMPLEMENTATIONS:
    raise ValueError(f"unknown CVMM implementation {name!r}; choose one of {IMPLEMENTATIONS}")
  mod = _module(name)
  return mod is not None and bool(mod.is_available())


def available_implementations() -> tuple[str, ...]:
  return tuple(n for n in _IMPLEMENTATIONS if is_available(n))


def resolve(impl: str) -> str:
  """The concrete implementation that ``impl`` names here. "auto" resolves to Triton
  on GPUs where it is available, else XLA: what every call takes where
  :mod:`kernels.auto` has no GPU implementation for it; 16-bit calls may take the
  Mosaic path instead, chosen by timing on Hopper (or as the only GPU path there)."""
  if impl != "auto":
    if not is_available(impl):
      raise RuntimeError(
          f"CVMM implementation {impl!r} is not available on backend "
          f"{jax.default_backend()!r}; available: {available_implementations()}")
    return impl
  if jax.default_backend() == "gpu":
    for name in _AUTO_GPU_ORDER:
      if is_available(name):
        if name == "xla":
          _warn_xla_on_gpu()
        return name
  return "xla"


def _call_impl(config: CvmmConfig, choose: Callable[[], str | None]) -> str:
  """``config.impl`` resolved for one call: under "auto" on a GPU, ``choose()``'s pick
  among the GPU implementations (:mod:`kernels.auto`; None: none can run the call);
  otherwise, and where it picks none, :func:`resolve`'s."""
  if config.impl == "auto" and jax.default_backend() == "gpu":
    name = choose()
    if name is not None:
      return name
  return resolve(config.impl)


_warned_xla_on_gpu = False


def _warn_xla_on_gpu() -> None:
  """Once per process: "auto" fell back to the pure-JAX path on a GPU, which is slow and
  needs far more memory at model sizes (MoEUT_244M's training step asked for 352 GiB on
  an H200 without jax-triton)."""
  global _warned_xla_on_gpu
  if _warned_xla_on_gpu:
    return
  _warned_xla_on_gpu = True
  why = ("jax-triton is not importable" if _module("triton") is None
         else "the Triton path is not available on this GPU")
  warnings.warn(
      f'CVMM impl="auto" runs the pure-JAX "xla" path on this GPU because {why}. It '
      "is slow and needs far more memory than the GPU kernels: install jax-triton "
      '(pip install "moeut-jax[gpu]") or choose impl="mosaic" on Hopper GPUs.',
      RuntimeWarning, stacklevel=3)


def _get(impl: str) -> Callable:
  name = resolve(impl)
  mod_name, fn_name = _IMPLEMENTATIONS[name]
  return getattr(importlib.import_module(mod_name), fn_name)


def _config(config: CvmmConfig | None, impl: str | None) -> CvmmConfig:
  config = DEFAULT if config is None else config
  if not isinstance(config, CvmmConfig):
    raise TypeError(f"config must be a kernels.CvmmConfig, got {type(config).__name__}")
  return config if impl is None else config.replace(impl=impl)


def cvmm(x: jax.Array, routing: Routing, w: jax.Array, gates: jax.Array | None = None,
         *, out_rows: int = 1, config: CvmmConfig | None = None,
         impl: str | None = None) -> jax.Array:
  """Multiplies every (token, slot) by its expert's matrix; see the module docstring.

  Args:
    x: [N, M, I] or [N, I] (M = 1). M must divide K.
    routing: from :func:`kernels.make_routing` on the [N, K] expert indices.
    w: [E, I, O] expert matrices.
    gates: optional [N, K] weights of the slots; if given the slots are summed.
    out_rows: with gates, R sums per token, each over K // R consecutive slots (R divides
      K): out[n, r] = sum_s gates[n, s] y[n, s] over the slots s // (K // R) == r.
      SwitchHead's V sums each head's k value experts (R = heads). 1: all slots.
    config: the kernels' settings (:class:`kernels.CvmmConfig`; None: the defaults).
    impl: overrides ``config.impl`` (see the module docstring).

  Returns:
    [N, K, O] without gates; with gates [N, O] (out_rows 1) or [N, R, O]; dtype of x
    (float32 accumulation).
  """
  config = _config(config, impl)
  if x.ndim == 2:
    x = x[:, None, :]
  if x.ndim != 3:
    raise ValueError(f"x must be [N, M, I] or [N, I], got shape {x.shape}")
  _check(x, routing, w, gates)
  check_out_rows(out_rows, routing.k, gates is not None)
  n = x.shape[0]
  o = w.shape[2]
  if n == 0:
    shape = (((0, o) if out_rows == 1 else (0, out_rows, o)) if gates is not None
             else (0, routing.k, o))
    return jnp.zeros(shape, x.dtype)
  name = _call_impl(config, lambda: auto.choose_cvmm(config, x, routing, w, gates, out_rows))
  if out_rows != 1:
    return _grouped_sums(x, routing, w, gates, out_rows, config.replace(impl=name))
  if name in ("triton", "triton_unfused", "mosaic", "original"):
    return _get(name)(x, routing, w, gates, config=config)
  return _get(name)(x, routing, w, gates)


def _grouped_sums(x, routing, w, gates, out_rows, config):
  """The gated sums of :func:`cvmm` in ``out_rows`` groups of slots. The Mosaic kernels
  add each group's rows themselves (no per-slot [N, K, O] products stored; the gates'
  gradient comes from dx's product). So do the Triton kernels where the products are
  narrower than the input rows (SwitchHead V): their backward pass makes the products
  again for the gates' gradient, cheap there. Otherwise, and with the other
  implementations, the products are made and :func:`gated_sum` adds them."""
  n, k, o = x.shape[0], routing.k, w.shape[2]
  if config.impl == "mosaic" or (config.impl in ("triton", "triton_unfused")
                                 and o < x.shape[2]):
    return _get(config.impl)(x, routing, w, gates, out_rows=out_rows, config=config)
  y = cvmm(x, routing, w, config=config)                            # [N, K, O]
  return gated_sum(y.reshape(n, out_rows, k // out_rows, o),
                   gates.reshape(n, out_rows, k // out_rows), config=config)


def expert_weights(w: jax.Array, dtype, *, config: CvmmConfig | None = None,
                   impl: str | None = None) -> jax.Array:
  """Expert matrices as :func:`cvmm` should get them for compute in ``dtype``: cast to
  ``dtype``, except for "original", which takes them as stored (its kernels round them
  in registers and return their gradient in the stored dtype, as the original does with
  its float32 parameters under autocast)."""
  if resolve(_config(config, impl).impl) == "original":
    return w
  return w.astype(dtype)


def gated_sum(y: jax.Array, gates: jax.Array, *, config: CvmmConfig | None = None,
              impl: str | None = None) -> jax.Array:
  """out[..., o] = sum_s gates[..., s] y[..., s, o], in y's dtype, summed as the gated
  :func:`cvmm` sums its slots: float32 gates and sums, rounded once; with "original", as
  the original op's reduction ``gates.type_as(y) @ y`` (the gates rounded to y's dtype
  first). :func:`cvmm` with ``out_rows`` sums its groups of slots with it where no kernel
  fuses them.

  y [..., S, O], gates [..., S] -> [..., O]."""
  if resolve(_config(config, impl).impl) == "original":
    return jnp.einsum("...SO,...S->...O", y, gates.astype(y.dtype),
                      precision=jax.lax.Precision.HIGHEST,
                      preferred_element_type=jnp.float32).astype(y.dtype)
  return jnp.einsum("...SO,...S->...O", y, gates,
                    preferred_element_type=jnp.float32).astype(y.dtype)


def _check(x: jax.Array, routing: Routing, w: jax.Array, gates: jax.Array | None):
  """Shape checks of one CVMM: x [N, M, I], w [E, I, O], gates [N, K] or None."""
  n, m, i = x.shape
  if w.ndim != 3:
    raise ValueError(f"w must be [E, I, O], got shape {w.shape}")
  e, wi, _ = w.shape
  if n != routing.n_tokens:
    raise ValueError(f"x has {n} tokens but routing has {routing.n_tokens}")
  if routing.k % m:
    raise ValueError(f"x rows per token {m=} must divide the slots per token k={routing.k}")
  if wi != i:
    raise ValueError(f"x width {i} does not match w's input width {wi} (w shape {w.shape})")
  if e != routing.n_experts:
    raise ValueError(f"w has {e} experts but routing was made for {routing.n_experts}")
  if gates is not None and gates.shape != (n, routing.k):
    raise ValueError(f"gates must be [N, K] = {(n, routing.k)}, got {gates.shape}")


def cvmm_pair(x: jax.Array, routing: Routing, w_up: jax.Array, w_down: jax.Array,
              gates: jax.Array, *, keep_middle: bool = True,
              config: CvmmConfig | None = None, impl: str | None = None) -> jax.Array:
  """The σ-MoE expert MLP: ``cvmm(relu(cvmm(x, routing, w_up)), routing, w_down, gates)``.

  out[n] = sum_s gates[n, s] * relu(x[n] @ w_up[e]) @ w_down[e], e = expert of (n, s).
  With ``impl`` "triton" (or "auto" choosing it) one fused kernel does both
  products per tile, forward and backward, keeping the [tile, H] middle on chip; so do
  the "mosaic" kernels (H up to 256, 192 with float32 sums); every other
  implementation composes two :func:`cvmm` calls. Same numerics either way: the middle
  is rounded to x's dtype after the ReLU.

  Args:
    x: [N, D]. routing: over [N, K]. w_up: [E, D, H]. w_down: [E, H, O]. gates: [N, K].
    keep_middle: the backward pass reads the forward's [N*K, H] middle relu(x @ w_up),
      kept from the forward pass (True) or made again from x with the up projection
      alone (False: one more up projection, no [N*K, H] array between the passes;
      the same values).
    config, impl: as for :func:`cvmm`.
  Returns:
    [N, O] in x's dtype.
  """
  if x.ndim != 2:
    raise ValueError(f"x must be [N, D], got shape {x.shape}")
  if w_up.ndim != 3 or w_down.ndim != 3:
    raise ValueError(f"w_up and w_down must be [E, D, H] and [E, H, O], got "
                     f"{w_up.shape} and {w_down.shape}")
  if w_up.shape[0] != w_down.shape[0] or w_up.shape[2] != w_down.shape[1]:
    raise ValueError(f"w_up {w_up.shape} and w_down {w_down.shape} do not chain "
                     "([E, D, H] then [E, H, O])")
  config = _config(config, impl)
  _check(x[:, None], routing, w_up, gates)
  name = (_call_impl(config, lambda: auto.choose_pair(config, x, routing, w_up, w_down,
                                                      keep_middle))
          if x.shape[0] > 0 else resolve(config.impl))
  if name == "triton" and x.shape[0] > 0:
    triton_mod = importlib.import_module("kernels.cvmm_triton")
    if triton_mod.pair_supported(x, w_up):
      return triton_mod.cvmm_triton_pair(x, routing, w_up, w_down, gates,
                                         keep_middle=keep_middle, config=config)
  if name == "mosaic" and x.shape[0] > 0:
    mosaic_mod = importlib.import_module("kernels.cvmm_mosaic")
    if mosaic_mod.pair_supported(w_up.shape[2], config):
      return mosaic_mod.cvmm_mosaic_pair(x, routing, w_up, w_down, gates,
                                         keep_middle=keep_middle, config=config)
  config = config.replace(impl=name)

  def pair(x, routing, w_up, w_down, gates):
    u = jax.nn.relu(cvmm(x, routing, w_up, config=config))            # [N, K, H]
    return cvmm(u, routing, w_down, gates, config=config)             # [N, O]

  # not keeping the middle: the backward pass makes what it reads of both products again
  # (the down projection's weight gradient reads the middle too)
  return (pair if keep_middle else jax.checkpoint(pair))(x, routing, w_up, w_down, gates)
