#!/usr/bin/env bash
# A/B of the small-M NF4 kernels on the GPU machine, in one call: builds this tree and a base
# tree (_base_tree: e.g. `git archive main | tar -x -C _base_tree`, untracked, made before the
# call) side by side, runs the nf4 and fused-LoRA gpu tests on this tree, then times
# bench/nf4_small_m.py for both builds (this tree twice, before and after the base, to show the
# run's own noise). JSON lines and logs under $OUT. KERNELS / BASE_KERNELS / ROWS: see
# bench/nf4_small_m.py; TESTS: the test files (default the nf4 and fused-LoRA ones); SKIP_TESTS=1
# skips the tests; ROUNDS=n times each build n times in turn; STOP_ON_FAIL=1 ends the call when
# they fail; DECODE=1 / HOST=1 also time bench/decode_step.py / decode_host.py for both.
# ALT_TREE=dir: a third tree (made like the base one), built and timed as "alt" with
# BASE_KERNELS (DECODE_ALT=1: by DECODE=1 too), to compare two variants of a change with main in
# one call.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0 FASTFT_BUILD_CUDA=1
T0=$(date +%s); stamp() { echo "[+$(( $(date +%s) - T0 ))s] $*"; }
# SHAPES unquoted on a command line loses its '>' to a redirection (run 177: the benches then
# failed after the build and tests had taken their time): check it before anything runs
shapes_pattern='^[0-9]+->[0-9]+(,[0-9]+->[0-9]+)*$'
if [ -n "${SHAPES:-}" ] && ! [[ "$SHAPES" =~ $shapes_pattern ]]; then
  echo "SHAPES='$SHAPES' is not in->out pairs such as 4096->14336,14336->4096 (quote it)" >&2
  exit 2
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    .whl/*.whl > "$OUT/wheels.log" 2>&1 || tail -5 "$OUT/wheels.log"
stamp build
( MAX_JOBS=8 python3 setup.py build_ext --inplace > "$OUT/build_new.log" 2>&1; echo "new build rc=$?" ) &
( cd _base_tree && MAX_JOBS=8 python3 setup.py build_ext --inplace > "$OUT/build_base.log" 2>&1
  echo "base build rc=$?" ) &
if [ -n "${ALT_TREE:-}" ]; then
  ( cd "$ALT_TREE" && MAX_JOBS=8 python3 setup.py build_ext --inplace > "$OUT/build_alt.log" 2>&1
    echo "alt build rc=$?" ) &
fi
wait
alt_dir=${ALT_TREE:+$(cd "$ALT_TREE" && pwd)}  # (absolute: the benches run from here)
for d in . _base_tree ${alt_dir}; do [ -e $d/fastft/triton_kernels ] || ln -s ../triton_kernels $d/fastft/triton_kernels; done
grep -E "error" "$OUT/build_new.log" | head -5
if [ -z "${SKIP_TESTS:-}" ]; then
  stamp tests
  PYTHONPATH=$PWD:/tmp/site timeout ${TEST_TIMEOUT:-300} python3 -m pytest \
      ${TESTS:-tests/test_nf4.py tests/test_lora_fused.py} -m gpu -q -p no:cacheprovider -rfE \
      -n 4 > "$OUT/tests.log" 2>&1
  rc=$?; echo "tests rc=$rc"; tail -2 "$OUT/tests.log"; grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -20
  # STOP_ON_FAIL=1: a kernel that hangs or fails in the tests would only waste the benches' time
  [ -n "${STOP_ON_FAIL:-}" ] && [ $rc -ne 0 ] && { stamp "stopped: tests rc=$rc"; exit $rc; }
fi
bench() {  # tag, tree, kernels
  stamp "bench $1"
  PYTHONPATH=$2:/tmp/site KERNELS=$3 timeout 200 python3 bench/nf4_small_m.py "$1" \
      "$OUT/ab.jsonl" > "$OUT/bench_$1.log" 2>&1
  echo "bench $1 rc=$?"; grep -v '^{' "$OUT/bench_$1.log" | tail -3
}
bench new "$PWD" "${KERNELS:-auto,v3h,v1}"
bench base "$PWD/_base_tree" "${BASE_KERNELS:-auto,v3h,v1}"
[ -n "$alt_dir" ] && bench alt "$alt_dir" "${BASE_KERNELS:-auto,v3h,v1}"
bench new2 "$PWD" "${BASE_KERNELS:-auto,v3h,v1}"
# ROUNDS=n (default 1): n - 1 more rounds of base, alt, new (tags base2, alt2, new3, ...), since
# one pass per build left differences of a few percent that the next pass did not repeat (run 267)
for ((round = 2; round <= ${ROUNDS:-1}; round++)); do
  bench base$round "$PWD/_base_tree" "${BASE_KERNELS:-auto,v3h,v1}"
  [ -n "$alt_dir" ] && bench alt$round "$alt_dir" "${BASE_KERNELS:-auto,v3h,v1}"
  bench new$((round + 1)) "$PWD" "${BASE_KERNELS:-auto,v3h,v1}"
done
decode_both() {  # script, tag, lines to show: bench/<script>.py for both builds (logs only)
  for b in new base ${DECODE_ALT:+alt}; do
    tree=$PWD; [ $b = base ] && tree=$PWD/_base_tree
    [ $b = alt ] && tree=$alt_dir
    stamp "$1 $b"
    PYTHONPATH=$tree:/tmp/site timeout 240 python3 bench/$1.py --out "$OUT/$2_$b" \
        > "$OUT/$2_$b.log" 2>&1
    echo "$1 $b rc=$?"; grep -E "$3" "$OUT/$2_$b.log" | tail -8
  done
}
# DECODE=1: the graph-timed decoding forward; HOST=1: eager decoding's host time
[ -n "${DECODE:-}" ] && decode_both decode_step decode "^(B=|generate)"
[ -n "${HOST:-}" ] && decode_both decode_host host "^(peft_bnb|fused) "
stamp done
# the tests' summary again, last: a caller's `tail` of this output keeps it (run 79's did not)
if [ -z "${SKIP_TESTS:-}" ]; then
  echo "tests: $(grep -E "passed|failed|error" "$OUT/tests.log" | tail -1)"
fi
