#!/usr/bin/env bash
# Nsight Compute on the fused small-M NF4 kernels (VARIANTS, default "v1 v3"), one profiled
# launch each (after 3 warm ones, caches flushed by ncu): duration, DRAM throughput, issue rate,
# occupancy, and the warp stall reasons per issued instruction. Why: in graph-timed benchmarks every variant takes
# ~25 us for 29.4 MB while a plain read of the same weight takes ~9 us (bench/nf4_access_probe.py).
# Usage (after bench/device.sh has built fastft._C): bash bench/nf4_ncu.sh OUTDIR
OUT=${1:-/tmp/ncu}; mkdir -p "$OUT"
NCU=${NCU:-$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)}
echo "ncu: $NCU"
SECTIONS="--section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section SchedulerStats --section Occupancy --section LaunchStats"
STALLS="regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio"
for case in "1 14336 4096" "16 14336 4096"; do
  tag=$(echo $case | tr ' ' '_')
  for v in ${VARIANTS:-v1 v3}; do
    FASTFT_NF4_GEMV=$v timeout 120 $NCU --clock-control none -k regex:nf4_gemv --launch-skip 3 --launch-count 1 \
      $SECTIONS python3 bench/nf4_gemv_once.py $case > "$OUT/ncu_${v}_${tag}.txt" 2>&1
    echo "ncu $v $case rc=$?"; grep -E "^ +(Duration|DRAM Throughput|Memory Throughput|Issued Ipc Active|No Eligible|Achieved Occupancy|Warp Cycles Per Issued)" "$OUT/ncu_${v}_${tag}.txt" | head -12
    FASTFT_NF4_GEMV=$v timeout 120 $NCU --clock-control none -k regex:nf4_gemv --launch-skip 3 --launch-count 1 \
      --metrics "$STALLS" python3 bench/nf4_gemv_once.py $case > "$OUT/stalls_${v}_${tag}.txt" 2>&1
    echo "stalls rc=$?"; grep -E "stalled" "$OUT/stalls_${v}_${tag}.txt" | awk '$NF+0 > 0.5' | head -8
  done
done
