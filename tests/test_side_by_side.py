"""The side-by-side tool (moeut_jax/side_by_side) on the CPU: the original (with its CVMM
op's plain-PyTorch stand-in) and moeut-jax in float32 from the same weights and batches
must give the same curves; and the tool's parts and its refusals."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

import original_cvmm
from moeut_jax.side_by_side import shared
from moeut_jax.side_by_side.cli import main

# Both sides agree to about 1e-6 after 8 steps (float32 sums in other orders; Adam
# amplifies the differences step by step): the logits' bound of tests/test_parity.py.
TOL = 1e-5

WORDS = ("the of and to in is was that for it with as his on be at by had are but from or "
         "have an they which one you were her all she there would their we him been has "
         "when who will more no if out so said what up its about into than them can only "
         "other new some could time these two may then do first any my now").split()


def _text(path, n_words=20000, seed=0):
  rng = np.random.default_rng(seed)
  path.write_text(" ".join(np.asarray(WORDS)[rng.integers(0, len(WORDS), n_words)]))
  return str(path)


@pytest.mark.slow
def test_tool_gives_moeut_jax_the_originals_curve_in_float32(tmp_path, capsys):
  original = original_cvmm.required()
  out = tmp_path / "out"
  code = main(["--original", original, "--text", _text(tmp_path / "text.txt"),
               "--profile", "MoEUT_tiny", "--dtype", "float32", "--steps", "8", "--batch",
               "4", "--seq", "64", "--eval-every", "4", "--eval-batches", "2", "--variants",
               "original,original,jax", "--parallel", "2",
               "--out", str(out)])
  printed = capsys.readouterr().out
  assert code == 0, printed
  runs = {name: json.loads((out / f"{stem}.json").read_text())
          for name, stem in (("original#1", "original_1"), ("original#2", "original_2"),
                             ("jax", "jax"))}
  want = runs["original#1"]
  assert len(want["train_loss"]) == 8 and [s for s, _ in want["heldout"]] == [4, 8]
  # Its second run differs from the first at float32 rounding (PyTorch's CPU threads).
  again = np.abs(np.subtract(runs["original#2"]["train_loss"], want["train_loss"]))
  assert again.max() / want["train_loss"][-1] <= TOL
  got = runs["jax"]
  errors = np.abs(np.subtract(got["train_loss"], want["train_loss"])) / np.asarray(
      want["train_loss"])
  assert errors.max() <= TOL, errors
  for (s1, a), (s2, b) in zip(got["heldout"], want["heldout"]):
    assert s1 == s2 and abs(a - b) / b <= TOL
  # every step's gradient norm before clipping, from both frameworks
  assert len(got["grad_norm"]) == len(want["grad_norm"]) == 8
  norms = np.abs(np.subtract(got["grad_norm"], want["grad_norm"])) / np.asarray(
      want["grad_norm"])
  assert norms.max() <= TOL, norms
  summary = json.loads((out / "summary.json").read_text())
  assert summary["original_spread"] <= TOL * summary["original_mean"]
  assert [r["label"] for r in summary["rows"]] == list(runs)
  assert (out / "side_by_side.png").stat().st_size > 10_000
  assert "Held-out loss by step" in printed and "original mean after step 8:" in printed
  assert json.loads((out / "setup.json").read_text())["digest"] == want["setup_digest"]


def test_variants_labels_and_refusals(tmp_path, capsys):
  assert shared.parse_variant("jax+original_cvmm+original_routers") == shared.Variant(
      "jax", ("original_routers", "original_cvmm"))
  vs = [shared.parse_variant(v) for v in ("original", "jax", "original")]
  assert shared.labels(vs) == ["original#1", "jax", "original#2"]
  assert shared.parse_variant("original+efficient_attention") == shared.Variant(
      "original", ("efficient_attention",))
  for bad in ("torch", "original+original_cvmm", "jax+fast", "jax+original_cvmm+original_cvmm",
              "jax+efficient_attention", "original+efficient_attention+efficient_attention"):
    with pytest.raises(ValueError, match="variant"):
      shared.parse_variant(bad)
  text = _text(tmp_path / "t.txt", 100)
  assert main(["--original", str(tmp_path), "--text", text]) == 2
  assert "holds no moeut/cvmm.py" in capsys.readouterr().err
  assert main(["--original", str(tmp_path), "--text", text, "--variants", "jax+fast"]) == 2
  assert "options must be distinct, from" in capsys.readouterr().err


def test_learning_rates_batches_and_text(tmp_path):
  lrs = shared.learning_rates(1e-3, 100, 10)
  assert lrs.dtype == np.float32 and lrs.shape == (100,)
  assert lrs[0] == np.float32(1e-4) and lrs[9] == np.float32(1e-3)
  assert abs(lrs[-1] - 1e-4) < 1e-6 and np.all(np.diff(lrs[10:]) <= 0)
  text = bytes(range(256)) * 40                                      # 10,240 bytes
  train, held = shared.batches(text, batch=3, seq=15, steps=5, eval_batches=2,
                               heldout_fraction=0.1, seed=0)
  assert train.shape == (5, 3, 16) and held.shape == (2, 3, 16)
  cut = int(len(text) * 0.9)
  # every window is consecutive bytes of its part of the text
  tokens = np.frombuffer(text, np.uint8).astype(np.int32)
  for row in train.reshape(-1, 16):
    starts = [i for i in range(cut - 15) if np.array_equal(tokens[i:i + 16], row)]
    assert starts
  assert np.array_equal(held[0, 0], tokens[cut:cut + 16])
  with pytest.raises(ValueError, match="too few"):
    shared.batches(text[:100], batch=1, seq=15, steps=1, eval_batches=1,
                   heldout_fraction=0.1, seed=0)
  (tmp_path / "b").mkdir()
  (tmp_path / "b" / "2.txt").write_bytes(b"two")
  (tmp_path / "b" / "1.md").write_bytes(b"one")
  (tmp_path / "b" / "skip.bin").write_bytes(b"x")
  assert shared.read_text([str(tmp_path / "b")], 100) == b"one\ntwo"
  assert shared.read_text([str(tmp_path / "b")], 5) == b"one\nt"
  with pytest.raises(FileNotFoundError, match="no such file"):
    shared.read_text([str(tmp_path / "missing")], 10)


def test_efficient_attention_turns_the_cudnn_backend_off_for_the_run():
  import torch  # noqa: PLC0415
  from moeut_jax.side_by_side.original import attention_backends  # noqa: PLC0415
  assert torch.backends.cuda.cudnn_sdp_enabled()
  with attention_backends(shared.parse_variant("original")):
    assert torch.backends.cuda.cudnn_sdp_enabled()
  with attention_backends(shared.parse_variant("original+efficient_attention")):
    assert not torch.backends.cuda.cudnn_sdp_enabled()
  assert torch.backends.cuda.cudnn_sdp_enabled()


def _run(label, variant, held, error=None, n_steps=None):
  r = dict(label=label, variant=variant, heldout=[list(h) for h in held],
           train_loss=[3.0] * (n_steps or (held[-1][0] if held else 0)), seconds=1.0)
  if error:
    r["error"] = error
  return r


def test_report_compares_stopped_runs_where_the_original_got_to():
  """A run that went further than the originals is compared at the last step they
  reached; a stopped original's curve up to there still counts."""
  from moeut_jax.side_by_side import report  # noqa: PLC0415
  results = [
      _run("original#1", "original", [(100, 1.90), (200, 1.50)]),
      _run("original#2", "original", [(100, 1.80)], error="timed out after 384 s"),
      _run("jax", "jax", [(100, 1.70), (200, 1.40), (300, 1.30)]),
      _run("broken", "jax", [], error="OutOfMemoryError: CUDA"),
  ]
  s = report.summary(results)
  assert s["original_step"] == 100
  assert s["original_mean"] == pytest.approx(1.85) and s["original_spread"] == pytest.approx(0.1)
  rows = {r["label"]: r for r in s["rows"]}
  assert rows["jax"]["step"] == 200 and rows["jax"]["diff"] == pytest.approx(-0.1)
  assert rows["jax"]["spreads"] is None                # one original at step 200
  assert rows["jax"]["last"] == [300, 1.30]
  assert rows["original#2"]["step"] == 100
  assert rows["original#2"]["spreads"] == pytest.approx(0.5)
  assert rows["broken"]["loss"] is None
  by_step = report.heldout_by_step(results).splitlines()
  assert by_step[0].split()[1:] == ["100", "200", "300"]
  assert by_step[2].split()[1:] == ["1.8000", "-", "-"]
  table = report.heldout_table(results)
  assert "timed out after 384 s" in table and "OutOfMemoryError" in table


def test_worker_keeps_the_curves_of_a_run_that_fails(tmp_path, monkeypatch):
  """The worker writes the curves after each evaluation, so a failing (or stopped) run
  keeps them; the final file adds the error."""
  from moeut_jax.side_by_side import worker  # noqa: PLC0415
  (tmp_path / "setup.json").write_text(json.dumps({"digest": "abc"}))
  seen = {}

  def run(setup, variant, log, progress):
    progress(dict(train_loss=[3.0, 2.5], heldout=[[2, 2.4]], seconds=1.0))
    seen["partial"] = json.loads((tmp_path / "jax_original_routers.json").read_text())
    raise RuntimeError("out of memory\nmore")

  monkeypatch.setattr(worker, "run", run)
  monkeypatch.setattr(worker.Setup, "load", classmethod(lambda cls, out: None))
  assert worker.main([str(tmp_path), "jax+original_routers", "jax+original_routers"]) == 1
  assert seen["partial"]["partial"] is True and seen["partial"]["heldout"] == [[2, 2.4]]
  final = json.loads((tmp_path / "jax_original_routers.json").read_text())
  assert final["heldout"] == [[2, 2.4]] and final["error"] == "RuntimeError: out of memory"
  assert final["setup_digest"] == "abc" and "partial" not in final


def _folder(path, digest="d1", steps=300, runs=()):
  path.mkdir()
  (path / "setup.json").write_text(json.dumps(dict(
      model={}, original_path=str(path), steps=steps, batch=16, seq=512, dtype="bfloat16",
      digest=digest)))
  for r in runs:
    (path / f"{shared.file_stem(r['label'])}.json").write_text(
        json.dumps(dict(r, setup_digest=digest)))
  return str(path)


def test_collect_joins_runs_of_one_setup_from_several_folders(tmp_path, capsys):
  from moeut_jax.side_by_side import collect  # noqa: PLC0415
  a = _folder(tmp_path / "a", runs=[_run("original#1", "original", [(100, 1.9), (200, 1.5)]),
                                    _run("original#2", "original", [(100, 1.8), (200, 1.6)])])
  b = _folder(tmp_path / "b", runs=[_run("jax", "jax", [(100, 1.7), (200, 1.4)]),
                                    _run("original#1", "original", [(100, 1.85)])])
  out = tmp_path / "merged"
  assert collect.main([a, b, "--out", str(out)]) == 0
  printed = capsys.readouterr().out
  summary = json.loads((out / "summary.json").read_text())
  labels = [r["label"] for r in summary["rows"]]
  assert labels == ["original#1", "original#2", "jax", "original#1@b"]
  assert summary["original_step"] == 100
  assert summary["original_mean"] == pytest.approx((1.9 + 1.8 + 1.85) / 3)
  jax_row = summary["rows"][2]
  assert jax_row["step"] == 200 and jax_row["diff"] == pytest.approx(-0.15)
  assert "original#1@b" in printed and (out / "side_by_side.png").is_file()


def test_collect_refuses_folders_of_other_setups(tmp_path, capsys):
  from moeut_jax.side_by_side import collect  # noqa: PLC0415
  a = _folder(tmp_path / "a")
  other_steps = _folder(tmp_path / "b", steps=200)
  other_digest = _folder(tmp_path / "c", digest="d2")
  assert collect.main([a, other_steps]) == 2
  assert "differ in steps" in capsys.readouterr().err
  assert collect.main([a, other_digest]) == 2
  assert "differ in digest" in capsys.readouterr().err
  d = tmp_path / "d"
  _folder(d)
  (d / "x.json").write_text(json.dumps(dict(label="x", variant="jax", setup_digest="zz")))
  assert collect.main([a, str(d)]) == 2
  assert "another setup" in capsys.readouterr().err
  assert collect.main([str(tmp_path / "nowhere")]) == 2
  assert "no setup.json" in capsys.readouterr().err


def _original_tiny():
  """The official model at a tiny size on the CPU (its CVMM op replaced by the stand-in
  by the caller), with a fixed input."""
  import torch  # noqa: PLC0415
  from moeut_jax.side_by_side import original  # noqa: PLC0415
  moeut = original.load(original_cvmm.required())
  torch.manual_seed(0)
  model = moeut.MoEUTLM(64, d_model=32, n_layers=2, n_heads=2, ff_n_experts=8,
                        att_n_experts=3, d_head=8, ff_k=3, group_size=2)
  tokens = torch.randint(0, 64, (2, 12))
  return moeut, model, tokens


@pytest.mark.parametrize("option,part", [
    ("float32_sigma_moe", "ffn"), ("float32_attention", "attention"),
    ("float32_routers", "router"), ("float32_cvmm", "ffn")])
def test_float32_options_take_their_part_of_the_original_out_of_autocast(option, part):
  """Under bf16 autocast (CPU), the option's part computes in float32: the σ-MoE or
  SwitchHead module's output equals its float32 output bit for bit; the routers'
  logits (kept for the reg loss) are float32 and equal float32 logits; with the CVMM
  calls in float32 the σ-MoE output is float32. Without the option the same part is
  bf16. After the run the model and the original's module are as they were."""
  import torch  # noqa: PLC0415
  from moeut_jax.side_by_side import original  # noqa: PLC0415
  moeut, model, tokens = _original_tiny()
  layer = model.transformer.layers[0]
  seen = {}
  layer.ffn.register_forward_hook(lambda m, i, o: seen.__setitem__("ffn", (i, o)))
  layer.attention.register_forward_hook(
      lambda m, i, o: seen.__setitem__("attention", (i, o[0])))

  def run(variant, autocast):
    seen.clear()
    ffn_hist, att_hist = [], []   # the model empties them by reassigning
    layer.ffn.sel_hist, layer.attention.sel_hist = ffn_hist, att_hist
    with original.on_device(moeut, "cpu"), original.float32_parts(moeut, model, variant), \
        torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), torch.no_grad():
      model(tokens)
    if part == "router":
      return ffn_hist[0], att_hist[0][0]
    inputs, out = seen[part]
    return out, inputs

  plain = run(shared.parse_variant("original"), autocast=True)
  got = run(shared.parse_variant(f"original+{option}"), autocast=True)
  if part == "router":
    # the σ-MoE router's logits and the SwitchHead output router's (which the original
    # casts to float32 after its bf16 product): float32 products of the float32 inputs
    want_ffn = torch.nn.functional.linear(seen["ffn"][0][1].float(), layer.ffn.expert_sel)
    want_att = torch.nn.functional.linear(seen["attention"][0][0].float(),
                                          layer.attention.sel_o).view(got[1].shape)
    assert plain[0].dtype == torch.bfloat16 and got[0].dtype == torch.float32
    assert torch.equal(got[0], want_ffn) and torch.equal(got[1], want_att)
    assert not torch.equal(plain[1], want_att)
  else:
    assert plain[0].dtype == torch.bfloat16
    assert got[0].dtype == torch.float32
    if option != "float32_cvmm":
      # the module on the same inputs without autocast: the same float32 numbers
      module = layer.ffn if part == "ffn" else layer.attention
      with original.on_device(moeut, "cpu"), torch.no_grad():
        args = [a.float() if torch.is_tensor(a) else a for a in got[1]]
        want = module(*args)
      want = want if part == "ffn" else want[0]
      assert torch.equal(got[0], want)
  assert "forward" not in vars(layer.ffn) and "forward" not in vars(layer.attention)
  assert moeut.moeut.F is torch.nn.functional


def test_float32_qk_and_sdpa_take_the_attentions_products_out_of_autocast():
  """float32_qk: SwitchHead's q and k projections give float32 products of float32
  inputs under bf16 autocast (bf16 without the option); float32_sdpa: the attention
  the model module calls returns float32 for bf16 inputs."""
  import torch  # noqa: PLC0415
  from moeut_jax.side_by_side import original  # noqa: PLC0415
  moeut, model, tokens = _original_tiny()
  att = model.transformer.layers[0].attention
  seen = []
  att.q.register_forward_hook(lambda m, i, o: seen.append((i[0], o)))

  def run(variant):
    seen.clear()
    with original.on_device(moeut, "cpu"), original.float32_parts(moeut, model, variant), \
        torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
      model(tokens)
      q = torch.randn(2, 2, 5, 4, dtype=torch.bfloat16)
      return seen[0], moeut.moeut.F.scaled_dot_product_attention(q, q, q)

  (x, q), attn = run(shared.parse_variant("original"))
  assert q.dtype == torch.bfloat16 and attn.dtype == torch.bfloat16
  (x, q), attn = run(shared.parse_variant("original+float32_qk"))
  assert torch.equal(q, torch.nn.functional.linear(x.float(), att.q.weight))
  assert attn.dtype == torch.bfloat16
  (x, q), attn = run(shared.parse_variant("original+float32_sdpa"))
  assert q.dtype == torch.bfloat16 and attn.dtype == torch.float32
  assert "forward" not in vars(att.q) and moeut.moeut.F is torch.nn.functional


def test_float32_rope_table_makes_the_originals_angles_in_float32(monkeypatch):
  """Under an einsum that runs in bf16 (what CUDA's autocast does to the original's RoPE
  table), the original's cached cos/sin are bf16; with float32_rope_table they are the
  float32 table; afterwards the modules are as they were. jax+original_rope builds
  moeut-jax with bf16 RoPE angles."""
  import torch  # noqa: PLC0415
  from moeut_jax.side_by_side import original  # noqa: PLC0415
  from moeut_jax.side_by_side.ours import build_model  # noqa: PLC0415
  moeut, model, tokens = _original_tiny()
  einsum = torch.einsum

  def autocast_einsum(eq, *ops):      # as CUDA's autocast runs it: in bf16 when enabled
    if torch.is_autocast_enabled("cpu"):
      ops = [o.to(torch.bfloat16) if o.is_floating_point() else o for o in ops]
    return einsum(eq, *ops)

  monkeypatch.setattr(torch, "einsum", autocast_einsum)
  pe = model.transformer.layers[0].attention.pe

  def table(variant):
    pe.seq_len_cached = 0                                   # the cache is made anew
    with original.on_device(moeut, "cpu"), original.float32_parts(moeut, model, variant), \
        torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
      model(tokens)
    return pe.cos_cached

  assert table(shared.parse_variant("original")).dtype == torch.bfloat16
  got = table(shared.parse_variant("original+float32_rope_table"))
  monkeypatch.setattr(torch, "einsum", einsum)
  assert "get" not in vars(pe)
  want = pe.get(torch.zeros(1, 1, tokens.shape[1] + 5, pe.inv_freq.shape[0] * 2))[1]
  assert got.dtype == torch.float32
  torch.testing.assert_close(got, want[..., :tokens.shape[1], :], rtol=0, atol=0)
  import jax.numpy as jnp  # noqa: PLC0415
  setup = shared.Setup.__new__(shared.Setup)
  for field, value in dict(dtype="bfloat16", model=dict(d_model=32, n_layers=2, n_heads=2,
                           ff_n_experts=8, att_n_experts=3, d_head=8, ff_k=3, group_size=2),
                           original_path="", scan_unroll=None).items():
    object.__setattr__(setup, field, value)
  assert build_model(setup, shared.parse_variant("jax+original_rope")).rope_table_dtype == \
      jnp.bfloat16
  assert build_model(setup, shared.parse_variant("jax")).rope_table_dtype == jnp.float32
