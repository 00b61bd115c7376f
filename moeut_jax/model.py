"""MoEUT and MoEUTLM: the original's public API in Flax linen.

Dimension legend (used across moeut_jax/):
  B batch, T query length, S key length (cached + new, or a fixed cache's capacity),
  D d_model, H n_heads, Dh d_head, Ea att_n_experts, ka att_k, Ef ff_n_experts, kf ff_k,
  Es ff_expert_size, G group_size, R = n_layers / G repeats, V vocabulary, N = B * T tokens.

The G distinct layers form one ``LayerGroup`` that ``nn.scan`` applies R times with its
parameters broadcast: stored once, shared by every repeat, so parameters and compile
time do not grow with depth. The entropy regulariser is carried through the scan as a
running log-sum-exp, over time and repeats (docs/semantics.md §5). With ``remat`` the group
runs under ``nn.remat`` and the backward pass recomputes what it does not keep
(moeut_jax/remat.py).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from moeut_jax import initializers as init
from moeut_jax.kv_cache import KVCache
from moeut_jax.layer import LayerGroup
from moeut_jax.layernorm import LayerNorm
from moeut_jax.losses import head_nll
from moeut_jax.masks import AttentionMask, blocked_keys
from moeut_jax.parallel import check_mesh_axes
from moeut_jax.remat import keeps_middle, remat_module, validate_remat
from moeut_jax.routing import entropy_init, entropy_loss
from kernels import DEFAULT, CvmmConfig


@flax.struct.dataclass
class MoEUTOutput:
  # [B, T, D] (MoEUT), [B, T, V] logits (MoEUTLM) or, given labels, [B, T] float32
  # negative log-likelihoods (MoEUTLM)
  outputs: jax.Array
  reg_loss: jax.Array                 # float32 scalar; 0 when train=False
  cache: Optional[KVCache] = None     # the updated cache when one was passed


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def _head_dim(m) -> int:
  return m.d_head if m.d_head is not None else m.d_model // m.n_heads


def _fixed_cache(m, batch_size: int, capacity: int, dtype) -> KVCache:
  if capacity < 1 or batch_size < 1:
    raise ValueError(f"{batch_size=} and {capacity=} must be positive")
  return KVCache.empty(group_size=m.group_size, repeats=m.n_layers // m.group_size,
                       batch=batch_size, n_heads=m.n_heads, d_head=_head_dim(m),
                       capacity=capacity, fixed=True, dtype=dtype or m.dtype)


def _effective_scan_unroll(m) -> int:
  """scan_unroll resolved: None is R (no loop) on GPUs and 1 elsewhere; at most R."""
  r = m.n_layers // m.group_size
  if m.scan_unroll is None:
    return r if jax.default_backend() == "gpu" else 1
  return min(m.scan_unroll, r)


# dtypes a router may compute in (docs/semantics.md §7)
ROUTER_DTYPES = ("float32", "bfloat16", "float16")


def _is_router_dtype(d) -> bool:
  try:
    return jnp.dtype(d).name in ROUTER_DTYPES
  except TypeError:
    return False


def validate_config(m) -> None:
  """Clear errors for inconsistent hyper-parameters (shared by MoEUT and MoEUTLM)."""
  for name in ("d_model", "n_layers", "n_heads", "ff_n_experts", "att_n_experts", "group_size",
               "ff_k", "att_k", "ff_expert_size"):
    if getattr(m, name) < 1:
      raise ValueError(f"{name}={getattr(m, name)} must be a positive integer")
  if m.n_layers % m.group_size:
    raise ValueError(f"n_layers={m.n_layers} must be divisible by group_size={m.group_size} "
                     "(the original silently drops the remainder)")
  if m.d_head is None and m.d_model % m.n_heads:
    raise ValueError(f"d_model={m.d_model} is not divisible by n_heads={m.n_heads}; "
                     "pass d_head explicitly")
  if m.d_head is not None and m.d_head < 1:
    raise ValueError(f"d_head={m.d_head} must be a positive integer")
  if m.ff_k > m.ff_n_experts:
    raise ValueError(f"ff_k={m.ff_k} cannot exceed ff_n_experts={m.ff_n_experts}")
  # With one attention expert there is nothing to choose: the original runs plain RoPE
  # attention with an output gate and ignores att_k (its default 2 included); so do we.
  if m.att_n_experts > 1 and m.att_k > m.att_n_experts:
    raise ValueError(f"att_k={m.att_k} cannot exceed att_n_experts={m.att_n_experts}")
  for name in ("dropout", "ff_expert_dropout", "att_expert_dropout"):
    if not 0.0 <= getattr(m, name) < 1.0:
      raise ValueError(f"{name}={getattr(m, name)} must be in [0, 1)")
  if m.attention is not None:
    raise ValueError("attention=: only the built-in SwitchHeadRope is supported; "
                     "use att_n_experts=1 for plain RoPE attention with an output gate")
  if not _is_router_dtype(m.router_dtype):
    raise ValueError(f"router_dtype={m.router_dtype!r} must be one of {ROUTER_DTYPES} "
                     "(float32: ours; the compute dtype: the original under autocast)")
  if not _is_router_dtype(m.rope_table_dtype):        # the same three dtypes
    raise ValueError(f"rope_table_dtype={m.rope_table_dtype!r} must be one of "
                     f"{ROUTER_DTYPES} (float32: ours; the compute dtype: the original under "
                     "CUDA autocast)")
  if not isinstance(m.cvmm, CvmmConfig):
    raise TypeError(f"cvmm must be a kernels.CvmmConfig (e.g. CvmmConfig(impl='xla')), "
                    f"got {m.cvmm!r}")
  if m.scan_unroll is not None and (not isinstance(m.scan_unroll, (int, np.integer))
                                    or isinstance(m.scan_unroll, bool) or m.scan_unroll < 1):
    raise ValueError(f"scan_unroll={m.scan_unroll!r} must be None or a positive integer")
  validate_remat(m.remat)


class MoEUT(nn.Module):
  """The MoEUT stack: inputs and outputs [B, T, D]. Arguments as in the original.

  ``att_n_experts=1`` is plain RoPE attention with a learned output gate; ``att_k`` and
  ``att_expert_dropout`` then have no effect (as in the original, which accepts them)."""
  d_model: int
  n_layers: int
  n_heads: int
  ff_n_experts: int
  att_n_experts: int
  d_head: Optional[int] = None
  group_size: int = 2
  ff_k: int = 8
  att_k: int = 2
  ff_expert_dropout: float = 0.0
  att_expert_dropout: float = 0.0
  ff_expert_size: int = 128
  dropout: float = 0.0
  entropy_reg: float = 0.01
  att_entropy_reg: float = 0.001
  attention: Any = None               # the original's SwitchHeadRope; no other is offered
  dtype: Any = jnp.float32            # compute dtype (e.g. jnp.bfloat16)
  param_dtype: Any = jnp.float32
  # the CVMM kernels' settings: implementation, dtype of the sums over experts, ...
  cvmm: CvmmConfig = DEFAULT
  # repeats of the layer group per iteration of the scan over repeats: 1 keeps one
  # compiled copy of the group (fastest compile); R = n_layers / group_size or more
  # unrolls it fully (no loop; MoEUT_244M on an H200: 1.33x faster training steps, 2x
  # the compile time). None: fully unrolled on GPUs, 1 elsewhere. Numerics are the same.
  scan_unroll: Optional[int] = None
  # what the backward pass keeps of each layer group (moeut_jax/remat.py): "none" (all it
  # reads), "elementwise" (all but what elementwise operations make: LayerNorms, casts,
  # residual sums, which it recomputes), "lean" (elementwise, and the q|k product,
  # SwitchHead's routers and the σ-MoE's up projection run again), "save_projections"
  # (router logits, routings, q/k, SwitchHead's CVMM outputs; the rest is recomputed) or
  # "full" (only the group's input). Numerics are the same.
  remat: str = "none"
  # dtype of the routers' products, sigmoids and top-k (docs/semantics.md §7): float32
  # (ours), or the compute dtype to compute them as the original under autocast, where
  # the σ-MoE router is bf16 throughout (with many ties in the top-k) and SwitchHead's
  # logits are rounded to bf16 before its float32 sigmoid.
  router_dtype: Any = jnp.float32
  # dtype of the RoPE angle table and rotation (moeut_jax/rope.py): float32 (ours), or the
  # compute dtype as the original under CUDA autocast, whose torch.einsum of positions
  # and frequencies runs in bf16 there (at 512 positions, angles off by up to 2.4 rad).
  rope_table_dtype: Any = jnp.float32

  def __post_init__(self):
    validate_config(self)
    super().__post_init__()

  @property
  def head_dim(self) -> int:
    return _head_dim(self)

  @property
  def repeats(self) -> int:
    return self.n_layers // self.group_size

  def effective_scan_unroll(self) -> int:
    return _effective_scan_unroll(self)

  def init_cache(self, batch_size: int, capacity: int, dtype=None) -> KVCache:
    """A fixed-capacity cache for jitted decoding of up to ``capacity`` positions."""
    return _fixed_cache(self, batch_size, capacity, dtype)

  def _layer_kwargs(self) -> dict:
    return dict(d_model=self.d_model, n_layers=self.n_layers, n_heads=self.n_heads,
                d_head=self.head_dim, ff_n_experts=self.ff_n_experts,
                att_n_experts=self.att_n_experts, ff_k=self.ff_k, att_k=self.att_k,
                ff_expert_size=self.ff_expert_size, ff_expert_dropout=self.ff_expert_dropout,
                att_expert_dropout=self.att_expert_dropout, dropout=self.dropout,
                dtype=self.dtype, param_dtype=self.param_dtype, cvmm=self.cvmm,
                router_dtype=self.router_dtype, rope_table_dtype=self.rope_table_dtype,
                ff_keep_middle=keeps_middle(self.remat))

  def _start_cache(self, kv_cache, batch: int):
    if kv_cache is None or isinstance(kv_cache, KVCache):
      return kv_cache
    if isinstance(kv_cache, dict) and not kv_cache:
      return KVCache.empty(group_size=self.group_size, repeats=self.repeats, batch=batch,
                           n_heads=self.n_heads, d_head=self.head_dim, dtype=self.dtype)
    raise TypeError("kv_cache must be None, {} (start a cache) or the KVCache of a previous "
                    f"output (out.cache); got {type(kv_cache).__name__}")

  @nn.compact
  def __call__(self, x: jax.Array, mask: AttentionMask | None = None, kv_cache=None,
               train: bool = False, *, causal: bool = False) -> MoEUTOutput:
    """Runs the stack.

    Args:
      x: [B, T, D] inputs.
      mask: an AttentionMask, or None: no masking (causal when ``causal``).
      kv_cache: None (no cache returned), ``{}`` to start a cache, or ``out.cache`` of the
        previous call, or ``init_cache(...)`` for a fixed-capacity cache.
      train: enables dropout, expert dropout and the entropy regulariser (needs a
        'dropout' rng when a dropout rate is positive).
      causal: block later keys when ``mask`` is None (MoEUTLM's default).
    """
    check_mesh_axes()
    if x.ndim != 3 or x.shape[-1] != self.d_model:
      raise ValueError(f"x must be [B, T, d_model={self.d_model}], got shape {x.shape}")
    b, t, _ = x.shape
    cache = self._start_cache(kv_cache, b)
    if cache is not None and cache.k[0].shape[1] != b:
      raise ValueError(f"the KV cache holds batch {cache.k[0].shape[1]} but x has batch {b}")
    if cache is None:
      offset, n_keys, valid = 0, t, None
    elif cache.fixed:
      offset, n_keys = cache.length, cache.capacity
      valid = offset + t
      if _is_concrete(offset) and int(offset) + t > n_keys:
        raise ValueError(f"KV cache overflow: {int(offset)} cached + {t} new positions exceed "
                         f"its capacity {n_keys}")
    else:
      offset, n_keys, valid = cache.capacity, cache.capacity + t, None

    is_causal = causal and mask is None
    blocked = blocked_keys(mask, causal=is_causal, batch=b, q_len=t, n_keys=n_keys,
                           offset=offset, valid_keys=valid)
    positions = offset + jnp.arange(t, dtype=jnp.int32)

    g, r, h, ea = self.group_size, self.repeats, self.n_heads, self.att_n_experts
    acc = None
    if train:
      acc = {"ffn": tuple(entropy_init((b, self.ff_n_experts)) for _ in range(g))}
      if ea > 1:
        acc["att_o"] = tuple(entropy_init((b, h, ea)) for _ in range(g))
        acc["att_v"] = tuple(entropy_init((b, h, ea)) for _ in range(g))

    unroll = self.effective_scan_unroll()
    scanned = nn.scan(remat_module(LayerGroup, self.remat, unroll), variable_broadcast="params",
                      split_rngs={"params": False, "dropout": True},
                      in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast), length=r,
                      unroll=unroll)
    group = scanned(self._layer_kwargs(), g, train, is_causal and cache is None,
                    cache is not None and cache.fixed, cache is not None, name="layers")
    xs = None if cache is None else (cache.k, cache.v)
    (h_out, acc), new_kv = group((x.astype(jnp.float32), acc), xs, positions, blocked, offset)

    reg = jnp.zeros((), jnp.float32)
    if train:
      steps = t * r
      reg += self.entropy_reg * sum(entropy_loss(a, steps) for a in acc["ffn"])
      if ea > 1:
        reg += self.att_entropy_reg * sum(
            entropy_loss(o, steps) + entropy_loss(v, steps)
            for o, v in zip(acc["att_o"], acc["att_v"]))

    new_cache = None
    if cache is not None:
      length = offset + t
      new_cache = KVCache(k=new_kv[0], v=new_kv[1], length=jnp.asarray(length, jnp.int32),
                          fixed=cache.fixed)
      if cache.fixed and not _is_concrete(offset):    # overflow under jit: make it loud
        h_out = jnp.where(length > n_keys, jnp.nan, h_out)
    return MoEUTOutput(h_out, reg, new_cache)


class LMHead(nn.Module):
  """The output head, ``flax.linen.Dense(n_tokens, dtype=dtype)``'s parameters and values:
  logits, or with labels the negative log-likelihoods from :func:`head_nll`."""
  n_tokens: int
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, h: jax.Array, labels: jax.Array | None = None) -> jax.Array:
    d = h.shape[-1]
    kernel = self.param("kernel", init.uniform(d ** -0.5), (d, self.n_tokens),
                        self.param_dtype).astype(self.dtype)
    bias = self.param("bias", init.uniform(d ** -0.5), (self.n_tokens,),
                      self.param_dtype).astype(self.dtype)
    h = h.astype(self.dtype)
    if labels is None:
      return jnp.dot(h, kernel) + bias                                   # [..., V]
    return head_nll(h, kernel, bias, labels)                             # [...] float32


class MoEUTLM(nn.Module):
  """Token embedding -> MoEUT -> LayerNorm -> linear head with bias (no weight tying)."""
  n_tokens: int
  d_model: int
  n_layers: int
  n_heads: int
  ff_n_experts: int
  att_n_experts: int
  d_head: Optional[int] = None
  group_size: int = 2
  ff_k: int = 8
  att_k: int = 2
  ff_expert_dropout: float = 0.0
  att_expert_dropout: float = 0.0
  ff_expert_size: int = 128
  dropout: float = 0.0
  entropy_reg: float = 0.01
  att_entropy_reg: float = 0.001
  attention: Any = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  cvmm: CvmmConfig = DEFAULT
  scan_unroll: Optional[int] = None
  remat: str = "none"
  router_dtype: Any = jnp.float32
  rope_table_dtype: Any = jnp.float32

  def __post_init__(self):
    if self.n_tokens < 1:
      raise ValueError(f"n_tokens={self.n_tokens} must be a positive integer")
    validate_config(self)
    super().__post_init__()

  def _stack_kwargs(self) -> dict:
    fields = {f.name for f in dataclasses.fields(MoEUT)} - {"parent", "name"}
    return {name: getattr(self, name) for name in fields}

  def effective_scan_unroll(self) -> int:
    return _effective_scan_unroll(self)

  def init_cache(self, batch_size: int, capacity: int, dtype=None) -> KVCache:
    """A fixed-capacity cache for jitted decoding of up to ``capacity`` positions."""
    return _fixed_cache(self, batch_size, capacity, dtype)

  @nn.compact
  def __call__(self, tokens: jax.Array, mask: AttentionMask | None = None, kv_cache=None,
               train: bool = False, labels: jax.Array | None = None) -> MoEUTOutput:
    """tokens [B, T] int -> logits [B, T, V] (compute dtype). mask None = causal.

    labels: [B, T] int (the next tokens), or None. Given, ``outputs`` are the negative
    log-likelihoods of the labels, [B, T] float32, the values and gradients of
    ``token_nll(logits, labels)``, made by :func:`moeut_jax.losses.head_nll` with the
    logits never whole in memory (1 GiB less kept for the backward pass, 1 GiB less of
    logit gradients at 64 x 1024 tokens and 8000 words in bf16).
    """
    check_mesh_axes()
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be [B, T], got shape {tokens.shape}")
    if labels is not None and labels.shape != tokens.shape:
      raise ValueError(f"labels {labels.shape} must have the tokens' shape {tokens.shape}")
    for name, what, ids in (("tokens", "token ids", tokens), ("labels", "labels", labels)):
      if ids is None:
        continue
      if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise TypeError(f"{name} must be integers, got {ids.dtype}")
      if _is_concrete(ids) and ids.size:
        host = np.asarray(ids)
        lo, hi = int(host.min()), int(host.max())
        if lo < 0 or hi >= self.n_tokens:
          raise ValueError(f"{what} must be in [0, n_tokens={self.n_tokens}), got min {lo} "
                           f"and max {hi}")
    d = self.d_model
    embedding = self.param("embedding", init.normal(d ** -0.5), (self.n_tokens, d),
                           self.param_dtype)
    h = jnp.take(embedding, tokens, axis=0).astype(jnp.float32)      # [B, T, D]
    out = MoEUT(**self._stack_kwargs(), name="transformer")(h, mask, kv_cache, train,
                                                            causal=True)
    hn = LayerNorm(1e-5, self.param_dtype, name="out_norm")(out.outputs)
    head = LMHead(self.n_tokens, self.dtype, self.param_dtype, name="lm_head")
    return out.replace(outputs=head(hn, labels))
