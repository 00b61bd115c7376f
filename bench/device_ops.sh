#!/bin/bash
# One device call: bench/ops.py (attention, routers, top-k, sort), then optionally the
# CVMM GPU tests (TESTS="-k expression") and a profiled training step
# (bench/profile_model.py, PROF=1). Logs under $OUT.
source bench/device_setup.sh
export CVMM_AUTOTUNE_CACHE=$OUT/autotune.json CVMM_AUTOTUNE=0
cp bench/autotune_cache.json "$CVMM_AUTOTUNE_CACHE"
timeout ${OPS_TIMEOUT:-150} python3 -m bench.ops $OPS_ARGS 2>&1 | tee $OUT/ops.log
if [ -n "$TESTS" ]; then
  XLA_PYTHON_CLIENT_PREALLOCATE=false timeout ${TEST_TIMEOUT:-150} \
    python3 -m pytest tests/ -q -n 8 -p no:cacheprovider -m gpu -k "$TESTS" \
    2>&1 | tee $OUT/gpu_tests.log | tail -4
fi
if [ -n "$CPU_TESTS" ]; then  # CPU-suite tests run on the GPU backend
  timeout ${TEST_TIMEOUT:-150} python3 -m pytest -q -p no:cacheprovider $CPU_TESTS \
    2>&1 | tee $OUT/cpu_tests_on_gpu.log | tail -4
fi
if [ -n "$PROF" ]; then
  timeout ${PROF_TIMEOUT:-240} python3 -m bench.profile_model --out $OUT/prof ${PROF_ARGS} \
    2>&1 | tee $OUT/profile.log
  rm -rf $OUT/prof/trace
fi
if [ -n "$MODEL" ]; then
  timeout ${MODEL_TIMEOUT:-200} python3 bench/model.py $MODEL_ARGS 2>&1 | tee $OUT/model.log
fi
if [ -n "$MODEL2" ]; then
  timeout ${MODEL_TIMEOUT:-200} python3 bench/model.py $MODEL2_ARGS 2>&1 | tee $OUT/model2.log
fi
