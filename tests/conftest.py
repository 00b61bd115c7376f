"""The Triton-interpreter tests (tests/interpreter/) need the interpreter chosen before
triton is imported, so the main run leaves them to tests/test_interpreter.py, which
runs each of their modules in a process of its own.

Under pytest-xdist (pyproject's addopts: -n auto --dist loadgroup), the tests of a module
that use one of its module-scoped fixtures (a trained run, a compiled model) form one
group that a single worker runs, so that the fixture is built once; other tests go to
whichever worker is free."""
import os

import pytest

collect_ignore = [] if os.environ.get("CVMM_TRITON_INTERPRET") == "1" else ["interpreter"]


@pytest.hookimpl(tryfirst=True)  # before xdist reads the xdist_group marks
def pytest_collection_modifyitems(items):
  for item in items:
    info = getattr(item, "_fixtureinfo", None)
    if info is not None and any(defs[-1].scope == "module"
                                for defs in info.name2fixturedefs.values()):
      item.add_marker(pytest.mark.xdist_group(item.module.__name__))
