#!/bin/bash
# One device call: optionally the CVMM GPU tests (TESTS="-k expression"), then a profiler
# trace of MoEUTLM training steps summed per op (bench/profile_model.py). Logs under $OUT.
source bench/device_setup.sh
export CVMM_AUTOTUNE_CACHE=$OUT/autotune.json CVMM_AUTOTUNE=0
cp bench/autotune_cache.json "$CVMM_AUTOTUNE_CACHE"
if [ -n "$TESTS" ]; then
  XLA_PYTHON_CLIENT_PREALLOCATE=false timeout ${TEST_TIMEOUT:-150} \
    python3 -m pytest tests/test_cvmm_gpu.py -q -n 8 -p no:cacheprovider -k "$TESTS" \
    2>&1 | tee $OUT/gpu_tests.log | tail -4
fi
timeout ${PROF_TIMEOUT:-240} python3 -m bench.profile_model --out $OUT/prof ${PROF_ARGS} \
  2>&1 | tee $OUT/profile.log
rm -rf $OUT/prof/trace/plugins/profile/*/*.xplane.pb
