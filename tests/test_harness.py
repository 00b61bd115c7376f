"""The lm-evaluation-harness model ``moeut-jax`` (moeut_jax/evaluation) on a tiny model that
train.py trained for two steps (CPU, offline: the tasks read local JSON Lines files)."""
from __future__ import annotations

import functools
import json
import os
import sysconfig
import textwrap

# The harness's datasets library must not try the network (CI has none); set before it loads.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import pytest  # pylint: disable=wrong-import-position

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("grain")            # train.py's data pipeline (train_and_evaluate)

# pylint: disable=wrong-import-position
import train as train_cli
from lm_eval.api.instance import Instance
from moeut_jax import generate
from moeut_jax.evaluation import harness, scoring
from moeut_jax.training import Config, evaluate_checkpoint, train_and_evaluate

MINI = dict(d_model=32, n_layers=2, group_size=1, n_heads=2, ff_n_experts=4, ff_expert_size=16,
            att_n_experts=2, d_head=16, ff_k=2, att_k=1)
T = 32  # seq_len: the model's context


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> str:
  """A train.py run: 2 steps on a few modules of Python's standard library."""
  corpus = tmp_path_factory.mktemp("corpus")
  stdlib = sysconfig.get_paths()["stdlib"]
  for name in ("textwrap.py", "argparse.py", "string.py", "bisect.py"):
    with open(os.path.join(stdlib, name)) as f, open(corpus / (name + ".txt"), "w") as g:
      g.write(f.read())
  config = Config.for_profile(
      "MoEUT_tiny", **MINI, data=(str(corpus),), vocab_size=512, tokenizer_train_chars=300_000,
      steps=2, batch_size=8, seq_len=T, lr=1e-2, warmup_steps=0, checkpoint_every=2,
      eval_every=2, eval_batches=1, progress_bar=False, sample_tokens=0)
  out = str(tmp_path_factory.mktemp("run"))
  train_and_evaluate(config, out, log=lambda *_: None)
  return out


@pytest.fixture(scope="module")
def lm(workdir):
  return harness.MoEUTHarnessLM(workdir=workdir, batch_size=4)


@pytest.fixture(scope="module")
def text_ids(lm) -> list[int]:
  with open(os.path.join(sysconfig.get_paths()["stdlib"], "heapq.py")) as f:
    return lm.tok_encode(f.read())


@functools.partial(jax.jit, static_argnums=0)
def _logits(model, params, tokens):
  """The model's logits, compiled once per input length (eager calls compile again)."""
  return model.apply({"params": params}, tokens).outputs


def direct_logprob(lm, context, continuation) -> tuple[float, bool]:
  """One unpadded forward pass over the last T + 1 tokens, as the harness's HF model."""
  seq = np.asarray(list(context) + list(continuation))[-(T + 1):]
  logits = _logits(lm.model, lm.params, jnp.asarray(seq[None, :-1]))[0]
  logp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1))   # [n, V]
  n = len(continuation)
  targets = seq[1:][-n:]
  picked = logp[-n:][np.arange(n), targets]
  return float(picked.sum()), bool(np.all(logp[-n:].argmax(-1) == targets))


# Row lengths (inputs: context + continuation - 1, at most T) from 1 to T across both
# buckets (16, 32), in batches of 4: short rows padded far, rows exactly a bucket long,
# rows cut from the left (context longer than T), a continuation of the whole context.
PAIRS = [(1, 1), (5, 3), (12, 5), (14, 6), (30, 2), (40, 5), (3, 32), (16, 1), (10, 7)]


def test_loglikelihood_equals_direct_forward(lm, text_ids):
  requests, start = [], 0
  for n_ctx, n_cont in PAIRS:
    requests.append((text_ids[start:start + n_ctx],
                     text_ids[start + n_ctx:start + n_ctx + n_cont]))
    start += 7
  tokenized = [(None, c, t) for c, t in requests]
  got = lm._loglikelihood_tokens(tokenized)  # pylint: disable=protected-access
  for (c, t), (logp, greedy) in zip(requests, got):
    want_logp, want_greedy = direct_logprob(lm, c, t)
    np.testing.assert_allclose(logp, want_logp, rtol=1e-5, atol=1e-4)
    assert greedy == want_greedy
  # Batches of similar length, in the few compiled shapes only.
  shapes = [tokens.shape for _, tokens, _, _ in lm.scorer.batches(requests)]
  assert shapes == [(4, 32), (4, 16), (4, 16)]   # 32 32 31 19 | 16 16 16 7 | 1
  assert scoring.bucket_lengths(T) == (16, 32)


def test_loglikelihood_of_text_splits_context_and_continuation(lm):
  pairs = [("def add(a, b):\n    return", " a + b"), ("", "import os"),
           ("for i in range(10):", "\n    print(i)")]
  got = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)])
  for (ctx, cont), (logp, greedy) in zip(pairs, got):
    ctx_ids = lm.tok_encode(ctx) if ctx else [lm.eot_token_id]
    cont_ids = (lm.tok_encode(ctx + cont)[len(ctx_ids):] if ctx else lm.tok_encode(cont))
    want = direct_logprob(lm, ctx_ids, cont_ids)
    np.testing.assert_allclose(logp, want[0], rtol=1e-5, atol=1e-4)
    assert greedy == want[1]


def test_bad_requests_raise(lm):
  with pytest.raises(ValueError, match="continuation of 33 tokens"):
    lm.scorer.score([([1], [2] * 33)])
  with pytest.raises(ValueError, match="token ids must be in"):
    lm.scorer.score([([1], [lm.model.n_tokens])])
  with pytest.raises(ValueError, match="does not support the generation settings"):
    lm.generate_until([Instance("generate_until", {}, ("def", {"top_p": 0.9}), 0)])
  with pytest.raises(ValueError, match="does not take"):
    harness.MoEUTHarnessLM.create_from_arg_string("workdir=x", {"device": "cuda"})


def _text_of(lm, ids: list[int], n: int) -> str:
  """A prefix of the text of ``ids`` that encodes to exactly ``n`` tokens."""
  for extra in range(0, 40):
    text = lm.tok_decode(ids[:n + extra])
    for cut in range(len(text), 0, -1):
      if len(lm.tok_encode(text[:cut])) == n:
        return text[:cut]
  raise AssertionError(f"no prefix encodes to {n} tokens")


def test_rolling_loglikelihood_equals_train_py_eval_perplexity(lm, workdir, text_ids, tmp_path):
  # train.py eval predicts every token of a stream but the first, from windows of T inputs
  # starting at multiples of T. The harness predicts every token of a text from the
  # end-of-document token before it, in windows of T; both agree on [eos] + text when the
  # text is a whole number of windows (the harness gives a last partial window more
  # context; see the next test).
  text = _text_of(lm, text_ids, 3 * T)
  ids = lm.tok_encode(text)
  assert len(ids) == 3 * T
  path = str(tmp_path / "text.npy")
  np.save(path, np.asarray([lm.eot_token_id] + ids, np.int32))
  ppl = evaluate_checkpoint(workdir, [path])
  assert ppl["tokens"] == 3 * T
  [rolling] = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
  np.testing.assert_allclose(-rolling / (3 * T), ppl["loss"], rtol=1e-5)
  np.testing.assert_allclose(np.exp(-rolling / (3 * T)), ppl["perplexity"], rtol=1e-4)


def test_rolling_loglikelihood_windows(lm, text_ids):
  """2T + 5 tokens: two full windows, then the last 5 tokens after a full context."""
  text = _text_of(lm, text_ids, 2 * T + 5)
  ids = lm.tok_encode(text)
  want = (direct_logprob(lm, [lm.eot_token_id], ids[:T])[0]
          + direct_logprob(lm, ids[T - 1:T], ids[T:2 * T])[0]
          + direct_logprob(lm, ids[T + 4:2 * T], ids[2 * T:])[0])
  [rolling] = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
  np.testing.assert_allclose(rolling, want, rtol=1e-5)


def test_generate_until_equals_single_prompt_generation(lm):
  with open(os.path.join(sysconfig.get_paths()["stdlib"], "bisect.py")) as f:
    source = f.read()
  # Prompts of different lengths; the longest keep their last T - 6 tokens (the harness's
  # rule: prompt and generated tokens fit the context).
  texts = [source[:n] for n in (5, 60, 31, 2, 44)]
  assert max(len(lm.tok_encode(t)) for t in texts) > T - 6
  settings = {"until": [], "max_gen_toks": 6, "do_sample": False}
  got = lm.generate_until([Instance("generate_until", {}, (t, dict(settings)), i)
                           for i, t in enumerate(texts)])
  for text, out in zip(texts, got):
    prompt = lm.tok_encode(text)[-(T - 6):]
    full = np.asarray(generate(lm.model, {"params": lm.params}, jnp.asarray([prompt]), 6))
    new = full[0, len(prompt):].tolist()
    if lm.eot_token_id in new:
      new = new[:new.index(lm.eot_token_id)]
    assert out == lm.tok_decode(new)
  # A stop string ends the text before it.
  stop = next(o[1:3] for o in got if len(o) > 3)
  cut = lm.generate_until([Instance("generate_until", {}, (t, dict(settings, until=[stop])), i)
                           for i, t in enumerate(texts)])
  assert cut == [o[:o.index(stop)] if stop in o else o for o in got]


CHOICE_DOCS = [
    dict(question="def add(a, b):\n    return", choices=["a + b", "}", "import"], label=0),
    dict(question="import", choices=["os", "return", ")"], label=0),
    dict(question="for i in", choices=["range(10):", "else", "= 3"], label=0),
    dict(question="class Foo", choices=["(object):", "123", "if"], label=0),
    dict(question="if x is", choices=["None:", "def", "import"], label=0),
]
ROLLING_DOCS = [dict(text="def main():\n    print('hello world')\n" * 4),
                dict(text="import os\nimport sys\n")]


def _write_tasks(folder) -> None:
  for name, docs in (("choice", CHOICE_DOCS), ("rolling", ROLLING_DOCS)):
    with open(folder / f"{name}.jsonl", "w") as f:
      f.writelines(json.dumps(d) + "\n" for d in docs)
  common = f"dataset_path: json\ntest_split: test\nmetadata:\n  version: 1.0\n"
  (folder / "tiny_choice.yaml").write_text(textwrap.dedent(f"""\
      task: tiny_choice
      dataset_kwargs:
        data_files:
          test: {folder / 'choice.jsonl'}
      output_type: multiple_choice
      doc_to_text: "{{{{question}}}}"
      doc_to_choice: "{{{{choices}}}}"
      doc_to_target: "{{{{label}}}}"
      target_delimiter: " "
      metric_list:
        - metric: acc
          aggregation: mean
          higher_is_better: true
      """) + common)
  (folder / "tiny_rolling.yaml").write_text(textwrap.dedent(f"""\
      task: tiny_rolling
      dataset_kwargs:
        data_files:
          test: {folder / 'rolling.jsonl'}
      output_type: loglikelihood_rolling
      doc_to_text: ""
      doc_to_target: "{{{{text}}}}"
      metric_list:
        - metric: byte_perplexity
      """) + common)


def test_train_py_eval_runs_the_harness_on_a_local_task(lm, workdir, tmp_path, capsys):
  _write_tasks(tmp_path)
  rc = train_cli.main(["eval", "--workdir", workdir, "--tasks", "tiny_choice,tiny_rolling",
                       "--include-path", str(tmp_path), "--batch-size", "4", "--jax-cache", ""])
  assert rc == 0
  printed = capsys.readouterr().out
  assert "tiny_choice" in printed and "byte_perplexity" in printed
  [json_path] = [os.path.join(workdir, "harness", f) for f in os.listdir(
      os.path.join(workdir, "harness")) if f.endswith(".json")]
  with open(json_path) as f:
    results = json.load(f)["results"]
  assert os.path.exists(json_path[:-len(".json")] + ".md")
  # The harness's numbers are the adapter's scores: accuracy from the choices' log-likelihoods
  # (the continuation is " " + choice), byte perplexity from the rolling log-likelihoods.
  correct = []
  for doc in CHOICE_DOCS:
    lls = lm.loglikelihood([Instance("loglikelihood", {}, (doc["question"], " " + c), 0)
                            for c in doc["choices"]])
    correct.append(int(np.argmax([ll for ll, _ in lls])) == doc["label"])
  assert results["tiny_choice"]["acc,none"] == pytest.approx(np.mean(correct))
  rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (d["text"],), 0)
                                      for d in ROLLING_DOCS])
  n_bytes = sum(len(d["text"].encode()) for d in ROLLING_DOCS)
  assert results["tiny_rolling"]["byte_perplexity,none"] == pytest.approx(
      np.exp(-sum(rolling) / n_bytes), rel=1e-5)


def test_unknown_task_is_refused(workdir):
  with pytest.raises(ValueError, match="unknown tasks"):
    from moeut_jax.evaluation.run import evaluate_tasks  # pylint: disable=import-outside-toplevel
    evaluate_tasks(workdir, ["no_such_task_xyz"])


def test_importing_moeut_jax_does_not_import_lm_eval():
  import subprocess, sys  # pylint: disable=import-outside-toplevel,multiple-imports
  code = ("import sys, moeut_jax, moeut_jax.evaluation, moeut_jax.training; "
          "assert 'lm_eval' not in sys.modules, 'lm_eval imported'")
  subprocess.run([sys.executable, "-c", code], check=True,
                 cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
