#!/bin/bash
# One device call: what bf16 fused sums (CVMM_SUM_DTYPE=bfloat16) change. Steps, each
# skipped when its variable is empty:
#   PROBE=1      reduction probe: float32 v4 vs bf16x2 v4 vs plain stores
#   PREC_TOKENS  errors of the σ-MoE pair with both sum dtypes (bench/sum_precision.py)
#   TESTS        pytest -k expression over tests/test_cvmm_gpu.py
#   KERNELS      per-kernel timings with both sum dtypes (KERNELS_ARGS: extra options)
#   BENCH        bench/cvmm.py options, run with CVMM_SUM_DTYPE=${BENCH_SUM:-float32}
#                (FRESH=1: autotune from an empty cache instead of bench/autotune_cache.json)
#   MODEL=1      MoEUT_244M training step (bench/model.py), float32 then bf16 sums
# Logs under $OUT. Usage (device run): PROBE=1 PREC_TOKENS=65536 ... bash bench/device_sums.sh
source bench/device_setup.sh
export CVMM_AUTOTUNE_CACHE=$OUT/autotune.json
[ -z "$FRESH" ] && cp bench/autotune_cache.json "$CVMM_AUTOTUNE_CACHE"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader
if [ -n "$PROBE" ]; then
  XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 60 python3 -m bench.reduce_probe \
    --variants v4,bf16,store 2>&1 | tee $OUT/probe.log
fi
if [ -n "$PREC_TOKENS" ]; then
  timeout ${PREC_TIMEOUT:-150} python3 -m bench.sum_precision --profile MoEUT_244M \
    --tokens $PREC_TOKENS 2>&1 | tee $OUT/precision.log
fi
if [ -n "$TESTS" ]; then
  XLA_PYTHON_CLIENT_PREALLOCATE=false CVMM_AUTOTUNE=0 timeout ${TEST_TIMEOUT:-120} \
    python3 -m pytest tests/test_cvmm_gpu.py -q -n 8 -p no:cacheprovider -k "$TESTS" 2>&1 \
    | tee $OUT/gpu_tests.log | tail -5
fi
if [ -n "$KERNELS" ]; then
  timeout ${KERNELS_TIMEOUT:-240} python3 -m bench.cvmm_kernels --kernels $KERNELS --red 4 \
    --sums float32,bfloat16 $KERNELS_ARGS --json $OUT/kernels.json 2>&1 | tee $OUT/kernels.log
fi
if [ -n "$MODEL" ]; then
  for sd in float32 bfloat16; do
    CVMM_SUM_DTYPE=$sd CVMM_AUTOTUNE=0 timeout ${MODEL_TIMEOUT:-110} python3 bench/model.py \
      --profile MoEUT_244M --batch 16 --seq 1024 --steps 5 --impl auto 2>&1 \
      | tee $OUT/model_$sd.log | tail -3
  done
fi
if [ -n "$BENCH" ]; then
  CVMM_SUM_DTYPE=${BENCH_SUM:-float32} timeout ${BENCH_TIMEOUT:-200} python3 -m bench.cvmm \
    $BENCH --json $OUT/bench.json --tune-log $OUT/tune.log 2>&1 | tee $OUT/bench.log \
    | grep -v "^|"
fi
