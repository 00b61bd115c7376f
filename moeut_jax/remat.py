"""Rematerialisation (gradient checkpointing) of the layer group: what the backward pass keeps.

``MoEUT(..., remat=...)`` / ``MoEUTLM(..., remat=...)`` / ``train.py --remat``:

- ``"none"`` (default): every layer keeps what its backward pass reads. At MoEUT_244M in
  bf16 that is about 60 MB per layer and 1024 tokens (attention aside), most of it
  float32 [N, D] copies of the residual stream inside the LayerNorms and at the routers'
  inputs, and each step keeps bf16 copies of the expert weights as well.
- ``"save_projections"``: keeps only the values named below (router logits, the routings,
  q and k after RoPE, SwitchHead's V and O CVMM outputs; about 8 MB per layer and 1024
  tokens at MoEUT_244M) and recomputes the rest of the layer group in the backward pass:
  LayerNorms, casts, RoPE, the attention itself and the σ-MoE's fused expert MLP (whose
  backward needs the [N·k, expert size] middle that only its forward kernel makes).
- ``"full"``: keeps only each layer group's input (the residual stream, float32, and the
  regulariser's accumulators) and recomputes the whole group in the backward pass.

(Sizes from JAX's list of saved residuals, traced on a CPU with the Triton path.)
The values are the same as without remat: the backward pass recomputes the same forward.
(On GPUs the CVMM kernels' float16/float32 atomic sums add in a varying order, so there
the recomputed values, and the gradients, vary between runs as every run's do.)
"""
from __future__ import annotations

import flax.linen as nn
import jax

REMAT_POLICIES = ("none", "save_projections", "full")

# Names given with ``jax.ad_checkpoint.checkpoint_name`` (in attention.py and
# sigma_moe.py) to the values that "save_projections" keeps.
ROUTER_LOGITS = "moeut_router_logits"     # σ-MoE [B, T, Ef] and SwitchHead [B, T, H, Ea] f32
ROUTING = "moeut_routing"                 # gates and sorted token-expert pairs (top-k, sort)
ATTENTION_QK = "moeut_attention_qk"       # q, k [B, T, H, Dh] after RoPE
SWITCHHEAD_CVMM = "moeut_switchhead_cvmm"  # V's [N, H*ka, Dh] and O's [N, D] CVMM outputs
SAVED_NAMES = (ROUTER_LOGITS, ROUTING, ATTENTION_QK, SWITCHHEAD_CVMM)


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
