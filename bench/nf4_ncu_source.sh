#!/usr/bin/env bash
# Nsight Compute's per-SASS-instruction view of the default small-M NF4 kernel (VARIANT,
# default v3h) at M = 1 on both Llama-3.1-8B MLP shapes: one profiled launch each (--set full,
# caches flushed), saved as .ncu-rep, then printed from the report as the source page (SASS with
# per-instruction samples and stall reasons, CSV) and the details page. Why: the ablations of
# runs 28-29 split v3's time into launch, setup, loop and split-K sum; this says which
# instructions of the loop the warps wait on.
# Usage (after bench/device.sh has built fastft._C): bash bench/nf4_ncu_source.sh OUTDIR
OUT=${1:-/tmp/ncu-source}; mkdir -p "$OUT"
NCU=${NCU:-$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)}
echo "ncu: $NCU"
for case in "1 14336 4096" "1 4096 14336"; do
  tag=$(echo $case | tr ' ' '_')
  FASTFT_NF4_GEMV=${VARIANT:-v3h} timeout 180 $NCU --clock-control none -k regex:nf4_gemv \
    --launch-skip 3 --launch-count 1 --set full --import-source yes -f -o "$OUT/report_$tag" \
    python3 bench/nf4_gemv_once.py $case > "$OUT/profile_$tag.log" 2>&1
  echo "profile $case rc=$?"
  timeout 120 $NCU --import "$OUT/report_$tag.ncu-rep" --page source --print-source sass --csv \
    > "$OUT/sass_$tag.csv" 2> "$OUT/sass_$tag.err"
  echo "sass page rc=$? ($(wc -l < "$OUT/sass_$tag.csv") lines)"
  timeout 120 $NCU --import "$OUT/report_$tag.ncu-rep" --page details --print-details all \
    > "$OUT/details_$tag.txt" 2>&1
  echo "details rc=$?"; grep -E "^ +(Duration|DRAM Throughput|Issued Ipc Active|Achieved Occupancy)" "$OUT/details_$tag.txt" | head -6
done
