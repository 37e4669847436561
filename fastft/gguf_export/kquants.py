"""fastft's own GGML quantisers, in torch (CPU or CUDA tensors, vectorised).

The `gguf` package can dequantise the K-quants but not produce them, so Q4_K, Q5_K and Q6_K
are written here, byte for byte in ggml's block layouts (QK_K = 256 values per super-block):

    block_q4_K (144 B): d f16 | dmin f16 | scales[12] (8 x 6-bit scale, 8 x 6-bit min) | qs[128]
    block_q5_K (176 B): d f16 | dmin f16 | scales[12] | qh[32] (5th bits) | qs[128]
    block_q6_K (210 B): ql[128] (low 4 bits) | qh[64] (high 2 bits) | scales[16] int8 | d f16

A Q4_K/Q5_K value is  d*sc[j]*q - dmin*m[j]  (sub-blocks j of 32 values, q unsigned);
a Q6_K value is  d*sc[j]*(q - 32)  (sub-blocks j of 16 values).

Scales are chosen per sub-block by a small search over candidate step sizes, each followed by
a weighted least-squares refit of scale (and offset), keeping the candidate with the lowest
weighted error -- the same kind of search llama.cpp's reference quantiser performs, so the
error is on par with llama-quantize without an importance matrix. Q8_0 is here too (bit-exact
with the `gguf` package's numpy version, but fast on the GPU), since it is the fallback for
rows that are not a multiple of 256.
"""
from __future__ import annotations

import numpy as np
import torch

QK_K = 256
QK8_0 = 32

BLOCK_BYTES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210, "Q8_0": 34}
BLOCK_VALUES = {"Q4_K": QK_K, "Q5_K": QK_K, "Q6_K": QK_K, "Q8_0": QK8_0}


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    # C's roundf (what ggml's reference code and gguf's numpy port use); torch.round is half-to-even.
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def _as_blocks(w: torch.Tensor, block: int, name: str) -> torch.Tensor:
    if w.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D weight [rows, cols], got shape {tuple(w.shape)}")
    rows, cols = w.shape
    if cols % block != 0:
        raise ValueError(
            f"{name}: row length {cols} is not a multiple of {block}; pick a type whose block fits "
            "(fastft's GGUF writer falls back automatically, see gguf_export.writer.choose_type)."
        )
    return w.float().reshape(rows * cols // block, block)


def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    """[n] float -> [n, 2] uint8 (little-endian IEEE half)."""
    return x.to(torch.float16).contiguous().view(torch.uint8).reshape(-1, 2)


def _chunks(n_rows: int, row_elems: int, device: torch.device):
    # Bound the temporaries of the candidate search (about 20 candidates x a few tensors).
    budget = (1 << 26) if device.type == "cuda" else (1 << 20)
    step = max(1, budget // max(1, row_elems))
    for start in range(0, n_rows, step):
        yield start, min(n_rows, start + step)


# ----------------------------------------------------------------------------------------------
# asymmetric sub-block search (Q4_K / Q5_K): x ~ scale * L - m, L in [0, nmax], m >= 0
# ----------------------------------------------------------------------------------------------
def _search_scale_min(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int):
    """x, w: [N, n]. Returns (scale [N], m [N]) with m >= 0, minimising sum w*(scale*L - m - x)^2
    over L = round((x - xmin) * iscale) for a grid of iscale candidates."""
    xmin = x.amin(dim=1).clamp(max=0.0)
    xmax = x.amax(dim=1)
    rng = xmax - xmin
    safe_rng = torch.where(rng > 0, rng, torch.ones_like(rng))

    steps = torch.arange(nstep + 1, device=x.device, dtype=x.dtype)
    # candidate inverse scales [N, C]; the plain min/max fit (rmin = 0) is the first candidate
    factors = torch.cat([torch.tensor([float(nmax)], device=x.device, dtype=x.dtype), nmax + rmin + rdelta * steps])
    iscale = factors[None, :] / safe_rng[:, None]
    L = torch.clamp(torch.round((x - xmin[:, None])[:, None, :] * iscale[:, :, None]), 0, nmax)  # [N, C, n]

    wx = w * x
    sum_w = w.sum(dim=1)[:, None]
    sum_x = wx.sum(dim=1)[:, None]
    sum_x2 = (wx * x).sum(dim=1)[:, None]
    # batched dot products over the sub-block (bmm) instead of broadcasting [N, C, n] products
    sum_l = torch.einsum("ncl,nl->nc", L, w)
    sum_l2 = torch.einsum("ncl,nl->nc", L * L, w)
    sum_xl = torch.einsum("ncl,nl->nc", L, wx)
    D = sum_w * sum_l2 - sum_l * sum_l
    ok = D > 0
    safe_D = torch.where(ok, D, torch.ones_like(D))
    scale = (sum_w * sum_xl - sum_x * sum_l) / safe_D
    offset = (sum_l2 * sum_x - sum_l * sum_xl) / safe_D  # x ~ scale * L + offset
    # the format needs offset <= 0; if the free fit says otherwise, refit the scale with offset 0
    pos = offset > 0
    safe_l2 = torch.where(sum_l2 > 0, sum_l2, torch.ones_like(sum_l2))
    scale = torch.where(pos, sum_xl / safe_l2, scale)
    offset = torch.where(pos, torch.zeros_like(offset), offset)
    # the first candidate keeps its direct min/max fit (always valid)
    scale[:, 0] = rng / nmax
    offset[:, 0] = xmin
    ok[:, 0] = True

    # sum w*(scale*L + offset - x)^2, expanded into the sums above
    err = (
        scale * scale * sum_l2
        + 2 * scale * offset * sum_l
        - 2 * scale * sum_xl
        + offset * offset * sum_w
        - 2 * offset * sum_x
        + sum_x2
    )
    err = torch.where(ok, err, torch.full_like(err, float("inf")))
    best = err.argmin(dim=1, keepdim=True)
    best_scale = scale.gather(1, best).squeeze(1)
    best_m = -offset.gather(1, best).squeeze(1)
    flat = rng <= 0
    best_scale = torch.where(flat, torch.zeros_like(best_scale), best_scale)
    best_m = torch.where(flat, -xmin, best_m)
    return best_scale.clamp(min=0.0), best_m.clamp(min=0.0)


def _quantize_k_asym(w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int, name: str):
    """Shared Q4_K / Q5_K path. Returns (d_bytes [nb,2], dmin_bytes [nb,2], scales [nb,12], q [nb,8,32])."""
    blocks = _as_blocks(w, QK_K, name)  # [nb, 256]
    nb = blocks.shape[0]
    x = blocks.reshape(nb, 8, 32)
    # importance of each value: llama.cpp's reference weighs by rms(super-block) + |x|
    av = torch.sqrt((blocks * blocks).mean(dim=1))
    wts = av[:, None, None] + x.abs()
    sc, mn = _search_scale_min(x.reshape(nb * 8, 32), wts.reshape(nb * 8, 32), nmax, rmin, rdelta, nstep)
    sc = sc.reshape(nb, 8)
    mn = mn.reshape(nb, 8)

    # 6-bit scales/mins relative to one f16 super-scale each
    max_sc = sc.amax(dim=1)
    max_mn = mn.amax(dim=1)
    inv_sc = torch.where(max_sc > 0, 63.0 / torch.where(max_sc > 0, max_sc, torch.ones_like(max_sc)), torch.zeros_like(max_sc))
    inv_mn = torch.where(max_mn > 0, 63.0 / torch.where(max_mn > 0, max_mn, torch.ones_like(max_mn)), torch.zeros_like(max_mn))
    ls = torch.clamp(_round_half_away(sc * inv_sc[:, None]), 0, 63)
    lm = torch.clamp(_round_half_away(mn * inv_mn[:, None]), 0, 63)
    d = (max_sc / 63.0).to(torch.float16)
    dmin = (max_mn / 63.0).to(torch.float16)

    # re-quantise the values against the scales as stored (f16 super-scales x 6-bit integers)
    eff_sc = d.float()[:, None] * ls
    eff_mn = dmin.float()[:, None] * lm
    safe = torch.where(eff_sc > 0, eff_sc, torch.ones_like(eff_sc))
    q = torch.clamp(_round_half_away((x + eff_mn[:, :, None]) / safe[:, :, None]), 0, nmax)
    q = torch.where(eff_sc[:, :, None] > 0, q, torch.zeros_like(q)).to(torch.uint8)

    ls = ls.to(torch.uint8)
    lm = lm.to(torch.uint8)
    scales = torch.cat(
        [
            (ls[:, :4] & 63) | ((ls[:, 4:] >> 4) << 6),
            (lm[:, :4] & 63) | ((lm[:, 4:] >> 4) << 6),
            (ls[:, 4:] & 15) | ((lm[:, 4:] & 15) << 4),
        ],
        dim=1,
    )
    return d.contiguous().view(torch.uint8).reshape(nb, 2), dmin.contiguous().view(torch.uint8).reshape(nb, 2), scales, q


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """q [nb, 8, 32] (4-bit values) -> [nb, 128]: byte j*32+l holds sub-block 2j (low) and 2j+1 (high)."""
    nb = q.shape[0]
    low = q[:, 0::2, :] & 15
    high = q[:, 1::2, :] & 15
    return (low | (high << 4)).reshape(nb, 128)


def _by_chunks(w: torch.Tensor, fn) -> torch.Tensor:
    """Apply a row-wise quantiser to row chunks (bounded temporaries) and stack the bytes."""
    rows, cols = w.shape
    out = []
    for a, b in _chunks(rows, cols * 24, w.device):
        out.append(fn(w[a:b]).reshape(b - a, -1))
    return torch.cat(out, dim=0)


def quantize_q4_k(w: torch.Tensor) -> torch.Tensor:
    """[rows, cols] float (cols % 256 == 0) -> [rows, cols/256*144] uint8 in block_q4_K layout."""

    def one(part):
        # candidate steps (nmax - 1 .. nmax + 1 in 0.2s): as good as a 0.1 grid, half the work
        d, dmin, scales, q = _quantize_k_asym(part, 15, -1.0, 0.2, 10, "Q4_K")
        return torch.cat([d, dmin, scales, _pack_nibbles(q)], dim=1)

    _as_blocks(w, QK_K, "Q4_K")
    return _by_chunks(w, one)


def quantize_q5_k(w: torch.Tensor) -> torch.Tensor:
    """[rows, cols] float (cols % 256 == 0) -> [rows, cols/256*176] uint8 in block_q5_K layout."""

    def one(part):
        d, dmin, scales, q = _quantize_k_asym(part, 31, -0.5, 0.2, 7, "Q5_K")
        bit = ((q >> 4) & 1).to(torch.int32)  # [nb, 8, 32]: 5th bit of sub-block i -> bit i of qh[l]
        shifts = torch.arange(8, device=q.device, dtype=torch.int32)[None, :, None]
        qh = (bit << shifts).sum(dim=1).to(torch.uint8)  # [nb, 32]
        return torch.cat([d, dmin, scales, qh, _pack_nibbles(q & 15)], dim=1)

    _as_blocks(w, QK_K, "Q5_K")
    return _by_chunks(w, one)


def _search_symmetric(x: torch.Tensor, nmax: int, nstep: int = 3, step: float = 0.3):
    """Q6_K sub-block scale: x [N, n] ~ scale * L, L in [-nmax, nmax-1]; weights x^2 (favour the
    large values, as llama.cpp's rmse_type 1). Returns scale [N] (signed, may be 0)."""
    amax_idx = x.abs().argmax(dim=1, keepdim=True)
    vmax = x.gather(1, amax_idx).squeeze(1)  # signed value of largest magnitude
    nonzero = vmax != 0
    safe_vmax = torch.where(nonzero, vmax, torch.ones_like(vmax))
    steps = torch.arange(-nstep, nstep + 1, device=x.device, dtype=x.dtype)
    iscale = -(nmax + step * steps)[None, :] / safe_vmax[:, None]  # [N, C]
    L = torch.clamp(torch.round(x[:, None, :] * iscale[:, :, None]), -nmax, nmax - 1)
    wts = x * x
    sum_lx = torch.einsum("ncl,nl->nc", L, wts * x)
    sum_l2 = torch.einsum("ncl,nl->nc", L * L, wts)
    ok = sum_l2 > 0
    safe_l2 = torch.where(ok, sum_l2, torch.ones_like(sum_l2))
    # for the optimal scale sum_lx/sum_l2 the weighted error is sum(w x^2) - sum_lx^2/sum_l2
    gain = torch.where(ok, sum_lx * sum_lx / safe_l2, torch.full_like(sum_l2, -1.0))
    best = gain.argmax(dim=1, keepdim=True)
    scale = (sum_lx / safe_l2).gather(1, best).squeeze(1)
    return torch.where(nonzero, scale, torch.zeros_like(scale))


def quantize_q6_k(w: torch.Tensor) -> torch.Tensor:
    """[rows, cols] float (cols % 256 == 0) -> [rows, cols/256*210] uint8 in block_q6_K layout."""

    def one(part):
        blocks = _as_blocks(part, QK_K, "Q6_K")
        nb = blocks.shape[0]
        x = blocks.reshape(nb, 16, 16)
        sc = _search_symmetric(x.reshape(nb * 16, 16), 32).reshape(nb, 16)
        idx = sc.abs().argmax(dim=1, keepdim=True)
        max_sc = sc.gather(1, idx).squeeze(1)
        nz = max_sc != 0
        iscale = torch.where(nz, -128.0 / torch.where(nz, max_sc, torch.ones_like(max_sc)), torch.zeros_like(max_sc))
        ls = torch.clamp(_round_half_away(sc * iscale[:, None]), -128, 127)
        d = torch.where(nz, 1.0 / torch.where(nz, iscale, torch.ones_like(iscale)), torch.zeros_like(iscale)).to(torch.float16)
        eff = d.float()[:, None] * ls  # [nb, 16]
        safe = torch.where(eff != 0, eff, torch.ones_like(eff))
        L = torch.clamp(_round_half_away(x / safe[:, :, None]), -32, 31)
        L = torch.where(eff[:, :, None] != 0, L, torch.zeros_like(L))
        q = (L + 32).to(torch.uint8).reshape(nb, 2, 4, 32)  # [block, half of 128, chunk of 32, l]
        ql = torch.stack(
            [(q[:, :, 0] & 15) | ((q[:, :, 2] & 15) << 4), (q[:, :, 1] & 15) | ((q[:, :, 3] & 15) << 4)], dim=2
        ).reshape(nb, 128)
        hi = ((q >> 4) & 3).to(torch.int32)
        shifts = (2 * torch.arange(4, device=q.device, dtype=torch.int32))[None, None, :, None]
        qh = (hi << shifts).sum(dim=2).to(torch.uint8).reshape(nb, 64)
        sc_bytes = ls.to(torch.int8).view(torch.uint8)
        return torch.cat([ql, qh, sc_bytes, d.contiguous().view(torch.uint8).reshape(nb, 2)], dim=1)

    _as_blocks(w, QK_K, "Q6_K")
    return _by_chunks(w, one)


def quantize_q8_0(w: torch.Tensor) -> torch.Tensor:
    """[rows, cols] float (cols % 32 == 0) -> [rows, cols/32*34] uint8 in block_q8_0 layout
    (bit-exact with gguf.quants.quantize, which mirrors ggml's reference)."""
    blocks = _as_blocks(w, QK8_0, "Q8_0")
    rows = w.shape[0]
    d = blocks.abs().amax(dim=1) / 127.0
    inv = torch.where(d != 0, 1.0 / torch.where(d != 0, d, torch.ones_like(d)), torch.zeros_like(d))
    q = _round_half_away(blocks * inv[:, None]).to(torch.int8).view(torch.uint8)
    return torch.cat([_f16_bytes(d), q], dim=1).reshape(rows, -1)


_TORCH_QUANTISERS = {"Q4_K": quantize_q4_k, "Q5_K": quantize_q5_k, "Q6_K": quantize_q6_k, "Q8_0": quantize_q8_0}


def quantize(w: torch.Tensor, type_name: str) -> np.ndarray:
    """Quantise a 2-D (or 1-D) float tensor to GGML type `type_name` ("F32", "F16", "BF16",
    "Q8_0", "Q4_K", "Q5_K", "Q6_K", or any type gguf.quants can quantise such as "Q4_0",
    "Q5_0", "Q5_1"). Returns a numpy array ready for GGUFWriter: float32/float16 for F32/F16,
    else uint8 bytes of shape [rows, bytes_per_row]."""
    type_name = type_name.upper()
    if type_name == "F32":
        return w.detach().to(torch.float32).cpu().numpy()
    if type_name == "F16":
        return w.detach().to(torch.float16).cpu().numpy()
    if type_name == "BF16":
        t = w.detach().to(torch.bfloat16).contiguous()
        return t.view(torch.uint8).reshape(*t.shape[:-1], t.shape[-1] * 2).cpu().numpy()
    if type_name in _TORCH_QUANTISERS:
        w2 = w.detach().reshape(-1, w.shape[-1]) if w.ndim != 2 else w.detach()
        out = _TORCH_QUANTISERS[type_name](w2)
        return out.reshape(*w.shape[:-1], out.shape[-1]).cpu().numpy()
    import gguf

    qtype = gguf.GGMLQuantizationType[type_name]
    return gguf.quants.quantize(w.detach().to(torch.float32).cpu().numpy(), qtype)
