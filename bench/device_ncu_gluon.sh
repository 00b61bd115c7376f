#!/bin/bash
# One device call: Nsight Compute on the Gluon fused-sum row kernel at the σ-MoE down
# projection's shape (bench/gluon_rows_probe.py), one launch per PROBE variant in
# NCU_VARIANTS (default "0 1 5"), with the sections that say where its warps wait;
# then the probe's timings of every variant (PROBE_TILINGS). Logs under $OUT.
source bench/device_setup.sh
export XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
for v in ${NCU_VARIANTS:-0 1 5}; do
  timeout ${NCU_TIMEOUT:-150} ncu --clock-control none --target-processes all \
    --kernel-name regex:_rows_sum_kernel --launch-count 1 \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
    --section SchedulerStats --section Occupancy --section LaunchStats \
    --section ComputeWorkloadAnalysis --section SourceCounters \
    python3 -m bench.gluon_rows_probe --variants $v --tilings ${NCU_TILING:-128x64x4x4} \
    --no-triton > $OUT/ncu_gluon_v$v.log 2>&1
  echo "ncu variant $v rc=$?"
  grep -E "Duration|Throughput|Busy|Hit Rate|Warp Cycles|Stall|Eligible|Issued Warp|Active Warps|Achieved Occupancy|Theoretical Occupancy|Block Limit|Registers|Shared Memory Config|Dynamic Shared" \
    $OUT/ncu_gluon_v$v.log | cut -c1-150 | head -60
done
timeout ${PROBE_TIMEOUT:-200} python3 -m bench.gluon_rows_probe \
  --tilings ${PROBE_TILINGS:-128x64x4x4,256x64x8x3} 2>&1 | tee $OUT/gluon_rows_probe.log
