"""What each remat policy keeps per layer at MoEUT_244M's shapes on the GPU path (the Triton
CVMM kernels, traced through the interpreter; nothing runs): the figures of
moeut_jax/remat.py's docstring, as claims that hold for the traced lists."""
import math
import re

import jax.numpy as jnp
import pytest

from kernels import CvmmConfig
from moeut_jax import MoEUT, profiles
from moeut_jax.remat import (ATTENTION_QK, ATTENTION_ROUTER_LOGITS, ELEMENTWISE_PRIMITIVES,
                             MOE_ROUTER_LOGITS, SWITCHHEAD_CVMM, layer_group_residuals, nbytes)

SEQ = 1024
STACK = MoEUT(**profiles.MoEUT_244M, dtype=jnp.bfloat16, cvmm=CvmmConfig(impl="triton"))
G, D = STACK.group_size, STACK.d_model
MADE_BY = re.compile(r"^output of (\w+) ")


def _attention_matrix(value, origin) -> bool:
  """[B, H, T, S] arrays of XLA's attention, which runs on CPUs (cuDNN's on GPUs keeps
  q, k, v, its output and [B, H, T] statistics instead)."""
  return "(dot_attention)" in origin and value.ndim == 4 and value.shape[-2:] == (SEQ, SEQ)


def _stream(value) -> bool:
  return value.ndim >= 2 and value.shape[-1] == D and math.prod(value.shape[:-1]) == SEQ


@pytest.fixture(scope="module")
def per_layer():
  """{remat: [(value, origin, bytes per layer and SEQ tokens)]} of the residuals that grow
  with the batch (traces at batch 1 and 2), XLA's attention matrices left out."""
  out = {}
  for remat in ("none", "elementwise", "lean", "save_projections", "full"):
    rows1 = layer_group_residuals(STACK, remat, 1, SEQ)
    rows2 = layer_group_residuals(STACK, remat, 2, SEQ)
    assert [o for _, o in rows1] == [o for _, o in rows2]
    out[remat] = [(v1, o, (nbytes(v2) - nbytes(v1)) / G) for (v1, o), (v2, _) in zip(rows1, rows2)
                  if nbytes(v2) > nbytes(v1) and not _attention_matrix(v1, o)]
  return out


def _mib(rows) -> float:
  return sum(b for _, _, b in rows) / 2 ** 20


def test_elementwise_drops_what_elementwise_operations_make(per_layer):
  """Of "none"'s list, "elementwise" drops everything an elementwise primitive makes and
  keeps in its place the [N, D] outputs of the branches (O's CVMM, the σ-MoE pair but in
  the last layer) and attention's output: no more than that."""
  none, elementwise = per_layer["none"], per_layer["elementwise"]
  made = [r for r in none if (m := MADE_BY.match(r[1])) and m.group(1) in ELEMENTWISE_PRIMITIVES]
  assert not [r for r in elementwise
              if (m := MADE_BY.match(r[1])) and m.group(1) in ELEMENTWISE_PRIMITIVES]
  stream = [r for r in elementwise if _stream(r[0])]
  assert len(stream) == 1 + G + (G - 1), stream            # the group's input and the branches
  assert sum(f"'{SWITCHHEAD_CVMM}'" in o for _, o, _ in stream) == G
  added = [r for r in elementwise if _stream(r[0]) or "'moeut_attention_out'" in r[1]]
  assert _mib(elementwise) <= _mib(none) - _mib(made) + _mib(added) + 0.5   # routing's ints
  # the [N, D] copies made by elementwise operations that "none" keeps are the residual
  # stream's float32 sums, no 16-bit casts (recomputed: moeut_jax/recompute.py)
  made_stream = [r for r in made if _stream(r[0])]
  assert made_stream and all(v.dtype == jnp.float32 and "layer.py" in o
                             for v, o, _ in made_stream), made_stream
  assert _mib(elementwise) < 0.9 * _mib(none)


def test_none_keeps_the_residual_stream_and_no_copy_made_from_it(per_layer):
  """The backward passes of the routers, of q, k and of the V and σ-MoE kernels recompute
  the LayerNorms' outputs and the 16-bit casts they read from the residual stream, so
  "none" keeps neither (the residual stream is: the group's input and the sum after each
  attention). And the regulariser and the float32 sigmoid keep the router logits, not
  log_softmax, exp or the gates."""
  none = per_layer["none"]
  f32 = [o for v, o, _ in none if _stream(v) and v.dtype == jnp.float32]
  assert not [o for o in f32 if "(_layer_norm_fwd)" in o or "(router_logits)" in o], f32
  assert len(f32) == 2 * G, f32   # the group's input, each layer's sum after attention, and
  #                                the sums after the σ-MoE that feed the next layer
  casts = [o for v, o, _ in none if _stream(v) and "convert_element_type" in o]
  assert not casts, casts
  routing = [o for v, o, _ in none if v.size >= SEQ            # per token, not the [B, E] sums
             and ("(entropy_accumulate)" in o or "(gate_sigmoid)" in o)]
  assert not routing, routing


def test_the_policies_keep_less_in_order(per_layer):
  sizes = [_mib(per_layer[r]) for r in ("none", "elementwise", "save_projections", "full")]
  assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 4, sizes
  # "full": the group's float32 input, shared by its layers, and the regulariser's sums
  assert sizes[-1] == pytest.approx(SEQ * D * 4 / G / 2 ** 20, rel=1e-2)


def test_lean_drops_the_experts_middle_q_k_and_switchhead_router_logits(per_layer):
  """"lean" keeps what "elementwise" keeps but the σ-MoE's [N*k, Es] middle (the fused
  pair's backward makes it again with the up projection), q and k after RoPE (the q|k
  product runs again) and SwitchHead's float32 router logits (their product runs
  again): 6.32 MiB per layer and 1024 tokens less at MoEUT_244M. The σ-MoE router's
  logits (1024 x 387 float32, 1.51 MiB) stay."""
  elementwise, lean = per_layer["elementwise"], per_layer["lean"]
  middle = (SEQ * STACK.ff_k, STACK.ff_expert_size)
  named = (f"'{ATTENTION_QK}'", f"'{ATTENTION_ROUTER_LOGITS}'")
  assert [r for r in elementwise if r[0].shape == middle]
  assert not [r for r in lean if r[0].shape == middle], lean
  for name in named:
    assert [r for r in elementwise if name in r[1]], name
    assert not [r for r in lean if name in r[1]], lean
  kept = f"'{MOE_ROUTER_LOGITS}'"
  assert ([r[0].shape for r in lean if kept in r[1]]
          == [r[0].shape for r in elementwise if kept in r[1]]
          == [(1, SEQ, STACK.ff_n_experts)] * G)   # one per layer of the group
  dropped = [r for r in elementwise
             if r[0].shape == middle or any(name in r[1] for name in named)]
  assert _mib(lean) == pytest.approx(_mib(elementwise) - _mib(dropped), abs=0.01)
  assert _mib(dropped) == pytest.approx(6.32, abs=0.01)
