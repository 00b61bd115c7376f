"""What the Mosaic GPU CVMM kernels share: availability, shared-memory layouts of gathered
rows, rows stored and added by index, compiler parameters, the interpreter hook. Legend in
:mod:`kernels.routing`.

Gathered rows. Hopper's TMA copies rectangles (no row gather; that is Blackwell's
``gather4``), so the kernels gather a tile's rows with ``cp.async``: every thread of the
gathering warpgroup copies 16-byte pieces of rows, eight threads a 128-byte row chunk of
64 16-bit values, into row r of a [T, 64] shared-memory buffer laid out as the tiled
(8, 64), 128-byte-swizzled operand that ``wgmma`` reads. The swizzle permutes the eight
16-byte pieces of a 128-byte row by bits 7..9 of its shared-memory address (the row's
index modulo 8 in a 1024-byte aligned buffer); :func:`gather_rows` applies it to each
piece's address, so the copies land exactly where a tiled TMA copy would have put them.
Pallas cannot slice a tiled buffer at one row, so each gather buffer is a
:class:`~jax.experimental.pallas.mosaic_gpu.RefUnion` of two views of the same bytes:
[T, 64] tiled (8, 64) and swizzled (the matmul operand) and [T, 64] without transforms
(the copies' destination, addressed by hand). Both views are one group of one buffer
each, so they start at the union's offset 0 (checked at trace time). Completion is per
thread: :func:`gathers_done` waits for a thread's older copy groups and orders their
writes before the tensor cores' reads (a proxy fence); a barrier arrival of the
warpgroup after it tells the consumers.

Rows whose index is past the source's last row (padding rows of a tile) are filled
with zeros (``cp.async`` with a source size of 0), so tiles need no masks and the
weight gradient's sums over rows add zeros.

Stored and added rows. The row kernel writes a tile's rows into their output rows by
index. Stored (:func:`store_rows`): every thread of the warpgroup reads 16-byte pieces of
the tile from shared memory and stores them (``st.global.v4``), consecutive threads
taking consecutive pieces of a row; pieces in rows past the output's last (padding rows:
row R of an [R, C] output) or in columns past its width are skipped. Added
(:func:`add_rows`): float32 rows by one TMA tensor reduction per row, whose engine
drops what lies out of bounds; 16-bit rows as stored ones, by 16-byte vector atomics.

Pallas's Mosaic GPU interpreter (jax >= 0.11, CPU) runs no inline Mosaic GPU code and
allocates every view of a union separately, so under it (:func:`interpreting`) a
gather buffer is one swizzled [T, 64] buffer, rows are gathered by one TMA copy each
into it (out-of-bounds rows read as zeros) and waited for at once, and rows are stored
by one TMA copy each, whose engine drops them out of bounds; the pipeline
around them (barriers, arrivals) is the same.
"""
from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
from jax import lax

try:
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError:  # a jax without Pallas Mosaic GPU
  pl = plgpu = None

SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16)
CHUNK = 64            # columns of one gathered row copy: 128 bytes of a 16-bit dtype
SWIZZLE = 128         # bytes
ROWS_PER_WG = 64      # rows of one wgmma (one consumer warpgroup)
# Shared memory a kernel may plan for (sm90 has 227 KiB per block).
SMEM_BUDGET = 220 * 1024
# Registers per thread: producer warpgroups give theirs up to the consumers'
# accumulators, within the multiprocessor's 64K (setmaxnreg takes multiples of 8).
PRODUCER_REGISTERS = 40
_REGISTER_FILE = 65536


def consumer_registers(n_cons: int, n_prod: int) -> int:
  """Registers per consumer thread beside ``n_prod`` producer warpgroups at
  PRODUCER_REGISTERS: 232 (what a [64, 256] float32 accumulator needs, with room) where
  the register file allows it."""
  per_thread = _REGISTER_FILE // 128 - n_prod * PRODUCER_REGISTERS
  return min(232, per_thread // n_cons // 8 * 8)


def is_available() -> bool:
  if plgpu is None or jax.default_backend() != "gpu":
    return False
  cc = getattr(jax.devices()[0], "compute_capability", "")
  return str(cc).startswith("9.")


def interpreting() -> bool:
  """Whether Pallas's Mosaic GPU interpreter runs the kernels traced now (tests on CPU:
  ``jax._src.pallas.mosaic_gpu.interpret.params.force_gpu_interpret_mode``)."""
  try:
    from jax._src import config  # noqa: PLC0415
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # noqa: PLC0415
  except ImportError:
    return False
  return isinstance(config.pallas_tpu_interpret_mode_context_manager.value,
                    InterpretGPUParams)


def tiled(dtype):
  """The (8, 64) tiling and 128-byte swizzle of wgmma operands of a 16-bit dtype."""
  elems = SWIZZLE // jnp.dtype(dtype).itemsize
  return (plgpu.TilingTransform((8, elems)), plgpu.SwizzleTransform(SWIZZLE))


def gather_buffer(shape, dtype):
  """Scratch for rows gathered by :func:`gather_rows`: ``shape`` (..., T, 64); see the
  module docstring."""
  if interpreting():
    return plgpu.SMEM(shape, dtype, transforms=(plgpu.SwizzleTransform(SWIZZLE),))
  return plgpu.RefUnion(plgpu.SMEM(shape, dtype, transforms=tiled(dtype)),
                        plgpu.SMEM(shape, dtype))


def gather_views(buf):
  """(matmul view, copy view) of a :func:`gather_buffer`."""
  if interpreting():
    return buf, buf
  mma, rows = buf
  for view in (mma, rows):
    offsets = [getattr(t, "offset", 0) for t in getattr(view, "transforms", ())]
    if any(offsets):
      raise AssertionError(f"gather buffer views must both start at offset 0: {offsets}")
  return mma, rows


WARPGROUP_THREADS = 128   # one warpgroup issues a gather, or stores a tile's rows
_PIECE = 16               # bytes of one cp.async or 16-byte store


def gather_rows(src, idx, dst, bar, limit=None):
  """Starts ``dst[r] = src[idx[r]]`` for the T rows of ``dst`` (a copy view [T, 64] of a
  :func:`gather_buffer`), zeros where ``idx[r]`` is not a row of ``src`` [R, 64] (a GMEM
  ref, sliced to its 64 columns) or ``r >= limit`` (an int32 scalar; None: no limit);
  ``idx``: [T] int32 in shared memory. Called by a whole warpgroup; T a multiple of 16.
  On the GPU the copies are asynchronous: :func:`gather_commit` closes a group of them,
  :func:`gathers_done` waits for groups. ``bar`` (a barrier of T arrivals) is only used
  by the interpreter, which copies each row with TMA and waits."""
  if interpreting():
    oob = src.shape[0]

    def row(r, carry):
      i = idx[r] if limit is None else jnp.where(r < limit, idx[r], oob)
      plgpu.copy_gmem_to_smem(src.at[pl.ds(i, 1)], dst.at[pl.ds(r, 1)], bar)
      return carry

    lax.fori_loop(0, dst.shape[0], row, 0)
    plgpu.barrier_wait(bar)
    return
  if limit is None:
    _cp_async_rows(False)(src, idx, dst)
  else:
    _cp_async_rows(True)(src, idx, dst, jnp.asarray(limit, jnp.int32))


def gather_commit():
  """Closes this thread's :func:`gather_rows` copies issued since the last commit into
  one group."""
  if not interpreting():
    _cp_async_commit()()


def gathers_done(pending: int):
  """Waits until at most ``pending`` of this thread's latest :func:`gather_commit`
  groups are in flight, then orders their shared-memory writes before later
  asynchronous-proxy reads (wgmma, TMA stores). Each thread waits for its own copies:
  arrive on a barrier after it to tell other warpgroups (or pass a warpgroup barrier)."""
  if interpreting():
    return
  _cp_async_wait(pending)()


def pipeline_lag(stages: int) -> int:
  """Steps of a producer's row copies that stay in flight after its newest step's are
  issued, in a pipeline of ``stages`` buffers. The consumers release a stage one step
  after it was filled, and a producer waits for that release ``stages`` steps on before
  it tells that step's stage full: a lag of ``stages - 1`` would wait for itself."""
  return max(0, stages - 2)


def check_tiles(cfg, smem: int | None = None):
  """The tile constraints every Mosaic kernel with gathered rows shares: one or two
  consumer warpgroups of ROWS_PER_WG rows, contraction steps of CHUNK columns, column
  blocks of whole chunks up to 256 (a wgmma's widest); with ``smem`` (the bytes of
  shared memory the tile needs) at least two stages within SMEM_BUDGET."""
  if cfg.block_m % ROWS_PER_WG or cfg.block_m // ROWS_PER_WG not in (1, 2):
    raise ValueError(f"block_m={cfg.block_m}: one or two consumer warpgroups of "
                     f"{ROWS_PER_WG} rows")
  if cfg.block_k != CHUNK:
    raise ValueError(f"block_k={cfg.block_k}: the gathered rows come in {CHUNK} columns")
  if cfg.block_n % CHUNK or cfg.block_n > 256:
    raise ValueError(f"block_n={cfg.block_n} must be a multiple of {CHUNK} up to 256")
  if smem is not None and cfg.num_stages < 2:
    raise ValueError(f"num_stages={cfg.num_stages}: at least 2")
  if smem is not None and smem > SMEM_BUDGET:
    raise ValueError(f"{cfg} needs {smem} bytes of shared memory (budget {SMEM_BUDGET})")


def fitting_tiles(raw, bn_max: int, smem) -> list:
  """TileConfigs of ``raw`` (block_m, block_n, num_stages, producers), block_n cut to
  ``bn_max``, in order and without repeats, those whose ``smem(cfg)`` (bytes of shared
  memory) is within SMEM_BUDGET."""
  from kernels.autotune import TileConfig  # noqa: PLC0415
  out = []
  for bm, bn, st, prod in raw:
    cfg = TileConfig(bm, min(bn, bn_max), CHUNK, 4, st, producers=prod)
    if smem(cfg) <= SMEM_BUDGET:
      out.append(cfg)
  return list(dict.fromkeys(out))


def claim_stage(t, stages: int, empty):
  """A producer's buffer for step ``t`` in a ring of ``stages``: from the ring's second
  round on, waits until the consumers released it (``empty``: one barrier per stage).
  Returns the stage, t % stages."""
  s = t % stages

  @pl.when(t >= stages)
  def _():
    plgpu.barrier_wait(empty.at[s])
  return s


def mma_steps(acc_ref, t0, n, stages: int, full, empty, mma):
  """A consumer's main loop over the pipeline's steps ``t0 .. t0 + n - 1`` (``n`` a
  traced or Python int): per step, waits until its stage is full, issues the step's
  wgmma with ``mma(acc_ref, stage)`` and releases the previous step's stage (``empty``)
  once that step's wgmma retired: one step in flight. The last stage is released after
  the loop. Returns the accumulator's value (``acc_ref`` a tuple of accumulators: a
  tuple of values)."""
  def step(kk, carry):
    t = t0 + kk
    s = t % stages
    plgpu.barrier_wait(full.at[s])
    mma(acc_ref, s)
    plgpu.wgmma_wait(1)

    @pl.when(kk > 0)
    def _():
      plgpu.barrier_arrive(empty.at[(t - 1) % stages])
    return carry

  lax.fori_loop(0, n, step, 0)
  plgpu.wgmma_wait(0)

  @pl.when(jnp.asarray(n) > 0)
  def _():
    plgpu.barrier_arrive(empty.at[(t0 + n - 1) % stages])
  if isinstance(acc_ref, tuple):
    return tuple(r[...] for r in acc_ref)
  return acc_ref[...]


def step_gathered(t, stages: int, full):
  """A producer's part after issuing (and committing) step ``t``'s gathers: step
  ``t - lag``'s rows have landed, so its stage is full (``full``: one barrier per stage)."""
  lag = pipeline_lag(stages)

  @pl.when(t >= lag)
  def _():
    gathers_done(lag)
    plgpu.barrier_arrive(full.at[(t - lag) % stages])


def producer_done(steps, stages: int, full, empty):
  """A producer's end after its ``steps`` steps (a traced int32): the last ``lag``
  steps' rows land and their stages are told full, then it waits for the consumers'
  last release of every stage used (``empty``), so that no copy or barrier outlives
  the kernel."""
  lag = pipeline_lag(stages)
  gathers_done(0)
  for back in range(lag, 0, -1):
    @pl.when(steps >= back)
    def _():
      plgpu.barrier_arrive(full.at[(steps - back) % stages])

  for s in range(stages):
    @pl.when(s < steps)
    def _():
      plgpu.barrier_wait(empty.at[s])


def _mlir():
  """What the inline Mosaic GPU bodies build with, imported when a kernel is lowered:
  (ir, arith, llvm, memref, nvvm, mosaic_gpu.utils, i32 constant, i64 constant)."""
  from jax._src.lib.mlir import ir  # noqa: PLC0415
  from jax._src.lib.mlir.dialects import arith, llvm, memref, nvvm  # noqa: PLC0415
  from jax.experimental.mosaic.gpu import utils as mu  # noqa: PLC0415

  def constant(bits):
    ty = ir.IntegerType.get_signless(bits)
    return lambda v: arith.constant(ty, ir.IntegerAttr.get(ty, v))

  return ir, arith, llvm, memref, nvvm, mu, constant(32), constant(64)


@functools.lru_cache(maxsize=None)
def _cp_async_rows(limited: bool):
  refs = (plgpu.RefType(), plgpu.RefType(), plgpu.RefType())
  scalar = (plgpu.Layout.WG_SPLAT(shape=()),) if limited else ()

  @plgpu.inline_mgpu(arg_types=refs + scalar)
  def gather(ctx, src, idx, dst, *limit):
    del ctx
    ir, arith, llvm, memref, nvvm, mu, c32, c64 = _mlir()
    i32, i64, i8 = (ir.IntegerType.get_signless(bits) for bits in (32, 64, 8))
    src_ty, dst_ty = ir.MemRefType(src.type), ir.MemRefType(dst.type)
    elem = mu.bitwidth(src_ty.element_type) // 8
    n_src, width = src_ty.shape
    n_rows, dst_width = dst_ty.shape
    (row_stride, col_stride), _ = src_ty.get_strides_and_offset()
    dst_strides, _ = dst_ty.get_strides_and_offset()
    row_bytes = width * elem
    if (row_bytes != SWIZZLE or dst_width != width or col_stride != 1
        or list(dst_strides) != [width, 1]
        or n_rows % (WARPGROUP_THREADS * _PIECE // row_bytes)):
      raise ValueError(f"gather_rows: {src_ty} rows into {dst_ty}")
    pieces = row_bytes // _PIECE                     # 8 threads a row
    rows_per_pass = WARPGROUP_THREADS // pieces         # 16 rows a pass
    tid = arith.remui(mu.thread_idx(), c32(WARPGROUP_THREADS))
    piece = arith.andi(tid, c32(pieces - 1))
    row0 = arith.divui(tid, c32(pieces))
    src_base = llvm.addrspacecast(llvm.PointerType.get(address_space=1),
                                  mu.memref_ptr(src))
    dst_ptr_ty = llvm.PointerType.get(address_space=3)
    dst_base = llvm.ptrtoint(i32, mu.memref_ptr(dst))
    piece_off = arith.muli(piece, c32(_PIECE))
    src_piece = arith.extui(i64, piece_off)
    index = ir.IndexType.get()
    for i in range(n_rows // rows_per_pass):
      r = arith.addi(row0, c32(i * rows_per_pass))
      row = memref.load(idx, [arith.index_cast(index, r)])
      valid = arith.cmpi(arith.CmpIPredicate.ult, row, c32(n_src))
      if limit:
        lim = limit[0].registers.item()
        valid = arith.andi(valid, arith.cmpi(arith.CmpIPredicate.slt, r, lim))
      row = arith.select(valid, row, c32(0))
      src_off = arith.addi(arith.muli(arith.extui(i64, row), c64(row_stride * elem)),
                           src_piece)
      src_ptr = mu.getelementptr(src_base, [src_off], i8)
      addr = arith.addi(dst_base, arith.addi(arith.muli(r, c32(row_bytes)), piece_off))
      # 128-byte swizzle: 16-byte piece bits 4..6 ^= 128-byte row bits 7..9
      addr = arith.xori(addr, arith.andi(arith.shrui(addr, c32(3)), c32(0x70)))
      nvvm.cp_async_shared_global(llvm.inttoptr(dst_ptr_ty, addr), src_ptr, _PIECE,
                                  nvvm.LoadCacheModifierKind.CG,
                                  cp_size=arith.select(valid, c32(_PIECE), c32(0)))

  return gather


@functools.lru_cache(maxsize=None)
def _cp_async_commit():
  @plgpu.inline_mgpu()
  def commit(ctx):
    del ctx
    from jax._src.lib.mlir.dialects import nvvm  # noqa: PLC0415
    nvvm.cp_async_commit_group()

  return commit


@functools.lru_cache(maxsize=None)
def _cp_async_wait(pending: int):
  @plgpu.inline_mgpu()
  def wait(ctx):
    del ctx
    from jax._src.lib.mlir.dialects import nvvm  # noqa: PLC0415
    nvvm.cp_async_wait_group(pending)
    nvvm.fence_proxy(nvvm.ProxyKind.async_shared, space=nvvm.SharedSpace.shared_cta)

  return wait


def store_rows(src, idx, dst, col0):
  """``dst[idx[r], col0:col0 + C] = src[r]`` for the T rows of ``src`` [T, C] (shared
  memory, no transforms), skipping rows ``idx[r]`` that are not rows of ``dst`` [R, N]
  (a GMEM ref) and columns past its N; ``idx``: [T] int32 in shared memory; ``col0``: an
  int32 scalar. Called by a whole warpgroup right after it wrote ``src``; ``src`` may be
  written again once it returns.

  On the GPU every thread of the warpgroup moves 16-byte pieces: a row of C values is
  C * itemsize / 16 pieces, taken by consecutive threads (a warp reads consecutive bytes
  of ``src`` and writes consecutive bytes of a row of ``dst``): ``ld.shared.v4``, then
  ``st.global.v4.b32``, all pieces in flight at once. A warpgroup barrier before makes
  the warpgroup's writes of ``src`` visible to all its threads, one after keeps them
  from writing ``src`` again before every thread has read it. A piece lies in one row and
  on one side of the column bound: N and ``col0`` must be multiples of 16 bytes' values,
  rows of ``dst`` a multiple of 16 bytes apart (checked at lowering, but for ``col0``).
  The interpreter copies each row with one TMA copy (its engine drops rows and columns
  out of bounds) and waits."""
  if interpreting():
    _tma_rows(src, idx, dst, col0, add=False)
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    return
  _thread_rows(False)(src, idx, dst, jnp.asarray(col0, jnp.int32))


def add_rows(src, idx, dst, col0):
  """``dst[idx[r], col0:col0 + C] += src[r]`` for the T rows of ``src`` [T, C] (shared
  memory, no transforms; ``idx``, ``col0`` as in :func:`store_rows`). Called by a whole
  warpgroup; ``plgpu.wait_smem_to_gmem(0, wait_read_only=True)`` before ``src`` is
  written again.

  float32 rows: one TMA tensor reduction per row, issued by one thread; the copy engine
  drops rows and columns out of ``dst``'s bounds (padding rows); committed as one group
  and not waited for. 16-bit rows: every thread adds 16-byte pieces as
  :func:`store_rows` stores them, with ``red.global.add.noftz.v4.bf16x2`` (or
  ``.f16x2``; sm_90): relaxed atomics nothing waits for. On an H100 the threads' adds
  took longer than TMA reductions in float32 and less time in bfloat16
  (bench/RESULTS.md, 'Pallas Mosaic GPU kernels')."""
  if interpreting() or jnp.dtype(dst.dtype).itemsize == 4:
    _tma_rows(src, idx, dst, col0, add=True)
  else:
    _thread_rows(True)(src, idx, dst, jnp.asarray(col0, jnp.int32))


def _tma_rows(src, idx, dst, col0, *, add: bool):
  """One TMA copy (or reduction) per row of ``src`` into row ``idx[r]`` of ``dst``,
  committed as one group."""
  plgpu.commit_smem()   # the warpgroup's writes of src, before the copy engine reads
  width = src.shape[1]

  def row(r, carry):
    plgpu.copy_smem_to_gmem(src.at[pl.ds(r, 1)], dst.at[pl.ds(idx[r], 1), pl.ds(col0, width)],
                            reduction_op="add" if add else None, commit_group=False)
    return carry

  lax.fori_loop(0, src.shape[0], row, 0)
  plgpu.commit_smem_to_gmem_group()


# The 16-byte global write of four 32-bit registers: stored, or added by 16-bit dtype.
_ST_V4 = "st.global.v4.b32 [$0], {$1, $2, $3, $4};"
_RED_V4 = {2: {"bf16": "red.global.add.noftz.v4.bf16x2 [$0], {$1, $2, $3, $4};",
               "f16": "red.global.add.noftz.v4.f16x2 [$0], {$1, $2, $3, $4};"}}


@functools.lru_cache(maxsize=None)
def _thread_rows(add: bool):
  """The warpgroup's 16-byte stores (or, ``add``, 16-bit vector reductions) of rows:
  :func:`store_rows`, :func:`add_rows`."""
  refs = (plgpu.RefType(), plgpu.RefType(), plgpu.RefType())

  @plgpu.inline_mgpu(arg_types=refs + (plgpu.Layout.WG_SPLAT(shape=()),))
  def store(ctx, src, idx, dst, col0):
    del ctx
    ir, arith, llvm, memref, _, mu, c32, c64 = _mlir()
    i32, i64, i8 = (ir.IntegerType.get_signless(bits) for bits in (32, 64, 8))
    src_ty, dst_ty = ir.MemRefType(src.type), ir.MemRefType(dst.type)
    elem = mu.bitwidth(dst_ty.element_type) // 8
    n_rows, width = src_ty.shape
    n_dst, n_cols = dst_ty.shape
    src_strides, _ = src_ty.get_strides_and_offset()
    (row_stride, col_stride), _ = dst_ty.get_strides_and_offset()
    per_piece = _PIECE // elem                      # values of a 16-byte piece
    asm = _RED_V4.get(elem, {}).get(str(dst_ty.element_type)) if add else _ST_V4
    if (src_ty.element_type != dst_ty.element_type or list(src_strides) != [width, 1]
        or col_stride != 1 or (row_stride * elem) % _PIECE or n_cols % per_piece
        or (n_rows * width) % (WARPGROUP_THREADS * per_piece) or asm is None):
      raise ValueError(f"{'add' if add else 'store'}_rows: {src_ty} rows into {dst_ty}")
    pieces = width // per_piece                     # pieces of a row
    tid = arith.remui(mu.thread_idx(), c32(WARPGROUP_THREADS))
    col0 = col0.registers.item()
    src_base = mu.memref_ptr(src)
    dst_base = llvm.ptrtoint(i64, llvm.addrspacecast(llvm.PointerType.get(address_space=1),
                                                     mu.memref_ptr(dst)))
    vec = ir.VectorType.get([4], i32)
    index = ir.IndexType.get()
    row_bytes = c64(row_stride * elem)
    mu.warpgroup_barrier()           # the warpgroup's writes of src are visible
    for i in range(n_rows * pieces // WARPGROUP_THREADS):
      q = arith.addi(tid, c32(i * WARPGROUP_THREADS))       # piece q of src, row-major
      r, piece = arith.divui(q, c32(pieces)), arith.remui(q, c32(pieces))
      values = llvm.load(vec, mu.getelementptr(src_base, [arith.muli(q, c32(_PIECE))], i8),
                         alignment=_PIECE)
      row = memref.load(idx, [arith.index_cast(index, r)])
      col = arith.addi(col0, arith.muli(piece, c32(per_piece)))
      valid = arith.andi(arith.cmpi(arith.CmpIPredicate.ult, row, c32(n_dst)),
                         arith.cmpi(arith.CmpIPredicate.ult, col, c32(n_cols)))
      offset = arith.addi(arith.muli(arith.extui(i64, row), row_bytes),
                          arith.extui(i64, arith.muli(col, c32(elem))))
      with mu.when(valid):
        llvm.inline_asm(ir.Type.parse("!llvm.void"),
                        [arith.addi(dst_base, offset)]
                        + [llvm.extractelement(values, c32(v)) for v in range(4)],
                        asm, "l,r,r,r,r,~{memory}", has_side_effects=True)
    mu.warpgroup_barrier()           # every thread has read src

  return store


def load(ref, layout):
  """``plgpu.load(ref, layout=layout)`` on jax 0.10 (which takes an index) and later."""
  params = inspect.signature(plgpu.load).parameters
  if params["idx"].default is inspect.Parameter.empty:
    return plgpu.load(ref, (), layout=layout)
  return plgpu.load(ref, layout=layout)


def compiler_params():
  return plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane,
                              unsafe_no_auto_barriers=True)


def zeros_after(shape, dtype, inputs) -> jax.Array:
  """Zeros of ``shape`` for a kernel to add into (a mutable array made from them), tied
  to the kernel's other ``inputs`` by an optimization barrier.

  Untied, the zeros depend on nothing, and JAX's partial evaluation (a ``lax.scan``
  under ``jax.grad``: MoEUT's layer groups) takes the mutable array and its read after
  the kernel as loop-invariant, known values while the kernel, which reads the loop's
  carry, stays in the loop: the read is hoisted out of it and returns the zeros, and
  every iteration adds into one buffer (on an H100 the training step's sums read as
  zeros). Tied to the inputs, the array is made, written and read where the kernel
  runs."""
  zeros = jnp.zeros(shape, dtype)
  return lax.optimization_barrier((zeros, *inputs))[0]


def launch(body, inputs, out_types, scratch, n_blocks: int, n_threads: int):
  """Runs ``body(*input_refs, *output_refs, *scratch_refs)`` on ``n_blocks`` blocks
  (axis "sm") of ``n_threads`` warpgroups (axis "wg"). Mutable arrays among
  ``inputs`` (``jax.new_ref``) are outputs too: the kernels add into zeros that way.
  (``pl.kernel`` with a Mosaic GPU mesh; ``plgpu.kernel`` would do the same but wraps
  the call in a ``custom_vmap``, which jax 0.10 refuses mutable arrays in.)"""
  mesh = plgpu.Mesh(grid=(n_blocks,), grid_names=("sm",), num_threads=n_threads,
                    thread_name="wg")

  def kernel_body(*refs):
    pl.run_scoped(functools.partial(body, *refs), *scratch, collective_axes="wg")

  return pl.kernel(kernel_body, out_type=tuple(out_types), mesh=mesh,
                   compiler_params=compiler_params(), name=body.__name__)(*inputs)


def check_dtype(dtype):
  if jnp.dtype(dtype) not in [jnp.dtype(d) for d in SUPPORTED_DTYPES]:
    raise NotImplementedError(
        f"cvmm_mosaic supports {[jnp.dtype(d).name for d in SUPPORTED_DTYPES]} (wgmma "
        f"multiplies float32 only as tf32); got {jnp.dtype(dtype).name}: use impl='triton'")
