#!/usr/bin/env bash
# Issue 11's run on a 2-GPU machine (nvidia-h200-x2): fastft under DDP and FSDP2.
# Usage (repo root):  bash bench/multi_gpu.sh [stage ...]      stages: build tests example bench
#                     (default: all four, in that order; each stage fits the 600 s per-call limit
#                     on its own, so a tight budget can run them in separate calls)
#   tests    tests/test_distributed.py -m gpu: torchrun + nccl on 2 GPUs, bf16 LoRA and QLoRA,
#            DDP / FSDP2 / FSDP2 with accelerate's layout / SFTTrainer-DDP, LoRA weights and
#            rank-0 saves against a one-GPU run
#   example  the documented launch commands of examples/README.md (torchrun DDP, torchrun --fsdp,
#            accelerate launch with both YAML files) on a small random-init model, a few steps
#   bench    training-step throughput and peak memory, Llama-3.1-8B shape, LoRA and QLoRA:
#            one GPU, DDP on 2, FSDP2 on 2, same fastft code path (bench/train_step.py's model
#            builder and fastft setup); then bench/train_step.py itself for the one-GPU figure.
#            Bars: per-GPU tokens/s under DDP and FSDP2 >= 90% of one GPU; FSDP2 per-GPU peak
#            memory below the one-GPU peak.
#            Settings (environment): MODEL BATCH MODES STEPS WARMUP; ENGINES (default
#            "single ddp fsdp2"); RESHARD=false (FSDP2 keeps layers gathered); PREFETCH=N
#            (explicit FSDP2 prefetch of N layers, forward and backward); PROFILE=1 (one
#            more step under torch.profiler, summary on stdout); TAG (log-name suffix);
#            CROSSCHECK=0 (skip train_step.py); DEADLINE_S (skip runs that would start later).
# Everything goes to $OUT (default /tmp/fastft-out): logs, JSON, multi_gpu_summary.json.
set -uo pipefail
OUT=${OUT:-/tmp/fastft-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-16}
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
PY=python3
ROOT=$PWD
NGPU=${NGPU:-2}
MODEL=${MODEL:-8b}                 # bench/train_step.py shape: 1b | 8b
BATCH=${BATCH:-4x4096}             # per GPU: sequences x tokens (one of train_step.py's shapes)
MODES=${MODES:-lora qlora}
STEPS=${STEPS:-6}
ENGINES=${ENGINES:-single ddp fsdp2}
PROFILE=${PROFILE:-0}              # 1: one more step under torch.profiler, summary on stdout
RESHARD=${RESHARD:-true}           # false: FSDP2 keeps each layer gathered from forward to backward
PREFETCH=${PREFETCH:-0}            # N > 0: FSDP2 layers prefetch the next N layers explicitly
WARMUP=${WARMUP:-2}
STAGES=${*:-build tests example bench}
CROSSCHECK=${CROSSCHECK:-1}        # 0: skip bench/train_step.py's one-GPU cross-check run
DEADLINE_S=${DEADLINE_S:-100000}   # seconds after start: later example / bench runs are skipped
T0=$(date +%s)
stamp() { echo "[multi_gpu.sh +$(( $(date +%s) - T0 ))s] $*"; }
past_deadline() { [ $(( $(date +%s) - T0 )) -gt "$DEADLINE_S" ]; }
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}

have_gpus=$($PY -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "$have_gpus" -lt "$NGPU" ]; then
  echo "multi_gpu.sh needs $NGPU GPUs, this machine has $have_gpus"; exit 2
fi
nvidia-smi topo -m > "$OUT/nvidia-topo.txt" 2>&1

for stage in $STAGES; do
case $stage in

build)
  if ls .whl/*.whl >/dev/null 2>&1; then  # carried wheels, as bench/device.sh does
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl > "$OUT/wheels.log" 2>&1 || { cat "$OUT/wheels.log"; exit 1; }
    export PYTHONPATH=/tmp/site:$PYTHONPATH
  fi
  if $PY -c "import fastft._C" 2>/dev/null; then
    stamp "fastft._C already built"
  else
    stamp "building fastft._C for $TORCH_CUDA_ARCH_LIST"
    FASTFT_BUILD_CUDA=1 $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1 \
      || { tail -40 "$OUT/build.log"; echo "build failed: the torch/Triton backends will serve"; }
    [ -e fastft/triton_kernels ] || ln -s ../triton_kernels fastft/triton_kernels
  fi
  $PY -m fastft.env > "$OUT/env.txt" 2>&1; cat "$OUT/env.txt"
  $PY -m pip list 2>/dev/null | grep -i -E "^(trl|datasets|pyarrow|accelerate|peft|bitsandbytes) " \
    | tee "$OUT/packages.txt"
  ;;

tests)
  stamp "gpu tests under DDP and FSDP2 (tests/test_distributed.py -m gpu)"
  timeout 560 $PY -m pytest tests/test_distributed.py -m gpu -q -p no:cacheprovider -rfE \
      --junitxml="$OUT/multi_gpu-tests.xml" > "$OUT/multi_gpu-tests.log" 2>&1
  echo "multi-gpu tests rc=$?"; tail -5 "$OUT/multi_gpu-tests.log"
  ;;

example)
  stamp "documented launch commands on a small random-init model"
  EX=/tmp/fastft-example-model
  $PY - "$EX" <<'PY' > "$OUT/example-model.log" 2>&1
import sys
from fastft.assets import load_default_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM
import torch
tok = load_default_tokenizer()
cfg = LlamaConfig(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=len(tok), max_position_embeddings=2048,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                  pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
torch.manual_seed(0)
LlamaForCausalLM(cfg).save_pretrained(sys.argv[1]); tok.save_pretrained(sys.argv[1])
PY
  ARGS="--model $EX --max-steps 5 --max-seq-length 512 --batch-size 2 --grad-accum 1"
  run_ex() {  # name, command...
    local name=$1; shift
    if past_deadline; then echo "example $name skipped (DEADLINE_S)"; return; fi
    timeout 170 "$@" $ARGS --output-dir "/tmp/fastft-ex-$name" > "$OUT/example-$name.log" 2>&1
    echo "example $name rc=$? : $(grep -E '^trained' "$OUT/example-$name.log" | tail -1)"
  }
  run_ex torchrun_ddp        torchrun --nproc_per_node $NGPU examples/sft_multi_gpu.py
  run_ex torchrun_fsdp2      torchrun --nproc_per_node $NGPU examples/sft_multi_gpu.py --fsdp
  run_ex torchrun_fsdp2_qlora torchrun --nproc_per_node $NGPU examples/sft_multi_gpu.py --fsdp --load-in-4bit
  run_ex accelerate_ddp      accelerate launch --num_processes $NGPU --config_file examples/accelerate_ddp.yaml examples/sft_multi_gpu.py
  run_ex accelerate_fsdp2    accelerate launch --num_processes $NGPU --config_file examples/accelerate_fsdp2.yaml examples/sft_multi_gpu.py
  # rank-0 saves of the runs: the same file names as a one-GPU run
  run_ex one_gpu             $PY examples/sft_multi_gpu.py
  for d in /tmp/fastft-ex-*/lora_adapter; do echo "$d: $(ls "$d" | tr '\n' ' ')"; done
  ;;

bench)
  # The same step as bench/train_step.py's fastft variant (its model builder and fastft setup),
  # run by one process, by torchrun with DDP, and by torchrun with FSDP2. QLoRA stores the
  # packed 4-bit weights as bf16 (bnb_4bit_quant_storage) in all three, so FSDP2 can shard them.
  cat > /tmp/fastft_dist_step.py <<'PY'
import json, os, statistics, sys, time
import torch
ROOT = os.getcwd()
sys.path[:0] = [ROOT, os.path.join(ROOT, "bench")]
import fastft  # noqa: F401  (before transformers / peft)
import torch.distributed as dist
from fastft import distributed as fd
import train_step as ts

spec = json.loads(sys.argv[1])
rank, world = fd.init_distributed()
torch.cuda.set_device(fd.local_rank())

gib = 1024 ** 3
model = ts._build_model(spec["model"], spec["seq"], 0, "cuda")
if spec["mode"] == "qlora":
    model = ts._quantize_decoder_linears(model, "cuda", quant_storage=torch.bfloat16)
model, info = ts._setup_fastft(model, spec["mode"])
model.train()
if spec["engine"] == "fsdp2":
    train = fd.fsdp2_wrap(model, reshard_after_forward=spec.get("reshard", True))
    ahead = int(spec.get("prefetch", 0))
    if ahead:  # explicit prefetch: each layer starts the next `ahead` layers' all-gathers
        layers = list(getattr(model, "get_base_model", lambda: model)().model.layers)
        for i, layer in enumerate(layers):
            layer.set_modules_to_forward_prefetch(layers[i + 1:i + 1 + ahead])
            layer.set_modules_to_backward_prefetch(layers[max(0, i - ahead):i][::-1])
elif spec["engine"] == "ddp":
    train = fd.ddp_wrap(model)
else:
    train = model
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
vocab = ts.SHAPES[spec["model"]]["vocab_size"]
gen = torch.Generator(device="cuda").manual_seed(1 + rank)
batches = [torch.randint(0, vocab, (spec["batch"], spec["seq"]), device="cuda", generator=gen) for _ in range(2)]
torch.cuda.synchronize()
setup_gib = torch.cuda.memory_allocated() / gib
torch.cuda.reset_peak_memory_stats()
times, losses = [], []
for i in range(spec["warmup"] + spec["steps"]):
    ids = batches[i % 2]
    torch.cuda.synchronize(); t = time.perf_counter()
    loss = train(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize(); times.append(time.perf_counter() - t); losses.append(float(loss))
if spec.get("profile"):  # one more step under the profiler: where a slower step's time goes
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        loss = train(input_ids=batches[0], labels=batches[0], use_cache=False).loss
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize(); wall_ms = (time.perf_counter() - t) * 1e3
    kernels = [(e.time_range.start, e.time_range.end, e.name) for e in prof.events()
               if e.device_type == torch.autograd.DeviceType.CUDA]
    def busy_ms(spans):  # length of the union of [start, end) intervals, us -> ms
        total, end = 0.0, float("-inf")
        for a, b, *_ in sorted(spans):
            if b > end:
                total += b - max(a, end); end = b
        return total / 1e3
    comm = [k for k in kernels if "nccl" in k[2].lower()]
    compute = [k for k in kernels if "nccl" not in k[2].lower()]
    if fd.is_main_process():
        print(f"PROFILE {spec['engine']} {spec['mode']}: step {wall_ms:.1f} ms wall; GPU busy (any kernel) "
              f"{busy_ms(kernels):.1f} ms; compute kernels {busy_ms(compute):.1f} ms busy, "
              f"{sum(b - a for a, b, _ in compute) / 1e3:.1f} ms summed; nccl {busy_ms(comm):.1f} ms busy "
              f"({len(comm)} kernels)", flush=True)
        print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=22, max_name_column_width=60),
              flush=True)
        # per stream: busy time; on the busiest (compute) stream, the idle gaps and what they
        # sit between: where a step waits (an all-gather, a copy) shows here
        by_stream = {}
        for e in prof.profiler.kineto_results.events():
            if e.device_type() == torch.autograd.DeviceType.CUDA:
                by_stream.setdefault(e.device_resource_id(), []).append(
                    (e.start_ns() / 1e3, (e.start_ns() + e.duration_ns()) / 1e3, e.name()))
        for sid, evs in sorted(by_stream.items(), key=lambda kv: -busy_ms(kv[1])):
            print(f"STREAM {sid}: {len(evs)} events, busy {busy_ms(evs):.1f} ms; e.g. {sorted(evs)[0][2][:60]}")
        main = sorted(max(by_stream.values(), key=busy_ms)) if by_stream else [(0.0, 0.0, "")]
        gaps, end, last = [], main[0][1], main[0][2]
        for a, b, name in main[1:]:
            if a > end:
                gaps.append((a - end, last[:50], name[:50], end, a))
            if b > end:
                end, last = b, name
        print(f"GAPS on the busiest stream: {sum(g[0] for g in gaps) / 1e3:.1f} ms idle in {len(gaps)} gaps; largest:")
        for g in sorted(gaps, reverse=True)[:8]:
            print(f"  {g[0] / 1e3:.2f} ms after {g[1]} / before {g[2]}")
        # what the host did during the three largest gaps: the longest host-side events (ops,
        # CUDA runtime calls such as a synchronize) overlapping each, with their thread
        host = [(e.start_ns() / 1e3, (e.start_ns() + e.duration_ns()) / 1e3, e.name(), e.start_thread_id())
                for e in prof.profiler.kineto_results.events()
                if e.device_type() != torch.autograd.DeviceType.CUDA]
        for g in sorted(gaps, reverse=True)[:3]:
            g0, g1 = g[3], g[4]
            inside = sorted(((min(b, g1) - max(a, g0), b - a, name, tid) for a, b, name, tid in host
                             if a < g1 and b > g0 and b - a > 200), reverse=True)[:12]
            print(f"HOST during the {g[0] / 1e3:.2f} ms gap before {g[2]}:")
            for overlap, dur, name, tid in inside:
                print(f"    {overlap / 1e3:7.2f} ms of {dur / 1e3:7.2f} ms  thread {tid}  {name[:90]}")
tok_s = spec["batch"] * spec["seq"] / statistics.median(times[spec["warmup"]:])
peak = torch.cuda.max_memory_allocated() / gib
if world > 1:  # the slowest GPU's rate and the largest GPU's peak
    t = torch.tensor([tok_s, -peak, -setup_gib], device="cuda")
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    tok_s, peak, setup_gib = t[0].item(), -t[1].item(), -t[2].item()
if fd.is_main_process():
    print("RESULT " + json.dumps(dict(spec, world=world, per_gpu_tokens_per_s=tok_s, peak_gib=peak,
                                      setup_gib=setup_gib, losses=losses, setup=info,
                                      step_s=[round(x, 4) for x in times])), flush=True)
if world > 1:
    dist.barrier(); dist.destroy_process_group()
PY
  b=${BATCH%x*}; s=${BATCH#*x}
  for mode in $MODES; do
    for engine in $ENGINES; do
      spec="{\"model\":\"$MODEL\",\"mode\":\"$mode\",\"batch\":$b,\"seq\":$s,\"engine\":\"$engine\",\"warmup\":$WARMUP,\"steps\":$STEPS,\"profile\":$PROFILE,\"reshard\":$RESHARD,\"prefetch\":$PREFETCH}"
      log="$OUT/step_${MODEL}_${mode}_${BATCH}_${engine}${TAG:-}.log"
      if past_deadline; then echo "step $mode $engine skipped (DEADLINE_S)"; continue; fi
      stamp "step $MODEL $mode $BATCH $engine"
      if [ $engine = single ]; then
        timeout 280 $PY /tmp/fastft_dist_step.py "$spec" > "$log" 2>&1
      else
        timeout 280 torchrun --nproc_per_node $NGPU /tmp/fastft_dist_step.py "$spec" > "$log" 2>&1
      fi
      echo "rc=$?"; grep '^RESULT' "$log" | sed 's/^RESULT //' > "${log%.log}.json"
      [ -s "${log%.log}.json" ] || tail -20 "$log"
    done
  done
  if [ "$CROSSCHECK" = 1 ] && ! past_deadline; then
  stamp "bench/train_step.py one-GPU figure (cross-check of the 'single' runs)"
  CUDA_VISIBLE_DEVICES=0 timeout 400 $PY bench/train_step.py --out "$OUT/train_step_1gpu" --models $MODEL \
      --modes "$(echo $MODES | tr ' ' ',')" --batches $BATCH --impls fastft --warmup $WARMUP --steps $STEPS \
      > "$OUT/train_step_1gpu.log" 2>&1
  echo "train_step rc=$?"; tail -4 "$OUT/train_step_1gpu.log"
  fi
  $PY - "$OUT" "$MODEL" "$BATCH" $MODES <<'PY'
import json, os, sys
out, model, batch, modes = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
def load(mode, engine):
    try:
        with open(os.path.join(out, f"step_{model}_{mode}_{batch}_{engine}.json")) as f:
            return json.loads(f.read() or "null")
    except FileNotFoundError:
        return None
summary = {"model": model, "batch": batch, "rows": []}
for mode in modes:
    one = load(mode, "single")
    for engine in ("ddp", "fsdp2"):
        r = load(mode, engine)
        row = {"mode": mode, "engine": engine, "ok": bool(one and r)}
        if row["ok"]:
            row.update(one_gpu_tokens_per_s=one["per_gpu_tokens_per_s"], per_gpu_tokens_per_s=r["per_gpu_tokens_per_s"],
                       throughput_ratio=r["per_gpu_tokens_per_s"] / one["per_gpu_tokens_per_s"],
                       one_gpu_peak_gib=one["peak_gib"], per_gpu_peak_gib=r["peak_gib"])
            row["throughput_bar_met"] = row["throughput_ratio"] >= 0.90
            if engine == "fsdp2":
                row["memory_bar_met"] = r["peak_gib"] < one["peak_gib"]
        summary["rows"].append(row)
        print(json.dumps(row))
with open(os.path.join(out, "multi_gpu_summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
PY
  ;;

*) echo "unknown stage $stage (build tests example bench)"; exit 2;;
esac
done
stamp "done"
