#!/usr/bin/env bash
# Per-SASS-instruction counts of one small-M NF4 launch (VARIANT, default auto) by Nsight
# Compute: instructions executed and warp-stall samples per instruction, exported as CSV
# (OUTDIR/sass_<case>.csv; summarise with bench/ncu_sass_summary.py). Why: the per-reason
# totals of nf4_ncu_balance.sh STALLS=1 say what the warps wait on, not where: prologue,
# window loop or epilogue.
# Usage (after fastft._C is built): CASES="1 14336 4096" VARIANT=v4 bash bench/nf4_ncu_sass.sh OUTDIR
OUT=${1:-/tmp/ncu-sass}; mkdir -p "$OUT"
NCU=${NCU:-$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)}
IFS=';' read -ra CASE_LIST <<< "${CASES:-1 14336 4096}"
for case in "${CASE_LIST[@]}"; do
  tag=$(echo $case | tr ' ' '_')
  FASTFT_NF4_GEMV=${VARIANT:-auto} timeout 180 $NCU --clock-control none -k regex:nf4_gemv \
    --launch-skip 3 --launch-count 1 --section SourceCounters --section WarpStateStats \
    -f -o "$OUT/sass_$tag" python3 bench/nf4_gemv_once.py $case > "$OUT/sass_$tag.log" 2>&1
  echo "== M N K = $case rc=$?"
  $NCU --import "$OUT/sass_$tag.ncu-rep" --page source --csv --print-source sass \
    > "$OUT/sass_$tag.csv" 2> "$OUT/sass_$tag.err" || tail -3 "$OUT/sass_$tag.err"
  python3 bench/ncu_sass_summary.py "$OUT/sass_$tag.csv" | head -60
done
