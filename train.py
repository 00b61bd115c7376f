"""Train, evaluate and sample MoEUT language models.

  python train.py                       # MoEUT_tiny on Python's standard library (CPU, minutes)
  python train.py --profile MoEUT_244M --data corpus.jsonl --workdir runs/244m
  python train.py --workdir runs/244m   # resumes from the last checkpoint
  python train.py eval --workdir runs/244m --data heldout.txt
  python train.py eval --workdir runs/244m --tasks lambada_openai,piqa   # needs the eval extra
  python train.py sample --workdir runs/244m --prompt "The" --max-new-tokens 200

The logic lives in ``moeut_jax.training``; this file only parses flags, and sets JAX's share
of the GPU before JAX starts (``GPU_MEMORY_FRACTION``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing

COMMANDS = ("train", "eval", "sample")
DEFAULT_WORKDIR = os.path.join("runs", "default")
DEFAULT_JAX_CACHE = os.path.join("~", ".cache", "moeut_jax", "xla")

# JAX takes 75% of a GPU's memory at start by default. A training run is the only user of
# its GPUs, so train.py lets JAX take 95% (the rest is for CUDA's own libraries and
# context) unless one of these variables says otherwise. They are read when JAX starts its
# GPU backend, so this must happen before JAX is imported. (The same names as
# moeut_jax.training.memory.MEMORY_VARIABLES, which cannot be imported before JAX.)
GPU_MEMORY_FRACTION = "0.95"
_MEMORY_VARIABLES = ("XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_CLIENT_MEM_FRACTION",
                     "XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PYTHON_CLIENT_ALLOCATOR")


def set_gpu_memory_default(environ=os.environ) -> bool:
  """XLA_PYTHON_CLIENT_MEM_FRACTION=GPU_MEMORY_FRACTION unless any of the memory variables
  is set (then the user's choice stands). Returns whether it was set."""
  if any(name in environ for name in _MEMORY_VARIABLES):
    return False
  environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = GPU_MEMORY_FRACTION
  return True


def _flag(name: str) -> str:
  return "--" + name.replace("_", "-")


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
  """One flag per Config field; unset flags keep the profile's recipe or the paper's default."""
  from moeut_jax.training.config import MODEL_FIELDS, Config, PROFILE_RECIPES  # pylint: disable=import-outside-toplevel
  hints = typing.get_type_hints(Config)
  groups = {g: parser.add_argument_group(g) for g in ("model", "run")}
  for field in dataclasses.fields(Config):
    meta = dict(field.metadata)
    group = groups["model" if meta.get("group") == "model" else "run"]
    kind = hints[field.name]
    recipe = {p: r[field.name] for p, r in PROFILE_RECIPES.items() if field.name in r}
    default = field.default
    if field.name in MODEL_FIELDS:
      shown = "from the profile"
    elif recipe:
      shown = f"{default!r}; " + ", ".join(f"{p}: {v!r}" for p, v in recipe.items())
    else:
      shown = "unset" if default in (None, ()) else repr(default)
    kw = dict(dest=field.name, default=argparse.SUPPRESS, help=f"{meta['help']} ({shown})")
    if "choices" in meta:
      kw["choices"] = meta["choices"]
    if kind is bool:
      kw["action"] = argparse.BooleanOptionalAction
    elif field.name == "data":
      kw.update(nargs="+", metavar="PATH")
    elif kind in (int, typing.Optional[int]):
      kw["type"] = int
    elif kind in (float, typing.Optional[float]):
      kw["type"] = float
    group.add_argument(_flag(field.name), **kw)


def make_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="train.py", formatter_class=argparse.RawDescriptionHelpFormatter,
      description=__doc__.split("\n\n")[0] + "\n\ncommands (train is the default):\n"
      "  train   train or resume the run in --workdir (all flags below)\n"
      "  eval    perplexity of a checkpoint on given text, or harness tasks (--tasks):\n"
      "          train.py eval --help\n"
      "  sample  text from a checkpoint: train.py sample --help\n\n"
      "Unset flags take the profile's recipe (MoEUT_tiny: a 2-core-CPU demo), else the paper's\n"
      "recipe (docs/semantics.md §9 in the repository). Compute is bfloat16 on GPU/TPU and\n"
      "float32 on CPU (--compute-dtype).\n"
      "Resuming: a --workdir with checkpoints restarts from its config.json; flags given\n"
      "again override it (changing the model, data or batch is refused).")
  parser.add_argument("--workdir", default=DEFAULT_WORKDIR,
                      help=f"run folder: checkpoints, metrics, token cache ({DEFAULT_WORKDIR})")
  _add_common(parser)
  _add_config_flags(parser)
  return parser


def _add_common(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--jax-cache", default=DEFAULT_JAX_CACHE,
                      help=f"persistent XLA compilation cache, '' = off ({DEFAULT_JAX_CACHE})")


def _eval_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="train.py eval",
                              description="Perplexity of a checkpoint on given text (or on the "
                              "run's held-out split), or its zero-shot accuracy on "
                              "lm-evaluation-harness tasks (--tasks).")
  p.add_argument("--workdir", default=DEFAULT_WORKDIR, help="run folder")
  p.add_argument("--data", nargs="+", default=(), metavar="PATH",
                 help="text/JSON Lines/token files or folders (default: the held-out split)")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  p.add_argument("--max-batches", type=int, default=None, help="evaluate at most N batches")
  p.add_argument("--allow-binary-text", action="store_true",
                 help="read text files that look binary (NUL bytes, or over 5%% of bytes not "
                 "UTF-8) instead of refusing them")
  h = p.add_argument_group("lm-evaluation-harness tasks (the eval extra; docs/evaluation.md)")
  h.add_argument("--tasks", default=None, help="comma-separated harness tasks, e.g. "
                 "lambada_openai,piqa: zero-shot accuracy instead of perplexity")
  h.add_argument("--include-path", default=None, help="folder of extra task YAML files")
  h.add_argument("--num-fewshot", type=int, default=None, help="examples in each prompt (0)")
  h.add_argument("--limit", type=float, default=None,
                 help="at most N documents per task (a fraction when below 1)")
  h.add_argument("--batch-size", type=int, default=None,
                 help="rows per forward pass (the run's micro-batch)")
  _add_common(p)
  return p


def _sample_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="train.py sample", description="Text from a checkpoint.")
  p.add_argument("--workdir", default=DEFAULT_WORKDIR, help="run folder")
  p.add_argument("--prompt", default="def", help="text to continue ('def')")
  p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate (200)")
  p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (0.8)")
  p.add_argument("--top-k", type=int, default=40, help="0 = all tokens (40)")
  p.add_argument("--seed", type=int, default=0, help="sampling seed (0)")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  _add_common(p)
  return p


def _setup_jax(cache: str) -> None:
  import jax  # pylint: disable=import-outside-toplevel
  if cache:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def config_from_args(args: argparse.Namespace):
  """Flags -> Config. A workdir with checkpoints starts from its saved config.json."""
  from moeut_jax.training import Config  # pylint: disable=import-outside-toplevel
  from moeut_jax.training.config import INVOCATION_FIELDS  # pylint: disable=import-outside-toplevel
  given = {k: v for k, v in vars(args).items() if k not in ("workdir", "jax_cache")}
  saved = os.path.join(args.workdir, "config.json")
  if os.path.exists(saved) and os.path.isdir(os.path.join(args.workdir, "checkpoints")):
    with open(saved) as f:
      base = json.load(f)
    for name in INVOCATION_FIELDS:  # (config.json of older versions saved them)
      base.pop(name, None)
    if "profile" in given and given["profile"] != base.get("profile"):
      base = {}  # A new profile: the checkpoint check will report what differs.
    base.update(given)
    return Config.for_profile(base.pop("profile", "MoEUT_tiny"), **base)
  return Config.for_profile(given.pop("profile", "MoEUT_tiny"), **given)


def _eval_tasks(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
  if args.data or args.max_batches is not None:
    parser.error("--data and --max-batches are for perplexity; --tasks takes the task data")
  from moeut_jax.evaluation.run import evaluate_tasks  # pylint: disable=import-outside-toplevel
  limit = args.limit
  if limit is not None and limit >= 1 and limit == int(limit):
    limit = int(limit)
  out = evaluate_tasks(args.workdir, [t for t in args.tasks.split(",") if t],
                       step=args.step, include_path=args.include_path,
                       num_fewshot=args.num_fewshot, limit=limit, batch_size=args.batch_size)
  print(out["table"])
  print(f"Results: {out['json_path']}, table: {out['table_path']}")
  return 0


def main(argv=None) -> int:
  set_gpu_memory_default()  # before anything imports JAX
  argv = list(sys.argv[1:] if argv is None else argv)
  command = argv.pop(0) if argv and argv[0] in COMMANDS else "train"
  config = None
  try:
    if command == "train":
      args = make_parser().parse_args(argv)
      config = config_from_args(args)
      _setup_jax(args.jax_cache)
      from moeut_jax.training import train_and_evaluate  # pylint: disable=import-outside-toplevel
      train_and_evaluate(config, args.workdir)
    elif command == "eval":
      parser = _eval_parser()
      args = parser.parse_args(argv)
      _setup_jax(args.jax_cache)
      if args.tasks is not None:
        return _eval_tasks(parser, args)
      from moeut_jax.training import evaluate_checkpoint  # pylint: disable=import-outside-toplevel
      out = evaluate_checkpoint(args.workdir, args.data, args.step, args.max_batches,
                                args.allow_binary_text)
      print(f"step {out['step']}: loss {out['loss']:.4f} nats/token, perplexity "
            f"{out['perplexity']:.2f} over {out['tokens']:,} tokens")
    else:
      args = _sample_parser().parse_args(argv)
      _setup_jax(args.jax_cache)
      from moeut_jax.training import sample_from_checkpoint  # pylint: disable=import-outside-toplevel
      print(sample_from_checkpoint(args.workdir, args.prompt, args.max_new_tokens,
                                   args.temperature, args.top_k, args.seed, args.step))
  except ValueError as e:  # Invalid settings (Config validation).
    if type(e) is not ValueError:  # pylint: disable=unidiomatic-typecheck
      raise
    print(f"error: {e}", file=sys.stderr)
    return 2
  except Exception as e:  # pylint: disable=broad-except
    from moeut_jax.training import TrainingError  # pylint: disable=import-outside-toplevel
    from moeut_jax.training import memory  # pylint: disable=import-outside-toplevel
    if memory.is_out_of_memory(e):
      print(f"error: {memory.out_of_memory_message(e, config)}", file=sys.stderr)
      return 1
    if not isinstance(e, TrainingError):
      raise
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
