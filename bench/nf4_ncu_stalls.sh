#!/usr/bin/env bash
# Why a small-M NF4 kernel's warps wait: Nsight Compute's per-reason stall counts (warps stalled
# per issued instruction, by reason) and the issue / shared-memory use of one profiled launch per
# case (after 3 warm ones), for VARIANT (default auto; e.g. v4, v3h). Run 127 found the v4 decode
# neither issue- nor shared-memory-bound (41-49% / 42-57% of peak): these say which latency it is.
# Usage (after fastft._C is built): CASES="1 14336 4096;4 14336 4096" VARIANT=v4 \
#   bash bench/nf4_ncu_stalls.sh OUTDIR      (a case is M OUT_FEATURES IN_FEATURES)
OUT=${1:-/tmp/ncu-stalls}; mkdir -p "$OUT"
NCU=${NCU:-$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)}
[ -n "$NCU" ] || { echo "ncu not found"; exit 1; }
METRICS="gpu__time_duration.sum,smsp__inst_executed.sum,smsp__issue_active.avg.pct_of_peak_sustained_active,l1tex__data_pipe_lsu_wavefronts_mem_shared.avg.pct_of_peak_sustained_active,regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio"
IFS=';' read -ra CASE_LIST <<< "${CASES:-1 14336 4096;1 4096 14336}"
for case in "${CASE_LIST[@]}"; do
  tag=$(echo "$case" | tr ' ' '_')
  FASTFT_NF4_GEMV=${VARIANT:-auto} timeout 180 "$NCU" --clock-control none -k regex:nf4_gemv \
    --launch-skip 3 --launch-count 1 --metrics "$METRICS" \
    python3 bench/nf4_gemv_once.py $case > "$OUT/stalls_${VARIANT:-auto}_$tag.txt" 2>&1
  echo "== ${VARIANT:-auto} M N K = $case rc=$?"
  # the reasons above 0.05 warps per issue, largest first, then the totals
  grep -E "issue_stalled_" "$OUT/stalls_${VARIANT:-auto}_$tag.txt" |
    awk '{v=$NF; gsub(",", "", v); if (v + 0 > 0.05) print v, $1}' | sort -rn | head -12
  grep -E "^ +(gpu__|smsp__inst|smsp__issue|l1tex__)" "$OUT/stalls_${VARIANT:-auto}_$tag.txt"
done
