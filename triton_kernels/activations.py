"""h = act(gate) * up and its backward over [rows, I] views (rows may be strided, last dim
contiguous). act: 0 = SiLU, 1 = GELU (erf), 2 = GELU (tanh). Math in float32.

The backward writes d_gate and d_up (and, on request, h itself: one kernel for callers that
need both); each element is read and then written by the same program, so d_gate / d_up may be
the gate / up tensors themselves and h may be dh (in place)."""
import os

import triton
import triton.language as tl

# Constants are written inline: the compiler rejects non-constexpr globals in @jit code and
# the interpreter rejects tl.constexpr ones in arithmetic.


@triton.jit
def _tanh(x):
    # 1 - 2 / (exp(2x) + 1): exact limits at +-inf, no overflow to nan
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _rcp(x, FAST: tl.constexpr):
    if FAST:  # one MUFU.RCP (rel. error ~1 ulp); div.full.f32 adds range checks and scaling
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [x],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:  # the CPU interpreter has no inline asm
        return 1.0 / x


@triton.jit
def _exp2(x, FAST: tl.constexpr):
    if FAST:  # one MUFU.EX2 (rel. error ~2^-22); results below 2^-126 flush to 0
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [x],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:
        return tl.exp2(x)


@triton.jit
def _normal_cdf(g, gg, FAST: tl.constexpr):
    """Phi(g) = 0.5 * erfc(|g| / sqrt 2) for g < 0 (1 - that for g >= 0); gg = g * g.
    erfc(z), z >= 0, is t * exp(-z^2 + P(t)), t = 1 / (1 + z/2), P the degree-9 Chebyshev fit
    of Numerical Recipes' erfcc (relative error < 1.1e-7 in exact arithmetic): branch-free, one
    reciprocal and one exp2. The erf GeGLU forward is bound by instruction issue, so the
    constants are folded: with L = log2(e), 0.5 * erfc(z) = t * 2^(P'(t) - gg * L/2) where
    P' = L * P - 1 (the coefficients below are csrc/activations.cu's times L, the constant
    term's minus 1; tests/test_activations.py checks them against torch's erfc)."""
    t = _rcp(1.0 + tl.abs(g) * 0.35355339059327373, FAST)  # 1 / (1 + |g| / (2 sqrt 2))
    p = 0.246517298 * t - 1.186114945
    p = p * t + 2.147474464
    p = p * t - 1.637753152
    p = p * t + 0.402321582
    p = p * t - 0.268756860
    p = p * t + 0.139630057
    p = p * t + 0.539700616
    p = p * t + 1.442729204
    p = p * t - 2.825748218
    half_erfc = t * _exp2(p - gg * 0.7213475204444817, FAST)
    # the lower tail directly: no 1 - x cancellation for negative g
    return tl.where(g >= 0.0, 1.0 - half_erfc, half_erfc)


@triton.jit
def _act_and_grad(g, ACT: tl.constexpr, FAST: tl.constexpr):
    if ACT == 0:
        s = tl.sigmoid(g)
        a = g * s
        da = s * (1.0 + g * (1.0 - s))
    elif ACT == 1:
        gg = g * g
        cdf = _normal_cdf(g, gg, FAST)
        a = g * cdf
        # pdf = exp(-g^2 / 2) / sqrt(2 pi) = 2^(-gg * L/2) / sqrt(2 pi)
        da = cdf + g * _exp2(gg * -0.7213475204444817, FAST) * 0.3989422804014327
    else:
        t = _tanh(0.7978845608028654 * (g + 0.044715 * g * g * g))
        a = 0.5 * g * (1.0 + t)
        da = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * 0.7978845608028654 * (
            1.0 + 3.0 * 0.044715 * g * g)
    return a, da


@triton.jit
def _glu_fwd(G, U, O, g_stride, u_stride, o_stride, N, col_blocks,
             ACT: tl.constexpr, BLOCK: tl.constexpr, FAST: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    row = pid // col_blocks
    cols = (pid % col_blocks) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    g = tl.load(G + row * g_stride + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * u_stride + cols, mask=mask, other=0.0).to(tl.float32)
    a, _ = _act_and_grad(g, ACT, FAST)
    tl.store(O + row * o_stride + cols, (a * u).to(O.dtype.element_ty), mask=mask)


@triton.jit
def _glu_bwd(DH, G, U, DG, DU, H, dh_stride, g_stride, u_stride, dg_stride, du_stride, h_stride,
             N, col_blocks, ACT: tl.constexpr, BLOCK: tl.constexpr, FAST: tl.constexpr,
             WRITE_H: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    row = pid // col_blocks
    cols = (pid % col_blocks) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    dh = tl.load(DH + row * dh_stride + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + row * g_stride + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * u_stride + cols, mask=mask, other=0.0).to(tl.float32)
    a, da = _act_and_grad(g, ACT, FAST)
    tl.store(DG + row * dg_stride + cols, (dh * u * da).to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + row * du_stride + cols, (dh * a).to(DU.dtype.element_ty), mask=mask)
    if WRITE_H:  # the forward's output too, from the gate and up already loaded
        tl.store(H + row * h_stride + cols, (a * u).to(H.dtype.element_ty), mask=mask)


def _fast_math(t):
    """MUFU reciprocal / exp2 through inline PTX on the GPU; the interpreter has no inline asm."""
    return t.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1"


def _flat(*tensors):
    """All [rows, N] tensors contiguous: treat them as one row (longer blocks, no row math)."""
    return all(t.is_contiguous() for t in tensors)


def _layout(rows, n, block):
    return rows * triton.cdiv(n, block), triton.cdiv(n, block)


def glu_forward(gate, up, out, act):
    rows, n = gate.shape
    if rows * n == 0:
        return
    strides = (gate.stride(0), up.stride(0), out.stride(0))
    if _flat(gate, up, out):
        rows, n, strides = 1, rows * n, (0, 0, 0)
    # 2048 x 4 warps: 16 elements (two 16-byte bf16 vectors) per thread and tensor in flight
    block = 2048 if n >= 2048 else triton.next_power_of_2(n)
    programs, col_blocks = _layout(rows, n, block)
    _glu_fwd[(programs,)](gate, up, out, *strides, n, col_blocks, ACT=int(act), BLOCK=block,
                          FAST=_fast_math(gate), num_warps=4)


def glu_backward(dh, gate, up, d_gate, d_up, act, h=None):
    """d_gate, d_up and, when h is given, h = act(gate) * up (h may be dh itself)."""
    rows, n = gate.shape
    if rows * n == 0:
        return
    write_h = h is not None
    h_arg = h if write_h else d_gate  # not touched when WRITE_H is off
    strides = (dh.stride(0), gate.stride(0), up.stride(0), d_gate.stride(0), d_up.stride(0),
               h_arg.stride(0))
    if _flat(dh, gate, up, d_gate, d_up, h_arg):
        rows, n, strides = 1, rows * n, (0,) * 6
    block = 1024 if n >= 1024 else triton.next_power_of_2(n)
    programs, col_blocks = _layout(rows, n, block)
    _glu_bwd[(programs,)](dh, gate, up, d_gate, d_up, h_arg, *strides, n, col_blocks,
                          ACT=int(act), BLOCK=block, FAST=_fast_math(gate), WRITE_H=write_h,
                          num_warps=4)
