#!/bin/bash
# The Pallas Mosaic GPU CVMM kernels (kernels/cvmm_mosaic/) on one Hopper GPU, in one
# call of at most 10 minutes, from the repository root. Every step runs under its own
# timeout and writes its log under $OUT (default bench/out), so a step that fails or
# hangs leaves the others' results:
#   environment.log     GPU, driver, jax / jaxlib / triton versions, commit, date
#   variants.log        bench/probes/mosaic_variants.py (summed and some stored): the row
#                       kernel's stored and added outputs against XLA, each variant in
#                       a process of its own (~1-2 min)
#   check.log           python3 -m bench.mosaic_epilogue_check: the four projections at
#                       MoEUT_244M, forward and gradients against XLA with the Triton
#                       path's errors as yardstick, and both timed, for each sum dtype
#                       (~90 s each; CHECK_ARGS: its arguments, e.g. --sums float16)
#   tests_fast.log      the mosaic GPU tests of the edge cases (bf16, default scaled
#                       float16 sums), with bfloat16 and float32 sums, with float16 sums
#                       of huge and tiny inputs, the fused σ-MoE pair, SwitchHead V's
#                       sums per head, and "auto" timing the two GPU paths (TESTS_K: another
#                       pytest -k selection of tests/test_cvmm_gpu.py)
#   model.log           tests/test_model_gpu.py: the model's loss and gradients through the
#                       Triton and the Mosaic path against XLA's (the layers' scan under
#                       jax.grad)
#   step.log            bench/model.py: MoEUT_244M's training step (batch 64 x 1024, no
#                       remat) with cvmm_impl auto (Triton) and mosaic
#   cvmm.log            python3 -m bench.cvmm at MoEUT_244M: mosaic, triton and XLA's
#                       dense matmul per projection, forward and forward+backward, and
#                       the σ-MoE pair; the table last (cvmm.json: every figure)
#   tests_full.log      every mosaic GPU test (what time is left)
#   tune.log            python3 -m bench.cvmm as in cvmm, with CVMM_AUTOTUNE=1: every
#                       kernel's tile candidates timed for this GPU (tune_timings.log: each
#                       candidate's time), then the table with the tuned tiles;
#                       $OUT/autotune_cache.json keeps the choices for the steps after
#                       it and for bench/merge_autotune.py
# CVMM_AUTOTUNE=0 elsewhere: each kernel takes its cached tile (bench/autotune_cache.json,
# keyed by GPU, and what tune added), else its first candidate, without timing.
#
# On the device machine (nothing can be downloaded there; .whl/ carried):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#     --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site && OUT=$OUT bash bench/mosaic_gpu.sh
# BUDGET (seconds, default 570) bounds the whole run; each step gets its own limit
# within what is left. STEPS (default: "variants check tests_fast model step cvmm
# tests_full"; tune on request) names the steps to run, in the order they run.
# STEP_IMPLS (default "auto mosaic"): the step's --impl values; STEP_LIMIT (default 330):
# its seconds (each implementation's first call, mostly compilation, took about 100 s on
# an H100). The test steps print each test's result as it ends.
set -u
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export CVMM_AUTOTUNE=0 XLA_PYTHON_CLIENT_PREALLOCATE=false
export CVMM_AUTOTUNE_CACHE=$OUT/autotune_cache.json
cp bench/autotune_cache.json "$CVMM_AUTOTUNE_CACHE"
START=$(date +%s)
BUDGET=${BUDGET:-570}

left() { echo $(( BUDGET - ($(date +%s) - START) )); }

# step NAME SECONDS COMMAND...: runs COMMAND under min(SECONDS, time left) into $OUT/NAME.log
step() {
  local name=$1 limit=$2; shift 2
  local rest; rest=$(left)
  (( rest < limit )) && limit=$rest
  if (( limit < 15 )); then echo "== $name: skipped, ${rest}s left"; return; fi
  echo "== $name (limit ${limit}s): $*"
  local t0; t0=$(date +%s)
  timeout -k 5 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $(( $(date +%s) - t0 ))s$( ((rc == 124)) && echo ", timed out")"
  tail -n "${TAIL:-25}" "$OUT/$name.log"
}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())"
  python3 -c "import triton, jax_triton; print('triton', triton.__version__, 'jax-triton', getattr(jax_triton, '__version__', '?'))"
  echo "$(bash bench/code_id.sh), date $(date -u +%Y-%m-%d)"
} > "$OUT/environment.log" 2>&1
cat "$OUT/environment.log"

# the edge cases in bf16, "auto" and the bf16 sums; TESTS_K replaces this selection
FAST_K="(mosaic and bf16 and (basic or k1 or empty_experts or odd_sizes or one_expert or \
wide or narrow)) or auto_times or mosaic_sums or (float16_sums and mosaic) or mosaic_pair \
or mosaic_head_sums"

run_step() {
  case $1 in
    variants) TAIL=30 step variants 130 python3 bench/probes/mosaic_variants.py --jobs 3 \
      --only summed stored_o1024 stored_o192_bn128 stored_o72 gram_rand_n8000 ;;
    check) TAIL=16 step check 300 python3 -m bench.mosaic_epilogue_check ${CHECK_ARGS:-} ;;
    tests_fast) step tests_fast 180 python3 -m pytest tests/test_cvmm_gpu.py -v -n 0 -rf \
      --tb=short -p no:cacheprovider -k "${TESTS_K:-$FAST_K}" ;;
    model) step model 150 python3 -m pytest tests/test_model_gpu.py -v -n 0 -rf --tb=short \
      -p no:cacheprovider -k gradients_through ;;
    step) TAIL=4 step step ${STEP_LIMIT:-330} env -u XLA_PYTHON_CLIENT_PREALLOCATE python3 bench/model.py \
      --profile MoEUT_244M --batch 64 --seq 1024 --steps 5 --warmup 2 --grad-clip 0.25 \
      --remat none --impl ${STEP_IMPLS:-auto mosaic} ;;
    cvmm) TAIL=17 step cvmm 200 python3 -m bench.cvmm --profiles MoEUT_244M \
      --impls mosaic,triton --pair --json "$OUT/cvmm.json" ;;
    tune) TAIL=17 step tune 420 env CVMM_AUTOTUNE=1 python3 -m bench.cvmm \
      --profiles MoEUT_244M --impls mosaic,triton --pair --json "$OUT/cvmm_tuned.json" \
      --tune-log "$OUT/tune_timings.log" ;;
    tests_full) step tests_full 260 python3 -m pytest tests/test_cvmm_gpu.py \
      tests/test_cvmm_mosaic.py -v -n 0 -rf --tb=short -p no:cacheprovider \
      -k "mosaic and not interpreted" ;;
    *) echo "== $1: no such step"; return 1 ;;
  esac
}

for name in ${STEPS:-variants check tests_fast model step cvmm tests_full}; do
  run_step "$name"
done
echo "== done after $(( $(date +%s) - START ))s"
