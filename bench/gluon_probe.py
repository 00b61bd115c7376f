"""Can the next fused-sum kernel be written in Gluon (Triton's explicit-layout dialect)?

Compiles, without launching, a small warp-specialised Gluon kernel for sm90: a default
partition of 4 warps and one worker partition of 4 more. It prints what a launcher needs:
the total warp count, shared memory, and the global scratch size. jax-triton 0.3.1
cannot provide global scratch, which is why in-kernel TMA descriptors failed (fourth
session).

  python -m bench.gluon_probe          # on any machine with triton >= 3.6 (no GPU needed)

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


def main():
  k = compile_probe()
  md = k.metadata
  print(f"triton {triton.__version__}: {md.name} for sm90: {md.num_warps} warps, "
        f"{md.shared} bytes shared, global scratch {md.global_scratch_size} bytes, "
        f"PTX {len(k.asm['ptx'])} chars")


if __name__ == "__main__":
  main()
