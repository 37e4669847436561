"""SwiGLU / GeGLU at Llama-3.1-8B MLP shapes (intermediate 14336, bf16; 4096 and 16384 tokens):
CUDA and Triton against torch eager and torch.compile of the reference and Liger-Kernel's
LigerSiLUMulFunction / LigerGELUMulFunction (tanh GELU; when liger_kernel imports), as a
fraction of the measured copy bandwidth.

gate and up are separate [tokens, intermediate] projection outputs. Bytes counted: each tensor
read or written once: forward gate, up read + h written (3 passes); backward dh, gate, up read +
d_gate, d_up written (5 passes); fwd+bwd 8 passes; bwd+h 6 passes. Directions: fwd, bwd (the
backward kernel alone, in place into gate/up), bwd+h (the same kernel also writing
h = act(gate) * up over dh, as the fused LoRA MLP backward uses it), fwd+bwd (autograd,
gradients w.r.t. the projection outputs)."""
import pytest
import torch

from common import ProjectionOutput, time_ms
from fastft.ops import activations as A
from fastft.ops import geglu, swiglu

INTERMEDIATE = 14336
TOKENS = [4096, 16384]
DEVICE = "cuda"  # a CPU smoke run sets "cpu"
VARIANTS = ["cuda", "triton", "torch_eager", "torch_compile", "liger"]
ACTS = {"swiglu": "silu", "geglu": "gelu", "geglu_tanh": "gelu_tanh"}


def inputs(tokens, sets=3):
    out = []
    for _ in range(sets):
        g = torch.randn(tokens, INTERMEDIATE, device=DEVICE, dtype=torch.bfloat16)
        u = torch.randn_like(g)
        dh = torch.randn_like(g)
        out.append((g.requires_grad_(), u.requires_grad_(), dh))
    return out


def liger_glu(name):
    try:
        if name == "swiglu":
            from liger_kernel.ops.swiglu import LigerSiLUMulFunction as F
        elif name == "geglu_tanh":
            from liger_kernel.ops.geglu import LigerGELUMulFunction as F
        else:
            return None, "Liger's GeGLU is the tanh GELU only"
    except Exception as exc:  # not carried / does not import
        return None, f"liger_kernel does not import: {exc}"
    return (lambda g, u: F.apply(g, u)), None


def op_for(name, variant):
    act = ACTS[name]
    if variant in ("cuda", "triton"):
        from fastft import dispatch

        op = "swiglu" if name == "swiglu" else "geglu"
        problem = dispatch.why_not(op, variant, "cuda", torch.bfloat16)
        if problem:
            return None, problem
        if name == "swiglu":
            return (lambda g, u: swiglu(g, u, backend=variant)), None
        approx = "tanh" if name == "geglu_tanh" else "none"
        return (lambda g, u: geglu(g, u, approx, backend=variant)), None
    if variant == "liger":
        return liger_glu(name)
    eager = lambda g, u: A.reference_glu(g, u, act)  # noqa: E731
    return (torch.compile(eager) if variant == "torch_compile" else eager), None


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", list(ACTS))
def bench_glu(benchmark, record, name, tokens, variant):
    fn, problem = op_for(name, variant)
    if fn is None:
        pytest.skip(problem)
    sets = inputs(tokens)
    one_pass = tokens * INTERMEDIATE * 2
    shape = f"{tokens}x{INTERMEDIATE}"

    def fwd(g, u, dh):
        with torch.no_grad():
            fn(g.detach(), u.detach())

    def fwd_bwd(g, u, dh):
        gate, up = ProjectionOutput.apply(g), ProjectionOutput.apply(u)
        torch.autograd.grad(fn(gate, up), (g, u), dh)

    ms_f = time_ms(fwd, sets)
    record(op=name, direction="fwd", shape=shape, backend=variant, ms=ms_f, bytes=3 * one_pass)
    ms_fb = time_ms(fwd_bwd, sets)
    record(op=name, direction="fwd+bwd", shape=shape, backend=variant, ms=ms_fb,
           bytes=8 * one_pass)
    if variant in ("cuda", "triton"):  # the backward kernel alone, in place into gate / up
        impl = A._BACKENDS[variant]
        ms_b = time_ms(lambda g, u, dh: impl.backward(dh, g.detach(), u.detach(), None, None,
                                                      ACTS[name]), sets)
        record(op=name, direction="bwd", shape=shape, backend=variant, ms=ms_b,
               bytes=5 * one_pass)
        ms_bh = time_ms(lambda g, u, dh: impl.backward(dh, g.detach(), u.detach(), None, None,
                                                       ACTS[name], h=dh), sets)
        record(op=name, direction="bwd+h", shape=shape, backend=variant, ms=ms_bh,
               bytes=6 * one_pass)
    benchmark.pedantic(fwd, args=sets[0], rounds=5, warmup_rounds=1)
