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


def _heldout(r: dict) -> dict:
  """{step: held-out loss} of a run (a stopped run's up to its last evaluation)."""
  return {int(step): loss for step, loss in r.get("heldout") or []}


def _originals(results: list[dict]) -> list[dict]:
  return [r for r in results if r["variant"] == "original"]


def _reference(results: list[dict], step: int):
  """(mean, spread or None) of the original runs' held-out losses at ``step``."""
  vals = [_heldout(r)[step] for r in _originals(results) if step in _heldout(r)]
  if not vals:
    return None, None
  return float(np.mean(vals)), (float(max(vals) - min(vals)) if len(vals) > 1 else None)


def summary(results: list[dict]) -> dict:
  """Each run's held-out loss against the original runs' mean and spread (max - min) at
  the same step: the run's last step at which an original run was evaluated too (runs
  stopped early are compared where they got to). ``original_mean`` and
  ``original_spread`` are the original's at the last step all its runs reached."""
  orig_steps = [set(_heldout(r)) for r in _originals(results) if _heldout(r)]
  common = set.intersection(*orig_steps) if orig_steps else set()
  at = max(common) if common else None
  mean, spread = _reference(results, at) if at is not None else (None, None)
  rows = []
  for r in results:
    held = _heldout(r)
    shared = [s for s in held if _reference(results, s)[0] is not None]
    step = max(shared) if shared else (max(held) if held else None)
    loss = held.get(step) if step is not None else None
    ref, ref_spread = _reference(results, step) if step is not None else (None, None)
    diff = None if loss is None or ref is None else loss - ref
    # a spread that rounds to 0.0000 (runs that repeat exactly, as on a CPU) measures nothing
    usable = ref_spread is not None and round(ref_spread, 4) > 0
    rows.append(dict(label=r["label"], step=step, loss=loss, diff=diff,
                     spreads=abs(diff) / ref_spread if diff is not None and usable else None,
                     last=[max(held), held[max(held)]] if held else None,
                     seconds=r.get("seconds"), error=r.get("error")))
  return dict(original_step=at, original_mean=mean, original_spread=spread, rows=rows)


def heldout_by_step(results: list[dict]) -> str:
  """Every run's held-out losses, one column per evaluated step ("-": not reached)."""
  steps = sorted(set().union(*(_heldout(r) for r in results)))
  if not steps:
    return "(no held-out evaluation)"
  lines = [f"{'run':<44}" + "".join(f"{s:>9}" for s in steps)]
  for r in results:
    held = _heldout(r)
    lines.append(f"{r['label']:<44}" + "".join(
        f"{held[s]:>9.4f}" if s in held else f"{'-':>9}" for s in steps))
  return "\n".join(lines)


def heldout_table(results: list[dict]) -> str:
  """Each run's held-out loss against the original's at the same step (see summary)."""
  s = summary(results)
  lines = [f"{'run':<44} {'step':>5} {'held-out':>9} {'- original':>11} {'/ spread':>9} "
           f"{'time':>7}"]
  for row in s["rows"]:
    if row["loss"] is None:
      lines.append(f"{row['label']:<44} {'-':>5} {'-':>9}  {row['error'] or 'no result'}")
      continue
    diff = "" if row["diff"] is None else f"{row['diff']:+.4f}"
    ratio = "" if row["spreads"] is None else f"{row['spreads']:.1f}x"
    secs = "" if row["seconds"] is None else f"{row['seconds']:.0f} s"
    note = f"  {row['error']}" if row["error"] else ""
    lines.append(f"{row['label']:<44} {row['step']:>5} {row['loss']:>9.4f} {diff:>11} "
                 f"{ratio:>9} {secs:>7}{note}")
  if s["original_mean"] is not None:
    spread = "" if s["original_spread"] is None else (
        f"; its run-to-run spread (max - min): {s['original_spread']:.4f}")
    lines.append(f"original mean after step {s['original_step']}: "
                 f"{s['original_mean']:.4f}{spread}")
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
