"""GPU memory settings: train.py's default share of the GPU and its out-of-memory message."""
import os
import subprocess
import sys
import textwrap

import jax
import pytest

from moeut_jax.training import Config
from moeut_jax.training.memory import (MEMORY_VARIABLES, is_out_of_memory,
                                       out_of_memory_message)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train  # noqa: E402  pylint: disable=wrong-import-position

OOM_TEXT = ("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 25769803776 bytes.\n"
            "BufferAssignment OOM Debugging.\n" + "  value: <123 fusion.4 @0> ...\n" * 200)


def _oom() -> Exception:
  """XLA's out-of-memory error as a run meets it: raised from inside another error."""
  try:
    try:
      raise jax.errors.JaxRuntimeError(OOM_TEXT)
    except jax.errors.JaxRuntimeError as inner:
      raise RuntimeError("while running the train step") from inner
  except RuntimeError as outer:
    return outer


def test_out_of_memory_is_recognised_through_the_chain():
  assert is_out_of_memory(_oom())
  assert is_out_of_memory(jax.errors.JaxRuntimeError(OOM_TEXT))
  assert not is_out_of_memory(jax.errors.JaxRuntimeError("INTERNAL: cuDNN failed"))
  assert not is_out_of_memory(RuntimeError("RESOURCE_EXHAUSTED but not from XLA"))
  assert not is_out_of_memory(ValueError("bad"))


def test_out_of_memory_message_says_what_to_change(monkeypatch):
  for name in MEMORY_VARIABLES:
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
  config = Config.for_profile("MoEUT_244M", batch_size=64, grad_accum=2, remat="none")
  text = out_of_memory_message(_oom(), config)
  assert text.startswith("out of device memory: RESOURCE_EXHAUSTED: Out of memory while "
                         "trying to allocate 25769803776 bytes.\n")
  assert "BufferAssignment" not in text and len(text.splitlines()) <= 8
  for hint in ("--remat elementwise, lean, save_projections or full (now none)",
               "--grad-accum: micro-batches per step (now 2, 32 sequences each)",
               "--batch-size (now 64)", "--seq-len (now 1024)",
               "XLA_PYTHON_CLIENT_MEM_FRACTION=0.95"):
    assert hint in text, hint
  full = out_of_memory_message(_oom(), config.replace(remat="full"))
  assert "--remat" not in full
  general = out_of_memory_message(_oom(), None)           # eval and sample: no config
  assert "a smaller batch" in general and "XLA_PYTHON_CLIENT_MEM_FRACTION" in general


def test_remat_auto_is_elementwise_on_gpus_and_none_elsewhere(monkeypatch):
  config = Config.for_profile("MoEUT_244M")
  assert config.remat == "auto"
  assert config.remat_policy("gpu") == "elementwise"
  assert config.remat_policy("cpu") == "none"
  assert config.replace(remat="full").remat_policy("gpu") == "full"
  assert config.model_kwargs()["remat"] == config.remat_policy(jax.default_backend())
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert config.model_kwargs()["remat"] == "elementwise"
  text = out_of_memory_message(_oom(), config)
  assert "--remat lean, save_projections or full (now auto: elementwise)" in text
  with pytest.raises(ValueError, match="remat='some'"):
    Config.for_profile("MoEUT_244M", remat="some")


def test_cli_reports_out_of_memory_without_traceback(monkeypatch, tmp_path, capsys):
  import moeut_jax.training  # pylint: disable=import-outside-toplevel

  def train_and_evaluate(config, workdir):
    raise _oom()

  monkeypatch.setattr(moeut_jax.training, "train_and_evaluate", train_and_evaluate)
  assert train.main(["--workdir", str(tmp_path), "--remat", "save_projections",
                     "--jax-cache", ""]) == 1
  err = capsys.readouterr().err
  assert err.startswith("error: out of device memory: RESOURCE_EXHAUSTED")
  assert "--remat full (now save_projections)" in err
  assert "Traceback" not in err and "BufferAssignment" not in err


def test_memory_variables_are_the_same_list():
  assert train._MEMORY_VARIABLES == MEMORY_VARIABLES  # pylint: disable=protected-access


@pytest.mark.parametrize("name", MEMORY_VARIABLES)
def test_any_memory_variable_of_the_user_is_kept(name):
  env = {name: "0.5" if "FRACTION" in name else "false" if "PREALLOCATE" in name
         else "platform"}
  assert not train.set_gpu_memory_default(env)
  assert env == {name: env[name]}      # nothing added: JAX refuses both fraction names
  env = {"PATH": "/bin"}
  assert train.set_gpu_memory_default(env)
  assert env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == train.GPU_MEMORY_FRACTION == "0.95"


# What XLA_PYTHON_CLIENT_MEM_FRACTION was when JAX was first imported by train.main.
_PROBE = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {root!r})
    seen = []

    class Probe:
      def find_spec(self, name, path=None, target=None):
        if name == "jax" and not seen:
          seen.append(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "unset"))
        return None

    sys.meta_path.insert(0, Probe())
    import train
    assert "jax" not in sys.modules
    code = train.main(["--steps", "0"])   # parses the flags (imports JAX), then refuses
    print(code, seen[0])
""")


@pytest.mark.parametrize("user, expected", [(None, "0.95"), ("0.5", "0.5")])
def test_train_sets_the_memory_fraction_before_jax_starts(user, expected):
  env = {k: v for k, v in os.environ.items() if k not in MEMORY_VARIABLES}
  env["JAX_PLATFORMS"] = "cpu"
  if user is not None:
    env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = user
  proc = subprocess.run([sys.executable, "-c", _PROBE.format(root=ROOT)], env=env,
                        capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.split() == ["2", expected]
