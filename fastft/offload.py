"""Offloaded gradient checkpointing (use_gradient_checkpointing="unsloth" / "offload").

Like plain checkpointing, each decoder layer runs its forward without keeping activations and
is recomputed during backward. In addition the layer's input (the only tensor checkpointing
keeps per layer) does not stay on the GPU: it is copied to pinned CPU memory on a side stream
while the next layers compute, and copied back, again on the side stream, one layer ahead of
its recomputation (layer i's backward starts layer i-1's copy), so both copies overlap compute.

Installed through transformers' own hook: decoder layers are GradientCheckpointingLayer's and
call `self._gradient_checkpointing_func(forward, *args)`; `enable_offloaded_checkpointing`
sets that function (via the model's `_set_gradient_checkpointing`) and keeps it in place when a
trainer later calls `gradient_checkpointing_enable()` again (HF Trainer / TRL do when
`gradient_checkpointing=True`). torch.utils.checkpoint is not touched.

Reuse instead of recompute: some results of the first forward are cheaper to send to the host
and back than to recompute (attention's output and log-sum-exp, whose recompute is a whole
attention forward; o_proj's output, whose recompute is a GEMM). Ops inside a checkpointed layer
hand such tensors to `stash_put` during the first forward; they travel with the layer's input
(offloaded, prefetched one layer ahead) and the same ops take them back with `stash_take` in the
recompute, in the same order. This only runs while the host has room for it (see
_Offloader.stash_budget) and FASTFT_OFFLOAD_REUSE is not 0; otherwise the ops recompute.

A stashed tensor marked `late` (q/k/v, needed only by the layer's attention backward) is not
prefetched with the layer's input: it is copied back when the attention backward of the layer
after it has run (start_late_prefetch), so that it is never on the GPU during that attention
backward, the step's memory peak (run 23: the early prefetch put it there, +0.19 GiB at 8B
4x4096); its user waits for the copy (wait_copied) about a layer later.

On the CPU the "offload" is a plain copy, but the code path is the same.
"""
from __future__ import annotations

import os
import threading
import types
import weakref

import torch

__all__ = ["enable_offloaded_checkpointing", "disable_offloaded_checkpointing", "offloaded_checkpoint"]

# A leaf that requires grad, passed to every checkpointed call so that the call is recorded by
# autograd even when no input requires grad (frozen embeddings + LoRA): the LoRA parameters
# inside the layer are not inputs of the Function and would otherwise get no gradient.
_ANCHOR = torch.empty(0, requires_grad=True)


# Layer inputs at least this large go to exact-size host buffers that fastft page-locks itself
# (cudaHostRegister) and reuses across steps: torch's pinned allocator rounds every block up to a
# power of two, which for the GB-sized inputs of very long sequences nearly doubles host memory.
REGISTERED_MIN_BYTES = int(os.environ.get("FASTFT_OFFLOAD_REGISTERED_BYTES", str(1 << 30)))


class _RegisteredHost:
    """An exact-size page-locked host buffer (plain allocation + cudaHostRegister)."""

    def __init__(self, nbytes: int):
        self.nbytes = nbytes
        self.buf = torch.empty(nbytes, dtype=torch.uint8)
        rc = int(torch.cuda.cudart().cudaHostRegister(self.buf.data_ptr(), nbytes, 0))
        if rc != 0:
            self.buf = None
            raise RuntimeError(f"offloaded checkpointing: cudaHostRegister of {nbytes / 2**30:.1f} GiB "
                               f"failed (cudaError {rc}); is the host out of memory?")

    def view(self, shape, dtype) -> torch.Tensor:
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        return self.buf[:nbytes].view(dtype).view(shape)

    def release(self) -> None:
        if self.buf is not None:
            torch.cuda.cudart().cudaHostUnregister(self.buf.data_ptr())
            self.buf = None

    def __del__(self):
        try:
            self.release()
        except Exception:  # interpreter shutdown
            pass


class _Slot:
    """One layer input's trip to the host and back, with the results the layer stashed."""

    __slots__ = ("host", "device_copy", "ready", "stream", "requires_grad", "prev", "pooled",
                 "stash", "device", "__weakref__")

    def __init__(self):
        self.pooled = None       # the _RegisteredHost behind `host`, if any
        self.host = None         # CPU copy (pinned on CUDA)
        self.device_copy = None  # the tensor brought back (prefetched or fetched on demand)
        self.ready = None        # CUDA event: device_copy (and the stash's copies) complete
        self.stream = None       # the side stream used for the copies
        self.requires_grad = False
        self.device = None       # the layer input's device (set by offload)
        self.prev = None         # weakref to the slot of the layer before (prefetched next)
        self.stash = []          # per put: [tag, host tensors or None, _DeviceCopies, extra, late flags]


# Stashing is on unless FASTFT_OFFLOAD_REUSE=0; it may use this share of the host memory that is
# available when a forward pass starts, after the layer inputs of that pass are provided for.
REUSE = os.environ.get("FASTFT_OFFLOAD_REUSE", "1") != "0"
# Also stash attention's q / k / v, so that the recompute skips the q/k/v projections too where
# the family allows it (see fastft/lora.py); 0 keeps them recomputed (less PCIe traffic).
REUSE_QKV = os.environ.get("FASTFT_OFFLOAD_REUSE_QKV", "1") != "0"
STASH_HOST_SHARE = 0.5
STAY_BYTES = 4096


# Stream objects by (device index, raw handle). torch.cuda.current_stream() and the
# torch.cuda.stream() context build new Stream objects through several Python layers (~8 us
# each); a step makes ~300 such calls, so the current stream is read by its raw handle.
_STREAM_OBJECTS: dict = {}


def _current_stream(device) -> "torch.cuda.Stream":
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (index, torch._C._cuda_getCurrentRawStream(index))
    stream = _STREAM_OBJECTS.get(key)
    if stream is None:
        stream = _STREAM_OBJECTS[key] = torch.cuda.current_stream(index)
    return stream


class _OnStream:
    """`with _OnStream(side, main):` runs the block on `side`, then makes `main` (the stream
    that was current) current again: torch.cuda.stream() without its per-call lookups."""

    __slots__ = ("side", "main", "device")

    def __init__(self, side, main):
        self.side, self.main = side, main

    def __enter__(self):
        self.device = torch.cuda.current_device()
        torch.cuda.set_stream(self.side)  # (also makes the stream's device current)

    def __exit__(self, *exc):
        torch.cuda.set_stream(self.main)
        if self.main.device_index != self.device:  # a layer on another GPU than the current
            torch.cuda.set_device(self.device)


def _dense_strides(t: torch.Tensor):
    """t's strides when t covers its elements densely in some dimension order (a transposed
    view, as attention's q/k/v are), else None. A copy into a tensor of the same strides is one
    plain memcpy; into a contiguous one it first needs a re-layout kernel on the GPU (run 25:
    28 ms of such copies in an 8B 4x4096 step for the stashed q/k/v)."""
    if t.is_contiguous():
        return t.stride()
    order = sorted(range(t.dim()), key=lambda d: (-t.stride(d), -t.shape[d]))
    return t.stride() if t.permute(order).is_contiguous() else None


def _empty_like_layout(t: torch.Tensor, device, pin_memory=False) -> torch.Tensor:
    """An uninitialised tensor of t's shape and dtype on `device`, with t's strides where they
    are dense (see _dense_strides), else contiguous."""
    strides = _dense_strides(t)
    if strides is None:
        return torch.empty(t.shape, dtype=t.dtype, device=device, pin_memory=pin_memory)
    return torch.empty_strided(t.shape, strides, dtype=t.dtype, device=device, pin_memory=pin_memory)


class _DeviceCopies(list):
    """A stash entry's tensors on the device; `ready`: the CUDA event that its late copies
    complete (None: none pending)."""

    __slots__ = ("ready",)

    def __init__(self, items):
        super().__init__(items)
        self.ready = None


def wait_copied(tensors) -> None:
    """Make the current stream wait until the late copies of a stash_take result are done."""
    ready = getattr(tensors, "ready", None)
    if ready is not None:
        ready.wait()  # (the current stream of the current device: where the backward runs)


class _Offloader:
    """Per-model state: the side stream per device and the chain of slots of the current
    forward pass (so that backward of layer i can prefetch layer i-1)."""

    def __init__(self, layers: int = 0):
        self.streams = {}
        self.last = None  # weakref to the most recent slot
        self.free = []    # reusable _RegisteredHost buffers (all their copies ran on `stream`)
        self.layers = layers     # checkpointed layers per pass (0: unknown, no stashing)
        self.stash_left = 0      # bytes the current pass may still stash
        self.stashed_bytes = 0   # bytes stashed in the current pass (for benchmarks / tests)

    def _host_buffer(self, nbytes, stream):
        """A registered buffer of at least nbytes (at most 25% larger) from the pool, else a new
        one (first releasing the pool's others: the shapes changed)."""
        for i, b in enumerate(self.free):
            if nbytes <= b.nbytes <= nbytes * 5 // 4:
                return self.free.pop(i)
        if self.free:
            stream.synchronize()  # no copy may still read or write what is released
            for b in self.free:
                b.release()
            self.free.clear()
        return _RegisteredHost(nbytes)

    def stream_for(self, device):
        if device.type != "cuda":
            return None
        s = self.streams.get(device)
        if s is None:
            s = self.streams[device] = torch.cuda.Stream(device)
        return s

    def offload(self, x: torch.Tensor) -> _Slot:
        slot = _Slot()
        slot.requires_grad = x.requires_grad
        last = self.last() if self.last is not None else None
        # link to the previous layer of the same pass (a consumed slot means a new pass began)
        slot.prev = weakref.ref(last) if last is not None and last.host is not None else None
        self.last = weakref.ref(slot)
        if slot.prev is None:
            self._new_pass(x)
        slot.device = x.device
        slot.stream = self.stream_for(x.device)
        slot.host, slot.pooled = self._to_host(x, slot.stream)
        return slot

    def _new_pass(self, x: torch.Tensor) -> None:
        """Size the stash budget: a share of the host's free memory, less what this pass's
        layer inputs will take."""
        self.stashed_bytes = 0
        self.stash_left = 0
        if REUSE and self.layers > 0:
            inputs = self.layers * x.numel() * x.element_size()
            from fastft.save import available_memory_bytes

            available = available_memory_bytes(unknown=0)
            self.stash_left = max(0, int(available * STASH_HOST_SHARE) - inputs)

    def _to_host(self, x: torch.Tensor, stream):
        """(host copy, pooled buffer or None), the copy issued on the side stream."""
        return self._all_to_host([x], stream)[0]

    def _all_to_host(self, tensors, stream):
        """[(host copy, pooled buffer or None)] per tensor, the copies issued on the side stream
        after one wait for the main stream."""
        if stream is None:
            return [(x.detach().clone(), None) for x in tensors]
        main = _current_stream(tensors[0].device)
        stream.wait_stream(main)  # they are complete
        copies = []
        with _OnStream(stream, main):
            for x in tensors:
                nbytes = x.numel() * x.element_size()
                pooled = None
                if nbytes >= REGISTERED_MIN_BYTES:
                    pooled = self._host_buffer(nbytes, stream)
                    host = pooled.view(x.shape, x.dtype)
                else:
                    host = _empty_like_layout(x, "cpu", pin_memory=True)
                host.copy_(x.detach(), non_blocking=True)
                x.record_stream(stream)  # x's memory is not reused until the copy has read it
                copies.append((host, pooled))
        return copies

    def stash(self, slot: _Slot, tag: str, tensors, extra, late=None) -> bool:
        """Send `tensors` to the host with slot's input if the budget allows; records the put
        either way (the recompute takes entries back in the same order). tensors None: a put
        that keeps nothing. late: per tensor, True to bring it back later than the layer's
        input (see start_late_prefetch)."""
        nbytes = -1 if tensors is None else sum(t.numel() * t.element_size() for t in tensors)
        if nbytes < 0 or nbytes > self.stash_left:
            slot.stash.append([tag, None, None, None, None])
            return False
        self.stash_left -= nbytes
        self.stashed_bytes += nbytes
        # tiny tensors (RNG state, scalars) stay where they are: a host round trip costs more
        # host time than their bytes are worth
        moving = [t for t in tensors if t.numel() * t.element_size() > STAY_BYTES]
        hosts = iter(self._all_to_host(moving, slot.stream)) if moving else iter(())
        late = [False] * len(tensors) if late is None else [bool(f) for f in late]
        slot.stash.append([tag, [t if t.numel() * t.element_size() <= STAY_BYTES else next(hosts)[0]
                                 for t in tensors], None, extra, late])
        return True

    @staticmethod
    def _copy_back(slot: _Slot, device, late: bool):
        """Start copying slot's stashed tensors of one kind (late or not) to the device: their
        device buffers go into the entries; returns (device buffers, host tensors) to copy."""
        bufs, hosts = [], []
        for entry in slot.stash:
            if entry[1] is None:
                continue
            if entry[2] is None:
                entry[2] = _DeviceCopies([None] * len(entry[1]))
            for i, (h, is_late) in enumerate(zip(entry[1], entry[4])):
                if is_late != late or entry[2][i] is not None:
                    continue
                if h.device == device or slot.stream is None:
                    entry[2][i] = h if h.device == device else h.to(device, copy=True)
                    continue
                # allocated on the main stream, so its memory belongs there; the side stream
                # waits for the main stream to reach this point before writing into it
                entry[2][i] = _empty_like_layout(h, device)
                bufs.append(entry[2][i])
                hosts.append(h)
        return bufs, hosts

    @staticmethod
    def _issue(slot: _Slot, device, bufs, hosts):
        """The copies host -> device on slot's side stream; returns the event of their end."""
        main = _current_stream(device)
        slot.stream.wait_stream(main)
        with _OnStream(slot.stream, main):
            for buf, host in zip(bufs, hosts):
                buf.copy_(host, non_blocking=True)
            event = torch.cuda.Event()
            event.record(slot.stream)
        return event

    @classmethod
    def prefetch(cls, slot: _Slot, device) -> None:
        """Start copying slot's input and its stash, except late tensors, back to the device
        (no-op when done or started)."""
        if slot is None or slot.device_copy is not None or slot.host is None:
            return
        if slot.stream is None:
            slot.device_copy = slot.host.to(device, copy=True)
            cls._copy_back(slot, device, late=False)
            return
        bufs, hosts = cls._copy_back(slot, device, late=False)
        bufs.insert(0, _empty_like_layout(slot.host, device))
        hosts.insert(0, slot.host)
        slot.ready = cls._issue(slot, device, bufs, hosts)
        slot.device_copy = bufs[0]

    @classmethod
    def prefetch_late(cls, slot: _Slot, device) -> None:
        """Start copying slot's late stashed tensors back (no-op when done or started); their
        users wait for it (wait_copied)."""
        if slot is None or slot.host is None:
            return
        bufs, hosts = cls._copy_back(slot, device, late=True)
        if bufs:
            event = cls._issue(slot, device, bufs, hosts)
            for entry in slot.stash:
                if entry[2] is not None and any(entry[4]):
                    entry[2].ready = event

    def restore(self, slot: _Slot, device) -> torch.Tensor:
        """Slot's input back on the device, ready for use on the current stream; also starts the
        previous layer's prefetch so it overlaps this layer's recomputation. The stash's device
        copies stay in slot.stash for stash_take."""
        if slot.host is None:
            raise RuntimeError(
                "offloaded checkpointing: this layer's saved input was already used by an earlier "
                "backward; backward through the same graph twice (retain_graph=True) is not "
                "supported with use_gradient_checkpointing='unsloth'/'offload' (use True instead)")
        self.prefetch(slot, device)
        # late tensors: started earlier unless no attention backward ran since (the last layer)
        self.prefetch_late(slot, device)
        prev = slot.prev() if slot.prev is not None else None
        if prev is not None:
            # to prev's own device (a model split over GPUs has layers on several)
            prev_device = prev.device or device
            self.prefetch(prev, prev_device)
            _LATE_NEXT[:] = [weakref.ref(prev), prev_device]
        else:
            _LATE_NEXT[:] = []
        if slot.ready is not None:
            _current_stream(device).wait_event(slot.ready)
        x = slot.device_copy
        if slot.pooled is not None:
            # reusable once this H2D copy is done: the next user's D2H copy runs on the same
            # side stream, so it is ordered after it
            self.free.append(slot.pooled)
            slot.pooled = None
        slot.host = slot.device_copy = slot.ready = None
        for entry in slot.stash:
            entry[1] = None  # the host copies (extra and device copies stay for stash_take)
        slot.prev = None
        return x


# [weakref to the slot whose late stash the next start_late_prefetch copies back, its device]:
# the layer before the one whose backward is running (set by restore)
_LATE_NEXT: list = []


def start_late_prefetch() -> None:
    """Called where a layer's attention backward has run: start bringing back the late stashed
    tensors of the layer whose backward comes next (see the module docstring)."""
    if not _LATE_NEXT:
        return
    ref, device = _LATE_NEXT
    _LATE_NEXT[:] = []
    _Offloader.prefetch_late(ref(), device)


_RECOMPUTE = threading.local()


def recomputing() -> bool:
    """True while an offloaded checkpoint re-runs a layer's forward inside backward. Then the
    layer's output values are never read (only its autograd graph is), which lets a fused MLP
    skip the matmul that only produces its output."""
    return getattr(_RECOMPUTE, "depth", 0) > 0


class _Recomputing:
    def __enter__(self):
        _RECOMPUTE.depth = getattr(_RECOMPUTE, "depth", 0) + 1

    def __exit__(self, *exc):
        _RECOMPUTE.depth -= 1


# The layer being run: ("put", offloader, slot, notes) during a checkpoint's first forward,
# ("take", entries list, [position]) during its recompute, None elsewhere. `notes` lets an op
# tell a later op of the same layer something (e.g. "q/k/v can be skipped if stashed").
_STASH = threading.local()


class _StashContext:
    def __init__(self, state):
        self.state = state

    def __enter__(self):
        self.outer = getattr(_STASH, "state", None)
        _STASH.state = self.state

    def __exit__(self, *exc):
        _STASH.state = self.outer


def stashing() -> bool:
    """True inside a checkpointed layer's first forward. An op that can reuse results must then
    call stash_put exactly once (with None when it keeps nothing), so that the recompute's
    stash_take calls pair up with the puts."""
    state = getattr(_STASH, "state", None)
    return state is not None and state[0] == "put"


def stash_note(key: str, value=True) -> None:
    """Leave a note for later ops of the layer in this first forward (no-op elsewhere)."""
    state = getattr(_STASH, "state", None)
    if state is not None and state[0] == "put":
        state[3][key] = value


def stash_noted(key: str):
    state = getattr(_STASH, "state", None)
    return state[3].get(key) if state is not None and state[0] == "put" else None


def stash_peek(tag: str):
    """What stash_take(tag) would return next (without taking it), or None when the next entry
    is another op's or kept nothing; lets an op that runs earlier in the recompute see what a
    later one will reuse."""
    state = getattr(_STASH, "state", None)
    if state is None or state[0] != "take" or state[2][0] >= len(state[1]):
        return None
    entry = state[1][state[2][0]]
    return None if entry[0] != tag or entry[2] is None else (entry[2], entry[3])


def stash_room() -> int:
    """Bytes the current first forward may still stash (0 outside one)."""
    state = getattr(_STASH, "state", None)
    return state[1].stash_left if state is not None and state[0] == "put" else 0


def stash_put(tag: str, tensors, extra=None, late=None) -> bool:
    """Offload `tensors` with the current layer's input; the recompute's stash_take(tag) returns
    them on the device, with `extra` (any object, kept as is). tensors None records a put that
    keeps nothing. False (nothing kept) when the budget is spent or outside a first forward;
    then the recompute's stash_take returns None. late: per tensor, True for one that only the
    layer's attention backward reads (it comes back later, see start_late_prefetch)."""
    state = getattr(_STASH, "state", None)
    if state is None or state[0] != "put":
        return False
    return state[1].stash(state[2], tag, None if tensors is None else list(tensors), extra, late)


def replaying() -> bool:
    """True inside a recompute that has stashed results to take."""
    state = getattr(_STASH, "state", None)
    return state is not None and state[0] == "take"


def stash_take(tag: str):
    """The next stashed group of the layer being recomputed: (device tensors in put order,
    extra), or None when that put kept nothing. Puts and takes must pair up in order."""
    state = getattr(_STASH, "state", None)
    if state is None or state[0] != "take":
        return None
    position = state[2]
    entry = state[1][position[0]] if position[0] < len(state[1]) else None
    position[0] += 1
    if entry is None or entry[0] != tag:
        raise RuntimeError(f"offloaded checkpointing: the recompute asked for stashed {tag!r} but "
                           f"the first forward stashed {None if entry is None else entry[0]!r} "
                           "here; the layer's forward took a different path the second time")
    return None if entry[2] is None else (entry[2], entry[3])


class OffloadedCheckpoint(torch.autograd.Function):
    """Checkpoint one call run_function(x, *rest) with x offloaded to the host in between.

    Only `x` (the first argument, the layer's hidden states) is offloaded, with whatever the
    layer's ops stash; other tensor arguments stay where they are (they are shared by all
    layers: masks, rotary cos/sin)."""

    @staticmethod
    def forward(ctx, run_function, offloader, preserve_rng, anchor, x, *rest):
        ctx.run_function = run_function
        ctx.preserve_rng = preserve_rng
        ctx.offloader = offloader
        device = x.device
        ctx.device = device
        ctx.autocast = _autocast_state(device)
        if preserve_rng:
            ctx.cpu_rng = torch.get_rng_state()
            ctx.cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        ctx.slot = offloader.offload(x)
        with torch.no_grad(), _StashContext(("put", offloader, ctx.slot, {})):
            out = run_function(x, *rest)
        tensor_rest = [t for t in rest if isinstance(t, torch.Tensor)]
        ctx.rest_is_tensor = [isinstance(t, torch.Tensor) for t in rest]
        ctx.rest_plain = [None if isinstance(t, torch.Tensor) else t for t in rest]
        ctx.save_for_backward(*tensor_rest)
        outs, ctx.out_spec = _flatten(out)
        ctx.n_out = len(outs)
        return tuple(o.detach() if o.requires_grad else o for o in outs)

    @staticmethod
    def backward(ctx, *grads):
        device = ctx.device
        stash = ctx.slot.stash
        x = ctx.offloader.restore(ctx.slot, device)
        x = x.detach().requires_grad_(ctx.slot.requires_grad)
        it = iter(ctx.saved_tensors)
        rest = []
        for is_tensor, plain in zip(ctx.rest_is_tensor, ctx.rest_plain):
            if is_tensor:
                t = next(it)
                rest.append(t.detach().requires_grad_(t.requires_grad))
            else:
                rest.append(plain)
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, enabled=ctx.preserve_rng):
            if ctx.preserve_rng:
                torch.set_rng_state(ctx.cpu_rng)
                if ctx.cuda_rng is not None:
                    torch.cuda.set_rng_state(ctx.cuda_rng, device)
            with torch.enable_grad(), _restore_autocast(device, ctx.autocast), _Recomputing(), \
                    _StashContext(("take", stash, [0]) if stash else None):
                out = ctx.run_function(x, *rest)
        ctx.slot.stash = []  # the device copies now live in the recomputed graph only
        outs, _ = _flatten(out)
        pairs = [(o, g) for o, g in zip(outs, grads)
                 if isinstance(o, torch.Tensor) and o.requires_grad and g is not None]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        ctx.run_function = None
        rest_grads = [t.grad if isinstance(t, torch.Tensor) else None for t in rest]
        return (None, None, None, None, x.grad, *rest_grads)


def _flatten(out):
    """(tensors, spec): a layer returns a tensor or a tuple/list of tensors and other things."""
    if isinstance(out, torch.Tensor):
        return [out], None
    if isinstance(out, (tuple, list)):
        tensors = [o for o in out if isinstance(o, torch.Tensor)]
        spec = (type(out), [o if not isinstance(o, torch.Tensor) else _TENSOR for o in out])
        return tensors, spec
    raise TypeError(f"offloaded checkpointing: a checkpointed layer returned {type(out).__name__}; "
                    "expected a tensor or a tuple of tensors")


_TENSOR = object()


def _unflatten(tensors, spec):
    if spec is None:
        return tensors[0]
    kind, items = spec
    it = iter(tensors)
    return kind(next(it) if o is _TENSOR else o for o in items)


def _autocast_state(device):
    kinds = {"cpu", device.type} if device.type in ("cuda", "cpu") else {"cpu"}
    return {k: (torch.is_autocast_enabled(k), torch.get_autocast_dtype(k)) for k in kinds}


class _restore_autocast:
    def __init__(self, device, state):
        self.ctxs = [torch.autocast(k, dtype=dtype, enabled=enabled) for k, (enabled, dtype) in state.items()]

    def __enter__(self):
        for c in self.ctxs:
            c.__enter__()

    def __exit__(self, *exc):
        for c in reversed(self.ctxs):
            c.__exit__(*exc)


class _CheckpointFunction:
    """The `_gradient_checkpointing_func` we install: one offloader per model."""

    def __init__(self, layers: int = 0):
        self.offloader = _Offloader(layers)

    def __deepcopy__(self, memo):  # a copied model gets its own streams and host buffers
        return _CheckpointFunction(self.offloader.layers)

    def __call__(self, function, *args, **kwargs):
        if not args or not isinstance(args[0], torch.Tensor) or not args[0].is_floating_point():
            raise TypeError("offloaded checkpointing expects the layer's hidden states as the "
                            "first positional argument")
        x, rest = args[0], args[1:]
        holder = {}

        def run(*a):
            out = function(*a)
            tensors, spec = _flatten(out)
            holder["spec"] = spec
            return out

        outs = OffloadedCheckpoint.apply(run, self.offloader, kwargs.get("preserve_rng_state", True),
                                         _ANCHOR, x, *rest)
        return _unflatten(list(outs), holder["spec"])


def offloaded_checkpoint(function, *args, **kwargs):
    """One-off form of the installed function: offloaded_checkpoint(fn, x, *rest) = fn(x, *rest)
    with x offloaded until backward (prefetch needs the per-model function, so none here)."""
    return _CheckpointFunction()(function, *args, **kwargs)


def _is_offloading(func) -> bool:
    return isinstance(func, _CheckpointFunction)


def _sticky_set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=None,
                                       every_n_layers: int = 1):
    """Installed on the model: transformers' own _set_gradient_checkpointing, except that
    enabling always installs our offloading function (trainers re-enable checkpointing with
    torch's checkpoint when gradient_checkpointing=True)."""
    original = type(self)._set_gradient_checkpointing
    chosen = self.__dict__["_fastft_checkpoint_func"] if enable else gradient_checkpointing_func
    kwargs = {"enable": enable, "every_n_layers": every_n_layers}
    if chosen is not None:
        kwargs["gradient_checkpointing_func"] = chosen
    try:
        return original(self, **kwargs)
    except TypeError:  # older signature without every_n_layers
        kwargs.pop("every_n_layers")
        return original(self, **kwargs)


def enable_offloaded_checkpointing(model) -> int:
    """Turn on offloaded gradient checkpointing for every GradientCheckpointingLayer of `model`
    (a transformers PreTrainedModel, or a peft model wrapping one). Returns the number of
    layers that will checkpoint. Later `gradient_checkpointing_enable()` calls (trainers make
    them) keep the offloading function."""
    target = _pretrained(model)
    if not getattr(target, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(target).__name__} does not support gradient checkpointing, so "
                         "use_gradient_checkpointing='unsloth' cannot apply; use False")
    func = _CheckpointFunction()
    # an instance attribute bound to the model (a deepcopy rebinds it to the copy)
    target.__dict__["_set_gradient_checkpointing"] = types.MethodType(_sticky_set_gradient_checkpointing, target)
    target.__dict__["_fastft_checkpoint_func"] = func
    enable = getattr(target, "gradient_checkpointing_enable")
    kwargs = {"gradient_checkpointing_kwargs": {"use_reentrant": False}}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # 5.x renamed it activation_checkpointing_enable
        enable(**kwargs)
    if hasattr(target, "config"):
        target.config.use_cache = False
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = sum(1 for m in target.modules() if isinstance(m, GradientCheckpointingLayer)
                 and getattr(m, "gradient_checkpointing", False)
                 and _is_offloading(getattr(m, "_gradient_checkpointing_func", None)))
    func.offloader.layers = layers  # sizes the stash budget (see _Offloader._new_pass)
    from fastft.attention import install_sdpa_wrapper

    install_sdpa_wrapper()
    return layers


def disable_offloaded_checkpointing(model) -> None:
    """Back to transformers' own behaviour (checkpointing off)."""
    target = _pretrained(model)
    installed = target.__dict__.pop("_set_gradient_checkpointing", None)
    target.__dict__.pop("_fastft_checkpoint_func", None)
    if installed is not None:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            target.gradient_checkpointing_disable()


def _pretrained(model):
    """The transformers PreTrainedModel inside a peft wrapper (or the model itself)."""
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        return model
    get_base = getattr(model, "get_base_model", None)  # peft's PeftModel
    inner = get_base() if callable(get_base) else getattr(model, "model", None)  # LoraModel: .model
    if isinstance(inner, PreTrainedModel):
        return inner
    raise TypeError(f"expected a transformers model or a peft model wrapping one, got {type(model).__name__}")
