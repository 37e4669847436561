"""Where the host time of a fastft training step goes: the Llama-3.1-8B layer shape with a few
layers, bf16 LoRA and QLoRA, fastft's path as bench/train_step.py sets it up.

Why: on the H200 the 8B QLoRA step took ~450 ms of wall time for ~320 ms of GPU work while the
bf16 LoRA step (same GPU work) took ~350 ms, so something on the host side of the QLoRA path
stalls the GPU. This prints, per mode, the host time to issue a step against its wall time, and
the Python functions with the most own time over a few steps (cProfile).

    python bench/host_overhead.py [--layers 4] [--steps 3] [--modes lora,qlora]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))


def run(mode: str, layers: int, steps: int, top: int, batch: int = 2, seq: int = 2048) -> None:
    import torch

    import fastft  # noqa: F401
    import train_step as ts

    ts.SHAPES["8b_few"] = dict(ts.SHAPES["8b"], num_hidden_layers=layers)
    model = ts._build_model("8b_few", seq, 0)
    if mode == "qlora":
        model = ts._quantize_decoder_linears(model)
    model, _ = ts._setup_fastft(model, mode)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, 128256, (batch, seq), device="cuda")

    def step():
        ts.train_step(model, opt, ids)

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    issue, wall = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        issue.append((t1 - t0) * 1e3)
        wall.append((time.perf_counter() - t0) * 1e3)
    print(f"== {mode}, {layers} layers of the 8B shape, batch {batch}x{seq}: host issue "
          f"{min(issue):.1f} ms, wall {min(wall):.1f} ms per step (best of {steps})", flush=True)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    pstats.Stats(prof, stream=out).sort_stats("cumtime").print_stats(top)
    print(out.getvalue(), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--modes", default="lora,qlora")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048,
                    help="a short sequence (e.g. 256) leaves the GPU idle, so only host costs show")
    ap.add_argument("--out", help="ignored (device.sh passes it)")
    args = ap.parse_args()
    for mode in args.modes.split(","):
        run(mode, args.layers, args.steps, args.top, args.batch, args.seq)


if __name__ == "__main__":
    main()
