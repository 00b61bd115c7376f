"""One MoEUT layer (docs/semantics.md §1, peri-layernorm) and the group of G layers that
repeats."""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn

from kernels import CvmmConfig
from moeut_jax.attention import SwitchHeadRope
from moeut_jax.layernorm import LayerNorm
from moeut_jax.routing import entropy_accumulate_term
from moeut_jax.sigma_moe import SigmaMoE


class MoEUTLayer(nn.Module):
  """x += Dropout(Att(q=k=LN1(x), v=x));  x += SigmaMoE(x, sel=LN2(x)). Residual in float32."""
  d_model: int
  n_layers: int
  n_heads: int
  d_head: int
  ff_n_experts: int
  att_n_experts: int
  ff_k: int
  att_k: int
  ff_expert_size: int
  ff_expert_dropout: float
  att_expert_dropout: float
  dropout: float
  dtype: Any
  param_dtype: Any
  cvmm: CvmmConfig
  router_dtype: Any
  rope_table_dtype: Any
  ff_keep_middle: bool = True

  @nn.compact
  def __call__(self, x, *, positions, blocked, causal_only, cache, train):
    ln = lambda name: LayerNorm(1e-5, self.param_dtype, name=name)  # noqa: E731
    # the backward passes recompute the LayerNorms' outputs and the 16-bit casts of x
    # from x (kept anyway) instead of keeping them (moeut_jax/recompute.py)
    xn, xn_source = ln("ln1")(x, with_source=True)
    att, kv, att_terms = SwitchHeadRope(
        self.d_model, self.n_heads, self.d_head, self.att_n_experts, self.att_k,
        self.n_layers, self.att_expert_dropout, self.dtype, self.param_dtype, self.cvmm,
        self.router_dtype, self.rope_table_dtype, name="attention")(
            xn, xn, x, positions=positions, blocked=blocked, causal_only=causal_only,
            cache=cache, train=train, src_source=xn_source, v_src_kept=True)
    att = nn.Dropout(self.dropout)(att, deterministic=not train)
    x = x + att.astype(x.dtype)
    xn2, xn2_source = ln("ln2")(x, with_source=True)
    ffn, ffn_term = SigmaMoE(
        self.d_model, self.ff_n_experts, self.ff_expert_size, self.ff_k, self.n_layers,
        self.ff_expert_dropout, self.dtype, self.param_dtype, self.cvmm, self.router_dtype,
        self.ff_keep_middle, name="ffn")(x, xn2, train, sel_source=xn2_source, x_kept=True)
    x = x + ffn.astype(x.dtype)
    return x, kv, (ffn_term, att_terms)


class LayerGroup(nn.Module):
  """The G distinct layers, applied once; ``nn.scan`` repeats it R times with shared params.

  carry: (x [B, T, D] f32, reg accumulators or None);  xs: this repeat's cache or None.
  ys: this repeat's keys/values to cache, or None.
  """
  layer_kwargs: dict
  group_size: int
  train: bool
  causal_only: bool
  fixed_cache: bool
  return_cache: bool

  @nn.compact
  def __call__(self, carry, cache, positions, blocked, offset):
    x, acc = carry
    new_k, new_v = [], []
    acc = None if acc is None else {name: list(a) for name, a in acc.items()}
    for g in range(self.group_size):
      layer_cache = None if cache is None else (cache[0][g], cache[1][g], offset,
                                                self.fixed_cache)
      x, (k, v), (ffn_term, att_terms) = MoEUTLayer(**self.layer_kwargs, name=f"layer_{g}")(
          x, positions=positions, blocked=blocked, causal_only=self.causal_only,
          cache=layer_cache, train=self.train)
      new_k.append(k)
      new_v.append(v)
      if acc is not None:
        acc["ffn"][g] = entropy_accumulate_term(acc["ffn"][g], ffn_term)
        if att_terms is not None:
          acc["att_o"][g] = entropy_accumulate_term(acc["att_o"][g], att_terms[0])
          acc["att_v"][g] = entropy_accumulate_term(acc["att_v"][g], att_terms[1])
    acc = None if acc is None else {name: tuple(a) for name, a in acc.items()}
    ys = (tuple(new_k), tuple(new_v)) if self.return_cache else None
    return (x, acc), ys
