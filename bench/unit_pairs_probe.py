"""SwitchHead's V and O with and without unit pairs (kernels/cvmm_gluon.py,
_pairs_sum_kernel), and with other tiles of it, in one run.

  python -m bench.unit_pairs_probe [--profile MoEUT_244M] [--tokens 65536]
      [--settings plain,0,1,128x32x8x2]

SwitchHead's routings carry unit pairs. Each setting is a value of CVMM_UNIT_PAIRS (0:
the kernels do not use them; 1: the default tile; BMxBNxWxB: that tile), "combo" (the
default tile, with the tiles launched combination by combination instead of by first
token), "plain" (a routing without unit pairs, make_routing's order: the default below
2^18 units) or "store" (the default tile, and O's dx through the unit-store kernel,
CVMM_UNIT_STORE=1: the library's default; every other setting runs with
CVMM_UNIT_STORE=0). For each setting the O forward, the O forward+backward and the V
forward+backward are timed as bench/cvmm.py times them (the routing, with its unit
pairs, computed outside the timed call), with the dense matmuls of the same FLOPs; the
outputs' error against the first setting is printed. First, the routing itself is
timed (jitted make_head_routing with and without unit pairs, and the tile lists the
calls use).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import profiles  # noqa: E402
from bench.cvmm import (_cotangent, _dense, _fwd_fn, _fwdbwd_fn, _rel, _time,  # noqa: E402
                        projections)
from kernels import make_head_routing  # noqa: E402
from kernels.routing import sum_tile_order  # noqa: E402


def _local_index(r, ea: int) -> jax.Array:
  """[N, H, 2] each head's own expert numbers, from a SwitchHead routing."""
  n = r.n_tokens
  h = r.k // 2
  return (r.expert_index.reshape(n, h, 2)
          - (jnp.arange(h, dtype=jnp.int32) * ea)[:, None]).astype(jnp.int32)


def time_routing(idx: jax.Array, ea: int, block_m: int = 128) -> str:
  """ms of one jitted SwitchHead routing with and without unit pairs, keeping what a
  layer's calls read at one tile height: the order, offsets, the tile lists in expert
  and launch order and, with unit pairs, theirs."""
  def f(unit_pairs):
    def route(i):
      r = make_head_routing(i, ea, unit_pairs=unit_pairs, tile_blocks=(block_m,))
      out = [r.order, r.group_offsets, r.ordered_tiles(block_m, "expert"),
             r.ordered_tiles(block_m, sum_tile_order())]
      if r.pairs is not None:
        out += [r.pairs.lo, r.pairs.hi, r.pairs.tiles(block_m)]
      return out
    return jax.jit(route)
  return ", ".join(f"{'with' if up else 'without'} unit pairs {_time(f(up), idx) * 1e3:.3f} ms"
                   for up in (False, True))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--profile", default="MoEUT_244M")
  ap.add_argument("--tokens", type=int, default=64 * 1024)
  ap.add_argument("--settings", default="plain,0,1,store")
  args = ap.parse_args()
  dev = jax.devices()[0]
  print(f"# {getattr(dev, 'device_kind', dev.platform)}, jax {jax.__version__}, "
        f"{args.profile}, {args.tokens} tokens")
  projs = projections(profiles.get(args.profile), args.tokens, jnp.bfloat16,
                      unit_pairs=True)
  o_, v_ = projs["O"], projs["V"]
  ea = profiles.get(args.profile)["att_n_experts"]
  idx = _local_index(o_["r"], ea)          # O and V share one routing (bench/cvmm.py)
  plain = make_head_routing(idx, ea, unit_pairs=False)
  print(f"routing, {args.tokens} tokens: {time_routing(idx, ea)}", flush=True)
  dense = {}
  for name, v in (("O", o_), ("V", v_)):
    p, i, o = v["dense"]
    dense[name] = _dense(p, i, o, jnp.bfloat16, jax.random.key(7))
    print(f"dense {name}: fwd {dense[name][0] * 1e3:.3f} ms, fwd+bwd "
          f"{dense[name][1] * 1e3:.3f} ms")
  base = {}
  for setting in args.settings.split(","):
    os.environ["CVMM_UNIT_PAIRS"] = {"combo": "1", "plain": "0", "store": "1"}.get(
        setting, setting)
    os.environ["CVMM_UNIT_STORE"] = "1" if setting == "store" else "0"
    row = []
    for name, v, gated in (("O", o_, True), ("V", v_, False)):
      r = v["r"]
      if setting == "plain":
        r = plain
      if setting == "combo":
        up = r.pairs
        r = dataclasses.replace(r, pairs=dataclasses.replace(up, tile_lists={
            str(bm): up.tiles(bm, by_token=False) for bm in (64, 128)}))
      a = (v["x"], r, v["w"], v["g"])
      fwd = _fwd_fn("triton", gated)
      ct = _cotangent(jax.eval_shape(fwd, *a).shape, jnp.bfloat16)
      fb = _fwdbwd_fn("triton", gated)
      try:
        tf = _time(fwd, *a)
        tb = _time(fb, *a, ct)
        outs = (fwd(*a),) + tuple(fb(*a, ct)[1])
      except Exception as err:  # report and go on
        print(f"CVMM_UNIT_PAIRS={setting} {name}: FAILED {type(err).__name__}: "
              f"{str(err)[:400]}")
        continue
      base.setdefault(name, outs)
      errs = [_rel(x_, y_) for x_, y_ in zip(outs, base[name])] if outs is not base[name] else []
      row.append(f"{name} fwd {tf * 1e3:.3f} ms ({dense[name][0] / tf:.0%} of dense) "
                 f"fwd+bwd {tb * 1e3:.3f} ms ({dense[name][1] / tb:.0%} of XLA's, "
                 f"{3 * dense[name][0] / tb:.0%} of 3 dense fwd)"
                 + (" | vs first: " + " ".join(f"{e:.1e}" for e in errs) if errs else ""))
    print(f"CVMM_UNIT_PAIRS={setting}:\n  " + "\n  ".join(row), flush=True)


if __name__ == "__main__":
  main()
