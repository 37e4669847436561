"""Grouped small-M nf4 calls (one launch over several weights of one x: nf4_gemv_group) against
one call per weight, graph-timed in the same process: an 8B layer's q/k/v (4096 -> 4096, 1024,
1024) and gate/up (4096 -> 14336 x 2), with and without a rank-16 LoRA term on each weight.
One JSON line per case, appended to OUT/nf4_group.jsonl.

    ROWS=1,2,4,8,16 KERNELS=auto,v3,v3h,v3:p16 NF4_GROUPS=q/k/v,gate/up \
        python bench/nf4_group.py --out OUT

NF4_GROUPS: names from ALL_GROUPS (also Qwen2.5-7B's and -14B's gate/up pairs).

KERNELS: the grouped call's kernel choices (FASTFT_NF4_GEMV, and as in nf4_small_m.py ":p8"
forces v3's K parts, ":s2" its K splits); the calls per weight always take the default.
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_nf4 import random_weight  # noqa: E402
from common import (copy_bandwidth_gbps, nf4_kernels_launched, time_ms,  # noqa: E402
                    use_nf4_kernel)
from fastft.ops import nf4 as nf4_mod  # noqa: E402
from fastft.ops.nf4 import nf4_dequantize, resolve  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--out", default="/tmp")
args = parser.parse_args()
rows_list = [int(r) for r in os.environ.get("ROWS", "1,2,4,8,16").split(",")]
kernels = os.environ.get("KERNELS", "auto,v3,v3h,v3:p16").split(",")
ALL_GROUPS = {"q/k/v": [(4096, 4096), (1024, 4096), (1024, 4096)],
              "gate/up": [(14336, 4096), (14336, 4096)],
              "gate/up 7B": [(18944, 3584), (18944, 3584)],     # Qwen2.5-7B
              "gate/up 14B": [(13824, 5120), (13824, 5120)]}    # Qwen2.5-14B
GROUPS = {n: ALL_GROUPS[n] for n in os.environ.get("NF4_GROUPS", "q/k/v,gate/up").split(",")}
impl = nf4_mod._BACKENDS["cuda"]
copy = copy_bandwidth_gbps()
out = open(os.path.join(args.out, "nf4_group.jsonl"), "a")


def emit(**rec):
    rec.update(copy_gbps=copy, gpu=torch.cuda.get_device_name())
    print(json.dumps(rec), flush=True)
    out.write(json.dumps(rec) + "\n")
    out.flush()


for name, shapes in GROUPS.items():
    group_bytes = sum(o * i // 2 for o, i in shapes)
    # enough copies of the group that the calls cycle through more than twice the 50 MB L2
    copies = max(3, -(-2 * 50 * 2 ** 20 // group_bytes))
    raw = [[random_weight(o, i, 100 * c + s) for s, (o, i) in enumerate(shapes)]
           for c in range(copies)]
    sets_w = [[resolve(p, st) for p, st in weights] for weights in raw]
    w32 = [nf4_dequantize(p, st, dtype=torch.float32, backend="torch") for p, st in raw[0]]
    for rows in rows_list:
        for rank in (0, 16):
            sets = []
            for c, states in enumerate(sets_w):
                x = torch.randn(rows, shapes[0][1], device="cuda", dtype=torch.bfloat16)
                xa_all = torch.randn(rows, rank * len(shapes), device="cuda", dtype=torch.bfloat16)
                calls = []
                for s, (st, (o, _)) in enumerate(zip(states, shapes)):
                    low = None
                    if rank:
                        b = torch.randn(o, rank, device="cuda", dtype=torch.bfloat16) * 0.01
                        low = (xa_all[:, s * rank:(s + 1) * rank], b, 2.0)
                    calls.append((st, None, torch.empty(rows, o, device="cuda",
                                                        dtype=torch.bfloat16), low))
                sets.append((x, calls))

            def each(x, calls):
                for st, bias, y, low in calls:
                    impl.gemv(x, st, bias, y, low)

            def grouped(x, calls):
                impl.gemv_group(x, calls)

            x, calls = sets[0]
            results = {}
            for label, fn in [("each", each)] + [(k, grouped) for k in kernels]:
                use_nf4_kernel("auto" if label == "each" else label)
                fn(x, calls)
                errs = []
                for (st, _, y, low), w in zip(calls, w32):
                    want = x.float() @ w.t()
                    if low is not None:
                        want += low[2] * low[0].float() @ low[1].float().t()
                    errs.append(((y.float() - want).norm() / want.norm()).item())
                assert max(errs) < 2e-2, f"{label} {name} M={rows}: relative errors {errs}"
                ms = time_ms(fn, sets)
                results[label] = ms
                emit(group=name, M=rows, rank=rank, calls=label, us=round(ms * 1e3, 2),
                     pct_copy=round(100 * group_bytes / (ms * 1e-3) / (copy * 1e9), 1),
                     err=max(errs), ran=nf4_kernels_launched(fn, x, calls))
            best = min(kernels, key=results.get)
            emit(group=name, M=rows, rank=rank, calls="group / each",
                 auto=round(results[kernels[0]] / results["each"], 3), best=best,
                 best_ratio=round(results[best] / results["each"], 3))
            use_nf4_kernel("auto")
