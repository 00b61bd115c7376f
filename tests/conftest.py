"""The Triton-interpreter tests (tests/interpreter/) need the interpreter chosen before
triton is imported, so the main run leaves them to tests/test_interpreter.py, which
runs each of their modules in a process of its own.

Under pytest-xdist (pyproject's addopts: -n auto --dist loadgroup), the tests of a module
that use one of its module-scoped fixtures (a trained run, a compiled model) form one
group that a single worker runs, so that the fixture is built once; other tests go to
whichever worker is free."""
import os
import pkgutil

import pytest

collect_ignore = [] if os.environ.get("CVMM_TRITON_INTERPRET") == "1" else ["interpreter"]


def _cpu_only() -> bool:
  """No JAX accelerator plugin (CUDA, ROCm) installed: JAX will run on the CPU."""
  try:
    import jax_plugins  # noqa: PLC0415  (the namespace JAX's plugins install into)
  except ImportError:
    return True
  return not any(pkgutil.iter_modules(jax_plugins.__path__))


# On a CPU, compiling hundreds of small programs that each run a few times is most of this
# suite's time. Without LLVM's optimisations XLA compiles them about a quarter faster
# (CPU time of tests/test_parity.py and tests/test_routing.py: 316 -> 232 s); results
# move at float32 rounding, far inside every tolerance. Set before JAX starts; inherited
# by the tests' subprocesses. An XLA_FLAGS that sets the level itself is left alone.
if _cpu_only() and "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_backend_optimization_level=0").strip()


# The tests read and write no user's autotune cache (kernels/autotune.py,
# default_cache_file) unless CVMM_AUTOTUNE_CACHE names a file.
os.environ.setdefault("CVMM_AUTOTUNE_CACHE", "")


@pytest.hookimpl(tryfirst=True)  # before xdist reads the xdist_group marks
def pytest_collection_modifyitems(items):
  for item in items:
    info = getattr(item, "_fixtureinfo", None)
    if info is not None and any(defs[-1].scope == "module"
                                for defs in info.name2fixturedefs.values()):
      item.add_marker(pytest.mark.xdist_group(item.module.__name__))
