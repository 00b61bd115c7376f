#!/bin/bash
# The GPU tests and the benchmarks behind bench/RESULTS.md's MoEUT_244M tables, on one GPU
# machine, from the repository root. Every log goes under $OUT (default bench/out, ignored):
#   environment.log         GPU, driver, jax / triton / jax-triton versions, commit, date
#   gpu_tests.log           python3 -m pytest -m gpu tests -rs (CVMM_AUTOTUNE=0: cached or
#                           heuristic tiles, no timing; each skip listed with its reason)
#   cvmm_MoEUT_244M.log     python3 -m bench.cvmm: every projection against dense, the pair
#   train_step_MoEUT_244M.log  python3 bench/model.py: a training step, batch 64 x 1024
#   autotune_cache.json     bench/autotune_cache.json plus the tiles timed for new shapes
#                           (bench/merge_autotune.py merges them back)
#
# With the project installed (pip install "jax[cuda13]" && pip install -e ".[gpu,test]"):
#   bash bench/gpu_run.sh                       # about 10 minutes on an H200
#   PARTS="cvmm model" OUT=/tmp/run bash bench/gpu_run.sh
#
# On a GPU machine that cannot download anything (the device tool): carry the wheels it
# lacks in .whl/ (jax-triton 0.3.1, grain 0.2.18, array-record, portpicker; downloaded
# once elsewhere with `python3 -m pip download --no-deps --only-binary=:all:
# --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform
# manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
# -d .whl jax-triton==0.3.1 grain==0.2.18 array-record portpicker`; add /.whl/ to
# .git/info/exclude), name .whl in the call's carry, and run
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#     --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site && bash bench/gpu_run.sh
# A command there stops after 10 minutes: run the tests (about 7 minutes with 12 workers)
# in one call, PARTS=tests, and the benchmarks in another, PARTS="cvmm model".
#
# PARTS: any of tests, cvmm, model (default: all three). TEST_WORKERS (12) and the
# TEST_TIMEOUT / BENCH_TIMEOUT / MODEL_TIMEOUT seconds (540 / 300 / 300) bound each part.
set -u
OUT=${OUT:-bench/out}
PARTS=${PARTS:-tests cvmm model}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export CVMM_AUTOTUNE_CACHE=$OUT/autotune_cache.json
cp bench/autotune_cache.json "$CVMM_AUTOTUNE_CACHE"

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import jax, triton, jax_triton as jt; print('jax', jax.__version__, 'triton',
    triton.__version__, 'jax-triton', getattr(jt, '__version__', '?'), jax.devices())"
  echo "$(bash bench/code_id.sh), date $(date -u +%Y-%m-%d)"
} 2>&1 | tee "$OUT/environment.log"

for part in $PARTS; do
  case $part in
    tests)
      XLA_PYTHON_CLIENT_PREALLOCATE=false CVMM_AUTOTUNE=0 timeout "${TEST_TIMEOUT:-540}" \
        python3 -m pytest -m gpu tests -q -rs -n "${TEST_WORKERS:-12}" -p no:cacheprovider \
        > "$OUT/gpu_tests.log" 2>&1
      echo "tests (exit $?): $(tail -1 "$OUT/gpu_tests.log")" ;;
    cvmm)
      timeout "${BENCH_TIMEOUT:-300}" python3 -m bench.cvmm --profiles MoEUT_244M \
        --impls triton --pair --json "$OUT/cvmm_MoEUT_244M.json" 2>&1 \
        | tee "$OUT/cvmm_MoEUT_244M.log" ;;
    model)
      timeout "${MODEL_TIMEOUT:-300}" python3 bench/model.py --profile MoEUT_244M \
        --batch 64 --seq 1024 --steps 4 2>&1 | tee "$OUT/train_step_MoEUT_244M.log" ;;
    *)
      echo "unknown part '$part' (tests, cvmm, model)"; exit 2 ;;
  esac
done
