"""Host time per call of the torch operations a fastft training step issues most (GEMMs, casts,
allocations, pinned copies, stream waits), on the GPU machine.

Why: the 8B steps at 2x2048 are bound by the host (its issue time is about the GPU time), and
the host time per operation on the lent machine looked 3-4x the usual; this measures it directly,
with the GPU kept ahead of the host (small shapes), so the numbers are issue cost, not waiting.

    python bench/host_calls.py [--out DIR]   (prints a table; JSON to DIR/host_calls.json)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time


def per_call_us(fn, calls=200, repeats=5):
    import torch

    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    best = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        best.append((t1 - t0) / calls * 1e6)
    return statistics.median(best)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import torch

    dev = "cuda"
    bf = torch.bfloat16
    x = torch.randn(512, 4096, device=dev, dtype=bf)
    a = torch.randn(16, 4096, device=dev, dtype=bf)
    w = torch.randn(1024, 4096, device=dev, dtype=bf)
    xa = torch.randn(512, 16, device=dev, dtype=bf)
    b = torch.randn(1024, 16, device=dev, dtype=bf)
    out = torch.empty(512, 1024, device=dev, dtype=bf)
    f32 = torch.randn(16, 4096, device=dev)
    small = torch.randn(512, 1024, device=dev, dtype=bf)
    side = torch.cuda.Stream()
    pinned = torch.empty(512, 1024, dtype=bf, pin_memory=True)
    rows = {}

    def rec(name, fn):
        rows[name] = round(per_call_us(fn), 2)
        print(f"{name:58s} {rows[name]:8.2f} us", flush=True)

    rec("torch.empty cuda 1 MiB", lambda: torch.empty(512, 1024, device=dev, dtype=bf))
    rec("add_ (elementwise kernel)", lambda: small.add_(1.0))
    rec("fp32 -> bf16 cast 16x4096", lambda: f32.to(bf))
    rec("torch.cat of 3 16x4096", lambda: torch.cat([a, a, a], 0))
    for lib in ("cublas", "cublaslt"):
        try:
            torch.backends.cuda.preferred_blas_library(lib)
        except Exception as e:  # noqa: BLE001
            print(f"preferred_blas_library({lib}) failed: {e}")
            continue
        rec(f"[{lib}] mm 512x4096 @ 4096x16 (x.Aᵀ)", lambda: x.mm(a.t()))
        rec(f"[{lib}] mm 512x4096 @ 4096x1024 (base)", lambda: x.mm(w.t()))
        rec(f"[{lib}] addmm_ beta=0 alpha=2 (x.Aᵀ).Bᵀ", lambda: out.addmm_(xa, b.t(), beta=0.0, alpha=2.0))
        rec(f"[{lib}] addmm_ beta=1 base onto out", lambda: out.addmm_(x, w.t()))
        rec(f"[{lib}] mm dBᵀ 1024x512 @ 512x16 (split-K shape)", lambda: small.t().mm(xa))
        try:
            rec(f"[{lib}] mm out_dtype=float32 dB", lambda: torch.mm(small.t(), xa, out_dtype=torch.float32))
        except Exception as e:  # noqa: BLE001
            print(f"mm out_dtype: {type(e).__name__}: {e}"[:200])
    torch.backends.cuda.preferred_blas_library("default")
    rec("pinned torch.empty 1 MiB (cached)", lambda: torch.empty(512, 1024, dtype=bf, pin_memory=True))

    def d2h():
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            pinned.copy_(small, non_blocking=True)
            small.record_stream(side)
    rec("D2H 1 MiB on a side stream (wait + copy + record_stream)", d2h)
    rec("event record + wait_event", lambda: torch.cuda.current_stream().wait_event(side.record_event()))

    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "host_us_per_call": rows,
              "cpu_count": os.cpu_count()}
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "host_calls.json"), "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
