#!/bin/bash
# One device call: per-kernel timings (bench/cvmm_kernels.py), then the σ-MoE pair and
# the four projections with a fresh autotuner cache. Logs under $OUT.
# Usage (device run): [KERNELS_ARGS="..."] [BENCH_ARGS="..."] bash bench/device_kernels.sh
source bench/device_setup.sh
export CVMM_AUTOTUNE_CACHE=$OUT/autotune.json
# SEED=1 starts the autotuner from bench/autotune_cache.json (only new shapes or
# dropped entries are timed); otherwise from an empty cache.
[ -n "$SEED" ] && cp bench/autotune_cache.json "$CVMM_AUTOTUNE_CACHE"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader
if [ "${KERNELS_ARGS-x}" != "" ]; then
  timeout ${KERNELS_TIMEOUT:-300} python3 -m bench.cvmm_kernels ${KERNELS_ARGS} \
    --json $OUT/kernels.json 2>&1 | tee $OUT/kernels.log
fi
if [ -n "$BENCH_ARGS" ]; then
  timeout ${BENCH_TIMEOUT:-240} python3 -m bench.cvmm $BENCH_ARGS --json $OUT/bench.json \
    --tune-log $OUT/tune.log 2>&1 | tee $OUT/bench.log | grep -v "^|"
fi
if [ -n "$TESTS" ]; then
  XLA_PYTHON_CLIENT_PREALLOCATE=false CVMM_AUTOTUNE=0 timeout ${TEST_TIMEOUT:-200} \
    python3 -m pytest tests/test_cvmm_gpu.py -q -n 8 -p no:cacheprovider -k "$TESTS" 2>&1 \
    | tee $OUT/gpu_tests.log | tail -5
fi
