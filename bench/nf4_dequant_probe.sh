#!/usr/bin/env bash
# Builds and runs bench/nf4_dequant_probe.cu (see its header) on the GPU machine; JSON lines to
# stdout and to $OUT/nf4_dequant_probe.jsonl when OUT is set. Usage: bench/nf4_dequant_probe.sh [reps]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bin=${TMPDIR:-/tmp}/nf4_dequant_probe
nvcc -O3 --use_fast_math --expt-relaxed-constexpr -std=c++17 -arch=sm_90a -lineinfo \
  -I"${CSRC:-$here/../csrc}" -o "$bin" "$here/nf4_dequant_probe.cu"
"$bin" "${1:-30}" | tee ${OUT:+"$OUT/nf4_dequant_probe.jsonl"}
