"""RoPE of q and k in one launch: one program per token rotates every q and k head.

q/k (and their outputs, which may be the same tensors: in place) are [batch, seq, heads,
head_dim] views with a contiguous last dim; cos/sin are [batch, seq, rot_dim] (batch stride 0
when shared). Forward: y1 = x1*c1 - x2*s1, y2 = x2*c2 + x1*s2; backward (the transpose):
y1 = x1*c1 + x2*s2, y2 = x2*c2 - x1*s1, where 1/2 are the two halves of the rotary dims.
Dims past rot_dim are copied only when the output is a different tensor."""
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(X, XO, x_row, xo_row, x_sh, xo_sh, H, HALF, c1, c2, s1, s2,
                  BACKWARD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)[:, None]
    cols = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < H) & (cols < HALF)
    src = X + x_row + heads * x_sh + cols
    dst = XO + xo_row + heads * xo_sh + cols
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    tl.store(dst, y1.to(XO.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, y2.to(XO.dtype.element_ty), mask=mask)


@triton.jit
def _copy_tail(X, XO, x_row, xo_row, x_sh, xo_sh, H, ROT, D,
               BLOCK_H: tl.constexpr, BLOCK_TAIL: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)[:, None]
    cols = ROT + tl.arange(0, BLOCK_TAIL)[None, :]
    mask = (heads < H) & (cols < D)
    x = tl.load(X + x_row + heads * x_sh + cols, mask=mask)
    tl.store(XO + xo_row + heads * xo_sh + cols, x, mask=mask)


@triton.jit
def _rope_kernel(Q, K, QO, KO, COS, SIN,
                 q_sb, q_ss, q_sh, k_sb, k_ss, k_sh,
                 qo_sb, qo_ss, qo_sh, ko_sb, ko_ss, ko_sh,
                 c_sb, c_ss, s_sb, s_ss,
                 SEQ, HQ, HK, HALF, D,
                 BACKWARD: tl.constexpr, COPY_Q_TAIL: tl.constexpr, COPY_K_TAIL: tl.constexpr,
                 BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
                 BLOCK_TAIL: tl.constexpr):
    # grid (seq, batch rows): no 64-bit token / seq division before the loads
    s = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    q_row = b * q_sb + s * q_ss
    qo_row = b * qo_sb + s * qo_ss
    k_row = b * k_sb + s * k_ss
    ko_row = b * ko_sb + s * ko_ss
    cols = tl.arange(0, BLOCK_HALF)[None, :]
    cmask = cols < HALF
    cp = COS + b * c_sb + s * c_ss + cols
    sp = SIN + b * s_sb + s * s_ss + cols
    c1 = tl.load(cp, mask=cmask, other=0.0).to(tl.float32)
    c2 = tl.load(cp + HALF, mask=cmask, other=0.0).to(tl.float32)
    s1 = tl.load(sp, mask=cmask, other=0.0).to(tl.float32)
    s2 = tl.load(sp + HALF, mask=cmask, other=0.0).to(tl.float32)
    _rotate_heads(Q, QO, q_row, qo_row, q_sh, qo_sh, HQ, HALF, c1, c2, s1, s2,
                  BACKWARD, BLOCK_HQ, BLOCK_HALF)
    _rotate_heads(K, KO, k_row, ko_row, k_sh, ko_sh, HK, HALF, c1, c2, s1, s2,
                  BACKWARD, BLOCK_HK, BLOCK_HALF)
    if COPY_Q_TAIL:
        _copy_tail(Q, QO, q_row, qo_row, q_sh, qo_sh, HQ, 2 * HALF, D, BLOCK_HQ, BLOCK_TAIL)
    if COPY_K_TAIL:
        _copy_tail(K, KO, k_row, ko_row, k_sh, ko_sh, HK, 2 * HALF, D, BLOCK_HK, BLOCK_TAIL)


_MAX_GRID_Y = 65535


def _pow2(n):
    return triton.next_power_of_2(max(int(n), 1))


def rope(q, k, cos, sin, q_out, k_out, backward):
    """q, k, q_out, k_out: [batch, seq, heads, head_dim] (q_out may be q: in place);
    cos, sin: [batch, seq, rot_dim] (or [1, seq, rot_dim]), contiguous last dims."""
    batch, seq, hq, head_dim = q.shape
    hk = k.shape[2]
    rot = cos.shape[-1]
    if batch * seq == 0:
        return
    half = rot // 2
    tail = head_dim - rot
    copy_q = tail > 0 and q_out is not q
    copy_k = tail > 0 and k_out is not k
    block_hq, block_hk, block_half = _pow2(hq), _pow2(hk), _pow2(half)
    warps = 4 if block_hq * block_half <= 2048 else 8
    meta = dict(BACKWARD=bool(backward), COPY_Q_TAIL=copy_q, COPY_K_TAIL=copy_k,
                BLOCK_HQ=block_hq, BLOCK_HK=block_hk, BLOCK_HALF=block_half,
                BLOCK_TAIL=_pow2(tail), num_warps=warps)
    if batch <= _MAX_GRID_Y:
        _launch(q, k, cos, sin, q_out, k_out, seq, hq, hk, half, head_dim, meta)
        return
    # batch rows on grid axis 1 (at most 65535 a launch): more rows take further launches
    for b0 in range(0, batch, _MAX_GRID_Y):
        rows = slice(b0, min(batch, b0 + _MAX_GRID_Y))
        _launch(q[rows], k[rows], cos[rows] if cos.shape[0] > 1 else cos,
                sin[rows] if sin.shape[0] > 1 else sin, q_out[rows], k_out[rows],
                seq, hq, hk, half, head_dim, meta)


def _launch(q, k, cos, sin, q_out, k_out, seq, hq, hk, half, head_dim, meta):
    _rope_kernel[(seq, q.shape[0])](
        q, k, q_out, k_out, cos, sin,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        q_out.stride(0), q_out.stride(1), q_out.stride(2),
        k_out.stride(0), k_out.stride(1), k_out.stride(2),
        cos.stride(0) if cos.shape[0] > 1 else 0, cos.stride(1),
        sin.stride(0) if sin.shape[0] > 1 else 0, sin.stride(1),
        seq, hq, hk, half, head_dim, **meta)
