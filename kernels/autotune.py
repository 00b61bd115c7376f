"""Tile sizes for the CVMM kernels: a self-validating config and a cached autotuner.

Block sizes are not hard-coded: each kernel offers a short list of candidate
:class:`TileConfig`s for a shape, and :class:`Autotuner` times them on the device the
first time that (device, kernel, shape, dtype) is seen. The winner is cached in memory
and on disk (a JSON file: below), so that a later process starts from the measured
choice. Keys name the device, the kernel, the
shape, the dtype and the kernels' settings that matter (:meth:`kernels.CvmmConfig.tune_key`).
A cached tile that is not among the kernel's candidates now is not used.

Environment (process-level tooling):
  CVMM_AUTOTUNE        "1" (default) times candidates; "0" takes the first valid
                       candidate (the heuristic choice) without timing.
  CVMM_AUTOTUNE_CACHE  JSON file read at start and rewritten after every new choice;
                       unset: :func:`default_cache_file` (per user, per version of the
                       kernels' code), "" none: every process times again.

The multiprocessor count, used to size split-K and persistent grids, is read from the
device (:func:`multiprocessor_count`), never assumed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import statistics
import threading
import time
import warnings
from typing import Callable, Iterable, Sequence

import jax


def _is_pow2(v: int) -> bool:
  return v > 0 and v & (v - 1) == 0


@dataclasses.dataclass(frozen=True)
class TileConfig:
  """Tile sizes and launch shape of one CVMM kernel.

  block_m: rows of sorted pairs per program (Triton, Mosaic), or rows of the
    contraction per step (weight gradient: block_k is then the row step).
  block_n: output columns per program.
  block_k: contraction step.
  num_warps: warps per program (Triton); 4 for the Mosaic kernels, whose warpgroups
    follow block_m (one consumer warpgroup per 64 rows, plus a producer).
  num_stages: software pipeline depth (Triton ``num_stages``, Mosaic
    ``max_concurrent_steps``).
  splits: independent row chunks per expert (weight gradient only: split-K over
    the ragged rows, partial results summed afterwards); 1 elsewhere.
  loop_n: one program per row tile walks all output column blocks, keeping its
    gathered input rows on chip (Triton row kernels when the contraction fits one
    block_k); False launches one program per (row tile, column block).
  gluon: a tile of the Gluon fused-sum kernels (kernels/cvmm_triton/gluon_*.py).
  halves: 2 for the Gluon two-half row kernel (tiles of 2 * block_m rows whose halves
    share each column block of the matrix; two buffers, num_stages 2); else 1.
  producers: warpgroups that gather the Mosaic kernels' rows (1 or 2; each copies a
    contiguous share of a tile's rows with cp.async); 1 elsewhere.
  """

  block_m: int
  block_n: int
  block_k: int
  num_warps: int = 4
  num_stages: int = 3
  splits: int = 1
  loop_n: bool = False
  gluon: bool = False
  halves: int = 1
  producers: int = 1

  def __post_init__(self):
    for name in ("block_m", "block_n", "block_k"):
      v = getattr(self, name)
      if not _is_pow2(v) or v < 16:
        raise ValueError(f"{name}={v} must be a power of two >= 16 (tensor-core tiles)")
    if self.num_warps not in (1, 2, 4, 8, 16):
      raise ValueError(f"num_warps={self.num_warps} must be one of 1, 2, 4, 8, 16")
    if not 1 <= self.num_stages <= (16 if self.gluon else 8):
      raise ValueError(f"num_stages={self.num_stages} must be in [1, 8] "
                       "([2, 16] for gluon tiles)")
    if self.splits < 1:
      raise ValueError(f"splits={self.splits} must be >= 1")
    if self.halves not in (1, 2) or (self.halves > 1 and not (self.gluon and
                                                              self.num_stages == 2)):
      raise ValueError(f"halves={self.halves}: 1, or 2 for a Gluon tile of 2 "
                       f"buffers (num_stages 2), got gluon={self.gluon}, "
                       f"num_stages={self.num_stages}")
    if self.producers not in (1, 2):
      raise ValueError(f"producers={self.producers} must be 1 or 2")
    if self.gluon and not (self.loop_n and self.num_stages >= 2):
      raise ValueError("gluon tiles walk the column blocks (loop_n) with at least 2 "
                       f"buffers (num_stages), got loop_n={self.loop_n}, "
                       f"num_stages={self.num_stages}")

  def to_json(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, d: dict) -> "TileConfig":
    return cls(**d)


def cache_entry(value: dict) -> "TileConfig | str":
  """One value of the autotune cache file: a :class:`TileConfig` (a kernel's tiles) or,
  for ``{"impl": name}``, the name of the implementation "auto" chose for an operation.
  Raises ``ValueError`` (or ``TypeError`` for unknown tile fields) on anything else."""
  if set(value) == {"impl"}:
    from kernels.config import IMPLEMENTATIONS
    if value["impl"] not in IMPLEMENTATIONS or value["impl"] == "auto":
      raise ValueError(f"not an implementation: {value}")
    return value["impl"]
  return TileConfig.from_json(value)


def sources_hash(root) -> str:
  """12 hex digits of a hash of every .py file under ``root``, with its path."""
  root = pathlib.Path(root)
  h = hashlib.sha256()
  for f in sorted(root.rglob("*.py")):
    h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
  return h.hexdigest()[:12]


@functools.lru_cache(maxsize=None)
def kernels_code_hash() -> str:
  """:func:`sources_hash` of the kernels (this package): a cache of tile and
  implementation choices made by other kernel code is not read (its tiles may no
  longer compile, or no longer be the fastest)."""
  return sources_hash(pathlib.Path(__file__).resolve().parent)


def default_cache_file() -> str:
  """Where the autotuner keeps its choices when ``CVMM_AUTOTUNE_CACHE`` is unset:
  ``$XDG_CACHE_HOME/moeut_jax/autotune-<kernels_code_hash()>.json`` (``~/.cache``
  without XDG_CACHE_HOME), so that a process starts from the choices an earlier one
  measured with the same kernels."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "moeut_jax", f"autotune-{kernels_code_hash()}.json")


def next_pow2(v: int) -> int:
  return 1 << max(0, (int(v) - 1).bit_length())


def device_name() -> str:
  d = jax.devices()[0]
  return f"{d.platform}:{d.device_kind}"


@functools.lru_cache(maxsize=None)
def multiprocessor_count() -> int:
  """Streaming multiprocessors of the default GPU (CPU cores on the CPU backend)."""
  d = jax.devices()[0]
  if d.platform == "gpu":
    n = getattr(d, "core_count", None)
    if n:
      return int(n)
    try:  # jaxlib without core_count: ask the CUDA driver through Triton
      from triton.runtime import driver
      return int(driver.active.utils.get_device_properties(
          d.local_hardware_id)["multiprocessor_count"])
    except ImportError as err:
      raise RuntimeError("cannot read the multiprocessor count of the GPU") from err
  return os.cpu_count() or 1


def compile_now(fn: Callable, *args):
  """``jax.jit(fn)`` compiled for ``args`` (concrete arrays), callable eagerly.

  Autotuning runs while an outer function is being traced: the candidate inputs are
  made under ``jax.ensure_compile_time_eval()`` (so they are concrete), but the kernel
  itself must be traced outside that context (Pallas kernels need their own tracing);
  a compiled executable then runs eagerly even inside the outer trace.
  """
  return jax.jit(fn).trace(*args).lower().compile()


def time_call(fn: Callable[[], object], *, warmup: int = 1, reps: int = 5,
              calls: int = 5) -> float:
  """Median over ``reps`` rounds of the wall time in seconds per call of ``fn()`` (which
  must return jax arrays), each round ``calls`` back-to-back calls and one sync: the
  host's dispatch and sync latency is shared by the calls instead of added to each
  (with one call per round it made millisecond kernels look 0.5 ms slower and noisy
  enough to rank the candidates wrongly)."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    outs = [fn() for _ in range(calls)]
    jax.block_until_ready(outs)
    times.append((time.perf_counter() - t0) / calls)
  return statistics.median(times)


class Autotuner:
  """Chooses a :class:`TileConfig` per (device, kernel, shape, dtype), timing once; and,
  for ``impl="auto"``, an implementation per operation (:meth:`choose_impl`)."""

  def __init__(self, cache_file: str | None = None):
    """``cache_file``: the JSON file of choices ("": none); None: ``CVMM_AUTOTUNE_CACHE``,
    else :func:`default_cache_file`."""
    if cache_file is None:
      cache_file = os.environ.get("CVMM_AUTOTUNE_CACHE")
      if cache_file is None:
        cache_file = default_cache_file()
    self.cache_file = cache_file
    self._lock = threading.Lock()
    self._local = threading.local()
    self._mem: dict[str, TileConfig] = {}
    self._impls: dict[str, str] = {}         # key -> implementation name
    self.log: list[str] = []
    # where each log line is also written as it is made (a file opened by a benchmark),
    # so that a run stopped by its time limit keeps the timings it got
    self.log_stream = None
    if self.cache_file and os.path.exists(self.cache_file):
      try:
        with open(self.cache_file) as f:
          entries = {k: cache_entry(v) for k, v in json.load(f).items()}
      except (ValueError, TypeError) as err:
        raise ValueError(f"CVMM autotune cache {self.cache_file!r} is not valid "
                         f"({err}); delete it, or set CVMM_AUTOTUNE_CACHE to another "
                         "file") from err
      for k, entry in entries.items():
        if isinstance(entry, str):
          self._impls[k] = entry
        else:
          self._mem[k] = entry

  def _log(self, line: str) -> None:
    self.log.append(line)
    if self.log_stream is not None:
      self.log_stream.write(line + "\n")
      self.log_stream.flush()

  @staticmethod
  def key(kernel: str, shape: Sequence[int], dtype, config=None) -> str:
    """The cache key: device, kernel, shape, dtype and, for the kernels that take one,
    the :class:`kernels.CvmmConfig`'s :meth:`~kernels.CvmmConfig.tune_key`."""
    dt = jax.numpy.dtype(dtype).name
    key = f"{device_name()}|{kernel}|{'x'.join(map(str, shape))}|{dt}"
    return key if config is None else f"{key}|{config.tune_key()}"

  @property
  def enabled(self) -> bool:
    return os.environ.get("CVMM_AUTOTUNE", "1") != "0"

  @contextlib.contextmanager
  def first_tiles(self):
    """Inside, :meth:`choose` times no tiles: it returns the cached choice, else the
    first candidate (not cached). :meth:`choose_impl` times implementations this way, so
    that comparing two costs one compile of each, not a tile search of each."""
    self._local.first_tiles = getattr(self._local, "first_tiles", 0) + 1
    try:
      yield
    finally:
      self._local.first_tiles -= 1

  def cached(self, kernel: str, shape: Sequence[int], dtype, config=None) -> TileConfig | None:
    return self._mem.get(self.key(kernel, shape, dtype, config))

  def choose(self, kernel: str, shape: Sequence[int], dtype,
             candidates: Iterable[TileConfig],
             bench: Callable[[TileConfig], float] | None, config=None) -> TileConfig:
    """The cached choice, else the fastest candidate by ``bench`` (seconds), cached.

    Candidates come in heuristic order; without ``bench`` or with autotuning off the
    first is returned (and not written to the file: it was not measured).
    """
    k = self.key(kernel, shape, dtype, config)
    candidates = list(dict.fromkeys(candidates))
    if not candidates:
      raise ValueError(f"no tile candidates for {k}")
    with self._lock:
      if self._mem.get(k) in candidates:
        return self._mem[k]
      if k in self._mem:
        self._log(f"{k}: cached {self._mem[k]} is not a candidate now; not used")
    if (bench is None or not self.enabled or len(candidates) == 1
        or getattr(self._local, "first_tiles", 0)):
      return candidates[0]
    best = self._fastest(k, candidates, bench)
    if best is None:
      raise RuntimeError(f"every tile candidate failed for {k}; see Autotuner.log")
    with self._lock:
      self._mem[k] = best
      self._save()
    return best

  def choose_impl(self, kernel: str, shape: Sequence[int], dtype, names: Sequence[str],
                  bench: Callable[[str], float], config=None) -> str:
    """The cached implementation for an operation, else the fastest of ``names`` by
    ``bench`` (seconds), cached like the tiles. Each implementation is timed with its
    kernels' cached or first tiles (:meth:`first_tiles`); the winner's tiles are tuned
    when it runs. With autotuning off the first name is returned, unmeasured and not
    cached; a name whose bench fails (it does not compile for the shape) is left out,
    and if every one fails the first is returned."""
    names = list(dict.fromkeys(names))
    if not names:
      raise ValueError(f"no implementations to choose from for {kernel}")
    k = self.key(kernel, shape, dtype, config)
    with self._lock:
      if k in self._impls and self._impls[k] in names:
        return self._impls[k]
    if not self.enabled or len(names) == 1:
      return names[0]

    def bench_first_tiles(name):
      with self.first_tiles():
        return bench(name)
    best = self._fastest(k, names, bench_first_tiles)
    if best is None:
      return names[0]
    with self._lock:
      self._impls[k] = best
      self._save()
    return best

  def _fastest(self, k: str, options: Sequence, bench: Callable[[object], float]):
    """The option of least ``bench`` time (seconds; the first of equals), each timing
    logged under key ``k``; options whose bench raises (a tile that does not compile,
    e.g. for its shared memory) are logged and left out; None if every one does."""
    timed = []
    for option in options:
      try:
        t = bench(option)
      except Exception as err:  # noqa: BLE001  (the other options still run)
        self._log(f"{k} {option}: failed ({type(err).__name__}: {str(err)[:120]})")
        continue
      self._log(f"{k} {option}: {t * 1e3:.3f} ms")
      timed.append((t, option))
    return min(timed, key=lambda tc: tc[0])[1] if timed else None

  def _save(self):
    """Merges the choices into the cache file (written whole, then renamed into place:
    a process reading it never sees half a file). A file that cannot be written costs
    only the next process's timings: a warning, once, and the run goes on."""
    if not self.cache_file:
      return
    try:
      data = {}
      if os.path.exists(self.cache_file):
        with open(self.cache_file) as f:
          data = json.load(f)
      data.update({k: v.to_json() for k, v in self._mem.items()})
      data.update({k: {"impl": v} for k, v in self._impls.items()})
      os.makedirs(os.path.dirname(os.path.abspath(self.cache_file)), exist_ok=True)
      tmp = f"{self.cache_file}.{os.getpid()}.tmp"
      with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
      os.replace(tmp, self.cache_file)
    except (OSError, ValueError) as err:
      if not getattr(self, "_save_warned", False):
        self._save_warned = True
        warnings.warn(f"CVMM autotune cache {self.cache_file!r} not written "
                      f"({type(err).__name__}: {err}); choices are kept for this process "
                      "only", RuntimeWarning, stacklevel=3)


_TUNER: Autotuner | None = None


def tuner() -> Autotuner:
  """The process-wide autotuner (created on first use, reading its cache file: see
  :class:`Autotuner`)."""
  global _TUNER
  if _TUNER is None:
    _TUNER = Autotuner()
  return _TUNER
