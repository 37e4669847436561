"""RMSNorm / LayerNorm at Llama-3.1-8B shapes: each backend against torch eager and
torch.compile of the reference, as a fraction of the measured copy bandwidth.

Bytes counted: every [rows, hidden] tensor read or written once (forward: x, y; backward with a
frozen weight: dy, x, dx); the weight and the per-row statistics are negligible."""
import pytest
import torch

from common import time_ms
from fastft.ops import layer_norm, rms_norm
from fastft.ops import norms as N

HIDDEN = 4096
TOKENS = [4096, 16384]


def inputs(tokens, sets=3):
    out = []
    for _ in range(sets):
        x = torch.randn(tokens, HIDDEN, device="cuda", dtype=torch.bfloat16)
        dy = torch.randn_like(x)
        out.append((x, dy))
    return out


def one_pass_bytes(tokens):
    return tokens * HIDDEN * 2


W = None


def weight():
    global W
    if W is None:
        W = (torch.randn(HIDDEN, device="cuda") * 0.1 + 1).bfloat16()
    return W


def variants():
    """name -> (forward fn, forward+backward fn, backward-only fn or None)"""
    w = weight()
    eager = lambda x: N.reference_rms_norm(x, w, 1e-6, 0.0)  # noqa: E731
    compiled = torch.compile(eager)
    out = {}
    for backend in ("cuda", "triton"):
        out[backend] = (lambda x, b=backend: rms_norm(x, w, backend=b), backend)
    out["torch_eager"] = (eager, None)
    out["torch_compile"] = (compiled, None)
    return out


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("variant", ["cuda", "triton", "torch_eager", "torch_compile"])
def bench_rms_norm(benchmark, record, tokens, variant):
    from fastft import dispatch

    fwd, backend = variants()[variant]
    if backend and dispatch.why_not("rms_norm", backend, "cuda", torch.bfloat16):
        pytest.skip(dispatch.why_not("rms_norm", backend, "cuda", torch.bfloat16))
    sets = inputs(tokens)
    nbytes = one_pass_bytes(tokens)

    def fwd_bwd(x, dy):
        xr = x.detach().requires_grad_()
        fwd(xr).backward(dy)

    ms_f = time_ms(lambda x, dy: fwd(x), sets)
    record(op="rms_norm", direction="fwd", shape=f"{tokens}x{HIDDEN}", backend=variant,
           ms=ms_f, bytes=2 * nbytes)
    ms_fb = time_ms(fwd_bwd, sets)
    record(op="rms_norm", direction="fwd+bwd", shape=f"{tokens}x{HIDDEN}", backend=variant,
           ms=ms_fb, bytes=5 * nbytes)
    if backend:  # the backward kernel alone, weight frozen (no dW)
        impl = N._BACKENDS[backend]
        stats = [impl.forward(x, weight(), None, 1e-6, 0.0, True) for x, _ in sets]
        bsets = [(dy, x, st[2]) for (x, dy), st in zip(sets, stats)]
        ms_b = time_ms(lambda dy, x, rstd: impl.backward(dy, x, weight(), None, rstd, 0.0, True,
                                                         False, False), bsets)
        record(op="rms_norm", direction="bwd", shape=f"{tokens}x{HIDDEN}", backend=variant,
               ms=ms_b, bytes=3 * nbytes)
        # trainable weight: dW partial rows + their reduction (bytes: the same three tensors)
        ms_bw = time_ms(lambda dy, x, rstd: impl.backward(dy, x, weight(), None, rstd, 0.0, True,
                                                          True, False), bsets)
        record(op="rms_norm", direction="bwd_dw", shape=f"{tokens}x{HIDDEN}", backend=variant,
               ms=ms_bw, bytes=3 * nbytes)
    benchmark.pedantic(fwd, args=(sets[0][0],), rounds=5, warmup_rounds=1)


@pytest.mark.parametrize("tokens", [16384])
@pytest.mark.parametrize("variant", ["cuda", "triton", "torch_eager", "torch_compile"])
def bench_layer_norm(benchmark, record, tokens, variant):
    from fastft import dispatch

    w = weight()
    b = torch.randn(HIDDEN, device="cuda", dtype=torch.bfloat16) * 0.1
    if variant in ("cuda", "triton"):
        if dispatch.why_not("layer_norm", variant, "cuda", torch.bfloat16):
            pytest.skip(dispatch.why_not("layer_norm", variant, "cuda", torch.bfloat16))
        fwd = lambda x: layer_norm(x, w, b, backend=variant)  # noqa: E731
    else:
        eager = lambda x: N.reference_layer_norm(x, w, b)  # noqa: E731
        fwd = torch.compile(eager) if variant == "torch_compile" else eager
    sets = inputs(tokens)
    nbytes = one_pass_bytes(tokens)
    ms_f = time_ms(lambda x, dy: fwd(x), sets)
    record(op="layer_norm", direction="fwd", shape=f"{tokens}x{HIDDEN}", backend=variant,
           ms=ms_f, bytes=2 * nbytes)

    def fwd_bwd(x, dy):
        fwd(x.detach().requires_grad_()).backward(dy)

    ms_fb = time_ms(fwd_bwd, sets)
    record(op="layer_norm", direction="fwd+bwd", shape=f"{tokens}x{HIDDEN}", backend=variant,
           ms=ms_fb, bytes=5 * nbytes)
    if variant in ("cuda", "triton"):  # the backward kernel alone, with dW and dB
        impl = N._BACKENDS[variant]
        stats = [impl.forward(x, w, b, 1e-5, 0.0, False) for x, _ in sets]
        bsets = [(dy, x, st[1], st[2]) for (x, dy), st in zip(sets, stats)]
        ms_b = time_ms(lambda dy, x, mean, rstd: impl.backward(dy, x, w, mean, rstd, 0.0, False,
                                                               True, True), bsets)
        record(op="layer_norm", direction="bwd_dw_db", shape=f"{tokens}x{HIDDEN}",
               backend=variant, ms=ms_b, bytes=3 * nbytes)
    benchmark.pedantic(fwd, args=(sets[0][0],), rounds=5, warmup_rounds=1)
