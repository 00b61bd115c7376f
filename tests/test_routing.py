"""The pure pieces one by one against the PyTorch reference: expert choice, the entropy
regulariser accumulated over repeats, RoPE, masks; and the CVMM routing metadata."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import torch_reference as ref
from cvmm_cases import rel_err
from kernels import make_routing
from moeut_jax.masks import AttentionMask, blocked_keys
from moeut_jax.rope import apply_rope, rotary_width
from moeut_jax.routing import (entropy_accumulate, entropy_accumulate_term, entropy_init,
                               entropy_loss, router_logits, sigmoid_topk,
                               sigmoid_topk_balanced)


@pytest.mark.parametrize("shape, k", [((3, 7, 12), 4), ((2, 5, 3, 6), 2), ((4, 9), 1),
                                      ((2, 3, 5), 5)])
def test_sigmoid_topk_matches_reference(shape, k):
  logits = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
  gates, idx = sigmoid_topk(jnp.asarray(logits), k)
  want_idx, want_gates = ref.sigmoid_topk(torch.from_numpy(logits), k)
  # The same set of experts per row with the same weights, whatever their order.
  order = np.argsort(np.asarray(idx), -1)
  want_order = np.argsort(want_idx.numpy(), -1)
  np.testing.assert_array_equal(np.take_along_axis(np.asarray(idx), order, -1),
                                np.take_along_axis(want_idx.numpy(), want_order, -1))
  assert rel_err(np.take_along_axis(np.asarray(gates), order, -1),
                 np.take_along_axis(want_gates.numpy(), want_order, -1)) <= 1e-7


def test_sigmoid_topk_drop_mask_excludes_choice_but_keeps_sigmoid_weights():
  logits = jnp.asarray([[3.0, 2.0, 1.0, 0.0]])
  drop = jnp.asarray([[True, False, False, False]])
  gates, idx = sigmoid_topk(logits, 2, drop)
  assert sorted(np.asarray(idx)[0].tolist()) == [1, 2]
  np.testing.assert_allclose(np.sort(np.asarray(gates)[0]),
                             np.sort(1 / (1 + np.exp(-np.asarray([2.0, 1.0])))), rtol=1e-6)


@pytest.mark.parametrize("shape", [(2, 5, 8), (3, 4, 2, 6)])
def test_entropy_over_repeats_matches_reference_on_concatenated_time(shape):
  """Accumulating R applications equals the reference's loss on logits concatenated in time."""
  rng = np.random.default_rng(1)
  reps = [rng.standard_normal(shape).astype(np.float32) * 3 for _ in range(3)]
  acc = entropy_init(shape[:1] + shape[2:])
  for logits in reps:
    acc = entropy_accumulate(acc, jnp.asarray(logits))
  got = entropy_loss(acc, shape[1] * len(reps))
  want = ref.usage_entropy_loss(torch.from_numpy(np.concatenate(reps, axis=1)))
  assert rel_err(got, want.numpy()) <= 1e-6
  assert float(got) < 0


@pytest.mark.parametrize("shape", [(2, 5, 8), (3, 4, 2, 6)])
def test_entropy_gradient_over_repeats_matches_reference(shape):
  """The regulariser's hand-written backward (it recomputes log_softmax from the logits)
  against PyTorch's autograd of the reference loss on the logits concatenated in time."""
  rng = np.random.default_rng(2)
  reps = [rng.standard_normal(shape).astype(np.float32) * 3 for _ in range(3)]

  def loss(*logits):
    acc = entropy_init(shape[:1] + shape[2:])
    for lg in logits:
      acc = entropy_accumulate(acc, lg)
    return entropy_loss(acc, shape[1] * len(logits))

  got = jax.grad(loss, argnums=(0, 1, 2))(*map(jnp.asarray, reps))
  cat = torch.from_numpy(np.concatenate(reps, axis=1)).requires_grad_()
  ref.usage_entropy_loss(cat).backward()
  want = np.split(cat.grad.numpy(), 3, axis=1)
  for g, w in zip(got, want):
    assert rel_err(g, w) <= 1e-5


def test_sigmoid_topk_gradient_matches_reference():
  """The gates' gradient (float32 sigmoid, backward from the kept logits) against torch."""
  rng = np.random.default_rng(3)
  logits = rng.standard_normal((6, 10)).astype(np.float32) * 2
  cot = rng.standard_normal((6, 3)).astype(np.float32)
  got = jax.grad(lambda s: jnp.sum(sigmoid_topk(s, 3)[0] * cot))(jnp.asarray(logits))
  t = torch.from_numpy(logits).requires_grad_()
  gates = torch.sigmoid(t)
  idx = torch.topk(gates, 3, dim=-1).indices
  (torch.gather(gates, -1, idx) * torch.from_numpy(cot)).sum().backward()
  assert rel_err(got, t.grad.numpy()) <= 1e-6
  assert np.count_nonzero(np.asarray(got)) == 6 * 3


@pytest.mark.parametrize("shape, drop", [((2, 5, 8), False), ((3, 4, 2, 6), False),
                                         ((2, 5, 8), True)])
def test_sigmoid_topk_balanced_matches_reference(shape, drop):
  """Gates, choice and regulariser term from one function with one backward (the model's
  training path): the reference's gathered sigmoid and entropy loss over three repeats
  concatenated in time, values and the logits' gradient through both at once."""
  rng = np.random.default_rng(4)
  k = 2
  reps = [rng.standard_normal(shape).astype(np.float32) * 3 for _ in range(3)]
  cots = [rng.standard_normal(shape[:-1] + (k,)).astype(np.float32) for _ in range(3)]
  masks = [rng.random(shape) < 0.3 if drop else None for _ in range(3)]

  for lg, m in zip(reps, masks):
    m = None if m is None else jnp.asarray(m)
    gates, idx, _ = sigmoid_topk_balanced(jnp.asarray(lg), k, m)
    want_gates, want_idx = sigmoid_topk(jnp.asarray(lg), k, m)
    np.testing.assert_array_equal(np.asarray(idx), np.asarray(want_idx))
    np.testing.assert_array_equal(np.asarray(gates), np.asarray(want_gates))

  def loss(*logits):
    acc = entropy_init(shape[:1] + shape[2:])
    total = 0.0
    for lg, cot, m in zip(logits, cots, masks):
      gates, _, term = sigmoid_topk_balanced(lg, k, None if m is None else jnp.asarray(m))
      acc = entropy_accumulate_term(acc, term)
      total = total + jnp.sum(gates * cot)
    return total + entropy_loss(acc, shape[1] * len(logits))

  value, got = jax.value_and_grad(loss, argnums=(0, 1, 2))(*map(jnp.asarray, reps))
  ts = [torch.from_numpy(r).requires_grad_() for r in reps]
  want = ref.usage_entropy_loss(torch.cat(ts, 1))
  for t, cot, m in zip(ts, cots, masks):
    g = torch.sigmoid(t)
    choice = g if m is None else g.masked_fill(torch.from_numpy(m), -float("inf"))
    idx = torch.topk(choice, k, dim=-1).indices
    want = want + (torch.gather(g, -1, idx) * torch.from_numpy(cot)).sum()
  want.backward()
  assert rel_err(value, want.detach().numpy()) <= 1e-6
  for g, t in zip(got, ts):
    assert rel_err(g, t.grad.numpy()) <= 1e-5


@pytest.mark.parametrize("d_head, want", [(82, 40), (128, 64), (10, 4), (3, 0), (2, 0)])
def test_rotary_width(d_head, want):
  assert rotary_width(d_head) == want


@pytest.mark.parametrize("d_head", [16, 10, 82])
def test_rope_matches_reference(d_head):
  x = np.random.default_rng(2).standard_normal((2, 7, 3, d_head)).astype(np.float32)
  positions = np.arange(5, 12)
  n_rot = rotary_width(d_head)
  got = apply_rope(jnp.asarray(x), jnp.asarray(positions), n_rot)
  xt = torch.from_numpy(x).transpose(1, 2)                           # [B, H, T, Dh]
  rotated = ref.apply_rope(xt[..., :n_rot], torch.from_numpy(positions))
  want = torch.cat([rotated, xt[..., n_rot:]], -1).transpose(1, 2).numpy()
  assert rel_err(got, want) <= 1e-6


@pytest.mark.parametrize("offset", [0, 3])
def test_masks_match_reference(offset):
  b, t = 2, 4
  s = offset + t
  rng = np.random.default_rng(3)
  pad = rng.random((b, s)) < 0.3
  pos = rng.random((t, t)) < 0.4
  got = blocked_keys(AttentionMask(jnp.asarray(pad), jnp.asarray(pos)), causal=False,
                     batch=b, q_len=t, n_keys=s, offset=offset)
  want = ref.attention_bool_mask(ref.AttentionMask(torch.from_numpy(pad), torch.from_numpy(pos)),
                                 b, t, s)
  np.testing.assert_array_equal(np.broadcast_to(np.asarray(got)[:, 0], (b, t, s)),
                                np.broadcast_to(want.numpy().reshape(b, t, s), (b, t, s)))
  causal = blocked_keys(None, causal=True, batch=b, q_len=t, n_keys=s, offset=offset)
  np.testing.assert_array_equal(np.asarray(causal)[0, 0],
                                np.arange(s)[None, :] > (offset + np.arange(t))[:, None])
  assert blocked_keys(AttentionMask(None, None), causal=False, batch=b, q_len=t, n_keys=s,
                      offset=offset) is None


@pytest.mark.parametrize("packed", [True, False], ids=["packed_keys", "argsort"])
def test_make_routing_sorts_pairs_by_expert(packed, monkeypatch):
  import kernels.routing
  if not packed:  # the path for E * P >= 2^31
    monkeypatch.setattr(kernels.routing, "_PACKED_KEY_LIMIT", 0)
  idx = np.random.default_rng(4).integers(0, 6, (11, 3)).astype(np.int32)
  idx[:, 0] = 2                                                      # a popular expert
  idx[0, 1] = 0                                                      # expert 0 used once
  r = make_routing(jnp.asarray(idx), 7)                              # expert 6 gets nothing
  order = np.asarray(r.order)
  flat = idx.reshape(-1)
  np.testing.assert_array_equal(order, np.argsort(flat, kind="stable"))
  assert order.dtype == np.int32 and r.group_sizes.dtype == r.group_offsets.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(r.group_sizes), np.bincount(flat, minlength=7))
  np.testing.assert_array_equal(np.asarray(r.group_offsets),
                                np.concatenate([[0], np.cumsum(np.bincount(flat, minlength=7))]))
  np.testing.assert_array_equal(np.asarray(r.sorted_token()), order // 3)
  with pytest.raises(ValueError, match=r"expert_index must be \[N, K\]"):
    make_routing(jnp.zeros((4,), jnp.int32), 3)


@pytest.mark.parametrize("shape", [(3, 50, 96, 37), (2, 1024, 256, 387)],
                         ids=["small", "unaligned_experts"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_router_logits_and_gradients_are_float32_accurate(dtype, shape):
  """Logits and both gradients against float64, for float32 compute (one HIGHEST product)
  and 16-bit compute (three bf16 products): relative error <= 1e-5. One bf16 product,
  or TF32, would be off by about 1e-3. Also run on the GPU machine: XLA there must not
  simplify the bf16 split away."""
  b, t, d, e = shape
  rng = np.random.default_rng(0)
  x = rng.standard_normal((b, t, d)).astype(np.float32)
  w = (rng.standard_normal((d, e)) / 10).astype(np.float32)
  g = rng.standard_normal((b, t, e)).astype(np.float32)

  def value_and_grads(x, w, g):
    y, vjp = jax.vjp(lambda x, w: router_logits(x, w, dtype), x, w)
    return (y,) + vjp(g)
  y, dx, dw = jax.jit(value_and_grads)(jnp.asarray(x), jnp.asarray(w), jnp.asarray(g))
  x64, w64, g64 = x.astype(np.float64), w.astype(np.float64), g.astype(np.float64)
  assert y.dtype == dx.dtype == dw.dtype == jnp.float32
  assert rel_err(y, x64 @ w64) <= 1e-5
  assert rel_err(dx, g64 @ w64.T) <= 1e-5
  assert rel_err(dw, np.einsum("btd,bte->de", x64, g64)) <= 1e-5
  # the same choice of experts as float64
  np.testing.assert_array_equal(np.argsort(-np.asarray(y), -1)[..., :5],
                                np.argsort(-(x64 @ w64), -1)[..., :5])


@pytest.mark.parametrize("packed", [True, False], ids=["packed_keys", "argsort"])
def test_unit_pairs_group_each_heads_two_experts(packed, monkeypatch):
  """make_head_routing's unit pairs: every (token, head) is one unit of its two pairs,
  the lower expert's first; units are sorted by their combination of experts, in token
  order within one; the tile lists cover every sorted unit once with tiles of one
  combination, launched by the first token they hold."""
  import kernels.routing
  from kernels import make_head_routing
  if not packed:
    monkeypatch.setattr(kernels.routing, "_PACKED_KEY_LIMIT", 0)
  n, h, ea = 57, 3, 6
  rng = np.random.default_rng(7)
  idx = np.stack([rng.permutation(ea)[:2] for _ in range(n * h)]).reshape(n, h, 2)
  idx[:5, 0] = [4, 1]                        # a combination in both orders
  idx[5:9, 0] = [1, 4]
  r = make_head_routing(jnp.asarray(idx, jnp.int32), ea, unit_pairs=True)
  flat = (idx + (np.arange(h) * ea)[:, None]).reshape(-1)
  np.testing.assert_array_equal(np.asarray(r.expert_index).reshape(-1), flat)
  up = r.pairs
  lo, hi = np.asarray(up.lo), np.asarray(up.hi)
  assert lo.dtype == hi.dtype == np.int32 and lo.shape == (n * h,)
  np.testing.assert_array_equal(np.sort(np.concatenate([lo, hi])), np.arange(2 * n * h))
  np.testing.assert_array_equal(lo // 2, hi // 2)
  assert np.all(flat[lo] <= flat[hi])
  combo = flat[lo] * (h * ea) + flat[hi]
  key = combo * (n * h) + lo // 2
  assert np.all(np.diff(key) > 0)            # by combination, then token order
  offs = np.asarray(up.group_offsets)
  for bm in (4, 16):
    t = np.asarray(up.tiles(bm))
    assert t.shape[0] == 4
    used = t[:, t[3] > t[2]]
    assert np.all(t[2:, t[3] <= t[2]] == 0) and np.all(t[3, :used.shape[1]] > 0)
    covered = np.concatenate([np.arange(s, e) for s, e in used[2:].T])
    np.testing.assert_array_equal(np.sort(covered), np.arange(n * h))
    for e_lo, e_hi, s, e in used.T:
      assert e - s <= bm
      assert np.all(flat[lo[s:e]] == e_lo) and np.all(flat[hi[s:e]] == e_hi)
    first_tok = lo[used[2]] // (2 * h)
    assert np.all(np.diff(first_tok) >= 0)
  assert offs[-1] == n * h and np.all(np.diff(offs) >= 0)


def _unit_layout(idx: np.ndarray, n_experts: int) -> np.ndarray:
  """make_unit_routing's documented pair order, from its definition: expert by expert;
  within an expert the units whose lower expert it is (by partner), then those whose
  higher expert it is (by partner), each block in token order."""
  units = idx.reshape(-1, 2)
  lo_first = units[:, 0] <= units[:, 1]
  lo_pair = np.where(lo_first, 0, 1) + 2 * np.arange(len(units))
  e_lo, e_hi = units.min(1), units.max(1)
  order = []
  for x in range(n_experts):
    for y in range(n_experts):
      order += [p for u, p in enumerate(lo_pair) if e_lo[u] == x and e_hi[u] == y]
    for y in range(n_experts):
      order += [p ^ 1 for u, p in enumerate(lo_pair) if e_lo[u] == y and e_hi[u] == x]
  return np.asarray(order)


@pytest.mark.parametrize("packed", [True, False], ids=["packed_keys", "argsort"])
def test_unit_routing_sorts_once_into_partner_blocks(packed, monkeypatch):
  """make_unit_routing: every expert's pairs contiguous (the sizes and offsets of
  make_routing), laid out as documented (partner blocks, token order within one; a unit
  with one expert twice gives it both pairs); the same unit pairs as make_unit_pairs
  on make_routing's routing; under jit too. Band tiles, which need token order within an
  expert, are refused."""
  import kernels.routing as kr
  if not packed:
    monkeypatch.setattr(kr, "_PACKED_KEY_LIMIT", 0)
  n, k, e, b = 41, 6, 12, 4
  rng = np.random.default_rng(11)
  block = rng.integers(0, 3, (n, k // 2))
  local = rng.integers(0, 4, (n, k // 2, 2))
  local[block == 2] = np.minimum(local[block == 2], 2)      # expert 11 gets nothing
  local[:3, 0] = [2, 2]                                     # one expert twice
  idx = (block[..., None] * b + local).reshape(n, k).astype(np.int32)
  r = kr.make_unit_routing(jnp.asarray(idx), e, b)
  plain = make_routing(jnp.asarray(idx), e)
  np.testing.assert_array_equal(np.asarray(r.order), _unit_layout(idx, e))
  assert r.order.dtype == r.group_sizes.dtype == r.group_offsets.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(r.group_sizes), np.asarray(plain.group_sizes))
  np.testing.assert_array_equal(np.asarray(r.group_offsets), np.asarray(plain.group_offsets))
  want = kr.make_unit_pairs(plain, b)
  for f in ("lo", "hi", "group_offsets"):
    np.testing.assert_array_equal(np.asarray(getattr(r.pairs, f)), np.asarray(getattr(want, f)))
  traced = jax.jit(lambda i: kr.make_unit_routing(i, e, b, tile_blocks=(8,)))(jnp.asarray(idx))
  np.testing.assert_array_equal(np.asarray(traced.order), np.asarray(r.order))
  np.testing.assert_array_equal(np.asarray(traced.tile_lists["expert/8"]),
                                np.asarray(plain.tiles(8)))
  with pytest.raises(ValueError, match="different blocks"):
    kr.make_unit_routing(jnp.asarray([[0, 4]], jnp.int32), e, b)


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_unit_routing_gives_the_same_cvmm(gated):
  """A SwitchHead CVMM (the pure-JAX implementation) through the unit routing equals
  the one through the plain routing, forward and every gradient: only the order of the
  pairs within an expert differs."""
  from kernels import cvmm, make_head_routing
  n, h, ea, d, o = 29, 3, 5, 16, 8
  key = jax.random.split(jax.random.key(5), 5)
  idx = jax.lax.top_k(jax.random.normal(key[0], (n, h, ea)), 2)[1]
  m = 1 if not gated else h * 2
  x = jax.random.normal(key[1], (n, m, d))
  w = jax.random.normal(key[2], (h * ea, d, o))
  g = jax.random.uniform(key[3], (n, h * 2)) if gated else None

  def loss(routing, x, w, g):
    y = cvmm(x, routing, w, g, impl="xla")
    return jnp.sum(y * jax.random.normal(key[4], y.shape))
  grads = lambda r: jax.grad(loss, argnums=(1, 2, 3) if gated else (1, 2))(r, x, w, g)  # noqa: E731
  ru = make_head_routing(idx, ea, unit_pairs=True)
  rp = make_head_routing(idx, ea, unit_pairs=False)
  assert ru.pairs is not None and rp.pairs is None
  np.testing.assert_allclose(cvmm(x, ru, w, g, impl="xla"), cvmm(x, rp, w, g, impl="xla"),
                             rtol=1e-6, atol=1e-6)
  for a, b in zip(grads(ru), grads(rp)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_unit_pairs_refuse_what_they_cannot_group():
  """Odd slot counts, a block that does not divide the experts and, with concrete
  indices, a unit whose experts lie in two blocks are refused; without unit pairs (or
  with k != 2) make_head_routing attaches none."""
  from kernels import make_head_routing
  from kernels.routing import make_unit_pairs
  with pytest.raises(ValueError, match="even number of slots"):
    make_unit_pairs(make_routing(jnp.zeros((4, 3), jnp.int32), 6), 3)
  with pytest.raises(ValueError, match="must divide"):
    make_unit_pairs(make_routing(jnp.zeros((4, 2), jnp.int32), 6), 4)
  with pytest.raises(ValueError, match="different blocks"):
    make_unit_pairs(make_routing(jnp.asarray([[0, 1], [2, 4]], jnp.int32), 6), 3)
  with pytest.raises(ValueError, match=r"\[N, H, k\]"):
    make_head_routing(jnp.zeros((4, 2), jnp.int32), 3)
  idx = jnp.asarray(np.random.default_rng(0).integers(0, 5, (9, 2, 3)), jnp.int32)
  assert make_head_routing(idx, 5, unit_pairs=True).pairs is None     # k = 3
  assert make_head_routing(idx[..., :2], 5, unit_pairs=False).pairs is None
  traced = jax.jit(lambda i: make_head_routing(i, 5, unit_pairs=True).pairs.lo)
  assert traced(idx[..., :2]).shape == (18,)


def test_unit_pairs_by_default_only_for_large_routings_on_gpus(monkeypatch):
  """SwitchHead routings carry unit pairs by default (unit_pairs None) only on GPUs, from
  UNIT_PAIRS_MIN_UNITS units; True and False decide; make_head_routing asks with its
  N * H units; the model passes CvmmConfig.unit_pairs on GPUs and False elsewhere."""
  import kernels.routing as kr
  from kernels import CvmmConfig
  from moeut_jax import attention
  big, small = kr.UNIT_PAIRS_MIN_UNITS, kr.UNIT_PAIRS_MIN_UNITS - 1
  monkeypatch.setattr(kr.jax, "default_backend", lambda: "gpu")
  assert kr.unit_pairs_wanted(big) and not kr.unit_pairs_wanted(small)
  idx = jnp.zeros((6, 3, 2), jnp.int32)
  assert kr.make_head_routing(idx, 4, unit_pairs=True).pairs is not None
  assert kr.make_head_routing(idx, 4, unit_pairs=False).pairs is None
  asked = []
  monkeypatch.setattr(kr, "unit_pairs_wanted", lambda u: asked.append(u) or False)
  kr.make_head_routing(idx, 4)
  assert asked == [18]
  monkeypatch.undo()
  monkeypatch.setattr(kr.jax, "default_backend", lambda: "cpu")
  assert not kr.unit_pairs_wanted(big)
  logits = jnp.zeros((1, 6, 3, 4))
  _, r, _ = attention._route(logits, None, 2, CvmmConfig(unit_pairs=True))
  assert r.pairs is None                     # the CPU path has no use for them


def test_unit_pair_tiles_in_combination_order():
  """tiles(by_token=False): the same tiles as by first token, combination by
  combination (as sorted), used ones first."""
  from kernels import make_head_routing
  idx = jax.lax.top_k(jax.random.normal(jax.random.key(3), (37, 2, 5)), 2)[1]
  up = make_head_routing(idx, 5, unit_pairs=True).pairs
  a, b = np.asarray(up.tiles(8)), np.asarray(up.tiles(8, by_token=False))
  used = b[:, b[3] > b[2]]
  assert np.all(np.diff(used[2]) > 0)
  key = lambda t: sorted(map(tuple, t.T.tolist()))  # noqa: E731
  assert key(a) == key(b)


def test_router_logits_of_a_layernorm_recompute_its_output_with_the_same_gradients():
  """router_logits(..., source=NormSource) keeps the LayerNorm's input instead of its
  float32 output; the logits and the gradients of the input, scale, bias and router weight
  through the LayerNorm are those of the plain call (bits apart from summation order)."""
  from moeut_jax.layernorm import NormSource, layer_norm
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((2, 64, 96)) * 3 + 1, jnp.float32)
  scale = jnp.asarray(1 + rng.standard_normal(96) / 5, jnp.float32)
  bias = jnp.asarray(rng.standard_normal(96) / 5, jnp.float32)
  w = jnp.asarray(rng.standard_normal((96, 37)) / 10, jnp.float32)
  g = jnp.asarray(rng.standard_normal((2, 64, 37)), jnp.float32)

  def run(with_source):
    def f(x, scale, bias, w):
      y = layer_norm(x, scale, bias, 1e-5)
      src = NormSource(x, scale, bias, 1e-5) if with_source else None
      return router_logits(y, w, jnp.bfloat16, source=src)
    out, vjp = jax.vjp(f, x, scale, bias, w)
    return (out,) + vjp(g)
  plain, recomputed = jax.jit(lambda: run(False))(), jax.jit(lambda: run(True))()
  for a, b, name in zip(plain, recomputed, ("logits", "dx", "dscale", "dbias", "dw")):
    assert rel_err(b, np.asarray(a, np.float64)) <= 1e-6, name


def test_bf16_rope_table_is_the_originals_under_cuda_autocast(monkeypatch):
  """rope_table_dtype bf16 against the official RotaryPosEncoding as it runs under CUDA's
  bf16 autocast, which runs torch.einsum (its angle table) in bf16: emulated here by an
  einsum that casts its float inputs to bf16 first, as PyTorch's AutocastCUDA kernel for
  aten::einsum does (the CPU's autocast has none). The rotations of the same bf16 q
  agree bit for bit at 512 positions; float32 angles (our default) do not."""
  import torch  # noqa: PLC0415
  import original_cvmm  # noqa: PLC0415
  from moeut_jax.side_by_side import original  # noqa: PLC0415
  moeut = original.load(original_cvmm.required())
  # PyTorch registers a CUDA autocast kernel for einsum (and none for the CPU)
  dump = torch._C._dispatch_dump("aten::einsum")  # noqa: SLF001
  assert "AutocastCUDA" in dump and "AutocastCPU" not in dump
  einsum = torch.einsum

  def einsum_bf16(eq, *ops):
    return einsum(eq, *[o.to(torch.bfloat16) if o.is_floating_point() else o for o in ops])

  t, n_rot = 512, 48
  rng = np.random.default_rng(0)
  q = torch.from_numpy(rng.normal(size=(2, 3, t, n_rot)).astype(np.float32)).to(torch.bfloat16)
  pe = moeut.moeut.RotaryPosEncoding(n_rot, seq_dim=-2)
  monkeypatch.setattr(torch, "einsum", einsum_bf16)
  sin, cos = pe.get(q)
  assert cos.dtype == torch.bfloat16
  want = pe.apply_rot(q, sin, cos, -2, 0)                            # [B, H, T, n_rot] bf16
  monkeypatch.setattr(torch, "einsum", einsum)
  x = jnp.asarray(q.float().numpy(), jnp.bfloat16).transpose(0, 2, 1, 3)   # [B, T, H, n]
  pos = jnp.arange(t)
  got = apply_rope(x, pos, n_rot, table_dtype=jnp.bfloat16).transpose(0, 2, 1, 3)
  np.testing.assert_array_equal(np.asarray(got, np.float32), want.float().numpy())
  ours = apply_rope(x, pos, n_rot).transpose(0, 2, 1, 3)
  far = np.abs(np.asarray(ours, np.float32) - want.float().numpy())[:, :, 256:]
  assert far.max() > 0.5                    # scrambled high-frequency rotations
