"""Rematerialisation (gradient checkpointing) of the layer group: what the backward pass keeps.

``MoEUT(..., remat=...)`` / ``MoEUTLM(..., remat=...)`` / ``train.py --remat``, from the
most memory to the least. Sizes: what each layer keeps per 1024 tokens at MoEUT_244M in
bf16, from JAX's list of saved residuals traced on a CPU with the Triton path
(``python bench/residuals.py``, which lists every residual; the attention counted as
cuDNN's fused attention keeps it on GPUs: q, k, v, its output and [B, H, T] statistics).

- ``"none"`` (default): every layer keeps what its backward pass reads: 18.4 MiB, the
  largest part the residual stream's float32 sums after each branch. Neither the
  LayerNorms' float32 outputs nor the bf16 casts of the stream and of LN1's output that
  the projections and CVMM kernels read are kept: the backward passes of the routers
  (``router_logits(..., source=...)``), of q and k and of the kernels
  (:func:`moeut_jax.recompute.recompute_input`) make them again from the residual
  stream, 8 and 6 MiB less; SwitchHead's V adds each head's experts in the kernels and
  keeps no per-expert products (2 MiB less). (These are JAX's counts; XLA shares
  reshapes and repeated casts, and may fuse an elementwise residual's producer into the
  backward pass instead: the GPU's peak is what
  bench/memory.sh measures. Optimization barriers tied to the cotangent keep XLA from
  merging the backward passes' recomputations with the forward pass's operations, which
  would keep the forward's arrays alive until the backward: on an H100 they take
  MoEUT_244M's step from 54.7 to 41.3 GiB.)
- ``"elementwise"``: recomputes every value that an elementwise operation makes (adds,
  casts, LayerNorm's normalisation, RoPE, sigmoids, softmaxes, reshapes, dropout's
  random bits: ``ELEMENTWISE_PRIMITIVES``) and keeps everything else: products, kernel
  outputs, reductions (LayerNorm's statistics) and every named value below: 15.4 MiB.
  Of the residual stream it keeps the group's input (float32) and each branch's output
  (16-bit); no product, kernel or attention runs twice, the backward pass only adds
  passes over [N, D] arrays (LayerNorms and casts, each fused into its consumers).
- ``"lean"``: as "elementwise", and the cheap products run again too: XLA's matrix
  products (the q|k projection and SwitchHead's routers; on CPUs XLA's attention), q
  and k after RoPE and SwitchHead's router logits are not kept, and the σ-MoE's fused
  expert MLP keeps no [N·k, expert size] middle: its backward pass makes it again with
  the up projection alone (``kernels.cvmm_pair(..., keep_middle=False)``): 9.1 MiB,
  6.3 MiB less than "elementwise" for one more up projection, q|k product and
  SwitchHead router product per layer. The σ-MoE router's float32 logits (1.5 MiB) are
  kept: making them again takes its three bf16 products ([N, D] x [D, Ef]) per layer,
  and on an H100 keeping them took the step's cost from 10.9% to 8.5% of "none"'s
  tokens/s for 1.6 GiB more at MoEUT_244M's batch of 64 (14.1 to 15.7 GiB).
- ``"save_projections"``: keeps only the values named in ``SAVED_NAMES`` (router logits,
  the routings, q and k after RoPE, SwitchHead's V and O CVMM outputs, the weights in
  the compute dtype): 9.2 MiB, and recomputes the rest of the layer group in the
  backward pass: LayerNorms, casts, RoPE, the attention itself and the σ-MoE's fused
  expert MLP (whose backward needs the [N·k, expert size] middle that only its forward
  kernel makes).
- ``"full"``: keeps only each layer group's input (the residual stream, float32, and the
  regulariser's accumulators): 2 MiB (4 MiB per group of 2), and recomputes the whole
  group in the backward pass.

All but "full" keep the compute-dtype copies of the weights once per step (0.42 GiB at
MoEUT_244M), not once per repeat. The values are the same as without remat: the
backward pass recomputes the same forward. (On GPUs the CVMM kernels' float16/float32
atomic sums add in a varying order, so there the recomputed values, and the gradients,
vary between runs as every run's do.)

Compile time grows with the program. With the scan over repeats unrolled (the GPU
default), "full" and "save_projections" put a second copy of most of every repeat's
forward pass into the backward pass, and XLA's passes take about twice as long: on a
CPU, MoEUT_244M unrolled compiles in 1.9x the time of "none" with "full", 1.5x with
"save_projections", 1.2-1.4x with "elementwise". A smaller ``scan_unroll`` compiles
fewer copies: with 3 of R = 9 repeats per iteration, "full" in 0.6-0.7x of "none"
unrolled.
"""
from __future__ import annotations

import contextlib
import io
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import print_saved_residuals

REMAT_POLICIES = ("none", "elementwise", "lean", "save_projections", "full")

# Names given with ``jax.ad_checkpoint.checkpoint_name`` (in attention.py and
# sigma_moe.py) to values that are worth keeping.
MOE_ROUTER_LOGITS = "moeut_moe_router_logits"  # σ-MoE's router [B, T, Ef] float32
ATTENTION_ROUTER_LOGITS = "moeut_attention_router_logits"  # SwitchHead's [B, T, H, Ea] f32
ROUTING = "moeut_routing"                 # gates and sorted token-expert pairs (top-k, sort)
ATTENTION_QK = "moeut_attention_qk"       # q, k [B, T, H, Dh] after RoPE
SWITCHHEAD_CVMM = "moeut_switchhead_cvmm"  # V's [N, H, Dh] (per-head sums) and O's [N, D] outputs
WEIGHTS = "moeut_weights"                 # the parameters in the compute dtype
# what "save_projections" keeps
SAVED_NAMES = (MOE_ROUTER_LOGITS, ATTENTION_ROUTER_LOGITS, ROUTING, ATTENTION_QK, SWITCHHEAD_CVMM,
               WEIGHTS)
# "elementwise" keeps these too (products it would otherwise keep in float32 and
# cast again): v [B, T, H, Dh] as attention reads it, attention's output [B, T, H, Dh]
ATTENTION_V = "moeut_attention_v"
ATTENTION_OUT = "moeut_attention_out"
NAMES = SAVED_NAMES + (ATTENTION_V, ATTENTION_OUT)

# Primitives whose outputs "elementwise" recomputes: elementwise arithmetic, casts and
# layout changes (each a cheap pass over its inputs, fused into its consumers), and the
# random bits of dropout masks (drawn again from the same key: uint32 bits would take
# 4 bytes per element where the mask takes 1). Everything else (products, reductions,
# sorts, gathers, kernels) and every named value is kept. (A primitive missing here is
# kept: more memory, never a wrong value.)
ELEMENTWISE_PRIMITIVES = frozenset({
    "convert_element_type", "reduce_precision", "bitcast_convert_type", "reshape",
    "broadcast_in_dim", "squeeze", "expand_dims", "transpose", "slice", "split", "concatenate",
    "pad", "iota", "copy", "select_n", "clamp", "add", "sub", "mul", "div", "rem", "neg", "max",
    "min", "abs", "sign", "floor", "ceil", "round", "exp", "expm1", "log", "log1p", "logistic",
    "tanh", "rsqrt", "sqrt", "integer_pow", "pow", "square", "sin", "cos", "eq", "ne", "lt",
    "le", "gt", "ge", "and", "or", "not", "xor", "shift_left", "shift_right_logical",
    "shift_right_arithmetic", "random_bits", "random_wrap", "random_unwrap", "random_fold_in"})


def _save_unless_elementwise(prim, *_, **__) -> bool:
  return prim.name not in ELEMENTWISE_PRIMITIVES


def _save_unless_cheap(prim, *_, **params) -> bool:
  """"lean": as "elementwise", but XLA's matrix products (the q|k projection,
  SwitchHead's routers), q and k after RoPE and SwitchHead's router logits are made
  again too; the σ-MoE router's logits are kept."""
  if prim.name in ELEMENTWISE_PRIMITIVES or prim.name == "dot_general":
    return False
  if prim.name == "name":
    return params["name"] not in (ATTENTION_QK, ATTENTION_ROUTER_LOGITS)
  return True


def keeps_middle(remat: str) -> bool:
  """Whether the σ-MoE's fused expert MLP keeps its [N*k, expert size] middle for the
  backward pass (``kernels.cvmm_pair``'s ``keep_middle``): all but "lean", which makes it
  again with the up projection. ("save_projections" and "full" run the whole MLP again
  in the backward pass and use the middle that run makes.)"""
  return remat != "lean"


def validate_remat(remat) -> None:
  if remat not in REMAT_POLICIES:
    raise ValueError(f"remat={remat!r} must be one of {REMAT_POLICIES}")


def checkpoint_policy(remat: str):
  """The ``jax.checkpoint`` policy of a remat setting other than "none"."""
  validate_remat(remat)
  if remat == "none":
    raise ValueError('remat="none" has no checkpoint policy: the group is not rematerialised')
  if remat == "full":
    return jax.checkpoint_policies.nothing_saveable
  if remat == "elementwise":
    return _save_unless_elementwise
  if remat == "lean":
    return _save_unless_cheap
  return jax.checkpoint_policies.save_only_these_names(*SAVED_NAMES)


def remat_module(module_cls: type[nn.Module], remat: str, unroll: int) -> type[nn.Module]:
  """``module_cls`` (the layer group that ``nn.scan`` repeats) under ``nn.remat``.

  unroll: the scan's repeats per loop iteration. In a rolled loop the forward and the
  backward pass are separate loops, so XLA cannot merge the recomputation back into the
  forward pass and ``prevent_cse`` is not needed (JAX's advice for scans). Unrolled
  repeats are straight-line code where it could, and then the optimisation barriers of
  ``prevent_cse`` keep the recomputation in the backward pass.
  """
  validate_remat(remat)
  if remat == "none":
    return module_cls
  return nn.remat(module_cls, policy=checkpoint_policy(remat), prevent_cse=unroll > 1)


_AVAL = re.compile(r"~?([a-z]+)(\d*)\[([\d,]*)\]")
_DTYPE_PREFIX = {"bf": "bfloat", "f": "float", "i": "int", "u": "uint", "c": "complex"}


def _parse_aval(text: str) -> jax.ShapeDtypeStruct:
  m = _AVAL.match(text)
  if m is None:
    raise ValueError(f"cannot read a shape and dtype from {text!r}")
  kind, bits, dims = m.groups()
  dtype = jnp.dtype(kind if kind == "bool" else _DTYPE_PREFIX[kind] + bits)
  return jax.ShapeDtypeStruct(tuple(int(d) for d in dims.split(",") if d), dtype)


def saved_residuals(fn, *args) -> list[tuple[jax.ShapeDtypeStruct, str]]:
  """What the backward pass of ``fn(*args)`` keeps, traced abstractly (``args`` may be
  ``jax.ShapeDtypeStruct``s): (shape and dtype, where it comes from) per residual, as
  ``jax.ad_checkpoint.print_saved_residuals`` lists them."""
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    print_saved_residuals(fn, *args)
  rows = []
  for line in printed.getvalue().splitlines():
    aval, _, origin = line.partition(" ")
    rows.append((_parse_aval(aval), origin))
  return rows


def nbytes(value: jax.ShapeDtypeStruct) -> int:
  return value.size * value.dtype.itemsize


def layer_group_residuals(stack, remat: str, batch: int, seq: int):
  """The saved residuals (:func:`saved_residuals`) of one training-mode application of
  ``stack``'s layer group (a :class:`moeut_jax.MoEUT`'s G layers, causal, no cache) under
  ``remat``, for ``batch`` sequences of ``seq`` tokens: forward and backward of the sum
  of its outputs with respect to its input and parameters."""
  from moeut_jax.layer import LayerGroup  # noqa: PLC0415  (layer.py imports this module)
  from moeut_jax.masks import blocked_keys  # noqa: PLC0415
  from moeut_jax.routing import entropy_init  # noqa: PLC0415
  g, h, ea = stack.group_size, stack.n_heads, stack.att_n_experts
  acc = {"ffn": tuple(entropy_init((batch, stack.ff_n_experts)) for _ in range(g))}
  if ea > 1:
    acc["att_o"] = tuple(entropy_init((batch, h, ea)) for _ in range(g))
    acc["att_v"] = tuple(entropy_init((batch, h, ea)) for _ in range(g))
  positions = jnp.arange(seq, dtype=jnp.int32)
  blocked = blocked_keys(None, causal=True, batch=batch, q_len=seq, n_keys=seq, offset=0)
  kwargs = dict(stack._layer_kwargs(), ff_keep_middle=keeps_middle(remat))
  group = remat_module(LayerGroup, remat, 1)(kwargs, g, True, True, False, False)
  x = jax.ShapeDtypeStruct((batch, seq, stack.d_model), jnp.float32)
  params = jax.eval_shape(
      lambda x: group.init(jax.random.PRNGKey(0), (x, acc), None, positions, blocked, 0), x)

  def total(x, params):
    (y, acc_out), _ = group.apply(params, (x, acc), None, positions, blocked, 0,
                                  rngs={"dropout": jax.random.PRNGKey(1)})
    return y.sum() + sum(a.sum() for a in jax.tree.leaves(acc_out))

  return saved_residuals(total, x, params)
