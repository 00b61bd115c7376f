#!/bin/bash
# One device call: tile configurations of the fused-sum row kernel and of the fused
# pair forward (bench/down_probe.py), then Nsight Compute on some. Logs under $OUT.
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader
timeout 200 python3 -m bench.down_probe --pair --orders token --cfgs ${PAIR_CFGS:-128x128x64w8s3,256x128x64w8s3,256x64x64w8s3,256x128x64w16s3,256x64x64w16s3,256x128x64w16s2,128x128x64w8s4,128x128x128w8s2} 2>&1 | tee $OUT/pair_probe.log
timeout 120 python3 -m bench.down_probe --orders token --cfgs ${DOWN_CFGS:-128x64w8s3,256x32w8s3,256x32w4s3,128x32w4s3,256x64w16s3} 2>&1 | tee $OUT/down_probe.log
M=gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,lts__t_sector_hit_rate.pct,lts__t_sectors_op_red.sum,lts__t_sectors_op_read.sum,lts__t_sectors_op_write.sum,lts__t_requests_op_red_lookup_miss.sum,lts__throughput.avg.pct_of_peak_sustained_elapsed,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__throughput.avg.pct_of_peak_sustained_elapsed,lts__d_atomic_input_cycles_active.avg.pct_of_peak_sustained_elapsed,sm__warps_active.avg.pct_of_peak_sustained_active,launch__registers_per_thread,launch__shared_mem_per_block_dynamic,launch__occupancy_limit_registers,launch__occupancy_limit_shared_mem
timeout 150 ncu --clock-control none --kernel-name regex:"_pair_fwd_kernel" --metrics $M \
  python3 -m bench.down_probe --pair --once ${ONCE:-token:128x128x64w8s3,token:256x128x64w16s3} \
  > $OUT/ncu_pair.log 2>&1; echo "ncu rc=$?"
grep -vE "^==PROF==|^ran |Warning|------|Metric Name|Section:" $OUT/ncu_pair.log | cut -c1-150 | tail -60
