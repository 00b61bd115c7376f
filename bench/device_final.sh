#!/bin/bash
# One device call: CVMM GPU tests, the MoEUT_244M table (autotuned, cache seeded from
# bench/autotune_cache.json), MoEUTLM training-step throughput, then the other
# profiles (heuristic tiles: CVMM_AUTOTUNE=0). Logs under $OUT.
source bench/device_setup.sh
export CVMM_AUTOTUNE_CACHE=$OUT/autotune.json
cp bench/autotune_cache.json "$CVMM_AUTOTUNE_CACHE"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader
XLA_PYTHON_CLIENT_PREALLOCATE=false CVMM_AUTOTUNE=0 timeout ${TEST_TIMEOUT:-90} \
  python3 -m pytest tests/test_cvmm_gpu.py -q -n 8 -p no:cacheprovider -k "${TEST_K:-triton or pair}" \
  2>&1 | tee $OUT/gpu_tests.log | tail -3
timeout ${BENCH1_TIMEOUT:-100} python3 -m bench.cvmm --profiles MoEUT_244M --impls triton --pair \
  --json $OUT/bench244.json --tune-log $OUT/tune244.log 2>&1 | tee $OUT/bench244.log | grep -v "^|"
CVMM_AUTOTUNE=0 timeout ${MODEL_TIMEOUT:-110} python3 bench/model.py --profile MoEUT_244M --batch 16 --seq 1024 \
  --steps 5 --impl auto 2>&1 | tee $OUT/model.log
CVMM_AUTOTUNE=0 timeout ${BENCH2_TIMEOUT:-250} python3 -m bench.cvmm \
  --profiles MoEUT_44M,MoEUT_126M,MoEUT_318M,MoEUT_727M,MoEUT_1B --impls triton --pair \
  --json $OUT/bench_profiles.json 2>&1 | tee $OUT/bench_profiles.log | grep -v "^|"
