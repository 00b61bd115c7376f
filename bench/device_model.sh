#!/bin/bash
# One device call: the CVMM GPU tests, then MoEUTLM training-step throughput. Logs under $OUT.
source bench/device_setup.sh
export CVMM_AUTOTUNE_CACHE=$OUT/autotune.json
cp bench/autotune_cache.json "$CVMM_AUTOTUNE_CACHE"
XLA_PYTHON_CLIENT_PREALLOCATE=false CVMM_AUTOTUNE=0 timeout ${TEST_TIMEOUT:-150} \
  python3 -m pytest tests/test_cvmm_gpu.py -q -n 8 -p no:cacheprovider -k "${TEST_K:-triton}" \
  2>&1 | tee $OUT/gpu_tests.log | tail -4
timeout ${MODEL_TIMEOUT:-200} python3 bench/model.py $MODEL_ARGS 2>&1 | tee $OUT/model.log
