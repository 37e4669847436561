"""TFLOP/s of each base-weight GEMM of one Llama-3.1-8B decoder layer at 4x4096 tokens, as the
fused LoRA path issues them (x @ W.T forward, dy @ W for dx; MLP in token tiles), next to a
square 8192^3 product measured in the same run.

Why: run 18's profiled 4x4096 QLoRA step spent 1004 ms in GEMMs for ~6.6e14 FLOP (~660
TFLOP/s) where large square products reach 690-790. If one of these shapes or layouts runs
well below the square one, choosing another layout is cheaper than any kernel work.

    python bench/gemm_shapes.py [--out DIR]   (table on stdout, DIR/gemm_shapes.json)
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import gpu_name, out_dir_arg, time_ms, write_result  # noqa: E402

HIDDEN, INTER, QKV = 4096, 14336, 4096 + 2 * 1024
TOKENS = 16384
TILE = (1 << 26) // INTER  # fastft's default MLP tile (FASTFT_MLP_TILE_ELEMENTS = 2^26)


def cases():
    # (name, tokens, in, out): forward x[t, in] @ W[out, in].T; backward dy[t, out] @ W
    return [("qkv", TOKENS, HIDDEN, QKV), ("o_proj", TOKENS, HIDDEN, HIDDEN),
            ("gate+up (tile)", TILE, HIDDEN, 2 * INTER), ("down (tile)", TILE, INTER, HIDDEN)]


def measure(fn, sets, flops):
    ms = time_ms(fn, sets, warmup=3, iters=20)
    return ms, flops / ms / 1e9


def main():
    out_dir = out_dir_arg(__doc__)
    dt, dev = torch.bfloat16, "cuda"
    rows = []
    a = [torch.randn(8192, 8192, device=dev, dtype=dt) for _ in range(2)]
    ms, tf = measure(lambda p, q: torch.mm(p, q), [(a[0], a[1]), (a[1], a[0])], 2 * 8192 ** 3)
    rows.append(dict(gemm="square 8192^3", layout="NN", ms=ms, tflops=tf))
    del a
    for name, t, k, n in cases():
        x = torch.randn(t, k, device=dev, dtype=dt)
        w = torch.randn(n, k, device=dev, dtype=dt) * 0.02
        dy = torch.randn(t, n, device=dev, dtype=dt)
        c = torch.randn(t, n, device=dev, dtype=dt)
        flops = 2 * t * k * n
        variants = [
            ("fwd x @ W.T", lambda x, w, dy, c: torch.mm(x, w.t())),
            # in place, as fused LoRA adds the base GEMM onto its rank-r term (out.addmm_):
            # torch.addmm(c, ...) out of place would first copy c into a new output
            ("fwd c.addmm_(x, W.T)", lambda x, w, dy, c: c.addmm_(x, w.t())),
            ("bwd dy @ W", lambda x, w, dy, c: torch.mm(dy, w)),
        ]
        for label, fn in variants:
            ms, tf = measure(fn, [(x, w, dy, c)], flops)
            rows.append(dict(gemm=f"{name} [{t}x{k}]x[{k}x{n}]", layout=label, ms=ms, tflops=tf))
        del x, w, dy, c
    print(f"GPU {gpu_name()}")
    print("| GEMM | as issued | ms | TFLOP/s | of square |")
    print("|---|---|---|---|---|")
    ref = rows[0]["tflops"]
    for r in rows:
        r["of_square"] = r["tflops"] / ref
        print(f"| {r['gemm']} | {r['layout']} | {r['ms']:.3f} | {r['tflops']:.0f} | "
              f"{r['of_square']:.2f} |")
    write_result(out_dir, "gemm_shapes", rows=rows)


if __name__ == "__main__":
    main()
