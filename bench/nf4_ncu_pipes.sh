#!/usr/bin/env bash
# Nsight Compute: how busy each pipe of the SM is in the default small-M NF4 kernel (v4 where the
# plan takes it), to tell a shared-memory-bound loop from a latency-bound one: shared-memory
# wavefronts and data-bank reads / writes (the tensor-map copies write the banks too), the
# ALU / FMA / tensor / LSU pipes, issue activity and stall reasons. One profiled launch per
# case (after 3 warm ones). Usage (after fastft._C is built): bash bench/nf4_ncu_pipes.sh OUTDIR
# CASES="M OUT IN;..." (default 4096->14336 at M = 1, 4 and 14336->4096 at M = 4); CACHE=none
# keeps the caches (instruction caches included) warm from the launches before instead of
# flushing them (ncu's default, under which a 20 us kernel fetches all its code cold); SOURCE=1
# adds the per-SASS source counters (shared-memory bank conflicts by instruction).
OUT=${1:-/tmp/ncu}; mkdir -p "$OUT"
NCU=${NCU:-$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)}
echo "ncu: $NCU"
WANT="gpu__time_duration.sum sm__cycles_elapsed.avg.per_second smsp__inst_executed.sum
smsp__issue_active.avg.pct_of_peak_sustained_active
l1tex__data_pipe_lsu_wavefronts_mem_shared.sum
l1tex__data_pipe_lsu_wavefronts_mem_shared.avg.pct_of_peak_sustained_elapsed
l1tex__data_bank_reads.sum l1tex__data_bank_reads.avg.pct_of_peak_sustained_elapsed
l1tex__data_bank_writes.sum l1tex__data_bank_writes.avg.pct_of_peak_sustained_elapsed
l1tex__throughput.avg.pct_of_peak_sustained_elapsed dram__throughput.avg.pct_of_peak_sustained_elapsed
sm__inst_executed_pipe_lsu.avg.pct_of_peak_sustained_active
sm__pipe_alu_cycles_active.avg.pct_of_peak_sustained_active
sm__pipe_fma_cycles_active.avg.pct_of_peak_sustained_active
sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active
sm__pipe_shared_cycles_active.avg.pct_of_peak_sustained_active
sm__inst_executed_pipe_alu.sum sm__inst_executed_pipe_lsu.sum"
# only the metrics this ncu knows (an unknown one fails the whole run)
"$NCU" --query-metrics > "$OUT/query.txt" 2>&1
METRICS=""
for m in $WANT; do
  base=${m%%.*}
  grep -q "^$base " "$OUT/query.txt" && METRICS="$METRICS,$m" || echo "no metric $base"
done
[ -z "$METRICS" ] && head -5 "$OUT/query.txt"
METRICS="${METRICS#,}${METRICS:+,}regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio"
rm -f "$OUT/query.txt"
SECTIONS="--section SpeedOfLight --section MemoryWorkloadAnalysis_Tables --section ComputeWorkloadAnalysis"
[ -n "${SOURCE:-}" ] && SECTIONS="$SECTIONS --section SourceCounters --print-details all"
IFS=';' read -ra cases <<< "${CASES:-1 14336 4096;4 14336 4096;4 4096 14336}"
for case in "${cases[@]}"; do
  tag=$(echo $case | tr ' ' '_')
  timeout 180 "$NCU" --clock-control none --cache-control ${CACHE:-all} -k regex:nf4_gemv \
    --launch-skip 3 --launch-count 1 \
    $SECTIONS --metrics "$METRICS" python3 bench/nf4_gemv_once.py $case > "$OUT/pipes_${CACHE:-all}_$tag.txt" 2>&1
  echo "ncu $case rc=$?"
  grep -E "__|Shared|Bank|Busy|Ipc" "$OUT/pipes_${CACHE:-all}_$tag.txt" | grep -v "stalled.*  0(\.0+)?$" \
    | sed 's/  */ /g' | cut -c1-150 | head -60
done
