"""The comparison's tables and its PNG, from the runs' results (see :mod:`.worker`)."""
from __future__ import annotations

import numpy as np

_WIDTH = 12


def _short(label: str) -> str:
  """A column header of at most _WIDTH characters."""
  s = label.replace("jax+", "+").replace("original_", "orig_")
  return s if len(s) <= _WIDTH else s[:_WIDTH - 1] + "~"


def curves(results: list[dict], every: int) -> str:
  """Training loss side by side: one row per ``every`` steps (the mean over those steps),
  one column per run."""
  done = [r for r in results if "train_loss" in r]
  if not done:
    return "(no finished run)"
  steps = max(len(r["train_loss"]) for r in done)
  lines = [f"{'steps':>11} " + " ".join(f"{_short(r['label']):>{_WIDTH}}" for r in done)]
  for lo in range(0, steps, every):
    hi = min(lo + every, steps)
    cells = []
    for r in done:
      part = r["train_loss"][lo:hi]
      cells.append(f"{np.mean(part):>{_WIDTH}.4f}" if len(part) else " " * _WIDTH)
    lines.append(f"{f'{lo + 1}-{hi}':>11} " + " ".join(cells))
  return "\n".join(lines)


def _final(r: dict):
  return r["heldout"][-1][1] if r.get("heldout") else None


def summary(results: list[dict]) -> dict:
  """The original runs' held-out losses, their mean and spread (max - min), and each
  other run's difference from that mean, in nats and in spreads."""
  orig = [_final(r) for r in results if r["variant"] == "original" and _final(r) is not None]
  mean = float(np.mean(orig)) if orig else None
  spread = float(max(orig) - min(orig)) if len(orig) > 1 else None
  # a spread that rounds to 0.0000 (runs that repeat exactly, as on a CPU) measures nothing
  usable = spread is not None and round(spread, 4) > 0
  rows = []
  for r in results:
    loss = _final(r)
    diff = None if loss is None or mean is None else loss - mean
    rows.append(dict(label=r["label"], loss=loss, diff=diff,
                     spreads=(abs(diff) / spread if diff is not None and usable else None),
                     step=r["heldout"][-1][0] if r.get("heldout") else None,
                     seconds=r.get("seconds"), error=r.get("error")))
  return dict(original_mean=mean, original_spread=spread, rows=rows)


def heldout_table(results: list[dict]) -> str:
  """Held-out loss of every run after its last step, against the original's."""
  s = summary(results)
  lines = [f"{'run':<44} {'held-out':>9} {'- original':>11} {'/ spread':>9} {'time':>7}"]
  for row in s["rows"]:
    if row["loss"] is None:
      lines.append(f"{row['label']:<44} {'-':>9}  {row['error'] or 'no result'}")
      continue
    diff = "" if row["diff"] is None else f"{row['diff']:+.4f}"
    ratio = "" if row["spreads"] is None else f"{row['spreads']:.1f}x"
    secs = "" if row["seconds"] is None else f"{row['seconds']:.0f} s"
    lines.append(f"{row['label']:<44} {row['loss']:>9.4f} {diff:>11} {ratio:>9} {secs:>7}")
  if s["original_mean"] is not None:
    spread = "" if s["original_spread"] is None else (
        f"; its run-to-run spread (max - min): {s['original_spread']:.4f}")
    lines.append(f"original mean: {s['original_mean']:.4f}{spread}")
  return "\n".join(lines)


def plot(results: list[dict], path: str, smooth: int = 10) -> str:
  """Writes the training (moving mean over ``smooth`` steps) and held-out curves to a PNG
  at ``path``; returns the path."""
  try:
    import matplotlib  # noqa: PLC0415
  except ImportError as e:
    raise ImportError("the side-by-side PNG needs matplotlib: pip install matplotlib") from e
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
  for r in results:
    if "train_loss" not in r:
      continue
    style = "-" if r["variant"] == "original" else "--"
    y = np.asarray(r["train_loss"], np.float64)
    k = max(1, min(smooth, len(y)))
    ys = np.convolve(y, np.ones(k) / k, mode="valid")
    ax1.plot(np.arange(k, len(y) + 1), ys, style, label=r["label"])
    if r.get("heldout"):
      steps, losses = zip(*r["heldout"])
      ax2.plot(steps, losses, style + "o", label=r["label"], markersize=3)
  ax1.set(xlabel="step", ylabel=f"training loss (mean of {smooth} steps)", title="training")
  ax2.set(xlabel="step", ylabel="held-out loss", title="held-out")
  for ax in (ax1, ax2):
    ax.grid(alpha=0.3)
    if ax.lines:
      ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path
