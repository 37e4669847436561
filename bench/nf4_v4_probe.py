"""Where the v4 NF4 kernel's time goes (bench only): each shape and M timed with
FASTFT_NF4_V4_PROBE = 0 (the kernel), 1 (its weight copies alone), 2 (copies, table, scales and
x staging, no decode), 3 (everything but the weight copies: the decode of stale shared memory),
4 (the kernel with the ring filled without waiting for the scales), 5 (no copies, no decode:
the prologue and epilogue), the weight frozen as in generate. Probes 6-11 need
bench/patches/nf4_v4_probes_6_11.patch applied to the kernel (runs 188-189): 6 (window 0 only
once the prologue's loads are issued), 7 (that and no wait for the scales), 8 (no global loads
in the prologue), 9 (its scales constant), 10 (the standard levels and code2 from constant
memory), 11 (no table lookups in the decode). Probes 1-3, 5, 8, 9 and 11 give wrong results
by design: only times are reported; for 4, 6, 7 and 10 the record also says whether y equals
the kernel's (probe 0) bit for bit.

    [PROBES=0,5] python bench/nf4_v4_probe.py OUT.jsonl
"""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_nf4 import random_weight  # noqa: E402
from common import time_ms, copy_bandwidth_gbps, use_nf4_kernel  # noqa: E402
from fastft.ops.nf4 import nf4_matmul  # noqa: E402

out = open(sys.argv[1], "a")
copy = copy_bandwidth_gbps()
rows_list = [int(r) for r in os.environ.get("ROWS", "1,8").split(",")]
for text in os.environ.get("SHAPES", "4096->14336,14336->4096").split(","):
    in_f, out_f = (int(v) for v in text.split("->"))
    copies = max(3, -(-2 * 50 * 2 ** 20 // (out_f * in_f // 2)))
    weights = [random_weight(out_f, in_f, seed) for seed in range(copies)]
    for rows in rows_list:
        sets = [(torch.randn(rows, in_f, device="cuda", dtype=torch.bfloat16), p, s)
                for p, s in weights]
        reference = None
        for probe in (int(v) for v in os.environ.get("PROBES", "0,1,2,3,4,5").split(",")):
            # (":q": FASTFT_NF4_V4_PROBE, which use_nf4_kernel sets or clears)
            with use_nf4_kernel(os.environ.get("KERNEL", "v4:f") + f":q{probe}"):
                ms = time_ms(lambda x, p, s: nf4_matmul(x, p, s, backend="cuda"), sets)
                y = nf4_matmul(*sets[0], backend="cuda")
            rec = dict(shape=text, M=rows, probe=probe, us=round(ms * 1e3, 2),
                       pct_copy=round(100 * (out_f * in_f / 2) / (ms * 1e-3) / (copy * 1e9), 1),
                       copy_gbps=copy)
            if probe == 0:
                reference = y
            elif probe in (4, 6, 7, 10) and reference is not None:
                rec["same_y"] = bool(torch.equal(y, reference))
            print(json.dumps(rec), flush=True)
            out.write(json.dumps(rec) + "\n")
