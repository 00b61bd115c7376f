"""Self-checks of the PyTorch reference (tests/torch_reference.py) against docs/semantics.md."""

import math

import pytest
import torch

try:
  import torch_reference as ref  # pytest's default rootdir/prepend import of tests/
except ImportError:  # pragma: no cover - imported as a namespace package from the repo root
  from tests import torch_reference as ref

TOL = 1e-5

# Tiny dims: D=16, H=2, Dh=6 (n_rot = 3 -> rounded down to 2), Ef=6, kf=2, Es=4.
TINY = dict(d_model=16, n_layers=4, n_heads=2, ff_n_experts=6, att_n_experts=3, d_head=6,
            group_size=2, ff_k=2, att_k=2, ff_expert_size=4)
VOCAB = 11


def _lm(seed=0, **overrides):
  torch.manual_seed(seed)
  return ref.MoEUTLM(VOCAB, **{**TINY, **overrides}).eval()


def _expected_shapes(prefix, d, h, dh, ea, ef, es, g):
  shapes = {}
  for i in range(g):
    p = f"{prefix}layers.{i}."
    shapes[p + "attention.q.weight"] = (h * dh, d)
    shapes[p + "attention.k.weight"] = (h * dh, d)
    if ea > 1:
      shapes[p + "attention.v"] = (h * ea, d, dh)
      shapes[p + "attention.o"] = (h * ea, dh, d)
      shapes[p + "attention.sel_v"] = (h * ea, d)
      shapes[p + "attention.sel_o"] = (h * ea, d)
    else:
      shapes[p + "attention.v"] = (h * dh, d)
      shapes[p + "attention.o"] = (d, h * dh)
      shapes[p + "attention.sel_o"] = (h, d)
    shapes[p + "ffn.keys"] = (ef, d, es)
    shapes[p + "ffn.values"] = (ef, es, d)
    shapes[p + "ffn.expert_sel"] = (ef, d)
    for ln in ("ln1", "ln2"):
      shapes[p + f"{ln}.weight"] = (d,)
      shapes[p + f"{ln}.bias"] = (d,)
  return shapes


@pytest.mark.parametrize("ea", [3, 1])
def test_state_dict_names_and_shapes(ea):
  model = _lm(att_n_experts=ea)
  expected = _expected_shapes("transformer.", 16, 2, 6, ea, 6, 4, 2)
  expected.update({"embedding.weight": (VOCAB, 16), "lm_head.weight": (VOCAB, 16),
                   "lm_head.bias": (VOCAB,), "out_norm.weight": (16,), "out_norm.bias": (16,)})
  got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
  assert got == expected

  torch.manual_seed(0)
  bare = ref.MoEUT(**{**TINY, "att_n_experts": ea})
  got_bare = {k: tuple(v.shape) for k, v in bare.state_dict().items()}
  assert got_bare == _expected_shapes("", 16, 2, 6, ea, 6, 4, 2)


def test_default_d_head_and_init_statistics():
  torch.manual_seed(0)
  m = ref.MoEUT(d_model=64, n_layers=8, n_heads=4, ff_n_experts=32, att_n_experts=4,
                group_size=2, ff_k=4, ff_expert_size=16)
  att, ffn = m.layers[0].attention, m.layers[0].ffn
  assert att.d_head == 16 and att.n_rot == 8
  scale = math.sqrt(2 / 8)
  assert abs(ffn.keys.std().item() - scale / 8) < 0.1 * scale / 8
  assert abs(ffn.values.std().item() - scale / math.sqrt(32 * 16)) < 0.1 * scale / math.sqrt(512)
  assert abs(att.o.std().item() - scale / 8) < 0.1 * scale / 8
  assert abs(ffn.expert_sel.std().item() - scale / 8) < 0.15 * scale / 8
  norms = ffn.expert_sel.norm(dim=-1)
  assert torch.allclose(norms, norms[0].expand_as(norms), rtol=1e-4)  # rows equal norm
  assert torch.equal(m.layers[0].ln1.weight, torch.ones(64))


@pytest.mark.parametrize("n_layers, group_size", [(5, 2), (4, 3), (7, 4)])
def test_n_layers_not_multiple_of_group_raises(n_layers, group_size):
  with pytest.raises(ValueError, match="multiple"):
    ref.MoEUTLM(VOCAB, **{**TINY, "n_layers": n_layers, "group_size": group_size})


@pytest.mark.parametrize("d_head, n_rot", [(6, 2), (82, 40), (8, 4), (2, 0)])
def test_rotary_width_rounds_down_to_even(d_head, n_rot):
  att = ref.SwitchHeadRope(16, 2, 3, d_head=d_head)
  assert att.n_rot == n_rot


def test_group_of_three_six_layers_runs():
  model = _lm(n_layers=6, group_size=3)
  assert len(model.transformer.layers) == 3 and model.transformer.n_repeats == 2
  out = model(torch.randint(0, VOCAB, (2, 5)), kv_cache={})
  assert out.outputs.shape == (2, 5, VOCAB)
  assert sorted(out.cache) == list(range(6))
  assert torch.isfinite(out.outputs).all()


@pytest.mark.parametrize("ea", [3, 1])
def test_cached_decoding_equals_full_forward(ea):
  model = _lm(att_n_experts=ea)
  tokens = torch.randint(0, VOCAB, (2, 7))
  with torch.no_grad():
    full = model(tokens)
    assert full.cache is None  # kv_cache=None returns no cache
    pieces, cache = [], {}
    for start, stop in [(0, 3), (3, 5), (5, 6), (6, 7)]:  # chunks of T > 1 after a cache, too
      step = model(tokens[:, start:stop], kv_cache=cache)
      pieces.append(step.outputs)
      cache = step.cache
  assert sorted(cache) == [0, 1, 2, 3]
  assert cache[2]["k"].shape == (2, 2, 7, 6) and cache[2]["v"].shape == (2, 2, 7, 6)
  torch.testing.assert_close(torch.cat(pieces, dim=1), full.outputs, rtol=0, atol=TOL)


def test_layer_is_peri_layernorm():
  torch.manual_seed(0)
  layer = ref.MoEUTLayer(16, 2, 4, 6, 3, d_head=6, ff_k=2).eval()
  with torch.no_grad():
    layer.ln1.weight.uniform_(0.5, 1.5)
    layer.ln2.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 4, 16)
    mask = ref.AttentionMask(None, ref.causal_mask(4))
    out, _ = layer(x, mask)
    xn = layer.ln1(x)
    x1 = x + layer.attention(xn, xn, x, mask)[0]  # V from the raw x
    expected = x1 + layer.ffn(x1, layer.ln2(x1))  # experts see the raw x, router LN2(x)
  torch.testing.assert_close(out, expected, rtol=0, atol=0)
  assert (layer.ffn(layer.ln2(x1), layer.ln2(x1)) - layer.ffn(x1, layer.ln2(x1))).abs().max() > 1e-4


def test_cache_holds_scaled_unrotated_keys():
  torch.manual_seed(0)
  layer = ref.MoEUTLayer(16, 2, 4, 6, 3, d_head=6, ff_k=2).eval()
  x = torch.randn(1, 4, 16)
  _, cache = layer(x, None, kv_cache={})
  expected_k = layer.attention.k(layer.ln1(x)).view(1, 4, 2, 6).transpose(1, 2) * 6 ** -0.25
  torch.testing.assert_close(cache["k"], expected_k)


def test_explicit_causal_mask_is_left_padded_with_cache():
  model = _lm()
  tokens = torch.randint(0, VOCAB, (1, 6))
  with torch.no_grad():
    first = model(tokens[:, :4], kv_cache={})
    default = model(tokens[:, 4:], kv_cache=first.cache)
    explicit = model(tokens[:, 4:], ref.AttentionMask(None, ref.causal_mask(2)), first.cache)
  torch.testing.assert_close(explicit.outputs, default.outputs, rtol=0, atol=0)


def test_default_mask_is_causal():
  model = _lm()
  tokens = torch.randint(0, VOCAB, (1, 6))
  changed = tokens.clone()
  changed[0, 4] = (changed[0, 4] + 1) % VOCAB
  with torch.no_grad():
    a, b = model(tokens).outputs, model(changed).outputs
  torch.testing.assert_close(a[:, :4], b[:, :4], rtol=0, atol=0)
  assert (a[:, 4:] - b[:, 4:]).abs().max() > 1e-4


def test_no_masking_mask_equals_all_false_and_bare_none():
  model = _lm()
  tokens = torch.randint(0, VOCAB, (2, 5))
  all_false = ref.AttentionMask(torch.zeros(2, 5, dtype=torch.bool),
                                torch.zeros(5, 5, dtype=torch.bool))
  with torch.no_grad():
    none_mask = model(tokens, ref.AttentionMask(None, None)).outputs
    false_mask = model(tokens, all_false).outputs
    causal = model(tokens).outputs
    h = model.embedding(tokens)
    bare = model.transformer(h).outputs  # bare MoEUT: mask=None means no masking
    bare_none = model.transformer(h, ref.AttentionMask(None, None)).outputs
  torch.testing.assert_close(none_mask, false_mask, rtol=0, atol=TOL)
  torch.testing.assert_close(bare, bare_none, rtol=0, atol=0)
  assert (none_mask[:, :-1] - causal[:, :-1]).abs().max() > 1e-4  # really unmasked


def test_src_length_mask_hides_padded_keys():
  torch.manual_seed(0)
  model = ref.MoEUT(**TINY).eval()
  x = torch.randn(2, 5, 16)
  pad = torch.zeros(2, 5, dtype=torch.bool)
  pad[1, 3:] = True
  changed = x.clone()
  changed[1, 3:] += 1.0
  mask = ref.AttentionMask(pad, None)
  with torch.no_grad():
    a, b = model(x, mask).outputs, model(changed, mask).outputs
  torch.testing.assert_close(a[1, :3], b[1, :3], rtol=0, atol=TOL)
  torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)


@pytest.mark.parametrize("ea", [3, 1])
def test_fully_masked_rows_are_finite_and_zero(ea):
  torch.manual_seed(0)
  att = ref.SwitchHeadRope(16, 2, ea, d_head=6)
  x = torch.randn(2, 4, 16, requires_grad=True)
  pad = torch.zeros(2, 4, dtype=torch.bool)
  pad[0] = True  # every key of batch element 0 masked
  mask = ref.AttentionMask(pad, ref.causal_mask(4))
  out, _ = att(x, x, x, mask)
  assert torch.isfinite(out).all()
  torch.testing.assert_close(out[0], torch.zeros(4, 16), rtol=0, atol=0)
  assert out[1].abs().max() > 0
  out.sum().backward()
  assert torch.isfinite(x.grad).all()

  torch.manual_seed(0)
  model = ref.MoEUT(**{**TINY, "att_n_experts": ea}).train()
  y = model(torch.randn(2, 4, 16), mask)
  assert torch.isfinite(y.outputs).all() and torch.isfinite(y.reg_loss)


def test_reg_loss_zero_in_eval_negative_in_train():
  model = _lm()
  tokens = torch.randint(0, VOCAB, (2, 6))
  with torch.no_grad():
    ev = model(tokens).reg_loss
    model.train()
    tr = model(tokens).reg_loss
  for r in (ev, tr):
    assert r.shape == () and r.dtype == torch.float32
  assert ev.item() == 0.0
  assert tr.item() < 0.0


def test_reg_loss_closed_form_for_uniform_routers():
  # Zero router weights -> uniform expert distributions -> entropy log(E) per module.
  model = _lm(n_layers=6, group_size=3, entropy_reg=0.5, att_entropy_reg=0.25).train()
  with torch.no_grad():
    for layer in model.transformer.layers:
      layer.ffn.expert_sel.zero_()
      layer.attention.sel_v.zero_()
      layer.attention.sel_o.zero_()
    reg = model(torch.randint(0, VOCAB, (2, 5))).reg_loss
  expected = -(0.5 * 3 * math.log(6) + 0.25 * 3 * 2 * math.log(3))
  assert abs(reg.item() - expected) < 1e-5


def test_usage_entropy_concatenates_before_the_mean():
  # Repeat 1 always uses expert 0, repeat 2 always expert 1: the pooled usage is uniform.
  big = 30.0
  r1 = torch.tensor([big, 0.0]).expand(1, 4, 2)  # [B, T, E]
  r2 = torch.tensor([0.0, big]).expand(1, 4, 2)
  pooled = ref.usage_entropy_loss(torch.cat([r1, r2], dim=1))
  assert abs(pooled.item() + math.log(2)) < 1e-6
  assert ref.usage_entropy_loss(r1).item() > -1e-6  # a single peaked repeat: entropy ~ 0
  # With heads: [B, N, H, E], -mean over B and H.
  logits = torch.zeros(3, 5, 2, 4)
  assert abs(ref.usage_entropy_loss(logits).item() + math.log(4)) < 1e-6


def test_sigma_moe_matches_a_per_token_loop():
  torch.manual_seed(0)
  moe = ref.SigmaMoE(8, 5, 3, 2).eval()
  x, xs = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
  out = moe(x, xs)
  expected = torch.zeros_like(x)
  for b in range(2):
    for t in range(3):
      gate = torch.sigmoid(moe.expert_sel @ xs[b, t])  # [E]
      for e in torch.argsort(gate, descending=True)[:2].tolist():
        u = torch.relu(x[b, t] @ moe.keys[e])  # [Es]
        expected[b, t] += gate[e] * (u @ moe.values[e])
  torch.testing.assert_close(out, expected, rtol=0, atol=TOL)


def test_switchhead_matches_a_per_token_loop():
  torch.manual_seed(0)
  d, h, ea, dh, t_len = 8, 2, 3, 4, 3
  att = ref.SwitchHeadRope(d, h, ea, d_head=dh, moe_k=2).eval()
  qs, vs = torch.randn(1, t_len, d), torch.randn(1, t_len, d)
  out, _ = att(qs, qs, vs, None)

  def top2(logits):  # [Ea] -> [(expert, sigmoid weight)]
    g = torch.sigmoid(logits)
    return [(e, g[e]) for e in torch.argsort(g, descending=True)[:2].tolist()]

  def rope(x, pos):  # x [Dh]: rotate-half on the first n_rot = 2 channels
    ang = pos * 1.0  # inv_freq_0 = 1
    x1, x2 = x[0], x[1]
    return torch.stack([x1 * math.cos(ang) - x2 * math.sin(ang),
                        x2 * math.cos(ang) + x1 * math.sin(ang), *x[2:]])

  expected = torch.zeros(1, t_len, d)
  for hh in range(h):
    rows = slice(hh * dh, (hh + 1) * dh)
    q = [rope(att.q.weight[rows] @ qs[0, i] * dh ** -0.25, i) for i in range(t_len)]
    k = [rope(att.k.weight[rows] @ qs[0, i] * dh ** -0.25, i) for i in range(t_len)]
    v = []
    for i in range(t_len):
      sel = top2(att.sel_v[hh * ea:(hh + 1) * ea] @ qs[0, i])
      v.append(sum(w * (vs[0, i] @ att.v[hh * ea + e]) for e, w in sel))
    for i in range(t_len):
      scores = torch.stack([q[i] @ k[j] for j in range(t_len)])
      p = torch.softmax(scores, 0)
      a = sum(p[j] * v[j] for j in range(t_len))
      sel = top2(att.sel_o[hh * ea:(hh + 1) * ea] @ qs[0, i])
      expected[0, i] += sum(w * (a @ att.o[hh * ea + e]) for e, w in sel)
  torch.testing.assert_close(out, expected, rtol=0, atol=TOL)


def test_rope_depends_only_on_relative_position():
  torch.manual_seed(0)
  q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
  def score(pq, pk):
    return (ref.apply_rope(q, torch.tensor([pq])) * ref.apply_rope(k, torch.tensor([pk]))).sum()
  torch.testing.assert_close(score(5, 2), score(13, 10), rtol=0, atol=TOL)
  assert abs(score(5, 2) - score(5, 3)) > 1e-4
  torch.testing.assert_close(ref.apply_rope(q, torch.tensor([0])), q)


def test_dropout_only_in_training():
  model = _lm(ff_expert_dropout=0.5, att_expert_dropout=0.5, dropout=0.5)
  tokens = torch.randint(0, VOCAB, (2, 5))
  with torch.no_grad():
    a, b = model(tokens).outputs, model(tokens).outputs
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    model.train()
    c = model(tokens).outputs
  assert (a - c).abs().max() > 1e-4


def test_reg_loss_pools_all_repeats_of_each_layer():
  torch.manual_seed(0)
  model = ref.MoEUT(**{**TINY, "entropy_reg": 1.0, "att_entropy_reg": 1.0}).train()
  x = torch.randn(2, 5, 16)
  with torch.no_grad():
    reg = model(x).reg_loss
    h, expected = x, 0.0
    logits = {g: [] for g in range(2)}  # g -> [(ffn [B,T,Ef], lo, lv [B,T,H,Ea])] per repeat
    for _ in range(model.n_repeats):
      for g, layer in enumerate(model.layers):
        h, _, (f, (lo, lv)) = layer.forward_with_logits(h)
        logits[g].append((f, lo, lv))
    for g in range(2):
      for i in range(3):
        expected += ref.usage_entropy_loss(torch.cat([rep[i] for rep in logits[g]], dim=1))
    per_repeat = sum(ref.usage_entropy_loss(rep[i]) for g in range(2) for rep in logits[g]
                     for i in range(3)) / model.n_repeats
  assert abs(reg.item() - expected.item()) < 1e-6
  assert abs(reg.item() - per_repeat.item()) > 1e-4  # pooling is not averaging per repeat
