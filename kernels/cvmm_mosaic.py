"""CVMM with Pallas on the Mosaic GPU backend (Hopper, sm90: TMA loads, wgmma).

Layout. Mosaic GPU moves tiles with the bulk tensor copy engine (TMA), which copies
rectangles, not gathered rows (Hopper has no gather TMA). So the sorted pairs are first
laid out by XLA in an expert-aligned padded layout of ``T``-row tiles: each expert's
group starts on a tile boundary and is padded with zero rows, so every tile belongs to
exactly one expert (``_Layout``). Two kernels then do all matrix work:

``_tile_matmul``  Y[z] = A[z] @ W[tile_expert[z]] for every tile z (W optionally
    transposed through a transposed shared-memory view): the forward, and dx.
    A persistent grid of one program per multiprocessor walks (tile, column block)
    pairs; a ``plgpu.emit_pipeline`` keeps ``num_stages`` TMA loads of A and W in
    flight ahead of the wgmma.
``_tile_gram``    dW[e] = sum over e's tiles of A[z]^T @ B[z]: the ragged contraction
    of the weight gradient. Zero padding rows make every tile a plain full tile, so
    no masking is needed; experts without tiles store zeros.

Gathering rows into the layout, reading results back to pair order, and the gated sum
over slots are XLA gathers and einsums here: unlike the Triton kernels, this path
writes the [P, O] per-pair intermediate. wgmma multiplies float32 only as tf32, so
this path supports 16-bit inputs (bf16, fp16) only; float32 goes to Triton.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from kernels import autotune
from kernels.arrays import pad_to
from kernels.autotune import TileConfig
from kernels.routing import Routing

try:
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError:  # a jax without Pallas Mosaic GPU
  pl = plgpu = None


def is_available() -> bool:
  if plgpu is None or jax.default_backend() != "gpu":
    return False
  cc = getattr(jax.devices()[0], "compute_capability", "")
  return str(cc).startswith("9.")


SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16)


# ------------------------------------------------------------------ layout

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Layout:
  """Expert-aligned padded layout of the sorted pairs in tiles of ``t`` rows.

  dest: [P] padded row of each pair (indexed by pair n*K+s).
  src_pair: [Z*T] pair held by each padded row, P for padding rows.
  tile_expert: [Z] expert of each tile, -1 for unused tiles.
  tile_offsets: [E + 1] first tile of each expert.
  """

  dest: jax.Array
  src_pair: jax.Array
  tile_expert: jax.Array
  tile_offsets: jax.Array
  t: int = dataclasses.field(metadata=dict(static=True))
  z: int = dataclasses.field(metadata=dict(static=True))


def _layout(routing: Routing, t: int) -> _Layout:
  p, e = routing.n_pairs, routing.n_experts
  z = max(1, min(p, (p + e * (t - 1)) // t))                         # static tile bound
  sizes = routing.group_sizes
  tiles = (sizes + t - 1) // t                                       # [E]
  tile_off = jnp.concatenate([jnp.zeros((1,), jnp.int32),
                              jnp.cumsum(tiles, dtype=jnp.int32)])   # [E+1]
  sorted_e = routing.sorted_expert()                                 # [P]
  rank = jnp.arange(p, dtype=jnp.int32) - routing.group_offsets[sorted_e]
  dest_sorted = tile_off[sorted_e] * t + rank                        # [P] by sorted position
  dest = jnp.zeros((p,), jnp.int32).at[routing.order].set(dest_sorted, unique_indices=True)
  src_pair = jnp.full((z * t,), p, jnp.int32).at[dest_sorted].set(
      routing.order, unique_indices=True)                            # [Z*T]
  zi = jnp.arange(z, dtype=jnp.int32)
  tile_e = jnp.searchsorted(tile_off[1:], zi, side="right").astype(jnp.int32)
  tile_e = jnp.where(tile_e < e, tile_e, -1)                         # [Z]
  return _Layout(dest, src_pair, tile_e, tile_off, t, z)


def _rows_to_layout(rows: jax.Array, lay: _Layout) -> jax.Array:
  """[P, C] rows in pair order -> [Z*T, C] padded layout (zero padding rows)."""
  ext = jnp.concatenate([rows, jnp.zeros((1, rows.shape[1]), rows.dtype)])   # [P+1, C]
  return ext[lay.src_pair]


# ------------------------------------------------------------------ kernels

def _transforms(block_minor: int, dtype):
  swizzle = plgpu.find_swizzle(block_minor * jnp.dtype(dtype).itemsize * 8)
  elems = swizzle // jnp.dtype(dtype).itemsize
  return (plgpu.TilingTransform((8, elems)), plgpu.SwizzleTransform(swizzle))


def _compiler_params():
  return plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup)


def _tile_matmul(a: jax.Array, w: jax.Array, tile_expert: jax.Array, *,
                 transpose_w: bool, cfg: TileConfig) -> jax.Array:
  """[Z*T, I] x W[tile_expert] -> [Z*T, O]; w [E, I, O] (or [E, O, I] if transpose_w)."""
  rows, i = a.shape
  o = w.shape[1] if transpose_w else w.shape[2]
  bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
  if rows % bm or i % bk or o % bn:
    raise ValueError(f"{rows=}, {i=}, {o=} must be multiples of {bm=}, {bk=}, {bn=}")
  grid_m, grid_n, grid_k = rows // bm, o // bn, i // bk
  dtype = a.dtype
  in_tf = _transforms(bk, dtype)
  out_tf = _transforms(bn, dtype)

  def body(tile_e_gmem, a_gmem, w_gmem, o_gmem):
    @plgpu.nd_loop((grid_m * grid_n,), collective_axes="sm")
    def _loop(info):
      (lin,) = info.index
      mi = lin // grid_n                  # column blocks of one tile run back to back
      ni = lin % grid_n
      ex = tile_e_gmem[mi]

      @pl.when(ex >= 0)
      def _():
        def acc_scope(acc_ref):
          def step(_, a_smem, w_smem):
            b = plgpu.transpose_ref(w_smem, (1, 0)) if transpose_w else w_smem
            plgpu.wgmma(acc_ref, a_smem, b)

          w_spec = (plgpu.BlockSpec((bn, bk), lambda k: (ni, k), transforms=in_tf,
                                    delay_release=1) if transpose_w else
                    plgpu.BlockSpec((bk, bn), lambda k: (k, ni), transforms=in_tf,
                                    delay_release=1))
          plgpu.emit_pipeline(
              step, grid=(grid_k,),
              in_specs=[plgpu.BlockSpec((bm, bk), lambda k: (mi, k), transforms=in_tf,
                                        delay_release=1), w_spec],
              max_concurrent_steps=cfg.num_stages,
          )(a_gmem, w_gmem.at[ex])
          return acc_ref[...]

        acc = pl.run_scoped(acc_scope, plgpu.ACC((bm, bn)))

        @functools.partial(pl.run_scoped,
                           o_smem=plgpu.SMEM((bm, bn), o_gmem.dtype, transforms=out_tf))
        def _store(o_smem):
          o_smem[...] = acc.astype(o_smem.dtype)
          plgpu.commit_smem()
          plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[pl.ds(mi * bm, bm), pl.ds(ni * bn, bn)])
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  kernel = plgpu.kernel(
      body, out_type=jax.ShapeDtypeStruct((rows, o), dtype),
      grid=(autotune.multiprocessor_count(),), grid_names=("sm",),
      compiler_params=_compiler_params())
  return kernel(tile_expert, a, w)


def _tile_gram(a: jax.Array, b: jax.Array, tile_offsets: jax.Array, *, t: int,
               cfg: TileConfig) -> jax.Array:
  """dW[e] = sum_{z in e's tiles} A[z]^T B[z]: a [Z*T, I], b [Z*T, O] -> [E, I, O]."""
  rows, i = a.shape
  o = b.shape[1]
  e = tile_offsets.shape[0] - 1
  bi, bo = cfg.block_m, cfg.block_n
  if i % bi or o % bo:
    raise ValueError(f"{i=}, {o=} must be multiples of {bi=}, {bo=}")
  grid_i, grid_o = i // bi, o // bo
  dtype = a.dtype
  a_tf = _transforms(bi, dtype)
  b_tf = _transforms(bo, dtype)
  out_tf = _transforms(bo, dtype)

  def body(toff_gmem, a_gmem, b_gmem, o_gmem):
    @plgpu.nd_loop((e * grid_i * grid_o,), collective_axes="sm")
    def _loop(info):
      (lin,) = info.index
      ex = lin // (grid_i * grid_o)
      ii = (lin // grid_o) % grid_i
      oo = lin % grid_o
      t0 = toff_gmem[ex]
      nt = toff_gmem[ex + 1] - t0

      def acc_scope(acc_ref):
        def step(_, a_smem, b_smem):
          plgpu.wgmma(acc_ref, plgpu.transpose_ref(a_smem, (1, 0)), b_smem)

        @pl.when(nt > 0)
        def _():
          # The slices run past the end for the last experts; the pipeline reads
          # only its nt tiles.
          start = pl.multiple_of(t0 * t, t)
          plgpu.emit_pipeline(
              step, grid=(nt,),
              in_specs=[plgpu.BlockSpec((t, bi), lambda k: (k, ii), transforms=a_tf,
                                        delay_release=1),
                        plgpu.BlockSpec((t, bo), lambda k: (k, oo), transforms=b_tf,
                                        delay_release=1)],
              max_concurrent_steps=cfg.num_stages,
          )(a_gmem.at[pl.ds(start, rows)], b_gmem.at[pl.ds(start, rows)])
        return acc_ref[...]

      acc = pl.run_scoped(acc_scope, plgpu.ACC((bi, bo)))

      @functools.partial(pl.run_scoped,
                         o_smem=plgpu.SMEM((bi, bo), o_gmem.dtype, transforms=out_tf))
      def _store(o_smem):
        o_smem[...] = acc.astype(o_smem.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[ex, pl.ds(ii * bi, bi), pl.ds(oo * bo, bo)])
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  kernel = plgpu.kernel(
      body, out_type=jax.ShapeDtypeStruct((e, i, o), dtype),
      grid=(autotune.multiprocessor_count(),), grid_names=("sm",),
      compiler_params=_compiler_params())
  return kernel(tile_offsets, a, b)


# ------------------------------------------------------------------ tile choice

_SMEM_BUDGET = 200 * 1024   # bytes of shared memory a candidate may plan for (sm90: 227 KiB)


def _mm_candidates(o: int, t: int | None) -> list[TileConfig]:
  raw = [(128, 128, 64, 4), (128, 256, 64, 3), (64, 128, 64, 4), (128, 64, 64, 4),
         (64, 256, 64, 4), (64, 64, 64, 4)]
  out = []
  for bm, bn, bk, st in raw:
    smem = 2 * ((bm * bk + bk * bn) * st + bm * bn)
    if o % bn == 0 and (t is None or bm == t) and smem <= _SMEM_BUDGET:
      out.append(TileConfig(bm, bn, bk, 4, st))
  return out


def _gram_candidates(i: int, o: int, t: int) -> list[TileConfig]:
  raw = [(128, 128, 2), (64, 128, 3), (128, 64, 3), (64, 64, 4), (128, 128, 3)]
  out = []
  for bi, bo, st in raw:
    smem = 2 * ((t * bi + t * bo) * st + bi * bo)
    if i % bi == 0 and o % bo == 0 and smem <= _SMEM_BUDGET:
      out.append(TileConfig(bi, bo, t, 4, st))
  return out


def _bench_or_none(make):
  return make if is_available() else None


def _choose_mm(z_rows, e, i, o, dtype, transpose_w, t=None) -> TileConfig:
  # The tile height T is fixed by the layout (block_m of the forward choice): z_rows
  # is only known per T, so the key uses the pair count via z_rows of the first T.
  def bench(cfg):
    with jax.ensure_compile_time_eval():
      rows = z_rows // cfg.block_m * cfg.block_m
      a = jax.random.normal(jax.random.key(1), (rows, i), dtype)
      ws = (e, o, i) if transpose_w else (e, i, o)
      w = jax.random.normal(jax.random.key(2), ws, dtype)
      te = jax.random.randint(jax.random.key(3), (rows // cfg.block_m,), 0, e)
    f = autotune.compile_now(
        functools.partial(_tile_matmul, transpose_w=transpose_w, cfg=cfg), a, w, te)
    return autotune.time_call(lambda: f(a, w, te))

  return autotune.tuner().choose("mosaic_mm", (z_rows, e, i, o, int(transpose_w), t or 0),
                                 dtype, _mm_candidates(o, t), _bench_or_none(bench))


def _choose_gram(z_rows, e, i, o, t, dtype) -> TileConfig:
  def bench(cfg):
    with jax.ensure_compile_time_eval():
      a = jax.random.normal(jax.random.key(1), (z_rows, i), dtype)
      b = jax.random.normal(jax.random.key(2), (z_rows, o), dtype)
      per = z_rows // t // e
      toff = jnp.minimum(jnp.arange(e + 1, dtype=jnp.int32) * per, z_rows // t)
    f = autotune.compile_now(functools.partial(_tile_gram, t=t, cfg=cfg), a, b, toff)
    return autotune.time_call(lambda: f(a, b, toff))

  return autotune.tuner().choose("mosaic_gram", (z_rows, e, i, o, t), dtype,
                                 _gram_candidates(i, o, t), _bench_or_none(bench))


# ------------------------------------------------------------------ public op

def cvmm_mosaic(x: jax.Array, routing: Routing, w: jax.Array,
                gates: jax.Array | None = None) -> jax.Array:
  """See :func:`kernels.cvmm`. x [N, M, I], w [E, I, O], gates [N, K] or None."""
  if x.dtype not in SUPPORTED_DTYPES:
    raise NotImplementedError(
        f"cvmm_mosaic supports {[jnp.dtype(d).name for d in SUPPORTED_DTYPES]} (wgmma "
        f"multiplies float32 only as tf32); got {x.dtype}: use impl='triton'")
  w = w.astype(x.dtype) if w.dtype != x.dtype else w
  if gates is None:
    return _cvmm(x, w, routing)
  return _cvmm_gated(x, w, gates, routing)


def _plan(routing: Routing, i: int, o: int, dtype):
  """Tile height, padded widths and the forward tile config for this shape."""
  ip, op = i + (-i % 64), o + (-o % 64)
  p, e = routing.n_pairs, routing.n_experts
  z_rows = max(1, min(p, (p + e * 127) // 128)) * 128                # rows at T = 128
  cfg = _choose_mm(z_rows, e, ip, op, dtype, False)
  return cfg, ip, op


def _x_rows(x: jax.Array, routing: Routing) -> jax.Array:
  """[P, I] the input row of every pair, in pair order."""
  n, m, i = x.shape
  k = routing.k
  return jnp.repeat(x, k // m, axis=1).reshape(n * k, i)


def _forward_rows(x, w, routing):
  """[P, O] per-pair products, pair order, plus what the backward pass reuses."""
  n, m, i = x.shape
  o = w.shape[2]
  cfg, ip, op = _plan(routing, i, o, x.dtype)
  lay = _layout(routing, cfg.block_m)
  xs = pad_to(_rows_to_layout(_x_rows(x, routing), lay), 1, 64)    # [Z*T, Ip]
  wp = pad_to(pad_to(w, 1, 64), 2, 64)                              # [E, Ip, Op]
  y_pad = _tile_matmul(xs, wp, lay.tile_expert, transpose_w=False, cfg=cfg)   # [Z*T, Op]
  y = y_pad[lay.dest, :o]                                             # [P, O]
  return y, (lay, xs, wp)


def _backward(x, w, routing, lay, xs, wp, dy_rows):
  """dx [N, M, I] and dW [E, I, O] from per-pair output gradients dy_rows [P, O]."""
  n, m, i = x.shape
  e, _, o = w.shape
  k = routing.k
  dys = pad_to(_rows_to_layout(dy_rows, lay), 1, 64)                # [Z*T, Op]
  cfg_dx = _choose_mm(xs.shape[0], e, dys.shape[1], xs.shape[1], x.dtype, True, t=lay.t)
  dx_pad = _tile_matmul(dys, wp, lay.tile_expert, transpose_w=True, cfg=cfg_dx)  # [Z*T, Ip]
  dx_rows = dx_pad[lay.dest, :i]                                     # [P, I]
  dx = dx_rows.astype(jnp.float32).reshape(n, m, k // m, i).sum(axis=2)   # [N, M, I]
  cfg_g = _choose_gram(xs.shape[0], e, xs.shape[1], dys.shape[1], lay.t, x.dtype)
  dw = _tile_gram(xs, dys, lay.tile_offsets, t=lay.t, cfg=cfg_g)[:, :i, :o]
  return dx.astype(x.dtype), dw.astype(w.dtype), dx_rows


@jax.custom_vjp
def _cvmm(x, w, routing):
  return _fwd(x, w, routing)[0]


def _fwd(x, w, routing):
  n, m, i = x.shape
  y, res = _forward_rows(x, w, routing)
  return y.reshape(n, routing.k, w.shape[2]), (x, w, routing, res)


def _bwd(res, dy):
  x, w, routing, (lay, xs, wp) = res
  n, k = routing.n_tokens, routing.k
  dy_rows = dy.astype(x.dtype).reshape(n * k, w.shape[2])            # [P, O]
  dx, dw, _ = _backward(x, w, routing, lay, xs, wp, dy_rows)
  return dx, dw, None


_cvmm.defvjp(_fwd, _bwd)


@jax.custom_vjp
def _cvmm_gated(x, w, gates, routing):
  return _fwd_gated(x, w, gates, routing)[0]


def _fwd_gated(x, w, gates, routing):
  n = x.shape[0]
  y, res = _forward_rows(x, w, routing)                              # [P, O]
  y = y.reshape(n, routing.k, -1)                                    # [N, K, O]
  out = jnp.einsum("NK,NKO->NO", gates.astype(jnp.float32), y.astype(jnp.float32))
  return out.astype(x.dtype), (x, w, gates, routing, res, y)


def _bwd_gated(res, dout):
  x, w, gates, routing, (lay, xs, wp), y = res
  n, k = routing.n_tokens, routing.k
  g = gates.astype(jnp.float32)
  dout32 = dout.astype(jnp.float32)                                  # [N, O]
  dy_rows = (g[:, :, None] * dout32[:, None, :]).astype(x.dtype).reshape(n * k, -1)  # [P, O]
  dx, dw, _ = _backward(x, w, routing, lay, xs, wp, dy_rows)
  # dgates[n, s] = <dout[n], x_row @ W_e> = <dout[n], y[n, s]>, y kept from the forward.
  dg = jnp.einsum("NKO,NO->NK", y.astype(jnp.float32), dout32)       # [N, K]
  return dx, dw, dg.astype(gates.dtype), None


_cvmm_gated.defvjp(_fwd_gated, _bwd_gated)
