"""Where the time of `generate` with CUDA graphs goes (fastft.decoding), on the QLoRA model of
bench/decode_step.py (LAYERS=32 decoder layers of the Llama-3.1-8B shape by default, patched as
FastLanguageModel sets a model up):

    python bench/decode_profile.py --out DIR     (LAYERS=32, BATCHES=1,16, PROMPTS=32,
                                                  ATTENTION=grouped[,repeat_kv],
                                                  REFRESH_IN_GRAPH=1: the LoRA factors' cast
                                                  refresh captured into the graphs, as before)

Per batch size and prompt length, greedy:
- seconds of a first call (prompt, warm-ups and capture) and of later calls of NEW_SHORT and
  NEW_LONG new tokens; (long - short) / (NEW_LONG - NEW_SHORT) is one decoding step's wall time
  with the prompt, the capture and generate's set-up taken out;
- the GPU time of one replay of the step's graph (CUDA events around each replay, median): the
  part of a step that is the model's kernels;
- cProfile of one call: where the rest (the host's share of a step) is spent;
- the CUDA kernels of one eager decoding step (torch.profiler), summed and by name.
"""
import cProfile
import io
import os
import pstats
import statistics
import sys
import time

import fastft  # noqa: F401  (before transformers and peft, as fastft asks)
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import out_dir_arg, write_result  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def replay_ms(decoder, device, iters=30):
    """Median time of one replay of the decoder's one graph: GPU time (CUDA events) on a GPU,
    host time otherwise (emulated graphs)."""
    (graph,) = decoder.graphs.values()
    cache = decoder.kept_cache[1]  # the graph's cache, alive while kept
    times = []
    for i in range(3 + iters):
        # each replay advances the cache's write position (a device counter): back to 0 first,
        # outside the timed part, or the replays would write past the cache's end
        cache.reset()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            graph.replay()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times[3:])


def profile_generate(model, prompt, new_short, new_long, top=25):
    """The record described in the module's doc for one batch size (`model` has graph
    decoding enabled)."""
    from fastft.decoding import _ATTR, _causal_lm, graph_count

    device = prompt.device
    decoder = _causal_lm(model).__dict__[_ATTR]

    def call(new):
        _sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                           max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
                           use_cache=True)  # (the bench config turns the cache off)
        _sync(device)
        return time.perf_counter() - t0

    first_seconds = call(new_long)  # sizes the kept cache for the longest call
    graphs_after_first = graph_count(model)
    assert graphs_after_first == 1, f"{graphs_after_first} graphs after the first call (failed: {decoder.failed})"
    short = [call(new_short) for _ in range(2)]
    long_ = [call(new_long) for _ in range(2)]
    step_ms = 1e3 * (min(long_) - min(short)) / (new_long - new_short)
    gpu_ms = replay_ms(decoder, device)
    profiler = cProfile.Profile()
    profiler.enable()
    call(new_long)
    profiler.disable()
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    b = prompt.shape[0]
    return dict(batch=b, first_call_seconds=round(first_seconds, 4), graphs_after_first=graphs_after_first,
                graphs_after_all=graph_count(model), short_seconds=[round(s, 4) for s in short],
                long_seconds=[round(s, 4) for s in long_], new_short=new_short, new_long=new_long,
                step_ms=round(step_ms, 3), replay_ms=round(gpu_ms, 3),
                host_share_ms=round(step_ms - gpu_ms, 3),
                tokens_per_s_long=round(b * new_long / min(long_), 1)), text.getvalue()


def kernel_table(lm, prompt, rows=30):
    """CUDA kernels of one eager decoding step (static cache, the prompt as prefill, not
    profiled), from torch.profiler: the same kernels a graph replays, timed one by one."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import StaticCache

    cache = StaticCache(config=lm.config, max_cache_len=prompt.shape[1] + 8)
    with torch.no_grad():
        logits = lm(input_ids=prompt, past_key_values=cache, use_cache=True).logits
        step = logits[:, -1:].argmax(-1)
        lm(input_ids=step, past_key_values=cache, use_cache=True)  # (warm: lazy set-ups)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            lm(input_ids=step, past_key_values=cache, use_cache=True)
            torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total_us = sum(e.device_time_total for e in events)
    return total_us, prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows)


def main():
    out = out_dir_arg(__doc__)
    from decode_step import build_qlora_model

    from fastft.decoding import enable_graph_decoding
    from fastft.models import patch_model

    import fastft.attention as attention
    from fastft.decoding import disable_graph_decoding

    layers = int(os.environ.get("LAYERS", "32"))
    batches = [int(b) for b in os.environ.get("BATCHES", "1,16").split(",")]
    prompts = [int(n) for n in os.environ.get("PROMPTS", "32").split(",")]
    # ATTENTION=grouped,repeat_kv: also as before fastft.attention._grouped_decode (transformers'
    # SDPA function copying K and V out to every query head at each decoding step)
    variants = os.environ.get("ATTENTION", "grouped").split(",")
    new_short, new_long = int(os.environ.get("NEW_SHORT", "32")), int(os.environ.get("NEW_LONG", "160"))
    if os.environ.get("REFRESH_IN_GRAPH") == "1":  # as before: the LoRA casts' refresh captured
        import contextlib

        import fastft.ops.lora as lora_ops

        lora_ops.frozen_factor_copies = contextlib.nullcontext
    model = build_qlora_model(layers)
    patch_model(model.get_base_model())
    model.eval()
    attention.install_sdpa_wrapper()  # (as for_inference)
    grouped = attention._grouped_decode
    g = torch.Generator(device="cuda").manual_seed(1)
    records = []
    for variant, length, b in [(v, n, b) for v in variants for n in prompts for b in batches]:
        disable_graph_decoding(model)  # (new graphs for each variant: they bake the attention in)
        # (transformers sizes a static cache to the longest call so far: each case its own length)
        model.get_base_model().__dict__.pop("_previous_max_cache_length", None)
        attention._grouped_decode = grouped if variant == "grouped" else (lambda *args: None)
        assert enable_graph_decoding(model)
        prompt = torch.randint(0, 128256, (b, length), device="cuda", generator=g)
        torch.cuda.reset_peak_memory_stats()
        rec, text = profile_generate(model, prompt, new_short, new_long)
        rec.update(attention=variant, prompt=length, layers=layers,
                   peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2))
        try:
            kernels_us, table = kernel_table(model.get_base_model(), prompt)
            rec["eager_step_kernels_ms"] = round(kernels_us / 1e3, 3)
            print(f"one eager decoding step, B={b}: {kernels_us / 1e3:.3f} ms of kernels\n{table}", flush=True)
        except Exception as exc:  # (the timings above stand without it)
            print(f"kernel table failed: {type(exc).__name__}: {exc}", flush=True)
        print(rec, flush=True)
        print(text, flush=True)
        records.append(rec)
    attention._grouped_decode = grouped
    write_result(out, "decode_profile", results=records)


if __name__ == "__main__":
    main()
