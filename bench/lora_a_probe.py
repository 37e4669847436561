"""Probe: the LoRA A product of a decoding step (x [M, K] @ Aᵀ, A [R, K] bf16, M <= 16), which
cuBLAS runs as a split-K GEMM plus its reduce kernel (~4.2 + 1.5 us, 4 per layer of an 8B QLoRA
model: run 91). Times, graph-timed over 32 copies of A (as 32 layers'): cuBLAS as fastft calls
it, with the reduced-precision split-K reduction off, through cuBLASLt, the transposed problem,
a matrix-vector product at M = 1, and a one-kernel Triton prototype (no split, one program per
16 rows of A). One JSON line per case in OUT/lora_a_probe.jsonl.

    python bench/lora_a_probe.py --out OUT
"""
import argparse
import json
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import time_ms  # noqa: E402


@triton.jit
def _xa_kernel(x_ptr, a_ptr, y_ptr, M, K, R, sx, sa, sy, BLOCK_M: tl.constexpr,
               BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ms = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        xt = tl.load(x_ptr + ms[:, None] * sx + ks[None, :], mask=ms[:, None] < M, other=0.0)
        at = tl.load(a_ptr + rows[None, :] * sa + ks[:, None], mask=rows[None, :] < R, other=0.0)
        acc += tl.dot(xt, at)
    tl.store(y_ptr + ms[:, None] * sy + rows[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(ms[:, None] < M) & (rows[None, :] < R))


def triton_xa(x, a, block_k, stages, block_r=16):
    M, K = x.shape
    R = a.shape[0]
    y = torch.empty(M, R, device=x.device, dtype=x.dtype)
    _xa_kernel[(triton.cdiv(R, block_r),)](x, a, y, M, K, R, x.stride(0), a.stride(0), y.stride(0),
                                           BLOCK_M=16, BLOCK_R=block_r, BLOCK_K=block_k,
                                           num_stages=stages, num_warps=4)
    return y


parser = argparse.ArgumentParser()
parser.add_argument("--out", default="/tmp")
args = parser.parse_args()
out = open(os.path.join(args.out, "lora_a_probe.jsonl"), "a")
bf16 = torch.bfloat16
for M in (1, 4, 16):
    for K, R in ((4096, 48), (4096, 16), (4096, 32), (14336, 16)):
        As = [torch.randn(R, K, device="cuda", dtype=bf16) * 0.02 for _ in range(32)]
        x = torch.randn(M, K, device="cuda", dtype=bf16)
        sets = [(x, a) for a in As]
        want = x.float() @ As[0].float().t()
        variants = {
            "cublas x@At": lambda x, a: x.mm(a.t()),
            "cublas A@xt": lambda x, a: a.mm(x.t()),
            "triton k256 s3": lambda x, a: triton_xa(x, a, 256, 3),
            "triton k512 s2": lambda x, a: triton_xa(x, a, 512, 2),
            "triton k128 s4": lambda x, a: triton_xa(x, a, 128, 4),
        }
        if M == 1:
            variants["cublas mv"] = lambda x, a: a.mv(x[0])
        rec = dict(M=M, K=K, R=R)
        for name, fn in variants.items():
            got = fn(x, As[0]).float().reshape(want.shape if name != "cublas A@xt" else want.t().shape)
            if name == "cublas A@xt":
                got = got.t()
            err = ((got - want).norm() / want.norm()).item()
            rec[name] = round(time_ms(fn, sets) * 1e3, 2)
            rec[name + " err"] = round(err, 5)
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
        rec["cublas x@At no reduced reduction"] = round(time_ms(variants["cublas x@At"], sets) * 1e3, 2)
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = True
        try:
            torch.backends.cuda.preferred_blas_library("cublaslt")
            rec["cublaslt x@At"] = round(time_ms(variants["cublas x@At"], sets) * 1e3, 2)
        finally:
            torch.backends.cuda.preferred_blas_library("cublas")
        print(json.dumps(rec), flush=True)
        out.write(json.dumps(rec) + "\n")
        out.flush()
