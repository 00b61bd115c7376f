"""``train_and_evaluate(config, workdir)``: the whole run, resumable at any checkpoint."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import threading
import time
from typing import Any, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils

from moeut_jax.training import checkpoint as checkpoint_lib, data as data_lib
from moeut_jax.training import evaluate as evaluate_lib, metrics as metrics_lib, optim
from moeut_jax.training import restore, sample as sample_lib, sharding as sharding_lib
from moeut_jax.training import step as step_lib
from moeut_jax.training.config import Config, resume_differences
from moeut_jax.training.errors import CheckpointError, NonFiniteLossError, TokenizerError

# Metrics that must stay finite; the first non-finite one stops the run.
_WATCHED = ("loss", "grad_norm", "param_norm")


def _cvmm_note(config: Config, compute_dtype: np.dtype) -> str:
  """", CVMM triton, float16 sums" where the GPU kernels run (the sums' dtype matters
  only to the Triton kernels' 16-bit calls; "CVMM triton or mosaic, timed per
  operation" where "auto" chooses between them); "" where the pure-JAX implementation
  does; then ", bfloat16 routers" where the routers are not float32."""
  import kernels  # noqa: PLC0415
  from kernels import auto  # noqa: PLC0415
  names = [kernels.resolve(config.cvmm_impl)]
  if config.cvmm_impl == "auto" and jax.default_backend() == "gpu":
    names = auto.candidates(compute_dtype) or names
  routers = "" if config.router_dtype == "float32" else f", {config.router_dtype} routers"
  if config.rope_table_dtype != "float32":
    routers += f", {config.rope_table_dtype} RoPE angles"
  if names[0] in ("xla", "reference"):
    return routers
  sums = (f", {config.cvmm_sum_dtype} sums{' in triton' if len(names) > 1 else ''}"
          if "triton" in names and compute_dtype.itemsize == 2 else "")
  which = " or ".join(names) + (", timed per operation" if len(names) > 1 else "")
  return f", CVMM {which}{sums}{routers}"


def train_and_evaluate(config: Config, workdir: str, log=print) -> dict[str, Any]:
  """Trains (or resumes) the run in ``workdir``; returns a summary.

  The summary has ``start_step``, ``step`` (the last completed step), ``train_losses`` of this
  invocation ({step: mean loss since the previous logging step}), ``valid`` (loss,
  perplexity, tokens), ``sample`` (text or None) and ``stopped_early``; where the invocation
  had no step to train (a finished run, or --stop-at-step not after the checkpoint), also
  ``nothing_trained`` (why), and nothing is evaluated or written.
  """
  sharding_lib.maybe_initialize_distributed(config)
  is_main = jax.process_index() == 0
  say = log if is_main else (lambda *_: None)
  new_folders = [d for d in (workdir, os.path.join(workdir, "checkpoints"),
                             data_lib.cache_dir(workdir)) if not os.path.isdir(d)]
  os.makedirs(workdir, exist_ok=True)
  ckpt = checkpoint_lib.Checkpointer(workdir, config.keep_checkpoints, config.async_checkpoint)
  mesh = sharding_lib.make_mesh()
  try:
    # The context mesh lets the model route and run its expert kernels on each
    # device's share of the batch (moeut_jax.parallel).
    with jax.set_mesh(mesh):
      return _run(config, workdir, ckpt, is_main, say, mesh)
  finally:
    ckpt.close()
    for folder in sorted(new_folders, reverse=True):  # a failed run leaves no empty folders
      if is_main and os.path.isdir(folder) and not os.listdir(folder):
        os.rmdir(folder)


@dataclasses.dataclass
class _Resume:
  step: Optional[int] = None      # None: a fresh run
  data_state: Optional[dict] = None
  n_tokens: Optional[int] = None
  config: Optional[dict] = None   # the settings the checkpoint was written with


def _check_resume(config: Config, ckpt) -> _Resume:
  """What the workdir resumes from, checked before anything is read or written."""
  latest = ckpt.latest_step()
  if latest is None:
    return _Resume()
  meta, data_state = ckpt.restore_meta(latest)
  diffs = resume_differences(meta["config"], config)
  if diffs:
    raise CheckpointError(f"the checkpoint {ckpt.path(latest)} was written with other "
                          "settings:\n  " + "\n  ".join(diffs) + "\nuse the same settings to "
                          "resume, or a new --workdir. Nothing was overwritten")
  return _Resume(latest, data_state, meta["n_tokens"], meta["config"])


def _nothing_to_train(config: Config, resume: _Resume, ckpt) -> Optional[str]:
  """Why this invocation would train no step, or None."""
  if resume.step is None:
    return None
  if resume.step >= config.steps:
    return (f"Nothing to train: the checkpoint {ckpt.path(resume.step)} is at step "
            f"{resume.step} and --steps is {config.steps}: the run is finished. Give a larger "
            "--steps to train further; train.py eval and train.py sample read its checkpoints")
  if config.stop_at_step is not None and config.stop_at_step <= resume.step:
    return (f"Nothing to train: the checkpoint {ckpt.path(resume.step)} is at step "
            f"{resume.step}, not before --stop-at-step {config.stop_at_step}. Give a later "
            "--stop-at-step, or none to train to the end")
  return None


_SCHEDULE_FIELDS = ("steps", "lr", "min_lr_ratio", "warmup_steps")


def _schedule_change(config: Config, resume: _Resume) -> Optional[str]:
  """A note when the learning-rate schedule differs from the one the checkpoint followed."""
  if resume.step is None or not resume.config:
    return None
  saved = {k: resume.config[k] for k in _SCHEDULE_FIELDS if k in resume.config}
  changed = [k for k in saved if saved[k] != getattr(config, k)]
  if not changed:
    return None
  before = float(optim.learning_rate(config.replace(**saved))(resume.step))
  after = float(optim.learning_rate(config)(resume.step))
  what = ", ".join(f"--{k.replace('_', '-')} {saved[k]} -> {getattr(config, k)}"
                   for k in changed)
  return (f"Note: the learning-rate schedule changes on resuming ({what}): the learning rate "
          f"of step {resume.step + 1} is {after:.3g} instead of {before:.3g}")


def _prepare_data(config: Config, workdir: str, resume: _Resume, is_main: bool, say,
                  ckpt) -> data_lib.Data:
  """Process 0 tokenizes into the (shared) workdir; the others wait and read its cache."""
  data = None
  if is_main:
    data = data_lib.prepare(config, workdir, has_checkpoint=resume.step is not None, log=say)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("moeut_jax.training: data prepared")
  if not is_main:
    data = data_lib.prepare(config, workdir, is_main=False, has_checkpoint=True, log=say)
  if resume.n_tokens is not None and resume.n_tokens != data.vocab_size:
    raise TokenizerError(f"the model in {ckpt.path(resume.step)} has n_tokens="
                         f"{resume.n_tokens} but the tokenizer/data has {data.vocab_size}")
  return data


def _initial_state(model, tx, config: Config, shardings, abstract, resume: _Resume, ckpt):
  if resume.step is None:
    init = jax.jit(lambda: step_lib.init_state(model, tx, config), out_shardings=shardings)
    # The initialiser runs once: on CPUs, compiling it unoptimised saves ~10 s of compile time.
    fast = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
    return init.lower().compile(compiler_options=fast)()
  state = ckpt.restore_state(resume.step, abstract)
  if int(state["step"]) != resume.step:
    raise CheckpointError(f"checkpoint {ckpt.path(resume.step)} holds step "
                          f"{int(state['step'])}")
  return state


class _PendingMetrics:
  """Device metrics of recent steps, fetched only when logged (keeps the device busy)."""

  def __init__(self, tokens_per_step: int):
    self._pending: list[tuple[int, dict]] = []
    self._tokens_per_step = tokens_per_step
    self._t = time.perf_counter()

  def add(self, step: int, metrics: dict) -> None:
    self._pending.append((step, metrics))

  def flush(self, ckpt, last_saved: Optional[int]) -> Optional[dict[str, float]]:
    """Mean loss and last values since the previous flush; raises on a non-finite value."""
    if not self._pending:
      return None
    values = jax.device_get([m for _, m in self._pending])
    for (s, _), v in zip(self._pending, values):
      bad = [k for k in _WATCHED if not math.isfinite(float(v[k]))]
      if bad:
        where = (f"the last good checkpoint is {ckpt.path(last_saved)} (step {last_saved})"
                 if last_saved is not None else "no checkpoint had been written yet")
        raise NonFiniteLossError(
            f"non-finite {', '.join(bad)} at step {s} (loss={float(v['loss'])}, "
            f"grad_norm={float(v['grad_norm'])}); training stopped and nothing after step "
            f"{last_saved or 0} was saved: {where}. Try a lower --lr or stronger --grad-clip")
    now = time.perf_counter()
    record = {k: float(values[-1][k]) for k in values[-1]}
    record["loss"] = float(np.mean([float(v["loss"]) for v in values]))
    record["tokens_per_s"] = (self._tokens_per_step * len(values) / max(now - self._t, 1e-9))
    self._t = now
    self._pending.clear()
    return record


def _run(config: Config, workdir: str, ckpt, is_main: bool, say, mesh) -> dict[str, Any]:
  resume = _check_resume(config, ckpt)
  idle = _nothing_to_train(config, resume, ckpt)
  if idle:  # Nothing is read, evaluated or written (no duplicate metrics or event files).
    say(idle)
    return dict(start_step=resume.step, step=resume.step, train_losses={}, valid=None,
                sample=None, stopped_early=resume.step < config.steps, nothing_trained=idle)
  data = _prepare_data(config, workdir, resume, is_main, say, ckpt)

  model = step_lib.build_model(config, data.vocab_size)
  tx, schedule = optim.make_optimizer(config), optim.learning_rate(config)
  sharding_lib.check_divisible(config.micro_batch_size, mesh,
                               f"--batch-size {config.batch_size} / --grad-accum "
                               f"{config.grad_accum}")
  abstract, shardings = restore.abstract_state(model, tx, config, mesh)
  state = _initial_state(model, tx, config, shardings, abstract, resume, ckpt)
  start = resume.step or 0
  if is_main:
    _write_json(os.path.join(workdir, restore.CONFIG_JSON), config.to_saved_dict())
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract["params"]))
  compute = np.dtype(step_lib.compute_dtype(config))
  say(f"{config.profile}: {n_params / 1e6:.2f} M parameters, vocabulary {data.vocab_size}, "
      f"compute {compute.name}{_cvmm_note(config, compute)}, "
      f"{len(jax.devices())} {jax.default_backend()} device(s); {data.description}: "
      f"{len(data.train):,} training tokens")
  say(f"Resuming from {ckpt.path(resume.step)}" if resume.step is not None else
      f"Training {config.steps} steps of {config.batch_size} x {config.seq_len} tokens")
  note = _schedule_change(config, resume)
  if note:
    say(note)

  it = data_lib.train_iterator(data.train, config, jax.process_index(), jax.process_count())
  if resume.data_state is not None:
    it.set_state(resume.data_state)
  batch_sharding = sharding_lib.train_batch_sharding(mesh)
  train_step = jax.jit(step_lib.make_train_step(model, tx, schedule),
                       in_shardings=(shardings, batch_sharding),
                       out_shardings=(shardings, None), donate_argnums=0)
  eval_step = jax.jit(step_lib.make_eval_step(model))
  logger = metrics_lib.MetricsLogger(workdir, config.steps, start, is_main, config.progress_bar,
                                     log=say)

  def run_eval(step):
    out = evaluate_lib.evaluate(eval_step, state["params"], data.valid, config.seq_len,
                                config.micro_batch_size, config.eval_batches, mesh)
    logger.write(step, "valid", out)
    logger.message(f"step {step}: held-out loss {out['loss']:.4f}, perplexity "
                   f"{out['perplexity']:.2f} ({out['tokens']:,} tokens)")
    return out

  end = min(config.steps, config.stop_at_step or config.steps)
  pending = _PendingMetrics(config.batch_size * config.seq_len)
  train_losses: dict[int, float] = {}
  valid, last_saved, stop_signal, stopped_by_signal = None, resume.step, [], False
  with _catch_stop_signals(stop_signal):
    try:
      for step in range(start + 1, end + 1):  # ``step`` = updates done after this one
        batch = sharding_lib.global_array(next(it), batch_sharding, config.micro_batch_size, 1)
        state, metrics = train_step(state, batch)
        pending.add(step, metrics)
        logger.advance()
        stopped_by_signal = bool(stop_signal) and step < end
        save = step == end or stopped_by_signal or step % config.checkpoint_every == 0
        if save or step % config.log_every == 0:
          record = pending.flush(ckpt, last_saved)
          logger.write(step, "train", record)
          train_losses[step] = record["loss"]
        if step % config.eval_every == 0 or step == config.steps:
          valid = run_eval(step)
        if save:
          ckpt.save(step, state, it.get_state(),
                    dict(config=config.to_saved_dict(), n_tokens=data.vocab_size))
          last_saved = step
        if stopped_by_signal:
          logger.message(f"Stopped by a signal after step {step}; checkpoint "
                         f"{ckpt.path(step)} written. Run the same command to resume.")
          break
    finally:
      ckpt.wait()
      logger.close()

  stopped_early = stopped_by_signal or end < config.steps
  if valid is None and not stopped_early:
    valid = run_eval(int(state["step"]))
  text = None
  if not stopped_early and config.sample_tokens > 0 and data.tokenizer is not None:
    text = sample_lib.sample(model, state["params"], data.tokenizer, config.sample_prompt,
                             config.sample_tokens, config.temperature, config.top_k,
                             config.seed)
  _report(workdir, config, valid, text, is_main, say)
  return dict(start_step=start, step=int(state["step"]), train_losses=train_losses,
              valid=valid, sample=text, stopped_early=stopped_early)


def _report(workdir, config, valid, text, is_main, say) -> None:
  png = metrics_lib.plot_losses(workdir) if is_main else None
  if valid is not None:
    say(f"Held-out loss {valid['loss']:.4f}, perplexity {valid['perplexity']:.2f}")
  if text is not None:
    say(f"Sample ({config.sample_tokens} tokens, temperature {config.temperature}):\n{text}")
  if png:
    tb = os.path.join(workdir, "tensorboard")
    tb = tb if os.path.isdir(tb) else "off (tensorboardX missing)"
    say(f"Metrics: {os.path.join(workdir, metrics_lib.JSONL)}, TensorBoard: {tb}, "
        f"loss curve: {png}")


@contextlib.contextmanager
def _catch_stop_signals(flag: list):
  """SIGTERM / first Ctrl-C: finish the current step, save, stop. A second Ctrl-C interrupts.

  Multi-host: every process must receive the signal (schedulers send it to all tasks)."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  previous = {}

  def handler(signum, _):
    if flag and signum == signal.SIGINT:
      raise KeyboardInterrupt
    flag.append(signum)

  for sig in (signal.SIGINT, signal.SIGTERM):
    previous[sig] = signal.signal(sig, handler)
  try:
    yield
  finally:
    for sig, h in previous.items():
      signal.signal(sig, h)


def _write_json(path: str, value: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(value, f, indent=2, sort_keys=True)
  os.replace(tmp, path)
