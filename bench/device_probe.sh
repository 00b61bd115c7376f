#!/bin/bash
# One device call: the reduction probe (bench/reduce_probe.py), then Nsight Compute on
# its kernels and on the σ-MoE down-projection kernel. Logs under $OUT.
source bench/device_setup.sh
export XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader
timeout 150 python3 -m bench.reduce_probe ${PROBE_ARGS} 2>&1 | tee $OUT/probe.log
NCU="ncu --clock-control none --target-processes all"
ncu --query-metrics 2>/dev/null | grep -iE "^lts__(d_atomic|t_sectors_op_red|t_requests_op_red|t_sector_op_red|average_t_sector|xbar2lts|d_sectors|lts2xbar)|^lts__t_sectors_srcunit_tex_op_red|^lts__t_sector_hit" \
  > $OUT/ncu_metrics.txt
M=gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,lts__t_sector_hit_rate.pct,lts__t_sectors_op_red.sum,lts__t_sectors_op_atom.sum,lts__t_sectors_op_write.sum,lts__t_requests_op_red.sum,lts__throughput.avg.pct_of_peak_sustained_elapsed,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__throughput.avg.pct_of_peak_sustained_elapsed
timeout 120 $NCU --kernel-name regex:_probe_kernel --metrics $M \
  python3 -m bench.reduce_probe --once ${ONCE:-v4,v4_win,v4_contig,v4_exp,store,tma_row} \
  > $OUT/ncu_probe.log 2>&1; echo "ncu probe rc=$?"
timeout 120 $NCU --kernel-name regex:_probe_kernel --section SpeedOfLight \
  --section MemoryWorkloadAnalysis_Tables --section LaunchStats --section Occupancy \
  python3 -m bench.reduce_probe --once v4 > $OUT/ncu_probe_sections.log 2>&1; echo "ncu sections rc=$?"
timeout 150 $NCU --kernel-name regex:_rows_kernel --launch-count 1 --metrics $M \
  --section SpeedOfLight --section MemoryWorkloadAnalysis_Tables \
  python3 -m bench.cvmm_kernels --kernels down_fwd --red 4 \
  > $OUT/ncu_down.log 2>&1; echo "ncu down rc=$?"
grep -E "_probe_kernel|_rows_kernel|duration|bytes|hit_rate|sectors_op|requests_op|throughput" \
  $OUT/ncu_probe.log $OUT/ncu_down.log | cut -c1-200 | head -150
