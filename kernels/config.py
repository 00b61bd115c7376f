"""The kernels' configuration: one frozen object, passed down as a static argument.

``CvmmConfig`` holds the choices a user can reasonably make about the CVMM kernels. It
is hashable, so it goes to ``jax.jit`` as a static argument, selects the custom_vjp op
(forward and backward pass sum the same way), and is part of every autotune cache key
(:meth:`CvmmConfig.tune_key`). Models take it as one field (``MoEUTLM(..., cvmm=...)``)
and ``train.py`` builds it from its ``--cvmm-*`` flags.

Process-level tooling stays in the environment (read by :mod:`kernels.autotune` and
:mod:`kernels.cvmm_triton.launch`): ``CVMM_AUTOTUNE_CACHE`` (the autotuner's JSON
file), ``CVMM_AUTOTUNE=0`` (heuristic tiles, no timing) and ``CVMM_TRITON_INTERPRET=1``
(Triton's CPU interpreter, for tests). The original MoEUT's kernels (``impl="original"``)
come from a folder the config names (``original_path``), never from the environment.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

# Implementations of CVMM (kernels/cvmm.py says what each is); "auto" picks one.
IMPLEMENTATIONS = ("reference", "xla", "triton", "triton_unfused", "mosaic", "original",
                   "auto")
# dtypes of the Triton kernels' sums over experts in 16-bit calls.
SUM_DTYPES = ("float16", "float32", "bfloat16")
# How float16 sums choose each output row's power-of-two scale.
F16_SCALES = ("checked", "bound")


def check_original_path(path) -> str:
  """The absolute path of a folder that holds the official MoEUT's ``moeut/cvmm.py``;
  a clear error otherwise."""
  if not isinstance(path, str) or not path:
    raise ValueError(f"original_path={path!r} must name the folder of a clone of the "
                     "official MoEUT (the folder that holds moeut/cvmm.py)")
  full = os.path.abspath(os.path.expanduser(path))
  if not os.path.isdir(full):
    raise FileNotFoundError(f"original_path={path!r}: no such folder ({full})")
  if not os.path.isfile(os.path.join(full, "moeut", "cvmm.py")):
    raise FileNotFoundError(
        f"original_path={path!r} holds no moeut/cvmm.py: give the folder of a clone of "
        "the official MoEUT (with its moeut/ package, profiles.py and example.py)")
  return full


@dataclasses.dataclass(frozen=True)
class CvmmConfig:
  """How the CVMM kernels run.

  impl: "auto" (the fastest available: Triton on GPUs, XLA elsewhere), "triton",
    "triton_unfused" (sums over slots through a stored [P, O] intermediate), "mosaic"
    (Pallas on Mosaic GPU, Hopper), "xla" (pure JAX), "reference" (tests) or "original"
    (the official MoEUT's own Triton kernels and its CVMM op's numerics, loaded from
    ``original_path``: kernels/cvmm_original.py; for comparisons with the original).
  sum_dtype: dtype of the GPU kernels' sums over experts in 16-bit calls (Triton
    and Mosaic): "float16" (each output row scaled by a power of two, summed in
    float16, scaled back: half the traffic of float32 sums at about their accuracy),
    "float32", or "bfloat16" (Hopper; 2.3x the error of float32 sums). float32 calls
    and the other implementations sum in float32.
  f16_scales: how the Triton kernels' float16 sums choose each row's scale: "checked"
    (an estimate; the scale-back recomputes in float32 any row that overflowed or came
    out too small) or "bound" (a bound on the row's terms that no sum can exceed: two
    more passes over the inputs, no row recomputed). The Mosaic kernels always use
    the bound.
  gluon: let the fused 16-bit sums run the Gluon kernels on Hopper (the autotuner
    chooses between them and the Triton ones); False keeps to Triton.
  unit_pairs: SwitchHead routings carry unit pairs (a head's two experts multiplied
    in one tile and added before one reduction): None from 2^18 (token, head) units
    on GPUs (below that the sort costs more than it saves), True always on GPUs,
    False never.
  original_path: the folder of a clone of the official MoEUT (holding moeut/cvmm.py),
    whose kernels ``impl="original"`` runs; required by that implementation and refused
    by the others.
  """

  impl: str = "auto"
  sum_dtype: str = "float16"
  f16_scales: str = "checked"
  gluon: bool = True
  unit_pairs: Optional[bool] = None
  original_path: Optional[str] = None

  def __post_init__(self):
    if self.impl not in IMPLEMENTATIONS:
      raise ValueError(f"impl={self.impl!r} must be one of {IMPLEMENTATIONS}")
    if self.sum_dtype not in SUM_DTYPES:
      raise ValueError(f"sum_dtype={self.sum_dtype!r} must be one of {SUM_DTYPES}")
    if self.f16_scales not in F16_SCALES:
      raise ValueError(f"f16_scales={self.f16_scales!r} must be one of {F16_SCALES}")
    if not isinstance(self.gluon, bool):
      raise ValueError(f"gluon={self.gluon!r} must be True or False")
    if self.unit_pairs not in (None, True, False):
      raise ValueError(f"unit_pairs={self.unit_pairs!r} must be None, True or False")
    if self.impl == "original":
      if self.original_path is None:
        raise ValueError('impl="original" runs the official MoEUT\'s kernels: pass '
                         "original_path, the folder of a clone of it (holding moeut/cvmm.py)")
      check_original_path(self.original_path)
    elif self.original_path is not None:
      raise ValueError(f"original_path={self.original_path!r} is used only by "
                       f'impl="original", not impl={self.impl!r}')

  def replace(self, **changes) -> "CvmmConfig":
    return dataclasses.replace(self, **changes)

  def tune_key(self) -> str:
    """The fields that change what a kernel call does or which tiles it can take, for
    the autotuner's cache keys (the implementation is the key's kernel name)."""
    return f"{self.sum_dtype}.{self.f16_scales}.{'gluon' if self.gluon else 'triton'}"


DEFAULT = CvmmConfig()
