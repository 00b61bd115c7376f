"""How fast can a kernel add gathered float32 rows into a [N, D] output on this GPU?

The gated sum of σ-MoE's down projection adds P = N*K rows of D floats into N output
rows chosen by index (2^30 adds at MoEUT_244M). This probe does only that, with the
real access pattern (random top-K routing, expert-sorted tiles of BM rows), no matmul,
in several ways, and prints one table (G adds/s, and GB/s of added data: 4 bytes per
add, 2 for bf16):

  v4        red.global.add.v4.f32 into the gathered rows (what the CVMM kernels do)
  bf16      red.global.add.noftz.v4.bf16x2 into a bf16 output (CvmmConfig(sum_dtype="bfloat16"))
  scalar    tl.atomic_add (relaxed), one float per reduction
  store     plain stores to the same rows (no reduction: a bound on the scatter)
  tma_row   one TMA bulk-tensor reduction (cp.reduce.async.bulk.tensor) per row
  *_exp     tiles launched in expert order instead of by first token
  *_win     token index modulo 4096 (a 16 MiB output that stays in L2)
  *_contig  consecutive rows, no gather (tiles cover rows z*BM .. z*BM+BM-1)

  python3 -m bench.probes.reduce_probe [--tokens 65536] [--experts 387] [--k 16] [--d 1024]
  python3 -m bench.probes.reduce_probe --once v4,store    (each variant once, for ncu)

Needs torch and triton (not jax); run on the GPU machine.
"""
from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl

from kernels.cvmm_triton.primitives import RED_BF16_V8 as _RED_BF16_V8, red_half_v8 as _red_half_v8, red_v4 as _red_v4


@triton.jit
def _probe_kernel(out_ptr, tok_ptr, start_ptr, end_ptr, N_OUT, D: tl.constexpr,
                  BM: tl.constexpr, BN: tl.constexpr, MODE: tl.constexpr,
                  WIN: tl.constexpr, CONTIG: tl.constexpr):
  z = tl.program_id(0)
  s = tl.load(start_ptr + z)
  e = tl.load(end_ptr + z)
  r = tl.arange(0, BM)
  rows = s + r
  m = rows < e
  if CONTIG:
    tok = (z * BM + r) % N_OUT
  else:
    tok = tl.load(tok_ptr + rows, mask=m, other=0)
  if WIN > 0:
    tok = tok % WIN
  tok = tok.to(tl.int64)
  if MODE == 3:  # TMA bulk reduction, one [1, BN] box per row
    desc = tl.make_tensor_descriptor(out_ptr, shape=[N_OUT, D], strides=[D, 1],
                                     block_shape=[1, BN])
    row_val = (tl.arange(0, BN)[None, :] * 1e-3 + z).to(tl.float32)
    for i in range(0, BM):
      if s + i < e:
        if CONTIG:
          t = (z * BM + i) % N_OUT
        else:
          t = tl.load(tok_ptr + s + i)
        if WIN > 0:
          t = t % WIN
        for n0 in tl.static_range(0, D, BN):
          desc.atomic_add([t, n0], row_val)
  else:
    for n0 in tl.static_range(0, D, BN):
      if MODE == 4:  # 8 bf16 per reduction
        c8 = n0 + tl.arange(0, BN // 8) * 8
        v = ((r[:, None] + c8[None, :]).to(tl.float32) * 1e-3 + z).to(tl.bfloat16)
        _red_half_v8((out_ptr + tok[:, None] * D + c8[None, :]).to(tl.int64), v, v + 1.0,
                     v + 2.0, v + 3.0, v + 4.0, v + 5.0, v + 6.0, v + 7.0,
                     m[:, None] & (c8[None, :] < D), _RED_BF16_V8)
      elif MODE == 0:  # 4-wide vector reductions
        c4 = n0 + tl.arange(0, BN // 4) * 4
        v = (r[:, None] + c4[None, :]).to(tl.float32) * 1e-3 + z
        _red_v4((out_ptr + tok[:, None] * D + c4[None, :]).to(tl.int64), v, v + 1.0,
                v + 2.0, v + 3.0, m[:, None] & (c4[None, :] < D))
      else:
        c = n0 + tl.arange(0, BN)
        v = (r[:, None] + c[None, :]).to(tl.float32) * 1e-3 + z
        p = out_ptr + tok[:, None] * D + c[None, :]
        if MODE == 1:
          tl.atomic_add(p, v, mask=m[:, None], sem="relaxed")
        else:
          tl.store(p, v, mask=m[:, None])


MODES = {"v4": 0, "scalar": 1, "store": 2, "tma_row": 3, "bf16": 4}


def tiles(n, e, k, bm, order, seed=0):
  """Sorted token of each pair and the [start, end) rows of each tile, as the CVMM
  kernels build them: pairs sorted by expert then token, each expert cut in BM rows."""
  g = torch.Generator(device="cuda").manual_seed(seed)
  logits = torch.rand(n, e, device="cuda", generator=g)
  sel = logits.topk(k, dim=1).indices.reshape(-1)                 # [N*K]
  tok = torch.arange(n, device="cuda").repeat_interleave(k)
  key = sel.to(torch.int64) * n + tok
  order_ = key.argsort()
  sorted_tok = tok[order_].to(torch.int32).contiguous()
  sizes = torch.bincount(sel, minlength=e)
  off = torch.cat([torch.zeros(1, dtype=torch.int64, device="cuda"), sizes.cumsum(0)])
  starts, ends = [], []
  for lo, hi in zip(off[:-1].tolist(), off[1:].tolist()):
    for s in range(lo, hi, bm):
      starts.append(s)
      ends.append(min(s + bm, hi))
  st = torch.tensor(starts, device="cuda", dtype=torch.int32)
  en = torch.tensor(ends, device="cuda", dtype=torch.int32)
  if order == "token":
    first = sorted_tok[st.long()]
    o = first.argsort(stable=True)
    st, en = st[o].contiguous(), en[o].contiguous()
  return sorted_tok, st, en


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--tokens", type=int, default=65536)
  ap.add_argument("--experts", type=int, default=387)
  ap.add_argument("--k", type=int, default=16)
  ap.add_argument("--d", type=int, default=1024)
  ap.add_argument("--bm", type=int, default=128)
  ap.add_argument("--variants", default="v4,v4_exp,v4_win,v4_contig,scalar,store,"
                  "store_contig,tma_row,tma_row_contig")
  ap.add_argument("--once", default="")
  a = ap.parse_args(argv)
  triton.set_allocator(lambda size, align, stream: torch.empty(
      size, dtype=torch.int8, device="cuda"))
  n, d = a.tokens, a.d
  out = torch.zeros(n, d, device="cuda", dtype=torch.float32)
  out_bf16 = torch.zeros(n, d, device="cuda", dtype=torch.bfloat16)
  data = {o: tiles(n, a.experts, a.k, a.bm, o) for o in ("token", "expert")}
  adds = n * a.k * d
  print(f"# {torch.cuda.get_device_name()}, N={n} E={a.experts} K={a.k} D={d} "
        f"BM={a.bm}: {adds / 2**30:.2f} Gi adds")
  print("| variant | BN | warps | ms | G adds/s | GB/s |")
  print("|---|---|---|---|---|---|")
  names = [s for s in (a.once or a.variants).split(",") if s]
  for name in names:
    parts = name.split("_")
    mode = MODES["tma_row" if name.startswith("tma_row") else parts[0]]
    tok, st, en = data["expert" if "exp" in parts else "token"]
    win = 4096 if "win" in parts else 0
    contig = "contig" in parts
    for bn, warps in ((128, 4), (256, 8)) if not a.once else ((128, 4),):
      def run():
        _probe_kernel[(st.numel(),)](out_bf16 if mode == 4 else out, tok, st, en, n,
                                     D=d, BM=a.bm, BN=bn, MODE=mode, WIN=win,
                                     CONTIG=contig, num_warps=warps)
      try:
        if a.once:
          run()
          torch.cuda.synchronize()
          print(f"ran {name}")
          continue
        ms = triton.testing.do_bench(run, warmup=50, rep=300)
        print(f"| {name} | {bn} | {warps} | {ms:.3f} | {adds / ms / 1e6:.0f} | "
              f"{adds * (2 if mode == 4 else 4) / ms / 1e6:.0f} |", flush=True)
      except Exception as err:  # report a variant that does not compile, go on
        print(f"| {name} | {bn} | {warps} | FAILED {type(err).__name__}: "
              f"{str(err)[:300]} | | |", flush=True)


if __name__ == "__main__":
  main()
