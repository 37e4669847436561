#!/usr/bin/env bash
# Nsight Compute's per-SASS-instruction view of a small-M NF4 kernel (VARIANT, default v3h),
# one profiled launch per case (CASES, "M N K;...", default M = 1 on both Llama-3.1-8B MLP
# shapes; --set full, caches flushed), saved as .ncu-rep, then printed from the report as the
# source page (SASS with per-instruction samples and stall reasons, CSV), summarised by
# bench/ncu_sass_summary.py (by opcode; the instructions with the most samples), and the
# details page. Why: the ablations of runs 28-29 split v3's time into launch, setup, loop and
# split-K sum; this says which instructions the warps wait on (run 133 found v4's stalls on
# instruction fetch: cold caches make them larger here than in a timed loop).
# CACHE=none keeps the caches warm from the launches before (ncu flushes them by default, run
# 184: instruction-fetch stalls 3.1 per issue flushed, 0.1 warm). SAMPLING=n: ncu's
# --warp-sampling-interval (a warp-stall sample every 2^(5 + n) cycles; ncu's default interval gave
# run 185 only ~1700 samples for a 16 us kernel, too few to rank a loop's instructions).
# Usage (after bench/device.sh has built fastft._C): CASES="1 14336 4096" VARIANT=v4 bash bench/nf4_ncu_source.sh OUTDIR
OUT=${1:-/tmp/ncu-source}; mkdir -p "$OUT"
NCU=${NCU:-$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)}
echo "ncu: $NCU"
IFS=';' read -ra CASE_LIST <<< "${CASES:-1 14336 4096;1 4096 14336}"
for case in "${CASE_LIST[@]}"; do
  tag=$(echo $case | tr ' ' '_')
  FASTFT_NF4_GEMV=${VARIANT:-v3h} timeout 180 $NCU --clock-control none --cache-control ${CACHE:-all} -k regex:nf4_gemv \
    --launch-skip 3 --launch-count 1 --set full --import-source yes \
    ${SAMPLING:+--warp-sampling-interval $SAMPLING} -f -o "$OUT/report_$tag" \
    python3 bench/nf4_gemv_once.py $case > "$OUT/profile_$tag.log" 2>&1
  echo "profile $case rc=$?"
  timeout 120 $NCU --import "$OUT/report_$tag.ncu-rep" --page source --print-source sass --csv \
    > "$OUT/sass_$tag.csv" 2> "$OUT/sass_$tag.err"
  echo "sass page rc=$? ($(wc -l < "$OUT/sass_$tag.csv") lines)"
  python3 bench/ncu_sass_summary.py "$OUT/sass_$tag.csv" 20 | head -45
  timeout 120 $NCU --import "$OUT/report_$tag.ncu-rep" --page details --print-details all \
    > "$OUT/details_$tag.txt" 2>&1
  echo "details rc=$?"; grep -E "^ +(Duration|DRAM Throughput|Issued Ipc Active|Achieved Occupancy)" "$OUT/details_$tag.txt" | head -6
done
