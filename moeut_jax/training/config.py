"""Every training setting in one frozen dataclass, with the paper's recipe as defaults.

Precedence, lowest first: the paper's recipe (the field defaults below, docs/semantics.md §9),
then the profile's recipe (``PROFILE_RECIPES``: the paper trains its 44M model without warm-up
and with clipping 0.1; ``MoEUT_tiny`` gets a recipe that trains in minutes on a 2-core CPU),
then explicit overrides (command-line flags). Model fields (``d_model`` ...) left at ``None``
come from the profile in ``profiles.py``.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Optional

from moeut_jax import profiles
from kernels import IMPLEMENTATIONS, SUM_DTYPES, CvmmConfig
from moeut_jax.remat import REMAT_POLICIES

REMAT_CHOICES = ("auto",) + REMAT_POLICIES

# Fields of the profile dicts in profiles.py; each can be overridden one by one.
MODEL_FIELDS = ("d_model", "n_layers", "n_heads", "ff_n_experts", "ff_expert_size",
                "att_n_experts", "d_head", "group_size", "ff_k", "att_k")

# Per-profile departures from the paper's defaults (below in Config).
PROFILE_RECIPES: dict[str, dict[str, Any]] = {
    "MoEUT_44M": dict(warmup_steps=0, grad_clip=0.1),
    # Not from the paper: a demo that shows the loss fall within minutes on a 2-core CPU.
    "MoEUT_tiny": dict(steps=150, batch_size=16, seq_len=128, lr=2e-3, warmup_steps=15,
                       grad_clip=1.0, checkpoint_every=75, eval_every=75, eval_batches=4,
                       log_every=10, vocab_size=4000, tokenizer_train_chars=4_000_000),
}

COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")
ROUTER_DTYPES = ("float32", "bfloat16", "float16")
PARAM_DTYPES = ("float32", "bfloat16")


def _f(default, help, **kw):  # pylint: disable=redefined-builtin
  """A field whose metadata (help, choices, group) becomes its command-line flag."""
  return dataclasses.field(default=default, metadata=dict(help=help, **kw))


@dataclasses.dataclass(frozen=True)
class Config:
  """All settings of a run (defaults: the paper's recipe)."""

  # --- Model -------------------------------------------------------------------------------
  profile: str = _f("MoEUT_tiny", "model profile from moeut_jax/profiles.py",
                    choices=profiles.ALL_PROFILES)
  d_model: Optional[int] = _f(None, "override the profile's d_model", group="model")
  n_layers: Optional[int] = _f(None, "override the profile's n_layers", group="model")
  n_heads: Optional[int] = _f(None, "override the profile's n_heads", group="model")
  ff_n_experts: Optional[int] = _f(None, "override the profile's ff_n_experts", group="model")
  ff_expert_size: Optional[int] = _f(None, "override the profile's ff_expert_size",
                                     group="model")
  att_n_experts: Optional[int] = _f(None, "override the profile's att_n_experts",
                                    group="model")
  d_head: Optional[int] = _f(None, "override the profile's d_head", group="model")
  group_size: Optional[int] = _f(None, "override the profile's group_size", group="model")
  ff_k: Optional[int] = _f(None, "override the profile's ff_k", group="model")
  att_k: Optional[int] = _f(None, "override the profile's att_k", group="model")
  dropout: Optional[float] = _f(None, "dropout rate (unset: the model's default, 0 in the paper)",
                                group="model")
  entropy_reg: Optional[float] = _f(None, "weight of the entropy regulariser (unset: the "
                                    "model's default)", group="model")
  cvmm_impl: str = _f("auto", "CVMM implementation: auto (Triton on GPUs, XLA elsewhere), "
                      "xla, triton, triton_unfused, mosaic, reference",
                      choices=IMPLEMENTATIONS, group="model")
  cvmm_sum_dtype: str = _f("float16", "dtype of the GPU CVMM kernels' sums over experts "
                           "in 16-bit runs: float16 (rows scaled against overflow) has "
                           "about float32's accuracy at half its memory traffic; float32 "
                           "repeats runs more closely (1e-5 vs 1e-3); bfloat16 is less "
                           "accurate",
                           choices=SUM_DTYPES, group="model")
  cvmm_original_path: Optional[str] = _f(None, "folder of a clone of the official MoEUT "
                                         "whose CVMM kernels --cvmm-impl original runs",
                                         group="model")
  router_dtype: str = _f("float32", "dtype of the routers: float32, or bfloat16 as the "
                         "original computes them under bf16 autocast (σ-MoE's top-k then "
                         "ties often; docs/semantics.md §7)", choices=ROUTER_DTYPES,
                         group="model")
  rope_table_dtype: str = _f("float32", "dtype of the RoPE angles and rotation: float32, or "
                             "bfloat16 as the original computes them on a GPU (CUDA's "
                             "autocast runs its einsum angle table in bf16; "
                             "docs/semantics.md §7)", choices=ROUTER_DTYPES, group="model")
  scan_unroll: Optional[int] = _f(None, "repeats of the layer group per scan iteration "
                                  "(unset: all of them on GPUs, a faster step and a "
                                  "longer compile; 1 elsewhere)", group="model")
  remat: str = _f("auto", "what the backward pass keeps of each layer group: none "
                  "(everything it reads; fastest), elementwise (all but what elementwise "
                  "operations make: recomputes LayerNorms, casts and residual sums; 11-13%% "
                  "less memory than none for 1.6%% of the tokens/s on an H100), lean "
                  "(elementwise, and the q|k product, SwitchHead's routers and the σ-MoE's "
                  "up projection run again instead of keeping q, k, SwitchHead's router "
                  "logits and the experts' middle; 15.7 against none's 25.3 GiB at "
                  "MoEUT_244M for 8.5%% of the tokens/s on an H100), "
                  "save_projections (router outputs, q/k and SwitchHead's expert outputs; "
                  "recomputes the rest), full (only the group's input; least memory, "
                  "recomputes the whole forward pass); auto = elementwise on GPUs, none "
                  "on CPUs (where compile time weighs more than memory). Same numerics; "
                  "may change when resuming", choices=REMAT_CHOICES, group="model")
  compute_dtype: str = _f("auto", "compute dtype; auto = bfloat16 on GPU/TPU, float32 on CPU "
                          "(bf16 is emulated and slow on CPUs)", choices=COMPUTE_DTYPES)
  param_dtype: str = _f("float32", "dtype of parameters and optimizer state",
                        choices=PARAM_DTYPES)

  # --- Data and tokenizer ----------------------------------------------------------------------
  data: tuple[str, ...] = _f((), "text files/folders (.txt, .py, .md ...), JSON Lines "
                             "(.jsonl, .jsonl.gz) or pre-tokenized token files (.npy, .bin); "
                             "none: the .py files of Python's standard library")
  text_field: str = _f("text", "field of a JSON Lines record that holds the text")
  allow_binary_text: bool = _f(False, "read text files that look binary (NUL bytes, or over "
                               "5%% of bytes not UTF-8) instead of refusing them")
  token_dtype: str = _f("uint16", "dtype of raw .bin token files", choices=("uint16", "uint32",
                                                                              "int32"))
  tokenizer: Optional[str] = _f(None, "SentencePiece .model file; none: train one on the data "
                                "(cached in the workdir)")
  vocab_size: int = _f(8000, "vocabulary size of a trained tokenizer (and of the model when "
                       "the data is pre-tokenized)")
  tokenizer_train_chars: int = _f(50_000_000, "characters of text sampled to train the "
                                  "tokenizer")
  eval_fraction: float = _f(0.01, "fraction of the tokens held out for evaluation (the end of "
                            "the token stream after a seeded shuffle of the documents)")

  # --- Optimisation ----------------------------------------------------------------------------
  steps: int = _f(100_000, "number of optimizer steps")
  batch_size: int = _f(64, "global batch size in sequences per optimizer step")
  grad_accum: int = _f(1, "micro-batches per step (gradient accumulation); must divide "
                       "--batch-size")
  seq_len: int = _f(1024, "tokens per sequence")
  lr: float = _f(2.5e-4, "peak learning rate")
  min_lr_ratio: float = _f(0.1, "final learning rate of the cosine decay, as a fraction of --lr")
  warmup_steps: int = _f(4000, "linear warm-up steps (unless given, steps // 10 when the "
                         "default would not fit in --steps)")
  b1: float = _f(0.9, "AdamW beta1")
  b2: float = _f(0.999, "AdamW beta2")
  eps: float = _f(1e-8, "AdamW epsilon")
  weight_decay: float = _f(0.01, "AdamW weight decay (on all parameters, as in the paper)")
  grad_clip: float = _f(0.25, "global-norm gradient clipping; 0 = off")
  seed: int = _f(0, "seed of parameters, data order, dropout and sampling")

  # --- Checkpoints, evaluation, logging ----------------------------------------------------------
  checkpoint_every: int = _f(1000, "save a checkpoint every N steps (and always at the end)")
  keep_checkpoints: int = _f(3, "keep the last K checkpoints")
  async_checkpoint: bool = _f(True, "write checkpoints in the background")
  eval_every: int = _f(1000, "evaluate on the held-out split every N steps (and at the end)")
  eval_batches: int = _f(50, "at most this many micro-batches per evaluation")
  log_every: int = _f(50, "write training metrics every N steps")
  progress_bar: bool = _f(True, "show a progress bar")
  stop_at_step: Optional[int] = _f(None, "stop (with a checkpoint) after this step, keeping the "
                                   "schedule of --steps; resume later with the same --workdir")
  sample_prompt: str = _f("def", "prompt of the sample printed at the end of training")
  sample_tokens: int = _f(64, "tokens generated at the end of training; 0 = no sample")
  temperature: float = _f(0.8, "sampling temperature; 0 = greedy")
  top_k: Optional[int] = _f(40, "sample from the top-k tokens only; 0 = all")

  # --- Multi-host --------------------------------------------------------------------------------
  coordinator_address: Optional[str] = _f(None, "host:port of process 0; with --num-processes "
                                          "and --process-id starts jax.distributed (also "
                                          "started when JAX_COORDINATOR_ADDRESS or a "
                                          "multi-task SLURM/Open MPI environment is set)")
  num_processes: Optional[int] = _f(None, "number of processes (multi-host)")
  process_id: Optional[int] = _f(None, "index of this process (multi-host)")

  # -------------------------------------------------------------------------------------------
  @classmethod
  def for_profile(cls, profile: str = "MoEUT_tiny", **overrides) -> "Config":
    """The paper's defaults, then the profile's recipe, then ``overrides``."""
    profiles.get(profile)  # Validates the name.
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - names)
    if unknown:
      raise ValueError(f"unknown config fields {unknown}")
    values = dict(PROFILE_RECIPES.get(profile, {}))
    values.update(overrides)
    if "warmup_steps" not in overrides and "steps" in overrides:
      # A short run (say --steps 10) keeps a default warm-up only if it fits.
      warmup = values.get("warmup_steps", cls.warmup_steps)
      if warmup >= values["steps"]:
        values["warmup_steps"] = values["steps"] // 10
    values["profile"] = profile
    if "data" in values:
      values["data"] = tuple(values["data"])
    return cls(**values)

  def __post_init__(self):
    profiles.get(self.profile)
    positive = "a positive integer"
    checks = [
        ("steps", self.steps >= 1, positive), ("batch_size", self.batch_size >= 1, positive),
        ("seq_len", self.seq_len >= 2, "an integer of at least 2"),
        ("grad_accum", self.grad_accum >= 1, positive), ("lr", self.lr > 0, "positive"),
        ("warmup_steps", 0 <= self.warmup_steps < max(self.steps, 1),
         f"at least 0 and less than steps={self.steps}"),
        ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "in [0, 1]"),
        ("grad_clip", self.grad_clip >= 0, "0 (off) or positive"),
        ("checkpoint_every", self.checkpoint_every >= 1, positive),
        ("keep_checkpoints", self.keep_checkpoints >= 1, positive),
        ("eval_every", self.eval_every >= 1, positive),
        ("log_every", self.log_every >= 1, positive),
        ("vocab_size", self.vocab_size >= 2, "an integer of at least 2"),
        ("eval_fraction", 0 < self.eval_fraction < 1, "strictly between 0 and 1"),
        ("eval_batches", self.eval_batches >= 1, positive),
        ("stop_at_step", self.stop_at_step is None or self.stop_at_step >= 1,
         "unset or a positive integer"),
    ]
    for name, ok, valid in checks:
      if not ok:
        raise ValueError(f"invalid setting {name}={getattr(self, name)!r}: it must be {valid}")
    if self.batch_size % self.grad_accum:
      raise ValueError(f"batch_size={self.batch_size} is not divisible by "
                       f"grad_accum={self.grad_accum}")
    if self.compute_dtype not in COMPUTE_DTYPES:
      raise ValueError(f"compute_dtype={self.compute_dtype!r}; choose one of {COMPUTE_DTYPES}")
    if self.param_dtype not in PARAM_DTYPES:
      raise ValueError(f"param_dtype={self.param_dtype!r}; choose one of {PARAM_DTYPES}")
    if self.remat not in REMAT_CHOICES:
      raise ValueError(f"remat={self.remat!r}; choose one of {REMAT_CHOICES}")
    if self.router_dtype not in ROUTER_DTYPES:
      raise ValueError(f"router_dtype={self.router_dtype!r}; choose one of {ROUTER_DTYPES}")
    if self.rope_table_dtype not in ROUTER_DTYPES:
      raise ValueError(f"rope_table_dtype={self.rope_table_dtype!r}; choose one of "
                       f"{ROUTER_DTYPES}")
    if (self.cvmm_impl == "original") != (self.cvmm_original_path is not None):
      raise ValueError("--cvmm-impl original and --cvmm-original-path go together: the "
                       "original's kernels come from the clone the path names")

  # -------------------------------------------------------------------------------------------
  @property
  def micro_batch_size(self) -> int:
    return self.batch_size // self.grad_accum

  def model_kwargs(self) -> dict[str, Any]:
    """Keyword arguments of ``MoEUTLM`` other than ``n_tokens`` and the dtypes."""
    kwargs = profiles.get(self.profile)
    for name in MODEL_FIELDS:
      if getattr(self, name) is not None:
        kwargs[name] = getattr(self, name)
    for name in ("dropout", "entropy_reg"):
      if getattr(self, name) is not None:
        kwargs[name] = getattr(self, name)
    kwargs["cvmm"] = CvmmConfig(impl=self.cvmm_impl, sum_dtype=self.cvmm_sum_dtype,
                                original_path=self.cvmm_original_path)
    kwargs["router_dtype"] = self.router_dtype
    kwargs["rope_table_dtype"] = self.rope_table_dtype
    kwargs["scan_unroll"] = self.scan_unroll
    kwargs["remat"] = self.remat_policy()
    return kwargs

  def remat_policy(self, backend: Optional[str] = None) -> str:
    """The remat policy the model gets: ``remat``, with "auto" resolved for ``backend``
    (default: JAX's default backend): "elementwise" on GPUs, where it peaks lower than
    "none" for 1.6% of the tokens/s (on an H100, MoEUT_244M at 64 x 1024 tokens: 22.8
    against 26.1 GiB; MoEUT_1B at 32 x 1024: 41.3 against 46.6 GiB; bench/RESULTS.md),
    and "none" elsewhere."""
    if self.remat != "auto":
      return self.remat
    if backend is None:
      import jax  # noqa: PLC0415
      backend = jax.default_backend()
    return "elementwise" if backend == "gpu" else "none"

  def replace(self, **changes) -> "Config":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["data"] = list(self.data)
    return d

  def to_saved_dict(self) -> dict[str, Any]:
    """The run's settings as saved in config.json and checkpoints: without those of one
    invocation (``INVOCATION_FIELDS``), which a rerun must not bring back."""
    d = self.to_dict()
    for name in INVOCATION_FIELDS:
      del d[name]
    return d

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "Config":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"unknown config fields {unknown}")
    d = dict(d)
    if "data" in d:
      d["data"] = tuple(d["data"])
    return cls(**d)


# Settings of one invocation of train.py, never saved with the run.
INVOCATION_FIELDS = ("stop_at_step",)

# Settings that must not change when a run resumes from a checkpoint: the model, the tokens
# and the order in which they are read.
RESUME_LOCKED = ("profile",) + MODEL_FIELDS + (
    "dropout", "entropy_reg", "param_dtype", "data", "text_field", "token_dtype", "tokenizer",
    "vocab_size", "eval_fraction", "seq_len", "batch_size", "seed")


def resume_differences(saved: dict[str, Any], current: "Config") -> list[str]:
  """Human-readable ``name: saved -> current`` lines for every locked field that differs."""
  now = current.to_dict()
  out = []
  for name in RESUME_LOCKED:
    if name in saved and saved[name] != now[name]:
      out.append(f"{name}: {_shown(name, saved[name])} (checkpoint) != "
                 f"{_shown(name, now[name])} (now)")
  return out


def _shown(name: str, value: Any) -> str:
  if name == "data" and not value:
    return "the built-in standard-library data"
  return repr(value)
