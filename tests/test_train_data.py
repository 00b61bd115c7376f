"""Unit tests of the training pipeline's parts that need no model: data, tokenizer, schedule,
sharding rules."""
from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

# The data pipeline needs Grain (a dependency that GPU machines may lack): skip without it.
pytest.importorskip("grain")

# pylint: disable=wrong-import-position
from moeut_jax.training import Config, DataError
from moeut_jax.training import data as data_lib, optim, sharding as sharding_lib
from moeut_jax.training import tokenizer as tokenizer_lib

CODE = "def f(x):\n    return x + 12345\n\n\nclass A:\n\tpass  # done\n"


def test_jsonl_text_and_folders(tmp_path):
  (tmp_path / "d").mkdir()
  (tmp_path / "d" / "a.txt").write_text("alpha")
  (tmp_path / "d" / "b.jsonl").write_text(json.dumps({"body": "beta"}) + "\n\n" +
                                          json.dumps({"body": "gamma"}) + "\n")
  with gzip.open(tmp_path / "d" / "c.jsonl.gz", "wt") as f:
    f.write(json.dumps({"body": "delta"}) + "\n")
  (tmp_path / "d" / "image.png").write_bytes(b"\x89PNG")
  kind, files = data_lib.resolve_sources([str(tmp_path / "d")])
  assert kind == "text" and len(files) == 3
  assert data_lib.read_documents(files, "body") == ["alpha", "beta", "gamma", "delta"]
  with pytest.raises(DataError, match=r"b.jsonl:1 has no field 'text'"):
    data_lib.read_documents(files, "text")
  (tmp_path / "bad.jsonl").write_text("{not json\n")
  with pytest.raises(DataError, match=r"bad.jsonl:1 is not valid JSON"):
    data_lib.read_documents([str(tmp_path / "bad.jsonl")], "text")
  np.save(tmp_path / "d" / "t.npy", np.arange(5))
  with pytest.raises(DataError, match="cannot mix"):
    data_lib.resolve_sources([str(tmp_path / "d")])


def test_default_sources_are_the_standard_library():
  files = data_lib.default_sources()
  assert len(files) > 100
  assert all(f.endswith(".py") and "site-packages" not in f for f in files)


def test_token_stream_reads_across_files(tmp_path):
  np.save(tmp_path / "a.npy", np.arange(0, 10, dtype=np.uint16))
  np.arange(10, 25, dtype=np.uint32).tofile(tmp_path / "b.bin")
  config = Config.for_profile(data=(str(tmp_path / "a.npy"), str(tmp_path / "b.bin")),
                              token_dtype="uint32", seq_len=4, vocab_size=100,
                              eval_fraction=0.2)
  d = data_lib.prepare(config, str(tmp_path / "w"))
  assert (len(d.train), len(d.valid)) == (20, 5)
  np.testing.assert_array_equal(d.train.read(7, 13), np.arange(7, 13))
  np.testing.assert_array_equal(d.valid.read(0, 100), np.arange(20, 25))
  assert d.tokenizer is None and d.vocab_size == 100


def test_train_iterator_resumes_and_shards_by_process(tmp_path):
  stream = data_lib.TokenStream([np.arange(1000, dtype=np.uint16)])
  config = Config.for_profile(seq_len=8, batch_size=8, grad_accum=2, seed=3)
  it = data_lib.train_iterator(stream, config)
  batches = [next(it) for _ in range(40)]                  # beyond one epoch (124 windows)
  assert batches[0].shape == (2, 4, 9)
  for b in batches:  # Each row is a window of consecutive tokens starting at a multiple of T.
    np.testing.assert_array_equal(b[..., 1:] - b[..., :-1], 1)
    assert np.all(b[..., 0] % 8 == 0)
  state = json.loads(json.dumps(it.get_state()))           # as stored in a checkpoint
  later = [next(it) for _ in range(3)]
  again = data_lib.train_iterator(stream, config)
  again.set_state(state)
  for a, b in zip(later, [next(again) for _ in range(3)]):
    np.testing.assert_array_equal(a, b)
  halves = [next(data_lib.train_iterator(stream, config, p, 2)) for p in (0, 1)]
  np.testing.assert_array_equal(np.concatenate(halves, axis=1), batches[0])
  # The first epoch visits every window once.
  starts = np.concatenate([b[..., 0].ravel() for b in batches])[:124]
  assert sorted(starts.tolist()) == list(range(0, 124 * 8, 8))


def test_eval_batches_cover_the_stream_once(tmp_path):
  stream = data_lib.TokenStream([np.arange(50, dtype=np.uint16)])
  batches = list(data_lib.eval_batches(stream, seq_len=8, rows=4, max_batches=None))
  weights = sum(w.sum() for _, w in batches)
  assert weights == 49  # every token but the first is predicted once
  targets = np.concatenate([t[:, 1:][w > 0] for t, w in batches])
  np.testing.assert_array_equal(np.sort(targets), np.arange(1, 50))


def test_tokenizer_round_trips_code_and_splits_digits(tmp_path):
  text = (CODE * 3 + "The quick brown fox jumps over the lazy dog 0123456789.\n") * 40
  tok = tokenizer_lib.train_tokenizer([text], str(tmp_path / "t.model"), vocab_size=400,
                                      max_chars=10**6)
  assert tok.vocab_size == 400
  ids = tok.encode([CODE])[0]
  assert tok.decode(ids) == CODE
  pieces = [tok._sp.id_to_piece(i) for i in ids]  # pylint: disable=protected-access
  assert "1" in pieces and "12" not in pieces and "\n" in pieces
  stream = tok.encode_documents(["ab", "cd"])
  assert (stream == tokenizer_lib.EOS_ID).sum() == 2 and stream[-1] == tokenizer_lib.EOS_ID
  with pytest.raises(tokenizer_lib.TokenizerError, match="is not a SentencePiece model"):
    (tmp_path / "junk.model").write_bytes(b"junk")
    tokenizer_lib.Tokenizer(str(tmp_path / "junk.model"))


def test_learning_rate_schedule():
  config = Config.for_profile(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
  lr = optim.learning_rate(config)
  assert float(lr(0)) == pytest.approx(0.1)
  assert float(lr(9)) == pytest.approx(1.0)
  assert float(lr(10)) == pytest.approx(1.0)
  assert float(lr(55)) == pytest.approx(0.55)
  assert float(lr(100)) == pytest.approx(0.1)
  no_warmup = optim.learning_rate(Config.for_profile("MoEUT_44M", steps=100, lr=1.0))
  assert float(no_warmup(0)) == pytest.approx(1.0)


@pytest.mark.parametrize("shape, n, expected", [
    ((4000, 128), 8, ("data", None)),
    ((128, 4000), 8, (None, "data")),
    ((7, 4001), 8, ()),            # nothing divides: replicated
    ((64,), 8, ()),                # small: replicated
    ((4000, 128), 1, ()),
])
def test_fsdp_spec(shape, n, expected):
  assert tuple(sharding_lib.fsdp_spec(shape, n)) == expected


def test_metrics_without_tensorboardx_keep_the_jsonl(tmp_path, monkeypatch):
  import json
  import sys
  from moeut_jax.training import metrics as metrics_lib
  monkeypatch.setitem(sys.modules, "tensorboardX", None)          # import raises ImportError
  said = []
  logger = metrics_lib.MetricsLogger(str(tmp_path), 10, 0, True, False, log=said.append)
  logger.write(1, "train", {"loss": 2.5, "tokens_per_s": 10.0})
  logger.close()
  assert any("tensorboardX is not installed" in s for s in said)
  records = [json.loads(line) for line in open(tmp_path / metrics_lib.JSONL)]
  assert records == [{"step": 1, "split": "train", "loss": 2.5, "tokens_per_s": 10.0}]
  assert not (tmp_path / "tensorboard").exists()


def test_one_document_is_counted_in_the_singular(tmp_path):
  (tmp_path / "a.txt").write_text((CODE * 3 + "The quick brown fox 0123456789.\n") * 200)
  config = Config.for_profile(data=(str(tmp_path / "a.txt"),), vocab_size=320, seq_len=8,
                              tokenizer_train_chars=10**6)
  said = []
  data_lib.prepare(config, str(tmp_path / "w"), log=said.append)
  assert any(s.startswith("Tokenizing 1 document (") for s in said), said


def test_resume_differences_name_the_built_in_data():
  from moeut_jax.training.config import resume_differences  # noqa: PLC0415
  saved = Config.for_profile().to_saved_dict()
  assert resume_differences(saved, Config.for_profile(data=("corpus",))) == [
      "data: the built-in standard-library data (checkpoint) != ['corpus'] (now)"]
  assert "stop_at_step" not in Config.for_profile(stop_at_step=5).to_saved_dict()


def test_text_that_looks_binary_is_refused_unless_allowed(tmp_path):
  exe = tmp_path / "program.txt"                   # an executable saved as .txt
  exe.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 8)
  with pytest.raises(DataError, match=r"'.*program.txt' does not look like text: it holds NUL "
                     r"bytes \(the first at byte 7 of 2,056\).*--allow-binary-text"):
    data_lib.read_documents([str(exe)], "text")
  noise = tmp_path / "noise.txt"                   # no NUL, but mostly not UTF-8
  noise.write_bytes(b"abc " + bytes(range(128, 256)) * 4)
  with pytest.raises(DataError, match=r"noise.txt' does not look like text: 512 of its 516 bytes "
                     r"\(99%\) are not UTF-8 \(more than 5%\)"):
    data_lib.read_documents([str(noise)], "text")
  assert len(data_lib.read_documents([str(exe), str(noise)], "text", allow_binary=True)) == 2
  # Text with a few stray bytes (Latin-1 accents) or a written U+FFFD is text.
  latin = tmp_path / "latin.txt"
  latin.write_bytes("We met at the café on the corner and talked until it closed. "
                    .encode("latin-1") * 20)
  replacement = tmp_path / "replacement.txt"
  replacement.write_text("\ufffd" * 50 + " decoded before")
  docs = data_lib.read_documents([str(latin), str(replacement)], "text")
  assert len(docs) == 2 and docs[1].startswith("\ufffd" * 50)
