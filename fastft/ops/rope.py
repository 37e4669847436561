"""rope: rotary position embedding of q and k, in place, forward and backward in one launch each.

Same contract as transformers' `apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)`:

    q_embed = q * cos + rotate_half(q) * sin      (rotate_half: [-x2, x1] of the two halves)

with cos / sin as the model's own rotary module returns them ([batch, seq, rot_dim], or a 2-D
[seq, rot_dim] shared by every batch row), so every rope scaling is exact and per-token position
ids (packed sequences) work. unsqueeze_dim=1: q/k are [batch, heads, seq, head_dim];
unsqueeze_dim=2: [batch, seq, heads, head_dim]. Any strides with a contiguous last dim (the usual
case is a [b, h, s, d] transpose of a [b, s, h, d] projection output). k may have fewer heads
than q (GQA). rot_dim = cos.shape[-1] may be smaller than head_dim (partial rotary, Phi/NeoX
style): the dims past rot_dim pass through unchanged.

In place: by default the rotated values are written into q's and k's storage (they are the
projection outputs, which nothing else needs for backward) and the returned tensors alias it;
q and k are consumed. Their version counters are bumped, so an autograd node that saved them
fails loudly instead of computing with rotated values. A leaf that requires grad (or a view
of one), tensors whose elements overlap (expanded) or q and k sharing elements are never
overwritten: then both get new outputs, as with inplace=False and in every call
traced by torch.compile (functionalization would copy back anyway). q and k sliced from one
fused qkv projection share no element and are rotated in place. Backward applies the transposed
rotation (the rotation by -theta when, as in every rotary module, cos/sin repeat their two
halves) to the incoming gradients, in place when they own their memory.

Math is float32 (float64 stays float64 in the reference); cos/sin are used in q's dtype, as
the rotary modules return them.
"""
from __future__ import annotations

import torch

from fastft import dispatch
from fastft.ops import _common
from fastft.ops._common import cuda_ops


def _math(t):
    """At least float32 (float64 stays float64, so the reference can be checked in it)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


# ---------------------------------------------------------------- the torch reference

def _cos_for(cos, unsqueeze_dim):
    """transformers' broadcasting, with a 2-D [seq, rot_dim] cos meaning every batch row."""
    if cos.dim() == 2:
        cos = cos.unsqueeze(0)
    return cos.unsqueeze(unsqueeze_dim)


def reference_rope(q, k, cos, sin, unsqueeze_dim=1):
    """Differentiable plain-torch RoPE (float32 math, out of place): the oracle for the tests."""
    c, s = _math(_cos_for(cos, unsqueeze_dim)), _math(_cos_for(sin, unsqueeze_dim))
    rot = c.shape[-1]

    def apply(x):
        xf = _math(x)
        xr, xp = xf[..., :rot], xf[..., rot:]
        x1, x2 = xr[..., : rot // 2], xr[..., rot // 2:]
        out = xr * c + torch.cat((-x2, x1), dim=-1) * s
        return torch.cat((out, xp), dim=-1).to(x.dtype)

    return apply(q), apply(k)


# ---------------------------------------------------------------- backends
# Every backend takes [batch, seq, heads, head_dim] views (contiguous last dim) of q, k and of
# their outputs (both None: write into q and k themselves), and cos/sin as
# [batch, seq, rot_dim] (batch stride 0 when shared). backward=True applies the transposed map:
#   forward:  y1 = x1*c1 - x2*s1,  y2 = x2*c2 + x1*s2
#   backward: y1 = x1*c1 + x2*s2,  y2 = x2*c2 - x1*s1
# where x1/x2 (c1/c2, s1/s2) are the first and second halves of the rotary dims.

class _TorchBackend:
    @staticmethod
    def rotate(q, k, q_out, k_out, cos, sin, backward):
        rot, half = cos.shape[-1], cos.shape[-1] // 2
        c = _math(cos)[:, :, None, :]
        s = _math(sin)[:, :, None, :]
        c1, c2, s1, s2 = c[..., :half], c[..., half:], s[..., :half], s[..., half:]
        for x, out in ((q, q_out), (k, k_out)):
            out = x if out is None else out
            xf = _math(x[..., :rot])
            x1, x2 = xf[..., :half], xf[..., half:]
            if backward:
                y1, y2 = x1 * c1 + x2 * s2, x2 * c2 - x1 * s1
            else:
                y1, y2 = x1 * c1 - x2 * s1, x2 * c2 + x1 * s2
            # both halves are computed before either is written: out may be x
            out[..., :half].copy_(y1)
            out[..., half:rot].copy_(y2)
            if rot < x.shape[-1] and out is not x:
                out[..., rot:].copy_(x[..., rot:])


# Triton launchers as custom ops (torch.compile and opcheck see a schema), one in place and one
# out of place, so that each declares exactly what it mutates (a declared mutation bumps the
# tensor's version counter, which must not happen to an input an out-of-place call keeps).
@torch.library.custom_op("fastft_triton::rope_inplace", mutates_args=("q", "k"))
def _triton_rope_inplace(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         backward: bool) -> None:
    from fastft.triton_kernels import rope as kernels

    with _common.launch_device(q):
        kernels.rope(q, k, cos, sin, q, k, backward)


@torch.library.custom_op("fastft_triton::rope_out", mutates_args=("q_out", "k_out"))
def _triton_rope_out(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     q_out: torch.Tensor, k_out: torch.Tensor, backward: bool) -> None:
    from fastft.triton_kernels import rope as kernels

    with _common.launch_device(q):
        kernels.rope(q, k, cos, sin, q_out, k_out, backward)


@_triton_rope_inplace.register_fake
def _(q, k, cos, sin, backward):
    return None


@_triton_rope_out.register_fake
def _(q, k, cos, sin, q_out, k_out, backward):
    return None


class _TritonBackend:
    @staticmethod
    def rotate(q, k, q_out, k_out, cos, sin, backward):
        if q_out is None:
            _triton_rope_inplace(q, k, cos, sin, backward)
        else:
            _triton_rope_out(q, k, cos, sin, q_out, k_out, backward)


class _CudaBackend:
    @staticmethod
    def rotate(q, k, q_out, k_out, cos, sin, backward):
        if q_out is None:
            cuda_ops().rope_inplace(q, k, cos, sin, backward)
        else:
            cuda_ops().rope_out(q, k, cos, sin, q_out, k_out, backward)


_BACKENDS = {"torch": _TorchBackend, "triton": _TritonBackend, "cuda": _CudaBackend}
dispatch.register("rope", "torch", _TorchBackend)
dispatch.register("rope", "triton", _TritonBackend)
if cuda_ops() is not None:
    dispatch.register("rope", "cuda", _CudaBackend)
    for _name in ("rope_inplace", "rope_out"):
        torch.library.register_fake(f"fastft::{_name}")(lambda *args, **kwargs: None)


# ---------------------------------------------------------------- memory-safety helpers

def _no_internal_overlap(t):
    """True when no two elements of t share memory (a sufficient test on sizes and strides)."""
    dims = sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz > 1)
    reach = 0  # largest offset reachable with the smaller-stride dims
    for st, sz in dims:
        if st <= reach:
            return False
        reach += st * (sz - 1)
    return True


def _span(t):
    lo = t.data_ptr()
    return lo, lo + t.element_size() * (1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride())))


def _may_overlap(a, b):
    if a.numel() == 0 or b.numel() == 0:
        return False
    (alo, ahi), (blo, bhi) = _span(a), _span(b)
    return alo < bhi and blo < ahi


def _disjoint_tokens(q4, k4):
    """True when [b, s, h, d] views q4 and k4 share no element although their address ranges
    interleave: q and k sliced out of one fused qkv projection, token rows `ss` apart."""
    sb, ss = q4.stride(0), q4.stride(1)
    if k4.stride()[:2] != (sb, ss) or ss <= 0 or (q4.shape[0] > 1 and sb % ss):
        return False
    size = q4.element_size()
    shift_bytes = k4.data_ptr() - q4.data_ptr()
    if shift_bytes % size:
        return False

    def width(t):  # elements one token of t spans
        return 1 + sum((n - 1) * st for n, st in zip(t.shape[2:], t.stride()[2:]))

    shift = (shift_bytes // size) % ss  # where k's token starts within q's token rows
    return width(q4) <= shift <= ss - width(k4)


def _apart(q, k, unsqueeze_dim):
    """q and k share no element."""
    return not _may_overlap(q, k) or _disjoint_tokens(_bshd(q, unsqueeze_dim),
                                                      _bshd(k, unsqueeze_dim))


def _overwritable(t):
    """May the kernel write into t's memory? Never into (a view of) a leaf requiring grad."""
    base = t if t._base is None else t._base
    leaf_with_grad = any(x.is_leaf and x.requires_grad for x in (t, base))
    return not leaf_with_grad and _no_internal_overlap(t)


def _empty_like(t):
    """A new tensor shaped (and, when t is dense, strided) like t; NaN-filled under test."""
    out = torch.empty_like(t)
    if _common.POISON:
        out.fill_(float("nan"))
    return out


def _consumed(t):
    """Bump t's version counter: autograd nodes that saved t now fail instead of misreading."""
    if not t.is_inference() and not torch.compiler.is_compiling():
        torch.autograd.graph.increment_version(t)


# ---------------------------------------------------------------- autograd op

def _bshd(t, unsqueeze_dim):
    """[b, h, s, d] (unsqueeze_dim=1) <-> [b, s, h, d] view; the identity for unsqueeze_dim=2."""
    return t.transpose(1, 2) if unsqueeze_dim == 1 else t


def _cos3(c, batch, seq):
    if c.dim() == 2:
        c = c.unsqueeze(0)
    if c.stride(-1) != 1:
        c = c.contiguous()
    return c.expand(batch, seq, c.shape[-1])


def _rotate(impl, q, k, cos, sin, unsqueeze_dim, inplace, backward):
    """Rotates (the bshd views of) q and k; returns the outputs in the caller's layout."""
    q4, k4 = _bshd(q, unsqueeze_dim), _bshd(k, unsqueeze_dim)
    batch, seq = q4.shape[0], q4.shape[1]
    cos3, sin3 = _cos3(cos, batch, seq), _cos3(sin, batch, seq)
    if inplace:
        impl.rotate(q4, k4, None, None, cos3, sin3, backward)
        return q, k
    # Outputs are allocated in [b, s, h, d] order and the op writes those tensors themselves,
    # never a view of them: inductor dropped writes made through a transposed view of a fresh
    # buffer (all-zero q/k gradients under torch.compile on the H200).
    q_out4 = _common.new_empty(q4.shape, q4.dtype, q4.device)
    k_out4 = _common.new_empty(k4.shape, k4.dtype, k4.device)
    impl.rotate(q4, k4, q_out4, k_out4, cos3, sin3, backward)
    return _bshd(q_out4, unsqueeze_dim), _bshd(k_out4, unsqueeze_dim)


def _last_dim_contiguous(t):
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


class _RopeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin, unsqueeze_dim, inplace, backend):
        impl = _BACKENDS[backend]
        q_out, k_out = _rotate(impl, q, k, cos, sin, unsqueeze_dim, inplace, False)
        if inplace:
            _consumed(q)
            _consumed(k)
        ctx.save_for_backward(cos, sin)
        ctx.meta = (impl, unsqueeze_dim)
        if inplace:
            # New tensors over q's and k's memory (not views of the inputs, which autograd
            # would forbid the caller to modify in place later).
            return q_out.detach(), k_out.detach()
        return q_out, k_out

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        impl, unsqueeze_dim = ctx.meta
        dq, dk = _last_dim_contiguous(dq), _last_dim_contiguous(dk)
        # The incoming gradients are ours to overwrite unless they alias each other or
        # themselves (expanded gradients of a sum, for instance). Traced (torch.compile):
        # out of place, as functionalization would copy back anyway.
        inplace = (not torch.compiler.is_compiling() and not _may_overlap(dq, dk)
                   and _no_internal_overlap(dq) and _no_internal_overlap(dk))
        dq, dk = _rotate(impl, dq, dk, cos, sin, unsqueeze_dim, inplace, True)
        return dq, dk, None, None, None, None, None


def _check(q, k, cos, sin, unsqueeze_dim):
    if unsqueeze_dim not in (1, 2):
        raise ValueError(f"rope: unsqueeze_dim must be 1 (q/k as [batch, heads, seq, head_dim]) "
                         f"or 2 ([batch, seq, heads, head_dim]), got {unsqueeze_dim}")
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"rope: q and k must be 4-D, got q {tuple(q.shape)} and k "
                         f"{tuple(k.shape)}")
    if q.dtype != k.dtype or q.device != k.device:
        raise ValueError(f"rope: q and k must share dtype and device, got {q.dtype} on "
                         f"{q.device} and {k.dtype} on {k.device}")
    q4, k4 = _bshd(q, unsqueeze_dim), _bshd(k, unsqueeze_dim)
    if q4.shape[:2] != k4.shape[:2] or q4.shape[3] != k4.shape[3]:
        raise ValueError(f"rope: q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch, "
                         f"seq and head_dim (with unsqueeze_dim={unsqueeze_dim})")
    batch, seq, _, head_dim = q4.shape
    if cos.shape != sin.shape:
        raise ValueError(f"rope: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} differ")
    if cos.device != q.device:
        raise ValueError(f"rope: cos/sin are on {cos.device}, q/k on {q.device}")
    ok_batch = cos.dim() == 2 or (cos.dim() == 3 and cos.shape[0] in (1, batch))
    if not ok_batch or cos.shape[-2] != seq:
        raise ValueError(f"rope: cos/sin must be [batch, seq, rot_dim] or [seq, rot_dim] with "
                         f"batch={batch} (or 1) and seq={seq}, got {tuple(cos.shape)}")
    rot = cos.shape[-1]
    if rot % 2 or rot == 0 or rot > head_dim:
        raise ValueError(f"rope: rot_dim (cos.shape[-1]={rot}) must be even, positive and at "
                         f"most head_dim={head_dim}")


def rope(q, k, cos, sin, unsqueeze_dim=1, *, inplace=True, backend=None):
    """(q_embed, k_embed): transformers' apply_rotary_pos_emb, rotating q and k in place.

    inplace=True (default) consumes q and k (see the module docstring for when it falls back to
    new outputs); inplace=False leaves them untouched."""
    _check(q, k, cos, sin, unsqueeze_dim)
    chosen = dispatch.backend_for("rope", q.device, q.dtype, backend)
    if cos.dtype != q.dtype:
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
    q, k = _last_dim_contiguous(q), _last_dim_contiguous(k)
    # In place only when both may be overwritten (one launch rotates both).
    inplace = (inplace and not torch.compiler.is_compiling() and _overwritable(q)
               and _overwritable(k) and _apart(q, k, unsqueeze_dim))
    return _RopeFunction.apply(q, k, cos, sin, unsqueeze_dim, inplace, chosen)

