"""Attention inside offloaded checkpoints: reuse the first forward's result instead of
recomputing it.

An offloaded checkpoint re-runs each decoder layer in backward only to rebuild its autograd
graph. For attention that means a whole second attention forward, just so that the backward
kernel gets the output and log-sum-exp it saves. Here the first forward keeps that graph:

* first forward (no grad): transformers' SDPA function runs with grad enabled on stand-ins for
  q, k, v, under saved-tensor hooks. What the attention node saves is then either one of q/k/v
  (kept as a placeholder: the recompute makes them again anyway), a view of the returned output
  (kept as its strides), or anything else (the log-sum-exp, RNG state): those, and the output,
  are stashed, i.e. travel to the host with the layer's input (fastft.offload.stash_put). The
  graph itself stays alive but holds no GPU memory.
* recompute: q, k, v are recomputed as before; attention is not. `_ReusedAttention` returns the
  stashed output, and its backward runs the kept graph's backward (the same SDPA backward kernel
  torch would have run) with the placeholders bound to the recomputed q, k, v.

Public API only (saved_tensors_hooks, autograd.backward), so it works with whatever backend SDPA
picks (cuDNN, flash, memory-efficient, the CPU kernels) and across torch versions. Used only
where it cannot change results or blow up host traffic: no dropout, no mask on CUDA (the fused
kernels, which save O(tokens) and not O(tokens^2)), and only inside fastft's offloaded
checkpoints; everywhere else the wrapper calls transformers' function unchanged, except for
one-token decoding steps with grouped KV heads and a mask, which skip transformers' copy of K and
V to every query head (_grouped_decode; installed by offloading and by for_inference).
"""
from __future__ import annotations

import os

import torch

from fastft import offload

_TAG = "attention"
# q/k/v are stashed only up to this size per layer. Their copy back starts once the attention
# backward of the layer after has run (offload.start_late_prefetch), so they are not on the GPU
# during it, the step's memory peak. Larger layers are recomputed: their copies would take
# longer than the forward has PCIe time for (run 25: 4x4096 already sends ~18 GiB a pass), and
# larger stashes were not measured.
# 256 MiB admits Llama-3.1-8B at 16384 tokens a step (192 MiB per layer).
REUSE_QKV_MAX_BYTES = int(os.environ.get("FASTFT_OFFLOAD_REUSE_QKV_MAX_BYTES", str(256 << 20)))
# Noted by the fused q/k/v projection in a first forward when its outputs reach attention only
# through value-free ops (RoPE), so that the recompute may skip it if attention stashes q/k/v.
QKV_NOTE = "qkv projection can be skipped"


def reused_inputs_ahead() -> bool:
    """In a recompute: will the next attention call take q/k/v from the stash? (Then the q/k/v
    projection before it need not compute anything.)"""
    taken = offload.stash_peek(_TAG)
    return taken is not None and taken[1].inputs_stashed
_ORIGINAL = {}  # "sdpa" -> transformers' own function, while our wrapper is installed


class _Held:
    """A tensor the attention node saved: one of q/k/v (index), a view of the output
    (strides), or a stashed tensor (position in the stash group). `value` is bound before the
    kept graph's backward runs."""

    __slots__ = ("kind", "index", "geometry", "tensor", "value")

    def __init__(self, tensor):
        self.tensor = tensor  # until classified right after the call; then dropped
        self.kind = self.index = self.geometry = self.value = None


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype)


def _shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


class _StandIn(torch.autograd.Function):
    """q, k, v as seen by the kept graph: their gradients land in `sink` (the recompute's
    backward reads them) instead of flowing anywhere, and the graph holds no reference to them."""

    @staticmethod
    def forward(ctx, anchor, sink, q, k, v):
        ctx.sink = sink
        return q.detach(), k.detach(), v.detach()

    @staticmethod
    def backward(ctx, dq, dk, dv):
        ctx.sink[:] = [dq, dk, dv]
        return None, None, None, None, None


class _Root(torch.autograd.Function):
    """Ends the kept graph in a tiny tensor so that nothing holds the real output; its backward
    feeds in the gradient `feed[0]` the recompute put there."""

    @staticmethod
    def forward(ctx, out, feed):
        ctx.feed = feed
        return out.new_empty(0)

    @staticmethod
    def backward(ctx, _grad):
        grad = ctx.feed[0]
        ctx.feed[0] = None
        return grad, None


class _Kept:
    """The first forward's attention graph and how to rebind it."""

    __slots__ = ("root", "held", "grads", "feed", "inputs_stashed")


class _ReusedAttention(torch.autograd.Function):
    """Recompute side: returns the stashed output; backward runs the kept graph."""

    @staticmethod
    def forward(ctx, q, k, v, kept, stashed):
        # the output comes in a list, not as an argument: returned as is, it gets this node as
        # grad_fn instead of becoming an alias of an input
        ctx.kept = kept
        ctx.stashed = stashed
        # with q/k/v stashed the recomputed ones are placeholders nobody wrote: not kept
        ctx.save_for_backward(*(() if kept.inputs_stashed else (q, k, v)))
        ctx.out = stashed[0]
        return stashed[0]

    @staticmethod
    def backward(ctx, grad_out):
        kept = ctx.kept
        offload.wait_copied(ctx.stashed)  # q/k/v copied back late (offload.start_late_prefetch)
        qkv = ctx.saved_tensors
        for h in kept.held:
            if h.kind == "input":
                h.value = qkv[h.index]
            elif h.kind == "output_view":
                offset, size, stride = h.geometry
                h.value = ctx.out.as_strided(size, stride, offset)
            else:
                h.value = ctx.stashed[h.index]
        kept.feed[0] = grad_out.contiguous() if not grad_out.is_contiguous() else grad_out
        kept.grads[:] = [None, None, None]
        torch.autograd.backward(kept.root, torch.empty(0, dtype=kept.root.dtype,
                                                       device=kept.root.device))
        grads = list(kept.grads)
        for h in kept.held:
            h.value = None
        ctx.kept = ctx.stashed = ctx.out = None
        # the layer before comes next: its q/k/v come back now, after this attention backward
        # (the step's memory peak), in time for its own attention backward a layer later
        offload.start_late_prefetch()
        return grads[0], grads[1], grads[2], None, None


def _reusable(module, query, key, value, attention_mask, dropout, kwargs) -> bool:
    if dropout or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None:
        return False
    if kwargs.get("output_attentions", False):
        return False
    if query.shape[2] < 2 or query.shape[2] != key.shape[2]:
        return False
    # on CUDA only the fused kernels (no mask): they save O(tokens), the math kernel O(tokens^2)
    return attention_mask is None or query.device.type != "cuda"


def _first_forward(original, module, query, key, value, attention_mask, dropout, args, kwargs):
    """Run transformers' attention keeping its graph; stash what the backward needs."""
    anchor = torch.empty(0, device=query.device, requires_grad=True)
    grads = [None, None, None]
    held = []

    def pack(t):
        h = _Held(t)
        held.append(h)
        return h

    def unpack(h):
        return h.value

    feed = [None]
    with torch.enable_grad():  # the layer's first forward runs under no_grad
        stand_ins = _StandIn.apply(anchor, grads, query, key, value)
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        out, weights = original(module, *stand_ins, attention_mask, dropout, *args, **kwargs)
        root = _Root.apply(out, feed)
    out = out.detach()
    stash = [out]
    late = [False]  # q/k/v: read only by this layer's attention backward (see offload.stash_put)
    # q/k/v themselves too when the recompute can then skip their projections (fastft/lora.py
    # notes that) and the host has room; else placeholders for the recomputed ones
    qkv_bytes = sum(t.numel() * t.element_size() for t in (query, key, value))
    stash_inputs = (offload.REUSE_QKV and offload.stash_noted(QKV_NOTE)
                    and qkv_bytes <= REUSE_QKV_MAX_BYTES
                    and offload.stash_room() >= qkv_bytes + 2 * out.numel() * out.element_size())
    for h in held:
        t = h.tensor
        h.tensor = None
        for i, s in enumerate(stand_ins):
            if _same_view(t, s):
                h.kind, h.index = "input", i
                if stash_inputs:
                    h.kind, h.index = "stashed", len(stash)
                    stash.append(t.detach())
                    late.append(True)
                break
        else:
            if _shares_storage(t, out) and out.is_contiguous():
                h.kind = "output_view"
                h.geometry = (t.storage_offset() - out.storage_offset(), tuple(t.shape), t.stride())
            else:
                h.kind, h.index = "stashed", len(stash)
                stash.append(t.detach())
                late.append(False)
    state_bytes = sum(t.numel() * t.element_size() for t in stash[1:])
    if stash_inputs:
        state_bytes -= qkv_bytes
    if state_bytes > 4 * out.numel() * out.element_size():  # not a fused kernel's state
        offload.stash_put(_TAG, None)  # keeps puts and takes in step; the recompute recomputes
        return out, weights
    kept = _Kept()
    kept.root, kept.held, kept.grads, kept.feed = root, held, grads, feed
    # every saved tensor is then stashed or a view of the output: none needs the recomputed q/k/v
    kept.inputs_stashed = bool(stash_inputs)
    offload.stash_put(_TAG, stash, kept, late=late)  # over budget: dropped, and the recompute recomputes
    return out, weights


def _grouped_decode(module, query, key, value, attention_mask, dropout, args, kwargs):
    """One new token per sequence with grouped KV heads and a mask (decoding with padding or a
    static cache): transformers' SDPA then copies K and V out to every query head (repeat_kv;
    SDPA's enable_gqa is for mask-free calls), the whole cache twice per layer and step, which
    grows with the cache's length. The query heads that share a KV head are instead passed as
    that head's queries (B, KV heads, group, D): the same attention, the mask broadcast over
    the group, nothing copied. None where that does not apply (transformers' function runs)."""
    groups = getattr(module, "num_key_value_groups", 1)
    if (not isinstance(groups, int) or groups <= 1 or args or dropout or attention_mask is None
            or query.dim() != 4 or query.shape[2] != 1 or key.shape[1] * groups != query.shape[1]
            or attention_mask.dim() != 4 or attention_mask.shape[1] != 1 or attention_mask.shape[2] != 1
            or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None
            or kwargs.get("output_attentions", False) or query.device.type not in ("cuda", "cpu")):
        return None
    batch, heads, _, dim = query.shape
    grouped = query.reshape(batch, key.shape[1], groups, dim)  # head h = kv head h // groups
    out = torch.nn.functional.scaled_dot_product_attention(
        grouped, key, value, attn_mask=attention_mask, dropout_p=0.0, scale=kwargs.get("scaling"))
    return out.reshape(batch, 1, heads, value.shape[-1]), None  # (B, tokens, heads, D)


def _reusing_sdpa(module, query, key, value, attention_mask, dropout=0.0, *args, **kwargs):
    original = _ORIGINAL["sdpa"]
    if offload.stashing():
        if offload.stash_room() <= 0 or not _reusable(module, query, key, value, attention_mask,
                                                       dropout, kwargs):
            offload.stash_put(_TAG, None)
            return original(module, query, key, value, attention_mask, dropout, *args, **kwargs)
        return _first_forward(original, module, query, key, value, attention_mask, dropout, args,
                              kwargs)
    if offload.replaying():
        taken = offload.stash_take(_TAG)
        if taken is not None:
            stashed, kept = taken
            return _ReusedAttention.apply(query, key, value, kept, stashed), None
    decoded = _grouped_decode(module, query, key, value, attention_mask, dropout, args, kwargs)
    if decoded is not None:
        return decoded
    return original(module, query, key, value, attention_mask, dropout, *args, **kwargs)


def install_sdpa_wrapper() -> None:
    """Wrap transformers' "sdpa" attention function (idempotent). Outside fastft's offloaded
    checkpoints the wrapper calls the original unchanged, except for one-token decoding steps
    that _grouped_decode takes."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    current = ALL_ATTENTION_FUNCTIONS["sdpa"]
    if current is _reusing_sdpa:
        return
    _ORIGINAL["sdpa"] = current
    ALL_ATTENTION_FUNCTIONS["sdpa"] = _reusing_sdpa
