"""Where the decode-like up / down chain's time goes, per kernel: the chain of bench/nf4_small_m.py
(x -> 4096->14336 -> 14336->4096, twice, frozen weights, PDL) captured in a CUDA graph of 10
chains and replayed under the profiler, for each kernel spec given. Prints, per spec, the median
duration of the up and the down kernels, the median gap from a kernel's end to the next one's
start (negative: they overlap, PDL), and the graph's time per call.

    KERNELS=auto:f,auto:f:q6 ROWS=1 DTYPE=bf16 python bench/nf4_chain_profile.py OUT.json

CHAIN=square: 8 calls of 4096->4096 instead, each reading the one before; a spec may then
alternate v4 probes per call, "auto:f:q6|0": FASTFT_NF4_V4_PROBE 6 for even calls, 0 (none)
for odd ones (the same kernel code for every call, or two kernels taking turns).
"""
import json
import os
import statistics
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_nf4 import random_weight  # noqa: E402
from common import capture_graph, use_nf4_kernel  # noqa: E402
from fastft.ops.nf4 import nf4_matmul  # noqa: E402

out = sys.argv[1]
kernels = os.environ.get("KERNELS", "auto:f,auto:f:q6").split(",")
rows_list = [int(r) for r in os.environ.get("ROWS", "1").split(",")]
dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[os.environ.get("DTYPE", "bf16")]
square = os.environ.get("CHAIN", "updown") == "square"
if square:
    squares = [random_weight(4096, 4096, 20 + seed) for seed in range(8)]
else:
    up = [random_weight(14336, 4096, seed) for seed in range(2)]
    down = [random_weight(4096, 14336, 10 + seed) for seed in range(2)]
calls_per_chain = 8 if square else 4
probes = []  # (CHAIN=square) the probe of each call, in turn


def chain(x):
    if square:
        for i, (p, s) in enumerate(squares):
            if probes:
                os.environ["FASTFT_NF4_V4_PROBE"] = probes[i % len(probes)]
            x = nf4_matmul(x, p, s, backend="cuda")
        return x
    for (pu, su), (pd, sd) in zip(up, down):
        x = nf4_matmul(nf4_matmul(x, pu, su, backend="cuda"), pd, sd, backend="cuda")
    return x


results = []
for rows in rows_list:
    x0 = torch.randn(rows, 4096, device="cuda", dtype=dtype)
    for spec in kernels:
        spec, _, turns = spec.partition("|")
        probes[:] = [spec.split(":q")[1].split(":")[0]] + turns.split("|") if turns else []
        with use_nf4_kernel(spec):
            g = capture_graph(chain, [(x0,)], warmup=3, calls=10)
            for _ in range(5):
                g.replay()
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(20):
                g.replay()
            end.record()
            end.synchronize()
            us_per_call = start.elapsed_time(end) * 1e3 / (20 * 10 * calls_per_chain)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    g.replay()
                torch.cuda.synchronize()
        events = sorted((e for e in prof.events() if "nf4_gemv_v4_kernel" in e.name),
                        key=lambda e: e.time_range.start)
        kinds = {"up": [], "down": []}
        gaps = {"up": [], "down": []}  # gap before a kernel of that kind
        names = {}
        for i, e in enumerate(events):
            kind = "up" if i % 2 == 0 else "down"  # (square: even and odd calls)
            kinds[kind].append(e.time_range.end - e.time_range.start)
            names[kind] = e.name[e.name.index("<"):e.name.index(">") + 1]
            if i:
                gaps[kind].append(e.time_range.start - events[i - 1].time_range.end)
        rec = dict(spec=spec + ("|" + "|".join(probes[1:]) if probes else ""), M=rows,
                   dtype=str(dtype), us_per_call_graph=round(us_per_call, 2),
                   kernels=len(events), names=names,
                   **{f"{k}_us_median": round(statistics.median(v), 2)
                      for k, v in kinds.items() if v},
                   **{f"gap_before_{k}_us_median": round(statistics.median(v), 2)
                      for k, v in gaps.items() if v},
                   **{f"{k}_us_p90": round(sorted(v)[int(0.9 * len(v))], 2)
                      for k, v in kinds.items() if v})
        print(json.dumps(rec), flush=True)
        results.append(rec)
with open(out, "w") as f:
    json.dump(results, f, indent=1)
