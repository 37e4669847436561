"""x·Aᵀ for the small-M kernels' LoRA term (M <= 16 rows): cuBLAS (a matmul: split-K GEMM plus
its reduce kernel) against fastft's one-kernel nf4_low_rank_input, alone and followed by the
fused small-M NF4 call that adds the term (as a decoding step runs them), with and without the
weight marked frozen (fastft.ops.nf4.frozen_weights: the NF4 kernel's weight loads before its
PDL wait, as inside generate). Graph-timed over enough copies of the weights to cycle through
more than the L2; one JSON line per case in OUT/nf4_low_rank.jsonl.

    python bench/nf4_low_rank.py --out OUT
"""
import argparse
import contextlib
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_nf4 import random_weight  # noqa: E402
from common import time_ms  # noqa: E402
from fastft.ops import nf4  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--out", default="/tmp")
args = parser.parse_args()
out = open(os.path.join(args.out, "nf4_low_rank.jsonl"), "a")
bf16 = torch.bfloat16
backend = nf4._CudaBackend


def emit(rec):
    print(json.dumps(rec), flush=True)
    out.write(json.dumps(rec) + "\n")
    out.flush()


def kernel_xa(x, a):
    xa = backend.low_rank_input(x, a)
    assert xa is not None
    return xa


# the product alone (run 100's shapes: q/k/v stacked r = 3 x 16, gate/up 2 x 16, down 16)
for M in (1, 4, 16):
    for K, R in ((4096, 48), (4096, 32), (4096, 16), (14336, 16)):
        As = [torch.randn(R, K, device="cuda", dtype=bf16) * 0.02 for _ in range(32)]
        x = torch.randn(M, K, device="cuda", dtype=bf16)
        want = x.double() @ As[0].double().t()
        rec = dict(case="x·Aᵀ", M=M, K=K, R=R)
        for name, fn in (("cublas", lambda x, a: x.mm(a.t())), ("fastft", kernel_xa)):
            got = fn(x, As[0]).double()
            rec[name + "_err"] = float((got - want).norm() / want.norm())
            rec[name + "_us"] = round(time_ms(fn, [(x, a) for a in As]) * 1e3, 2)
        rec["ratio"] = round(rec["fastft_us"] / rec["cublas_us"], 3)
        emit(rec)

# the product and the NF4 call that adds the term, as one decoding step's projection group
GROUPS = {"q/k/v": (4096, (4096, 1024, 1024)), "gate/up": (4096, (14336, 14336)),
          "o": (4096, (4096,)), "down": (14336, (4096,))}
rank = 16
for name, (K, outs) in GROUPS.items():
    bytes_each = sum(n * K // 2 for n in outs)
    copies = max(3, -(-2 * 50 * 2 ** 20 // bytes_each))
    layers = []
    for c in range(copies):
        states = [nf4.resolve(*random_weight(n, K, 100 * c + i)) for i, n in enumerate(outs)]
        A = torch.randn(rank * len(outs), K, device="cuda", dtype=bf16) * 0.02
        Bs = [torch.randn(n, rank, device="cuda", dtype=bf16) * 0.1 for n in outs]
        layers.append((states, A, Bs))
    for M in (1, 4, 16):
        x = torch.randn(M, K, device="cuda", dtype=bf16)
        ys = [torch.empty(M, n, device="cuda", dtype=bf16) for n in outs]

        def step(x, states, A, Bs, product):
            xa = product(x, A)
            calls = [(st, None, y, (xa[:, i * rank:(i + 1) * rank], B, 2.0))
                     for i, (st, y, B) in enumerate(zip(states, ys, Bs))]
            if len(calls) == 1:
                backend.gemv(x, *calls[0])
            else:
                backend.gemv_group(x, calls)
            return ys[0]

        rec = dict(case=f"{name} + x·Aᵀ", M=M, K=K, outs=list(outs), rank=rank)
        results = {}
        for label, product in (("cublas", lambda x, a: x.mm(a.t())), ("fastft", kernel_xa)):
            for frozen in (False, True):
                key = label + ("_frozen" if frozen else "")
                with nf4.frozen_weights() if frozen else contextlib.nullcontext():
                    results[key] = step(x, *layers[0], product).clone()
                    rec[key + "_us"] = round(time_ms(
                        lambda x, st, A, Bs: step(x, st, A, Bs, product),
                        [(x, *layer) for layer in layers]) * 1e3, 2)
        ref = results["cublas"].double()
        rec["max_rel_diff"] = max(float((r.double() - ref).norm() / ref.norm()) for r in results.values())
        rec["ratio_fastft_frozen_vs_cublas"] = round(rec["fastft_frozen_us"] / rec["cublas_us"], 3)
        emit(rec)
