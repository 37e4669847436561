"""Fused LoRA projections with hand-written backward passes.

Every projection computes  y = x·Wᵀ (+ bias) + s·(x·Aᵀ)·Bᵀ  with a frozen base weight W (dense
bf16/fp16/fp32, or bitsandbytes NF4/FP4 dequantised into one shared workspace per device) and
trainable LoRA factors A [r, in], B [out, r]; with at most 16 rows of x (decoding) an NF4 base
is multiplied straight from its packed form instead (nf4's fused small-M kernel). The backward
returns dx, dA, dB and never dW.

  lora_linear(x, proj)                   one projection (o_proj, or anything else)
  lora_qkv(x, q, k, v)                   three projections of one input (q/k/v)
  lora_mlp(x, gate, up, down, activation) the gated MLP: down(act(gate(x)) * up(x))

`proj` arguments are `Projection`s: the base (`Base`) plus the adapter factors (A and B may be
None when the module carries no adapter). What each function saves for backward:
  lora_linear / lora_qkv: x and the small x·Aᵀ products ([tokens, r]).
  lora_mlp: x and the gate/up pre-activations; the activation backward overwrites those two
  buffers in place with d_gate / d_up. With tiling (long sequences) only x is saved and the
  [tokens, intermediate] tensors exist one tile at a time, in forward and in backward.

Computation happens in the autocast dtype when autocast is on for x's device, else in x's dtype;
dA / dB come back in the factors' own dtype (peft keeps them in fp32).

This module knows nothing about peft: fastft/lora.py reads peft's modules and calls these.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import math
import os
import weakref
from dataclasses import dataclass, field

import torch

from fastft import offload

# --- the frozen base weight ----------------------------------------------------------------


@dataclass
class Base:
    """A frozen base weight: dense `weight` [out, in], or a bitsandbytes 4-bit `weight`
    (packed uint8) with its `quant_state`. `bias` is the (frozen) base bias or None.
    `dequantizers` caches, per dtype, the validated call that dequantises a 4-bit weight (see
    dense_weight); fastft/lora.py keeps one Base per module so the cache lives across steps."""
    weight: torch.Tensor
    bias: torch.Tensor | None = None
    quant_state: object = None
    dequantizers: dict = field(default_factory=dict, repr=False, compare=False)
    # per dtype: (weight storage pointer, the fused small-M call's inputs or None), see
    # _small_m_matmul
    small_m: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def out_features(self) -> int:
        return int(self.quant_state.shape[0]) if self.quant_state is not None else self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return int(self.quant_state.shape[1]) if self.quant_state is not None else self.weight.shape[1]


@dataclass
class Projection:
    """Base weight plus one LoRA term (A, B, scaling); A/B None means no adapter."""
    base: Base
    A: torch.Tensor | None = None
    B: torch.Tensor | None = None
    scaling: float = 1.0

    @property
    def has_lora(self) -> bool:
        return self.A is not None


# One dequantisation workspace per (device, dtype), grown to the largest weight seen; the one
# fastft.ops.nf4 keeps for nf4_matmul when that module is there. Every consumer uses the dense
# weight before the next dequantisation is issued on the same stream, so one buffer serves all.
_WORKSPACES: dict = {}


@functools.cache
def _module(name: str):
    """The fastft module `name`, or None where it is not there. Imported once: the hot paths
    ask for their modules on every call, and an import statement costs ~3 us each time."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:
            raise
        return None


def _nf4_module():
    return _module("fastft.ops.nf4")


def _dequantize_4bit(packed, quant_state, out):
    """bitsandbytes 4-bit -> dense `out`. On CUDA fastft's NF4 kernel when present (bit-exact
    with bitsandbytes' CUDA kernel). On the CPU (and for FP4) bitsandbytes itself, so the fused
    path computes what peft's bitsandbytes layers compute there: bitsandbytes' AVX-512 CPU kernel
    places block scales differently when rows do not hold whole blocks, and its CPU backend may
    repack weights into its own layout."""
    nf4 = _nf4_module()
    if out.device.type == "cuda" and nf4 is not None and getattr(quant_state, "quant_type", "nf4") == "nf4":
        result = nf4.nf4_dequantize(packed, quant_state, out=out)
    else:
        import bitsandbytes.functional as bnbf

        if out.device.type == "cuda":
            result = bnbf.dequantize_4bit(packed, quant_state, out=out)
        else:  # bitsandbytes' CPU backend has no out= variant
            result = bnbf.dequantize_4bit(packed, quant_state)
    if result.data_ptr() != out.data_ptr():
        out.copy_(result.view(out.shape))
    return out


def workspace(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    nf4 = _nf4_module()
    if nf4 is not None and hasattr(nf4, "workspace"):
        return nf4.workspace(numel, dtype, device)
    key = (torch.device(device), dtype)
    buf = _WORKSPACES.get(key)
    if buf is None or buf.numel() < numel:
        _WORKSPACES.pop(key, None)
        buf = torch.empty(numel, dtype=dtype, device=device)
        _WORKSPACES[key] = buf
    return buf[:numel]


def clear_workspaces() -> None:
    _WORKSPACES.clear()
    nf4 = _nf4_module()
    if nf4 is not None and hasattr(nf4, "release_workspaces"):
        nf4.release_workspaces()


def _storage_ptr(t: torch.Tensor) -> int:
    """t's data pointer without bitsandbytes' Params4bit __torch_function__ (~2.5 us a call)."""
    with torch._C.DisableTorchFunctionSubclass():
        return t.data_ptr()


def _dequantizer(base: Base, dtype: torch.dtype):
    """A function out -> out filled with the dense weight. For NF4 on CUDA: the state validated
    once and the kernel backend chosen once (checking both on every call cost QLoRA more host
    time per step than its dequantisation kernels take)."""
    qs = base.quant_state
    nf4 = _nf4_module()
    if base.weight.device.type == "cuda" and nf4 is not None and getattr(qs, "quant_type", "nf4") == "nf4":
        from fastft import dispatch

        state = nf4.resolve(base.weight, qs)
        backend = dispatch.backend_for("nf4_dequantize", base.weight.device, dtype)
        fill = nf4.bound_dequantize(state, backend)
        numel = state.numel

        def run(out):
            fill(out.view(-1)[:numel])
            return out
        return run
    return lambda out: _dequantize_4bit(base.weight, qs, out)


# id(Base) -> its dense weight, while a tiled MLP holds its 4-bit weights across tiles
# (_HeldDense); dense_weight returns these instead of dequantising again.
_HELD_DENSE: dict = {}
# The tiled MLP dequantises each 4-bit weight once per pass (gate and up into buffers of their
# own, down into the shared workspace) instead of once per tile and use (5 per tile in the
# backward): 6 instead of 32 dequantisations per 8B layer and step at 4x4096, for two
# weight-sized buffers (2 x 112 MiB at 8B) alive while the MLP runs. 0: once per use.
MLP_HOLD_WEIGHTS = os.environ.get("FASTFT_MLP_HOLD_WEIGHTS", "1") != "0"


class _HeldDense:
    """`with _HeldDense(bases, dtype):` dense_weight(b) of each 4-bit base in `bases` returns
    one dequantisation made on entry (in its own buffer) until the block ends."""

    def __init__(self, bases, dtype, active=True):
        self.bases = [b for b in bases if b.quant_state is not None] if active else []
        self.dtype = dtype

    def __enter__(self):
        for i, b in enumerate(self.bases):
            # the last one in the shared workspace (no dense_weight call follows it here)
            _HELD_DENSE[id(b)] = dense_weight(b, self.dtype, own_buffer=i < len(self.bases) - 1)
        return self

    def __exit__(self, *exc):
        for b in self.bases:
            _HELD_DENSE.pop(id(b), None)


def dense_weight(base: Base, dtype: torch.dtype, own_buffer: bool = False) -> torch.Tensor:
    """W [out, in] in `dtype`. For 4-bit bases this is a view of the shared workspace: valid
    until the next dense_weight call for a 4-bit base on this device (own_buffer: a new tensor
    instead)."""
    if base.quant_state is None:
        return base.weight if base.weight.dtype == dtype else base.weight.to(dtype)
    held = _HELD_DENSE.get(id(base))
    if held is not None and held.dtype == dtype:
        return held
    ptr = _storage_ptr(base.weight)
    prepared = base.dequantizers.get(dtype)
    if prepared is None or prepared[0] != ptr:  # new, or the weight's storage was replaced
        # (Params4bit's attributes go through its __torch_function__: read them once here)
        qs = base.quant_state
        shape = tuple(int(d) for d in qs.shape)
        qdtype = getattr(qs, "dtype", dtype) or dtype
        prepared = base.dequantizers[dtype] = (ptr, _dequantizer(base, qdtype), shape, qdtype,
                                               base.weight.device)
    _, run, shape, qdtype, device = prepared
    nf4 = _nf4_module()
    if own_buffer:
        out = run(torch.empty(shape, dtype=qdtype, device=device))
    elif nf4 is not None:
        out = run(nf4.workspace_view(shape, qdtype, device))
    else:
        out = run(workspace(shape[0] * shape[1], qdtype, device).view(shape))
    return out if qdtype == dtype else out.to(dtype)


# --- small helpers ---------------------------------------------------------------------------

def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    kind = x.device.type
    if kind in ("cuda", "cpu") and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype


def _cast(t, dtype):
    return None if t is None else (t if t.dtype == dtype else t.to(dtype))


# id(adapter factor) -> (weak ref, pass, version, dtype, the cast copy). peft keeps LoRA factors
# in float32 while the step computes in bf16: every use (forward, recompute, backward) cast them
# again, ~1300 small kernels a step for an 8B model. Within one forward pass of a model that
# apply_fused_lora hooked (its backward and recomputes included) the factors do not change, so
# one cast per pass is enough. A new pass (the root's forward pre-hook calls new_forward_pass)
# casts again, whatever the optimizer did in between (some write parameters through raw
# pointers without bumping their version); the version check also catches in-place edits
# inside a pass. Outside hooked models (pass 0) nothing is cached.
_FACTOR_CASTS: dict = {}
_FORWARD_PASS = [0]
# (id(factor), dtype) -> [weak ref, the cast copy]: the copies live across passes, so a new
# pass refreshes all of them with one torch._foreach_copy_ (one host call instead of one per
# factor: 14 per decoder layer). A copy may be a row block of a stacked buffer (_STACKS).
_FACTOR_COPIES: dict = {}
_REFRESHED_PASS = [0]
# (dtype, ids of the A factors) -> (the stacked buffer, the member copies as its row blocks)
_STACKS: dict = {}


def new_forward_pass(*_args, **_kwargs) -> None:
    _FORWARD_PASS[0] += 1
    _FACTOR_CASTS.clear()


# While a decoding step is captured into a CUDA graph (fastft.decoding), the kept cast copies
# are taken as they are, not refreshed: the refresh would be captured too and run at every
# replay (7 copy kernels, ~0.13 ms of a B = 1 step of an 8B model, run 91), while the factors
# cannot change during a generate call. refresh_factor_copies at the start of each call, and the
# prompt's eager forward, bring the copies up to date before any replay reads them.
_FROZEN = [False]


@contextlib.contextmanager
def frozen_factor_copies():
    """Inside: _factor returns the kept cast copy of a factor without refreshing it."""
    _FROZEN[0] = True
    try:
        yield
    finally:
        _FROZEN[0] = False


def refresh_factor_copies() -> None:
    """Bring every kept cast copy up to date now (a new pass: one foreach copy)."""
    new_forward_pass()
    _refresh_copies(_FORWARD_PASS[0])


def _storage_released(t) -> bool:
    """True when t's storage is smaller than t (resized to 0, as FSDP2 does to free the unsharded
    parameters of a unit that is not running)."""
    if t.numel() == 0:
        return False
    last = t.storage_offset() + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
    return t.untyped_storage().nbytes() < (last + 1) * t.element_size()


def _refresh_copies(current) -> None:
    """Bring every kept cast copy up to date for this pass, in one call."""
    _REFRESHED_PASS[0] = current
    dsts, srcs, entries = [], [], []
    for key, (ref, copy) in list(_FACTOR_COPIES.items()):
        t = ref()
        if t is None or t.shape != copy.shape or t.device != copy.device:
            del _FACTOR_COPIES[key]
            continue
        if _storage_released(t):
            # FSDP2 frees an unsharded parameter's storage between its unit's uses and
            # reallocates it for the next: the copy stays and _factor refreshes it when its
            # layer runs (reading the freed storage here was an illegal memory access)
            continue
        dsts.append(copy)
        srcs.append(t.detach())
        entries.append((key, ref, t, copy))
    for key, (stacked, views) in list(_STACKS.items()):  # groups whose factors are gone
        if any(_FACTOR_COPIES.get((tid, key[0]), (None, None))[1] is not view
               for tid, view in zip(key[1:], views)):
            del _STACKS[key]
    if not dsts:
        return
    torch._foreach_copy_(dsts, srcs)
    for (tid, dtype), ref, t, copy in entries:
        _FACTOR_CASTS[tid] = (ref, current, t._version, dtype, copy)


def _factor(t, dtype):
    """A LoRA factor in `dtype`, cast once per forward pass (see _FACTOR_CASTS)."""
    if t is None or t.dtype == dtype:
        return t
    current = _FORWARD_PASS[0]
    if current == 0:
        return t.to(dtype)
    if _FROZEN[0]:
        kept = _FACTOR_COPIES.get((id(t), dtype))
        if kept is not None and kept[0]() is t and kept[1].shape == t.shape:
            return kept[1]
    elif _REFRESHED_PASS[0] != current:
        _refresh_copies(current)
    key = id(t)
    hit = _FACTOR_CASTS.get(key)
    version = t._version
    if hit is not None and hit[0]() is t and hit[1:4] == (current, version, dtype):
        return hit[4]
    try:
        ref = weakref.ref(t)
    except TypeError:
        return t.detach().to(dtype)
    kept = _FACTOR_COPIES.get((key, dtype))
    if kept is not None and kept[0]() is t and kept[1].shape == t.shape:
        cast = kept[1]
        cast.copy_(t.detach())  # in place: a stacked buffer holding it stays whole
    else:
        # a normal tensor even inside torch.inference_mode(): later passes refresh it in place
        with torch.inference_mode(False):
            cast = t.detach().to(dtype)
        _FACTOR_COPIES[(key, dtype)] = [weakref.ref(t, lambda _, k=(key, dtype): _FACTOR_COPIES.pop(k, None)),
                                        cast]
    _FACTOR_CASTS[key] = (ref, current, version, dtype, cast)
    return cast


def _stacked_A(projs, dtype):
    """The A factors of `projs` stacked along the rank, in dtype, so that one GEMM serves all
    their adapters (x·Aᵀ in forward, dA and the rank-r part of dx in backward). The members'
    cast copies are row blocks of the stacked buffer, so the per-pass refresh fills it."""
    As = [p.A for p in projs]
    if len(As) == 1:
        return _factor(As[0], dtype)
    members = [_factor(a, dtype) for a in As]
    if _FORWARD_PASS[0] == 0 or As[0].dtype == dtype:
        return torch.cat(members, 0)
    key = (dtype,) + tuple(id(a) for a in As)
    hit = _STACKS.get(key)
    if hit is not None and all(m is v for m, v in zip(members, hit[1])):
        return hit[0]
    with torch.inference_mode(False):  # normal tensors: refreshed in place later (see _factor)
        stacked = torch.cat(members, 0)
        views = list(stacked.split([a.shape[0] for a in As], 0))
    for a, view in zip(As, views):
        kept = _FACTOR_COPIES.get((id(a), dtype))
        if kept is None:  # (a factor that cannot be weakly referenced)
            return stacked
        kept[1] = view
        cached = _FACTOR_CASTS[id(a)]
        _FACTOR_CASTS[id(a)] = cached[:4] + (view,)
    _STACKS[key] = (stacked, views)
    return stacked


def _lora_inputs(x2, projs, dtype):
    """x·Aᵀ per projection (None without an adapter), from one GEMM over the stacked factors:
    [N, r] column slices of one [N, Σr] product."""
    lora = [p for p in projs if p.has_lora]
    if not lora:
        return [None] * len(projs)
    xa_all = _xa(x2, lora[0], _stacked_A(lora, dtype), dtype)
    out, start = [], 0
    for p in projs:
        if p.has_lora:
            rank = p.A.shape[0]
            out.append(xa_all[:, start:start + rank])
            start += rank
        else:
            out.append(None)
    return out


# With few rows (decoding: one token per sequence) the dense path writes a dequantised copy of
# a 4-bit weight and reads it back, ~4.5 bytes per weight against the packed 0.5 that nf4's
# fused small-M kernel reads. FASTFT_NF4_FUSED_SMALL_M=0 keeps the dense path (for comparison).
_SMALL_M_ROWS = 16  # nf4.SMALL_M: the fused kernel's limit


def small_m_case(rows: int, dtype: torch.dtype) -> bool:
    """Whether `rows` rows computed in `dtype` are a case for the fused small-M kernel (the
    weight itself aside: NF4, on a backend with the kernel)."""
    return (0 < rows <= _SMALL_M_ROWS and dtype in (torch.bfloat16, torch.float16)
            and os.environ.get("FASTFT_NF4_FUSED_SMALL_M", "1") != "0")


def _small_m_inputs(base: Base, dtype):
    """(Resolved state, nf4 backend, bias in dtype) for the fused kernel, or None where there is
    none: not NF4, no nf4 module, or the torch backend (no fused kernel)."""
    nf4 = _nf4_module()
    qs = base.quant_state
    if nf4 is None or getattr(qs, "quant_type", "nf4") != "nf4":
        return None
    from fastft import dispatch

    backend = dispatch.backend_for("nf4_matmul", base.weight.device, dtype)
    if backend == "torch":
        return None
    st = nf4.resolve(base.weight, qs)
    if len(st.shape) != 2:
        return None
    bias = None if base.bias is None else _cast(base.bias, dtype).contiguous()
    return st, dispatch.implementation("nf4_matmul", backend), bias


def _small_m_cached(base: Base, dtype):
    """_small_m_inputs, kept on the Base until the weight's storage changes."""
    ptr = _storage_ptr(base.weight)
    cached = base.small_m.get(dtype)
    if cached is None or cached[0] != ptr:  # new, or the weight's storage was replaced
        cached = base.small_m[dtype] = (ptr, _small_m_inputs(base, dtype))
    return cached[1]


def _small_m_matmul(x2, base: Base, dtype, out=None, low_rank=None):
    """x2 @ Wᵀ (+ bias) by nf4's fused small-M kernel, which reads the packed weight once, into
    `out` (or a new tensor), plus scale * xa @ bᵀ when low_rank = (xa, b, scale) (an adapter's
    term; the kernel adds it where it can); None (out untouched) where that does not apply."""
    if base.quant_state is None or x2.dtype != dtype or not small_m_case(x2.shape[0], dtype):
        return None
    inputs = _small_m_cached(base, dtype)
    if inputs is None:
        return None
    st, impl, bias = inputs
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if not impl.fused_ok(st, x2):
        return None
    if out is None:
        out = x2.new_empty(x2.shape[0], st.shape[0])
    impl.gemv(x2, st, bias, out, low_rank)
    return out


def _xa(x2, proj: Projection, A, dtype):
    """x2·Aᵀ (A: proj's adapter factor, or several stacked): by the small-M backend's own kernel
    where proj's base takes the fused small-M path and the backend has one (CUDA: one launch
    where cuBLAS takes two, and the fused kernel after it overlaps it), else a matmul."""
    if proj.base.quant_state is not None and x2.dtype == dtype and small_m_case(x2.shape[0], dtype):
        inputs = _small_m_cached(proj.base, dtype)
        low_rank_input = getattr(inputs[1], "low_rank_input", None) if inputs is not None else None
        xa = None if low_rank_input is None else low_rank_input(x2, A)
        if xa is not None:
            return xa
    return x2.mm(A.t())


def _small_m_group(x2, projs, dtype, outs, xas) -> bool:
    """Projections of one x2 (an attention layer's q, k and v; an MLP's gate and up) by nf4's
    fused small-M kernel in one launch where the backend has one (CUDA: the weights' fixed
    costs, most of a small weight's time at one token, are paid once), each into its outs[i]
    with its adapter's term (xas[i]: x·Aᵀ); False (outs untouched) where that does not apply to
    every projection."""
    if len(projs) < 2 or x2.dtype != dtype or not small_m_case(x2.shape[0], dtype):
        return False
    if os.environ.get("FASTFT_NF4_GROUP", "1") == "0":  # one launch per weight (comparisons)
        return False
    if any(p.base.quant_state is None for p in projs):
        return False
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    calls, impl = [], None
    for p, out, xa in zip(projs, outs, xas):
        inputs = _small_m_cached(p.base, dtype)
        if inputs is None or (impl is not None and inputs[1] is not impl):
            return False
        st, impl, bias = inputs
        if not impl.fused_ok(st, x2):
            return False
        low_rank = (xa, _factor(p.B, dtype), p.scaling) if p.has_lora else None
        calls.append((st, bias, out, low_rank))
    impl.gemv_group(x2, calls)
    return True


def _project_each(x2, projs, dtype, outs, xas) -> None:
    """_project for each of projs into outs[i] (xas[i]: its x·Aᵀ), in one small-M launch where
    _small_m_group applies."""
    if not _small_m_group(x2, projs, dtype, outs, xas):
        for p, out, xa in zip(projs, outs, xas):
            _project(x2, p, dtype, out=out, xa=xa)


def _base_matmul(x2, base: Base, dtype, out=None):
    """x2 [N, in] @ Wᵀ (+ bias) in dtype (into `out` [N, out_features] when given)."""
    fused = _small_m_matmul(x2, base, dtype, out)
    if fused is not None:
        return fused
    W = dense_weight(base, dtype)
    if base.bias is not None:
        return torch.addmm(_cast(base.bias, dtype), x2, W.t(), out=out)
    return torch.mm(x2, W.t(), out=out)


def _new_output(lead_shape, features, dtype, device):
    """An output tensor of its final shape and its [N, features] view to compute into: autograd
    forbids in-place changes (e.g. fastft's in-place RoPE on q / k) of outputs of a custom
    Function that are views, so what we return must not be one."""
    y = torch.empty(*lead_shape, features, dtype=dtype, device=device)
    return y, y.view(-1, features)


def _project(x2, proj: Projection, dtype, out=None, xa=None):
    """(y, x·Aᵀ) for one projection; x·Aᵀ is None without an adapter (pass it as `xa` when it
    was computed with other projections' in one GEMM, see _lora_inputs).

    The rank-r term is written first and the base GEMM accumulates onto it (beta = 1): y is then
    read once, inside the big GEMM's epilogue, instead of in a separate memory-bound pass over
    [tokens, out] after it."""
    if not proj.has_lora:
        return _base_matmul(x2, proj.base, dtype, out=out), None
    if xa is None:
        xa = _xa(x2, proj, _factor(proj.A, dtype), dtype)
    if out is None:
        out = torch.empty(x2.shape[0], proj.base.out_features, dtype=dtype, device=x2.device)
    B_rows = _factor(proj.B, dtype)  # [out_features, r]
    if _small_m_matmul(x2, proj.base, dtype, out, (xa, B_rows, proj.scaling)) is not None:
        return out, xa
    B = B_rows.t()
    if proj.base.bias is not None:
        torch.addmm(_cast(proj.base.bias, dtype), xa, B, alpha=proj.scaling, out=out)
    else:  # beta = 0: out's old content (uninitialised memory) is never read
        out.addmm_(xa, B, beta=0.0, alpha=proj.scaling)
    out.addmm_(x2, dense_weight(proj.base, dtype).t())
    return out, xa


def _scaled_mm(a, b, scale):
    """scale * (a @ b) with the scale applied inside the GEMM (alpha; beta = 0 so the new
    buffer's content is never read): one kernel and one host call instead of two."""
    out = torch.empty(a.shape[0], b.shape[1], dtype=a.dtype, device=a.device)
    return out.addmm_(a, b, beta=0.0, alpha=scale)


# torch.mm(a, b, out_dtype=torch.float32) (torch >= 2.8, CUDA): bf16/fp16 inputs, fp32 result
# straight from the GEMM's fp32 accumulator.
_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")


def _grad_mm(a, b, grad_dtype, scale=1.0):
    """scale * (a @ b) as a LoRA factor's gradient in `grad_dtype` (the factor's own dtype).
    peft keeps factors in fp32 while the step computes in bf16: on CUDA the GEMM then writes
    fp32 itself instead of a bf16 result that a cast kernel converts (14 casts per decoder
    layer and step, and the bf16 rounding of the gradient, saved)."""
    if (grad_dtype == torch.float32 and a.dtype in (torch.bfloat16, torch.float16) and a.is_cuda
            and _MM_OUT_DTYPE):
        out = torch.mm(a, b, out_dtype=torch.float32)
        return out if scale == 1.0 else out.mul_(scale)
    out = a.mm(b) if scale == 1.0 else _scaled_mm(a, b, scale)
    return out.to(grad_dtype)


def _lora_grads(dy, xa, proj: Projection, dtype):
    """dB (in the factor's dtype) and the [N, r] term d(x·Aᵀ)·s of one projection; dA and dx's
    rank-r part come from _input_side, for all projections of one input at once."""
    s = proj.scaling
    dB = _grad_mm(dy.t(), xa, proj.B.dtype, s)            # [out, r]
    dxa = _scaled_mm(dy, _factor(proj.B, dtype), s)       # [N, r]
    return dB, dxa


def _input_side(x2, lora_terms, dtype, need_dx):
    """For the adapters of one input x2, `lora_terms` [(d(x·Aᵀ)·s, projection)]: the dA of
    each (in its factor's dtype) and the rank-r part of dx (None if not needed), each one GEMM
    over the concatenated ranks."""
    if not lora_terms:
        return [], None
    projs = [p for _, p in lora_terms]
    dxa = lora_terms[0][0] if len(lora_terms) == 1 else torch.cat([d for d, _ in lora_terms], 1)
    grad_dtype = projs[0].A.dtype
    if any(p.A.dtype != grad_dtype for p in projs):
        grad_dtype = dtype
    dA_all = _grad_mm(dxa.t(), x2, grad_dtype)            # [Σr, in]
    dAs, start = [], 0
    for p in projs:
        rank = p.A.shape[0]
        # row blocks of one buffer: autograd takes such a view as the .grad as it is
        dAs.append(dA_all[start:start + rank].to(p.A.dtype))
        start += rank
    dx = dxa.mm(_stacked_A(projs, dtype)) if need_dx else None
    return dAs, dx


def _input_grad(outputs, dx, dtype):
    """dx (the rank-r part from _input_side, or None) + Σ dy·W over `outputs`
    [(dy, projection)]: each base GEMM accumulates onto dx (beta = 1), so dx is never re-read
    by a separate pass."""
    for dy, p in outputs:
        W = dense_weight(p.base, dtype)  # right before its use: a 4-bit W is the shared workspace
        dx = dy.mm(W) if dx is None else dx.addmm_(dy, W)
    return dx


def _lora_tensors(projs):
    """Flat tuple of the adapter tensors (so autograd sees them as inputs)."""
    out = []
    for p in projs:
        out += [p.A, p.B]
    return out


def _rows(x):
    return x.reshape(-1, x.shape[-1])


_NO_CONTEXT = contextlib.nullcontext()


def _autocast_off(device_type):
    """Our matmuls pick their dtype explicitly; autocast must not re-cast them. Only where
    autocast is on: building its context costs host time on every call."""
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return _NO_CONTEXT


# --- one projection / q,k,v -----------------------------------------------------------------

class _LoRAProjections(torch.autograd.Function):
    """k projections of one input x; used for q/k/v (k=3) and for single linears (k=1).

    reuse, inside an offloaded checkpoint (see fastft.offload.stash_put):
      "output" (o_proj): the first forward stashes y, the recompute takes it back instead of
        running the GEMMs again; only x·Aᵀ, which the backward needs, is recomputed.
      "attention inputs" (q/k/v whose outputs reach attention only through RoPE): when the
        attention that follows stashed q/k/v, the recompute skips these GEMMs (outputs left
        unwritten, never read) and computes only x·Aᵀ.
      None: always computed."""

    @staticmethod
    def forward(ctx, x, projs, reuse, *adapter_tensors):
        dtype = _compute_dtype(x)
        with _autocast_off(x.device.type):
            x2 = _cast(_rows(x), dtype)
            taken = None
            if reuse == "output" and offload.replaying():
                taken = offload.stash_take(_REUSE_TAG)
            if taken is not None:
                (y,), _ = taken
                p = projs[0]
                outs = [y]
                xas = _lora_inputs(x2, projs, dtype)
            elif reuse == "attention inputs" and offload.replaying() and _attention().reused_inputs_ahead():
                # attention will take q/k/v from the stash and nothing else reads these values
                # (RoPE's backward does not): only the autograd node and x·Aᵀ are needed
                outs = [_new_output(x.shape[:-1], p.base.out_features, dtype, x.device)[0] for p in projs]
                xas = _lora_inputs(x2, projs, dtype)
            else:
                xas = _lora_inputs(x2, projs, dtype)
                made = [_new_output(x.shape[:-1], p.base.out_features, dtype, x.device)
                        for p in projs]
                _project_each(x2, projs, dtype, [y2 for _, y2 in made], xas)
                outs = [y for y, _ in made]
                if reuse == "output" and offload.stashing():
                    offload.stash_put(_REUSE_TAG, outs)
                elif reuse == "attention inputs" and offload.stashing():
                    offload.stash_note(_attention().QKV_NOTE)
        ctx.projs = projs
        ctx.dtype = dtype
        ctx.x_dtype = x.dtype
        ctx.x_shape = x.shape
        ctx.has_xa = [xa is not None for xa in xas]
        ctx.save_for_backward(x2, *[xa for xa in xas if xa is not None])
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        x2, *saved_xa = ctx.saved_tensors
        it = iter(saved_xa)
        xas = [next(it) if has else None for has in ctx.has_xa]
        dtype = ctx.dtype
        need_dx = ctx.needs_input_grad[0]
        dBs, outputs, lora_terms = {}, [], []
        with _autocast_off(x2.device.type):
            for i, (p, g, xa) in enumerate(zip(ctx.projs, grads, xas)):
                if g is None:
                    continue
                dy = _cast(_rows(g), dtype)
                outputs.append((dy, p))
                if p.has_lora:
                    dBs[i], dxa = _lora_grads(dy, xa, p, dtype)
                    lora_terms.append((dxa, p))
            dAs, dx = _input_side(x2, lora_terms, dtype, need_dx)
            dx = _input_grad(outputs, dx, dtype) if need_dx else None
        dAs = iter(dAs)
        adapter_grads = []
        for i in range(len(ctx.projs)):
            adapter_grads += [next(dAs), dBs[i]] if i in dBs else [None, None]
        if dx is not None:
            dx = dx.view(ctx.x_shape).to(ctx.x_dtype)
        return (dx, None, None, *adapter_grads)


_REUSE_TAG = "projection output"


def _attention():
    return _module("fastft.attention")  # imported late: it imports transformers' integrations


def lora_linear(x: torch.Tensor, proj: Projection, reuse_in_recompute: bool = False) -> torch.Tensor:
    """y = x·Wᵀ (+ bias) + s·(x·Aᵀ)·Bᵀ with a manual backward (dx, dA, dB).

    reuse_in_recompute: inside fastft's offloaded checkpoints, send y to the host with the
    layer's input and take it back in the recompute instead of recomputing it (worth it where
    the output is small next to the GEMM, e.g. attention's o_proj)."""
    return _LoRAProjections.apply(x, (proj,), "output" if reuse_in_recompute else None,
                                  *_lora_tensors((proj,)))[0]


def lora_qkv(x: torch.Tensor, q: Projection, k: Projection, v: Projection,
             skip_when_attention_reuses: bool = False):
    """(q, k, v) projections of one input in one autograd node; x is saved once.

    skip_when_attention_reuses: the outputs reach attention only through value-free ops (RoPE,
    reshapes), so inside fastft's offloaded checkpoints the recompute may skip the GEMMs when
    the attention that follows takes q/k/v from the stash (fastft/attention.py)."""
    return _LoRAProjections.apply(x, (q, k, v), "attention inputs" if skip_when_attention_reuses else None,
                                  *_lora_tensors((q, k, v)))


# --- activations -----------------------------------------------------------------------------

ACTIVATIONS = ("swiglu", "geglu", "geglu_tanh")
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


_GLU_ACT = {"swiglu": ("swiglu", "silu"), "geglu": ("geglu", "gelu"), "geglu_tanh": ("geglu", "gelu_tanh")}


def _glu_backend(kind, device, dtype):
    """fastft.ops.activations' backend object for this device (forward(gate, up, out, act),
    backward(dh, gate, up, d_gate, d_up, act) writing into gate/up when d_* is None) and its
    activation name; None when that module is not there. CPU uses its torch backend (the
    Triton interpreter would only slow the CPU path down)."""
    if _module("fastft.ops.activations") is None:
        return None
    dispatch = _module("fastft.dispatch")
    op, act = _GLU_ACT[kind]
    backend = dispatch.backend_for(op, device, dtype, "torch" if device.type != "cuda" else None)
    return dispatch.implementation(op, backend), act


def _act_forward(kind, g, u):
    """h = act(g) * u for [N, I] tensors (inside our Functions: no autograd needed)."""
    found = _glu_backend(kind, g.device, g.dtype)
    if found is None:
        return _act_forward_reference(kind, g, u)
    impl, act = found
    h = torch.empty_like(g)
    impl.forward(g, u, h, act)
    return h


def _act_forward_reference(kind, g, u):
    gf = g.float()
    if kind == "swiglu":
        a = torch.nn.functional.silu(gf)
    else:
        a = torch.nn.functional.gelu(gf, approximate="tanh" if kind == "geglu_tanh" else "none")
    return (a * u.float()).to(g.dtype)


def _act_backward_inplace(kind, dh, g, u, need_h=True):
    """For h = act(g)·u and dh = dL/dh: overwrites g with dL/dg and u with dL/du (in place, no
    new [N, I] gradient buffers) and returns h (None when not needed), written over dh: one
    kernel reads dh, g, u and writes h, dL/dg, dL/du."""
    found = _glu_backend(kind, g.device, g.dtype)
    if found is None:
        return _act_backward_reference_(kind, dh, g, u)
    impl, act = found
    h = dh if need_h else None
    impl.backward(dh, g, u, None, None, act, h=h)
    return h


def _act_backward_reference_(kind, dh, g, u, chunk_elems=1 << 24):
    h = dh  # each chunk of dh is read before h is written over it
    rows = g.shape[0]
    step = max(1, chunk_elems // max(1, g.shape[1]))
    for i in range(0, rows, step):
        gf, uf, dhf = g[i:i + step].float(), u[i:i + step].float(), dh[i:i + step].float()
        if kind == "swiglu":
            sg = torch.sigmoid(gf)
            a = gf * sg
            da = sg * (1.0 + gf * (1.0 - sg))
        elif kind == "geglu":
            cdf = 0.5 * (1.0 + torch.erf(gf * (1.0 / math.sqrt(2.0))))
            pdf = torch.exp(-0.5 * gf * gf) * (1.0 / math.sqrt(2.0 * math.pi))
            a = gf * cdf
            da = cdf + gf * pdf
        else:  # tanh approximation
            inner = _SQRT_2_OVER_PI * (gf + 0.044715 * gf * gf * gf)
            t = torch.tanh(inner)
            a = 0.5 * gf * (1.0 + t)
            da = 0.5 * (1.0 + t) + 0.5 * gf * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * gf * gf)
        h[i:i + step] = (a * uf).to(h.dtype)
        u[i:i + step] = (dhf * a).to(u.dtype)
        g[i:i + step] = (dhf * uf * da).to(g.dtype)
    return h


# --- gated MLP -------------------------------------------------------------------------------

# Tile the MLP over tokens when tokens × intermediate exceeds 2 × this many elements; each tile
# then holds at most this many (so [tokens, intermediate] tensors never exist whole).
MLP_TILE_ELEMENTS = int(os.environ.get("FASTFT_MLP_TILE_ELEMENTS", str(1 << 26)))


def mlp_tile_tokens(tokens: int, intermediate: int, tile_elements: int | None = None) -> int | None:
    """Tokens per tile for the tiled MLP, or None when the whole sequence fits one pass."""
    limit = MLP_TILE_ELEMENTS if tile_elements is None else tile_elements
    if limit <= 0 or tokens * intermediate <= 2 * limit:
        return None
    most = max(1, limit // intermediate)
    # Equal tiles (no small remainder tile) of a multiple of 128 tokens where that is possible:
    # matmuls over 4681 + 4681 + 4681 + 2341 rows ran less efficiently than over 4 x 4096.
    tiles = -(-tokens // most)
    tile = -(-tokens // tiles)
    if tile > 128:
        tile = min(-(-tile // 128) * 128, most + 127)
    return tile


def _mlp_tile_forward(x2, gate, up, down, kind, dtype, out, need_output=True):
    """One tile's forward into `out`; returns what its backward needs (g, u, x·Aᵀ of gate and
    up, h·Aᵀ of down). need_output=False skips the down projection's base matmul and leaves
    `out` unwritten (a recompute that never reads the output; the tiled backward). It also
    skips h and h·Aᵀ (returned as None): the activation backward writes h anyway, and
    _mlp_tile_backward takes h·Aᵀ from that h instead of running the activation twice."""
    xag, xau = _lora_inputs(x2, (gate, up), dtype)
    g = x2.new_empty(x2.shape[0], gate.base.out_features, dtype=dtype)
    u = x2.new_empty(x2.shape[0], up.base.out_features, dtype=dtype)
    _project_each(x2, (gate, up), dtype, (g, u), (xag, xau))
    if not need_output:
        return g, u, xag, xau, None
    h = _act_forward(kind, g, u)
    _, ha = _project(h, down, dtype, out=out)
    return g, u, xag, xau, ha


def _mlp_tile_backward(dy, x2, g, u, xag, xau, ha, gate, up, down, kind, dtype, need_dx):
    """Backward of one tile; g and u are overwritten (they become d_gate, d_up). ha (h·Aᵀ of
    the down adapter) None: computed here from the h the activation backward writes.
    Returns dx (or None) and the six adapter grads (gate A/B, up A/B, down A/B; None when absent)."""
    dxa_d = None
    if down.has_lora:  # rank-r term first; the base GEMM accumulates onto it (see _project)
        dxa_d = _scaled_mm(dy, _factor(down.B, dtype), down.scaling)  # [N, r]
        dh = dxa_d.mm(_factor(down.A, dtype))                      # [N, I]
        dh.addmm_(dy, dense_weight(down.base, dtype))
    else:
        dh = dy.mm(dense_weight(down.base, dtype))
    h = _act_backward_inplace(kind, dh, g, u, need_h=down.has_lora)  # g <- d_gate, u <- d_up
    del dh
    dBs, lora_terms = [None, None], []
    for i, (p, dout, xa) in enumerate(((gate, g, xag), (up, u, xau))):
        if p.has_lora:
            dBs[i], dxa = _lora_grads(dout, xa, p, dtype)
            lora_terms.append((dxa, p))
    dAs, dx = _input_side(x2, lora_terms, dtype, need_dx)
    dAs = iter(dAs)
    dA_g = next(dAs) if gate.has_lora else None
    dA_u = next(dAs) if up.has_lora else None
    if down.has_lora:
        if ha is None:
            ha = h.mm(_factor(down.A, dtype).t())
        dB_d = _grad_mm(dy.t(), ha, down.B.dtype, down.scaling)
        dA_d = _grad_mm(dxa_d.t(), h, down.A.dtype)
    else:
        dA_d = dB_d = None
    del h
    if need_dx:
        dx = _input_grad([(g, gate), (u, up)], dx, dtype)
    return dx, [dA_g, dBs[0], dA_u, dBs[1], dA_d, dB_d]


def _add(acc, value):
    if value is None:
        return acc
    return value if acc is None else acc.add_(value)


class _LoRAMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate, up, down, kind, tile_tokens, output_needed, *adapter_tensors):
        dtype = _compute_dtype(x)
        with _autocast_off(x.device.type):
            x2 = _cast(_rows(x), dtype)
            n = x2.shape[0]
            y, y2 = _new_output(x.shape[:-1], down.base.out_features, dtype, x.device)
            # output_needed=False (a checkpoint recompute whose output values nobody reads):
            # no down projection (a third of the MLP's FLOPs), and tiled nothing at all, since
            # the tiled backward recomputes each tile itself. y then stays unwritten.
            ctx.tiled = not (tile_tokens is None or tile_tokens >= n)
            if not ctx.tiled:
                g, u, xag, xau, ha = _mlp_tile_forward(x2, gate, up, down, kind, dtype, y2,
                                                       need_output=output_needed)
                saved = [x2, g, u] + [t for t in (xag, xau, ha) if t is not None]
                ctx.has_ha = ha is not None  # else the backward takes it from its own h
            else:
                if output_needed:
                    with _HeldDense((gate.base, up.base, down.base), dtype, MLP_HOLD_WEIGHTS):
                        for i in range(0, n, tile_tokens):
                            _mlp_tile_forward(x2[i:i + tile_tokens], gate, up, down, kind, dtype,
                                              y2[i:i + tile_tokens])
                saved = [x2]
        ctx.projs = (gate, up, down)
        ctx.kind = kind
        ctx.tile_tokens = tile_tokens
        ctx.dtype = dtype
        ctx.x_dtype = x.dtype
        ctx.x_shape = x.shape
        ctx.save_for_backward(*saved)
        return y

    @staticmethod
    def backward(ctx, dy):
        gate, up, down = ctx.projs
        dtype, kind = ctx.dtype, ctx.kind
        need_dx = ctx.needs_input_grad[0]
        dy2 = _cast(_rows(dy), dtype)
        with _autocast_off(dy.device.type):
            if not ctx.tiled:
                x2, g, u, *small = ctx.saved_tensors
                it = iter(small)
                xag = next(it) if gate.has_lora else None
                xau = next(it) if up.has_lora else None
                ha = next(it) if ctx.has_ha else None
                dx, grads = _mlp_tile_backward(dy2, x2, g, u, xag, xau, ha, gate, up, down,
                                               kind, dtype, need_dx)
            else:
                (x2,) = ctx.saved_tensors
                n, step = x2.shape[0], ctx.tile_tokens
                dx = torch.empty_like(x2) if need_dx else None
                grads = [None] * 6
                with _HeldDense((gate.base, up.base, down.base), dtype, MLP_HOLD_WEIGHTS):
                    for i in range(0, n, step):
                        xt = x2[i:i + step]
                        g, u, xag, xau, ha = _mlp_tile_forward(xt, gate, up, down, kind, dtype,
                                                               None, need_output=False)
                        dxt, tile_grads = _mlp_tile_backward(dy2[i:i + step], xt, g, u, xag, xau, ha,
                                                             gate, up, down, kind, dtype, need_dx)
                        if need_dx:
                            dx[i:i + step] = dxt
                        grads = [_add(a, b) for a, b in zip(grads, tile_grads)]
                        # this tile's [tokens, intermediate] buffers go before the next tile makes
                        # its own (else two tiles' g/u are alive at once: +224 MiB at 4x4096, 8B)
                        del g, u, xag, xau, ha, dxt, tile_grads
        if dx is not None:
            dx = dx.view(ctx.x_shape).to(ctx.x_dtype)
        # in the factors' dtype already where _grad_mm could (then .to is free)
        adapter_grads = [None if t is None else gr.to(t.dtype)
                         for gr, t in zip(grads, _lora_tensors(ctx.projs))]
        return (dx, None, None, None, None, None, None, *adapter_grads)


def lora_mlp(x: torch.Tensor, gate: Projection, up: Projection, down: Projection,
             activation: str = "swiglu", tile_tokens: int | None | str = "auto",
             output_needed: bool = True) -> torch.Tensor:
    """down(act(gate(x)) * up(x)) with LoRA on each projection and a manual backward.

    activation: "swiglu" (SiLU), "geglu" (erf GELU) or "geglu_tanh".
    tile_tokens: "auto" tiles long inputs (see MLP_TILE_ELEMENTS), None never tiles, an int
    sets the tile size in tokens.
    output_needed=False: the caller will only backpropagate through the result and never read
    its values (a checkpoint recompute whose output goes straight into a residual sum): the
    returned tensor is left unwritten and the down projection's matmul is skipped."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r} is not supported; use one of {ACTIVATIONS}")
    if tile_tokens == "auto":
        tokens = x.numel() // x.shape[-1]
        tile_tokens = mlp_tile_tokens(tokens, gate.base.out_features)
    elif tile_tokens is not None and int(tile_tokens) < 1:
        raise ValueError(f"tile_tokens={tile_tokens} must be a positive number of tokens, None or 'auto'")
    projs = (gate, up, down)
    return _LoRAMLP.apply(x, gate, up, down, activation, tile_tokens, bool(output_needed),
                          *_lora_tensors(projs))
