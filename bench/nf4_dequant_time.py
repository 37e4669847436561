"""nf4_dequantize of a 14336x4096 weight by the CUDA and Triton backends, nested and plain
absmax, to bf16 / fp16 / fp32, with the copy rate measured in the same process: for A/B calls
that build two trees and time each in turn (PYTHONPATH picks the tree). One JSON line per case,
printed and appended to OUT.jsonl. Bytes as bench_nf4.py counts them: packed in + values out.

    python bench/nf4_dequant_time.py TAG OUT.jsonl"""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_nf4 import plain_absmax, random_weight  # noqa: E402
from common import copy_bandwidth_gbps, time_ms  # noqa: E402
from fastft.ops.nf4 import nf4_dequantize  # noqa: E402

OUT_F, IN_F = 14336, 4096


def main():
    tag, out_path = sys.argv[1], sys.argv[2]
    copy = copy_bandwidth_gbps()
    n = OUT_F * IN_F
    nested = [random_weight(OUT_F, IN_F, seed) for seed in range(2)]
    for scales, weights in (("nested", nested), ("plain", [plain_absmax(*w) for w in nested])):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            outs = [torch.empty(n, dtype=dtype, device="cuda") for _ in weights]
            for backend in ("cuda", "triton"):
                sets = [(p, s, o) for (p, s), o in zip(weights, outs)]
                ms = time_ms(lambda p, s, o: nf4_dequantize(p, s, out=o, backend=backend), sets)
                nbytes = n // 2 + n * outs[0].element_size()
                row = dict(tag=tag, backend=backend, scales=scales, dtype=str(dtype)[6:],
                           shape=f"{OUT_F}x{IN_F}", us=round(ms * 1e3, 2),
                           pct_copy=round(100 * nbytes / (ms * 1e-3) / 1e9 / copy, 1),
                           copy_gbps=round(copy))
                print(json.dumps(row), flush=True)
                with open(out_path, "a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
