"""RMSNorm / LayerNorm forward and backward over the last dim of [rows, hidden] views."""
import triton
import triton.language as tl


@triton.jit
def _norm_fwd(X, W, B, Y, Mean, Rstd, x_stride, y_stride, H, eps, offset,
              IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
              BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    x = tl.load(X + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    if IS_RMS:
        xc = x
    else:
        mean = tl.sum(x, axis=0) / H
        xc = tl.where(mask, x - mean, 0.0)
        tl.store(Mean + row, mean)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / H + eps)
    tl.store(Rstd + row, rstd)
    y = xc * rstd
    if HAS_W:
        y = y * (tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + offset)
    if HAS_B:
        y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * y_stride + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _norm_bwd(DY, X, W, Mean, Rstd, DX, DWp, DBp, dy_stride, x_stride, dx_stride, rows, H,
              rows_per_prog, offset, IS_RMS: tl.constexpr, HAS_W: tl.constexpr,
              NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    if HAS_W:
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + offset
    else:
        w = tl.where(mask, 1.0, 0.0)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    db = tl.zeros([BLOCK], dtype=tl.float32)
    first = pid.to(tl.int64) * rows_per_prog
    for i in range(0, rows_per_prog):
        row = first + i
        if row < rows:
            x = tl.load(X + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + row * dy_stride + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(Rstd + row)
            if IS_RMS:
                xhat = x * rstd
            else:
                xhat = tl.where(mask, (x - tl.load(Mean + row)) * rstd, 0.0)
            g = dy * w
            c2 = tl.sum(g * xhat, axis=0) / H
            if IS_RMS:
                dx = rstd * (g - xhat * c2)
            else:
                dx = rstd * (g - tl.sum(g, axis=0) / H - xhat * c2)
            tl.store(DX + row * dx_stride + cols, dx.to(DX.dtype.element_ty), mask=mask)
            if NEED_DW:
                dw += dy * xhat
            if NEED_DB:
                db += dy
    if NEED_DW:
        tl.store(DWp + pid.to(tl.int64) * H + cols, dw, mask=mask)
    if NEED_DB:
        tl.store(DBp + pid.to(tl.int64) * H + cols, db, mask=mask)


def _block(hidden):
    return triton.next_power_of_2(max(hidden, 16))


def _warps(block):
    return 4 if block <= 2048 else (8 if block <= 8192 else 16)


def norm_forward(x, weight, bias, y, mean, rstd, eps, offset, is_rms):
    """x, y: [rows, hidden] with a contiguous last dim; mean/rstd: float32 [rows]."""
    rows, hidden = x.shape
    if rows == 0:
        return
    block = _block(hidden)
    _norm_fwd[(rows,)](
        x, weight if weight is not None else x, bias if bias is not None else x, y,
        mean if mean is not None else rstd, rstd, x.stride(0), y.stride(0), hidden, eps, offset,
        IS_RMS=is_rms, HAS_W=weight is not None, HAS_B=bias is not None, BLOCK=block,
        num_warps=_warps(block))


def norm_backward(dy, x, weight, mean, rstd, dx, dw_partial, db_partial, offset, is_rms):
    """dw_partial/db_partial: float32 [programs, hidden] or None; sum them over dim 0."""
    rows, hidden = x.shape
    if rows == 0:
        return
    partial = dw_partial if dw_partial is not None else db_partial
    programs = partial.shape[0] if partial is not None else rows
    rows_per_prog = triton.cdiv(rows, programs)
    block = _block(hidden)
    _norm_bwd[(programs,)](
        dy, x, weight if weight is not None else x, mean if mean is not None else rstd, rstd, dx,
        dw_partial if dw_partial is not None else rstd, db_partial if db_partial is not None else rstd,
        dy.stride(0), x.stride(0), dx.stride(0), rows, hidden, rows_per_prog, offset,
        IS_RMS=is_rms, HAS_W=weight is not None, NEED_DW=dw_partial is not None,
        NEED_DB=db_partial is not None, BLOCK=block, num_warps=_warps(block))
