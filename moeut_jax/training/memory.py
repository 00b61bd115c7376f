"""Out-of-memory errors of a run, told to the user with what to change."""
from __future__ import annotations

import os
from typing import Optional

import jax

from moeut_jax.remat import REMAT_POLICIES

# The environment variables that set how much of a GPU JAX takes (read when JAX starts
# its GPU backend). train.py sets the first to its default when none is set.
MEMORY_VARIABLES = ("XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_CLIENT_MEM_FRACTION",
                    "XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PYTHON_CLIENT_ALLOCATOR")


def is_out_of_memory(error: BaseException) -> bool:
  """Whether ``error``, or an error it was raised from, is XLA's RESOURCE_EXHAUSTED."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(error):
      return True
    error = error.__cause__ or error.__context__
  return False


def oom_summary(error: BaseException) -> str:
  """The first line of the RESOURCE_EXHAUSTED error in ``error``'s chain (at most 300
  characters; XLA adds a dump of its buffers after it)."""
  while error is not None:
    if isinstance(error, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(error):
      line = str(error).strip().splitlines()[0]
      return line if len(line) <= 300 else line[:297] + "..."
    error = error.__cause__ or error.__context__
  return ""


def out_of_memory_message(error: BaseException, config=None) -> str:
  """What ran out and what to change, in a few lines (no traceback, no buffer dump).

  config: the run's Config, whose settings the hints quote; None (eval, sample) for
  general hints.
  """
  lines = [f"out of device memory: {oom_summary(error)}", "To use less memory:"]
  if config is not None:
    micro = config.batch_size // config.grad_accum
    remat = config.remat_policy()
    later = REMAT_POLICIES[REMAT_POLICIES.index(remat) + 1:]   # each keeps less
    if later:
      choices = " or ".join([", ".join(later[:-1]), later[-1]] if len(later) > 1 else later)
      now = remat if remat == config.remat else f"{config.remat}: {remat}"
      lines.append(f"  --remat {choices} (now {now}): the backward pass recomputes "
                   "more of each layer group's activations instead of keeping them"
                   + (" (elementwise: only its LayerNorms, casts and sums)"
                      if "elementwise" in later else ""))
    lines.append(f"  --grad-accum: micro-batches per step (now {config.grad_accum}, "
                 f"{micro} sequences each); same optimizer step, less memory")
    lines.append(f"  a smaller --batch-size (now {config.batch_size}) or --seq-len "
                 f"(now {config.seq_len})")
  else:
    lines.append("  a smaller batch (eval: the run's --batch-size / --grad-accum)")
  set_vars = [f"{v}={os.environ[v]}" for v in MEMORY_VARIABLES if v in os.environ]
  lines.append("  a larger share of the GPU for JAX: XLA_PYTHON_CLIENT_MEM_FRACTION, read at "
               f"start (now {', '.join(set_vars) if set_vars else 'unset: 0.75'}; "
               "leave a few GB for CUDA's libraries)")
  return "\n".join(lines)
