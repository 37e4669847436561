"""Cross-entropy loss and its gradient over [rows, vocab] logits, one program per row.

Pass 1 walks the row in BLOCK-wide chunks keeping an online max / sum of exponentials (and the
sum of the transformed logits for label smoothing); pass 2 walks it again writing
d row_loss / d logits * row_weight. The gradient may be written over the logits themselves:
every element is read before the same program overwrites it."""
import os

import torch
import triton
import triton.language as tl


@triton.jit
def _tanh(u):
    # 1 - 2 / (exp(2u) + 1): saturates correctly to +-1 for large |u|
    return 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)


@triton.jit
def _transform(x, softcap, scale, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    z = x
    if HAS_SCALE:
        z = z * scale
    if HAS_SOFTCAP:
        z = softcap * _tanh(z / softcap)
    return z


@triton.jit
def _cross_entropy_kernel(X, Labels, Loss, G, RowWeight, x_stride, g_stride, w_stride, V, rows,
                          ignore_index, softcap, scale, smoothing,
                          HAS_GRAD: tl.constexpr, HAS_SCALE: tl.constexpr,
                          HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
                          BLOCK: tl.constexpr):
    # Programs stride over the rows: one row each when the grid has a program per row, or a
    # fixed number of programs per SM (fewer rows in flight, so each stays in L2 between passes).
    first = tl.program_id(0).to(tl.int64)
    step = tl.num_programs(0)
    for i in range(0, tl.cdiv(rows - tl.program_id(0), step)):
        _one_row(first + i * step, X, Labels, Loss, G, RowWeight, x_stride, g_stride, w_stride,
                 V, ignore_index, softcap, scale, smoothing, HAS_GRAD, HAS_SCALE, HAS_SOFTCAP,
                 HAS_SMOOTHING, BLOCK)


@triton.jit
def _one_row(row, X, Labels, Loss, G, RowWeight, x_stride, g_stride, w_stride, V, ignore_index,
             softcap, scale, smoothing, HAS_GRAD: tl.constexpr, HAS_SCALE: tl.constexpr,
             HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr, BLOCK: tl.constexpr):
    cols = tl.arange(0, BLOCK)
    x_row = X + row * x_stride
    label = tl.load(Labels + row)
    valid = label != ignore_index
    in_range = (label >= 0) & (label < V)

    lse = 0.0
    if valid:
        m = float("-inf")
        s = 0.0
        z_sum = 0.0
        for start in range(0, V, BLOCK):
            c = start + cols
            mask = c < V
            # keep the row in L2 for pass 2
            x = tl.load(x_row + c, mask=mask, other=0.0, eviction_policy="evict_last")
            x = x.to(tl.float32)
            z = tl.where(mask, _transform(x, softcap, scale, HAS_SCALE, HAS_SOFTCAP),
                         float("-inf"))
            m_new = tl.maximum(m, tl.max(z, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
            m = m_new
            if HAS_SMOOTHING:
                z_sum += tl.sum(tl.where(mask, z, 0.0), axis=0)
        lse = m + tl.log(s)
        safe_label = tl.where(in_range, label, 0)
        x_y = tl.load(x_row + safe_label).to(tl.float32)
        z_y = _transform(x_y, softcap, scale, HAS_SCALE, HAS_SOFTCAP)
        # a label outside [0, V) gives a NaN loss rather than a silently wrong one
        z_y = tl.where(in_range, z_y, float("nan"))
        loss = lse - (1.0 - smoothing) * z_y
        if HAS_SMOOTHING:
            loss = loss - smoothing / V * z_sum
        tl.store(Loss + row, loss)
    else:
        tl.store(Loss + row, 0.0)

    if HAS_GRAD:
        g_row = G + row * g_stride
        w = tl.load(RowWeight + row * w_stride).to(tl.float32)
        w = tl.where(valid, w, 0.0)
        for start in range(0, V, BLOCK):
            c = start + cols
            mask = c < V
            x = tl.load(x_row + c, mask=mask, other=0.0, eviction_policy="evict_first")
            z = x.to(tl.float32)
            if HAS_SCALE:
                z = z * scale
            if HAS_SOFTCAP:
                t = _tanh(z / softcap)
                z = softcap * t
            g = tl.exp(z - lse)
            if HAS_SMOOTHING:
                g = g - smoothing / V
            g = tl.where(c == label, g - (1.0 - smoothing), g) * w
            if HAS_SOFTCAP:
                g = g * (1.0 - t * t)
            if HAS_SCALE:
                g = g * scale
            # ignored rows: w == 0 and exp() of finite values, so exact zeros
            g = tl.where(valid, g, 0.0)
            tl.store(g_row + c, g.to(G.dtype.element_ty), mask=mask, eviction_policy="evict_first")


def block_size(vocab: int, on_gpu: bool) -> int:
    """Elements per step along a row. FASTFT_CE_TRITON_BLOCK (a power of two) overrides the cap,
    so the benchmark can try more loads in flight per program (e.g. 16384 with one program per
    SM, whose rows then stay in L2 between the two passes)."""
    cap = 8192 if on_gpu else 1024  # the interpreter: small blocks, several of them per row
    forced = int(os.environ.get("FASTFT_CE_TRITON_BLOCK", "0") or 0)
    if forced > 0:
        if forced & (forced - 1) or forced < 16:
            raise ValueError(f"FASTFT_CE_TRITON_BLOCK must be a power of two >= 16, got {forced}")
        cap = forced
    return min(cap, triton.next_power_of_2(max(vocab, 16)))


def programs(rows: int, device) -> int:
    """Grid size: a program per row, or FASTFT_CE_TRITON_PROGRAMS_PER_SM per SM when set (the
    benchmark compares both)."""
    per_sm = int(os.environ.get("FASTFT_CE_TRITON_PROGRAMS_PER_SM", "0") or 0)
    if per_sm <= 0:
        return rows
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        sms = 2  # the interpreter: a couple of programs, each looping over rows
    return max(1, min(rows, sms * per_sm))


def loss_and_grad(logits, labels, loss, grad, row_weight, ignore_index, softcap, scale,
                  smoothing):
    """logits [rows, V] (contiguous last dim); labels int64 [rows]; loss float32 [rows] out;
    grad: None, a [rows, V] output or `logits` itself; row_weight float32 of 1 or rows
    elements (needed with grad)."""
    rows, vocab = logits.shape
    if rows == 0:
        return
    on_gpu = logits.is_cuda
    block = block_size(vocab, on_gpu)
    has_grad = grad is not None
    _cross_entropy_kernel[(programs(rows, logits.device),)](
        logits, labels, loss, grad if has_grad else logits,
        row_weight if row_weight is not None else loss,
        logits.stride(0), grad.stride(0) if has_grad else 0,
        1 if row_weight is not None and row_weight.numel() > 1 else 0, vocab, rows,
        ignore_index, softcap if softcap else 1.0, scale, smoothing,
        HAS_GRAD=has_grad, HAS_SCALE=scale != 1.0, HAS_SOFTCAP=bool(softcap),
        HAS_SMOOTHING=smoothing != 0.0, BLOCK=block,
        num_warps=(16 if block >= 8192 else 8) if on_gpu else 4)


@triton.jit
def _scale_unless_one_kernel(G, Scale, n, BLOCK: tl.constexpr):
    # The scale is read on the device: no host sync, capturable in a CUDA graph; when it is 1
    # (the usual loss.backward()) every program exits after one load.
    scale = tl.load(Scale).to(tl.float32)
    if scale != 1.0:
        first = tl.program_id(0).to(tl.int64) * BLOCK
        step = tl.num_programs(0).to(tl.int64) * BLOCK
        for start in range(first, n, step):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < n
            g = tl.load(G + offs, mask=mask, other=0.0)
            # float32 math and one rounding (to nearest even on the GPU)
            tl.store(G + offs, (g.to(tl.float32) * scale).to(G.dtype.element_ty), mask=mask)


def scale_unless_one(t, scale):
    """t *= scale (t contiguous; scale a one-element float32 tensor on t's device), skipping the
    pass over t when scale == 1 without the host reading the scale."""
    assert t.is_contiguous() and scale.numel() == 1 and scale.device == t.device
    n = t.numel()
    if n == 0:
        return
    block = 4096 if t.is_cuda else 256
    if t.is_cuda:
        sms = torch.cuda.get_device_properties(t.device).multi_processor_count
        grid = min(triton.cdiv(n, block), sms * 4)
    else:
        grid = min(triton.cdiv(n, block), 3)  # the interpreter: a few programs, several steps
    _scale_unless_one_kernel[(grid,)](t, scale, n, BLOCK=block,
                                      num_warps=8 if t.is_cuda else 4)
