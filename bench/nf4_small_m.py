"""Small-M nf4_matmul per kernel (FASTFT_NF4_GEMV), graph-timed as bench_nf4 times them, and
the decode-like up/down chain; one JSON line per case, appended to OUT. For A/B comparisons of
two builds in one device call: run it once per build, TAG naming the build.

    KERNELS=auto,v3,v3h,v1 ROWS=1,4,8,9,16 python bench/nf4_small_m.py TAG OUT.jsonl

A kernel may carry v3's work split: "v3h:p4" forces 4 K parts per CTA (FASTFT_NF4_V3_KPARTS),
"v3h:p8:s2" also 2 K splits across CTAs (FASTFT_NF4_V3_SPLITS); "auto:f" the default kernel with
the weight frozen (fastft.ops.nf4.frozen_weights: its loads before the PDL wait, as generate).
CHAIN_ROWS=1,4,16 the chain's rows (default 1,16). DTYPE=fp16 times fp16 x (default bf16);
SCALES=plain gives the weights float32 absmax (not nested). LORA=r adds a rank-r low-rank term
(a LoRA adapter's scale * xa @ bᵀ, added by the kernel where it can), called through the CUDA
backend's gemv as the fused LoRA layers call it.
"""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_nf4 import plain_absmax, random_weight  # noqa: E402
from common import (NF4_V4_RIGHT_PROBES, copy_bandwidth_gbps, nf4_kernels_launched,  # noqa: E402
                    time_ms, use_nf4_kernel)
from fastft.ops.nf4 import nf4_matmul, nf4_dequantize, resolve, _CudaBackend  # noqa: E402

tag, out = sys.argv[1], sys.argv[2]
kernels = os.environ.get("KERNELS", "auto").split(",")
rows_list = [int(r) for r in os.environ.get("ROWS", "1,4,8,9,16").split(",")]
rank = int(os.environ.get("LORA", "0"))
dtype_name = os.environ.get("DTYPE", "bf16")
dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
# SHAPES: "in->out" pairs, e.g. 4096->1024 (Llama-3-8B's k / v projections), 4096->4096 (q / o)
shapes = {}
for text in os.environ.get("SHAPES", "4096->14336,14336->4096").split(","):
    in_f, out_f = (int(v) for v in text.split("->"))
    shapes[text] = (out_f, in_f)
# enough copies of each weight that the calls cycle through more than twice the 50 MB L2 (a
# decoding model's weights come from DRAM)
copies = {s: max(3, -(-2 * 50 * 2 ** 20 // (o * i // 2))) for s, (o, i) in shapes.items()}
# SCALES=plain: each weight's nested absmax decoded into plain float32 absmax (4 bytes per block
# instead of 1: what the kernels' prologue then only copies)
plain_scales = os.environ.get("SCALES", "nested") == "plain"


def weight(out_f, in_f, seed):
    packed, state = random_weight(out_f, in_f, seed)
    return plain_absmax(packed, state) if plain_scales else (packed, state)


weights = {s: [weight(o, i, seed) for seed in range(copies[s])] for s, (o, i) in shapes.items()}
copy = copy_bandwidth_gbps()
f = open(out, "a")


def emit(**rec):
    rec.update(build=tag, copy_gbps=copy)
    print(json.dumps(rec), flush=True)
    f.write(json.dumps(rec) + "\n")
    f.flush()


for shape, (o, i) in shapes.items():
    w32 = nf4_dequantize(*weights[shape][0], dtype=torch.float32, backend="torch")
    for rows in rows_list:
        xs = [torch.randn(rows, i, device="cuda", dtype=dtype)
              for _ in range(copies[shape])]
        want = xs[0].float() @ w32.t()
        if rank:
            xa = torch.randn(rows, rank, device="cuda", dtype=dtype)
            b = torch.randn(o, rank, device="cuda", dtype=dtype) * 0.01
            want = want + xa.float() @ b.float().t()
            y = torch.empty(rows, o, device="cuda", dtype=dtype)

            def fn(x, p, s):
                _CudaBackend.gemv(x, resolve(p, s), None, y, (xa, b, 1.0))
                return y
        else:
            fn = lambda x, p, s: nf4_matmul(x, p, s, backend="cuda")  # noqa: E731
        for kernel in kernels:
            sets = [(x, p, s) for x, (p, s) in zip(xs, weights[shape])]
            with use_nf4_kernel(kernel):
                err = ((fn(*sets[0]).float() - want).norm() / want.norm()).item()
                wrong_by_design = any(opt[:1] == "q" and opt[1:] not in NF4_V4_RIGHT_PROBES
                                      for opt in kernel.split(":")[1:])
                assert err < 2e-2 or wrong_by_design, \
                    f"{kernel} is wrong at M={rows} {shape}: relative error {err:.3g}"
                ms = time_ms(fn, sets)
                ran = nf4_kernels_launched(fn, *sets[0])  # (a forced kernel may fall back)
            emit(shape=shape, M=rows, kernel=kernel, lora=rank, dtype=dtype_name,
                 scales="plain" if plain_scales else "nested",
                 us=round(ms * 1e3, 2),
                 pct_copy=round(100 * (o * i / 2) / (ms * 1e-3) / (copy * 1e9), 1), err=err,
                 ran=ran)
    del w32

# decode-like chain: x -> up -> down, twice (each call reads what the one before wrote)
if "4096->14336" not in shapes or "14336->4096" not in shapes:
    sys.exit(0)
pairs = [(weights["4096->14336"][k], weights["14336->4096"][k]) for k in range(2)]
for kernel in (k for k in kernels if k.split(":")[0] == "auto"):
    for rows in (int(r) for r in os.environ.get("CHAIN_ROWS", "1,16").split(",")):
        x0 = torch.randn(rows, 4096, device="cuda", dtype=dtype)

        def chain(x):
            for (pu, su), (pd, sd) in pairs:
                x = nf4_matmul(nf4_matmul(x, pu, su, backend="cuda"), pd, sd, backend="cuda")
            return x
        with use_nf4_kernel(kernel):
            ms = time_ms(chain, [(x0,)]) / 4
        emit(shape="chain up+down x2", M=rows, kernel=kernel, us=round(ms * 1e3, 2))
