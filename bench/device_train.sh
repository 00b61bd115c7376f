#!/bin/bash
# One device call: train.py end to end on the GPU (tiny profile, stop and resume), then the
# CVMM GPU tests. Logs under $OUT.
source bench/device_setup.sh
export CVMM_AUTOTUNE_CACHE=$OUT/autotune.json
cp bench/autotune_cache.json "$CVMM_AUTOTUNE_CACHE"
W=/tmp/run
timeout ${TRAIN_TIMEOUT:-150} python3 train.py --workdir $W --steps ${STEPS1:-20} --no-progress-bar \
  2>&1 | tee $OUT/train1.log
timeout ${RESUME_TIMEOUT:-60} python3 train.py --workdir $W --steps ${STEPS2:-30} --no-progress-bar \
  2>&1 | tee $OUT/train2.log | tail -8
cp $W/metrics.jsonl $OUT/ 2>/dev/null
XLA_PYTHON_CLIENT_PREALLOCATE=false CVMM_AUTOTUNE=0 timeout ${TEST_TIMEOUT:-100} \
  python3 -m pytest tests/test_cvmm_gpu.py -q -n 8 -p no:cacheprovider 2>&1 | tee $OUT/gpu_tests.log | tail -3
