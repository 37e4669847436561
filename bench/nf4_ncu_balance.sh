#!/usr/bin/env bash
# Nsight Compute counters of the default small-M NF4 kernel (VARIANT, default auto), one
# profiled launch per case (after 3 warm ones): kernel time alone, how evenly the SMs are busy
# (active cycles min / mean / max against the elapsed ones), issue use, shared-memory
# wavefronts and DRAM bytes. Why: per-call times in the graph-timed benches include the gap
# between kernels; these say how much of the kernel itself is the loop's rate and how much is
# SMs waiting (a grid that does not divide evenly, the start and the end).
# Usage (after bench/device.sh has built fastft._C): CASES="1 14336 4096;16 4096 14336" bash bench/nf4_ncu_balance.sh OUTDIR
# STALLS=1 also collects the per-reason stall counts (warps stalled per issued instruction) and
# prints the reasons above 0.05, largest first: run 127 found the v4 decode neither issue- nor
# shared-memory-bound (41-49% / 42-57% of peak), so which latency it waits on is the question.
OUT=${1:-/tmp/ncu-balance}; mkdir -p "$OUT"
NCU=${NCU:-$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)}
METRICS=gpu__time_duration.sum,sm__cycles_elapsed.max,sm__cycles_active.min,sm__cycles_active.avg,sm__cycles_active.max,smsp__issue_active.avg.pct_of_peak_sustained_active,l1tex__data_pipe_lsu_wavefronts_mem_shared.sum,l1tex__data_pipe_lsu_wavefronts_mem_shared.avg.pct_of_peak_sustained_active,smsp__inst_executed.sum,dram__bytes_read.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__warps_active.avg.pct_of_peak_sustained_active,launch__grid_size,launch__block_size,launch__registers_per_thread,launch__cluster_dim_x
[ -n "${STALLS:-}" ] && METRICS="$METRICS,regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio"
IFS=';' read -ra CASE_LIST <<< "${CASES:-1 4096 14336;1 14336 4096;16 4096 14336;16 14336 4096}"
for case in "${CASE_LIST[@]}"; do
  tag=$(echo $case | tr ' ' '_')
  FASTFT_NF4_GEMV=${VARIANT:-auto} timeout 120 $NCU --clock-control none -k regex:nf4_gemv \
    --launch-skip 3 --launch-count 1 --metrics "$METRICS" \
    python3 bench/nf4_gemv_once.py $case > "$OUT/balance_$tag.txt" 2>&1
  echo "== M N K = $case rc=$?"
  grep -E "^ +(gpu__|sm__|smsp__|l1tex__|dram__|launch__)" "$OUT/balance_$tag.txt" | grep -v issue_stalled_
  [ -n "${STALLS:-}" ] && grep -E "issue_stalled_" "$OUT/balance_$tag.txt" |
    awk '{v=$NF; gsub(",", "", v); if (v + 0 > 0.05) print v, $1}' | sort -rn | head -12
done
