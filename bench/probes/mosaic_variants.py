"""The Mosaic GPU CVMM kernels in the shapes and routings that exposed two GPU-only traps
(bench/RESULTS.md, 'Pallas Mosaic GPU'), each variant in a process of its own so that
an illegal instruction (sticky for its CUDA context) ends only its own variant:

  PYTHONPATH=. python3 bench/probes/mosaic_variants.py            # GPU, about 90 s on an H100
  PYTHONPATH=. python3 bench/probes/mosaic_variants.py --interpret --small  # CPU interpreter
  ... --only stored_o192 gram_rand --jobs 1 --timeout 120 --list

One line per variant: ok/BAD with the relative error against XLA (float32), or the error;
every variant is expected ok.

The traps (Pallas's interpreter models neither; kernels/cvmm_mosaic/rows.py and gram.py
avoid both):
 1. A copy_smem_to_gmem that does not reduce, of a contiguous [1, bn] slice, is lowered
    to a linear cp.async.bulk (no tensor map), clamped only at the end of the whole
    array: a partial last column block (o=192, bn=128: columns 128..255) writes its 64
    out-of-bounds columns over the first 64 columns of the next row ("chunks": relative
    error per 64-column chunk; "rows_cols0_63_zeroed"). The same holds for a [64, bo]
    block of the weight gradient where bo == o and I has a partial block (i=100).
 2. A TMA copy whose start address is not 16-byte aligned traps (illegal instruction):
    the weight gradient's int32 row indices start at each expert's offset, which with
    random routings ("gram_rand") or counts of 2 mod 4 ("gram_cnt250") is not a multiple
    of 4; "gram_cnt252" (offsets multiples of 4) never hit it.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# name: (kind, params). Base problem: the probe's (bench/mosaic_probe.py): n=1000, k=4,
# e=16, i=256, o=192, bf16, routing = top-4 of random logits.
VARIANTS = {
    # -- stored forward (hypothesis 1)
    "stored_o192_bn128_bm128": ("rows", dict()),                       # the failing case
    "stored_o192_bn128_bm64": ("rows", dict(bm=64)),                   # one warpgroup
    "stored_o192_bn256": ("rows", dict(bn=256, st=2)),                 # partial block again
    "stored_o256_bn128": ("rows", dict(o=256)),                        # no partial block
    "stored_o192_bn64": ("rows", dict(bn=64)),                         # 192 = 3 x 64
    "stored_o192_scale_ones": ("rows", dict(scale="ones")),            # scaled, stored
    "stored_o192_transposed_w": ("rows", dict(transpose=True)),        # W^T operand
    "summed_o192_no_scale": ("rows", dict(out_rows=1)),                # added-rows path
    "stored_o72_i100_bn128": ("rows", dict(o=72, i=100)),               # odd widths
    # -- rows added into outputs of several column blocks, many slots a row (the σ-MoE
    #    forward and dx at MoEUT_244M: o=1024, k=16)
    "summed_o1024_k16": ("rows", dict(o=1024, k=16, out_rows=1)),
    "summed_o1024_k16_bf16": ("rows", dict(o=1024, k=16, out_rows=1, sums="bfloat16")),
    "summed_o128_k16": ("rows", dict(o=128, k=16, out_rows=1)),          # one column block
    "stored_o1024_k16": ("rows", dict(o=1024, k=16)),
    # a contraction of two chunks (the σ-MoE down projection and up's dx: i = 128) and
    # many items a block: the producers' warps run apart by whole items
    "summed_o1024_k16_i128_n8000": ("rows", dict(o=1024, k=16, i=128, n=8000, out_rows=1)),
    "stored_o1024_k16_i128_n8000": ("rows", dict(o=1024, k=16, i=128, n=8000)),
    # -- weight gradient (hypothesis 2)
    "gram_rand_bi128": ("gram", dict()),                               # the failing case
    "gram_rand_bi64": ("gram", dict(bi=64)),
    # the σ-MoE up projection's weight gradient, narrowed: many steps an item
    "gram_rand_n8000_k16_i1024_o128": ("gram", dict(n=8000, k=16, i=1024, o=128)),
    "gram_cnt250_bi128": ("gram", dict(routing="cyclic", n=1000, n_small=40)),  # 250 e
    "gram_cnt252_bi128": ("gram", dict(routing="cyclic", n=1008, n_small=48)),  # 252 e
    "gram_cnt252_bi64": ("gram", dict(routing="cyclic", n=1008, n_small=48, bi=64)),
    "gram_cnt256_bo64": ("gram", dict(routing="cyclic", n=1024, n_small=64, bo=64)),
    # a [64, bo] block of dW is contiguous where bo == o: a linear store, which the
    # partial block of I (i=100 -> rows 64..127) runs into the next expert's rows
    "gram_cnt252_i100_o64": ("gram", dict(routing="cyclic", n=1008, n_small=48, i=100, o=64,
                                          bo=64)),
    "gram_rand_i100_o64": ("gram", dict(i=100, o=64, bo=64)),
}


# ----------------------------------------------------------------------------- child

def _child(name: str, interpret: bool, small: bool) -> dict:
  kind, p = VARIANTS[name]
  sys.path.insert(0, REPO)
  sys.path.append(os.path.join(REPO, "tests"))
  import contextlib  # noqa: PLC0415

  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  import kernels  # noqa: PLC0415
  from kernels import make_routing  # noqa: PLC0415
  from kernels.autotune import TileConfig  # noqa: PLC0415
  from kernels.cvmm_mosaic.gram import expert_gram  # noqa: PLC0415
  from kernels.cvmm_mosaic.rows import rows_matmul  # noqa: PLC0415
  from cvmm_cases import by_expert_reference  # noqa: PLC0415  (tests/cvmm_cases.py)
  ctx = contextlib.nullcontext()
  if interpret:
    import mosaic_interpret  # noqa: PLC0415  (tests/mosaic_interpret.py)
    ctx = mosaic_interpret.interpret()

  n, k, e = (p.get("n_small", 100) if small else p.get("n", 1000)), p.get("k", 4), 16
  i, o = p.get("i", 256), p.get("o", 192)
  ks = jax.random.split(jax.random.key(0), 6)
  if p.get("routing") == "cyclic":   # token t -> experts 4t..4t+3 mod 16: n*k/e pairs each
    idx = (jnp.arange(n)[:, None] * k + jnp.arange(k)[None, :]) % e
  else:
    idx = jax.lax.top_k(jax.random.normal(ks[0], (n, e)), k)[1]
  r = make_routing(idx.astype(jnp.int32), e)
  counts = np.bincount(np.asarray(idx).reshape(-1), minlength=e)
  f32 = lambda v: v.astype(jnp.float32)  # noqa: E731
  hi = jax.lax.Precision.HIGHEST
  ex = r.expert_index.reshape(-1)
  tok = jnp.arange(n * k) // k
  x = jax.random.normal(ks[1], (n, i)).astype(jnp.bfloat16)
  w = (jax.random.normal(ks[2], (e, i, o)) * i ** -0.5).astype(jnp.bfloat16)
  info = {"offsets_mod4": sorted(set((np.cumsum(counts) % 4).tolist()))}

  if kind == "rows":
    bm, bn, st = p.get("bm", 128), p.get("bn", 128), p.get("st", 4)
    cfg = TileConfig(bm, bn, 64, 4, st)
    out_rows = p.get("out_rows", k)
    scale = jnp.ones((n * k,), jnp.float32) if p.get("scale") == "ones" else None
    transpose = p.get("transpose", False)
    wk = jnp.swapaxes(w, 1, 2) if transpose else w                  # [e, o, i] used as W^T
    y_ref = by_expert_reference(f32(x)[:, None], r, f32(w))               # [n, k, o]
    ref = y_ref.reshape(n * k, o) if out_rows == k else y_ref.sum(1)

    def fn(x, wk):
      return rows_matmul(x, wk, r, a_rows=1, out_rows=out_rows, transpose_w=transpose,
                         scale=scale, sum_dtype=jnp.dtype(p.get("sums", "float32")),
                         cfg=cfg)[0]
    args = (x, wk)
    info["cfg"] = f"{bm}x{bn} s{st}"
  else:
    bi, bo = p.get("bi", 128), p.get("bo", 128)
    cfg = TileConfig(bi, bo, 64, 4, 4)
    dy = jax.random.normal(ks[4], (n * k, o)).astype(jnp.bfloat16)
    ref = jnp.einsum("pi,pe,po->eio", f32(x)[tok], jax.nn.one_hot(ex, e), f32(dy),
                     precision=hi)                                    # [e, i, o]

    def fn(x, dy):
      return expert_gram(x, dy, r, a_rows=1, b_rows=k, out_dtype=jnp.float32, cfg=cfg)
    args = (x, dy)
    info["cfg"] = f"{bi}x{bo} s4"

  t0 = time.perf_counter()
  with ctx:
    got = jax.block_until_ready(jax.jit(fn)(*args))
  got = np.asarray(got, np.float64)
  ref = np.asarray(ref, np.float64)
  info["seconds"] = round(time.perf_counter() - t0, 2)
  rel = lambda a, b: float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))  # noqa: E731
  info["rel"] = rel(got, ref)
  if kind == "rows":   # where the damage is: per 64-column chunk, rows with a zeroed chunk
    info["chunks"] = [round(rel(got[:, c:c + 64], ref[:, c:c + 64]), 4)
                      for c in range(0, ref.shape[1], 64)]
    zero0 = np.all(got[:, :64] == 0, axis=1) & np.any(ref[:, :64] != 0, axis=1)
    info["rows_cols0_63_zeroed"] = f"{int(zero0.sum())}/{ref.shape[0]}"
  info["ok"] = info["rel"] < 2e-2
  return info


# ----------------------------------------------------------------------------- parent

def _classify(text: str) -> str:
  for key in ("ILLEGAL_INSTRUCTION", "ILLEGAL_ADDRESS", "MISALIGNED_ADDRESS",
              "LAUNCH_FAILED", "out of memory", "RESOURCE_EXHAUSTED"):
    if key in text:
      return key
  lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
  errs = [ln for ln in lines if "Error" in ln or "error" in ln]
  return (errs[-1] if errs else (lines[-1] if lines else "no output"))[:240]


def _run(name: str, interpret: bool, small: bool, timeout: float) -> tuple[str, str]:
  cmd = [sys.executable, os.path.abspath(__file__), "--child", name]
  if interpret:
    cmd.append("--interpret")
  if small:
    cmd.append("--small")
  env = dict(os.environ)
  env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")   # several children at once
  env["PYTHONPATH"] = os.pathsep.join(
      [REPO] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
  if interpret:
    env["JAX_PLATFORMS"] = "cpu"
  t0 = time.perf_counter()
  try:
    pr = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                        cwd=REPO)
  except subprocess.TimeoutExpired:
    return name, f"TIMEOUT after {timeout:.0f} s (hang?)"
  dt = time.perf_counter() - t0
  for line in pr.stdout.splitlines():
    if line.startswith("RESULT "):
      d = json.loads(line[7:])
      tag = "ok  " if d.pop("ok") else "BAD "
      rel = d.pop("rel")
      return name, f"{tag} rel {rel:.3g}  {json.dumps(d)}  ({dt:.0f} s)"
  return name, f"FAIL {_classify(pr.stderr + pr.stdout)}  (rc {pr.returncode}, {dt:.0f} s)"


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--child", help=argparse.SUPPRESS)
  ap.add_argument("--interpret", action="store_true",
                  help="run the kernels in Pallas's Mosaic GPU interpreter (CPU)")
  ap.add_argument("--small", action="store_true",
                  help="about a tenth of the tokens (the interpreter takes minutes at full size)")
  ap.add_argument("--only", nargs="*", help="variants whose name contains any of these")
  ap.add_argument("--jobs", type=int, default=2, help="variants at once (default 2)")
  ap.add_argument("--timeout", type=float, default=120, help="seconds per variant")
  ap.add_argument("--list", action="store_true")
  a = ap.parse_args()
  if a.child:
    print("RESULT " + json.dumps(_child(a.child, a.interpret, a.small)), flush=True)
    return 0
  names = [v for v in VARIANTS if not a.only or any(s in v for s in a.only)]
  if a.list:
    print("\n".join(names))
    return 0
  dev = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                       capture_output=True, text=True) if shutil.which("nvidia-smi") else None
  print(f"# {len(names)} variants, {'interpreter (CPU)' if a.interpret else 'GPU'}"
        f"{', ' + dev.stdout.strip().splitlines()[0] if dev and dev.stdout.strip() else ''}"
        f", jobs {a.jobs}", flush=True)
  t0 = time.perf_counter()
  width = max(map(len, names))
  with cf.ThreadPoolExecutor(max(1, a.jobs)) as pool:
    futs = [pool.submit(_run, nm, a.interpret, a.small, a.timeout) for nm in names]
    for f in futs:   # in the table's order
      nm, line = f.result()
      print(f"{nm:{width}s}  {line}", flush=True)
  print(f"# {time.perf_counter() - t0:.0f} s", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
