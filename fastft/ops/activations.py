"""swiglu / geglu: h = act(gate) * up, with a backward that reuses the saved gate/up buffers.

    swiglu(gate, up)                       act = SiLU
    geglu(gate, up, approximate="none")    act = GELU (erf);  approximate="tanh": GELU (tanh)

gate and up have the same shape [..., intermediate] with a contiguous last dim; rows may be
strided, so they can be two halves of one fused [..., 2 * intermediate] gate_up projection
(Phi-3's `gate, up = gate_up.chunk(2, -1)`). Math is float32 (float64 stays float64 in the
reference); h has gate's dtype.

Backward consumes its inputs: with inplace_backward=True (default) d_gate is written into the
gate buffer the forward saved and d_up into the up buffer, so the MLP backward allocates no
[tokens, intermediate] tensors of its own. That happens only where it is safe: both buffers are
intermediate results of autograd (never a leaf, e.g. a tensor the caller made or a parameter,
nor a view of one) and gate and up share no element; otherwise new gradient tensors are
allocated, as with inplace_backward=False. The version counters of overwritten buffers are
bumped, so another autograd node that saved the same gate/up fails loudly rather than reading
gradients (and so does a second backward through a retained graph: use
inplace_backward=False there). Under torch.compile the backward is out of place.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from fastft import dispatch
from fastft.ops import _common
from fastft.ops._common import cuda_ops, new_empty, rows_view

# Activation codes shared with the Triton and CUDA kernels.
ACTS = {"silu": 0, "gelu": 1, "gelu_tanh": 2}
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GELU_TANH_C = 0.044715


def _math(t):
    """At least float32 (float64 stays float64, so the reference can be checked in it)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


# ---------------------------------------------------------------- the torch reference

def reference_glu(gate, up, act):
    """Differentiable plain-torch act(gate) * up in float32 math: the oracle for the tests."""
    g = _math(gate)
    if act == "silu":
        a = F.silu(g)
    elif act == "gelu":
        a = F.gelu(g)
    elif act == "gelu_tanh":
        a = F.gelu(g, approximate="tanh")
    else:
        raise ValueError(f"unknown activation {act!r}; use one of {sorted(ACTS)}")
    return (a * _math(up)).to(gate.dtype)


def reference_swiglu(gate, up):
    return reference_glu(gate, up, "silu")


def reference_geglu(gate, up, approximate="none"):
    return reference_glu(gate, up, _geglu_act(approximate))


def _act_and_grad(g, act):
    """act(g) and act'(g) by explicit formulas (what the kernels compute)."""
    if act == "silu":
        s = torch.sigmoid(g)
        return g * s, s * (1 + g * (1 - s))
    if act == "gelu":
        cdf = 0.5 * (1 + torch.erf(g * (1 / math.sqrt(2.0))))
        return g * cdf, cdf + g * torch.exp(-0.5 * g * g) * _INV_SQRT_2PI
    t = torch.tanh(_SQRT_2_OVER_PI * (g + _GELU_TANH_C * g * g * g))
    grad = 0.5 * (1 + t) + 0.5 * g * (1 - t * t) * _SQRT_2_OVER_PI * (
        1 + 3 * _GELU_TANH_C * g * g)
    return 0.5 * g * (1 + t), grad


# ---------------------------------------------------------------- backends
# forward(gate, up, out, act): [rows, I] views, contiguous last dim; out is new.
# backward(dh, gate, up, d_gate, d_up, act, h=None): d_gate and d_up both None: write into gate
# and up. h (caller-allocated, or dh itself; never gate / up) also receives act(gate) * up, in
# the same pass: for callers that need the forward's output and the gradients together (the
# fused LoRA MLP backward recomputes h there instead of running the forward kernel first).

class _TorchBackend:
    @staticmethod
    def forward(gate, up, out, act):
        a, _ = _act_and_grad(_math(gate), act)
        out.copy_(a * _math(up))

    @staticmethod
    def backward(dh, gate, up, d_gate, d_up, act, *, h=None):
        g, u, d = _math(gate), _math(up), _math(dh)
        a, da = _act_and_grad(g, act)
        # everything computed before any buffer (gate, up, dh when h is dh) is overwritten
        dg, du = d * u * da, d * a
        out = a * u if h is not None else None
        (gate if d_gate is None else d_gate).copy_(dg)
        (up if d_up is None else d_up).copy_(du)
        if h is not None:
            h.copy_(out)


# Triton launchers as custom ops; the in-place backward is its own op so that every op
# declares exactly what it mutates (a declared mutation bumps the version counter).


@torch.library.custom_op("fastft_triton::glu_fwd", mutates_args=("out",))
def _triton_glu_fwd(gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor, act: int) -> None:
    from fastft.triton_kernels import activations as kernels

    with _common.launch_device(gate):
        kernels.glu_forward(gate, up, out, act)


# The *_h variants also write h = act(gate) * up, in the same kernel. Separate ops instead of
# an optional h: torch 2.11's custom_op drops a defaulted None argument before bumping the
# version of the mutated ones, and then indexes past the end of its argument tuple.
@torch.library.custom_op("fastft_triton::glu_bwd", mutates_args=("d_gate", "d_up"))
def _triton_glu_bwd(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                    d_gate: torch.Tensor, d_up: torch.Tensor, act: int) -> None:
    from fastft.triton_kernels import activations as kernels

    with _common.launch_device(gate):
        kernels.glu_backward(dh, gate, up, d_gate, d_up, act, None)


@torch.library.custom_op("fastft_triton::glu_bwd_h", mutates_args=("d_gate", "d_up", "h"))
def _triton_glu_bwd_h(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                      d_gate: torch.Tensor, d_up: torch.Tensor, act: int, h: torch.Tensor) -> None:
    from fastft.triton_kernels import activations as kernels

    with _common.launch_device(gate):
        kernels.glu_backward(dh, gate, up, d_gate, d_up, act, h)


@torch.library.custom_op("fastft_triton::glu_bwd_inplace", mutates_args=("gate", "up"))
def _triton_glu_bwd_inplace(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                            act: int) -> None:
    from fastft.triton_kernels import activations as kernels

    with _common.launch_device(gate):
        kernels.glu_backward(dh, gate, up, gate, up, act, None)


@torch.library.custom_op("fastft_triton::glu_bwd_inplace_h", mutates_args=("gate", "up", "h"))
def _triton_glu_bwd_inplace_h(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                              act: int, h: torch.Tensor) -> None:
    from fastft.triton_kernels import activations as kernels

    with _common.launch_device(gate):
        kernels.glu_backward(dh, gate, up, gate, up, act, h)


@_triton_glu_fwd.register_fake
def _(gate, up, out, act):
    return None


@_triton_glu_bwd.register_fake
def _(dh, gate, up, d_gate, d_up, act):
    return None


@_triton_glu_bwd_h.register_fake
def _(dh, gate, up, d_gate, d_up, act, h):
    return None


@_triton_glu_bwd_inplace.register_fake
def _(dh, gate, up, act):
    return None


@_triton_glu_bwd_inplace_h.register_fake
def _(dh, gate, up, act, h):
    return None


class _TritonBackend:
    @staticmethod
    def forward(gate, up, out, act):
        _triton_glu_fwd(gate, up, out, ACTS[act])

    @staticmethod
    def backward(dh, gate, up, d_gate, d_up, act, *, h=None):
        if d_gate is None:
            if h is None:
                _triton_glu_bwd_inplace(dh, gate, up, ACTS[act])
            else:
                _triton_glu_bwd_inplace_h(dh, gate, up, ACTS[act], h)
        elif h is None:
            _triton_glu_bwd(dh, gate, up, d_gate, d_up, ACTS[act])
        else:
            _triton_glu_bwd_h(dh, gate, up, d_gate, d_up, ACTS[act], h)


class _CudaBackend:
    @staticmethod
    def forward(gate, up, out, act):
        cuda_ops().glu_fwd(gate, up, out, ACTS[act])

    @staticmethod
    def backward(dh, gate, up, d_gate, d_up, act, *, h=None):
        if d_gate is None:
            cuda_ops().glu_bwd_inplace(dh, gate, up, ACTS[act], h)
        else:
            cuda_ops().glu_bwd(dh, gate, up, d_gate, d_up, ACTS[act], h)


_BACKENDS = {"torch": _TorchBackend, "triton": _TritonBackend, "cuda": _CudaBackend}
for _op in ("swiglu", "geglu"):
    dispatch.register(_op, "torch", _TorchBackend)
    dispatch.register(_op, "triton", _TritonBackend)
    if cuda_ops() is not None:
        dispatch.register(_op, "cuda", _CudaBackend)
if cuda_ops() is not None:
    for _name in ("glu_fwd", "glu_bwd", "glu_bwd_inplace"):
        torch.library.register_fake(f"fastft::{_name}")(lambda *args, **kwargs: None)


# ---------------------------------------------------------------- memory-safety helpers

def _no_internal_overlap(t):
    """True when no two elements of t share memory (a sufficient test on sizes and strides)."""
    dims = sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz > 1)
    reach = 0
    for st, sz in dims:
        if st <= reach:
            return False
        reach += st * (sz - 1)
    return True


def _disjoint_rows(a, b):
    """True when [rows, I] views a and b share no element (handles the two halves of a fused
    gate_up tensor, whose address ranges interleave)."""
    if a.numel() == 0 or b.numel() == 0:
        return True
    size = a.element_size()
    a_lo, b_lo = a.data_ptr(), b.data_ptr()
    a_hi = a_lo + size * (1 + sum((n - 1) * s for n, s in zip(a.shape, a.stride())))
    b_hi = b_lo + size * (1 + sum((n - 1) * s for n, s in zip(b.shape, b.stride())))
    if a_hi <= b_lo or b_hi <= a_lo:
        return True
    width, row_stride = a.shape[1], a.stride(0)
    if a.stride() != b.stride() or (b_lo - a_lo) % size or a.stride(1) != 1:
        return False
    shift = ((b_lo - a_lo) // size) % row_stride  # b's columns start here within a's rows
    return width <= shift <= row_stride - width


def _consumed(t):
    if not t.is_inference() and not torch.compiler.is_compiling():
        torch.autograd.graph.increment_version(t)


# ---------------------------------------------------------------- autograd op

class _GluFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, act, inplace_backward, backend):
        impl = _BACKENDS[backend]
        g2, u2 = rows_view(gate), rows_view(up)
        out = new_empty(g2.shape, gate.dtype, gate.device)
        impl.forward(g2, u2, out, act)

        def overwritable(t, t2):
            # a copy rows_view made is ours; otherwise only autograd intermediates (views
            # included, but never views of a leaf such as a parameter)
            base = t if t._base is None else t._base
            return t2.data_ptr() != t.data_ptr() or (
                t.grad_fn is not None and base.grad_fn is not None and _no_internal_overlap(t))

        inplace = (inplace_backward and not torch.compiler.is_compiling()
                   and _disjoint_rows(g2, u2))
        # both in place or neither (one launch writes both gradients)
        ctx.inplace = inplace and overwritable(gate, g2) and overwritable(up, u2)
        ctx.save_for_backward(g2, u2)
        ctx.meta = (impl, act, gate.shape)
        return out.view(gate.shape)

    @staticmethod
    def backward(ctx, dh):
        g2, u2 = ctx.saved_tensors
        impl, act, shape = ctx.meta
        dh2 = rows_view(dh)
        if ctx.inplace:
            impl.backward(dh2, g2, u2, None, None, act)
            d_gate, d_up = g2, u2
            _consumed(g2)
            _consumed(u2)
        else:
            d_gate = new_empty(g2.shape, g2.dtype, g2.device)
            d_up = new_empty(u2.shape, u2.dtype, u2.device)
            impl.backward(dh2, g2, u2, d_gate, d_up, act)
        return d_gate.view(shape), d_up.view(shape), None, None, None


def _geglu_act(approximate):
    if approximate not in ("none", "tanh"):
        raise ValueError(f"geglu: approximate must be 'none' (erf GELU) or 'tanh', "
                         f"got {approximate!r}")
    return "gelu" if approximate == "none" else "gelu_tanh"


def _glu(op, gate, up, act, inplace_backward, backend):
    if gate.shape != up.shape:
        raise ValueError(f"{op}: gate {tuple(gate.shape)} and up {tuple(up.shape)} must have "
                         f"the same shape")
    if gate.dtype != up.dtype or gate.device != up.device:
        raise ValueError(f"{op}: gate and up must share dtype and device, got {gate.dtype} on "
                         f"{gate.device} and {up.dtype} on {up.device}")
    if gate.dim() == 0:
        raise ValueError(f"{op}: gate and up need at least one dimension")
    chosen = dispatch.backend_for(op, gate.device, gate.dtype, backend)
    return _GluFunction.apply(gate, up, act, bool(inplace_backward), chosen)


def swiglu(gate, up, *, inplace_backward=True, backend=None):
    """silu(gate) * up. Backward writes d_gate / d_up into gate / up when safe (module doc)."""
    return _glu("swiglu", gate, up, "silu", inplace_backward, backend)


def geglu(gate, up, approximate="none", *, inplace_backward=True, backend=None):
    """gelu(gate) * up, GELU with erf (approximate="none") or tanh (approximate="tanh")."""
    return _glu("geglu", gate, up, _geglu_act(approximate), inplace_backward, backend)
