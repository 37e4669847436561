"""NF4 (bitsandbytes layout) dequantisation and the fused small-M dequant-matmul.

Layout: flat weight, two 4-bit codes per byte (even flat index in the high nibble), one scale
per `blocksize` values; nested scales are code2[q] * absmax2[block >> log2(blocksize2)] + offset.
Both kernels are launched with enable_fp_fusion=False: the nested scale's multiply and add must
round separately (as bitsandbytes computes them) for the dequantised values to be bit-exact.
"""
import os

import triton
import triton.language as tl

_BYTES_PER_ROW = 16  # a row of the dequantisation tile: 32 values, always inside one block


@triton.jit
def _block_scale(Absmax, Absmax2, Code2, Offset, blk, mask, BS2_LOG2, NESTED: tl.constexpr):
    if NESTED:
        q = tl.load(Absmax + blk, mask=mask, other=0).to(tl.int32)
        scale = tl.load(Code2 + q, mask=mask, other=0.0) * \
            tl.load(Absmax2 + (blk >> BS2_LOG2), mask=mask, other=0.0)
        scale = scale + tl.load(Offset)
    else:
        scale = tl.load(Absmax + blk, mask=mask, other=0.0)
    return scale


@triton.jit
def _round_to(v, dtype: tl.constexpr, INTERPRETER: tl.constexpr):
    """v (float32) converted to `dtype` with round-to-nearest-even. The Triton interpreter's own
    downcast does not round to nearest even, so there (INTERPRETER) v is first rounded onto
    the dtype's grid by adding and subtracting 1.5 * 2^(e + 23 - mantissa bits), which float32
    addition rounds to nearest even; the cast is then exact. (INTERPRETER: running under it.)"""
    if INTERPRETER and dtype != tl.float32:
        if dtype == tl.bfloat16:
            SHIFT: tl.constexpr = 16   # 23 - 7 mantissa bits
            MIN_FIELD: tl.constexpr = 1
        else:
            SHIFT: tl.constexpr = 13   # 23 - 10 mantissa bits
            MIN_FIELD: tl.constexpr = 113  # below 2^-14 float16 is subnormal: a fixed 2^-24 grid
        field = (v.to(tl.uint32, bitcast=True) >> 23) & 0xFF
        field = tl.maximum(field, MIN_FIELD)
        s = (((field + SHIFT) << 23) | (1 << 22)).to(tl.float32, bitcast=True)
        v = (v + s) - s
    return v.to(dtype)


@triton.jit
def _nf4_dequant(P, Absmax, Absmax2, Code2, Offset, Code, Out, numel, n_bytes, BS_LOG2,
                 BS2_LOG2, NESTED: tl.constexpr, ROWS: tl.constexpr,
                 INTERPRETER: tl.constexpr):
    # one program: ROWS x 16 packed bytes -> ROWS x 32 values
    pid = tl.program_id(0).to(tl.int64)
    row = pid * ROWS + tl.arange(0, ROWS).to(tl.int64)
    col = tl.arange(0, 16)
    byte = row[:, None] * 16 + col[None, :]
    b = tl.load(P + byte, mask=byte < n_bytes, other=0).to(tl.int32)
    blk = (row * 32) >> BS_LOG2
    scale = _block_scale(Absmax, Absmax2, Code2, Offset, blk, row * 16 < n_bytes, BS2_LOG2,
                         NESTED)
    hi = tl.load(Code + (b >> 4)) * scale[:, None]
    lo = tl.load(Code + (b & 15)) * scale[:, None]
    vals = tl.interleave(hi, lo)  # [ROWS, 32]: even flat index from the high nibble
    idx = row[:, None] * 32 + tl.arange(0, 32)[None, :]
    tl.store(Out + idx, _round_to(vals, Out.dtype.element_ty, INTERPRETER), mask=idx < numel)


@triton.jit
def _nf4_gemv(X, P, Absmax, Absmax2, Code2, Offset, Code, Bias, Y, M, N, K, x_stride,
              y_stride, k_per_split, BS_LOG2, BS2_LOG2, NESTED: tl.constexpr,
              HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INTERPRETER: tl.constexpr):
    # y[m, n] = sum_k x[m, k] * W[n, k]; W rows are K/2 bytes (K % BLOCK_K == 0). With SPLIT,
    # program (i, j) sums k in [j * k_per_split, (j + 1) * k_per_split) into float32 partials
    # Y[j, m, n] (summed by the launcher: deterministic, unlike atomics).
    pid = tl.program_id(0)
    split = tl.program_id(1)
    n = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    m = tl.arange(0, BLOCK_M)
    m_mask = m < M
    half = tl.arange(0, BLOCK_K // 2)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_start = split * k_per_split
    for k0 in range(k_start, k_start + k_per_split, BLOCK_K):
        byte = n[:, None] * (K // 2) + (k0 // 2 + half)[None, :]
        b = tl.load(P + byte, mask=n_mask[:, None], other=0).to(tl.int32)
        # one scale per 32 values (16 bytes; K % 64 == 0 and blocksize >= 32 keep each group in
        # one block), gathered per group and broadcast, not three gathers per byte
        grp = n[:, None] * K + k0 + tl.arange(0, BLOCK_K // 32)[None, :] * 32
        scale_g = _block_scale(Absmax, Absmax2, Code2, Offset, grp >> BS_LOG2, n_mask[:, None],
                               BS2_LOG2, NESTED)
        scale = tl.reshape(tl.broadcast_to(scale_g[:, :, None], (BLOCK_N, BLOCK_K // 32, 16)),
                           (BLOCK_N, BLOCK_K // 2))
        hi = tl.load(Code + (b >> 4)) * scale
        lo = tl.load(Code + (b & 15)) * scale
        # [BLOCK_N, BLOCK_K], rounded exactly as nf4_dequantize rounds W
        w = _round_to(tl.interleave(hi, lo), X.dtype.element_ty, INTERPRETER)
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + m[:, None] * x_stride + k[None, :], mask=m_mask[:, None], other=0.0)
        if INTERPRETER:  # its dot multiplies bfloat16 bit patterns as integers: use float32
            acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)))
        else:
            acc += tl.dot(x, tl.trans(w))
    mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT:
        tl.store(Y + split.to(tl.int64) * M * N + m[:, None] * N + n[None, :], acc, mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(Bias + n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        out = Y + m[:, None] * y_stride + n[None, :]
        tl.store(out, _round_to(acc, Y.dtype.element_ty, INTERPRETER), mask=mask)


def _interpreted():
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _log2(v):
    return v.bit_length() - 1


def dequantize(packed, absmax, absmax2, code2, offset, code, blocksize, blocksize2, numel, out):
    """packed: uint8 flat; out: flat, numel elements written."""
    n_bytes = (numel + 1) // 2
    rows = 256  # 4 KB packed in, 16 KB bf16 out per program: fewer, longer programs
    grid = (triton.cdiv(triton.cdiv(n_bytes, _BYTES_PER_ROW), rows),)
    nested = absmax2 is not None
    # Measured on the H200 at 14336x4096, bf16 (run 279): nested 39.2 us with 8 warps against
    # 40.1 with 4; plain float32 absmax 44.3-44.8 us with 8 warps against 40.4-40.7 with 4.
    warps = 8 if nested else 4
    _nf4_dequant[grid](packed, absmax, absmax2 if nested else absmax,
                       code2 if nested else code, offset if nested else code, code, out, numel,
                       n_bytes, _log2(blocksize), _log2(blocksize2) if nested else 0,
                       NESTED=nested, ROWS=rows, INTERPRETER=_interpreted(), num_warps=warps,
                       enable_fp_fusion=False)


def gemv_block_k(K):
    """The K tile of the fused kernel, or None when K is not a multiple of one."""
    for bk in (128, 64):
        if K % bk == 0:
            return bk
    return None


def _splits(N, K, block_n, block_k, device):
    """How many K ranges to split into so that the grid fills the GPU (a few programs per SM)."""
    programs = triton.cdiv(N, block_n)
    chunks = K // block_k
    if device.type == "cuda":
        import torch

        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 2 * programs  # the interpreter: exercise the split path on small shapes
    split = max(1, min(chunks, triton.cdiv(target, programs)))
    while chunks % split:  # equal ranges, each a whole number of K tiles
        split -= 1
    return split


def gemv(x, packed, absmax, absmax2, code2, offset, code, bias, blocksize, blocksize2, y):
    """x: [M <= 16, K] (last dim contiguous), y: [M, N]; W: [N, K] packed, K % 64 == 0."""
    import torch

    M, K = x.shape
    N = y.shape[1]
    block_k = gemv_block_k(K)
    block_n = 32
    nested = absmax2 is not None
    split = _splits(N, K, block_n, block_k, x.device)
    out = y if split == 1 else torch.empty((split, M, N), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(N, block_n), split)
    _nf4_gemv[grid](x, packed, absmax, absmax2 if nested else absmax,
                    code2 if nested else code, offset if nested else code, code,
                    bias if bias is not None else y, out, M, N, K, x.stride(0), y.stride(0),
                    K // split, _log2(blocksize), _log2(blocksize2) if nested else 0,
                    NESTED=nested, HAS_BIAS=bias is not None, SPLIT=split > 1, BLOCK_M=16,
                    BLOCK_N=block_n, BLOCK_K=block_k, INTERPRETER=_interpreted(), num_warps=4,
                    enable_fp_fusion=False)
    if split > 1:
        total = out.sum(0)
        if bias is not None:
            total += bias.float()
        y.copy_(total)
