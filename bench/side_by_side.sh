#!/bin/bash
# The original's CVMM binding tested on the GPU, then the official PyTorch MoEUT and
# moeut-jax trained side by side (python -m moeut_jax.side_by_side), in one command of at
# most TOTAL seconds (default 520) on one H100 or H200, from the repository root:
#
#   bash bench/side_by_side.sh            # ORIG=.orig OUT=bench/out/side_by_side
#
# ORIG: folder of a clone of the official MoEUT (default .orig, git-ignored; on the device
# tool carry it with .whl). Logs under OUT:
#   environment.log      GPU, driver, versions, commit, date
#   gpu_tests.log        pytest -m gpu tests/test_cvmm_original_gpu.py and the attention
#                        tests of tests/test_model_gpu.py (causal at the profiles' head
#                        sizes, accurate against float32) (TEST_TIMEOUT, 120 s; TESTS=0
#                        leaves the tests out and gives their time to the runs)
#   side_by_side.log     the tool's output: per-run progress, the training losses side by
#                        side, the table of held-out losses; runs/ holds its files
#                        (summary.json, side_by_side.png, one .json and .log per run)
#   side_by_side_f32.log the same in float32 for F32_VARIANTS (default none; e.g.
#                        "original,jax"), at the same time as the bf16 runs; runs_f32/.
#                        On an 80 GB H100 the float32 original beside seven bf16 runs ran
#                        out of memory: give the float32 runs a call with few bf16 runs
#                        (VARIANTS=original F32_VARIANTS=original,jax TESTS=0)
#
# The comparison: PROFILE (MoEUT_126M), STEPS (200) of 16 x 512 bytes of text (the .py
# files of the machine's Python standard library: readable, and there without network),
# bf16, runs (VARIANTS): the original twice (its run-to-run spread), moeut-jax as it is,
# with each original-numerics option (original_routers, original_cvmm, original_rope) and
# with all three: bench/RESULTS.md's table (on an H200 the seven runs took 327 s, the
# original's about 1.3 s a step); e.g. VARIANTS=original,original,original+float32_rope_table
# runs the original with its RoPE angle table in float32. And, if asked, in float32 the
# original and moeut-jax (neither uses a 16-bit kernel there: where the bf16 gap is not in
# float32, it comes from the bf16 GPU path). PARALLEL (7: all at once; MoEUT_126M at
# 16 x 512 needs a few GiB per run) runs share the GPU at a time; each wave of runs gets
# its share of the time left after the tests and the setup, and a run that overruns is
# stopped and reported as such, the others still in the table.
#
# Runs stopped at their time keep their curves up to their last evaluation. Where one call
# cannot run every variant to STEPS (with nine processes on one H100 the original's runs
# took over 2 s a step), spread them over calls with the same settings, each into its own
# OUT, e.g. VARIANTS=original,original then VARIANTS=jax,jax+original_routers,..., and
# join them: python -m moeut_jax.side_by_side.collect OUT1/runs OUT2/runs --out joined
#
# Without network (the device tool): the jax-triton wheel is taken from .whl/ (see
# bench/gpu_run.sh) when jax_triton is not importable.
set -u
START=$SECONDS
TOTAL=${TOTAL:-520}
ORIG=${ORIG:-.orig}
OUT=${OUT:-bench/out/side_by_side}
PROFILE=${PROFILE:-MoEUT_126M}
STEPS=${STEPS:-200}
PARALLEL=${PARALLEL:-7}
VARIANTS=${VARIANTS:-original,original,jax,jax+original_routers,jax+original_cvmm,jax+original_rope,jax+original_routers+original_cvmm+original_rope}
F32_VARIANTS=${F32_VARIANTS-}
mkdir -p "$OUT"
if ! python3 -c "import jax_triton" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export CVMM_AUTOTUNE=0 XLA_PYTHON_CLIENT_PREALLOCATE=false
if [ ! -f "$ORIG/moeut/cvmm.py" ]; then
  echo "ORIG=$ORIG holds no moeut/cvmm.py: give the folder of a clone of the official MoEUT"
  exit 2
fi
# the tests find the clone in .orig
[ "$ORIG" = .orig ] || [ -e .orig ] || ln -s "$(cd "$ORIG" && pwd)" .orig

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import jax, torch, triton, jax_triton as jt; print('jax', jax.__version__,
    'torch', torch.__version__, 'triton', triton.__version__, 'jax-triton',
    getattr(jt, '__version__', '?'), jax.devices())"
  echo "$(bash bench/code_id.sh), date $(date -u +%Y-%m-%d)"
} 2>&1 | tee "$OUT/environment.log"

if [ "${TESTS:-1}" != 0 ]; then
  timeout "${TEST_TIMEOUT:-120}" python3 -m pytest -m gpu tests/test_cvmm_original_gpu.py \
    tests/test_model_gpu.py -k "original or causal_attention" -q -rf \
    -n "${TEST_WORKERS:-4}" -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1
  echo "binding tests (exit $?): $(tail -1 "$OUT/gpu_tests.log")"
fi

STDLIB=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")
LEFT=$((TOTAL - (SECONDS - START) - 15))
count() { tr ',' '\n' <<< "$1" | grep -c .; }   # entries of a comma-separated list
WAVES=$((($(count "$VARIANTS") + PARALLEL - 1) / PARALLEL))      # the float32 runs go beside them
RUN_TIMEOUT=$(((LEFT - 40) / WAVES))
echo "side by side: $PROFILE, $STEPS steps, ${LEFT} s left, ${RUN_TIMEOUT} s per run"
compare() {  # compare DTYPE VARIANTS PARALLEL NAME: one run of the tool into $OUT/NAME
  timeout "$LEFT" python3 -m moeut_jax.side_by_side --original "$ORIG" --text "$STDLIB" \
    --max-bytes $((16 << 20)) --profile "$PROFILE" --steps "$STEPS" --batch 16 --seq 512 \
    --dtype "$1" --eval-every 100 --eval-batches 8 --parallel "$3" \
    --timeout "$RUN_TIMEOUT" --out "$OUT/$4" --variants "$2" \
    2>&1 | grep -v -e FutureWarning -e impl_abstract > "$OUT/side_by_side${4#runs}.log"
}
if [ -n "$F32_VARIANTS" ]; then       # all at once, beside the bf16 runs
  compare float32 "$F32_VARIANTS" "$(count "$F32_VARIANTS")" runs_f32 &
fi
compare bfloat16 "$VARIANTS" "$PARALLEL" runs
wait
cat "$OUT/side_by_side.log"
[ -n "$F32_VARIANTS" ] && cat "$OUT/side_by_side_f32.log"
echo "total $((SECONDS - START)) s"
