"""Host <-> device copy rates for the offloaded checkpoint's traffic.

Why: run 18's 4x4096 step moved 8.06 GiB per pass each way (layer inputs + stashed results) in
235 ms of D2H copies, i.e. ~37 GB/s, during a ~330 ms forward. Stashing q/k/v as well (14 GiB)
made the step slower. Whether the link can do better (other chunk sizes, two streams, both
directions at once) decides whether more stashing can pay.

    python bench/pcie_copy.py [--out DIR]   (table on stdout, DIR/pcie_copy.json)
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import out_dir_arg, write_result  # noqa: E402


def rate(copies, streams, total_bytes, repeats=5):
    """Median GB/s of issuing `copies` (list of (dst, src)) round-robin over `streams`."""
    times = []
    main = torch.cuda.current_stream()
    for _ in range(repeats + 1):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(main)
        for s in streams:
            s.wait_stream(main)
        for i, (dst, src) in enumerate(copies):
            with torch.cuda.stream(streams[i % len(streams)]):
                dst.copy_(src, non_blocking=True)
        for s in streams:
            main.wait_stream(s)
        end.record(main)
        end.synchronize()
        times.append(start.elapsed_time(end))
    times = sorted(times[1:])
    ms = times[len(times) // 2]
    return ms, total_bytes / ms / 1e6


def main():
    out_dir = out_dir_arg(__doc__)
    total = 2 << 30  # 2 GiB moved per measurement
    rows = []
    streams = [torch.cuda.Stream() for _ in range(2)]
    for chunk_mb in (32, 134, 512):
        chunk = chunk_mb << 20 if chunk_mb != 134 else 16384 * 4096 * 2  # one 4x4096 hidden state
        n = max(1, total // chunk)
        dev = [torch.randn(chunk // 2, device="cuda", dtype=torch.bfloat16) for _ in range(n)]
        host = [torch.empty(chunk // 2, dtype=torch.bfloat16, pin_memory=True) for _ in range(n)]
        nbytes = n * chunk
        for direction, copies in (("D2H", list(zip(host, dev))), ("H2D", list(zip(dev, host)))):
            for k in (1, 2):
                ms, gbs = rate(copies, streams[:k], nbytes)
                rows.append(dict(direction=direction, chunk_bytes=chunk, copies=n, streams=k,
                                 ms=ms, gb_per_s=gbs))
                print(f"{direction} chunk {chunk / 2**20:7.1f} MiB x{n:3d} streams {k}: "
                      f"{ms:8.2f} ms {gbs:6.1f} GB/s", flush=True)
        # both directions at once on two streams (a backward prefetches while ... and the
        # forward offloads while nothing comes back: this is the upper bound of overlap)
        half = n // 2 or 1
        back = [torch.empty_like(d) for d in dev[:half]]
        copies = []
        for i in range(half):
            copies += [(host[i], dev[i]), (back[i], host[half + i] if half + i < n else host[i])]
        ms, gbs = rate(copies, streams, 2 * half * chunk)
        rows.append(dict(direction="both", chunk_bytes=chunk, copies=2 * half, streams=2,
                         ms=ms, gb_per_s=gbs))
        print(f"both chunk {chunk / 2**20:7.1f} MiB x{2 * half:3d} streams 2: {ms:8.2f} ms "
              f"{gbs:6.1f} GB/s (sum of both directions)", flush=True)
        del dev, host, back
        torch.cuda.empty_cache()
    write_result(out_dir, "pcie_copy", rows=rows)


if __name__ == "__main__":
    main()
