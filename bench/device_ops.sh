#!/bin/bash
# One device call, each step optional: a Gluon kernel launched through jax-triton
# (GLUON=1, bench/gluon_probe.py --launch), bench/ops.py (OPS=1, OPS_ARGS), the GPU tests
# (TESTS="-k expression", TEST_WORKERS pytest workers, default 8), CPU-suite tests run on the GPU backend (CPU_TESTS="paths and
# options"), a profiled training step (PROF=1, PROF_ARGS; bench/profile_model.py),
# training-step timings (MODEL_ARGS, MODEL2_ARGS, MODEL3_ARGS; bench/model.py), CVMM
# timings (BENCH_ARGS: bench/cvmm.py, once per sum dtype in BENCH_SUMS, default: the
# library's; KERNELS_ARGS:
# bench/cvmm_kernels.py), the fused sums' errors (PREC_ARGS: bench/sum_precision.py) and
# a train.py run (TRAIN_ARGS; then RESUME_ARGS, a second run that resumes), where one
# call's device time goes (OPPROF_ARGS: bench/op_profile.py, e.g. "--kernels
# v_fwd,v_dx,v_dw,o_dx,o_dw") and SwitchHead's unit pairs (UPROBE_ARGS:
# bench/unit_pairs_probe.py). BENCH_ENVS: one bench/cvmm.py run per setting ("default
# CVMM_UNIT_PAIRS=128x64x8x2x2"). MODEL_ENV,
# MODEL2_ENV, MODEL3_ENV: environment settings ("CVMM_SUM_DTYPE=float16") of one
# training-step timing; BENCH_ENV likewise for bench/cvmm.py ("CVMM_AUTOTUNE=1": time the
# tile candidates of shapes without a cached choice; $OUT/autotune.json then holds the
# choices, for bench/merge_autotune.py). Logs under $OUT.
source bench/device_setup.sh
export CVMM_AUTOTUNE_CACHE=$OUT/autotune.json CVMM_AUTOTUNE=0
cp bench/autotune_cache.json "$CVMM_AUTOTUNE_CACHE"
if [ -n "$GLUON" ]; then
  timeout ${GLUON_TIMEOUT:-120} python3 -m bench.gluon_probe --launch 2>&1 | tee $OUT/gluon.log
fi
if [ -n "$GPROBE" ]; then
  timeout ${GPROBE_TIMEOUT:-150} python3 -m bench.gluon_rows_probe $GPROBE_ARGS 2>&1 | tee $OUT/gluon_rows_probe.log
fi
if [ -n "$OPPROF_ARGS" ]; then
  timeout ${OPPROF_TIMEOUT:-200} python3 -m bench.op_profile $OPPROF_ARGS 2>&1 | tee $OUT/op_profile.log
fi
if [ -n "$UPROBE_ARGS" ]; then
  timeout ${UPROBE_TIMEOUT:-150} python3 -m bench.unit_pairs_probe $UPROBE_ARGS 2>&1 \
    | tee $OUT/unit_pairs_probe.log
fi
if [ -n "$OPS" ]; then
  timeout ${OPS_TIMEOUT:-150} python3 -m bench.ops $OPS_ARGS 2>&1 | tee $OUT/ops.log
fi
if [ -n "$TESTS" ]; then
  XLA_PYTHON_CLIENT_PREALLOCATE=false timeout ${TEST_TIMEOUT:-150} \
    python3 -m pytest tests/ -q -n ${TEST_WORKERS:-8} -p no:cacheprovider -m gpu -k "$TESTS" \
    2>&1 | tee $OUT/gpu_tests.log | tail -4
fi
if [ -n "$CPU_TESTS" ]; then
  timeout ${TEST_TIMEOUT:-150} python3 -m pytest -q -p no:cacheprovider $CPU_TESTS \
    2>&1 | tee $OUT/cpu_tests_on_gpu.log | tail -4
fi
if [ -n "$PROF" ]; then
  timeout ${PROF_TIMEOUT:-240} python3 -m bench.profile_model --out $OUT/prof ${PROF_ARGS} \
    2>&1 | tee $OUT/profile.log
  rm -rf $OUT/prof/trace
fi
for i in "" 2 3; do
  args_var=MODEL${i}_ARGS
  if [ -n "${!args_var}" ]; then
    env_var=MODEL${i}_ENV
    env ${!env_var} timeout ${MODEL_TIMEOUT:-200} python3 bench/model.py ${!args_var} 2>&1 \
      | tee $OUT/model$i.log
  fi
done
if [ -n "$BENCH_ARGS" ]; then
  # BENCH_SUMS unset: the library's default sums (CVMM_SUM_DTYPE unset); BENCH_ENVS: one
  # run per setting ("default" or VAR=value), e.g. "default CVMM_UNIT_PAIRS=128x64x8x2x2"
  for sd in ${BENCH_SUMS:-default}; do
    if [ "$sd" = default ]; then sum_env=(); else sum_env=(CVMM_SUM_DTYPE=$sd); fi
    for be in ${BENCH_ENVS:-default}; do
      if [ "$be" = default ]; then run_env=(); tag=$sd; else run_env=($be); tag=${sd}_${be//[^A-Za-z0-9]/_}; fi
      env "${sum_env[@]}" "${run_env[@]}" $BENCH_ENV timeout ${BENCH_TIMEOUT:-240} \
        python3 -m bench.cvmm $BENCH_ARGS 2>&1 | tee $OUT/bench_$tag.log
    done
  done
fi
if [ -n "$PREC_ARGS" ]; then
  timeout ${PREC_TIMEOUT:-200} python3 -m bench.sum_precision $PREC_ARGS 2>&1 \
    | tee $OUT/precision.log
fi
if [ -n "$KERNELS_ARGS" ]; then
  timeout ${KERNELS_TIMEOUT:-200} python3 -m bench.cvmm_kernels $KERNELS_ARGS 2>&1 | tee $OUT/kernels.log
fi
if [ -n "$TRAIN_ARGS" ]; then
  timeout ${TRAIN_TIMEOUT:-240} python3 train.py $TRAIN_ARGS 2>&1 | tee $OUT/train.log
  if [ -n "$RESUME_ARGS" ]; then
    timeout ${TRAIN_TIMEOUT:-240} python3 train.py $RESUME_ARGS 2>&1 | tee $OUT/train_resume.log
  fi
fi
