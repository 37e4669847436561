"""Causal attention at the Llama-3.1-8B training shapes (32 q heads, 8 kv heads, head_dim 128,
bf16), forward + backward, through torch's SDPA with each of its fused backends forced in turn.

Why: the patched models call SDPA, and which backend torch picks by default is not the fastest
one on Hopper. This measures, in the same run, the backends fastft can ask for, with the GQA
layouts transformers uses (enable_gqa=True on [batch, heads, seq, dim] views, or k/v repeated to
32 heads), so the choice in fastft is made from numbers. A backend that cannot run a case is
recorded as unsupported, not skipped silently."""
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from common import time_ms

HQ, HK, D = 32, 8, 128
SHAPES = [(2, 2048), (4, 4096), (1, 16384)]
BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "default": None}


def _inputs(batch, seq, gqa, sets=2):
    out = []
    for _ in range(sets):
        q = torch.randn(batch, HQ, seq, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        kv_heads = HK if gqa else HQ
        k = torch.randn(batch, kv_heads, seq, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(batch, kv_heads, seq, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn(batch, HQ, seq, D, device="cuda", dtype=torch.bfloat16)
        out.append((q, k, v, dy))
    return out


@pytest.mark.parametrize("gqa", [True, False], ids=["enable_gqa", "repeated_kv"])
@pytest.mark.parametrize("batch,seq", SHAPES, ids=[f"{b}x{s}" for b, s in SHAPES])
@pytest.mark.parametrize("backend", list(BACKENDS))
def bench_sdpa_causal(benchmark, record, backend, batch, seq, gqa):
    sets = _inputs(batch, seq, gqa)

    def step(q, k, v, dy):
        kw = {"enable_gqa": True} if gqa else {}
        if BACKENDS[backend] is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, **kw)
        else:
            with sdpa_kernel(BACKENDS[backend]):
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, **kw)
        y.backward(dy)

    # causal: half the score matrix; fwd 2 matmuls, bwd 5 (dQ, dK, dV, dP and the recompute of P)
    flops = 4 * batch * HQ * seq * seq * D / 2 * (1 + 2.5)
    shape = f"{batch}x{seq} {'gqa' if gqa else 'rep'}"
    try:
        step(*sets[0])
        torch.cuda.synchronize()
    except RuntimeError as exc:
        record(op="sdpa_causal fwd+bwd", shape=shape, backend=backend, ms=float("nan"),
               unsupported=str(exc).splitlines()[0][:200])
        pytest.skip(f"{backend} cannot run this case")
    ms = time_ms(step, sets, warmup=3, iters=10, graph=False)
    record(op="sdpa_causal fwd+bwd", shape=shape, backend=backend, ms=ms, flops=flops)
    benchmark.pedantic(lambda: None, rounds=1)
