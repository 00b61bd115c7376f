#!/bin/bash
# One GPU-machine call: training-step speed and peak memory of MoEUTLM (bf16) with and
# without rematerialisation, next to the official PyTorch step, one case per process
# (a process's peak memory cannot be reset), each under its own `timeout`.
#
#   MoEUT_244M, batch 64 x 1024: remat none, elementwise, lean, full, save_projections, full
#               with --scan-unroll 3 (3 loop iterations of 3 repeats), none with the layer
#               groups in a loop (--scan-unroll 1) and in 3 iterations; the official step;
#               att_n_experts=1 (one attention expert), ours and the official
#   MoEUT_1B,   batch 32 x 1024: remat full, full with --scan-unroll 3, elementwise (train.py's
#               default on GPUs), lean, none, none in a loop; the official step
#   Any jax case name takes _unrollN for --scan-unroll N (jax_244M_elementwise_unroll1).
#   On a CPU, XLA's compiled temporary memory of MoEUT_44M's step with the Triton path
#   (interpreted) is less than half with the groups in a loop than fully unrolled (the
#   GPU default): 238 against 515 MiB at batch 2.
#
# Run from the repository root, after the carried wheels are on PYTHONPATH:
#   ORIG=shared/original bash bench/memory.sh        # logs and summary.txt under $OUT
# Settings (environment): ORIG, the official MoEUT's folder (default shared/original);
# BUDGET, seconds for all cases (default 500: a call may run 600); STEPS and WARMUP per
# case (5 timed after 3 untimed, the first of which compiles); CASES, the names of the
# cases to run, in order (default all, as listed below). A case left without time is
# reported as skipped; one that runs out of memory as such, and the script goes on.
# HLO_CASES: JAX cases whose compiled step is also dumped and read by bench/hlo_memory.py
# (what is live at the peak of XLA's schedule, into $OUT/<case>.hlo.txt; the dump is
# deleted after; HLO_KEEP=1 keeps the scheduled module's entry computation, cut to what the
# walk reads, as $OUT/<case>.after_optimizations.txt.gz (MoEUT_1B's whole module, gzipped,
# was 19.8 MB: over what a device call brings back),
# which bench/hlo_memory.py reads on any machine).
# JAX takes 95% of the GPU (bench/model.py sets XLA_PYTHON_CLIENT_MEM_FRACTION unless a
# memory variable is set); the official step runs in its own process with the GPU to
# itself. Peaks: JAX's peak_bytes_in_use, PyTorch's max_memory_allocated.
OUT=${OUT:-/tmp/moeut_memory}
ORIG=${ORIG:-shared/original}
BUDGET=${BUDGET:-500}
STEPS=${STEPS:-5}
WARMUP=${WARMUP:-3}
mkdir -p "$OUT"
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
# Tile choices of the CVMM kernels: the H200-measured cache for MoEUT_244M's shapes, the
# first candidate elsewhere; no autotuning, so that every case's time is its own.
export CVMM_AUTOTUNE=0 CVMM_AUTOTUNE_CACHE=$OUT/autotune.json
cp bench/autotune_cache.json "$CVMM_AUTOTUNE_CACHE"

ALL="jax_244M_none jax_244M_elementwise jax_244M_lean jax_244M_full jax_244M_save_projections
     jax_244M_full_unroll3 jax_244M_none_unroll1 jax_244M_none_unroll3 torch_244M
     jax_244M_att1 torch_244M_att1 jax_1B_full jax_1B_full_unroll3 jax_1B_elementwise jax_1B_lean
     torch_1B jax_1B_none jax_1B_none_unroll1"
CASES=${CASES:-$ALL}
SUMMARY=$OUT/summary.txt
start=$SECONDS
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  echo "$(bash bench/code_id.sh); steps $STEPS timed after $WARMUP; batch x 1024 tokens"
} | tee "$SUMMARY"

args_of() {  # the command of one case
  local unroll=""
  local name=$1
  if [[ $name =~ ^(jax_.*)_unroll([0-9]+)$ ]]; then   # jax_..._unrollN: --scan-unroll N
    name=${BASH_REMATCH[1]}; unroll=" --scan-unroll ${BASH_REMATCH[2]}"
  fi
  case $name in
    jax_244M_att1) echo "python3 bench/model.py --profile MoEUT_244M --batch 64 --seq 1024" \
                     "--steps $STEPS --warmup $((WARMUP - 1)) --grad-clip 0.25 --impl auto" \
                     "--att-n-experts 1$unroll" ;;
    torch_244M_att1) echo "python3 bench/torch_original.py --path $ORIG --profile MoEUT_244M" \
                     "--batch 64 --seq 1024 --steps $STEPS --warmup $WARMUP --grad-clip 0.25" \
                     "--att-n-experts 1" ;;
    jax_244M_*) echo "python3 bench/model.py --profile MoEUT_244M --batch 64 --seq 1024" \
                     "--steps $STEPS --warmup $((WARMUP - 1)) --grad-clip 0.25 --impl auto" \
                     "--remat ${name#jax_244M_}$unroll" ;;
    jax_1B_*)   echo "python3 bench/model.py --profile MoEUT_1B --batch 32 --seq 1024" \
                     "--steps $STEPS --warmup $((WARMUP - 1)) --grad-clip 0.25 --impl auto" \
                     "--remat ${name#jax_1B_}$unroll" ;;
    torch_244M) echo "python3 bench/torch_original.py --path $ORIG --profile MoEUT_244M" \
                     "--batch 64 --seq 1024 --steps $STEPS --warmup $WARMUP --grad-clip 0.25" ;;
    torch_1B)   echo "python3 bench/torch_original.py --path $ORIG --profile MoEUT_1B" \
                     "--batch 32 --seq 1024 --steps $STEPS --warmup $WARMUP --grad-clip 0.25" ;;
    *) return 1 ;;
  esac
}

limit_of() {  # seconds one case may take at most (compile included)
  case $1 in
    jax_244M_full) echo 240 ;; jax_244M_*) echo 150 ;; torch_244M_att1) echo 120 ;; jax_1B_*) echo 220 ;; torch_244M) echo 120 ;; torch_1B) echo 150 ;;
  esac
}

for name in $CASES; do
  if ! cmd=$(args_of "$name"); then
    printf "%-27s unknown case (known: %s)\n" "$name" "$ALL" | tee -a "$SUMMARY"; continue
  fi
  left=$((BUDGET - (SECONDS - start)))
  limit=$(limit_of "$name")
  ((limit > left)) && limit=$left
  if ((limit < 40)); then
    printf "%-27s skipped: %ss of the budget left\n" "$name" "$left" | tee -a "$SUMMARY"
    continue
  fi
  log=$OUT/$name.log
  echo "\$ $cmd" > "$log"
  t0=$SECONDS
  dump=""
  [[ " ${HLO_CASES:-} " == *" $name "* ]] && dump=$OUT/dump_$name
  XLA_FLAGS="${XLA_FLAGS:-}${dump:+ --xla_dump_to=$dump --xla_dump_hlo_as_text --xla_dump_hlo_module_re=train_step}" \
    timeout -k 10 "$limit" $cmd >> "$log" 2>&1
  rc=$?
  if [[ -n $dump ]]; then
    timeout 60 python3 bench/hlo_memory.py "$dump" > "$OUT/$name.hlo.txt" 2>&1
    if [[ ${HLO_KEEP:-0} == 1 ]]; then   # the scheduled module, for reading elsewhere
      module=$(ls -S "$dump"/*train_step*after_optimizations.txt 2>/dev/null | head -n 1)
      [[ -n $module ]] && timeout 120 python3 bench/hlo_memory.py "$module" \
        --strip-to "$OUT/$name.after_optimizations.txt.gz"
    fi
    rm -rf "$dump"
  fi
  took=$((SECONDS - t0))
  if [[ $name == torch_* ]]; then
    result=$(tail -n 1 "$log")                       # one JSON line, or the error's last line
  else
    result=$(grep -E "^ +auto " "$log" | tail -n 1)  # the row: times and peak, or "out of memory"
    [[ -z $result ]] && result=$(tail -n 1 "$log")
  fi
  if ((rc == 124 || rc == 137)); then
    result="TIMEOUT after ${limit}s; last line: $(tail -n 1 "$log")"
  elif ((rc != 0)); then
    result="exit $rc: $result"
  fi
  printf "%-27s %4ss  %s\n" "$name" "$took" "$result" | tee -a "$SUMMARY"
done
echo "total $((SECONDS - start))s; columns of the JAX rows: impl, resolved, step ms, tokens/s," \
  "per device, last loss, first call s, peak GiB" | tee -a "$SUMMARY"
