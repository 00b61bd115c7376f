"""``train_and_evaluate(config, workdir)``: the whole run, resumable at any checkpoint."""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
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


def train_and_evaluate(config: Config, workdir: str, log=print) -> dict[str, Any]:
  """Trains (or resumes) the run in ``workdir``; returns a summary.

  The summary has ``start_step``, ``step`` (the last completed step), ``train_losses`` of this
  invocation ({step: loss} at logging steps), ``valid`` (loss, perplexity, tokens),
  ``sample`` (text or None) and ``stopped_early``.
  """
  sharding_lib.maybe_initialize_distributed(config)
  is_main = jax.process_index() == 0
  say = log if is_main else (lambda *_: None)
  os.makedirs(workdir, exist_ok=True)
  ckpt = checkpoint_lib.Checkpointer(workdir, config.keep_checkpoints, config.async_checkpoint)
  try:
    return _run(config, workdir, ckpt, is_main, say)
  finally:
    ckpt.close()


def _run(config: Config, workdir: str, ckpt, is_main: bool, say) -> dict[str, Any]:
  # ---- What we resume from, checked before anything is read or written.
  latest = ckpt.latest_step()
  data_state = None
  if latest is not None:
    meta, data_state = ckpt.restore_meta(latest)
    diffs = resume_differences(meta["config"], config)
    if diffs:
      raise CheckpointError(f"the checkpoint {ckpt.path(latest)} was written with other "
                            f"settings:\n  " + "\n  ".join(diffs) + "\nuse the same settings to "
                            f"resume, or a new --workdir. Nothing was overwritten")

  # Process 0 tokenizes (into the shared workdir); the others wait and read its cache.
  if is_main:
    data = data_lib.prepare(config, workdir, has_checkpoint=latest is not None, log=say)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("moeut_jax.training: data prepared")
  if not is_main:
    data = data_lib.prepare(config, workdir, is_main=False, has_checkpoint=True, log=say)
  if latest is not None and meta["n_tokens"] != data.vocab_size:
    raise TokenizerError(f"the model in {ckpt.path(latest)} has n_tokens={meta['n_tokens']} "
                         f"but the tokenizer/data has {data.vocab_size}")

  # ---- Model, optimizer, shardings, state.
  model = step_lib.build_model(config, data.vocab_size)
  tx, schedule = optim.make_optimizer(config), optim.learning_rate(config)
  mesh = sharding_lib.make_mesh()
  sharding_lib.check_divisible(config.micro_batch_size, mesh,
                               f"--batch-size {config.batch_size} / --grad-accum "
                               f"{config.grad_accum}")
  abstract, shardings = restore.abstract_state(model, tx, config, mesh)
  if latest is None:
    init = jax.jit(lambda: step_lib.init_state(model, tx, config), out_shardings=shardings)
    # The initialiser runs once: on CPUs, compiling it unoptimised saves ~10 s of compile time.
    fast = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
    state, start = init.lower().compile(compiler_options=fast)(), 0
  else:
    state, start = ckpt.restore_state(latest, abstract), latest
    if int(state["step"]) != latest:
      raise CheckpointError(f"checkpoint {ckpt.path(latest)} holds step {int(state['step'])}")
  if is_main:
    _write_json(os.path.join(workdir, restore.CONFIG_JSON), config.to_dict())

  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract["params"]))
  say(f"{config.profile}: {n_params / 1e6:.2f} M parameters, vocabulary {data.vocab_size}, "
      f"compute {np.dtype(step_lib.compute_dtype(config)).name}, "
      f"{len(jax.devices())} {jax.default_backend()} device(s); {data.description}: "
      f"{len(data.train):,} training tokens")
  say(f"Resuming from {ckpt.path(latest)}" if latest is not None else
      f"Training {config.steps} steps of {config.batch_size} x {config.seq_len} tokens")

  it = data_lib.train_iterator(data.train, config, jax.process_index(), jax.process_count())
  if data_state is not None:
    it.set_state(data_state)
  batch_sharding = sharding_lib.train_batch_sharding(mesh)
  train_step = jax.jit(step_lib.make_train_step(model, tx, schedule),
                       in_shardings=(shardings, batch_sharding),
                       out_shardings=(shardings, None), donate_argnums=0)
  eval_step = jax.jit(step_lib.make_eval_step(model))

  def run_eval(step):
    out = evaluate_lib.evaluate(eval_step, state["params"], data.valid, config.seq_len,
                                config.micro_batch_size, config.eval_batches, mesh)
    logger.write(step, "valid", out)
    logger.message(f"step {step}: held-out loss {out['loss']:.4f}, perplexity "
                   f"{out['perplexity']:.2f} ({out['tokens']:,} tokens)")
    return out

  end = min(config.steps, config.stop_at_step or config.steps)
  logger = metrics_lib.MetricsLogger(workdir, config.steps, start, is_main, config.progress_bar,
                                     log=say)
  pending: list[tuple[int, dict]] = []
  train_losses: dict[int, float] = {}
  valid = None
  last_saved = latest
  tokens_per_step = config.batch_size * config.seq_len
  t_last, steps_since = time.perf_counter(), 0

  def flush(step):
    """Fetches the metrics of the steps since the last flush; stops on a non-finite value."""
    nonlocal t_last, steps_since
    values = jax.device_get([m for _, m in pending])
    for (s, _), v in zip(pending, values):
      bad = [k for k in ("loss", "grad_norm", "param_norm") if not math.isfinite(float(v[k]))]
      if bad:
        where = (f"the last good checkpoint is {ckpt.path(last_saved)} (step {last_saved})"
                 if last_saved is not None else "no checkpoint had been written yet")
        raise NonFiniteLossError(
            f"non-finite {', '.join(bad)} at step {s} (loss={float(v['loss'])}, "
            f"grad_norm={float(v['grad_norm'])}); training stopped and nothing after step "
            f"{last_saved or 0} was saved: {where}. Try a lower --lr or stronger --grad-clip")
    if not pending:
      return
    now = time.perf_counter()
    record = {k: float(np.mean([float(v[k]) for v in values])) if k == "loss"
              else float(values[-1][k]) for k in values[-1]}
    record["tokens_per_s"] = tokens_per_step * steps_since / max(now - t_last, 1e-9)
    t_last, steps_since = now, 0
    logger.write(step, "train", record)
    train_losses[step] = record["loss"]
    pending.clear()

  stop_signal = []
  stopped_early = False
  with _catch_stop_signals(stop_signal):
    try:
      for step in range(start + 1, end + 1):  # ``step`` = updates done after this one
        batch = sharding_lib.global_array(next(it), batch_sharding, config.micro_batch_size, 1)
        state, m = train_step(state, batch)
        pending.append((step, m))
        steps_since += 1
        logger.advance()
        last = step == end
        stop = bool(stop_signal) and not last
        save = last or stop or step % config.checkpoint_every == 0
        if save or step % config.log_every == 0:
          flush(step)
        if step % config.eval_every == 0 or step == config.steps:
          valid = run_eval(step)
        if save:
          ckpt.save(step, state, it.get_state(), dict(config=config.to_dict(),
                                                      n_tokens=data.vocab_size))
          last_saved = step
        if stop:
          logger.message(f"Stopped by signal after step {step}; checkpoint "
                         f"{ckpt.path(step)} written. Run the same command to resume.")
          stopped_early = True
          break
    finally:
      ckpt.wait()
      logger.close()

  stopped_early = stopped_early or end < config.steps
  if latest is not None and latest >= config.steps and is_main:
    say(f"The checkpoint in {workdir} is already at step {latest} of {config.steps}")
  if valid is None and not stopped_early:
    valid = run_eval(int(state["step"]))
  text = None
  if not stopped_early and config.sample_tokens > 0 and data.tokenizer is not None:
    text = sample_lib.sample(model, state["params"], data.tokenizer, config.sample_prompt,
                             config.sample_tokens, config.temperature, config.top_k,
                             config.seed)
  png = metrics_lib.plot_losses(workdir) if is_main else None
  if valid is not None:
    say(f"Held-out loss {valid['loss']:.4f}, perplexity {valid['perplexity']:.2f}")
  if text is not None:
    say(f"Sample ({config.sample_tokens} tokens, temperature {config.temperature}):\n{text}")
  if png:
    say(f"Metrics: {os.path.join(workdir, metrics_lib.JSONL)}, TensorBoard: "
        f"{os.path.join(workdir, 'tensorboard')}, loss curve: {png}")
  return dict(start_step=start, step=int(state["step"]), train_losses=train_losses,
              valid=valid, sample=text, stopped_early=stopped_early)


@contextlib.contextmanager
def _catch_stop_signals(flag: list):
  """SIGTERM / first Ctrl-C: finish the current step, save, stop. A second Ctrl-C interrupts."""
  if _not_main_thread():
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


def _not_main_thread() -> bool:
  import threading  # pylint: disable=import-outside-toplevel
  return threading.current_thread() is not threading.main_thread()


def _write_json(path: str, value: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(value, f, indent=2, sort_keys=True)
  os.replace(tmp, path)
