"""How fast the H200 reads a packed NF4 weight ([N, K/2] bytes) depending on the shape of the
pieces read together: a pure-read Triton kernel (each program sums one [rows x bytes] tile) at
tile shapes 256x128 .. 16x2048 (32 KB each) and the whole weight as one contiguous run.

Why: every fused small-M NF4 kernel (v1..v4, bitsandbytes too) streams the 29.4 MB weight at
about 1.2 TB/s, and v4's sweeps showed the rate does not move with bytes in flight per SM or
work per SM. v1..v4 read 32..128 contiguous bytes per weight row before moving to the next row
(2 KB or 7 KB further on). If DRAM pages opened for one 128-byte piece are the limit, longer
row pieces must read faster here; the tile shape that does is the one a kernel should copy.

    python bench/nf4_access_probe.py --out DIR   (table on stdout, DIR/nf4_access_probe.json)
"""
from __future__ import annotations

import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import copy_bandwidth_gbps, gpu_name, out_dir_arg, time_ms, write_result  # noqa: E402


@triton.jit
def _sum_tiles(words, out, row_groups, k_chunks, words_per_row,
               ROWS: tl.constexpr, WORDS: tl.constexpr, ROWS_FAST: tl.constexpr):
    pid = tl.program_id(0)
    if ROWS_FAST:  # neighbouring programs: neighbouring row groups, same k chunk (as v1..v4)
        rg = pid % row_groups
        kc = pid // row_groups
    else:          # neighbouring programs: the same rows, neighbouring k chunks
        kc = pid % k_chunks
        rg = pid // k_chunks
    rows = rg * ROWS + tl.arange(0, ROWS)
    cols = kc * WORDS + tl.arange(0, WORDS)
    tile = tl.load(words + rows[:, None].to(tl.int64) * words_per_row + cols[None, :])
    tl.store(out + pid, tl.sum(tl.sum(tile, axis=1), axis=0))


def probe(n, k, rows, row_bytes, rows_fast, copies=3):
    packed = [torch.randint(-2**31, 2**31 - 1, (n, k // 8), dtype=torch.int32, device="cuda")
              for _ in range(copies)]  # k // 2 bytes per row, as int32 words
    words_per_row = k // 8
    words = row_bytes // 4
    row_groups, k_chunks = n // rows, words_per_row // words
    grid = row_groups * k_chunks
    outs = [torch.empty(grid, dtype=torch.int32, device="cuda") for _ in packed]

    def fn(w, o):
        _sum_tiles[(grid,)](w, o, row_groups, k_chunks, words_per_row, ROWS=rows, WORDS=words,
                            ROWS_FAST=rows_fast, num_warps=8)

    fn(packed[0], outs[0])
    read = packed[0][:, :k_chunks * words]  # 7168-byte rows: whole tiles only
    want = read.reshape(row_groups, rows, k_chunks, words).sum(dim=(1, 3), dtype=torch.int64)
    got = outs[0].view(k_chunks, row_groups).t() if rows_fast else outs[0].view(row_groups, k_chunks)
    # int32 sums wrap; compare modulo 2^32
    assert torch.equal((got.to(torch.int64) - want) % 2**32, torch.zeros_like(want)), "wrong sum"
    ms = time_ms(fn, list(zip(packed, outs)))
    return ms, n * k_chunks * row_bytes


def main():
    out_dir = out_dir_arg(__doc__)
    copy = copy_bandwidth_gbps()
    results = []
    print(f"GPU {gpu_name()}, copy bandwidth {copy:.0f} GB/s")
    print("| weight | tile (rows x bytes) | order | ms | GB/s | % copy |")
    print("|---|---|---|---|---|---|")
    for n, k in ((14336, 4096), (4096, 14336)):
        cases = [(256, 128), (128, 256), (64, 512), (32, 1024), (16, 2048)]
        for rows, row_bytes in cases:
            for rows_fast in (True, False):
                ms, nbytes = probe(n, k, rows, row_bytes, rows_fast)
                gbps = nbytes / ms / 1e6
                order = "row groups fast" if rows_fast else "k chunks fast"
                print(f"| {n}x{k} | {rows}x{row_bytes} | {order} | {ms:.4f} | {gbps:.0f} | "
                      f"{100 * gbps / copy:.1f}% |", flush=True)
                results.append(dict(weight=f"{n}x{k}", rows=rows, row_bytes=row_bytes,
                                    order=order, ms=ms, gbps=gbps, pct_copy=100 * gbps / copy))
    write_result(out_dir, "nf4_access_probe", copy_gbps=copy, results=results)


if __name__ == "__main__":
    main()
