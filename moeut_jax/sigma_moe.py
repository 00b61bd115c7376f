"""σ-MoE feed-forward block (docs/semantics.md §2): sigmoid-gated top-k experts of ReLU MLPs."""
from __future__ import annotations

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from kernels import DEFAULT, CvmmConfig, cvmm_pair, expert_weights, make_routing
from moeut_jax import initializers as init
from moeut_jax.parallel import per_device
from moeut_jax.recompute import Cast, recompute_input
from moeut_jax.remat import MOE_ROUTER_LOGITS, ROUTING, WEIGHTS
from moeut_jax.routing import router_logits, sigmoid_topk, sigmoid_topk_balanced, upcast


class SigmaMoE(nn.Module):
  """out = sum_j w_j * relu(x @ keys[i_j]) @ values[i_j], i, w = top-k(sigmoid(sel @ expert_sel)).

  Parameters: keys [Ef, D, Es], values [Ef, Es, D], expert_sel [D, Ef] (the original's
  ``expert_sel`` transposed). Returns (out [B, T, D] in ``dtype``, the entropy
  regulariser's term of the router logits [B, Ef] float32 when ``train``, else None: see
  :func:`moeut_jax.routing.sigmoid_topk_balanced`).
  """
  d_model: int
  n_experts: int
  expert_size: int
  k: int
  n_layers: int
  expert_dropout: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  cvmm: CvmmConfig = DEFAULT             # the CVMM kernels' settings
  router_dtype: Any = jnp.float32        # dtype of the router (moeut_jax/routing.py)
  # the backward pass keeps the experts' [N*k, Es] middle (True) or makes it again with
  # the up projection (False: remat="lean", moeut_jax/remat.py)
  keep_middle: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, sel_input: jax.Array, train: bool = False,
               sel_source=None, x_kept: bool = False):
    """x [B, T, D] the experts' input; sel_input [B, T, D] the router's; sel_source: when
    sel_input is a LayerNorm's output, its :class:`~moeut_jax.layernorm.NormSource` (the
    router's backward recomputes sel_input instead of keeping it); x_kept: x is kept for
    the backward pass anyway (MoEUT's residual stream), so the experts' backward pass casts
    it to ``dtype`` again instead of keeping the cast."""
    d, e, es = self.d_model, self.n_experts, self.expert_size
    scale = init.layer_scale(self.n_layers)
    keys = self.param("keys", init.normal(scale / d ** 0.5), (e, d, es), self.param_dtype)
    values = self.param("values", init.normal(scale / (e * es) ** 0.5), (e, es, d),
                        self.param_dtype)
    expert_sel = self.param("expert_sel", init.normalized_router(scale / d ** 0.5, 0, False),
                            (d, e), self.param_dtype)

    logits = router_logits(sel_input, expert_sel, self.dtype, self.router_dtype,
                           sel_source)                                # [B, T, Ef]
    logits = checkpoint_name(logits, MOE_ROUTER_LOGITS)
    drop = None
    if train and self.expert_dropout > 0:
      drop = jax.random.bernoulli(self.make_rng("dropout"), self.expert_dropout, logits.shape)

    def experts(logits, drop, x, keys, values):
      """Routing and the expert MLP for the tokens at hand (one device's, under a mesh)."""
      b, t, _ = x.shape
      term = None
      if train:                                  # [B, T, kf] each, and the term [B, Ef]
        gates, index, term = sigmoid_topk_balanced(logits, self.k, drop)
      else:
        gates, index = sigmoid_topk(logits, self.k, drop)
      routing = make_routing(index.reshape(b * t, self.k), e)
      gates, routing = checkpoint_name((gates, routing), ROUTING)
      xf = x.reshape(b * t, d)                                        # [N, D]
      # relu(x @ keys) @ values, gated sum over the kf experts (one fused kernel on GPUs)
      # 16-bit gates (the original's router) are exact in float32: every CVMM takes
      # float32 gates, and their gradient is rounded back to the router's dtype
      # with x_kept, the backward pass casts x again instead of keeping the cast
      out = recompute_input(functools.partial(cvmm_pair, keep_middle=self.keep_middle,
                                              config=self.cvmm),
                            xf.astype(self.dtype),
                            Cast(x, self.dtype, xf.shape) if x_kept else None,
                            routing, keys, values,
                            upcast(gates.reshape(b * t, self.k)))          # [N, D]
      return out.reshape(b, t, d), term

    weights = tuple(checkpoint_name(expert_weights(w, self.dtype, config=self.cvmm), WEIGHTS)
                    for w in (keys, values))
    out, term = per_device(experts, (logits, drop, x), weights)
    return out, term
