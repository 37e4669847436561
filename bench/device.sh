#!/usr/bin/env bash
# The single call on the GPU machine: build fastft._C for sm_90, run the gpu tests, run the
# benchmarks; logs and JSON go to $OUT. Usage (repo root): bash bench/device.sh [pytest -k expr]
# At its end it archives $OUT/*.log and *.txt into logs.tar.gz and removes them: send its own
# output to another name (e.g. > $OUT/device.out), or what it prints after that is lost.
# Carried wheels (.whl/: pytest, pytest-benchmark, bitsandbytes, liger-kernel, ...) are
# installed first when present, since that machine has no package index.
set -uo pipefail
OUT=${OUT:-/tmp/fastft-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-16}
export FASTFT_BUILD_CUDA=1
SELECT=${1:-}
BENCH_SELECT=${BENCH_SELECT:-$SELECT}  # a different -k for the benchmarks than for the tests
TESTS=${TESTS:-tests}      # e.g. TESTS="tests/test_norms.py tests/test_rope.py"
BENCHES=${BENCHES:-bench}
PY=python3
T0=$(date +%s)
stamp() { echo "[device.sh +$(( $(date +%s) - T0 ))s] $*"; }

if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl > "$OUT/wheels.log" 2>&1 || { cat "$OUT/wheels.log"; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1

stamp "building fastft._C for $TORCH_CUDA_ARCH_LIST"
$PY -m pip install --no-build-isolation --no-deps --no-index -v -e . > "$OUT/build.log" 2>&1
rc=$?
stamp "build rc=$rc"
if [ $rc -ne 0 ]; then  # e.g. no setuptools/wheel there for an editable install: build in place
  stamp "pip build failed; trying setup.py build_ext --inplace"
  $PY setup.py build_ext --inplace >> "$OUT/build.log" 2>&1 || { tail -60 "$OUT/build.log"; exit 1; }
  [ -e fastft/triton_kernels ] || ln -s ../triton_kernels fastft/triton_kernels
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
$PY -m fastft.env 2>&1 | tee "$OUT/env.txt"
# The CMake build of the same sources, in the background, into a scratch dir.
( cmake -S . -B /tmp/cmake-build -G Ninja -DFASTFT_OUTPUT_DIR=/tmp/cmake-out \
    -DCMAKE_PREFIX_PATH="$($PY -c 'import torch;print(torch.utils.cmake_prefix_path)')" \
    -DPython3_EXECUTABLE="$(command -v $PY)" -DTORCH_CUDA_ARCH_LIST=9.0 \
  && cmake --build /tmp/cmake-build ) > "$OUT/cmake.log" 2>&1 &
CMAKE_PID=$!

if [ -n "${SKIP_TESTS:-}" ]; then stamp "gpu tests skipped (SKIP_TESTS)"; else
stamp "gpu tests"
# TEST_WORKERS=N runs the gpu tests in N processes (pytest-xdist, carried in .whl/) on the one GPU
timeout ${TEST_TIMEOUT:-420} $PY -m pytest $TESTS -m gpu -q -p no:cacheprovider -rfE --continue-on-collection-errors \
    ${TEST_WORKERS:+-n $TEST_WORKERS} \
    ${SELECT:+-k "$SELECT"} --junitxml="$OUT/gpu-tests.xml" > "$OUT/gpu-tests.log" 2>&1
echo "gpu tests rc=$?"; grep -E "passed|failed|error" "$OUT/gpu-tests.log" | tail -3
grep -E "^(FAILED|ERROR)" "$OUT/gpu-tests.log" | head -30
fi

if [ "$BENCHES" = none ]; then stamp "benchmarks skipped (BENCHES=none)"; else
stamp "benchmarks"
FASTFT_BENCH_OUT="$OUT/kernels.json" timeout ${BENCH_TIMEOUT:-420} $PY -m pytest $BENCHES -q \
    -p no:cacheprovider -o python_files='bench_*.py' -o python_functions='bench_*' \
    ${BENCH_SELECT:+-k "$BENCH_SELECT"} --benchmark-json="$OUT/pytest-benchmark.json" \
    > "$OUT/bench.log" 2>&1
echo "bench rc=$?"; tail -3 "$OUT/bench.log"
fi
# The training-step benchmark: TRAIN_ARGS holds one or more argument sets separated by ';', e.g.
# TRAIN_ARGS="--models 8b --modes lora --batches 2x2048 --quick; --longest-only --impls fastft"
if [ -n "${TRAIN_ARGS:-}" ]; then
  i=0
  IFS=';' read -ra TRAIN_SETS <<< "$TRAIN_ARGS"
  for args in "${TRAIN_SETS[@]}"; do
    i=$((i + 1))
    stamp "train_step $args"
    timeout ${TRAIN_TIMEOUT:-400} $PY bench/train_step.py --out "$OUT/train/run$i" $args \
        > "$OUT/train_step$i.log" 2>&1
    echo "train_step rc=$?"; grep -vE "^\s*$" "$OUT/train_step$i.log" | tail -14
  done
fi
for script in ${EXTRA_SCRIPTS:-}; do
  stamp "$script"
  timeout ${EXTRA_TIMEOUT:-300} $PY $script --out "$OUT" > "$OUT/$(basename $script .py).log" 2>&1
  echo "$script rc=$?"; tail -5 "$OUT/$(basename $script .py).log"
done
wait $CMAKE_PID; echo "cmake build rc=$? ($(ls /tmp/cmake-out 2>/dev/null | tr '\n' ' '))"
[ -f "$OUT/kernels.json" ] && $PY bench/summarize.py "$OUT/kernels.json" > "$OUT/kernels.md" 2>&1
# Only a few files come back from $OUT: logs and per-variant JSON travel as two archives.
( cd "$OUT" && tar czf logs.tar.gz --ignore-failed-read *.log *.txt *.xml pytest-benchmark.json 2>/dev/null;
  rm -f *.log *.txt *.xml pytest-benchmark.json;
  [ -d train ] && tar czf train.tar.gz train && rm -rf train ) || true
ls "$OUT"
stamp done
