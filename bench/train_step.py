"""End-to-end training-step benchmark: fastft vs transformers + peft, one process per variant.

    python bench/train_step.py --out DIR [--models 1b,8b] [--modes lora,qlora]
                               [--batches 2x2048,4x4096,1x16384] [--impls baseline,fastft]
                               [--quick] [--warmup N] [--steps N]
                               [--longest] [--longest-lengths 344064,...] [--cap-gb 80]

Every variant runs in its own subprocess (so one variant's allocations, patches and OOMs cannot
affect another) on the same random-init model (LlamaConfig of the Llama-3.2-1B / Llama-3.1-8B
shape, bf16, built directly on the GPU from one seed) and the same random token batches (never
zeros). LoRA: r=16, alpha=16, dropout 0, all 7 projections; QLoRA: the decoder's linear layers
are NF4 (bitsandbytes Linear4bit, double quantisation, bf16 compute) in both variants.

  baseline: transformers + peft (+ bitsandbytes for QLoRA), SDPA attention, transformers'
            gradient checkpointing (non-reentrant), the model's own loss.
  fastft:   fastft.models.patch_model + FastLanguageModel.get_peft_model with
            use_gradient_checkpointing="unsloth" (fused LoRA, offloaded checkpointing, fused
            kernels and loss, whatever the loader enables).

Reported per variant (JSON, one file per variant plus summary.json in DIR): tokens/s (median
over the timed steps after warm-up; a step = forward + backward + AdamW step), peak GPU memory,
memory after load + LoRA setup, their difference ("beyond_setup"), and the loss of every step
(same seed and data in both variants, so the curves can be compared).

--memory-breakdown: after the timed steps, one more step with the CUDA allocator's history
recorded; the JSON then holds the blocks alive at that step's peak, grouped by the fastft /
transformers / peft line that allocated them (what to slim to make room under the memory bar).

--longest / --longest-only: the longest batch-1 sequence that trains one step of the 8B QLoRA
model with the process capped at --cap-gb GB (10^9 bytes, torch.cuda.set_per_process_memory_fraction),
each probe its own subprocess. Baseline: binary search over --baseline-range (short: each probe
is about a minute). fastft: one probe at --fastft-probe (344064 tokens; such a step takes several
minutes since attention is quadratic), or a binary search with --fastft-search.
--longest-lengths probes exactly the given lengths for every impl. Run it as its own command, e.g.
    python bench/train_step.py --out DIR --longest-only --impls fastft
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False),
    # for a CPU smoke run of the worker code path only
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=300, tie_word_embeddings=False),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK = 16


# ------------------------------------------------------------------------------- worker side

def _config(shape: str, seq: int, layers: int | None = None):
    from transformers import LlamaConfig

    dims = dict(SHAPES[shape])
    if layers:  # fewer decoder layers of the same shape (the longest-sequence memory probe)
        dims["num_hidden_layers"] = layers
    return LlamaConfig(
        **dims, rms_norm_eps=1e-5, max_position_embeddings=max(131072, seq),
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
        attn_implementation="sdpa", use_cache=False,
        bos_token_id=128000 if shape != "tiny" else None, eos_token_id=128001 if shape != "tiny" else None)


def _build_model(shape: str, seq: int, seed: int, device: str = "cuda", layers: int | None = None):
    """Random-init LlamaForCausalLM in bf16, constructed directly on the GPU."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(_config(shape, seq, layers))
    finally:
        torch.set_default_dtype(old)
    return model.to(torch.bfloat16)


def _quantize_decoder_linears(model, device="cuda", quant_storage=None):
    """Replace every nn.Linear inside the decoder layers by an NF4 bitsandbytes Linear4bit
    (double quantisation, bf16 compute) holding the same weights, as a QLoRA load would.
    quant_storage (e.g. torch.bfloat16, bnb_4bit_quant_storage): the packed bytes stored as that
    dtype so FSDP2 can shard them (bench/multi_gpu.sh); the layer then also keeps the quant state
    (FSDP2 drops weight.quant_state)."""
    import bitsandbytes as bnb
    import torch
    from torch import nn

    storage = {} if quant_storage is None else {"quant_storage": quant_storage}
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if not isinstance(child, nn.Linear):
                    continue
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=torch.bfloat16, compress_statistics=True,
                                      quant_type="nf4", device="meta", **storage)
                keep = {} if quant_storage is None else {"module": q}
                q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4",
                                             compress_statistics=True, **storage, **keep).to(device)
                if child.bias is not None:
                    q.bias = nn.Parameter(child.bias.data, requires_grad=False)
                setattr(parent, name, q)
                del child
    model.is_loaded_in_4bit = True  # what a bitsandbytes load reports; peft picks its 4-bit LoRA layer
    if device == "cuda":
        torch.cuda.empty_cache()
    return model


def _setup_baseline(model, mode):
    from peft import LoraConfig, get_peft_model

    for p in model.parameters():
        p.requires_grad_(False)
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=RANK, lora_dropout=0.0, bias="none",
                                             target_modules=TARGETS, task_type="CAUSAL_LM"))
    base = model.get_base_model()
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    base.config.use_cache = False
    return model, {"checkpointing": "transformers (non-reentrant)", "attention": "sdpa"}


def _setup_fastft(model, mode):
    info = {}
    try:
        from fastft.loader import FastLanguageModel
        from fastft.models import patch_model
    except ImportError as exc:  # the loader is not there: assemble the same from the pieces
        info["loader"] = f"unavailable ({exc}); built from fastft.lora + fastft.offload"
        from peft import LoraConfig, get_peft_model

        from fastft.lora import apply_fused_lora
        from fastft.offload import enable_offloaded_checkpointing

        for p in model.parameters():
            p.requires_grad_(False)
        model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=RANK, lora_dropout=0.0, bias="none",
                                                 target_modules=TARGETS, task_type="CAUSAL_LM"))
        info["fused_lora"] = {k: v for k, v in apply_fused_lora(model).items() if k != "skipped"}
        enable_offloaded_checkpointing(model)
        return model, info
    family = patch_model(model)
    info["family"] = getattr(family, "name", str(family))
    model = FastLanguageModel.get_peft_model(model, r=RANK, lora_alpha=RANK, lora_dropout=0.0, bias="none",
                                             target_modules=TARGETS, use_gradient_checkpointing="unsloth")
    from fastft.lora import is_fused

    base = model.get_base_model()
    layer = base.model.layers[0]
    info["fused_lora"] = {"mlp": is_fused(layer.mlp), "qkv": is_fused(layer.self_attn.q_proj),
                          "o_proj": is_fused(layer.self_attn.o_proj)}
    info["checkpointing"] = type(getattr(layer, "_gradient_checkpointing_func", None)).__name__
    return model, info


def run_worker(spec: dict) -> dict:
    import torch

    sys.path.insert(0, ROOT)
    impl = spec["impl"].partition(":")[0]
    if impl == "fastft":
        import fastft  # noqa: F401  (before transformers / peft, as users are told to)
    device = spec.get("device", "cuda")
    cuda = device == "cuda"
    result = dict(spec)
    gib = 1024 ** 3

    def sync():
        if cuda:
            torch.cuda.synchronize()

    if cuda:
        result["gpu"] = torch.cuda.get_device_name()
        total = torch.cuda.get_device_properties(0).total_memory
        if spec.get("cap_gb"):
            torch.cuda.set_per_process_memory_fraction(min(1.0, spec["cap_gb"] * 1e9 / total))
    t0 = time.time()
    model = _build_model(spec["model"], spec["seq"], spec["seed"], device, spec.get("layers"))
    if spec["mode"] == "qlora":
        model = _quantize_decoder_linears(model, device)
    setup = _setup_baseline if impl == "baseline" else _setup_fastft
    model, info = setup(model, spec["mode"])
    model.train()
    result["setup"] = info
    params = [p for p in model.parameters() if p.requires_grad]
    result["trainable_params"] = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    vocab = SHAPES[spec["model"]]["vocab_size"]
    n_steps = spec["warmup"] + spec["steps"]
    gen = torch.Generator(device=device).manual_seed(spec["seed"] + 1)
    batches = [torch.randint(0, vocab, (spec["batch"], spec["seq"]), device=device, generator=gen)
               for _ in range(min(n_steps, 4))]
    sync()
    result["setup_s"] = round(time.time() - t0, 1)
    result["mem_after_setup_gib"] = torch.cuda.memory_allocated() / gib if cuda else 0.0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, losses, per_step = [], [], []
    run_peak = 0.0  # the peak statistics are reset per phase (see train_step), so kept here
    gc_clock = _GcClock()
    for i in range(n_steps):
        ids = batches[i % len(batches)]
        sync()
        host_before = _host_alloc_count() if cuda else 0
        gc_clock.reset()
        start = time.perf_counter()
        marks = []
        phase_peaks = []  # peak GPU memory (GiB) of the forward, the backward, the optimizer
        loss = train_step(model, opt, ids, marks, phase_peaks if cuda else None)
        sync()
        end = time.perf_counter()
        times.append(end - start)
        losses.append(float(loss.detach()))
        # where each step's time went, to tell a host-side slowdown (issue times grow, GC,
        # new pinned host blocks) from a GPU-side one (wall grows, issue times do not)
        per_step.append({"forward_issue_ms": round((marks[0] - start) * 1e3, 1),
                         "backward_issue_ms": round((marks[1] - marks[0]) * 1e3, 1),
                         "optimizer_issue_ms": round((marks[2] - marks[1]) * 1e3, 1),
                         "wall_ms": round((end - start) * 1e3, 1),
                         "gc_ms": round(gc_clock.total * 1e3, 1), "gc_runs": gc_clock.runs,
                         "new_pinned_blocks": (_host_alloc_count() - host_before) if cuda else 0,
                         "peak_gib_forward_backward_optimizer": [round(p, 3) for p in phase_peaks]})
        run_peak = max([run_peak, *phase_peaks])
    result["per_step"] = per_step
    if spec.get("memory_breakdown") and cuda:
        result["memory_breakdown"] = _memory_breakdown(model, opt, batches[0])
    if spec.get("profile") and cuda:
        result["issue_timing"] = _issue_timing(model, opt, batches[0])
        result["profile"] = _profile_step(model, opt, batches[0])
    timed = times[spec["warmup"]:] or times
    tokens = spec["batch"] * spec["seq"]
    result["step_s"] = [round(t, 4) for t in times]
    result["tokens_per_s"] = tokens / statistics.median(timed)
    result["peak_gib"] = max(run_peak, torch.cuda.max_memory_allocated() / gib) if cuda else 0.0
    result["beyond_setup_gib"] = result["peak_gib"] - result["mem_after_setup_gib"]
    func = getattr(model.get_base_model().model.layers[0], "_gradient_checkpointing_func", None)
    if hasattr(func, "offloader"):  # what the last pass sent to the host beyond the layer inputs
        result["stashed_gib_per_pass"] = func.offloader.stashed_bytes / gib
    result["losses"] = losses
    result["ok"] = True
    return result


class _GcClock:
    """Time spent in Python's garbage collector (gc.callbacks) since the last reset."""

    def __init__(self):
        import gc

        self.total, self.runs, self._start = 0.0, 0, None
        gc.callbacks.append(self._callback)

    def reset(self):
        self.total, self.runs = 0.0, 0

    def _callback(self, phase, info):
        if phase == "start":
            self._start = time.perf_counter()
        elif self._start is not None:
            self.total += time.perf_counter() - self._start
            self.runs += 1
            self._start = None


def _host_alloc_count() -> int:
    """Pinned host blocks torch's caching host allocator has created so far (-1: unknown)."""
    import torch

    try:
        return int(torch.cuda.host_memory_stats().get("num_host_alloc", -1))
    except Exception:
        return -1


def train_step(model, opt, ids, marks=None, phase_peaks=None):
    """One step (forward with the model's own loss, backward, AdamW step); returns the loss.
    marks, when given, gets the host clock after the forward, the backward and the optimizer;
    phase_peaks (CUDA) the peak GPU memory in GiB of each of the three (where a peak sits tells
    which part of the step to slim)."""
    import torch

    def phase_end():
        if marks is not None:
            marks.append(time.perf_counter())
        if phase_peaks is not None:  # allocator counters: no sync needed
            phase_peaks.append(torch.cuda.max_memory_allocated() / 1024 ** 3)
            torch.cuda.reset_peak_memory_stats()

    if phase_peaks is not None:
        torch.cuda.reset_peak_memory_stats()
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    phase_end()
    loss.backward()
    phase_end()
    opt.step()
    opt.zero_grad(set_to_none=True)
    phase_end()
    return loss


_OWN_CODE = ("/fastft/", "/transformers/", "/peft/")


def _site(frames) -> str:
    """The innermost frame of our, transformers' or peft's code in an allocation's stack (torch's
    own frames say little about which tensor it is); frames come innermost first."""
    for f in frames:
        name = f.get("filename", "")
        if any(part in name for part in _OWN_CODE):
            return f"{os.path.basename(name)}:{f.get('line', 0)} {f.get('name', '')}"
    return "(no fastft / transformers / peft frame)"


def live_at_peak(events, top: int = 30) -> dict:
    """From one device's allocator trace (torch.cuda.memory._snapshot()["device_traces"][i]):
    the blocks alive when the bytes allocated during the trace were highest, grouped by the
    site that allocated them. A block counts as freed when its free is requested, as
    torch.cuda.memory_allocated counts it; blocks allocated before the trace are not in it."""
    live, total, peak, at_peak = {}, 0, 0, {}
    for e in events:
        action = e.get("action")
        if action == "alloc":
            live[e["addr"]] = (e["size"], _site(e.get("frames") or []))
            total += e["size"]
            if total > peak:
                peak, at_peak = total, dict(live)
        elif action in ("free_requested", "free_completed"):
            block = live.pop(e["addr"], None)
            if block is not None:
                total -= block[0]
    groups = {}
    for size, site in at_peak.values():
        n, b = groups.get(site, (0, 0))
        groups[site] = (n + 1, b + size)
    ranked = sorted(groups.items(), key=lambda kv: -kv[1][1])
    return {"peak_bytes_during_trace": peak,
            "sites": [{"site": site, "blocks": n, "bytes": b} for site, (n, b) in ranked[:top]],
            "other_bytes": sum(b for _, (_, b) in ranked[top:])}


def _memory_breakdown(model, opt, ids):
    """One more training step with the allocator's history recorded (python stacks only, so the
    recording stays cheap); returns live_at_peak of it, plus what was allocated before the step
    (weights, optimizer state, caches), which the trace does not see."""
    import torch

    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(enabled="all", context="alloc", stacks="python",
                                             max_entries=1_000_000)
    try:
        train_step(model, opt, ids)
        torch.cuda.synchronize()
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    events = snapshot["device_traces"][torch.cuda.current_device()]
    result = live_at_peak(events)
    result["allocated_before_step_bytes"] = before
    result["events"] = len(events)
    return result


def _issue_timing(model, opt, ids):
    """How long the host takes to issue each phase of one step, against the step's wall time:
    when the issue times add up to about the wall time the step is bound by the host (Python
    and launch overhead), not by the GPU."""
    import torch

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    marks = []
    train_step(model, opt, ids, marks)
    t1, t2, t3 = marks
    torch.cuda.synchronize()
    t4 = time.perf_counter()
    ms = lambda a, b: round((b - a) * 1e3, 2)  # noqa: E731
    return {"forward_issue_ms": ms(t0, t1), "backward_issue_ms": ms(t1, t2),
            "optimizer_issue_ms": ms(t2, t3), "wall_ms": ms(t0, t4)}


def _busy_ms(intervals):
    """Length of the union of [start, end) intervals (us) in ms."""
    total, end = 0.0, None
    for a, b in sorted(intervals):
        if end is None or a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total / 1e3


def _profile_step(model, opt, ids, top=40):
    """One more step under torch.profiler: the GPU time of the step's kernels, grouped by kernel
    name (top `top`) and by a coarse kind, to show where a step's time goes."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        train_step(model, opt, ids)
        torch.cuda.synchronize()
    kernels, compute = {}, []
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        k = kernels.setdefault(ev.name, [0.0, 0])
        k[0] += ev.device_time / 1e3  # us -> ms
        k[1] += 1
        if "memcpy" not in ev.name.lower():
            compute.append((ev.time_range.start, ev.time_range.end))
    span = (max(e for _, e in compute) - min(s for s, _ in compute)) / 1e3 if compute else 0.0
    kinds = {}
    for name, (ms, _) in kernels.items():
        low = name.lower()
        kind = ("attention" if any(w in low for w in ("flash", "fmha", "attention", "cudnn", "sdpa")) else
                "gemm" if any(w in low for w in ("gemm", "sm90_xmma", "cutlass", "nvjet", "matmul")) else
                "copy" if any(w in low for w in ("memcpy", "copy")) else
                "fastft" if "fastft" in low else "other")
        kinds[kind] = kinds.get(kind, 0.0) + ms
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]
    by_count = sorted(kernels.items(), key=lambda kv: -kv[1][1])[:15]
    # host side: the ops that took the most CPU time themselves (profiler overhead included)
    host = sorted((e for e in prof.key_averages() if e.self_cpu_time_total > 0),
                  key=lambda e: -e.self_cpu_time_total)[:25]
    return {"gpu_ms_total": sum(v[0] for v in kernels.values()),
            "kernel_launches": sum(v[1] for v in kernels.values()),
            # first to last compute kernel, and how much of it some compute kernel was running
            "compute_span_ms": round(span, 2), "compute_busy_ms": round(_busy_ms(compute), 2),
            "most_launched": [{"name": n[:120], "count": v[1], "ms": round(v[0], 3)} for n, v in by_count],
            "host_self_ms": [{"name": e.key[:100], "count": e.count, "ms": round(e.self_cpu_time_total / 1e3, 2)}
                             for e in host],
            "by_kind_ms": {k: round(v, 3) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
            "top_kernels": [{"name": n[:160], "ms": round(v[0], 3), "count": v[1]} for n, v in ranked]}


# ------------------------------------------------------------------------------- driver side

def _run(spec: dict, timeout: float) -> dict:
    """One variant in a fresh interpreter; OOM / errors / timeouts become results too."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTORCH_CUDA_ALLOC_CONF=os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True"))
    # an impl "fastft:VAR=value+VAR2=value" is fastft run with those environment variables (A/B
    # of a switch in the same call)
    for assignment in filter(None, spec["impl"].partition(":")[2].split("+")):
        var, _, value = assignment.partition("=")
        env[var] = value
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return dict(spec, ok=False, error=f"timeout after {timeout:.0f} s")
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            res = json.loads(line[len("RESULT "):])
            res["wall_s"] = round(time.time() - t0, 1)
            return res
    tail = (proc.stderr or proc.stdout)[-3000:]
    oom = "OutOfMemoryError" in tail or "out of memory" in tail
    return dict(spec, ok=False, oom=oom, error=tail, wall_s=round(time.time() - t0, 1))


def _name(spec):
    impl = spec["impl"].replace(":", "_").replace("=", "-").replace("+", "_")
    layers = f"_{spec['layers']}layers" if spec.get("layers") else ""
    return f"{spec['model']}{layers}_{spec['mode']}_{spec['batch']}x{spec['seq']}_{impl}"


def _fmt(res):
    if not res.get("ok"):
        return f"{_name(res):<40} FAILED{' (OOM)' if res.get('oom') else ''}: {res.get('error', '')[-200:]!r}"
    return (f"{_name(res):<40} {res['tokens_per_s']:>10.0f} tok/s  peak {res['peak_gib']:6.2f} GiB  "
            f"setup {res['mem_after_setup_gib']:6.2f} GiB  beyond {res['beyond_setup_gib']:6.2f} GiB  "
            f"loss {res['losses'][0]:.4f}->{res['losses'][-1]:.4f}")


def _longest(args, impl, out_dir, summary):
    """Binary search (granularity args.longest_step tokens) for the longest fitting length."""
    def probe(length):
        spec = dict(model="8b", mode="qlora", impl=impl, batch=1, seq=length, warmup=0, steps=1,
                    seed=0, cap_gb=args.cap_gb, layers=args.longest_layers)
        res = _run(spec, args.longest_timeout)
        res["probe"] = "longest"
        summary["longest_probes"].append(res)
        print(_fmt(res), flush=True)
        _write(out_dir, f"longest_{impl}_{length}", res)
        return bool(res.get("ok"))

    lengths = args.longest_lengths
    if not lengths and impl == "fastft" and not args.fastft_search:
        lengths = [args.fastft_probe]  # one probe at the target: a search would take hours
    if lengths:
        fits = [n for n in lengths if probe(n)]
        return max(fits) if fits else None
    lo, hi = (args.baseline_range if impl == "baseline" else args.fastft_range)
    step = args.longest_step
    best = None
    if not probe(lo):
        return None
    best = lo
    while hi - lo > step:
        mid = (lo + hi) // 2 // step * step
        if mid <= lo:
            break
        if probe(mid):
            lo = best = mid
        else:
            hi = mid
    return best


def _write(out_dir, name, obj):
    with open(os.path.join(out_dir, name + ".json"), "w") as f:
        json.dump(obj, f, indent=1)


def _ratio(summary):
    """fastft / baseline ratios per (model, mode, batch)."""
    by = {}
    for r in summary["runs"]:
        if r.get("ok"):
            by[(r["model"], r["mode"], r["batch"], r["seq"], r["impl"])] = r
    rows = []
    for (m, mode, b, s, impl), r in sorted(by.items()):
        if impl != "fastft" or (m, mode, b, s, "baseline") not in by:
            continue
        base = by[(m, mode, b, s, "baseline")]
        rows.append({"model": m, "mode": mode, "batch": b, "seq": s,
                     "speedup": r["tokens_per_s"] / base["tokens_per_s"],
                     "beyond_setup_ratio": r["beyond_setup_gib"] / max(base["beyond_setup_gib"], 1e-9),
                     "first_loss_rel_diff": abs(r["losses"][0] - base["losses"][0]) / abs(base["losses"][0]),
                     # the loss curves (same seed and data): the largest relative gap over all steps
                     "max_loss_rel_diff": max(abs(a - b) / abs(b) for a, b in zip(r["losses"], base["losses"])),
                     "steps_compared": min(len(r["losses"]), len(base["losses"]))})
    return rows


def markdown(summary) -> str:
    """A table of the runs (and the longest-sequence result) for bench/RESULTS.md."""
    lines = ["| model | mode | batch | impl | tokens/s | peak GiB | after setup GiB | beyond setup GiB |"
             " speedup | memory ratio |", "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    ratios = {(r["model"], r["mode"], r["batch"], r["seq"]): r for r in summary.get("ratios", [])}
    for r in summary["runs"]:
        key = (r["model"], r["mode"], r["batch"], r["seq"])
        ratio = ratios.get(key) if r["impl"] == "fastft" else None
        if not r.get("ok"):
            lines.append(f"| {r['model']} | {r['mode']} | {r['batch']}x{r['seq']} | {r['impl']} | "
                         f"{'OOM' if r.get('oom') else 'failed'} | | | | | |")
            continue
        speedup = f"{ratio['speedup']:.2f}x" if ratio else ""
        memory = f"{ratio['beyond_setup_ratio']:.3f}x" if ratio else ""
        lines.append(
            f"| {r['model']} | {r['mode']} | {r['batch']}x{r['seq']} | {r['impl']} | {r['tokens_per_s']:.0f} | "
            f"{r['peak_gib']:.2f} | {r['mem_after_setup_gib']:.2f} | {r['beyond_setup_gib']:.2f} | "
            f"{speedup} | {memory} |")
    if summary.get("longest"):
        lines += ["", f"Longest 8B QLoRA sequence at batch 1 under the memory cap: "
                      + ", ".join(f"{k}: {v if v else 'none fitted'}" for k, v in summary["longest"].items())]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=False, help="directory for the JSON results")
    ap.add_argument("--models", default="1b,8b")
    ap.add_argument("--modes", default="lora,qlora")
    ap.add_argument("--batches", default="2x2048,4x4096,1x16384")
    ap.add_argument("--impls", default="baseline,fastft")
    ap.add_argument("--quick", action="store_true", help="fewer steps per variant (total ~8 min for both models)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--timeout", type=float, default=None, help="seconds per variant")
    ap.add_argument("--longest", action="store_true", help="also search the longest 8B QLoRA sequence")
    ap.add_argument("--longest-only", action="store_true")
    ap.add_argument("--longest-lengths", default="", help="comma-separated lengths to probe instead of searching")
    ap.add_argument("--cap-gb", type=float, default=80.0)
    ap.add_argument("--fastft-probe", type=int, default=344064,
                    help="fastft's longest-sequence check probes this length only (the target)")
    ap.add_argument("--fastft-search", action="store_true",
                    help="binary-search fastft over --fastft-range instead (each probe takes minutes)")
    ap.add_argument("--fastft-range", default="65536,524288")
    ap.add_argument("--baseline-range", default="8192,65536")
    ap.add_argument("--longest-step", type=int, default=4096)
    ap.add_argument("--longest-layers", type=int, default=None,
                    help="probe with this many of the 8B shape's 32 decoder layers (GPU memory "
                         "barely depends on it with offloaded checkpointing; time does, ~linearly)")
    ap.add_argument("--longest-timeout", type=float, default=590.0)
    ap.add_argument("--profile", action="store_true",
                    help="after the timed steps, profile one more step: GPU time per kernel and kind")
    ap.add_argument("--memory-breakdown", action="store_true",
                    help="after the timed steps, record one more step's allocations: what is alive "
                         "at its peak, by allocation site")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # cpu: smoke run with --models tiny
    args = ap.parse_args(argv)

    if args.worker:
        res = run_worker(json.loads(args.worker))
        print("RESULT " + json.dumps(res), flush=True)
        return 0
    if not args.out:
        ap.error("--out DIR is required")
    os.makedirs(args.out, exist_ok=True)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    steps = args.steps if args.steps is not None else (2 if args.quick else 5)
    timeout = args.timeout or (150 if args.quick else 400)
    args.longest_lengths = [int(x) for x in args.longest_lengths.split(",") if x]
    args.fastft_range = [int(x) for x in args.fastft_range.split(",")]
    args.baseline_range = [int(x) for x in args.baseline_range.split(",")]

    summary = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "warmup": warmup, "steps": steps,
               "runs": [], "longest_probes": [], "env": _env()}
    if not args.longest_only:
        for model in args.models.split(","):
            for mode in args.modes.split(","):
                for batch in args.batches.split(","):
                    b, s = (int(v) for v in batch.lower().split("x"))
                    for impl in args.impls.split(","):
                        spec = dict(model=model, mode=mode, impl=impl, batch=b, seq=s, warmup=warmup,
                                    steps=steps, seed=0, device=args.device, profile=args.profile,
                                    memory_breakdown=args.memory_breakdown)
                        res = _run(spec, timeout)
                        summary["runs"].append(res)
                        print(_fmt(res), flush=True)
                        _write(args.out, _name(spec), res)
                        _write(args.out, "summary", summary)
        summary["ratios"] = _ratio(summary)
        for r in summary["ratios"]:
            print(f"{r['model']} {r['mode']} {r['batch']}x{r['seq']}: speedup {r['speedup']:.2f}x, "
                  f"memory beyond setup {r['beyond_setup_ratio']:.3f}x of baseline, loss curves within "
                  f"{100 * r['max_loss_rel_diff']:.3f}% over {r['steps_compared']} steps", flush=True)
    if args.longest or args.longest_only:
        summary["longest"] = {impl: _longest(args, impl, args.out, summary)
                              for impl in args.impls.split(",")}
        print("longest 8B QLoRA sequence under", args.cap_gb, "GB:", summary["longest"], flush=True)
    summary["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    _write(args.out, "summary", summary)
    with open(os.path.join(args.out, "RESULTS.md"), "w") as f:
        f.write(markdown(summary))
    return 0


def _env():
    """Versions only: the driver must not create a CUDA context of its own (it would take GPU
    memory from the variants); each worker records the GPU's name."""
    from importlib import metadata

    info = {}
    for pkg in ("torch", "transformers", "peft", "trl", "bitsandbytes", "triton"):
        try:
            info[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            info[pkg] = None
    return info


if __name__ == "__main__":
    sys.exit(main())
