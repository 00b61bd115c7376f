"""The σ-MoE down projection kernel (gated sum fused, float32 atomics) driven from torch.

Times ``kernels.cvmm_triton._rows_kernel`` as the down forward runs it, outside JAX (so
that Nsight Compute can profile it), for several tile configurations and tile launch
orders, next to a dense bf16 matmul with the same FLOPs:

  token      tiles by first token (what cvmm_triton does)
  expert     tiles in expert order
  win<W>     by band of W tokens, then expert: a band's output rows stay in L2 while
             each expert's matrix is read once per band

``--wt`` uses the matrices transposed (the up-projection dx kernel); ``--pair`` times
the fused σ-MoE pair forward (``_pair_fwd_kernel``) instead, tiles BMxBNxBK.

  python3 -m bench.down_probe [--tokens 65536 --experts 387 --k 16 --es 128 --d 1024]
  python3 -m bench.down_probe --pair --orders token --cfgs 256x64x64w8s4,128x128x64w8s3
  python3 -m bench.down_probe --once token:128x64w4s3,win8192:128x64w4s3   (for ncu)

Needs torch and triton; run on the GPU machine.
"""
from __future__ import annotations

import argparse

import torch
import triton

from kernels import cvmm_triton as ct


def routing(n, e, k, seed=0):
  g = torch.Generator(device="cuda").manual_seed(seed)
  sel = torch.rand(n, e, device="cuda", generator=g).topk(k, dim=1).indices  # [N, K]
  flat = sel.reshape(-1)
  pair = torch.arange(n * k, device="cuda")
  order = (flat.to(torch.int64) * (n * k) + pair).argsort()        # by expert, then pair
  sizes = torch.bincount(flat, minlength=e)
  return order.to(torch.int32).contiguous(), sizes


def tiles(order, sizes, n, k, bm, how):
  """[3, Z] int32 expert, start, end of each tile, in launch order ``how``."""
  off = [0] + sizes.cumsum(0).tolist()
  ex, st, en = [], [], []
  for x, (lo, hi) in enumerate(zip(off[:-1], off[1:])):
    for s in range(lo, hi, bm):
      ex.append(x)
      st.append(s)
      en.append(min(s + bm, hi))
  t = torch.tensor([ex, st, en], device="cuda", dtype=torch.int64)
  first = order[t[1]].to(torch.int64) // k
  if how == "token":
    key = first
  elif how == "expert":
    key = t[1]
  elif how.startswith("win"):
    w = int(how[3:])
    key = (first // w) * (n * k) + t[1]
  else:
    raise ValueError(how)
  return t[:, key.argsort(stable=True)].to(torch.int32).contiguous()


def parse_cfg(s):
  """'128x64w4s3' -> (BM, BN, warps, stages); '128x128x64w8s3' -> (BM, BN, warps,
  stages, BK) (the pair kernel's step over D)."""
  mn, rest = s.split("w")
  dims = [int(v) for v in mn.split("x")]
  w, st = (int(v) for v in rest.split("s"))
  return (dims[0], dims[1], w, st) + tuple(dims[2:])


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--tokens", type=int, default=65536)
  ap.add_argument("--experts", type=int, default=387)
  ap.add_argument("--k", type=int, default=16)
  ap.add_argument("--es", type=int, default=128)
  ap.add_argument("--d", type=int, default=1024)
  ap.add_argument("--orders", default="token,expert,win4096,win8192,win16384")
  ap.add_argument("--cfgs", default="128x64w4s3,128x64w4s2,128x64w8s3,128x128w8s3,"
                  "256x64w8s3,256x128w8s2,256x64w4s2")
  ap.add_argument("--wt", action="store_true",
                  help="matrices stored [E, D, Es] and used transposed (the up dx shape)")
  ap.add_argument("--pair", action="store_true",
                  help="the fused σ-MoE pair forward (_pair_fwd_kernel) instead")
  ap.add_argument("--once", default="")
  a = ap.parse_args(argv)
  n, e, k, es, d = a.tokens, a.experts, a.k, a.es, a.d
  p = n * k
  torch.manual_seed(0)
  h = torch.randn(p, es, device="cuda").relu().to(torch.bfloat16)
  w = (torch.randn(e, es, d, device="cuda") * es ** -0.5).to(torch.bfloat16)
  sw = (es * d, d, 1)
  w_arg = w
  if a.wt:   # the same matrices, stored transposed: element (i, o) at o * Es + i
    w_arg = w.transpose(1, 2).contiguous()
    sw = (es * d, 1, es)
  gates = torch.rand(p, device="cuda")
  out = torch.zeros(n, d, device="cuda", dtype=torch.float32)
  dummy = torch.zeros(1, device="cuda")
  order, sizes = routing(n, e, k)
  tcache = {}

  if a.pair:
    xin = torch.randn(n, d, device="cuda").to(torch.bfloat16)
    keys = (torch.randn(e, d, es, device="cuda") * d ** -0.5).to(torch.bfloat16)
    gates_b = gates.to(torch.bfloat16)
    hbuf = torch.empty(p, es, device="cuda", dtype=torch.bfloat16)

  def launch(how, cfg):
    bm, bn, warps, stages = cfg[:4]
    if a.pair:
      if (how, bm) not in tcache:
        tcache[(how, bm)] = tiles(order, sizes, n, k, bm, how)
      t = tcache[(how, bm)]

      def run_pair():
        out.zero_()
        ct._pair_fwd_kernel[(t.shape[1],)](
            xin, keys, w, order, t, gates_b, out, hbuf,
            Z=t.shape[1], D=d, H=es, O=d, K=k, S1_E=d * es, S1_D=es, S1_H=1,
            S2_E=es * d, S2_H=d, S2_O=1, BM=bm, BN=bn, BK=cfg[4], BH=es,
            IEEE=False, RED=4, num_warps=warps, num_stages=stages)
      return run_pair
    if (how, bm) not in tcache:
      tcache[(how, bm)] = tiles(order, sizes, n, k, bm, how)
    t = tcache[(how, bm)]
    z = t.shape[1]

    def run():
      out.zero_()
      ct._rows_kernel[(z,)](
          h, w_arg, order, t, gates, dummy, out, dummy,
          Z=z, I=es, O=d, K=k, A_R=k, O_R=1, C_R=1,
          SW_E=sw[0], SW_I=sw[1], SW_O=sw[2], BM=bm, BN=bn, BK=es,
          HAS_SCALE=True, ATOMIC=True, DGATE=False, IEEE=False, LOOP_N=True, RED=4,
          num_warps=warps, num_stages=stages)
    return run

  if a.once:
    for item in a.once.split(","):
      how, c = item.split(":")
      launch(how, parse_cfg(c))()
      torch.cuda.synchronize()
      print("ran", item, flush=True)
    return

  # reference: the same sum computed densely in float32 (checks every launch order)
  ref = torch.zeros(n, d, device="cuda")
  bounds = [0] + sizes.cumsum(0).tolist()
  for x in range(e):
    pr = order[bounds[x]:bounds[x + 1]].long()
    hx = (xin[pr // k].float() @ keys[x].float()).relu() if a.pair else h[pr].float()
    y = hx @ w[x].float()
    ref.index_add_(0, pr // k, y * (gates_b if a.pair else gates)[pr, None].float())

  prods = 2 if a.pair else 1       # the pair: equal FLOPs as one [P, 2D] @ [2D, Es]
  xa = torch.randn(p, es * prods, device="cuda", dtype=torch.bfloat16)
  wb = torch.randn(es * prods, d, device="cuda", dtype=torch.bfloat16)
  dense = triton.testing.do_bench(lambda: xa @ wb, warmup=50, rep=300)
  t_zero = triton.testing.do_bench(out.zero_, warmup=50, rep=300)
  flops = 2 * p * es * d * prods
  print(f"# {torch.cuda.get_device_name()}: N={n} E={e} K={k} Es={es} D={d}; dense "
        f"{dense:.3f} ms ({flops / dense / 1e9:.0f} TFLOP/s); zeroing out {t_zero:.3f} ms "
        f"(included below)")
  print("| order | BM x BN w s | ms | % of dense | max rel err |")
  print("|---|---|---|---|---|")
  plan = [(how, cs) for cs in a.cfgs.split(",") if cs for how in a.orders.split(",")]
  for how, cs in plan:
    try:
      run = launch(how, parse_cfg(cs))
      run()
      err = ((out - ref).abs().max() / ref.abs().max()).item()
      ms = triton.testing.do_bench(run, warmup=20, rep=200)
      print(f"| {how} | {cs} | {ms:.3f} | {dense / ms:.0%} | {err:.1e} |", flush=True)
    except Exception as ex:  # a config that does not compile: report, go on
      print(f"| {how} | {cs} | FAILED {type(ex).__name__}: {str(ex)[:200]} | | |",
            flush=True)


if __name__ == "__main__":
  main()
