"""SwitchHead attention with RoPE (docs/semantics.md §3): expert-mixed V and O projections per
head.

With ``n_experts > 1`` each head picks ``k`` of its ``n_experts`` value experts (from
k_src) and output experts (from q_src) by sigmoid top-k. With ``n_experts == 1`` it is
plain RoPE attention whose heads are scaled by a learned sigmoid gate.
Keys are cached already rotated (at their absolute positions), so cached decoding
equals the full forward.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from kernels import DEFAULT, CvmmConfig, cvmm, expert_weights, make_head_routing
from moeut_jax import initializers as init
from moeut_jax.parallel import per_device
from moeut_jax.remat import (ATTENTION_OUT, ATTENTION_QK, ATTENTION_ROUTER_LOGITS, ATTENTION_V,
                             ROUTING, SWITCHHEAD_CVMM, WEIGHTS)
from moeut_jax.recompute import Cast, recompute_input
from moeut_jax.rope import apply_rope, rotary_width
from moeut_jax.routing import (gate_sigmoid, router_logits, sigmoid_topk,
                               sigmoid_topk_balanced, upcast)


def dot_attention(q: jax.Array, k: jax.Array, v: jax.Array, blocked: jax.Array | None,
                  causal_only: bool) -> jax.Array:
  """softmax(q k^T) v per head, no extra scaling (q and k arrive pre-scaled).

  q [B, T, H, Dh]; k, v [B, S, H, Dh]; blocked [B|1, 1, T, S] (True = masked) or None.
  Softmax statistics in float32. A query whose every key is blocked gets zeros.
  On GPUs in 16-bit with a plain causal mask, cuDNN's fused (flash) attention is used
  where cuDNN accepts the shapes; otherwise, and everywhere else, XLA's.
  """
  if (causal_only and jax.default_backend() == "gpu"
      and q.dtype in (jnp.bfloat16, jnp.float16)):
    try:  # jax's default implementation is XLA's unfused one: ask for cuDNN by name
      return jax.nn.dot_product_attention(q, k, v, scale=1.0, is_causal=True,
                                          implementation="cudnn")
    except (RuntimeError, ValueError, NotImplementedError):  # no cuDNN, or shapes it refuses
      return jax.nn.dot_product_attention(q, k, v, scale=1.0, is_causal=True,
                                          implementation="xla")
  logits = jnp.einsum("BTHK,BSHK->BHTS", q, k, preferred_element_type=jnp.float32)
  if blocked is not None:
    logits = jnp.where(blocked, jnp.finfo(jnp.float32).min, logits)
  probs = jax.nn.softmax(logits, axis=-1)                             # [B, H, T, S]
  if blocked is not None:
    probs = jnp.where(jnp.all(blocked, axis=-1, keepdims=True), 0.0, probs)
  out = jnp.einsum("BHTS,BSHK->BTHK", probs.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  return out.astype(q.dtype)


def _project(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [B, T, D] @ w [D, H, Dh] -> [B, T, H, Dh]."""
  return jnp.einsum("BTD,DHK->BTHK", x, w)


def _route(logits: jax.Array, drop: jax.Array | None, k: int, config: CvmmConfig,
           train: bool = False):
  """Gates [B, T, H, k] and the routing of one SwitchHead projection from its router
  logits [B, T, H, Ea] (expert of head h, expert e: h * Ea + e), and when ``train`` the
  entropy regulariser's term [B, H, Ea] (else None)."""
  b, t, h, ea = logits.shape
  term = None
  if train:
    gates, index, term = sigmoid_topk_balanced(logits, k, drop)
  else:
    gates, index = sigmoid_topk(logits, k, drop)
  unit_pairs = config.unit_pairs if jax.default_backend() == "gpu" else False
  gates, routing = checkpoint_name((gates, make_head_routing(index.reshape(b * t, h, k), ea,
                                                            unit_pairs=unit_pairs)), ROUTING)
  return gates, routing, term


class SwitchHeadRope(nn.Module):
  """Parameters (Ea = n_experts > 1): q, k [D, H, Dh]; v [H*Ea, D, Dh]; o [H*Ea, Dh, D];
  sel_v, sel_o [D, H*Ea]. (Ea = 1): q, k, v [D, H, Dh]; o [H, Dh, D]; sel_o [D, H].
  Expert index of head h, expert e: h * Ea + e (the original's layout)."""
  d_model: int
  n_heads: int
  d_head: int
  n_experts: int
  k: int
  n_layers: int
  expert_dropout: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  cvmm: CvmmConfig = DEFAULT             # the CVMM kernels' settings
  router_dtype: Any = jnp.float32        # dtype of the routers (moeut_jax/routing.py)
  rope_table_dtype: Any = jnp.float32    # dtype of the RoPE angles (moeut_jax/rope.py)

  def _params(self):
    d, h, dh, ea = self.d_model, self.n_heads, self.d_head, self.n_experts
    scale = init.layer_scale(self.n_layers)
    p = {}
    p["q"] = self.param("q", init.normal(scale / d ** 0.5), (d, h, dh), self.param_dtype)
    p["k"] = self.param("k", init.normal(scale / d ** 0.5), (d, h, dh), self.param_dtype)
    sel = init.normalized_router(scale / d ** 0.5, 0, True)
    if ea > 1:
      p["v"] = self.param("v", init.normal(scale / d ** 0.5), (h * ea, d, dh), self.param_dtype)
      p["o"] = self.param("o", init.normal(scale / (h * dh) ** 0.5), (h * ea, dh, d),
                          self.param_dtype)
      p["sel_v"] = self.param("sel_v", sel, (d, h * ea), self.param_dtype)
      p["sel_o"] = self.param("sel_o", sel, (d, h * ea), self.param_dtype)
    else:
      p["v"] = self.param("v", init.normal(scale / d ** 0.5), (d, h, dh), self.param_dtype)
      p["o"] = self.param("o", init.normal(scale / (h * dh) ** 0.5), (h, dh, d),
                          self.param_dtype)
      p["sel_o"] = self.param("sel_o", sel, (d, h), self.param_dtype)
    return p

  def _routers(self, p, q_src, k_src, train, source=None):
    """Router logits of the V projection (from k_src) and the O projection (from q_src),
    [B, T, H, Ea] f32 each, with their expert-dropout masks (or None). 16-bit routers
    (``router_dtype``) round the logits, then take them to float32, as the original's
    ``.float()``.

    float32 routers of one source (q_src is k_src, as in MoEUT's layers) are one product
    with the two weights side by side: the same logits, and one gradient of the source
    instead of two to be added. 16-bit routers stay two products, each gradient rounded
    on its own, as the original's two bf16 linears."""
    b, t, _ = q_src.shape
    shape = (b, t, self.n_heads, self.n_experts)
    source = source if k_src is q_src else None
    if k_src is q_src and jnp.dtype(self.router_dtype) == jnp.float32:
      both = router_logits(q_src, jnp.concatenate([p["sel_v"], p["sel_o"]], axis=1),
                           self.dtype, self.router_dtype, source)           # [B, T, 2HEa]
      lv, lo = jnp.split(both, 2, axis=-1)
    else:
      lv = upcast(router_logits(k_src, p["sel_v"], self.dtype, self.router_dtype, source))
      lo = upcast(router_logits(q_src, p["sel_o"], self.dtype, self.router_dtype, source))
    out = []
    for logits in (lv, lo):
      logits = checkpoint_name(logits.reshape(shape), ATTENTION_ROUTER_LOGITS)
      drop = None
      if train and self.expert_dropout > 0:
        drop = jax.random.bernoulli(self.make_rng("dropout"), self.expert_dropout, shape)
      out += [logits, drop]
    return tuple(out)

  @nn.compact
  def __call__(self, q_src, k_src, v_src, *, positions, blocked, causal_only,
               cache=None, train: bool = False, src_source=None, v_src_kept: bool = False):
    """One attention application.

    Args:
      q_src, k_src: [B, T, D] (LN1(x)); v_src: [B, T, D] (raw x).
      positions: [T] absolute positions of the new tokens.
      blocked, causal_only: see :func:`dot_attention`.
      cache: None, or (k [B, C, H, Dh], v [B, C, H, Dh], offset, fixed): earlier keys and
        values. ``fixed`` (static): a fixed-capacity buffer written at ``offset``;
        otherwise the new keys are appended.
      train: expert dropout.
      src_source: when q_src and k_src are one LayerNorm's output, its
        :class:`~moeut_jax.layernorm.NormSource`: the backward passes of the routers and
        of the q, k projection recompute it (and its cast) instead of keeping it.
      v_src_kept: v_src is kept for the backward pass anyway (MoEUT's residual stream):
        the V projection's backward pass casts it again instead of keeping the cast.

    Returns:
      (out [B, T, D], (k_all, v_all) the keys/values to cache, the entropy regulariser's
      terms of the O and V routers when ``train``: (term_o, term_v) [B, H, Ea] f32 (see
      :func:`moeut_jax.routing.sigmoid_topk_balanced`), else None, and None when Ea == 1).
    """
    p = self._params()
    b, t, d = q_src.shape
    h, dh = self.n_heads, self.d_head
    cd = self.dtype
    # the parameters in the compute dtype (the CVMM kernels' expert weights as they take them)
    weight = lambda name: checkpoint_name(p[name].astype(cd), WEIGHTS)  # noqa: E731
    experts = lambda name: checkpoint_name(  # noqa: E731
        expert_weights(p[name], cd, config=self.cvmm), WEIGHTS)
    qk_scale = dh ** -0.25
    if k_src is q_src:   # one product with both weights: one gradient of the source
      # with src_source, the backward pass recomputes the cast LayerNorm output from it
      qk = recompute_input(_project, q_src.astype(cd),
                           None if src_source is None else Cast(src_source, cd),
                           jnp.concatenate([weight("q"), weight("k")], axis=1)) * qk_scale
      q, k = qk[:, :, :h], qk[:, :, h:]
    else:
      q = _project(q_src.astype(cd), weight("q")) * qk_scale
      k = _project(k_src.astype(cd), weight("k")) * qk_scale
    n_rot = rotary_width(dh)
    q = checkpoint_name(apply_rope(q, positions, n_rot, self.rope_table_dtype), ATTENTION_QK)
    k = checkpoint_name(apply_rope(k, positions, n_rot, self.rope_table_dtype), ATTENTION_QK)

    if self.n_experts > 1:
      lv, drop_v, lo, drop_o = self._routers(p, q_src, k_src, train, src_source)

      def values(lv, drop_v, v_src, w):
        """Expert-mixed values of the tokens at hand (one device's, under a mesh)."""
        gv, rv, term = _route(lv, drop_v, self.k, self.cvmm, train)
        bl, tl = v_src.shape[:2]
        nl = bl * tl
        v_in = v_src.reshape(nl, 1, d)
        # each head's k experts summed with their gates; with v_src_kept, the backward
        # pass casts v_src again rather than keeping the cast
        v = recompute_input(functools.partial(cvmm, out_rows=h, config=self.cvmm),
                            v_in.astype(cd),
                            Cast(v_src, cd, v_in.shape) if v_src_kept else None,
                            rv, w, gv.reshape(nl, h * self.k))            # [N, H, Dh]
        v = checkpoint_name(v, SWITCHHEAD_CVMM)
        return v.reshape(bl, tl, h, dh).astype(cd), term                  # [B, T, H, Dh]

      v, term_v = per_device(values, (lv, drop_v, v_src),
                             (experts("v"),))
    else:
      v = recompute_input(_project, v_src.astype(cd), Cast(v_src, cd) if v_src_kept else None,
                          weight("v"))
      reg_terms = None
    v = checkpoint_name(v, ATTENTION_V)

    if cache is None:
      k_all, v_all = k, v
    else:
      ck, cv, offset, fixed = cache
      if fixed:
        start = (jnp.int32(0), jnp.asarray(offset, jnp.int32), jnp.int32(0), jnp.int32(0))
        k_all = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), start)
        v_all = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), start)
      else:
        k_all = jnp.concatenate([ck, k.astype(ck.dtype)], axis=1)
        v_all = jnp.concatenate([cv, v.astype(cv.dtype)], axis=1)

    att = dot_attention(q, k_all.astype(cd), v_all.astype(cd), blocked,
                        causal_only and cache is None)                # [B, T, H, Dh]
    att = checkpoint_name(att, ATTENTION_OUT)

    if self.n_experts > 1:
      def output(lo, drop_o, att, w):
        """Expert-mixed output projection of the tokens at hand (one device's)."""
        go, ro, term = _route(lo, drop_o, self.k, self.cvmm, train)
        bl, tl = att.shape[:2]
        out = cvmm(att.reshape(bl * tl, h, dh), ro, w, go.reshape(bl * tl, h * self.k),
                   config=self.cvmm)                                      # [N, D]
        return checkpoint_name(out, SWITCHHEAD_CVMM).reshape(bl, tl, d), term

      out, term_o = per_device(output, (lo, drop_o, att),
                               (experts("o"),))
      reg_terms = None if term_o is None else (term_o, term_v)
    else:
      # [B, T, H]; in router_dtype (the original's gate is bf16 under autocast)
      gate = gate_sigmoid(router_logits(q_src, p["sel_o"], cd, self.router_dtype,
                                        src_source))
      att = (att.astype(jnp.float32) * upcast(gate)[..., None]).astype(cd)
      out = jnp.einsum("BTHK,HKD->BTD", att, weight("o"))
    return out, (k_all, v_all), reg_terms
