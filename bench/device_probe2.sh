#!/bin/bash
# One device call: the down-projection probe (bench/down_probe.py), then Nsight Compute
# on its launch orders. Logs under $OUT.
source bench/device_setup.sh
export XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader
timeout 240 python3 -m bench.down_probe ${PROBE_ARGS} 2>&1 | tee $OUT/down_probe.log
M=gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,lts__t_sector_hit_rate.pct,lts__t_sectors_op_red.sum,lts__t_sectors_op_read.sum,lts__t_requests_op_red_lookup_miss.sum,lts__throughput.avg.pct_of_peak_sustained_elapsed,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__throughput.avg.pct_of_peak_sustained_elapsed,lts__d_atomic_input_cycles_active.avg.pct_of_peak_sustained_elapsed,sm__warps_active.avg.pct_of_peak_sustained_active,launch__registers_per_thread,launch__shared_mem_per_block_dynamic,launch__occupancy_limit_registers,launch__occupancy_limit_shared_mem
timeout 200 ncu --clock-control none --kernel-name regex:_rows_kernel --metrics $M \
  python3 -m bench.down_probe --once ${ONCE:-token:128x64w4s3,expert:128x64w4s3,win8192:128x64w4s3} \
  > $OUT/ncu_down.log 2>&1; echo "ncu rc=$?"
grep -vE "^==PROF==|^ran " $OUT/ncu_down.log | cut -c1-160 | tail -80
