"""NF4 at Llama-3.1-8B MLP shapes, against bitsandbytes measured in the same run.

* nf4_dequantize of a 14336x4096 weight (nested absmax, blocksize 64) to bf16.
  Bytes: packed in + bf16 out (the scales, 1/32 of the packed size, are not counted).
  Target: >= 85% of the copy bandwidth, and faster than bitsandbytes' dequantize_4bit.
* the fused small-M nf4_matmul, M = 1..16, for 4096->14336 and 14336->4096.
  Bytes: the packed weight only (the rate at which it is read). Target: >= 70% of copy bandwidth.
  Peers: bitsandbytes.matmul_4bit and a dense bf16 x @ W.T (which reads 4x the bytes).
* the large-M path at M = 4096: dequantise into the workspace + cuBLAS, against a plain bf16
  matmul of the same size (target: within 1.07x) and bitsandbytes.matmul_4bit.

The weights are random codes and scales (timing does not depend on the values); bitsandbytes
gets the same tensors through its QuantState. Several weight copies rotate so the packed
weight (29 MB) is not served from the 50 MB L2."""
import dataclasses

import pytest
import torch

from common import time_ms
from fastft import dispatch
from fastft.ops import nf4 as nf4_mod
from fastft.ops.nf4 import NF4NestedState, NF4State, nf4_dequantize, nf4_matmul

SHAPES = {"4096->14336": (14336, 4096), "14336->4096": (4096, 14336)}  # W: [out, in]
BLOCK = 64


def random_weight(out_f, in_f, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    n = out_f * in_f
    blocks = n // BLOCK
    packed = torch.randint(0, 256, (n // 2, 1), dtype=torch.uint8, device="cuda", generator=g)
    absmax = torch.randint(0, 256, (blocks,), dtype=torch.uint8, device="cuda", generator=g)
    absmax2 = torch.rand(-(-blocks // 256), device="cuda", generator=g) * 0.02 + 0.01
    code2 = torch.linspace(-1, 1, 256, device="cuda")
    offset = torch.tensor(0.02, device="cuda")
    state = NF4State(absmax=absmax, shape=torch.Size([out_f, in_f]), dtype=torch.bfloat16,
                     blocksize=BLOCK, offset=offset,
                     state2=NF4NestedState(absmax2, code2, 256))
    return packed, state


def plain_absmax(packed, state):
    """The same weight with its nested absmax decoded into plain float32 absmax (bitsandbytes
    without double quantisation: 4 bytes of scale per block instead of 1)."""
    absmax = nf4_mod.reference_block_scales(nf4_mod.resolve(packed, state))
    return packed, dataclasses.replace(state, absmax=absmax.float().contiguous(), offset=None,
                                       state2=None)


def bnb_state(state):
    """The same weight as a bitsandbytes QuantState, or None without a working bitsandbytes."""
    try:
        import bitsandbytes.functional as F

        s2 = F.QuantState(absmax=state.state2.absmax, code=state.state2.code, blocksize=256,
                          dtype=torch.float32)
        return F.QuantState(absmax=state.absmax, shape=state.shape,
                            code=nf4_mod._nf4_levels(state.absmax.device),
                            blocksize=state.blocksize, quant_type="nf4", dtype=torch.bfloat16,
                            offset=state.offset, state2=s2)
    except Exception:
        return None


def bnb_runs(fn):
    """Run fn once; skip the benchmark when bitsandbytes' CUDA library does not load."""
    try:
        fn()
        torch.cuda.synchronize()
    except Exception as exc:
        pytest.skip(f"bitsandbytes does not run here: {type(exc).__name__}: {exc}")


def reference_matmul(variant, xs, weights):
    """(input sets, fn) of a reference variant: bitsandbytes' matmul_4bit ("bitsandbytes") or a
    plain bf16 matmul with the weights dequantised beforehand ("dense_bf16")."""
    if variant == "bitsandbytes":
        import bitsandbytes as bnb

        sets = [(x, p, bnb_state(s)) for x, (p, s) in zip(xs, weights)]
        if sets[0][2] is None:
            pytest.skip("bitsandbytes does not import")
        fn = lambda x, p, s: bnb.matmul_4bit(x, p.t(), quant_state=s)  # noqa: E731
        bnb_runs(lambda: fn(*sets[0]))
        return sets, fn
    sets = [(x, nf4_dequantize(p, s, dtype=torch.bfloat16)) for x, (p, s) in zip(xs, weights)]
    return sets, (lambda x, w: x @ w.t())


def need_backend(op, backend):
    problem = dispatch.why_not(op, backend, "cuda", torch.bfloat16)
    if problem:
        pytest.skip(problem)


# ---------------------------------------------------------------- dequantisation

@pytest.mark.parametrize("variant", ["cuda", "triton", "bitsandbytes", "torch_eager",
                                     "torch_compile"])
def bench_nf4_dequantize(benchmark, record, variant):
    out_f, in_f = 14336, 4096
    n = out_f * in_f
    weights = [random_weight(out_f, in_f, seed) for seed in range(2)]
    outs = [torch.empty(n, dtype=torch.bfloat16, device="cuda") for _ in weights]
    sets = [(p, s, o) for (p, s), o in zip(weights, outs)]
    if variant in ("cuda", "triton"):
        need_backend("nf4_dequantize", variant)
        fn = lambda p, s, o: nf4_dequantize(p, s, out=o, backend=variant)  # noqa: E731
    elif variant == "bitsandbytes":
        import bitsandbytes.functional as F

        sets = [(p, bnb_state(s), o) for p, s, o in sets]
        if sets[0][1] is None:
            pytest.skip("bitsandbytes does not import")
        fn = lambda p, s, o: F.dequantize_4bit(p, s)  # noqa: E731
        bnb_runs(lambda: fn(*sets[0]))
        ours = nf4_dequantize(sets[0][0], weights[0][1], dtype=torch.bfloat16)
        assert torch.equal(ours, fn(*sets[0])), "not bit-exact with bitsandbytes on this GPU"
    else:
        def eager(p, s, o):
            return nf4_mod.reference_dequantize(nf4_mod.resolve(p, s), torch.bfloat16)

        if variant == "torch_eager":
            fn = eager
        else:
            ref = torch.compile(nf4_mod.reference_dequantize)
            fn = lambda p, s, o: ref(nf4_mod.resolve(p, s), torch.bfloat16)  # noqa: E731
    ms = time_ms(fn, sets)
    record(op="nf4_dequantize", direction="fwd", shape=f"{out_f}x{in_f}", backend=variant,
           ms=ms, bytes=n // 2 + 2 * n)
    benchmark.pedantic(fn, args=sets[0], rounds=3, warmup_rounds=1)


# ---------------------------------------------------------------- small-M matmul

# The CUDA backend's fused kernels and their settings (environment, read on every call):
# "cuda" is the default (auto: v3h for wide outputs, else v1; programmatic dependent launch on),
# "cuda_v1" .. "cuda_v3h" force a kernel; "_nopdl" turns PDL off.
_NOPDL = {"FASTFT_NF4_PDL": "0"}
CUDA_GEMV_VARIANTS = {
    "cuda": {}, "cuda_nopdl": _NOPDL,
    "cuda_v1": {"FASTFT_NF4_GEMV": "v1"}, "cuda_v1_nopdl": {"FASTFT_NF4_GEMV": "v1", **_NOPDL},
    "cuda_v2": {"FASTFT_NF4_GEMV": "v2"},
    "cuda_v3": {"FASTFT_NF4_GEMV": "v3"}, "cuda_v3_nopdl": {"FASTFT_NF4_GEMV": "v3", **_NOPDL},
    "cuda_v3r": {"FASTFT_NF4_GEMV": "v3r"},
    "cuda_v3h": {"FASTFT_NF4_GEMV": "v3h"}, "cuda_v3h_nopdl": {"FASTFT_NF4_GEMV": "v3h", **_NOPDL},
}
_GEMV_ENV = ("FASTFT_NF4_GEMV", "FASTFT_NF4_V3_SPLITS", "FASTFT_NF4_PDL")


def use_gemv_settings(monkeypatch, env):
    for name in _GEMV_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)


@pytest.mark.parametrize("rows", [1, 2, 4, 8, 9, 16])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("variant", [*CUDA_GEMV_VARIANTS, "triton", "bitsandbytes",
                                     "dense_bf16"])
def bench_nf4_matmul_small(benchmark, record, monkeypatch, variant, shape, rows):
    out_f, in_f = SHAPES[shape]
    copies = 3 if variant != "dense_bf16" else 2
    weights = [random_weight(out_f, in_f, seed) for seed in range(copies)]
    xs = [torch.randn(rows, in_f, device="cuda", dtype=torch.bfloat16) for _ in weights]
    if variant in CUDA_GEMV_VARIANTS or variant == "triton":
        backend = "triton" if variant == "triton" else "cuda"
        use_gemv_settings(monkeypatch, CUDA_GEMV_VARIANTS.get(variant, {}))
        need_backend("nf4_matmul", backend)
        st = nf4_mod.resolve(*weights[0])
        if not nf4_mod._BACKENDS[backend].fused_ok(st, xs[0]):
            pytest.skip(f"{backend} has no fused kernel for this case")
        sets = [(x, p, s) for x, (p, s) in zip(xs, weights)]
        fn = lambda x, p, s: nf4_matmul(x, p, s, backend=backend)  # noqa: E731
        # a wrong kernel must not report a rate: compare with x @ W.T in float32 once
        w32 = nf4_dequantize(*weights[0], dtype=torch.float32, backend="torch")
        want = xs[0].float() @ w32.t()
        err = ((fn(*sets[0]).float() - want).norm() / want.norm()).item()
        assert err < 2e-2, f"{variant} fused nf4_matmul is wrong here: relative error {err:.3g}"
        del w32, want
    else:
        sets, fn = reference_matmul(variant, xs, weights)
        del weights
    ms = time_ms(fn, sets)
    record(op="nf4_matmul_small_m", direction="fwd", shape=f"M={rows} {shape}",
           backend=variant, ms=ms, bytes=out_f * in_f // 2)
    benchmark.pedantic(fn, args=sets[0], rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("rows", [1, 16])
@pytest.mark.parametrize("variant", ["cuda", "cuda_nopdl", "dense_bf16"])
def bench_nf4_matmul_small_chain(benchmark, record, monkeypatch, variant, rows):
    """Dependent calls as in decoding: x -> up (4096->14336) -> down (14336->4096) -> the
    next pair's x, so each call reads what the one before wrote (PDL can only hide the launch
    and set-up, never the data dependence). Time per call; bytes = one packed weight."""
    n_pairs = 2
    pairs = [(random_weight(14336, 4096, 2 * i), random_weight(4096, 14336, 2 * i + 1))
             for i in range(n_pairs)]
    x0 = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16)
    if variant == "dense_bf16":
        dense = [tuple(nf4_dequantize(p, s, dtype=torch.bfloat16) for p, s in pair)
                 for pair in pairs]
        del pairs

        def chain(x):
            for up, down in dense:
                x = (x @ up.t()) @ down.t()
            return x
    else:
        need_backend("nf4_matmul", "cuda")
        use_gemv_settings(monkeypatch, CUDA_GEMV_VARIANTS[variant])

        def chain(x):
            for (pu, su), (pd, sd) in pairs:
                x = nf4_matmul(nf4_matmul(x, pu, su, backend="cuda"), pd, sd, backend="cuda")
            return x
    ms = time_ms(chain, [(x0,)]) / (2 * n_pairs)  # two calls per pair
    record(op="nf4_matmul_small_m_chain", direction="fwd", shape=f"M={rows} up+down x2",
           backend=variant, ms=ms, bytes=14336 * 4096 // 2)
    benchmark.pedantic(chain, args=(x0,), rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("splits", ["plan", 2, 4, 7, 8, 16, 28])
@pytest.mark.parametrize("rows", [1, 16])
@pytest.mark.parametrize("shape", list(SHAPES))
def bench_nf4_matmul_small_v3_splits(benchmark, record, monkeypatch, shape, rows, splits):
    """v3 with its K split forced (FASTFT_NF4_V3_SPLITS; "plan" = the plan's choice): the data
    to tune nf4_gemv_plan's cost model with (the most work per SM vs the partials' cost)."""
    out_f, in_f = SHAPES[shape]
    need_backend("nf4_matmul", "cuda")
    use_gemv_settings(monkeypatch, {"FASTFT_NF4_GEMV": "v3"} if splits == "plan" else
                      {"FASTFT_NF4_GEMV": "v3", "FASTFT_NF4_V3_SPLITS": str(splits)})
    weights = [random_weight(out_f, in_f, seed) for seed in range(3)]
    xs = [torch.randn(rows, in_f, device="cuda", dtype=torch.bfloat16) for _ in weights]
    sets = [(x, p, s) for x, (p, s) in zip(xs, weights)]
    fn = lambda x, p, s: nf4_matmul(x, p, s, backend="cuda")  # noqa: E731
    w32 = nf4_dequantize(*weights[0], dtype=torch.float32, backend="torch")
    want = xs[0].float() @ w32.t()
    err = ((fn(*sets[0]).float() - want).norm() / want.norm()).item()
    assert err < 2e-2, f"v3 with {splits} splits is wrong here: relative error {err:.3g}"
    del w32, want
    ms = time_ms(fn, sets)
    record(op="nf4_matmul_small_m", direction="fwd", shape=f"M={rows} {shape}",
           backend=f"cuda_v3_splits_{splits}", ms=ms, bytes=out_f * in_f // 2)
    benchmark.pedantic(fn, args=sets[0], rounds=3, warmup_rounds=1)


# ---------------------------------------------------------------- large-M matmul

@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("variant", ["cuda", "triton", "bitsandbytes", "dense_bf16"])
def bench_nf4_matmul_large(benchmark, record, variant, shape):
    rows = 4096
    out_f, in_f = SHAPES[shape]
    weights = [random_weight(out_f, in_f, seed) for seed in range(2)]
    xs = [torch.randn(rows, in_f, device="cuda", dtype=torch.bfloat16) for _ in weights]
    if variant in ("cuda", "triton"):
        need_backend("nf4_matmul", variant)
        sets = [(x, p, s) for x, (p, s) in zip(xs, weights)]
        fn = lambda x, p, s: nf4_matmul(x, p, s, backend=variant)  # noqa: E731
    else:
        sets, fn = reference_matmul(variant, xs, weights)
    ms = time_ms(fn, sets)
    row = record(op="nf4_matmul_large_m", direction="fwd", shape=f"M={rows} {shape}",
                 backend=variant, ms=ms, flops=2 * rows * out_f * in_f)
    if variant != "dense_bf16":  # the same shape as a plain bf16 matmul, in this run
        dense = [(x, torch.randn(out_f, in_f, device="cuda", dtype=torch.bfloat16))
                 for x in xs]
        row["vs_dense_bf16"] = ms / time_ms(lambda x, w: x @ w.t(), dense)
        benchmark.extra_info["vs_dense_bf16"] = row["vs_dense_bf16"]
    benchmark.pedantic(fn, args=sets[0], rounds=3, warmup_rounds=1)
