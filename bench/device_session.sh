#!/bin/bash
# One device call: GPU tests, then benchmarks with autotuning. Logs under $OUT.
# Usage (device run): [TESTS=1] [BENCH1="args"] [BENCH2="args"] bash bench/device_session.sh
source bench/device_setup.sh
export CVMM_AUTOTUNE_CACHE=$OUT/autotune.json
[ -f bench/autotune_cache.json ] && cp bench/autotune_cache.json "$CVMM_AUTOTUNE_CACHE"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader
python3 -c "import jax, jax_triton, triton; print('jax', jax.__version__, 'triton', triton.__version__, jax.devices()[0].device_kind, getattr(jax.devices()[0], 'core_count', None))"
if [ -n "$TESTS" ]; then
  XLA_PYTHON_CLIENT_PREALLOCATE=false CVMM_AUTOTUNE=0 timeout ${TEST_TIMEOUT:-240} \
    python3 -m pytest tests/test_cvmm_gpu.py -q -n 8 -p no:cacheprovider 2>&1 | tee $OUT/gpu_tests.log | tail -5
fi
if [ -n "$BENCH1" ]; then
  timeout ${BENCH1_TIMEOUT:-280} python3 -m bench.cvmm $BENCH1 --json $OUT/bench1.json \
    --tune-log $OUT/tune1.log 2>&1 | tee $OUT/bench1.log | grep -v "^|"
fi
if [ -n "$BENCH2" ]; then
  timeout ${BENCH2_TIMEOUT:-280} python3 -m bench.cvmm $BENCH2 --json $OUT/bench2.json \
    --tune-log $OUT/tune2.log 2>&1 | tee $OUT/bench2.log | grep -v "^|"
fi
