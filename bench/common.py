"""Timing helpers for the GPU benchmarks: CUDA events, medians, rotated inputs, ceilings."""
from __future__ import annotations

import gc
import os
import statistics

import torch

_COPY_GBPS: list = []


def time_ms(fn, input_sets, warmup=5, iters=30, graph=True):
    """Median GPU milliseconds of one fn(*inputs) call, cycling through input_sets so that
    successive calls touch different memory (each set larger than L2, or several sets).

    The calls are captured in a CUDA graph and the graph's replays timed, so Python and launch
    overhead (which the GPU hides in a real training step) does not count as kernel time. If
    capture fails (an op that syncs), falls back to timing each call with events."""
    if graph:
        try:
            return _time_graph_ms(fn, input_sets, warmup, iters)
        except Exception as exc:  # not capturable: report it and time plainly
            print(f"time_ms: CUDA graph capture failed ({type(exc).__name__}: {exc}); "
                  "timing eagerly")
            torch.cuda.synchronize()
    n = len(input_sets)
    for i in range(warmup):
        fn(*input_sets[i % n])
    torch.cuda.synchronize()
    times = []
    for i in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        args = input_sets[i % n]
        start.record()
        fn(*args)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def capture_graph(fn, input_sets, warmup, calls):
    """A CUDA graph of `calls` calls fn(*inputs), cycling through input_sets, after
    max(warmup, len(input_sets)) warm-up calls on a side stream (as capture requires)."""
    n = len(input_sets)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(max(warmup, n)):
            fn(*input_sets[i % n])
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            fn(*input_sets[i % n])
    return g


def _time_graph_ms(fn, input_sets, warmup, iters, calls_per_graph=None):
    calls = calls_per_graph or max(len(input_sets), 10)
    g = capture_graph(fn, input_sets, warmup, calls)
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    del g
    gc.collect()
    torch.cuda.empty_cache()  # the graph's private pool would otherwise stay reserved
    return statistics.median(times)


class ProjectionOutput(torch.autograd.Function):
    """A zero-cost stand-in for a projection's output: a non-leaf tensor owning its memory."""

    @staticmethod
    def forward(ctx, x):
        return x.detach()

    @staticmethod
    def backward(ctx, g):
        return g


def copy_bandwidth_gbps() -> float:
    """Measured device-to-device copy rate in GB/s (bytes read + bytes written), cached."""
    if not _COPY_GBPS:
        n = 1 << 30  # 1 GiB per buffer: far beyond L2
        bufs = [torch.empty(n, dtype=torch.uint8, device="cuda") for _ in range(4)]
        for b in bufs:
            b.random_(0, 255)
        pairs = [(bufs[0], bufs[1]), (bufs[2], bufs[3]), (bufs[1], bufs[0]), (bufs[3], bufs[2])]
        # eagerly: in a CUDA graph the copy becomes a memcpy node run by the copy engines,
        # which measured ~2.7 TB/s on the H200 against ~4.2 TB/s for the SM copy kernel
        ms = time_ms(lambda dst, src: dst.copy_(src), pairs, warmup=3, iters=20, graph=False)
        _COPY_GBPS.append(2 * n / ms / 1e6)
        del bufs
        torch.cuda.empty_cache()
    return _COPY_GBPS[0]


def matmul_tflops(m=8192, n=8192, k=8192) -> float:
    a = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    b = [torch.randn(k, n, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    ms = time_ms(torch.matmul, list(zip(a, b)), warmup=3, iters=10)
    return 2 * m * n * k / ms / 1e9


def gpu_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "none"


def out_dir_arg(doc: str):
    """The `--out DIR` argument of the one-shot diagnostic scripts (bench/device.sh's
    EXTRA_SCRIPTS call them with it), with `doc` as --help."""
    import argparse

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="write NAME.json into this folder")
    return ap.parse_args().out


def write_result(out_dir, name: str, **fields) -> None:
    """out_dir/name.json with the GPU's name and `fields` (nothing when out_dir is None)."""
    import json
    import os

    if out_dir is None:
        return
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, name + ".json"), "w") as f:
        json.dump(dict(gpu=gpu_name(), **fields), f, indent=1)


def nf4_kernel_label(event_name: str):
    """A short label of the fused NF4 kernel a profiler event names ("v4<false, __nv_bfloat16, 1,
    2, 1>", "v3_group<...>", "v1<...>" for nf4_gemv_kernel), or None for any other event."""
    import re

    m = re.search(r"nf4_gemv_(?:(\w+?)_)?kernel<([^()]*)>", event_name)
    if m is None:
        return None
    return f"{m.group(1) or 'v1'}<{m.group(2)}>"


def nf4_kernels_launched(fn, *args) -> list:
    """The fused NF4 kernels one call fn(*args) launches (nf4_kernel_label's, in launch order):
    a record of what ran, since a forced kernel that does not apply falls back to another
    (e.g. "v4" on a shape whose CTAs would take more tiles than v4 takes runs v3)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn(*args)
        torch.cuda.synchronize()
    labels = [nf4_kernel_label(e.name) for e in prof.events()]
    return [label for label in labels if label is not None]


# use_nf4_kernel's spec options: letter -> the setting it sets
NF4_KERNEL_OPTIONS = {"p": "FASTFT_NF4_V3_KPARTS", "s": "FASTFT_NF4_V3_SPLITS",
                      "w": "FASTFT_NF4_V4_SPLIT", "k": "FASTFT_NF4_V4_KPARTS",
                      "q": "FASTFT_NF4_V4_PROBE", "c": "FASTFT_NF4_V4_CTAS"}
# v4's timing probes (":q") that still compute right results (nf4_stream.cu); the others do not
NF4_V4_RIGHT_PROBES = ("4", "6", "9", "17")


def use_nf4_kernel(spec: str):
    """FASTFT_NF4_GEMV and v3's forced work split from a spec like "v3h:p8:s2" (":p" the K parts
    per CTA, FASTFT_NF4_V3_KPARTS; ":s" the K splits across CTAs, FASTFT_NF4_V3_SPLITS; ":w" v4's
    warps per step, FASTFT_NF4_V4_SPLIT; ":k" v4's K parts, FASTFT_NF4_V4_KPARTS; ":q" v4's
    timing probe, FASTFT_NF4_V4_PROBE (wrong results but for NF4_V4_RIGHT_PROBES);
    ":c" v4's most row groups (CTAs), FASTFT_NF4_V4_CTAS; ":f" the weights frozen: the calls
    made inside the returned context load the weight before the PDL wait, as in generate).
    Returns that context (a no-op without ":f")."""
    import contextlib

    from fastft.ops.nf4 import frozen_weights

    name, *opts = spec.split(":")
    os.environ["FASTFT_NF4_GEMV"] = name
    for var in NF4_KERNEL_OPTIONS.values():  # (a spec sets only what it names)
        os.environ.pop(var, None)
    frozen = False
    for opt in opts:
        if opt == "f":
            frozen = True
            continue
        os.environ[NF4_KERNEL_OPTIONS[opt[0]]] = opt[1:]
    return frozen_weights() if frozen else contextlib.nullcontext()
