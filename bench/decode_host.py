"""Host (CPU) time of one eager decoding forward of a QLoRA model: what a user's eager
`model.generate` pays per new token besides the GPU's work. At one token per sequence the GPU
finishes each kernel long before Python launches the next, so this time, not the kernels',
sets the tokens per second of eager generation.

    python bench/decode_host.py --out DIR        (LAYERS=8, B=1, ITERS=50)

The model is bench/decode_step.py's (Llama-3.1-8B layer shapes, NF4 double-quantised decoder
linears, LoRA r=16 on all 7 projections through peft, fused by fastft.lora), under no_grad in
eval mode, one token per sequence, no KV cache. Variants: peft_bnb (FASTFT_NF4_FUSED_SMALL_M=0:
peft's LoRA layers on bitsandbytes' Linear4bit) and fused (the default). Per variant: the median
wall time of the forward call alone (host, the GPU queue not drained) and of the call plus a
synchronize. Then cProfile of the fused forward: the functions with the most own time.
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
from decode_step import build_qlora_model  # noqa: E402


def main():
    out = out_dir_arg(__doc__)
    layers = int(os.environ.get("LAYERS", "8"))
    batch = int(os.environ.get("B", "1"))
    iters = int(os.environ.get("ITERS", "50"))
    model = build_qlora_model(layers)
    model.eval()
    decoder = model.get_base_model().model
    ids = torch.randint(0, 128256, (batch, 1), device="cuda")

    def forward():
        return decoder(input_ids=ids, use_cache=False).last_hidden_state

    results = {}
    with torch.no_grad():
        for variant in ("peft_bnb", "fused", "peft_bnb", "fused"):  # twice: the order's effect
            if variant == "fused":
                os.environ.pop("FASTFT_NF4_FUSED_SMALL_M", None)
            else:
                os.environ["FASTFT_NF4_FUSED_SMALL_M"] = "0"
            for _ in range(5):
                forward()
            torch.cuda.synchronize()
            call, total = [], []
            for _ in range(iters):
                t0 = time.perf_counter()
                forward()
                t1 = time.perf_counter()
                torch.cuda.synchronize()
                t2 = time.perf_counter()
                call.append(1e3 * (t1 - t0))
                total.append(1e3 * (t2 - t0))
            rec = dict(host_ms=round(statistics.median(call), 3),
                       with_sync_ms=round(statistics.median(total), 3))
            results.setdefault(variant, []).append(rec)
            print(variant, rec, flush=True)
        os.environ.pop("FASTFT_NF4_FUSED_SMALL_M", None)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(20):
            forward()
        prof.disable()
        torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(30)
    print("cProfile, 20 fused forwards, by own time:\n" + text.getvalue(), flush=True)
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(45)
    print("cProfile, 20 fused forwards, by cumulative time:\n" + text.getvalue(), flush=True)
    write_result(out, "decode_host", layers=layers, batch=batch, iters=iters, results=results)


if __name__ == "__main__":
    main()
