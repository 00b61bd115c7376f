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
  summary = json.loads((out / "summary.json").read_text())
  assert summary["original_spread"] <= TOL * summary["original_mean"]
  assert [r["label"] for r in summary["rows"]] == list(runs)
  assert (out / "side_by_side.png").stat().st_size > 10_000
  assert "Held-out loss after the last step" in printed and "original mean:" in printed


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
