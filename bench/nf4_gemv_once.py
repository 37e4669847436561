"""A few fused small-M nf4_matmul calls of one variant and shape, for Nsight Compute
(bench/nf4_ncu.sh): ncu profiles one of them with its own replays, so what it reports (time,
DRAM throughput, warp stall reasons) is the kernel alone, outside any timing harness.

    FASTFT_NF4_GEMV=v3 python bench/nf4_gemv_once.py M OUT_FEATURES IN_FEATURES

DTYPE=fp16 calls it with fp16 x (default bf16).
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_nf4 import random_weight  # noqa: E402
from fastft.ops.nf4 import nf4_matmul  # noqa: E402

rows, out_f, in_f = (int(v) for v in sys.argv[1:4])
weights = [random_weight(out_f, in_f, seed) for seed in range(3)]
dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[os.environ.get("DTYPE", "bf16")]
x = torch.randn(rows, in_f, device="cuda", dtype=dtype)
for i in range(6):
    packed, state = weights[i % 3]
    nf4_matmul(x, packed, state, backend="cuda")
torch.cuda.synchronize()
