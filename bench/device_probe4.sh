#!/bin/bash
# One device call: column groups of the fused-sum row kernel (bench/down_probe.py,
# down and up-dx shapes), Nsight Compute on one, then the row-kernel candidate tests.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site:$PYTHONPATH PYTHONUNBUFFERED=1
timeout 60 python3 -m bench.down_probe --orders token --cfgs 128x64w4s3,128x64w4s3g2,128x64w4s3g4,128x64w8s3g2,128x128w8s3g2 2>&1 | tee $OUT/down_probe.log
timeout 40 python3 -m bench.down_probe --wt --orders token --cfgs 128x64w4s3,128x64w4s3g2,128x64w4s3g4 2>&1 | tee $OUT/down_probe_wt.log
M=gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,lts__t_sector_hit_rate.pct,lts__t_sectors_op_read.sum,lts__t_requests_op_red_lookup_miss.sum,lts__throughput.avg.pct_of_peak_sustained_elapsed
timeout 40 ncu --clock-control none --kernel-name regex:_rows_kernel --metrics $M \
  python3 -m bench.down_probe --once token:128x64w4s3g2,token:128x64w4s3g4 > $OUT/ncu_groups.log 2>&1
grep -E "_rows_kernel|duration|bytes|hit_rate|sectors|requests|throughput" $OUT/ncu_groups.log | cut -c1-120
XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 90 python3 -m pytest tests/test_cvmm_gpu.py -q -n 8 \
  -p no:cacheprovider -k "row_kernel_candidates" 2>&1 | tee $OUT/gpu_tests.log | tail -3
