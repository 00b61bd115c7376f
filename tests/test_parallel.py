"""moeut_jax.parallel: routing and the expert kernels run on each device's rows under a mesh."""
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from moeut_jax.parallel import batch_axes, per_device

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_without_a_mesh_the_function_is_called_as_is():
  assert batch_axes() == ((), 1)
  calls = []

  def fn(a, b, w):
    calls.append((a.shape, b, w.shape))
    return a * w.sum()

  out = per_device(fn, (jnp.ones((3, 2)), None), (jnp.full((4,), 2.0),))
  assert calls == [((3, 2), None, (4,))]
  np.testing.assert_array_equal(np.asarray(out), np.full((3, 2), 8.0))


def test_one_device_mesh_splits_nothing():
  with jax.set_mesh(Mesh(np.asarray(jax.devices()[:1]), ("data",))):
    assert batch_axes() == ((), 1)


def test_batched_arrays_must_agree_on_the_batch():
  with pytest.raises(ValueError, match="disagree on the batch size"):
    per_device(lambda a, b: a, (jnp.ones((3, 2)), jnp.ones((4, 2))))


_SCRIPT = textwrap.dedent("""
    import re
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from moeut_jax import MoEUTLM
    from moeut_jax.parallel import batch_axes, per_device

    assert len(jax.devices()) == 4
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    m = MoEUTLM(n_tokens=256, d_model=64, n_layers=2, n_heads=2, d_head=16,
                ff_n_experts=8, att_n_experts=4, ff_expert_size=16, ff_k=2, att_k=2,
                group_size=2, ff_expert_dropout=0.1, att_expert_dropout=0.1)
    toks = jax.random.randint(jax.random.key(3), (8, 32), 0, 256)
    params = m.init(jax.random.key(0), toks)["params"]

    def loss(p, t):
      out = m.apply({"params": p}, t, train=True, rngs={"dropout": jax.random.key(5)})
      return jnp.mean(out.outputs.astype(jnp.float32) ** 2) + out.reg_loss

    ref = jax.jit(jax.value_and_grad(loss))(params, toks)      # one device, no mesh
    sharded = jax.jit(jax.value_and_grad(loss),
                      in_shardings=(NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))))
    with jax.set_mesh(mesh):
      assert batch_axes() == (("data",), 4)
      hlo = sharded.lower(params, toks).compile().as_text()
      got = sharded(params, toks)
      # A batch that does not divide over the devices: the function runs on all of it.
      odd = per_device(lambda a: a + jnp.asarray(a.shape[0], a.dtype), (jnp.zeros((6, 2)),))
      assert float(odd[0, 0]) == 6.0, odd

    # jax.make_mesh's default, Explicit axes: refused with a message that says what to do.
    explicit = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    with jax.set_mesh(explicit):
      try:
        jax.jit(loss)(params, toks)
        raise AssertionError("an Explicit mesh was accepted")
      except ValueError as err:
        assert "Auto" in str(err) and "['data']" in str(err), err

    # Every sort of token-expert pairs is over one device's pairs: 2 sequences x 32
    # tokens x k = 2 slots (σ-MoE) or 2 heads x 2 slots (SwitchHead), not 4x that.
    sorts = set(re.findall(r"= s32\\[(\\d+)\\]\\S* sort\\(", hlo))
    assert sorts and sorts <= {"128", "256"}, sorts
    assert "all-gather" not in hlo, "the batch was gathered"
    worst = 0.0
    for path, a, b in zip(jax.tree_util.tree_leaves_with_path(ref), jax.tree.leaves(got),
                          jax.tree.leaves(ref)):
      a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
      err = np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)
      assert err <= 1e-5, (jax.tree_util.keystr(path[0]), err)
      worst = max(worst, err)
    print("OK", sorted(sorts), worst)
""")


def test_four_devices_route_their_own_tokens_and_match_one_device():
  """Under a 4-device mesh the σ-MoE and SwitchHead routing sorts hold one device's pairs,
  nothing is all-gathered, and the loss and every gradient (expert dropout on) equal
  the unsharded computation's."""
  env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "")
             + " --xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True,
                        text=True, timeout=600, cwd=ROOT)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  assert proc.stdout.strip().splitlines()[-1].startswith("OK"), proc.stdout
