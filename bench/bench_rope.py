"""RoPE at Llama-3.1-8B shapes (32 q heads, 8 kv heads, head_dim 128, bf16; 4096 and 16384
tokens): CUDA and Triton against torch eager and torch.compile of the reference and Liger-Kernel's
LigerRopeFunction (when liger_kernel imports), as a fraction of the measured copy bandwidth.

q/k are what the attention code passes: [batch, heads, seq, head_dim] transposed views of the
[batch, seq, heads * head_dim] projection outputs. Bytes counted per direction: q and k read once
and written once, cos and sin read once (forward and backward alike; fwd+bwd is twice that).
Directions: fwd (the op on plain tensors: in place), bwd (the backward kernel alone, in place on
the gradients), fwd+bwd (autograd through the op, gradients w.r.t. the projection outputs)."""
import importlib

import pytest
import torch

from common import ProjectionOutput, time_ms
from fastft.ops import rope

R = importlib.import_module("fastft.ops.rope")  # the module (fastft.ops.rope is the op)

HQ, HK, HEAD_DIM = 32, 8, 128
TOKENS = [4096, 16384]
DEVICE = "cuda"  # a CPU smoke run sets "cpu"
VARIANTS = ["cuda", "triton", "torch_eager", "torch_compile", "liger"]


def heads(p, n):
    return p.view(p.shape[0], p.shape[1], n, HEAD_DIM).transpose(1, 2)


def cos_sin(tokens):
    exponents = torch.arange(0, HEAD_DIM, 2, device=DEVICE).float() / HEAD_DIM
    inv_freq = 1.0 / 500000.0 ** exponents
    freqs = torch.arange(tokens, device=DEVICE).float()[:, None] * inv_freq
    emb = torch.cat((freqs, freqs), -1)[None]
    return emb.cos().bfloat16(), emb.sin().bfloat16()


def inputs(tokens, sets=3):
    out = []
    for _ in range(sets):
        qp = torch.randn(1, tokens, HQ * HEAD_DIM, device=DEVICE, dtype=torch.bfloat16)
        kp = torch.randn(1, tokens, HK * HEAD_DIM, device=DEVICE, dtype=torch.bfloat16)
        dq = heads(torch.randn_like(qp), HQ)
        dk = heads(torch.randn_like(kp), HK)
        out.append((qp.requires_grad_(), kp.requires_grad_(), dq, dk))
    return out


def one_direction_bytes(tokens):
    qk = tokens * (HQ + HK) * HEAD_DIM * 2
    return 2 * qk + 2 * tokens * HEAD_DIM * 2


def liger_rope():
    try:
        from liger_kernel.ops.rope import LigerRopeFunction
    except Exception as exc:  # not carried / does not import
        return None, f"liger_kernel does not import: {exc}"
    return (lambda q, k, cos, sin: LigerRopeFunction.apply(q, k, cos, sin)), None


def op_for(variant):
    if variant in ("cuda", "triton"):
        from fastft import dispatch

        problem = dispatch.why_not("rope", variant, "cuda", torch.bfloat16)
        return (None, problem) if problem else (
            lambda q, k, cos, sin: rope(q, k, cos, sin, backend=variant), None)
    if variant == "liger":
        return liger_rope()
    if variant == "torch_compile":
        return torch.compile(R.reference_rope), None
    return R.reference_rope, None


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("variant", VARIANTS)
def bench_rope(benchmark, record, tokens, variant):
    fn, problem = op_for(variant)
    if fn is None:
        pytest.skip(problem)
    cos, sin = cos_sin(tokens)
    sets = inputs(tokens)
    nbytes = one_direction_bytes(tokens)
    shape = f"{tokens}x({HQ}+{HK})x{HEAD_DIM}"

    def fwd(qp, kp, dq, dk):  # plain tensors: rotated in place by cuda / triton / liger
        with torch.no_grad():
            fn(heads(qp.detach(), HQ), heads(kp.detach(), HK), cos, sin)

    def fwd_bwd(qp, kp, dq, dk):
        q, k = heads(ProjectionOutput.apply(qp), HQ), heads(ProjectionOutput.apply(kp), HK)
        oq, ok = fn(q, k, cos, sin)
        torch.autograd.grad((oq, ok), (qp, kp), (dq, dk))

    ms_f = time_ms(fwd, sets)
    record(op="rope", direction="fwd", shape=shape, backend=variant, ms=ms_f, bytes=nbytes)
    ms_fb = time_ms(fwd_bwd, sets)
    record(op="rope", direction="fwd+bwd", shape=shape, backend=variant, ms=ms_fb,
           bytes=2 * nbytes)
    if variant in ("cuda", "triton"):  # the backward kernel alone, in place on the gradients
        impl = R._BACKENDS[variant]
        c3, s3 = cos.expand(1, tokens, HEAD_DIM), sin.expand(1, tokens, HEAD_DIM)
        ms_b = time_ms(lambda qp, kp, dq, dk: impl.rotate(dq.transpose(1, 2), dk.transpose(1, 2),
                                                          None, None, c3, s3, True), sets)
        record(op="rope", direction="bwd", shape=shape, backend=variant, ms=ms_b, bytes=nbytes)
    benchmark.pedantic(fwd, args=sets[0], rounds=5, warmup_rounds=1)
