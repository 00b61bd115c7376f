"""What a run shows and leaves behind: a progress bar (loss, tokens/s, ETA), metrics as JSON Lines
(``metrics.jsonl``) and TensorBoard events (``tensorboard/``) in the workdir, a loss-curve PNG."""
from __future__ import annotations

import json
import math
import os
import sys
from typing import Optional

import tqdm

JSONL = "metrics.jsonl"
PNG = "loss.png"


class MetricsLogger:
  """Writes on process 0 only. A resumed run drops records past the step it resumed from."""

  def __init__(self, workdir: str, total_steps: int, start_step: int, enabled: bool = True,
               progress_bar: bool = True, log=print):
    self._enabled, self._log = enabled, log
    self._path = os.path.join(workdir, JSONL)
    self._tb = self._bar = None
    if not enabled:
      return
    _truncate_jsonl(self._path, start_step)
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
    except ImportError:
      # Some images (e.g. the GPU machine's) lack it; the JSON Lines metrics still cover
      # everything, so say so once instead of failing after the data is prepared.
      log("TensorBoard event files are off: tensorboardX is not installed "
          "(pip install tensorboardX); metrics go to " + self._path)
    else:
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"),
                               purge_step=start_step + 1 if start_step else None)
    if progress_bar:
      self._bar = tqdm.tqdm(total=total_steps, initial=start_step, unit="step",
                            dynamic_ncols=True, file=sys.stderr, smoothing=0.1)

  def message(self, text: str) -> None:
    if not self._enabled:
      return
    if self._bar is not None:
      self._bar.write(text)
    else:
      self._log(text)

  def advance(self, n: int = 1) -> None:
    if self._bar is not None:
      self._bar.update(n)

  def write(self, step: int, split: str, values: dict[str, float]) -> None:
    if not self._enabled:
      return
    record = dict(step=step, split=split, **values)
    with open(self._path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if self._tb is not None:
      for k, v in values.items():
        self._tb.add_scalar(f"{split}/{k}", v, step)
    if split == "train":
      if self._bar is not None:
        self._bar.set_postfix(loss=f"{values['loss']:.3f}",
                              tok_s=f"{values.get('tokens_per_s', 0):,.0f}", refresh=False)
      else:
        self._log(f"step {step}: loss {values['loss']:.4f}, "
                  f"{values.get('tokens_per_s', 0):,.0f} tokens/s")

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def _truncate_jsonl(path: str, last_step: int) -> None:
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = [l for l in f if l.strip() and json.loads(l)["step"] <= last_step]
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(lines)
  os.replace(tmp, path)


def read_jsonl(workdir: str, split: Optional[str] = None) -> list[dict]:
  path = os.path.join(workdir, JSONL)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    records = [json.loads(l) for l in f if l.strip()]
  return [r for r in records if split is None or r["split"] == split]


def plot_losses(workdir: str) -> Optional[str]:
  """Training and held-out loss against step, as ``<workdir>/loss.png``."""
  train, valid = read_jsonl(workdir, "train"), read_jsonl(workdir, "valid")
  if not train:
    return None
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(7, 4.5))
  ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
  if valid:
    ax.plot([r["step"] for r in valid], [r["loss"] for r in valid], "o-", label="held-out")
  ax.set_xlabel("step")
  ax.set_ylabel("cross-entropy (nats/token)")
  ax.grid(alpha=0.3)
  ax.legend()
  finite = [r["loss"] for r in train if math.isfinite(r["loss"])]
  if finite:
    ax.set_ylim(top=min(max(finite), 2 * finite[-1] + 1))
  path = os.path.join(workdir, PNG)
  fig.savefig(path, dpi=100, bbox_inches="tight")
  plt.close(fig)
  return path
