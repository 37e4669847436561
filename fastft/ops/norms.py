"""rms_norm and layer_norm: torch reference, Triton and CUDA backends behind one autograd op.

rms_norm(x, weight, eps, offset):  y = x / sqrt(mean(x^2) + eps) * (offset + weight)
  offset=1.0 gives Gemma's (1 + w) scaling. Math is float32 whatever the input dtype; the
  output has x's dtype. dW is computed only when weight.requires_grad (frozen weights skip it).
layer_norm(x, weight, bias, eps):  y = (x - mean) / sqrt(var + eps) * weight + bias
"""
from __future__ import annotations

import torch

from fastft import dispatch
from fastft.ops import _common
from fastft.ops._common import cuda_ops, new_empty, rows_view, triton_programs


# ---------------------------------------------------------------- the torch reference

def _math(t):
    """At least float32 (float64 stays float64, so the reference can be checked in it)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def reference_rms_norm(x, weight, eps=1e-6, offset=0.0):
    """Differentiable plain-torch RMSNorm (float32 math): the oracle for the tests."""
    xf = _math(x)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * (_math(weight) + offset)).to(x.dtype)


def reference_layer_norm(x, weight, bias, eps=1e-5):
    """Differentiable plain-torch LayerNorm (float32 math)."""
    xf = _math(x)
    mean = xf.mean(-1, keepdim=True)
    xc = xf - mean
    y = xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * _math(weight)
    if bias is not None:
        y = y + _math(bias)
    return y.to(x.dtype)


class _TorchBackend:
    """The reference as a backend: explicit forward and backward formulas in float32."""

    @staticmethod
    def forward(x, w, b, eps, offset, is_rms):
        xf = _math(x)
        mean = None if is_rms else xf.mean(-1)
        xc = xf if is_rms else xf - mean[:, None]
        rstd = torch.rsqrt(xc.pow(2).mean(-1) + eps)
        y = xc * rstd[:, None]
        if w is not None:
            y = y * (_math(w) + offset)
        if b is not None:
            y = y + _math(b)
        return y.to(x.dtype), mean, rstd

    @staticmethod
    def backward(dy, x, w, mean, rstd, offset, is_rms, need_dw, need_db):
        xf, dyf = _math(x), _math(dy)
        xhat = (xf if is_rms else xf - mean[:, None]) * rstd[:, None]
        g = dyf * (_math(w) + offset) if w is not None else dyf
        dx = g - xhat * (g * xhat).mean(-1, keepdim=True)
        if not is_rms:
            dx = dx - g.mean(-1, keepdim=True)
        dx = (dx * rstd[:, None]).to(x.dtype)
        dw = (dyf * xhat).sum(0) if need_dw else None
        db = dyf.sum(0) if need_db else None
        return dx, dw, db


def _outputs(x, is_rms):
    rows = x.shape[0]
    y = new_empty(x.shape, x.dtype, x.device)
    mean = None if is_rms else new_empty((rows,), torch.float32, x.device)
    rstd = new_empty((rows,), torch.float32, x.device)
    return y, mean, rstd


class _CudaBackend:
    @staticmethod
    def forward(x, w, b, eps, offset, is_rms):
        y, mean, rstd = _outputs(x, is_rms)
        if is_rms:
            cuda_ops().rms_norm_fwd(x, w, y, rstd, eps, offset)
        else:
            cuda_ops().layer_norm_fwd(x, w, b, y, mean, rstd, eps)
        return y, mean, rstd

    @staticmethod
    def backward(dy, x, w, mean, rstd, offset, is_rms, need_dw, need_db):
        dx = new_empty(x.shape, x.dtype, x.device)
        dw = new_empty(w.shape, w.dtype, w.device) if need_dw else None
        db = new_empty((x.shape[1],), w.dtype if w is not None else x.dtype, x.device) \
            if need_db else None
        if is_rms:
            cuda_ops().rms_norm_bwd(dy, x, w, rstd, dx, dw, offset)
        else:
            cuda_ops().layer_norm_bwd(dy, x, w, mean, rstd, dx, dw, db)
        return dx, dw, db


# Triton launchers wrapped as custom ops so torch.compile and opcheck see a schema.
@torch.library.custom_op("fastft_triton::norm_fwd", mutates_args=("y", "mean", "rstd"))
def _triton_norm_fwd(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                     y: torch.Tensor, mean: torch.Tensor | None, rstd: torch.Tensor, eps: float,
                     offset: float, is_rms: bool) -> None:
    from fastft.triton_kernels import norms

    with _common.launch_device(x):
        norms.norm_forward(x, weight, bias, y, mean, rstd, eps, offset, is_rms)


@torch.library.custom_op("fastft_triton::norm_bwd",
                         mutates_args=("dx", "dw_partial", "db_partial"))
def _triton_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None,
                     mean: torch.Tensor | None, rstd: torch.Tensor, dx: torch.Tensor,
                     dw_partial: torch.Tensor | None, db_partial: torch.Tensor | None,
                     offset: float, is_rms: bool) -> None:
    from fastft.triton_kernels import norms

    with _common.launch_device(x):
        norms.norm_backward(dy, x, weight, mean, rstd, dx, dw_partial, db_partial, offset, is_rms)


class _TritonBackend:
    @staticmethod
    def forward(x, w, b, eps, offset, is_rms):
        y, mean, rstd = _outputs(x, is_rms)
        _triton_norm_fwd(x, w, b, y, mean, rstd, eps, offset, is_rms)
        return y, mean, rstd

    @staticmethod
    def backward(dy, x, w, mean, rstd, offset, is_rms, need_dw, need_db):
        rows, hidden = x.shape
        dx = new_empty(x.shape, x.dtype, x.device)
        programs = triton_programs(x.device, rows) if (need_dw or need_db) else rows
        f32 = torch.float32
        dwp = new_empty((programs, hidden), f32, x.device) if need_dw else None
        dbp = new_empty((programs, hidden), f32, x.device) if need_db else None
        _triton_norm_bwd(dy, x, w, mean, rstd, dx, dwp, dbp, offset, is_rms)
        dw = dwp.sum(0) if need_dw and rows else (torch.zeros(hidden, device=x.device)
                                                    if need_dw else None)
        db = dbp.sum(0) if need_db and rows else (torch.zeros(hidden, device=x.device)
                                                    if need_db else None)
        return dx, dw, db


_BACKENDS = {"torch": _TorchBackend, "triton": _TritonBackend, "cuda": _CudaBackend}
for _op in ("rms_norm", "layer_norm"):
    dispatch.register(_op, "torch", _TorchBackend)
    dispatch.register(_op, "triton", _TritonBackend)
    if cuda_ops() is not None:
        dispatch.register(_op, "cuda", _CudaBackend)


def _kernel_param(p, x):
    """Kernels take weights in x's dtype or float32; anything else is cast (grad cast back)."""
    if p is None or p.dtype in (x.dtype, torch.float32):
        return p
    return p.to(x.dtype)


class _NormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, offset, is_rms, backend):
        impl = _BACKENDS[backend]
        x2 = rows_view(x)
        w = _kernel_param(weight, x) if backend != "torch" else weight
        b = _kernel_param(bias, x) if backend != "torch" else bias
        y, mean, rstd = impl.forward(x2, w, b, eps, offset, is_rms)
        ctx.save_for_backward(x2, w, mean, rstd)
        ctx.meta = (impl, offset, is_rms, x.shape, weight, bias)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, w, mean, rstd = ctx.saved_tensors
        impl, offset, is_rms, shape, weight, bias = ctx.meta
        need_dw = weight is not None and ctx.needs_input_grad[1]
        need_db = bias is not None and ctx.needs_input_grad[2]
        dx, dw, db = impl.backward(rows_view(dy), x2, w, mean, rstd, offset, is_rms, need_dw,
                                   need_db)
        if dw is not None:
            dw = dw.to(weight.dtype)
        if db is not None:
            db = db.to(bias.dtype)
        return dx.view(shape), dw, db, None, None, None, None


def rms_norm(x, weight, eps=1e-6, offset=0.0, *, backend=None):
    """RMSNorm over the last dim. offset=1.0 for Gemma's (1 + weight)."""
    chosen = dispatch.backend_for("rms_norm", x.device, x.dtype, backend)
    return _NormFunction.apply(x, weight, None, float(eps), float(offset), True, chosen)


def layer_norm(x, weight, bias, eps=1e-5, *, backend=None):
    """LayerNorm over the last dim; weight and bias may be None."""
    chosen = dispatch.backend_for("layer_norm", x.device, x.dtype, backend)
    return _NormFunction.apply(x, weight, bias, float(eps), 0.0, False, chosen)


# Fake (meta) implementations: shapes only, so torch.compile can trace through the ops.
@_triton_norm_fwd.register_fake
def _(x, weight, bias, y, mean, rstd, eps, offset, is_rms):
    return None


@_triton_norm_bwd.register_fake
def _(dy, x, weight, mean, rstd, dx, dw_partial, db_partial, offset, is_rms):
    return None


if cuda_ops() is not None:
    for _name in ("rms_norm_fwd", "rms_norm_bwd", "layer_norm_fwd", "layer_norm_bwd"):
        torch.library.register_fake(f"fastft::{_name}")(lambda *args, **kwargs: None)
