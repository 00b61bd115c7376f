"""End-to-end tests of train.py's pipeline on a very small model (CPU).

Compiling the model dominates; a persistent compilation cache (module fixture) lets runs with
identical shapes share their executables, including the 8-device subprocess.
"""
from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import subprocess
import sys
import sysconfig
import textwrap

import jax
import numpy as np
import pytest

# The data pipeline needs Grain (a dependency that GPU machines may lack): skip without it.
pytest.importorskip("grain")

# pylint: disable=wrong-import-position
from moeut_jax.training import (CheckpointError, Config, DataError, NonFiniteLossError,
                                TokenizerError, evaluate_checkpoint,
                                sample_from_checkpoint, train_and_evaluate)
from moeut_jax.training import checkpoint as checkpoint_lib, metrics as metrics_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MINI = dict(d_model=32, n_layers=2, group_size=1, n_heads=2, ff_n_experts=4, ff_expert_size=16,
            att_n_experts=2, d_head=16, ff_k=2, att_k=1)
QUIET = dict(progress_bar=False, sample_tokens=0, async_checkpoint=True)


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  cache = str(tmp_path_factory.mktemp("xla_cache"))
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  old = {n: getattr(jax.config, n) for n in names}
  jax.config.update(names[0], cache)
  jax.config.update(names[1], 0.0)
  jax.config.update(names[2], 0)
  yield cache
  for n, v in old.items():
    jax.config.update(n, v)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
  """A folder of real text: a few modules of Python's standard library."""
  d = tmp_path_factory.mktemp("corpus")
  stdlib = sysconfig.get_paths()["stdlib"]
  for name in ("textwrap.py", "argparse.py", "string.py", "bisect.py", "heapq.py"):
    with open(os.path.join(stdlib, name)) as f, open(d / (name + ".txt"), "w") as g:
      g.write(f.read())
  return str(d)


def tiny_config(corpus, **kw) -> Config:
  base = dict(MINI, data=(corpus,), vocab_size=512, tokenizer_train_chars=400_000, steps=24,
              batch_size=16, seq_len=32, lr=1e-2, warmup_steps=2, grad_clip=1.0,
              checkpoint_every=12, eval_every=24, eval_batches=2, log_every=4, **QUIET)
  base.update(kw)
  return Config.for_profile("MoEUT_tiny", **base)


@pytest.fixture(scope="module")
def tiny_run(corpus, tmp_path_factory):
  """One uninterrupted run that the other tests compare with (and reuse the executables of).

  Dropout and gradient accumulation make the RNG and the micro-batch layout matter."""
  workdir = str(tmp_path_factory.mktemp("tiny_run"))
  config = tiny_config(corpus, sample_tokens=6, temperature=0.0, log_every=1, grad_accum=2,
                       dropout=0.1)
  return config, workdir, train_and_evaluate(config, workdir, log=lambda *_: None)


# ---------------------------------------------------------------------------------------------
# Training works.

def test_loss_decreases_and_outputs_are_written(tiny_run):
  config, workdir, out = tiny_run
  losses = [out["train_losses"][s] for s in sorted(out["train_losses"])]
  assert len(losses) == config.steps
  assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 1.0, losses
  assert math.isfinite(out["valid"]["loss"])
  assert out["valid"]["perplexity"] < config.vocab_size
  assert out["sample"].startswith("def")
  records = metrics_lib.read_jsonl(workdir)
  assert [r["step"] for r in records if r["split"] == "train"] == sorted(out["train_losses"])
  assert any(r["split"] == "valid" for r in records)
  assert glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
  assert os.path.getsize(os.path.join(workdir, metrics_lib.PNG)) > 1000
  steps = sorted(int(p) for p in os.listdir(os.path.join(workdir, "checkpoints"))
                 if p.isdigit())
  assert steps == [12, 24]


def test_eval_and_sample_commands_reproduce_the_run(tiny_run):
  config, workdir, out = tiny_run
  ev = evaluate_checkpoint(workdir, max_batches=config.eval_batches)
  assert ev["step"] == config.steps
  assert ev["loss"] == pytest.approx(out["valid"]["loss"], rel=1e-6)
  text = sample_from_checkpoint(workdir, config.sample_prompt, config.sample_tokens,
                                temperature=0.0, top_k=None, seed=config.seed)
  assert text == out["sample"]
  other = evaluate_checkpoint(workdir, data=[os.path.join(config.data[0], "heapq.py.txt")])
  assert math.isfinite(other["loss"]) and other["tokens"] > 100


def test_stop_and_resume_equals_uninterrupted_run_bitwise(tiny_run, tmp_path):
  config, _, whole = tiny_run
  workdir = str(tmp_path / "split")
  first = train_and_evaluate(config.replace(stop_at_step=10), workdir, log=lambda *_: None)
  assert first["stopped_early"] and first["step"] == 10
  # --stop-at-step belongs to one invocation: the same command without it trains on.
  with open(os.path.join(workdir, "config.json")) as f:
    assert "stop_at_step" not in json.load(f)
  sys.path.insert(0, ROOT)
  import train  # pylint: disable=import-outside-toplevel
  rerun = train.config_from_args(train.make_parser().parse_args(["--workdir", workdir]))
  assert rerun.stop_at_step is None and rerun.steps == config.steps
  said = []
  again = train_and_evaluate(config.replace(stop_at_step=10), workdir, log=said.append)
  assert again["train_losses"] == {} and again["step"] == 10
  assert said == [again["nothing_trained"]]
  assert said[0].startswith(f"Nothing to train: the checkpoint {workdir}/checkpoints/10 is at "
                            "step 10, not before --stop-at-step 10.")
  second = train_and_evaluate(config, workdir, log=lambda *_: None)
  assert second["start_step"] == 10 and second["step"] == config.steps
  resumed = {**first["train_losses"], **second["train_losses"]}
  assert sorted(resumed) == list(range(1, config.steps + 1))
  assert resumed == whole["train_losses"]  # Exact float equality.
  assert second["valid"]["loss"] == whole["valid"]["loss"]
  assert second["sample"] == whole["sample"]
  # The metrics file of the resumed run has each step once.
  steps = [r["step"] for r in metrics_lib.read_jsonl(workdir, "train")]
  assert steps == list(range(1, config.steps + 1))


EIGHT_DEVICES = textwrap.dedent("""
    import json, sys
    import jax
    sys.path.insert(0, {root!r})
    assert len(jax.devices()) == 8, jax.devices()
    from moeut_jax.training import Config, TrainingError, train_and_evaluate
    config = Config.from_dict(json.loads({config!r}))
    try:  # 12 sequences do not divide over 8 devices.
      train_and_evaluate(config.replace(batch_size=12), {bad_workdir!r}, log=lambda *_: None)
      print("NO ERROR")
    except TrainingError as e:
      print("ERROR:", e)
    import os
    print("CHECKPOINTS LEFT:", os.path.exists(os.path.join({bad_workdir!r}, "checkpoints")))
    out = train_and_evaluate(config, {workdir!r}, log=lambda *_: None)
    print("LOSSES:", json.dumps(out["train_losses"]))
    print("VALID:", out["valid"]["loss"])
""")


def test_eight_cpu_devices_match_one_device(tiny_run, compilation_cache, tmp_path):
  config, _, out = tiny_run
  config = config.replace(sample_tokens=0)  # Sampling is tested elsewhere.
  script = EIGHT_DEVICES.format(root=ROOT, config=json.dumps(config.to_dict()),
                                workdir=str(tmp_path / "eight"),
                                bad_workdir=str(tmp_path / "bad"))
  env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "")
             + " --xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=compilation_cache,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                        text=True, timeout=400, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = dict(l.split(": ", 1) for l in proc.stdout.splitlines() if ": " in l)
  assert "do not divide over 8 devices" in lines["ERROR"]
  assert lines["CHECKPOINTS LEFT"] == "False"   # no empty checkpoints folder (the token
                                                 # cache it built stays, for the next try)
  eight = {int(k): v for k, v in json.loads(lines["LOSSES"]).items()}
  assert sorted(eight) == sorted(out["train_losses"])
  for step, loss in out["train_losses"].items():
    assert eight[step] == pytest.approx(loss, rel=2e-4, abs=2e-4), step
  assert float(lines["VALID"]) == pytest.approx(out["valid"]["loss"], rel=2e-4)


# ---------------------------------------------------------------------------------------------
# Bad input: clear messages, nothing lost.

def test_missing_data(tmp_path):
  with pytest.raises(DataError, match="does not exist"):
    train_and_evaluate(Config.for_profile(data=[str(tmp_path / "nope.txt")], **QUIET),
                       str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")    # no empty workdir or checkpoints/ left


def test_binary_data_is_refused_before_anything_is_written(tmp_path):
  with open(sys.executable, "rb") as f:            # a copy of an executable as .txt
    (tmp_path / "python.txt").write_bytes(f.read(1 << 16))
  with pytest.raises(DataError, match=r"python.txt' does not look like text: it holds NUL "
                     r"bytes"):
    train_and_evaluate(Config.for_profile(data=[str(tmp_path / "python.txt")], **QUIET),
                       str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")


def test_rerunning_a_finished_run_trains_evaluates_and_writes_nothing(tiny_run, tmp_path):
  import shutil  # pylint: disable=import-outside-toplevel
  config, workdir, _ = tiny_run
  copy = str(tmp_path / "copy")
  shutil.copytree(workdir, copy)
  before = _hash_tree(copy)
  said = []
  out = train_and_evaluate(config, copy, log=said.append)
  assert said == [out["nothing_trained"]]
  assert said[0] == (f"Nothing to train: the checkpoint {copy}/checkpoints/24 is at step 24 and "
                     "--steps is 24: the run is finished. Give a larger --steps to train "
                     "further; train.py eval and train.py sample read its checkpoints")
  assert (out["step"], out["train_losses"], out["valid"]) == (24, {}, None)
  assert _hash_tree(copy) == before            # no second held-out line, no new event file


def test_resuming_with_more_steps_says_that_the_schedule_changes(tiny_run, tmp_path):
  import shutil  # pylint: disable=import-outside-toplevel
  from moeut_jax.training import optim  # pylint: disable=import-outside-toplevel
  config, workdir, _ = tiny_run
  copy = str(tmp_path / "copy")
  shutil.copytree(workdir, copy)
  said = []
  out = train_and_evaluate(config.replace(steps=26, sample_tokens=0), copy, log=said.append)
  assert out["start_step"] == 24 and out["step"] == 26
  old = float(optim.learning_rate(config)(24))
  new = float(optim.learning_rate(config.replace(steps=26))(24))
  assert new > old                             # the cosine decay goes back up
  assert (f"Note: the learning-rate schedule changes on resuming (--steps 24 -> 26): the "
          f"learning rate of step 25 is {new:.3g} instead of {old:.3g}") in said
  valid_steps = [r["step"] for r in metrics_lib.read_jsonl(copy, "valid")]
  assert valid_steps == [24, 26]


@pytest.mark.parametrize("content", ["", "{}\n", '{"text": ""}\n'])
def test_empty_data(tmp_path, content):
  name = "data.jsonl" if content else "data.txt"
  (tmp_path / name).write_text(content)
  expected = "no field 'text'" if content == "{}\n" else "empty"
  with pytest.raises(DataError, match=expected):
    train_and_evaluate(Config.for_profile(data=[str(tmp_path / name)], **QUIET),
                       str(tmp_path / "run"))


def test_empty_folder(tmp_path):
  (tmp_path / "d").mkdir()
  with pytest.raises(DataError, match="no usable files"):
    train_and_evaluate(Config.for_profile(data=[str(tmp_path / "d")], **QUIET),
                       str(tmp_path / "run"))


def test_too_little_data(tmp_path):
  np.save(tmp_path / "a.npy", np.arange(100, dtype=np.uint16))
  with pytest.raises(DataError, match="has only 100 tokens: too few for seq_len=128"):
    train_and_evaluate(Config.for_profile(data=[str(tmp_path / "a.npy")], **QUIET),
                       str(tmp_path / "run"))


def test_tokenizer_vocabulary_must_match_the_model(tiny_run, tmp_path):
  config, workdir, _ = tiny_run
  tok = os.path.join(workdir, "data", "tokenizer.model")  # 512 pieces
  with pytest.raises(TokenizerError, match="has 512 pieces but --vocab-size has n_tokens=600"):
    train_and_evaluate(config.replace(tokenizer=tok, vocab_size=600), str(tmp_path / "run"))
  tokens = np.arange(1000, dtype=np.uint16) % 600
  np.save(tmp_path / "tokens.npy", tokens)
  with pytest.raises(TokenizerError, match="token id 599, outside the model's vocabulary"):
    train_and_evaluate(config.replace(data=(str(tmp_path / "tokens.npy"),)),
                       str(tmp_path / "run2"))


def _hash_tree(path: str) -> dict[str, str]:
  out = {}
  for p in sorted(glob.glob(os.path.join(path, "**"), recursive=True)):
    if os.path.isfile(p):
      with open(p, "rb") as f:
        out[os.path.relpath(p, path)] = hashlib.sha256(f.read()).hexdigest()
  return out


def test_incompatible_checkpoint_is_refused_and_kept(tiny_run):
  config, workdir, _ = tiny_run
  before = _hash_tree(os.path.join(workdir, "checkpoints"))
  with pytest.raises(CheckpointError, match=r"d_model: 32 \(checkpoint\) != 48 \(now\)"):
    train_and_evaluate(config.replace(d_model=48, steps=30), workdir)
  with pytest.raises(CheckpointError, match="seq_len: 32"):
    train_and_evaluate(config.replace(seq_len=64, steps=30), workdir)
  assert _hash_tree(os.path.join(workdir, "checkpoints")) == before


def _corrupt_copy(workdir: str, copy: str) -> str:
  """A copy of ``workdir`` whose last checkpoint (24) has its array files truncated."""
  import shutil  # pylint: disable=import-outside-toplevel
  shutil.copytree(workdir, copy)
  data_files = [p for p in glob.glob(os.path.join(copy, "checkpoints", "24", "state", "**"),
                                     recursive=True)
                if os.path.isfile(p) and "/d/" in p]
  assert data_files
  for p in data_files:
    with open(p, "r+b") as f:
      f.truncate(7)
  return copy


def test_corrupt_checkpoint_is_reported_and_kept(tiny_run, tmp_path):
  config, workdir, _ = tiny_run
  copy = _corrupt_copy(workdir, str(tmp_path / "copy"))
  before = _hash_tree(os.path.join(copy, "checkpoints"))
  with pytest.raises(CheckpointError, match=r"cannot restore checkpoint .*24.*earlier one \(12\)"):
    train_and_evaluate(config.replace(steps=30), copy)
  assert _hash_tree(os.path.join(copy, "checkpoints")) == before


def _abandoned_reads_report():
  """What orbax's abandoned reads report after a failed restore, through the same channels:
  a coroutine whose cleanup meets the closed event loop (an unraisable exception), a task
  destroyed while pending, failed tasks nobody awaited (asyncio's log), one of them a
  deserialisation failing with TensorStore's error, and a failed future nobody awaited."""
  import asyncio  # pylint: disable=import-outside-toplevel
  import gc  # pylint: disable=import-outside-toplevel
  loop = asyncio.new_event_loop()

  async def _read_array_index_and_device_put():  # orbax's name for one array read
    try:
      await asyncio.sleep(3600)
    finally:
      loop.call_soon(lambda: None)                 # RuntimeError: Event loop is closed

  async def failed_read():
    try:
      raise ValueError("OUT_OF_RANGE: Error reading in OCDBT database")
    except ValueError as e:
      # pylint: disable-next=broad-exception-raised
      raise Exception("Encountered error while reading array index: (slice(0, 4, 1),). "
                      "See full TensorStore details: {...}") from e

  async def async_deserialize():  # orbax's name for one array's deserialisation
    raise ValueError('OUT_OF_RANGE: Error opening "cast" driver: Error reading "params/.zarray" '
                     "in OCDBT database [tensorstore_spec='{...}']")

  tasks = [loop.create_task(_read_array_index_and_device_put()), loop.create_task(failed_read()),
           loop.create_task(async_deserialize())]
  future = loop.create_future()         # a read's future that failed and was never awaited
  future.set_exception(ValueError('OUT_OF_RANGE: Error opening "cast" driver: Error reading '
                                  "\"params/.zarray\" in OCDBT database [tensorstore_spec='{...}']"))
  loop.run_until_complete(asyncio.sleep(0.01))
  loop.close()
  del tasks, future
  gc.collect()


def test_corrupt_checkpoint_silences_the_abandoned_reads(tiny_run, tmp_path, monkeypatch, caplog):
  """Only the one clear message: reports of the reads a failed restore left behind are
  dropped, other unraisable exceptions still reach the previous hook."""
  import logging  # pylint: disable=import-outside-toplevel
  config, workdir, _ = tiny_run
  copy = _corrupt_copy(workdir, str(tmp_path / "copy"))
  unraisable = []
  monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
  monkeypatch.setattr(logging.getLogger("asyncio"), "filters", [])  # as in a fresh process
  caplog.set_level(logging.ERROR, logger="asyncio")
  _abandoned_reads_report()                        # before: they do get through
  assert any(str(u.exc_value) == "Event loop is closed"
             and "_read_array_index_and_device_put" in repr(u.object) for u in unraisable)
  messages = [r.getMessage() for r in caplog.records if r.name == "asyncio"]
  assert any("destroyed but it is pending" in m for m in messages), messages
  assert any("exception was never retrieved" in m for m in messages), messages
  assert any("async_deserialize" in m for m in messages), messages
  assert any(m.startswith("Future exception was never retrieved") for m in messages), messages
  unraisable.clear()
  caplog.clear()
  with pytest.raises(CheckpointError, match="cannot restore checkpoint"):
    train_and_evaluate(config.replace(steps=30), copy, log=lambda *_: None)
  _abandoned_reads_report()                        # after the failed restore: silent
  assert unraisable == []
  assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == []
  sys.unraisablehook(type("U", (), dict(exc_value=RuntimeError("another"), object=None)))
  assert [str(u.exc_value) for u in unraisable] == ["another"]


def test_cli_corrupt_checkpoint_prints_one_message(tiny_run, compilation_cache, tmp_path):
  _, workdir, _ = tiny_run
  _corrupt_copy(workdir, str(tmp_path / "copy"))
  proc = _cli("--workdir", "copy", "--steps", "30", "--jax-cache", compilation_cache,
              cwd=tmp_path)
  assert proc.returncode == 1
  assert proc.stderr.splitlines() == [proc.stderr.strip()], proc.stderr[-3000:]
  assert proc.stderr.startswith("error: cannot restore checkpoint copy/checkpoints/24: it is "
                                "corrupt")
  assert "earlier one (12). Nothing was overwritten" in proc.stderr
  assert "TensorStore" not in proc.stderr


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_run, tmp_path,
                                                                  monkeypatch):
  config, _, _ = tiny_run
  workdir = str(tmp_path / "run")
  first = train_and_evaluate(config.replace(stop_at_step=4, checkpoint_every=2), workdir,
                             log=lambda *_: None)
  assert first["step"] == 4
  real_restore = checkpoint_lib.Checkpointer.restore_state

  def poisoned_restore(self, step, abstract):  # One NaN weight (of the unused <unk> token).
    state = real_restore(self, step, abstract)
    emb = state["params"]["embedding"]
    state["params"]["embedding"] = emb.at[0, 0].set(np.nan)
    return state

  monkeypatch.setattr(checkpoint_lib.Checkpointer, "restore_state", poisoned_restore)
  with pytest.raises(NonFiniteLossError,
                     match=r"non-finite param_norm at step 5 .*last good checkpoint is .*4 \(step 4\)"):
    train_and_evaluate(config.replace(checkpoint_every=2), workdir, log=lambda *_: None)
  steps = sorted(int(p) for p in os.listdir(os.path.join(workdir, "checkpoints"))
                 if p.isdigit())
  assert steps == [2, 4]  # Nothing after the last good step was written.


def test_settings_are_validated():
  with pytest.raises(ValueError, match="batch_size=10 is not divisible by grad_accum=4"):
    Config.for_profile(batch_size=10, grad_accum=4)
  with pytest.raises(ValueError, match=r"batch_size=0: it must be a positive integer$"):
    Config.for_profile(batch_size=0)
  with pytest.raises(ValueError, match=r"eval_fraction=1.0: it must be strictly between 0 and 1"):
    Config.for_profile(eval_fraction=1.0)
  with pytest.raises(ValueError, match=r"stop_at_step=0: it must be unset or a positive integer"):
    Config.for_profile(stop_at_step=0)
  with pytest.raises(ValueError, match="warmup_steps=50"):
    Config.for_profile(steps=50, warmup_steps=50)
  with pytest.raises(ValueError, match="unknown profile 'MoEUT_2T'"):
    Config.for_profile("MoEUT_2T")


# ---------------------------------------------------------------------------------------------
# The command line.

def _cli(*args, cwd):
  return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=cwd,
                        capture_output=True, text=True, timeout=120, check=False)


def test_cli_help_lists_the_flags(tmp_path):
  proc = _cli("--help", cwd=tmp_path)
  assert proc.returncode == 0
  for flag in ("--profile", "--data", "--workdir", "--steps", "--batch-size", "--seq-len",
               "--lr", "--seed", "--d-model", "--grad-accum", "eval", "sample"):
    assert flag in proc.stdout, flag
  assert "docs/semantics.md §9" in proc.stdout   # a document the repository ships


def test_cli_reports_bad_input_without_traceback(tmp_path):
  proc = _cli("--data", str(tmp_path / "missing"), "--workdir", str(tmp_path / "w"),
              cwd=tmp_path)
  assert proc.returncode == 1
  assert "error: data path" in proc.stderr and "does not exist" in proc.stderr
  assert "Traceback" not in proc.stderr
  proc = _cli("--batch-size", "10", "--grad-accum", "4", cwd=tmp_path)
  assert proc.returncode == 2 and "not divisible by grad_accum=4" in proc.stderr


def test_run_header_names_the_cvmm_kernels_and_their_sums(monkeypatch):
  """train.py's first line names the CVMM implementation and, for the Triton kernels in
  16-bit compute, the dtype of their sums; nothing for the pure-JAX implementation."""
  import kernels
  from moeut_jax.training import loop, step as step_lib

  def note(**kw):
    config = Config(**kw)
    return loop._cvmm_note(config, np.dtype(step_lib.compute_dtype(config)))

  assert note(cvmm_impl="xla") == ""
  assert note(cvmm_impl="xla", router_dtype="bfloat16") == ", bfloat16 routers"
  assert (note(cvmm_impl="xla", router_dtype="bfloat16", rope_table_dtype="bfloat16")
          == ", bfloat16 routers, bfloat16 RoPE angles")
  monkeypatch.setattr(kernels, "resolve", lambda impl: "triton")
  assert note(compute_dtype="bfloat16") == ", CVMM triton, float16 sums"
  assert (note(compute_dtype="bfloat16", cvmm_sum_dtype="float32")
          == ", CVMM triton, float32 sums")
  assert note(compute_dtype="float32") == ", CVMM triton"
  monkeypatch.setattr(kernels, "resolve", lambda impl: "mosaic")
  assert note(compute_dtype="bfloat16") == ", CVMM mosaic"
  # "auto" on a Hopper GPU: the two paths, chosen per operation by timing
  from kernels import auto  # noqa: PLC0415
  monkeypatch.setattr(kernels, "resolve", lambda impl: "triton")
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(auto, "candidates", lambda dtype: ["triton", "mosaic"])
  assert (note(compute_dtype="bfloat16")
          == ", CVMM triton or mosaic, timed per operation, float16 sums in triton")
  assert note(compute_dtype="bfloat16", cvmm_impl="triton") == ", CVMM triton, float16 sums"
  # a Hopper GPU without jax-triton: "auto" gives the 16-bit calls to Mosaic
  monkeypatch.setattr(kernels, "resolve", lambda impl: "xla")
  monkeypatch.setattr(auto, "candidates", lambda dtype: ["mosaic"])
  assert note(compute_dtype="bfloat16") == ", CVMM mosaic"


def test_original_numerics_flags_reach_the_model(tmp_path):
  """--router-dtype and --cvmm-impl original with --cvmm-original-path become the model's
  router_dtype and CvmmConfig; the impl and the path go together."""
  (tmp_path / "moeut").mkdir()
  (tmp_path / "moeut" / "cvmm.py").write_text("")
  kw = Config(router_dtype="bfloat16", cvmm_impl="original",
              cvmm_original_path=str(tmp_path)).model_kwargs()
  assert kw["router_dtype"] == "bfloat16"
  assert kw["cvmm"].impl == "original" and kw["cvmm"].original_path == str(tmp_path)
  assert Config().model_kwargs()["router_dtype"] == "float32"
  assert Config().model_kwargs()["rope_table_dtype"] == "float32"
  assert Config(rope_table_dtype="bfloat16").model_kwargs()["rope_table_dtype"] == "bfloat16"
  with pytest.raises(ValueError, match="rope_table_dtype"):
    Config(rope_table_dtype="float64")
  with pytest.raises(ValueError, match="go together"):
    Config(cvmm_impl="original")
  with pytest.raises(ValueError, match="go together"):
    Config(cvmm_original_path=str(tmp_path))
  with pytest.raises(ValueError, match="router_dtype"):
    Config(router_dtype="float64")


def test_cli_flags_override_the_profile_recipe(tmp_path):
  sys.path.insert(0, ROOT)
  import train  # pylint: disable=import-outside-toplevel
  args = train.make_parser().parse_args(["--steps", "7", "--d-model", "64",
                                         "--workdir", str(tmp_path)])
  config = train.config_from_args(args)
  assert config.steps == 7 and config.d_model == 64
  assert config.seq_len == 128  # MoEUT_tiny's recipe
  assert config.model_kwargs()["d_model"] == 64
  assert config.model_kwargs()["cvmm"].sum_dtype == "float16"
  sums = train.config_from_args(train.make_parser().parse_args(
      ["--cvmm-sum-dtype", "bfloat16", "--workdir", str(tmp_path)]))
  assert sums.model_kwargs()["cvmm"].sum_dtype == "bfloat16"
  assert config.model_kwargs()["scan_unroll"] is None
  unrolled = train.config_from_args(train.make_parser().parse_args(
      ["--scan-unroll", "3", "--workdir", str(tmp_path)]))
  assert unrolled.model_kwargs()["scan_unroll"] == 3
  with pytest.raises(SystemExit):                    # argparse refuses other dtypes
    train.make_parser().parse_args(["--cvmm-sum-dtype", "half"])
  paper = train.config_from_args(train.make_parser().parse_args(
      ["--profile", "MoEUT_244M", "--workdir", str(tmp_path)]))
  assert (paper.lr, paper.warmup_steps, paper.batch_size, paper.seq_len) == (2.5e-4, 4000, 64,
                                                                             1024)


def test_cli_eval_and_sample_commands(tiny_run, compilation_cache, tmp_path):
  config, workdir, out = tiny_run
  cache = ("--jax-cache", compilation_cache)
  proc = _cli("eval", "--workdir", workdir, "--max-batches", str(config.eval_batches), *cache,
              cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert f"step {config.steps}: loss {out['valid']['loss']:.4f}" in proc.stdout
  proc = _cli("sample", "--workdir", workdir, "--prompt", config.sample_prompt,
              "--max-new-tokens", str(config.sample_tokens), "--temperature", "0", *cache,
              cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.rstrip("\n") == out["sample"].rstrip("\n")
  proc = _cli("eval", "--workdir", str(tmp_path / "nothing"), *cache, cwd=tmp_path)
  assert proc.returncode == 1 and "no checkpoints" in proc.stderr


def test_sigterm_saves_a_checkpoint_and_resumes_exactly(tiny_run, tmp_path, monkeypatch):
  import signal  # pylint: disable=import-outside-toplevel
  config, _, whole = tiny_run
  real_advance = metrics_lib.MetricsLogger.advance
  calls = []

  def advance(self, n=1):  # A scheduler's SIGTERM arriving during step 5.
    calls.append(n)
    if len(calls) == 5:
      os.kill(os.getpid(), signal.SIGTERM)
    real_advance(self, n)

  monkeypatch.setattr(metrics_lib.MetricsLogger, "advance", advance)
  workdir = str(tmp_path / "run")
  first = train_and_evaluate(config, workdir, log=lambda *_: None)
  assert first["stopped_early"] and first["step"] == 5
  monkeypatch.setattr(metrics_lib.MetricsLogger, "advance", real_advance)
  second = train_and_evaluate(config, workdir, log=lambda *_: None)
  assert {**first["train_losses"], **second["train_losses"]} == whole["train_losses"]
