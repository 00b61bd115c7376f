"""An independent PyTorch reference of MoEUT, written from docs/semantics.md.

Plain float32 torch on the CPU, meant to be obviously correct rather than fast: expert
weights are gathered per token (``keys[idx]``), attention is an explicit masked softmax.
Parity tests compare the JAX model against it. It implements the FIXED semantics of the
note (raise on ``n_layers % group_size``, even rotary width, queries rotated at their
absolute positions with a KV cache, ``AttentionMask(None, None)`` = no masking, no NaN for
a query row whose keys are all masked: its attention weights are all 0, so its attention
output is 0). ``router_dtype=torch.bfloat16`` computes the routers as the original does
under bf16 autocast (docs/semantics.md §7), everything else staying float32.

Public API, mirroring the original ``moeut`` package:
  AttentionMask(src_length_mask, position_mask)   True = may NOT attend
  MoEUTOutput(outputs, reg_loss, cache)
  SigmaMoE, SwitchHeadRope, MoEUTLayer, MoEUT, MoEUTLM   (torch.nn.Module)
and the pure helpers router_linear, sigmoid_topk, usage_entropy_loss, rope_inv_freq, apply_rope,
causal_mask, attention_bool_mask, masked_attention.

Letters: B batch, T query length, C cached length, S = C + T key length, D d_model,
H heads, Dh head size, Ea / ka attention experts / active, Ef / kf FFN experts / active,
Es FFN expert size, G group size, R repeats, V vocabulary.
"""

import math
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

KVCache = Dict[str, torch.Tensor]  # {"k": [B, H, S, Dh] scaled, not rotated; "v": [B, H, S, Dh]}
MultilayerKVCache = Dict[int, KVCache]  # keyed by absolute layer index l = r * G + g


class AttentionMask(NamedTuple):
  src_length_mask: Optional[torch.Tensor] = None  # bool [B, S], True = padding key
  position_mask: Optional[torch.Tensor] = None  # bool [T, S'] (S' <= S), True = may not attend


class MoEUTOutput(NamedTuple):
  outputs: torch.Tensor  # [B, T, V] logits (MoEUTLM) or [B, T, D] (MoEUT)
  reg_loss: torch.Tensor  # float32 scalar, shape []; 0 in eval mode
  cache: Optional[MultilayerKVCache]  # None unless a kv_cache (e.g. {}) was passed


# ----------------------------------------------------------------------------------------
# Pure helpers.
# ----------------------------------------------------------------------------------------

def router_linear(x: torch.Tensor, w: torch.Tensor,
                  router_dtype: torch.dtype = torch.float32) -> torch.Tensor:
  """Router logits x @ w^T. float32: in float32. 16-bit: as a matmul under autocast, x and
  w rounded to it, the products summed in float32, the result rounded to it."""
  if router_dtype == torch.float32:
    return F.linear(x.float(), w.float())
  return F.linear(x.to(router_dtype).float(), w.to(router_dtype).float()).to(router_dtype)


def sigmoid_topk(logits: torch.Tensor, k: int, expert_dropout: float = 0.0,
                 training: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
  """Top-k experts of sigmoid(logits) over the last axis: (indices, weights), both [..., k].

  The sigmoid runs in the logits' dtype (16-bit: with ties); equal values are chosen by
  increasing index. Expert dropout (training only) excludes each (token, expert) from the
  CHOICE with probability ``expert_dropout``; the weights are always the unmasked sigmoid
  at the indices.
  """
  if k > logits.shape[-1]:
    raise ValueError(f"{k=} must not exceed the number of experts {logits.shape[-1]}")
  gate = torch.sigmoid(logits)  # [..., E]
  choice = gate
  if training and expert_dropout > 0:
    dropped = torch.rand_like(gate) < expert_dropout
    choice = gate.masked_fill(dropped, float("-inf"))
  order = torch.sort(choice.detach(), dim=-1, descending=True, stable=True).indices
  idx = order[..., :k]  # [..., k]
  return idx, gate.gather(-1, idx)


def usage_entropy_loss(logits: torch.Tensor) -> torch.Tensor:
  """docs/semantics.md §5 for one module: -mean(entropy of the mean expert distribution
  over time).

  logits: [B, N, E] or [B, N, H, E], N = T * R (all applications concatenated along time).
  Softmax over E, mean over N (in log space), entropy over E, then -mean over everything
  else (B, and H when present). Returns a float32 scalar.
  """
  logp = F.log_softmax(logits.float(), dim=-1)  # [B, N, (H,) E]
  log_mean = torch.logsumexp(logp, dim=1) - math.log(logits.shape[1])  # [B, (H,) E]
  entropy = -(log_mean.exp() * log_mean).sum(-1)  # [B, (H,)]
  return -entropy.mean()


def rope_inv_freq(n_rot: int, base: float = 10000.0) -> torch.Tensor:
  """inv_freq_i = base^(-2i / n_rot), i < n_rot / 2; float32 [n_rot // 2] (as the original)."""
  return 1.0 / (base ** (torch.arange(0, n_rot, 2, dtype=torch.float32) / n_rot))


def apply_rope(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
  """Rotate-half RoPE of ALL channels of x [..., L, n] (n even) at integer positions [L].

  rot(x) = x * cos + concat(-x2, x1) * sin, channel c using frequency index c mod (n / 2).
  """
  n = x.shape[-1]
  if n % 2:
    raise ValueError(f"rotary width {n=} must be even")
  if n == 0:
    return x
  freqs = positions.to(torch.float32)[:, None] * rope_inv_freq(n, base)[None, :]  # [L, n/2]
  angles = torch.cat([freqs, freqs], dim=-1)  # [L, n]
  x1, x2 = x[..., : n // 2], x[..., n // 2:]
  return x * angles.cos() + torch.cat([-x2, x1], dim=-1) * angles.sin()


def causal_mask(t: int, device=None) -> torch.Tensor:
  """bool [T, T], True above the diagonal (a query may not attend to later keys)."""
  return torch.triu(torch.ones(t, t, dtype=torch.bool, device=device), diagonal=1)


def attention_bool_mask(mask: Optional[AttentionMask], b: int, t: int,
                        s: int) -> Optional[torch.Tensor]:
  """The combined boolean mask, broadcastable to [B, H, T, S], or None for no masking.

  A position mask of [T, S'] with S' < S (a KV cache of S - S' earlier positions) is
  left-padded with False columns. Both fields given: OR.
  """
  if mask is None:
    return None
  combined = None
  if mask.position_mask is not None:
    pm = mask.position_mask.bool()
    if pm.ndim != 2 or pm.shape[0] != t or pm.shape[1] > s:
      raise ValueError(f"position_mask has shape {tuple(pm.shape)}; expected [T={t}, <= S={s}]")
    pad = torch.zeros(t, s - pm.shape[1], dtype=torch.bool, device=pm.device)
    pm = torch.cat([pad, pm], dim=1)  # [T, S]
    combined = pm[None, None]  # [1, 1, T, S]
  if mask.src_length_mask is not None:
    sm = mask.src_length_mask.bool()
    if tuple(sm.shape) != (b, s):
      raise ValueError(f"src_length_mask has shape {tuple(sm.shape)}; expected [B={b}, S={s}]")
    sm = sm[:, None, None, :]  # [B, 1, 1, S]
    combined = sm if combined is None else (combined | sm)
  return combined


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     mask: Optional[torch.Tensor]) -> torch.Tensor:
  """softmax(q k^T + mask) v, no extra scaling. q [B,H,T,Dh], k/v [B,H,S,Dh] -> [B,H,T,Dh].

  mask: bool broadcastable to [B, H, T, S], True = may not attend. A fully masked query row
  gets attention weights all 0 (so output 0), with finite gradients.
  """
  logits = q @ k.transpose(-1, -2)  # [B, H, T, S]
  if mask is None:
    return torch.softmax(logits, dim=-1) @ v
  mask = mask.expand(logits.shape)  # [B, H, T, S]
  fully_masked = mask.all(dim=-1, keepdim=True)  # [B, H, T, 1]
  # Leave fully masked rows unmasked for the softmax (no -inf row -> no NaN, even in the
  # backward pass), then zero every masked weight, which zeroes those rows entirely.
  probs = torch.softmax(logits.masked_fill(mask & ~fully_masked, float("-inf")), dim=-1)
  probs = probs.masked_fill(mask, 0.0)  # [B, H, T, S]
  return probs @ v


def _renorm_rows_keep_matrix_std(x: torch.Tensor) -> None:
  """σ-MoE router init: rows to unit L2 norm, then the whole matrix back to its former std."""
  with torch.no_grad():
    former_std = x.std()
    x.div_(x.norm(dim=-1, keepdim=True))
    x.mul_(former_std / x.std())


def _renorm_rows_keep_row_std(x: torch.Tensor) -> None:
  """SwitchHead router init: rows to unit norm, times (row's former std / new matrix std)."""
  with torch.no_grad():
    row_std = x.std(dim=-1, keepdim=True)
    x.div_(x.norm(dim=-1, keepdim=True))
    x.mul_(row_std / x.std())


# ----------------------------------------------------------------------------------------
# Modules.
# ----------------------------------------------------------------------------------------

class SigmaMoE(nn.Module):
  """σ-MoE feed-forward (docs/semantics.md §2). forward(input, sel_input=None) -> [B, T, D]."""

  def __init__(self, d_model: int, n_experts: int, expert_size: int, k: int,
               expert_dropout: float = 0.0, router_dtype: torch.dtype = torch.float32):
    super().__init__()
    if k > n_experts:
      raise ValueError(f"{k=} must not exceed {n_experts=}")
    self.d_model, self.n_experts, self.expert_size, self.k = d_model, n_experts, expert_size, k
    self.expert_dropout, self.router_dtype = expert_dropout, router_dtype
    self.keys = nn.Parameter(torch.empty(n_experts, d_model, expert_size))  # [Ef, D, Es]
    self.values = nn.Parameter(torch.empty(n_experts, expert_size, d_model))  # [Ef, Es, D]
    self.expert_sel = nn.Parameter(torch.empty(n_experts, d_model))  # [Ef, D]
    self.reset_parameters(1.0)

  def reset_parameters(self, std_scale: float) -> None:
    with torch.no_grad():
      nn.init.normal_(self.expert_sel, 0.0, std_scale / math.sqrt(self.d_model))
      _renorm_rows_keep_matrix_std(self.expert_sel)
      nn.init.normal_(self.keys, 0.0, std_scale / math.sqrt(self.d_model))
      nn.init.normal_(self.values, 0.0, std_scale / math.sqrt(self.n_experts * self.expert_size))

  def forward_with_logits(self, input: torch.Tensor, sel_input: Optional[torch.Tensor] = None
                          ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(output [B, T, D], raw router logits s [B, T, Ef] in the router's dtype)."""
    if sel_input is None:
      sel_input = input
    s = router_linear(sel_input, self.expert_sel, self.router_dtype)  # [B, T, Ef]
    idx, w = sigmoid_topk(s, self.k, self.expert_dropout, self.training)  # [B, T, kf] each
    out = torch.zeros_like(input)  # [B, T, D]
    for j in range(self.k):
      e = idx[..., j]  # [B, T]
      u = torch.relu(torch.einsum("btd,btds->bts", input, self.keys[e]))  # keys[e]: [B,T,D,Es]
      y = torch.einsum("bts,btsd->btd", u, self.values[e])  # values[e]: [B, T, Es, D]
      out = out + w[..., j, None] * y
    return out, s

  def forward(self, input: torch.Tensor, sel_input: Optional[torch.Tensor] = None) -> torch.Tensor:
    return self.forward_with_logits(input, sel_input)[0]


class SwitchHeadRope(nn.Module):
  """SwitchHead attention with RoPE (docs/semantics.md §3); Ea == 1 is RoPE attention with an
  output gate.

  forward(q_src, k_src, v_src, mask, kv_cache=None) -> (out [B, T, D], new cache or None).
  kv_cache: None = no caching; a dict, possibly empty, = the layer's past {"k", "v"}.
  """

  def __init__(self, d_model: int, n_heads: int, n_experts: int, d_head: Optional[int] = None,
               expert_dropout: float = 0.0, moe_k: int = 2, rotate_fraction: float = 0.5,
               rope_base: float = 10000.0, router_dtype: torch.dtype = torch.float32):
    super().__init__()
    self.d_model, self.n_heads, self.n_experts = d_model, n_heads, n_experts
    self.router_dtype = router_dtype
    self.d_head = d_head or d_model // n_heads
    self.expert_dropout, self.moe_k, self.rope_base = expert_dropout, moe_k, rope_base
    if n_experts > 1 and moe_k > n_experts:
      raise ValueError(f"{moe_k=} must not exceed {n_experts=}")
    # Fix (docs/semantics.md §3): round an odd rotary width down to even (Dh = 82 -> 41 -> 40).
    n_rot = int(rotate_fraction * self.d_head)
    self.n_rot = n_rot - n_rot % 2
    h, dh, ea, d = n_heads, self.d_head, n_experts, d_model
    self.q = nn.Linear(d, h * dh, bias=False)  # weight [H*Dh, D]
    self.k = nn.Linear(d, h * dh, bias=False)  # weight [H*Dh, D]
    if ea > 1:
      self.v = nn.Parameter(torch.empty(h * ea, d, dh))  # [H*Ea, D, Dh], row h*Ea + e
      self.o = nn.Parameter(torch.empty(h * ea, dh, d))  # [H*Ea, Dh, D]
      self.sel_v = nn.Parameter(torch.empty(h * ea, d))  # [H*Ea, D]
    else:
      self.v = nn.Parameter(torch.empty(h * dh, d))  # [H*Dh, D], a plain linear weight
      self.o = nn.Parameter(torch.empty(d, h * dh))  # [D, H*Dh]
    self.sel_o = nn.Parameter(torch.empty(h * ea, d))  # [H*Ea, D] ([H, D] when Ea == 1)
    self.reset_parameters(1.0)

  def reset_parameters(self, std_scale: float) -> None:
    d = self.d_model
    with torch.no_grad():
      if self.n_experts > 1:
        nn.init.normal_(self.sel_v, 0.0, std_scale / math.sqrt(d))
        _renorm_rows_keep_row_std(self.sel_v)
      nn.init.normal_(self.sel_o, 0.0, std_scale / math.sqrt(d))
      _renorm_rows_keep_row_std(self.sel_o)
      nn.init.normal_(self.q.weight, 0.0, std_scale / math.sqrt(d))
      nn.init.normal_(self.k.weight, 0.0, std_scale / math.sqrt(d))
      nn.init.normal_(self.v, 0.0, std_scale / math.sqrt(d))
      nn.init.normal_(self.o, 0.0, std_scale / math.sqrt(self.n_heads * self.d_head))

  def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """RoPE on the FIRST n_rot channels of x [B, H, L, Dh] at positions [L]; rest untouched."""
    if self.n_rot == 0:
      return x
    rotated = apply_rope(x[..., : self.n_rot], positions, self.rope_base)
    return torch.cat([rotated, x[..., self.n_rot:]], dim=-1)

  def _select(self, src: torch.Tensor, sel: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """Router of each head: (logits [B,T,H,Ea] float32, indices and weights [B,T,H,ka]).
    16-bit routers round the logits, then take them to float32 (the original's .float())."""
    b, t, _ = src.shape
    logits = router_linear(src, sel, self.router_dtype).float()
    logits = logits.view(b, t, self.n_heads, self.n_experts)
    idx, w = sigmoid_topk(logits, self.moe_k, self.expert_dropout, self.training)
    return logits, idx, w

  def forward_with_logits(self, q_src: torch.Tensor, k_src: torch.Tensor, v_src: torch.Tensor,
                          mask: Optional[AttentionMask], kv_cache: Optional[KVCache] = None):
    """(out [B, T, D], new cache or None, (lo, lv) router logits [B, T, H, Ea] or None)."""
    b, t, d = q_src.shape
    h, dh, ea = self.n_heads, self.d_head, self.n_experts
    heads = torch.arange(h, device=q_src.device)  # [H], broadcasts against [B, T, H]

    q = self.q(q_src).view(b, t, h, dh).transpose(1, 2) * dh ** -0.25  # [B, H, T, Dh]
    k = self.k(k_src).view(b, t, h, dh).transpose(1, 2) * dh ** -0.25  # [B, H, T, Dh]

    logits = None
    if ea > 1:
      lv, iv, wv = self._select(k_src, self.sel_v)  # value experts chosen from k_src
      lo, io, wo = self._select(q_src, self.sel_o)  # output experts chosen from q_src
      logits = (lo, lv)
      v_experts = self.v.view(h, ea, d, dh)  # [H, Ea, D, Dh]
      v = torch.zeros(b, t, h, dh, dtype=v_src.dtype, device=v_src.device)
      for j in range(self.moe_k):
        w_v = v_experts[heads, iv[..., j]]  # [B, T, H, D, Dh]
        v = v + wv[..., j, None] * torch.einsum("btd,bthde->bthe", v_src, w_v)
    else:
      v = F.linear(v_src, self.v).view(b, t, h, dh)  # [B, T, H, Dh]
    v = v.transpose(1, 2)  # [B, H, T, Dh]

    n_cached = 0
    if kv_cache is not None and "k" in kv_cache:
      n_cached = kv_cache["k"].shape[2]
      k = torch.cat([kv_cache["k"], k], dim=2)  # [B, H, S, Dh]
      v = torch.cat([kv_cache["v"], v], dim=2)  # [B, H, S, Dh]
    new_cache = {"k": k, "v": v} if kv_cache is not None else None
    s = n_cached + t

    # Fix (docs/semantics.md §3): queries at their absolute positions C..C+T-1, keys at 0..S-1.
    q = self.rotate(q, torch.arange(n_cached, s, device=q.device))
    k = self.rotate(k, torch.arange(s, device=k.device))
    att = masked_attention(q, k, v, attention_bool_mask(mask, b, t, s))  # [B, H, T, Dh]
    att = att.transpose(1, 2)  # [B, T, H, Dh]

    if ea > 1:
      o_experts = self.o.view(h, ea, dh, d)  # [H, Ea, Dh, D]
      out = torch.zeros(b, t, d, dtype=att.dtype, device=att.device)
      for j in range(self.moe_k):
        w_o = o_experts[heads, io[..., j]]  # [B, T, H, Dh, D]
        out = out + torch.einsum("bth,bthe,bthed->btd", wo[..., j], att, w_o)
    else:
      gate = torch.sigmoid(router_linear(q_src, self.sel_o, self.router_dtype))  # [B, T, H]
      out = F.linear((att * gate[..., None]).reshape(b, t, h * dh), self.o)  # [B, T, D]
    return out, new_cache, logits

  def forward(self, q_src, k_src, v_src, mask: Optional[AttentionMask],
              kv_cache: Optional[KVCache] = None):
    out, new_cache, _ = self.forward_with_logits(q_src, k_src, v_src, mask, kv_cache)
    return out, new_cache


class MoEUTLayer(nn.Module):
  """One distinct layer, peri-layernorm (docs/semantics.md §1).

  forward(x, mask, kv_cache) -> (x, cache)."""

  def __init__(self, d_model: int, n_heads: int, ff_expert_size: int, ff_n_experts: int,
               att_n_experts: int, d_head: Optional[int] = None, att_k: int = 2, ff_k: int = 8,
               ff_expert_dropout: float = 0.0, att_expert_dropout: float = 0.0,
               dropout: float = 0.0, attention=SwitchHeadRope,
               router_dtype: torch.dtype = torch.float32):
    super().__init__()
    self.attention = attention(d_model, n_heads, att_n_experts, d_head=d_head, moe_k=att_k,
                               expert_dropout=att_expert_dropout, router_dtype=router_dtype)
    self.ffn = SigmaMoE(d_model, ff_n_experts, ff_expert_size, ff_k,
                        expert_dropout=ff_expert_dropout, router_dtype=router_dtype)
    self.ln1 = nn.LayerNorm(d_model)
    self.ln2 = nn.LayerNorm(d_model)
    self.drop = nn.Dropout(dropout)

  def forward_with_logits(self, x: torch.Tensor, mask: Optional[AttentionMask] = None,
                          kv_cache: Optional[KVCache] = None):
    """(x [B, T, D], new cache or None, (ffn logits, attention logits or None))."""
    xn = self.ln1(x)
    att, new_cache, att_logits = self.attention.forward_with_logits(xn, xn, x, mask, kv_cache)
    x = x + self.drop(att)
    upd, ffn_logits = self.ffn.forward_with_logits(x, self.ln2(x))
    return x + upd, new_cache, (ffn_logits, att_logits)

  def forward(self, x: torch.Tensor, mask: Optional[AttentionMask] = None,
              kv_cache: Optional[KVCache] = None):
    x, new_cache, _ = self.forward_with_logits(x, mask, kv_cache)
    return x, new_cache


class MoEUT(nn.Module):
  """G distinct layers repeated R = n_layers / G times. forward(x [B,T,D]) -> MoEUTOutput.

  mask=None means no masking here (MoEUTLM adds the causal mask).
  """

  def __init__(self, d_model: int, n_layers: int, n_heads: int, ff_n_experts: int,
               att_n_experts: int, d_head: Optional[int] = None, group_size: int = 2,
               ff_k: int = 8, att_k: int = 2, ff_expert_dropout: float = 0.0,
               att_expert_dropout: float = 0.0, ff_expert_size: int = 128, dropout: float = 0.0,
               entropy_reg: float = 0.01, att_entropy_reg: float = 0.001,
               attention=SwitchHeadRope, router_dtype: torch.dtype = torch.float32):
    super().__init__()
    # Fix (docs/semantics.md §1): the original silently truncated to n_layers // group_size
    # repeats.
    if group_size <= 0 or n_layers % group_size != 0:
      raise ValueError(f"{n_layers=} must be a positive multiple of {group_size=}")
    self.n_layers, self.group_size = n_layers, group_size
    self.n_repeats = n_layers // group_size
    self.entropy_reg, self.att_entropy_reg = entropy_reg, att_entropy_reg
    self.layers = nn.ModuleList([
        MoEUTLayer(d_model, n_heads, ff_expert_size, ff_n_experts, att_n_experts, d_head=d_head,
                   att_k=att_k, ff_k=ff_k, ff_expert_dropout=ff_expert_dropout,
                   att_expert_dropout=att_expert_dropout, dropout=dropout, attention=attention,
                   router_dtype=router_dtype)
        for _ in range(group_size)])
    self.reset_parameters()

  def reset_parameters(self) -> None:
    scale = math.sqrt(2 / self.n_layers)
    for layer in self.layers:
      layer.attention.reset_parameters(scale)
      layer.ffn.reset_parameters(scale)
      layer.ln1.reset_parameters()  # weight 1, bias 0
      layer.ln2.reset_parameters()

  def forward(self, x: torch.Tensor, mask: Optional[AttentionMask] = None,
              kv_cache: Optional[MultilayerKVCache] = None) -> MoEUTOutput:
    g_count = self.group_size
    new_cache: Optional[MultilayerKVCache] = {} if kv_cache is not None else None
    ffn_logits: List[List[torch.Tensor]] = [[] for _ in range(g_count)]  # [g][r]: [B, T, Ef]
    att_o_logits: List[List[torch.Tensor]] = [[] for _ in range(g_count)]  # [B, T, H, Ea]
    att_v_logits: List[List[torch.Tensor]] = [[] for _ in range(g_count)]
    for r in range(self.n_repeats):
      for g, layer in enumerate(self.layers):
        l_abs = r * g_count + g
        layer_cache = kv_cache.get(l_abs, {}) if kv_cache is not None else None
        x, layer_cache, (f_logits, a_logits) = layer.forward_with_logits(x, mask, layer_cache)
        if new_cache is not None:
          new_cache[l_abs] = layer_cache
        ffn_logits[g].append(f_logits)
        if a_logits is not None:
          att_o_logits[g].append(a_logits[0])
          att_v_logits[g].append(a_logits[1])

    reg_loss = torch.zeros((), dtype=torch.float32, device=x.device)
    if self.training:
      for g in range(g_count):
        # All R applications of distinct layer g concatenated along time: [B, T*R, ...].
        reg_loss = reg_loss + self.entropy_reg * usage_entropy_loss(torch.cat(ffn_logits[g], 1))
        if att_o_logits[g]:
          att_loss = (usage_entropy_loss(torch.cat(att_o_logits[g], 1))
                      + usage_entropy_loss(torch.cat(att_v_logits[g], 1)))
          reg_loss = reg_loss + self.att_entropy_reg * att_loss
    return MoEUTOutput(x, reg_loss, new_cache)


class MoEUTLM(nn.Module):
  """embedding -> MoEUT -> out_norm -> lm_head. forward(tokens [B, T]) -> MoEUTOutput.

  mask=None means causal; AttentionMask(None, None) means no masking.
  """

  def __init__(self, n_tokens: int, d_model: int, n_layers: int, n_heads: int,
               ff_n_experts: int, att_n_experts: int, d_head: Optional[int] = None,
               group_size: int = 2, ff_k: int = 8, att_k: int = 2,
               ff_expert_dropout: float = 0.0, att_expert_dropout: float = 0.0,
               ff_expert_size: int = 128, dropout: float = 0.0, entropy_reg: float = 0.01,
               att_entropy_reg: float = 0.001, attention=SwitchHeadRope,
               router_dtype: torch.dtype = torch.float32):
    super().__init__()
    self.transformer = MoEUT(
        d_model, n_layers, n_heads, ff_n_experts, att_n_experts, d_head=d_head,
        group_size=group_size, ff_k=ff_k, att_k=att_k, ff_expert_dropout=ff_expert_dropout,
        att_expert_dropout=att_expert_dropout, ff_expert_size=ff_expert_size, dropout=dropout,
        entropy_reg=entropy_reg, att_entropy_reg=att_entropy_reg, attention=attention,
        router_dtype=router_dtype)
    self.n_layers = n_layers
    self.embedding = nn.Embedding(n_tokens, d_model)  # [V, D]
    self.lm_head = nn.Linear(d_model, n_tokens)  # weight [V, D], bias [V]
    self.out_norm = nn.LayerNorm(d_model)
    self.reset_parameters()

  def reset_parameters(self) -> None:
    nn.init.normal_(self.embedding.weight, 0.0, 1 / math.sqrt(self.embedding.weight.shape[1]))
    self.lm_head.reset_parameters()  # PyTorch default: U(-1/sqrt(D), 1/sqrt(D))
    self.out_norm.reset_parameters()
    self.transformer.reset_parameters()

  def forward(self, x: torch.Tensor, mask: Optional[AttentionMask] = None,
              kv_cache: Optional[MultilayerKVCache] = None) -> MoEUTOutput:
    if mask is None:
      # [T, T]; with a cache it is left-padded with C False columns inside the attention.
      mask = AttentionMask(None, causal_mask(x.shape[1], device=x.device))
    h = self.embedding(x)  # [B, T, D]
    out = self.transformer(h, mask, kv_cache)
    logits = self.lm_head(self.out_norm(out.outputs))  # [B, T, V]
    return MoEUTOutput(logits, out.reg_loss, out.cache)
