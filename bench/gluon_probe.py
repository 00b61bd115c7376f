"""Can the next fused-sum kernel be written in Gluon (Triton's explicit-layout dialect)?

Compiles, without launching, a small warp-specialised Gluon kernel for sm90: a default
partition of 4 warps and one worker partition of 4 more. It prints what a launcher needs:
the total warp count, shared memory, and the global scratch size. jax-triton 0.3.1
cannot provide global scratch, which is why in-kernel TMA descriptors failed (fourth
session).

  python -m bench.gluon_probe          # on any machine with triton >= 3.6 (no GPU needed)
  python -m bench.gluon_probe --launch # on a GPU with jax-triton: launch it, check results

jax-triton 0.3.1 compiles every kernel through ``ASTSource`` and ``make_ttir`` /
``make_ttgir`` (``jax_triton/triton_lib.py``). A Gluon kernel emits TTGIR itself, so
jax-triton cannot compile it, although ``GluonJITFunction`` passes jax-triton's
``JITFunction`` check. Its launch layer, ``triton_kernel_call_lib.TritonKernel(name,
num_warps, num_ctas, shared_bytes, ptx, ttir, compute_capability)``, takes PTX. So a
Gluon kernel compiled here (``k.asm["ptx"]``, ``k.metadata``) could be handed to it.
"""
from __future__ import annotations

import triton
from triton.backends.compiler import GPUTarget
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon._runtime import GluonASTSource

from kernels.cvmm_gluon import install_launcher


@gluon.jit
def _doubler(x_ptr, y_ptr, BLOCK: gl.constexpr):
  layout: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
  offs = gl.arange(0, BLOCK, layout=layout)
  gl.store(y_ptr + offs, gl.load(x_ptr + offs) * 2)


@gluon.jit
def _incrementer(x_ptr, z_ptr, BLOCK: gl.constexpr):
  layout: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
  offs = gl.arange(0, BLOCK, layout=layout)
  gl.store(z_ptr + offs, gl.load(x_ptr + offs) + 1)


@gluon.jit
def _split_kernel(x_ptr, y_ptr, z_ptr, BLOCK: gl.constexpr):
  # default partition (the kernel's own 4 warps) and one worker partition of 4 warps
  gl.warp_specialize([(_doubler, (x_ptr, y_ptr, BLOCK)),
                      (_incrementer, (x_ptr, z_ptr, BLOCK))], [4], [24])


def compile_probe(cc: int = 90):
  src = GluonASTSource(_split_kernel,
                       signature={"x_ptr": "*fp32", "y_ptr": "*fp32", "z_ptr": "*fp32",
                                  "BLOCK": "constexpr"},
                       constexprs={"BLOCK": 128})
  return triton.compile(src, target=GPUTarget("cuda", cc, 32), options=dict(num_warps=4))


def launch_probe():
  """Launches the probe kernel through jax_triton.triton_call and checks both outputs."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import jax_triton as jt  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  install_launcher()
  x = jnp.arange(128, dtype=jnp.float32) - 40.0
  out = jax.ShapeDtypeStruct((128,), jnp.float32)
  y, z = jax.jit(lambda x: jt.triton_call(x, kernel=_split_kernel, out_shape=[out, out],
                                          grid=(1,), num_warps=4, BLOCK=128))(x)
  ok = np.array_equal(np.asarray(y), 2 * np.asarray(x)) and np.array_equal(
      np.asarray(z), np.asarray(x) + 1)
  print(f"launch through jax-triton on {jax.devices()[0].device_kind}: "
        f"{'correct' if ok else 'WRONG'} (y = 2x from the default partition, z = x + 1 "
        f"from the worker)")
  return ok


def main(argv=None):
  import argparse  # noqa: PLC0415
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--launch", action="store_true",
                  help="also launch the kernel through jax-triton (GPU) and check it")
  a = ap.parse_args(argv)
  k = compile_probe()
  md = k.metadata
  print(f"triton {triton.__version__}: {md.name} for sm90: {md.num_warps} warps, "
        f"{md.shared} bytes shared, global scratch {md.global_scratch_size} bytes, "
        f"PTX {len(k.asm['ptx'])} chars")
  if a.launch and not launch_probe():
    raise SystemExit(1)


if __name__ == "__main__":
  main()
