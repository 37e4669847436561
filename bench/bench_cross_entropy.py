"""Cross-entropy at Llama-3 shapes (16384 tokens, hidden 4096, vocab 128256, bf16).

fused_linear_cross_entropy forward+backward: time against the matmuls it cannot avoid, timed as
plain full-size cuBLAS matmuls in the same run: with a frozen head the two of logits = h @ W.T and
d_hidden = d_logits @ W; with a trainable head also d_W = d_logits.T @ h (three). Each row names
its floor (floor_matmuls) and gives every matmul's time. Also memory beyond its inputs and
outputs (torch.cuda.max_memory_allocated delta; W.grad counts as an output), next to the plain
path (full logits, float32 cross-entropy) and Liger-Kernel's fused op when it imports.

cross_entropy forward+backward on [16384, 128256] bf16 logits: bytes = logits read once +
gradient written once, as a fraction of the measured copy bandwidth, against torch eager and
torch.compile of F.cross_entropy.

Layout variants recorded side by side (to choose the defaults from one run; see CE_VARIANTS):
"cuda" is the default (on sm_90 a thread-block cluster per row, each block holding its slice
of the row in shared memory: 4 blocks for this shape); FASTFT_CE_CLUSTER=1|2|4|8 forces the
cluster size; FASTFT_CE_BLOCKS_PER_SM=1|2 the one-block-per-row kernel (the fallback).
torch_eager / torch_compile are timed eagerly on one input set (they need ~30 GiB per call). Fused-head rows carry extra_gib (peak beyond inputs and outputs) and vs_matmuls
(time / the matmul floor; the bar is <= 1.07)."""

import gc

import pytest
import torch
import torch.nn.functional as F

from common import time_ms
from fastft.ops import cross_entropy, fused_linear_cross_entropy

TOKENS, HIDDEN, VOCAB = 16384, 4096, 128256
GIB = 1 << 30
SHAPE = f"{TOKENS}x{HIDDEN}x{VOCAB}"


def head_inputs(train_head):
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(TOKENS, HIDDEN, device="cuda", dtype=torch.bfloat16, generator=g)
    w = (torch.randn(VOCAB, HIDDEN, device="cuda", dtype=torch.bfloat16, generator=g)
         * HIDDEN ** -0.5).requires_grad_(train_head)
    labels = torch.randint(0, VOCAB, (TOKENS,), device="cuda", generator=g)
    labels[::7] = -100
    return h, w, labels


def plain_head_loss(h, w, labels):
    """What transformers does without a fused loss: full logits, upcast, cross-entropy."""
    return F.cross_entropy((h @ w.t()).float(), labels, ignore_index=-100)


def liger_head_loss():
    try:
        from liger_kernel.ops.fused_linear_cross_entropy import (
            LigerFusedLinearCrossEntropyFunction,
        )
    except Exception as exc:  # not carried / does not import
        return None, f"liger_kernel does not import: {exc}"

    def run(h, w, labels):
        out = LigerFusedLinearCrossEntropyFunction.apply(h, w, labels)
        return out[0] if isinstance(out, tuple) else out

    return run, None


def memory_and_time(loss_fn, h, w, labels):
    """(peak bytes beyond inputs and outputs, ms) of loss_fn(h, w, labels).backward()."""
    def step(h, w, labels):
        hr = h.detach().requires_grad_()
        w.grad = None
        loss_fn(hr, w, labels).backward()
        return hr

    step(h, w, labels)  # warm up (compiles Triton / picks cuBLAS algorithms)
    w.grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    hr = step(h, w, labels)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    outputs = hr.grad.numel() * hr.grad.element_size()
    if w.grad is not None:
        outputs += w.grad.numel() * w.grad.element_size()
    extra = peak - base - outputs
    del hr
    w.grad = None
    ms = time_ms(lambda *a: step(*a), [(h, w, labels)], warmup=2, iters=10)
    w.grad = None
    return extra, ms


MATMUL_MS: dict = {}


def matmuls_ms(h, w):
    """logits = h @ W.T, d_hidden = d_logits @ W and d_W = d_logits.T @ h as plain full-size
    cuBLAS matmuls into preallocated outputs (same run)."""
    if not MATMUL_MS:
        wd = w.detach()
        logits = torch.empty(TOKENS, VOCAB, device="cuda", dtype=torch.bfloat16)
        dlogits = torch.randn(TOKENS, VOCAB, device="cuda", dtype=torch.bfloat16) * 1e-3
        dh = torch.empty(TOKENS, HIDDEN, device="cuda", dtype=torch.bfloat16)
        dw = torch.empty(VOCAB, HIDDEN, device="cuda", dtype=torch.bfloat16)
        MATMUL_MS["logits"] = time_ms(lambda: torch.mm(h, wd.t(), out=logits), [()], iters=10)
        MATMUL_MS["d_hidden"] = time_ms(lambda: torch.mm(dlogits, wd, out=dh), [()], iters=10)
        MATMUL_MS["d_weight"] = time_ms(lambda: torch.mm(dlogits.t(), h, out=dw), [()],
                                        iters=10)
        del logits, dlogits, dh, dw
        torch.cuda.empty_cache()
    return MATMUL_MS


@pytest.mark.parametrize("train_head", [False, True], ids=["frozen_head", "trainable_head"])
@pytest.mark.parametrize("variant", ["cuda", "triton", "torch_plain", "liger"])
def bench_fused_linear_cross_entropy(benchmark, record, variant, train_head):
    from fastft import dispatch

    if variant in ("cuda", "triton"):
        problem = dispatch.why_not("fused_linear_cross_entropy", variant, "cuda", torch.bfloat16)
        if problem:
            pytest.skip(problem)
        fn = lambda h, w, y: fused_linear_cross_entropy(h, w, y, backend=variant)  # noqa: E731
    elif variant == "liger":
        fn, problem = liger_head_loss()
        if fn is None:
            pytest.skip(problem)
    else:
        fn = plain_head_loss
    h, w, labels = head_inputs(train_head)
    mm = matmuls_ms(h, w)
    # the unavoidable matmuls: two with a frozen head, three (plus d_W) with a trainable one
    floor_names = ("logits", "d_hidden", "d_weight") if train_head else ("logits", "d_hidden")
    floor = sum(mm[name] for name in floor_names)
    extra, ms = memory_and_time(fn, h, w, labels)
    flops = 2 * TOKENS * HIDDEN * VOCAB * (3 if train_head else 2)
    record(op="fused_linear_cross_entropy", direction="fwd+bwd",
           shape=SHAPE + ("/train_head" if train_head else "/frozen_head"), backend=variant,
           ms=ms, flops=flops, extra_gib=extra / GIB, floor_matmuls="+".join(floor_names),
           matmul_floor_ms=floor, vs_matmuls=ms / floor, matmuls_ms=dict(mm))
    benchmark.pedantic(lambda: None, rounds=1)


def logits_inputs(sets=2):
    out = []
    for i in range(sets):
        g = torch.Generator(device="cuda").manual_seed(i)
        x = torch.randn(TOKENS, VOCAB, device="cuda", dtype=torch.bfloat16, generator=g) * 2
        y = torch.randint(0, VOCAB, (TOKENS,), device="cuda", generator=g)
        y[::9] = -100
        out.append((x, y))
    return out


# Variant -> (backend, environment). "cuda" is the default layout (on sm_90 a cluster per row,
# 4 blocks for this shape); the others force one layout each.
CE_VARIANTS = {
    "cuda": ("cuda", {}),
    "cuda_cluster_8": ("cuda", {"FASTFT_CE_CLUSTER": "8"}),  # a cluster per row, 32 KB slices
    "cuda_1_block_per_sm": ("cuda", {"FASTFT_CE_BLOCKS_PER_SM": "1"}),
    "cuda_2_blocks_per_sm": ("cuda", {"FASTFT_CE_BLOCKS_PER_SM": "2"}),
    "triton": ("triton", {}),
    "torch_eager": (None, {}),
    "torch_compile": (None, {}),
}


def free_memory():
    """Drop what earlier variants left cached (graph pools, compiled buffers) before the next."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


@pytest.mark.parametrize("variant", list(CE_VARIANTS))
def bench_cross_entropy(benchmark, record, variant, monkeypatch):
    from fastft import dispatch

    backend, env = CE_VARIANTS[variant]
    free_memory()
    if backend:
        problem = dispatch.why_not("cross_entropy", backend, "cuda", torch.bfloat16)
        if problem:
            pytest.skip(problem)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        fn = lambda x, y: cross_entropy(x, y, backend=backend)  # noqa: E731
        sets = logits_inputs()
        graph = True
    else:
        eager = lambda x, y: F.cross_entropy(x.float(), y, ignore_index=-100)  # noqa: E731
        fn = torch.compile(eager) if variant == "torch_compile" else eager
        # One input set and eager timing: the float32 copies, log-softmax and their gradients
        # take ~30 GiB per call, so a CUDA graph of ten calls does not fit (its private pool
        # keeps every call's buffers). Python overhead is negligible next to ~10 ms calls.
        sets = logits_inputs(1)
        graph = False

    def fwd_bwd(x, y):
        xr = x.detach().requires_grad_()
        fn(xr, y).backward()

    ms = time_ms(fwd_bwd, sets, warmup=3, iters=15, graph=graph)
    nbytes = 2 * TOKENS * VOCAB * 2  # bf16 logits read once + bf16 gradient written once
    record(op="cross_entropy", direction="fwd+bwd", shape=f"{TOKENS}x{VOCAB}", backend=variant,
           ms=ms, bytes=nbytes)
    if backend:  # the forward alone (loss only, no gradient): one read
        with torch.no_grad():
            ms_f = time_ms(lambda x, y: cross_entropy(x, y, backend=backend), sets, iters=15)
        record(op="cross_entropy", direction="fwd(no grad)", shape=f"{TOKENS}x{VOCAB}",
               backend=variant, ms=ms_f, bytes=nbytes // 2)
    benchmark.pedantic(fwd_bwd, args=sets[0], rounds=1)
    del sets, fn
    free_memory()
