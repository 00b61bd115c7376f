"""The Triton-interpreter tests (tests/interpreter/) need the interpreter chosen before
triton is imported, so the main run leaves them to tests/test_interpreter.py, which
runs each of their modules in a process of its own."""
import os

collect_ignore = [] if os.environ.get("CVMM_TRITON_INTERPRET") == "1" else ["interpreter"]
