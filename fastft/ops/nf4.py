"""nf4_dequantize and nf4_matmul: bitsandbytes' NF4 (4-bit NormalFloat) weights, our compute.

The storage format is bitsandbytes' (so `*-bnb-4bit` checkpoints and BitsAndBytesConfig models
work unchanged):
  * the weight of shape `shape` is flattened (row-major) and cut into blocks of `blocksize`
    values (the last block may be short); element i belongs to block i // blocksize;
  * each value is a 4-bit index into `code` (the 16 NF4 levels in [-1, 1]); two indices per
    byte, the element with the even flat index in the HIGH nibble;
  * absmax[b] scales block b.  Plain: absmax is float32.  Nested ("double quantisation",
    compress_statistics=True): absmax is uint8 indices into state2.code (256 float32 levels),
    with one float32 state2.absmax per state2.blocksize (256) blocks, and a float32 `offset`:
        scale[b] = state2.code[absmax[b]] * state2.absmax[b // 256] + offset
  * value = code[index] * scale, computed in float32 and then rounded to the output dtype.
Every backend follows exactly this order of float32 operations (one multiply, one add, one
multiply: never fused into an FMA), so its output is bit-identical to bitsandbytes'.

nf4_matmul(x, W) = x @ W.T (+ bias) where W is the dequantised [out, in] weight, in x's dtype.
Up to SMALL_M rows of x (decode) a fused kernel reads the packed weight directly (bf16/fp16 x;
the Triton kernel and CUDA's v1 multiply by exactly the dequantised W, each value rounded as
nf4_dequantize rounds it, so they differ from dequantise + matmul only in the float32 summation
order). CUDA's v2 and v3 (in_features % 64 == 0, blocksize >= 64) multiply by the NF4 levels
rounded to fp16 and apply each block's float32 scale to the float32 sums, i.e. W to 2^-11 per
level; v3 spends ~2 instructions per packed byte; v4 (sm_90) has the same numerics (but bf16 x
is scaled into fp16 per token and 64-value step, where v3 scales per token; at 9..16 rows bf16 x
goes to bf16 mma as it is, against each level as two bf16 parts: W to ~2^-17 per level) and
streams the weight and x into shared memory with the copy engine (it also adds a LoRA term in its
epilogue).
The CUDA backend picks v4 where the input has 3072 or more features and either the output is at
least as wide, at M <= 16 where the busiest SM gets 2 or more 16-row tiles (e.g. Llama-3-8B's q /
o, and gate / up as single calls), or narrower, at M = 1..16 (two CTAs of a cluster split K where
the input has 8192 or more features or M > 8, except at M = 1 with up to 16384 input features;
e.g. Llama-3-8B's down, k / v; Qwen2.5-7B's and -14B's MLPs likewise); where a CTA would take
more than 16 tiles (8 at M > 8), a row's scales are not whole 4-byte pieces (nested, e.g. 4544
input features) or 8-byte pieces (plain scales), or two stages do not fit, v3 / v1; else v3h (v3
with half of the level lookups done in registers instead of shared memory: the same results)
where the output is at least twice as wide, v3 at M <= 8 where it is at most half as wide (faster
than v1 there on the H200), v1 elsewhere; FASTFT_NF4_GEMV forces one (see gemv_settings).
Larger inputs, float32 x and shapes the fused kernels don't take dequantise W into a per-device
workspace (reused by every layer, see workspace()) and call cuBLAS. Only x (and a bias) get
gradients: the quantised weight is frozen; backward dequantises again (dx = dy @ W), nothing
W-sized is saved.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import weakref
from typing import Any, NamedTuple

import torch

from fastft import dispatch
from fastft.ops import _common
from fastft.ops._common import cuda_ops, new_empty

# bitsandbytes' NF4 levels as float32 (the exact values of bitsandbytes.functional.get_4bit_type
# ("nf4"), which its CPU and CUDA kernels use).
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
# Rows of x up to which nf4_matmul uses the fused kernel that reads the packed weight.
SMALL_M = 16
VALID_BLOCKSIZES = tuple(2 ** p for p in range(5, 13))  # 32 .. 4096, as bitsandbytes


# ---------------------------------------------------------------- the quantisation state

@dataclasses.dataclass
class NF4NestedState:
    """The second-level state of double-quantised absmax (bitsandbytes' QuantState.state2)."""

    absmax: torch.Tensor          # float32 [ceil(blocks / blocksize)]
    code: torch.Tensor            # float32 [256]: the 8-bit level table
    blocksize: int = 256


@dataclasses.dataclass
class NF4State:
    """fastft's own NF4 quantisation state: bitsandbytes' QuantState fields as plain tensors,
    so the kernels run without bitsandbytes."""

    absmax: torch.Tensor          # float32 [blocks], or uint8 [blocks] when nested
    shape: torch.Size             # the dequantised weight's shape, e.g. [out, in]
    code: torch.Tensor | None = None      # float32 [16]; None means NF4_LEVELS
    dtype: torch.dtype = torch.bfloat16   # default output dtype of nf4_dequantize
    blocksize: int = 64
    quant_type: str = "nf4"
    offset: torch.Tensor | float | None = None   # nested only
    state2: NF4NestedState | None = None         # nested only

    @property
    def nested(self) -> bool:
        return self.state2 is not None

    @classmethod
    def from_bnb(cls, quant_state: Any) -> "NF4State":
        """Copy the fields of a bitsandbytes QuantState (no bitsandbytes import needed)."""
        if not hasattr(quant_state, "absmax") or not hasattr(quant_state, "shape"):
            raise TypeError(f"expected a bitsandbytes QuantState, got {type(quant_state).__name__}")
        s2 = getattr(quant_state, "state2", None)
        nested = None
        if s2 is not None:
            nested = NF4NestedState(absmax=s2.absmax, code=s2.code, blocksize=int(s2.blocksize))
        return cls(absmax=quant_state.absmax, shape=torch.Size(quant_state.shape),
                   code=getattr(quant_state, "code", None),
                   dtype=getattr(quant_state, "dtype", None) or torch.bfloat16,
                   blocksize=int(quant_state.blocksize),
                   quant_type=getattr(quant_state, "quant_type", "nf4"),
                   offset=getattr(quant_state, "offset", None) if nested else None,
                   state2=nested)

    def to(self, device) -> "NF4State":
        move = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t  # noqa: E731
        s2 = self.state2
        if s2 is not None:
            s2 = NF4NestedState(move(s2.absmax), move(s2.code), s2.blocksize)
        return dataclasses.replace(self, absmax=move(self.absmax), code=move(self.code),
                                   offset=move(self.offset), state2=s2)


class Resolved(NamedTuple):
    """A validated state in the form the kernels take (all tensors on the packed's device)."""

    packed: torch.Tensor          # uint8 [>= ceil(numel / 2)], flat
    absmax: torch.Tensor          # float32 [blocks] or uint8 [blocks] (nested)
    absmax2: torch.Tensor | None  # float32, nested only
    code2: torch.Tensor | None    # float32 [256], nested only
    offset: torch.Tensor | None   # float32 [1], nested only
    code: torch.Tensor            # float32 [16]
    blocksize: int
    blocksize2: int               # 0 when not nested
    shape: tuple
    numel: int
    dtype: torch.dtype


_LEVELS_BY_DEVICE: dict = {}


def _nf4_levels(device) -> torch.Tensor:
    t = _LEVELS_BY_DEVICE.get(device)
    if t is None:
        t = _LEVELS_BY_DEVICE[device] = torch.tensor(NF4_LEVELS, dtype=torch.float32,
                                                     device=device)
    return t


def _plain(t: torch.Tensor) -> torch.Tensor:
    """Strip tensor subclasses (bitsandbytes' Params4bit) so custom ops see a plain tensor."""
    if isinstance(t, torch.nn.Parameter) or type(t) is not torch.Tensor:
        t = t.data
        if type(t) is not torch.Tensor:
            t = t.as_subclass(torch.Tensor)
    return t


def _on(t, device, name: str, dtype=None, numel=None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"nf4: quant_state.{name} must be a tensor, got {type(t).__name__}")
    if t.device != device:
        raise ValueError(f"nf4: quant_state.{name} is on {t.device} but the packed weight is on "
                         f"{device}; move the state with the weight (quant_state.to(device))")
    if dtype is not None and t.dtype != dtype:
        if dtype == torch.float32 and t.dtype.is_floating_point:
            t = t.float()
        else:
            raise ValueError(f"nf4: quant_state.{name} must be {dtype}, got {t.dtype}")
    if numel is not None and t.numel() != numel:
        raise ValueError(f"nf4: quant_state.{name} has {t.numel()} elements, expected {numel}")
    return _plain(t).reshape(-1).contiguous()


# id(quant_state) -> (weak ref to it, identity key, Resolved): QLoRA dequantises every frozen
# weight several times a step, and validating its state each time cost more host time than the
# kernel takes. Keyed by id: bitsandbytes' QuantState defines __eq__ and so is unhashable.
_RESOLVED: dict = {}


def _identity(packed, qs) -> tuple:
    """What a Resolved depends on: the storage of every tensor it views, and the scalars."""
    state2 = getattr(qs, "state2", None)
    ptr = lambda t: (t.data_ptr(), t.device, t.dtype, t.numel()) if isinstance(t, torch.Tensor) else t  # noqa: E731
    return (ptr(packed), ptr(getattr(qs, "absmax", None)), ptr(getattr(qs, "code", None)),
            ptr(getattr(qs, "offset", None)), tuple(getattr(qs, "shape", ())),
            getattr(qs, "blocksize", None), getattr(qs, "quant_type", None), getattr(qs, "dtype", None),
            getattr(qs, "packing_format_for_cpu", False),
            None if state2 is None else (ptr(state2.absmax), ptr(state2.code), state2.blocksize))


def resolve(packed: torch.Tensor, quant_state=None) -> Resolved:
    """Validate a packed NF4 weight and its state (bitsandbytes QuantState or NF4State).
    The result is cached per state object until any tensor or field it depends on changes."""
    if quant_state is None:
        quant_state = getattr(packed, "quant_state", None)
        if quant_state is None:
            raise ValueError("nf4: no quant_state given and the packed weight has none "
                             "(pass bitsandbytes' weight.quant_state or a fastft NF4State)")
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"nf4: packed must be a tensor, got {type(packed).__name__}")
    if torch.compiler.is_compiling():  # traced once into the graph; data pointers are not
        return _resolve(packed, quant_state)  # values the compiler can compare
    try:
        key = _identity(packed, quant_state)
    except RuntimeError:  # tensors without storage (fake tensors): no caching
        return _resolve(packed, quant_state)
    sid = id(quant_state)
    hit = _RESOLVED.get(sid)
    if hit is not None and hit[0]() is quant_state and hit[1] == key:
        return hit[2]
    resolved = _resolve(packed, quant_state)
    try:
        ref = weakref.ref(quant_state, lambda _, sid=sid: _RESOLVED.pop(sid, None))
    except TypeError:  # cannot be weakly referenced: not cached
        return resolved
    _RESOLVED[sid] = (ref, key, resolved)
    return resolved


def forget(quant_state) -> None:
    """Drop the cached Resolved of `quant_state`, which views its packed weight's storage: when
    that weight is replaced (FSDP2 shards it), the old storage is freed now, not at the next
    resolve of this state."""
    _RESOLVED.pop(id(quant_state), None)


def _resolve(packed: torch.Tensor, qs) -> Resolved:
    quant_type = getattr(qs, "quant_type", "nf4")
    if quant_type != "nf4":
        raise ValueError(f"nf4: quant_type {quant_type!r} is not supported, only 'nf4' is; "
                         f"quantise with bnb_4bit_quant_type='nf4'")
    if getattr(qs, "packing_format_for_cpu", False):
        raise ValueError("nf4: this weight is in bitsandbytes' CPU-repacked layout (a Linear4bit "
                         "ran inference on the CPU), not the NF4 storage layout; undo it with "
                         "bitsandbytes.functional._convert_weight_packed_for_cpu_inverse(weight."
                         "data, weight.quant_state) or run that layer in training mode")
    blocksize = int(getattr(qs, "blocksize", 64))
    if blocksize not in VALID_BLOCKSIZES:
        raise ValueError(f"nf4: blocksize {blocksize} is not supported; use a power of two "
                         f"from 32 to 4096 (bitsandbytes' default is 64)")
    shape = tuple(int(s) for s in qs.shape)
    numel = math.prod(shape)
    device = packed.device
    packed = _plain(packed)
    # bitsandbytes' quant_storage may be another dtype: its bytes are the packed weight, rounded
    # up to a whole element at most
    spare = packed.element_size() - 1
    if packed.dtype != torch.uint8:
        if not packed.is_contiguous():
            packed = packed.contiguous()
        packed = packed.view(torch.uint8)
    packed = packed.reshape(-1)
    if not packed.is_contiguous():
        packed = packed.contiguous()
    needed = (numel + 1) // 2
    if not needed <= packed.numel() <= needed + spare:
        more = ("; more than the weight holds: pass the packed bytes themselves (e.g. a "
                "Params4bit's data), not a converted copy" if packed.numel() > needed else "")
        raise ValueError(f"nf4: packed weight has {packed.numel()} bytes but shape {list(shape)} "
                         f"needs {needed}{more}")
    blocks = -(-numel // blocksize)
    code = getattr(qs, "code", None)
    code = _nf4_levels(device) if code is None else _on(code, device, "code", torch.float32, 16)
    state2 = getattr(qs, "state2", None)
    if state2 is None:
        absmax = _on(qs.absmax, device, "absmax", torch.float32, blocks)
        return Resolved(packed, absmax, None, None, None, code, blocksize, 0, shape, numel,
                        getattr(qs, "dtype", None) or torch.bfloat16)
    blocksize2 = int(state2.blocksize)
    if blocksize2 < 1 or blocksize2 & (blocksize2 - 1):
        raise ValueError(f"nf4: state2.blocksize {blocksize2} must be a power of two")
    absmax = _on(qs.absmax, device, "absmax (nested)", torch.uint8, blocks)
    absmax2 = _on(state2.absmax, device, "state2.absmax", torch.float32,
                  -(-blocks // blocksize2))
    code2 = _on(state2.code, device, "state2.code", torch.float32, 256)
    offset = getattr(qs, "offset", None)
    if offset is None:
        raise ValueError("nf4: a nested quant_state needs its offset")
    if not isinstance(offset, torch.Tensor):
        offset = torch.tensor([float(offset)], dtype=torch.float32, device=device)
    offset = _on(offset, device, "offset", torch.float32, 1)
    return Resolved(packed, absmax, absmax2, code2, offset, code, blocksize, blocksize2, shape,
                    numel, getattr(qs, "dtype", None) or torch.bfloat16)


# ---------------------------------------------------------------- the torch reference

def reference_block_scales(st: Resolved) -> torch.Tensor:
    """float32 scale of every block: absmax, or the nested formula in bitsandbytes' order."""
    if st.absmax2 is None:
        return st.absmax
    blocks = st.absmax.numel()
    group = torch.arange(blocks, device=st.absmax.device) // st.blocksize2
    scaled = st.code2[st.absmax.long()] * st.absmax2[group]   # one rounding
    return scaled + st.offset                                 # then a second, separately


def reference_dequantize(st: Resolved, dtype: torch.dtype) -> torch.Tensor:
    """The dequantised weight (shape st.shape, dtype `dtype`) in plain torch."""
    n, bs = st.numel, st.blocksize
    flat = st.packed[: (n + 1) // 2]
    idx = torch.stack((flat >> 4, flat & 15), dim=-1).reshape(-1).long()
    blocks = -(-n // bs)
    values = torch.zeros(blocks * bs, dtype=torch.float32, device=flat.device)
    values[:n] = st.code[idx[:n]]
    values = values.view(blocks, bs) * reference_block_scales(st)[:, None]
    return values.reshape(-1)[:n].to(dtype).view(st.shape)


class _TorchBackend:
    @staticmethod
    def dequantize(st: Resolved, out_flat: torch.Tensor) -> None:
        out_flat.copy_(reference_dequantize(st, out_flat.dtype).reshape(-1))

    @staticmethod
    def fused_ok(st: Resolved, x: torch.Tensor) -> bool:
        return False

    @staticmethod
    def gemv(x2, st, bias, y) -> None:  # pragma: no cover - fused_ok is False
        raise NotImplementedError

    @staticmethod
    def gemv_group(x2, calls) -> None:  # pragma: no cover - fused_ok is False
        raise NotImplementedError


# Triton launchers wrapped as custom ops so torch.compile and opcheck see a schema.
@torch.library.custom_op("fastft_triton::nf4_dequantize", mutates_args=("out",))
def _triton_dequantize(packed: torch.Tensor, absmax: torch.Tensor, absmax2: torch.Tensor | None,
                       code2: torch.Tensor | None, offset: torch.Tensor | None,
                       code: torch.Tensor, blocksize: int, blocksize2: int, numel: int,
                       out: torch.Tensor) -> None:
    from fastft.triton_kernels import nf4

    with _common.launch_device(packed):
        nf4.dequantize(packed, absmax, absmax2, code2, offset, code, blocksize, blocksize2,
                       numel, out)


@torch.library.custom_op("fastft_triton::nf4_gemv", mutates_args=("y",))
def _triton_gemv(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor,
                 absmax2: torch.Tensor | None, code2: torch.Tensor | None,
                 offset: torch.Tensor | None, code: torch.Tensor, bias: torch.Tensor | None,
                 blocksize: int, blocksize2: int, y: torch.Tensor) -> None:
    from fastft.triton_kernels import nf4

    with _common.launch_device(x):
        nf4.gemv(x, packed, absmax, absmax2, code2, offset, code, bias, blocksize, blocksize2,
                 y)


@_triton_dequantize.register_fake
def _(packed, absmax, absmax2, code2, offset, code, blocksize, blocksize2, numel, out):
    return None


@_triton_gemv.register_fake
def _(x, packed, absmax, absmax2, code2, offset, code, bias, blocksize, blocksize2, y):
    return None


def _state_args(st: Resolved):
    return (st.packed, st.absmax, st.absmax2, st.code2, st.offset, st.code)


class _TritonBackend:
    @staticmethod
    def dequantize(st: Resolved, out_flat: torch.Tensor) -> None:
        _triton_dequantize(*_state_args(st), st.blocksize, st.blocksize2, st.numel, out_flat)

    @staticmethod
    def fused_ok(st: Resolved, x: torch.Tensor) -> bool:
        # bf16/fp16 only (tensor-core dot); rows whole multiples of the K tile
        return x.dtype in (torch.bfloat16, torch.float16) and st.shape[1] % 64 == 0

    @staticmethod
    def gemv(x2, st, bias, y, low_rank=None) -> None:
        _triton_gemv(x2, *_state_args(st), bias, st.blocksize, st.blocksize2, y)
        if low_rank is not None:
            _add_low_rank(y, *low_rank)

    @staticmethod
    def gemv_group(x2, calls) -> None:
        """gemv per (st, bias, y, low_rank) of `calls` (one x2): no grouped Triton kernel."""
        for st, bias, y, low_rank in calls:
            _TritonBackend.gemv(x2, st, bias, y, low_rank)


def _add_low_rank(y, xa, b, scale) -> None:
    """y += scale * xa @ bᵀ, after the matmul: one more kernel and one more pass over y."""
    y.addmm_(xa, b.t(), alpha=scale)


def _rows_16_byte_aligned(t) -> bool:
    """Whether a 2-D tensor of a 16-bit dtype can be read in 16-byte pieces row by row, as the
    CUDA kernels read x·Aᵀ, B and A: contiguous rows, each starting on 16 bytes."""
    return t.stride(1) == 1 and t.stride(0) % 8 == 0 and t.data_ptr() % 16 == 0


def _low_rank_fusable(x2, xa, b) -> bool:
    """Whether the CUDA kernel can add xa @ bᵀ itself: it reads their rows in 16-byte pieces."""
    rank = xa.shape[1]  # (the binding rejects rank 0: that case takes the addmm_ path)
    return (xa.dtype == x2.dtype and b.dtype == x2.dtype and rank > 0 and rank % 8 == 0
            and _rows_16_byte_aligned(xa) and _rows_16_byte_aligned(b))


def _kernel_adds_low_rank(x2, low_rank, variant: int) -> bool:
    """Whether the CUDA kernel adds this low-rank term itself (else the backend adds it after):
    one is given, the kernel is not v2 (which has none) and its rows are readable."""
    return (low_rank is not None and variant != 2
            and _low_rank_fusable(x2, low_rank[0], low_rank[1]))


def _capability_major(device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    return dispatch._capability(index)[0]  # cached, as the dispatch table's own test


# Rows up to which the CUDA backend computes x·Aᵀ with its own kernel (run 104, 8B shapes:
# 0.38-0.72x cuBLAS's time at M = 1 and 0.61-0.67x at M = 4, but 1.01-1.11x at M = 16, where
# the 16-token decoding step's GPU time rose 7.746 -> 7.839 ms with it; M = 8 not measured).
LOW_RANK_INPUT_ROWS = 8


class _CudaBackend:
    @staticmethod
    def dequantize(st: Resolved, out_flat: torch.Tensor) -> None:
        _CudaBackend.bound_dequantize(st)(out_flat)

    @staticmethod
    def bound_dequantize(st: Resolved):
        """out_flat -> None with the kernel and its state arguments looked up once (QLoRA
        dequantises 16 weights per layer and step; the lookups cost ~30 us a call)."""
        kernel = torch.ops.fastft.nf4_dequantize.default
        args = (*_state_args(st), st.blocksize, st.blocksize2, st.numel)
        return lambda out_flat: kernel(*args, out_flat)

    @staticmethod
    def fused_ok(st: Resolved, x: torch.Tensor) -> bool:
        # tensor-core kernel (mma, compute capability >= 8.0): bf16/fp16 inputs; each 32
        # consecutive k of a row (one 16-byte load) inside one quantisation block, which
        # in_features % 32 == 0 and a power-of-two blocksize >= 32 guarantee
        return (x.dtype in (torch.bfloat16, torch.float16) and st.shape[1] % 32 == 0
                and st.blocksize >= 32 and _capability_major(x.device) >= 8)

    @staticmethod
    def gemv(x2, st, bias, y, low_rank=None) -> None:
        """y = x2 @ Wᵀ (+ bias) (+ scale * xa @ bᵀ when low_rank = (xa [M, r], b [N, r], scale):
        a LoRA adapter's term, added inside the kernel where its layout allows, which saves
        decoding a kernel launch and a pass over y per projection)."""
        variant, v3_splits, v3_kparts, pdl = gemv_settings()
        fuse = _kernel_adds_low_rank(x2, low_rank, variant)
        xa, b, scale = low_rank if fuse else (None, None, 1.0)
        cuda_ops().nf4_gemv(x2, *_state_args(st), bias, st.blocksize, st.blocksize2, variant,
                            v3_splits, v3_kparts, _pdl_mode(pdl), xa, b, float(scale), y)
        if low_rank is not None and not fuse:
            _add_low_rank(y, *low_rank)

    @staticmethod
    def low_rank_input(x2, a):
        """x2 @ aᵀ ([M, R] in x2's dtype: a LoRA adapter's x·Aᵀ, the low-rank term's input)
        by the extension's one-kernel product, or None where it does not apply (more than
        LOW_RANK_INPUT_ROWS rows, dtypes, layout, FASTFT_NF4_LOW_RANK_INPUT=0, an older build).
        cuBLAS runs this skinny product as split-K plus a reduce (~5.7 us, run 100); the kernel
        is launched with PDL, so the gemv after it starts at once (and in generate loads its
        weight)."""
        ops = cuda_ops()
        if not _switch_on("FASTFT_NF4_LOW_RANK_INPUT") or not hasattr(ops, "nf4_low_rank_input"):
            return None
        M, K = x2.shape
        if (not 1 <= M <= LOW_RANK_INPUT_ROWS or x2.dtype not in (torch.bfloat16, torch.float16)
                or a.dtype != x2.dtype or a.dim() != 2 or a.shape[1] != K or K % 8 != 0
                or a.device != x2.device):
            return None
        if not (_rows_16_byte_aligned(x2) and _rows_16_byte_aligned(a)):
            return None
        out = x2.new_empty(M, a.shape[0])
        ops.nf4_low_rank_input(x2, a, _switch_on("FASTFT_NF4_PDL"), out)
        return out

    @staticmethod
    def gemv_group(x2, calls) -> None:
        """gemv for several weights of one x2, calls = [(st, bias, y, low_rank), ...], in one
        launch where the extension's plan takes them (nf4_gemv_group: v3 over all the weights),
        else one nf4_gemv per weight inside the extension. Low-rank terms the kernel cannot
        read (see _low_rank_fusable) are added after, as gemv does."""
        ops = cuda_ops()
        if len(calls) == 1 or not hasattr(ops, "nf4_gemv_group"):  # (an older build)
            for st, bias, y, low_rank in calls:
                _CudaBackend.gemv(x2, st, bias, y, low_rank)
            return
        variant, v3_splits, v3_kparts, pdl = gemv_settings()
        fused = [_kernel_adds_low_rank(x2, low_rank, variant) for _, _, _, low_rank in calls]
        states = [c[0] for c in calls]
        ops.nf4_gemv_group(
            x2, [st.packed for st in states], [st.absmax for st in states],
            [st.absmax2 for st in states], [st.code2 for st in states],
            [st.offset for st in states], [st.code for st in states], [c[1] for c in calls],
            [st.blocksize for st in states], [st.blocksize2 for st in states], variant,
            v3_splits, v3_kparts, _pdl_mode(pdl),
            [c[3][0] if f else None for c, f in zip(calls, fused)],
            [c[3][1] if f else None for c, f in zip(calls, fused)],
            [float(c[3][2]) if f else 1.0 for c, f in zip(calls, fused)],
            [c[2] for c in calls])
        for (_, _, y, low_rank), f in zip(calls, fused):
            if low_rank is not None and not f:
                _add_low_rank(y, *low_rank)


# FASTFT_NF4_GEMV picks the CUDA backend's fused small-M kernel: unset or "auto" lets the
# extension choose by what the H200 measured (the rule: the module docstring), "v1" / "v2" /
# "v3" / "v4" force one where it applies. FASTFT_NF4_V3_SPLITS forces v3's K split across CTAs and
# FASTFT_NF4_V3_KPARTS (1, 2, 4, 8, or 16: a CTA of 16 warps on 32 rows) how many parts of a
# CTA's K range its warps take at M <= 8 (tuning). Read on every call, so that one process can
# time every kernel.
# v3r / v3h: v3 with its NF4 decode in registers (PRMT) / half in registers, half in the
# shared-memory table (the extension's variants 5 / 6); the same results as v3, bit for bit.
# FASTFT_NF4_PDL=0 turns off programmatic dependent launch of v1 / v3 (on by default where the
# GPU has it, compute capability >= 9.0: a call's CTAs start as the previous kernel's finish
# and wait for it before touching global memory, which hides the launch).
# v4: the weight streamed into shared memory by the copy engine (TMA), one CTA per SM (sm_90,
# M <= 16 where 2 stages fit: v3's plan takes the other calls); v3's numerics; it adds a
# low-rank term in its epilogue.
_GEMV_VARIANTS = {"": 0, "auto": 0, "v1": 1, "v2": 2, "v3": 3, "v3r": 5, "v3h": 6, "v4": 7}


def gemv_settings() -> tuple[int, int, int, bool]:
    """(variant, v3 K splits, v3 K parts per CTA, PDL) for torch.ops.fastft.nf4_gemv from the
    environment; 0 means the extension's plan chooses."""
    name = os.environ.get("FASTFT_NF4_GEMV", "")
    if name not in _GEMV_VARIANTS:
        raise ValueError("FASTFT_NF4_GEMV must be auto, v1, v2, v3, v3r, v3h or v4 (or unset), got "
                         f"{name!r}")
    text = os.environ.get("FASTFT_NF4_V3_SPLITS", "")
    # ASCII digits only: no sign, no spaces (str.isdigit alone also takes e.g. "²")
    splits = int(text) if text.isascii() and text.isdigit() else -1
    if text and not 1 <= splits <= 65535:
        raise ValueError("FASTFT_NF4_V3_SPLITS must be a whole number from 1 to 65535 (or "
                         f"unset), got {text!r}")
    parts_text = os.environ.get("FASTFT_NF4_V3_KPARTS", "")
    if parts_text not in ("", "1", "2", "4", "8", "16"):
        raise ValueError("FASTFT_NF4_V3_KPARTS must be 1, 2, 4, 8 or 16 (or unset), got "
                         f"{parts_text!r}")
    return _GEMV_VARIANTS[name], max(splits, 0), int(parts_text or 0), _switch_on("FASTFT_NF4_PDL")


def _switch_on(name: str) -> bool:
    """An on/off environment switch that is on unless set to "0" (unset or empty: on); any
    other value is an error that names it."""
    value = os.environ.get(name, "") or "1"
    if value not in ("0", "1"):
        raise ValueError(f"{name} must be 0 or 1 (or unset), got {value!r}")
    return value == "1"


# Depth of frozen_weights() contexts (generate runs them on one thread).
_FROZEN_WEIGHTS = [0]


@contextlib.contextmanager
def frozen_weights():
    """Inside: no kernel writes an NF4 weight, its scales or its code (fastft's `generate`:
    nothing trains while it decodes), so the CUDA backend's fused small-M kernels, launched with
    programmatic dependent launch, load their first weight steps before waiting for the
    previous kernel: that kernel's tail hides their latency. Outside, a weight may have been
    written by the kernel just before (an optimizer step, a copy), which only the wait makes
    visible. FASTFT_NF4_EARLY_LOADS=0 keeps the plain order (for comparisons)."""
    _FROZEN_WEIGHTS[0] += 1
    try:
        yield
    finally:
        _FROZEN_WEIGHTS[0] -= 1


def _pdl_mode(pdl: bool) -> int:
    """The extension's pdl argument: 0 off, 1 on, 2 on with the weight frozen (frozen_weights)."""
    if not pdl:
        return 0
    early = _switch_on("FASTFT_NF4_EARLY_LOADS")  # (checked on every call, frozen or not)
    return 2 if _FROZEN_WEIGHTS[0] > 0 and early else 1


_BACKENDS: dict[str, Any] = {"torch": _TorchBackend, "triton": _TritonBackend,
                             "cuda": _CudaBackend}
for _op in ("nf4_dequantize", "nf4_matmul"):
    dispatch.register(_op, "torch", _TorchBackend)
    dispatch.register(_op, "triton", _TritonBackend)
    if cuda_ops() is not None and hasattr(cuda_ops(), "nf4_dequantize"):
        dispatch.register(_op, "cuda", _CudaBackend)

if cuda_ops() is not None and hasattr(cuda_ops(), "nf4_dequantize"):
    for _name in ("nf4_dequantize", "nf4_gemv", "nf4_gemv_group", "nf4_low_rank_input"):
        if hasattr(cuda_ops(), _name):  # (the last two: not in older builds)
            torch.library.register_fake(f"fastft::{_name}")(lambda *args, **kwargs: None)


# ---------------------------------------------------------------- the shared workspace

_WORKSPACES: dict = {}
# (shape, dtype, device) -> a view of the current workspace: QLoRA asks for the same few weight
# shapes 16 times per decoder layer and step. Dropped whenever a workspace is replaced or
# released, so no view keeps an old buffer alive.
_WORKSPACE_VIEWS: dict = {}


def workspace(numel: int, dtype: torch.dtype, device) -> torch.Tensor:
    """A flat buffer of at least `numel` elements, one per (device, dtype), grown on demand and
    shared by every nf4_matmul (ops on one stream run in order, so reuse is safe)."""
    if torch.compiler.is_compiling():  # the compiler plans its own buffers
        return torch.empty(numel, dtype=dtype, device=device)
    key = (torch.device(device), dtype)
    buf = _WORKSPACES.get(key)
    if buf is None or buf.numel() < numel:
        _WORKSPACE_VIEWS.clear()
        _WORKSPACES.pop(key, None)  # free the old one before allocating the larger
        buf = _WORKSPACES[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def bound_dequantize(st: Resolved, backend: str):
    """out_flat -> None filling out_flat with st's weight on `backend` (a dispatch choice);
    the backend's per-call lookups are done here, once."""
    impl = dispatch.implementation("nf4_dequantize", backend)
    bind = getattr(impl, "bound_dequantize", None)
    return bind(st) if bind is not None else (lambda out_flat: impl.dequantize(st, out_flat))


def workspace_view(shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The workspace as a `shape` tensor (its first prod(shape) elements)."""
    key = (shape, dtype, device)
    view = _WORKSPACE_VIEWS.get(key)
    if view is None:
        numel = 1
        for d in shape:
            numel *= d
        view = workspace(numel, dtype, device).view(shape)
        if not torch.compiler.is_compiling():
            _WORKSPACE_VIEWS[key] = view
    return view


def release_workspaces() -> None:
    """Free the dequantisation workspaces (they are re-created on the next large-M call)."""
    _WORKSPACE_VIEWS.clear()
    _WORKSPACES.clear()


# ---------------------------------------------------------------- public functions

def _check_out(out: torch.Tensor, st: Resolved, dtype) -> torch.Tensor:
    if out.device != st.packed.device:
        raise ValueError(f"nf4_dequantize: out is on {out.device}, the weight on "
                         f"{st.packed.device}")
    if out.dtype != dtype:
        raise ValueError(f"nf4_dequantize: out has dtype {out.dtype} but dtype={dtype} was asked")
    if not out.is_contiguous():
        raise ValueError("nf4_dequantize: out must be contiguous")
    if out.numel() < st.numel:
        raise ValueError(f"nf4_dequantize: out has {out.numel()} elements, the weight "
                         f"{list(st.shape)} needs {st.numel}")
    return out.view(-1)[: st.numel]


def _dequantize_into(st: Resolved, flat: torch.Tensor, backend: str) -> None:
    if st.numel:
        _BACKENDS[backend].dequantize(st, flat)


def nf4_dequantize(packed, quant_state=None, out=None, dtype=None, *, backend=None):
    """Dequantise a packed NF4 weight, bit-exactly as bitsandbytes.functional.dequantize_4bit.

    quant_state: bitsandbytes' QuantState (e.g. weight.quant_state; may be omitted when
    `packed` is a Params4bit) or fastft's NF4State. dtype: the output dtype (default: out's,
    else the state's). out: a contiguous buffer of that dtype with at least as many elements
    as the weight (a shared workspace may be larger): the result is written into its start and
    returned viewed as the weight's shape."""
    st = resolve(packed, quant_state)
    if dtype is None:
        dtype = out.dtype if out is not None else st.dtype
    if dtype not in dispatch.KERNEL_DTYPES:
        raise ValueError(f"nf4_dequantize: dtype {dtype} is not supported (float32, float16, "
                         f"bfloat16 are)")
    chosen = dispatch.backend_for("nf4_dequantize", st.packed.device, dtype, backend)
    if out is None:
        flat = new_empty((st.numel,), dtype, st.packed.device)
    else:
        flat = _check_out(out, st, dtype)
    _dequantize_into(st, flat, chosen)
    if out is not None and tuple(out.shape) == st.shape:
        return out
    return flat.view(st.shape)


def _dequantized_weight(st: Resolved, dtype, backend: str) -> torch.Tensor:
    if backend == "torch":
        return reference_dequantize(st, dtype)
    flat = workspace(st.numel, dtype, st.packed.device)
    _dequantize_into(st, flat, backend)
    return flat.view(st.shape)


class _NF4MatmulFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, packed, absmax, absmax2, code2, offset, code, blocksize,
                blocksize2, shape, backend):
        st = Resolved(packed, absmax, absmax2, code2, offset, code, blocksize, blocksize2,
                      shape, shape[0] * shape[1], x.dtype)
        impl = _BACKENDS[backend]
        x2 = x.reshape(-1, x.shape[-1])
        if 0 < x2.shape[0] <= SMALL_M and impl.fused_ok(st, x2):
            if x2.stride(-1) != 1:
                x2 = x2.contiguous()
            if bias is not None and not bias.is_contiguous():
                bias = bias.contiguous()
            y = new_empty((x2.shape[0], shape[0]), x.dtype, x.device)
            impl.gemv(x2, st, bias, y)
        else:
            w = _dequantized_weight(st, x.dtype, backend)
            y = torch.nn.functional.linear(x2, w, bias)
        ctx.save_for_backward(packed, absmax, absmax2, code2, offset, code)
        ctx.meta = (blocksize, blocksize2, shape, backend, x.shape, bias is not None)
        return y.view(*x.shape[:-1], shape[0])

    @staticmethod
    def backward(ctx, dy):
        packed, absmax, absmax2, code2, offset, code = ctx.saved_tensors
        blocksize, blocksize2, shape, backend, x_shape, has_bias = ctx.meta
        dy2 = dy.reshape(-1, shape[0])
        dx = db = None
        if ctx.needs_input_grad[0]:
            st = Resolved(packed, absmax, absmax2, code2, offset, code, blocksize, blocksize2,
                          shape, shape[0] * shape[1], dy.dtype)
            w = _dequantized_weight(st, dy.dtype, backend)
            dx = (dy2 @ w).view(x_shape)
        if has_bias and ctx.needs_input_grad[1]:
            db = dy2.sum(0)
        return dx, db, None, None, None, None, None, None, None, None, None, None


def nf4_matmul(x, packed, quant_state=None, bias=None, *, backend=None):
    """y = x @ W.T (+ bias) with W the dequantised [out, in] NF4 weight, computed in x's dtype.

    Gradients flow to x (dx = dy @ W) and to bias; the quantised weight is frozen."""
    st = resolve(packed, quant_state)
    if len(st.shape) != 2:
        raise ValueError(f"nf4_matmul: the weight must be 2-D [out, in], got shape "
                         f"{list(st.shape)}")
    out_features, in_features = st.shape
    if not x.is_floating_point():
        raise ValueError(f"nf4_matmul: x must be floating point (bf16, fp16, fp32 or fp64), got "
                         f"{x.dtype}; cast it first, e.g. x.to(torch.bfloat16)")
    if x.shape[-1] != in_features:
        raise ValueError(f"nf4_matmul: x has {x.shape[-1]} features but the weight is "
                         f"[{out_features}, {in_features}] (in={in_features})")
    if x.device != st.packed.device:
        raise ValueError(f"nf4_matmul: x is on {x.device}, the weight on {st.packed.device}")
    if bias is not None and (bias.shape != (out_features,) or bias.dtype != x.dtype):
        if bias.shape != (out_features,):
            raise ValueError(f"nf4_matmul: bias must have shape [{out_features}], got "
                             f"{list(bias.shape)}")
        bias = bias.to(x.dtype)
    chosen = dispatch.backend_for("nf4_matmul", x.device, x.dtype, backend)
    return _NF4MatmulFunction.apply(x, bias, st.packed, st.absmax, st.absmax2, st.code2,
                                    st.offset, st.code, st.blocksize, st.blocksize2, st.shape,
                                    chosen)
