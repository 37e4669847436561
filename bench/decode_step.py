"""GPU time of one decoding forward of a QLoRA model at Llama-3.1-8B layer shapes: B sequences,
one new token each (B rows per projection), without a KV cache (attention over that one token),
through the decoder only (no LM head), so the time is the layers' own work: mostly the 7 NF4
projections per layer.

    python bench/decode_step.py --out DIR        (LAYERS=8 decoder layers, BATCHES=1,4,16;
                                                  GENERATE_ONLY=1, GEN_VARIANTS=a,b: generate only)

One process, one random-init model (bf16, decoder linears NF4 via bitsandbytes, double
quantisation), LoRA r=16 on all 7 projections through peft, fused by fastft.lora, three
variants in turn, under torch.no_grad:
  peft_bnb:  eval mode, FASTFT_NF4_FUSED_SMALL_M=0: generation keeps peft's path (peft's LoRA
             layers on bitsandbytes' Linear4bit, its 4-bit GEMV / dequantise + matmul);
  dense:     train mode, FASTFT_NF4_FUSED_SMALL_M=0: fastft's fused LoRA with each 4-bit weight
             dequantised into the workspace, then a bf16 matmul;
  fused:     eval mode, the default: fastft's fused LoRA with nf4's fused small-M kernel;
  fused_patched (PATCHED=1, last): also fastft.models.patch_model's fused norms and RoPE, as
             FastLanguageModel sets a model up; then one eager forward's CUDA kernels profiled.
Each forward is captured in a CUDA graph and its replays timed (bench.common.time_ms), so
Python and launch overhead (which generation with CUDA graphs also removes) do not count. The
fastft variants' logits are compared with peft_bnb's (relative error, reported).

Then plain `model.generate` as a user runs it (greedy, a 32-token prompt and NEW_TOKENS=64 new
tokens, timed on the host after one warm-up call): generated tokens per second, where the host's
Python and launch costs do count; for peft_bnb, fused (eager, dynamic cache), fused_static (eager,
static cache) and fused_graphs (fastft.decoding's CUDA graphs, what for_inference sets up), and
after patch_model patched_static / patched_graphs (see time_generate).
"""
import os
import sys
import time

import fastft  # noqa: F401  (before transformers and peft, as fastft asks)
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import out_dir_arg, time_ms, write_result  # noqa: E402
from train_step import RANK, TARGETS, _build_model, _quantize_decoder_linears  # noqa: E402


def build_qlora_model(layers: int):
    """The model described above (also bench/decode_host.py's): frozen NF4 decoder linears,
    peft LoRA on all 7 projections, fused by fastft.lora."""
    from peft import LoraConfig, get_peft_model

    from fastft.lora import apply_fused_lora

    model = _quantize_decoder_linears(_build_model("8b", 4096, seed=0, layers=layers))
    for p in model.parameters():
        p.requires_grad_(False)
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=RANK, lora_dropout=0.0, bias="none",
                                             target_modules=TARGETS, task_type="CAUSAL_LM",
                                             init_lora_weights=False))
    apply_fused_lora(model)
    return model


def switch_off(name: str, off: bool) -> None:
    """Sets the fastft switch `name` to "0" when `off`, else unsets it (its default, on)."""
    if off:
        os.environ[name] = "0"
    else:
        os.environ.pop(name, None)


def time_generate(model, variant, prompts, layers, new_tokens):
    """Plain greedy `model.generate`, one timed call per batch size after a warm-up call (which
    for the graph variants also captures). Variants: peft_bnb, fused (eager, dynamic cache),
    fused_static (eager, static cache), fused_graphs (fastft.decoding: CUDA graphs over the
    static cache, kept across calls), fused_graphs_newcache (the same with a new cache per call,
    as transformers makes it: each call captures again), fused_graphs_nodefer (the same with
    transformers' synchronous stop check), fused_graphs_nogroup (the same with one small-M
    launch per weight, FASTFT_NF4_GROUP=0), fused_graphs_noearly (the same with the NF4 kernels
    waiting for the previous kernel before loading the weight, FASTFT_NF4_EARLY_LOADS=0);
    patched_* the same after patch_model. Each graph
    variant's tokens are compared with its eager static-cache twin's (the same kernels)."""
    import fastft.decoding as decoding
    from fastft.decoding import _ATTR, disable_graph_decoding, enable_graph_decoding

    switch_off("FASTFT_NF4_FUSED_SMALL_M", variant == "peft_bnb")
    # q/k/v and gate/up one launch per weight, as before
    switch_off("FASTFT_NF4_GROUP", variant.endswith("_nogroup"))
    # the NF4 kernels wait before loading the weight, as before
    switch_off("FASTFT_NF4_EARLY_LOADS", variant.endswith("_noearly"))
    graphs = variant.endswith(("_graphs", "_graphs_newcache", "_graphs_nodefer", "_graphs_nogroup",
                               "_graphs_noearly"))
    if graphs:
        assert enable_graph_decoding(model)
        if variant.endswith("_newcache"):  # as before fastft kept the cache: a new one per call
            lm = model.get_base_model()
            lm._prepare_static_cache = lm.__dict__[_ATTR].prepare_static_cache
    nodefer = variant.endswith("_nodefer")  # as before the deferred stop check: a sync per step
    allow = decoding._allow_deferred_stop_checks
    if nodefer:
        decoding._allow_deferred_stop_checks = lambda: (lambda: None)  # (an undo that does nothing)
    records = []
    for b, prompt in prompts.items():
        kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  pad_token_id=0, use_cache=True)  # (the bench config turns the cache off)
        if variant.endswith("_static"):  # (without transformers' torch.compile, as for_inference)
            kw.update(cache_implementation="static", disable_compile=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        first = model.generate(input_ids=prompt, **kw)  # warm-up (and capture)
        torch.cuda.synchronize()
        first_sec = time.perf_counter() - t0
        t0 = time.perf_counter()
        tokens = model.generate(input_ids=prompt, **kw)
        torch.cuda.synchronize()
        sec = time.perf_counter() - t0
        rec = dict(variant=variant, batch=b, layers=layers, new_tokens=new_tokens,
                   seconds=round(sec, 4), tokens_per_s=round(b * new_tokens / sec, 1),
                   first_call_seconds=round(first_sec, 4))
        if variant.endswith("_static"):
            _STATIC_TOKENS[(variant.split("_")[0], b)] = tokens
        if graphs:
            twin = _STATIC_TOKENS.get((variant.split("_")[0], b))
            rec["tokens_equal_eager_static"] = None if twin is None else bool(torch.equal(twin, tokens))
            rec["first_call_equal"] = bool(torch.equal(first, tokens))
        print(rec, flush=True)
        records.append(rec)
    if graphs:
        disable_graph_decoding(model)
    if nodefer:
        decoding._allow_deferred_stop_checks = allow
    return records


_STATIC_TOKENS = {}


def main():
    out = out_dir_arg(__doc__)
    layers = int(os.environ.get("LAYERS", "8"))
    batches = [int(b) for b in os.environ.get("BATCHES", "1,4,16").split(",")]
    model = build_qlora_model(layers)
    g = torch.Generator(device="cuda").manual_seed(1)
    inputs = {b: [torch.randint(0, 128256, (b, 1), device="cuda", generator=g) for _ in range(2)]
              for b in batches}

    decoder = model.get_base_model().model

    def forward(ids):  # timed: the decoder layers (the LM head reads the same bytes in all)
        return decoder(input_ids=ids, use_cache=False).last_hidden_state

    results, ref = [], {}
    generate_only = os.environ.get("GENERATE_ONLY", "0") == "1"  # e.g. for LAYERS=32
    with torch.no_grad():
        for variant in () if generate_only else ("peft_bnb", "dense", "fused", "fused_nogroup"):
            model.train(variant == "dense")
            switch_off("FASTFT_NF4_FUSED_SMALL_M", not variant.startswith("fused"))
            switch_off("FASTFT_NF4_GROUP", variant == "fused_nogroup")  # one launch per weight
            for b in batches:
                logits = model(input_ids=inputs[b][0], use_cache=False).logits.float()
                if variant == "peft_bnb":
                    ref[b] = logits
                err = ((logits - ref[b]).norm() / ref[b].norm()).item()
                ms = time_ms(forward, [(ids,) for ids in inputs[b]])
                rec = dict(variant=variant, batch=b, layers=layers, ms=round(ms, 4),
                           us_per_layer=round(1e3 * ms / layers, 2), rel_err_vs_peft_bnb=err)
                print(rec, flush=True)
                results.append(rec)
    new_tokens = int(os.environ.get("NEW_TOKENS", "64"))
    generation = []
    prompts = {b: torch.randint(0, 128256, (b, 32), device="cuda", generator=g) for b in batches}
    with torch.no_grad():
        model.eval()
        for variant in os.environ.get("GEN_VARIANTS", "peft_bnb,fused,fused_static,fused_graphs").split(","):
            generation += time_generate(model, variant, prompts, layers, new_tokens)
    if os.environ.get("PATCHED", "1") != "0" and not generate_only:  # last: patch_model changes classes for good
        from fastft.models import patch_model

        patch_model(model.get_base_model())
        with torch.no_grad():
            for b in batches:
                ms = time_ms(forward, [(ids,) for ids in inputs[b]])
                rec = dict(variant="fused_patched", batch=b, layers=layers, ms=round(ms, 4),
                           us_per_layer=round(1e3 * ms / layers, 2))
                print(rec, flush=True)
                results.append(rec)
            from torch.profiler import ProfilerActivity, profile

            forward(inputs[batches[0]][0])
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                forward(inputs[batches[0]][0])
                torch.cuda.synchronize()
            table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=15)
            print(f"one eager forward, B={batches[0]}, fused and patched:\n{table}", flush=True)
            for variant in ("patched_static", "patched_graphs"):
                generation += time_generate(model, variant, prompts, layers, new_tokens)
    for b in batches:
        t = {r["variant"]: r["tokens_per_s"] for r in generation if r["batch"] == b}
        print(f"generate B={b}, tokens/s: " + ", ".join(f"{k} {v:.0f}" for k, v in t.items()))
    for b in batches if results else ():
        t = {r["variant"]: r["ms"] for r in results if r["batch"] == b}
        print(f"B={b}: peft_bnb {t['peft_bnb']:.3f} ms, fastft dense {t['dense']:.3f} ms, "
              f"fastft fused {t['fused']:.3f} ms (x{t['peft_bnb'] / t['fused']:.2f} vs peft_bnb, "
              f"x{t['dense'] / t['fused']:.2f} vs dense)")
    write_result(out, "decode_step", results=results, generation=generation)


if __name__ == "__main__":
    main()
