"""cross_entropy and fused_linear_cross_entropy: torch reference, Triton and CUDA backends.

Per row (token) with logits x[V] and label y, all math in float32:
    z = x * logit_scale                      (Cohere / Granite; skipped when None)
    z = softcap * tanh(z / softcap)          (Gemma 2; skipped when None)
    row_loss = lse(z) - (1 - eps) * z[y] - eps / V * sum(z)     eps = label_smoothing
which is torch.nn.functional.cross_entropy's definition (label smoothing included). Rows whose
label is ignore_index contribute 0 loss and 0 gradient.

Reductions: "sum" = sum of row losses; "mean" = sum / (number of non-ignored rows), 0 when
every row is ignored (no NaN); "none" = the row losses (float32, shaped like labels).
num_items_in_batch (an int or a tensor, as transformers passes it) makes the loss
sum / num_items_in_batch whatever "mean"/"sum" says, so that gradient accumulation over
micro-batches equals one big batch (transformers' ForCausalLMLoss convention).

The loss is returned in float32. The kernels compute loss and gradient in one pass over the
logits: for "mean"/"sum" the gradient (already divided by the divisor) is written during the
forward, and the backward only multiplies it by grad_output; for "none" the backward runs the
kernel again with grad_output as each row's weight, so per-token upstream gradients are honoured.

fused_linear_cross_entropy(hidden, weight, labels, bias=None, ...) computes the same loss of
hidden @ weight.T (+ bias) a chunk of tokens at a time: each chunk's logits exist only inside the
loop, the CE kernel turns them into d_logits in place, and d_hidden (plus dW, accumulated in the
weight's dtype, and db when the head is trainable) are accumulated during the forward.
"""
from __future__ import annotations

import math

import torch

from fastft import dispatch
from fastft.ops._common import cuda_ops, launch_device, new_empty, rows_view

REDUCTIONS = ("mean", "sum", "none")
CHUNK_BYTES = 256 << 20  # logits of one fused-linear chunk, at most (before the free-memory cap)
# The same with a trainable head, where every chunk rewrites dW (vocab x hidden) in a beta=1
# GEMM: fewer, bigger chunks (8 of 2048 tokens for 16384 tokens at Llama-3's vocab) at just
# under the 0.5 GiB of extra memory a fused head may take.
TRAIN_HEAD_CHUNK_BYTES = int(0.49 * (1 << 30))


# ---------------------------------------------------------------- the torch reference

def _math_dtype(dtype):
    """float32 for the kernel dtypes; float64 stays float64 (so the reference can be checked)."""
    return torch.promote_types(dtype, torch.float32)


row_weight_dtype = _math_dtype  # losses, row weights: float32 (float64 for float64 inputs)


def reference_cross_entropy(logits, labels, ignore_index=-100, reduction="mean",
                            num_items_in_batch=None, softcap=None, logit_scale=None,
                            label_smoothing=0.0):
    """Differentiable plain torch (F.cross_entropy on the transformed logits): the test oracle.

    Same conventions as cross_entropy(): an all-ignored "mean" gives 0, not NaN."""
    z = logits.to(_math_dtype(logits.dtype))
    z = z.reshape(-1, z.shape[-1])
    y = labels.reshape(-1)
    if logit_scale is not None:
        z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    rows = torch.nn.functional.cross_entropy(z, y, ignore_index=ignore_index, reduction="none",
                                             label_smoothing=label_smoothing)
    if reduction == "none":
        return rows.view(labels.shape)
    total = rows.sum()
    if num_items_in_batch is not None:
        n = torch.as_tensor(num_items_in_batch, dtype=total.dtype, device=total.device)
    elif reduction == "mean":
        n = (y != ignore_index).sum().to(total.dtype)
    else:
        return total
    return torch.where(n > 0, total / n.clamp_min(1e-30), torch.zeros_like(total))


def _torch_loss_and_grad(logits, labels, loss, grad, row_weight, ignore_index, softcap, scale,
                         smoothing):
    """The kernel contract in plain torch (see _check_kernel_args)."""
    V = logits.shape[1]
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= V))
    if not torch.compiler.is_compiling() and bad.any():
        raise ValueError(f"labels must be in [0, {V}) or ignore_index ({ignore_index}); got "
                         f"{labels[bad][0].item()}")
    z = logits.to(_math_dtype(logits.dtype))
    if scale != 1.0:
        z = z * scale
    t = None
    if softcap:
        t = torch.tanh(z / softcap)
        z = t * softcap
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))[:, None]
    lse = torch.logsumexp(z, -1)
    row = lse - (1.0 - smoothing) * z.gather(1, safe).squeeze(1)
    if smoothing:
        row = row - smoothing / V * z.sum(-1)
    loss.copy_(torch.where(valid, row, torch.zeros_like(row)))
    if grad is None:
        return
    g = torch.exp(z - lse[:, None])
    if smoothing:
        g = g - smoothing / V
    g.scatter_add_(1, safe, torch.full_like(safe, -(1.0 - smoothing), dtype=g.dtype))
    w = row_weight.to(g.dtype).reshape(-1, 1) * valid[:, None].to(g.dtype)
    g = g * w
    if t is not None:
        g = g * (1.0 - t * t)
    if scale != 1.0:
        g = g * scale
    grad.copy_(g)


def _check_kernel_args(logits, labels, loss, grad, row_weight):
    assert logits.dim() == 2 and labels.shape == (logits.shape[0],) and loss.shape == labels.shape
    assert loss.dtype == row_weight_dtype(logits.dtype) and labels.dtype == torch.long
    if grad is not None:
        assert grad.shape == logits.shape and grad.dtype == logits.dtype
        assert row_weight is not None and row_weight.numel() in (1, logits.shape[0])


class _TorchBackend:
    @staticmethod
    def loss_and_grad(logits, labels, loss, grad, row_weight, ignore_index, softcap, scale,
                      smoothing):
        """loss[i] = row loss; grad (None, a new [N, V] buffer, or logits itself for in place)
        = d row_loss / d logits * row_weight (one weight, or one per row)."""
        _check_kernel_args(logits, labels, loss, grad, row_weight)
        _torch_loss_and_grad(logits, labels, loss, grad, row_weight, ignore_index, softcap, scale,
                             smoothing)


# Triton launchers as custom ops so torch.compile and opcheck see a schema. Two ops, because
# the in-place variant mutates the logits and the other must not say so.
@torch.library.custom_op("fastft_triton::cross_entropy", mutates_args=("loss", "grad"))
def _triton_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor,
                          grad: torch.Tensor | None, row_weight: torch.Tensor | None,
                          ignore_index: int, softcap: float, scale: float,
                          smoothing: float) -> None:
    from fastft.triton_kernels import cross_entropy as K

    with launch_device(logits):
        K.loss_and_grad(logits, labels, loss, grad, row_weight, ignore_index, softcap, scale,
                        smoothing)


@torch.library.custom_op("fastft_triton::cross_entropy_inplace", mutates_args=("logits", "loss"))
def _triton_cross_entropy_inplace(logits: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor,
                                  row_weight: torch.Tensor, ignore_index: int, softcap: float,
                                  scale: float, smoothing: float) -> None:
    from fastft.triton_kernels import cross_entropy as K

    with launch_device(logits):
        K.loss_and_grad(logits, labels, loss, logits, row_weight, ignore_index, softcap, scale,
                        smoothing)


@_triton_cross_entropy.register_fake
def _(logits, labels, loss, grad, row_weight, ignore_index, softcap, scale, smoothing):
    return None


@_triton_cross_entropy_inplace.register_fake
def _(logits, labels, loss, row_weight, ignore_index, softcap, scale, smoothing):
    return None


class _TritonBackend:
    @staticmethod
    def loss_and_grad(logits, labels, loss, grad, row_weight, ignore_index, softcap, scale,
                      smoothing):
        _check_kernel_args(logits, labels, loss, grad, row_weight)
        if grad is logits:
            _triton_cross_entropy_inplace(logits, labels, loss, row_weight, ignore_index,
                                          softcap, scale, smoothing)
        else:
            _triton_cross_entropy(logits, labels, loss, grad, row_weight, ignore_index, softcap,
                                  scale, smoothing)


class _CudaBackend:
    @staticmethod
    def loss_and_grad(logits, labels, loss, grad, row_weight, ignore_index, softcap, scale,
                      smoothing):
        _check_kernel_args(logits, labels, loss, grad, row_weight)
        if grad is logits:
            cuda_ops().cross_entropy_fwd_inplace(logits, labels, loss, row_weight, ignore_index,
                                                 softcap, scale, smoothing)
        else:
            cuda_ops().cross_entropy_fwd(logits, labels, loss, grad, row_weight, ignore_index,
                                         softcap, scale, smoothing)


_BACKENDS = {"torch": _TorchBackend, "triton": _TritonBackend, "cuda": _CudaBackend}
for _op in ("cross_entropy", "fused_linear_cross_entropy"):
    dispatch.register(_op, "torch", _TorchBackend)
    dispatch.register(_op, "triton", _TritonBackend)
    if cuda_ops() is not None:
        dispatch.register(_op, "cuda", _CudaBackend)

if cuda_ops() is not None:  # fake (meta) implementations of the CUDA schemas: outputs only
    for _name in ("cross_entropy_fwd", "cross_entropy_fwd_inplace"):
        torch.library.register_fake(f"fastft::{_name}")(lambda *args, **kwargs: None)


# ---------------------------------------------------------------- options and reductions

def _options(reduction, num_items_in_batch, softcap, logit_scale, label_smoothing):
    """Validated options as plain floats: (softcap or 0.0, scale or 1.0, smoothing)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if num_items_in_batch is not None and reduction == "none":
        raise ValueError("num_items_in_batch divides a summed loss; it cannot be used with "
                         "reduction='none' (use reduction='sum' or 'mean', or drop it)")
    if softcap is not None and not float(softcap) > 0:
        raise ValueError(f"softcap must be a positive number or None, got {softcap!r}")
    if logit_scale is not None and not math.isfinite(float(logit_scale)):
        raise ValueError(f"logit_scale must be a finite number or None, got {logit_scale!r}")
    smoothing = float(label_smoothing)
    if not 0.0 <= smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")
    return (float(softcap) if softcap is not None else 0.0,
            float(logit_scale) if logit_scale is not None else 1.0, smoothing)


def _flat_labels(labels, rows):
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor (class indices), got {labels.dtype}")
    if labels.numel() != rows:
        raise ValueError(f"labels has {labels.numel()} elements ({tuple(labels.shape)}) but there "
                         f"are {rows} rows of logits; labels must match the leading dims")
    return labels.reshape(-1).to(torch.long).contiguous()


def _row_weight(labels, ignore_index, reduction, num_items_in_batch, dtype=torch.float32):
    """1 / divisor as a float32 tensor of one element on the labels' device (None for "none").

    Stays on the device (no sync); a zero divisor gives weight 0, so an all-ignored batch has
    loss 0 and zero gradients."""
    if reduction == "none":
        return None
    device = labels.device
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            n = num_items_in_batch.detach().to(device=device, dtype=dtype).reshape(())
        else:
            n = torch.full((), float(num_items_in_batch), dtype=dtype, device=device)
    elif reduction == "mean":
        n = (labels != ignore_index).sum().to(dtype)
    else:
        return torch.ones(1, dtype=dtype, device=device)
    return torch.where(n > 0, 1.0 / n.clamp_min(1e-30), torch.zeros_like(n)).reshape(1)


def _is_one(t: torch.Tensor) -> bool:
    """grad_output == 1 (the usual loss.backward()), checked on the host only in eager mode and
    outside CUDA-graph capture (where reading it would fail)."""
    if torch.compiler.is_compiling() or t.numel() != 1:
        return False
    if t.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    return bool(t.detach().reshape(()).item() == 1.0)


_TRITON_SCALE: list = []


def _triton_scale():
    """triton_kernels.cross_entropy.scale_unless_one, or None when Triton does not import."""
    if not _TRITON_SCALE:
        try:
            from fastft.triton_kernels.cross_entropy import scale_unless_one
        except Exception:  # no Triton: the host check below
            scale_unless_one = None
        _TRITON_SCALE.append(scale_unless_one)
    return _TRITON_SCALE[0]


def _scale_by(t: torch.Tensor, grad_output: torch.Tensor, allow_sync: bool) -> None:
    """t *= grad_output (one element), skipping the pass over t when grad_output == 1.

    On the GPU a Triton kernel reads grad_output on the device, so there is no host sync and
    the backward can be captured in a CUDA graph. Otherwise (CPU, torch.compile, float64,
    no Triton) grad_output is checked on the host when allow_sync, else t is always scaled."""
    scaler = None
    if (t.is_cuda and t.is_contiguous() and t.dtype in (torch.float32, torch.float16,
                                                          torch.bfloat16)
            and not torch.compiler.is_compiling()):
        scaler = _triton_scale()
    if scaler is not None:
        scale = grad_output.detach().reshape(1).to(device=t.device, dtype=torch.float32)
        with launch_device(t):
            scaler(t, scale.contiguous())
        return
    if allow_sync and _is_one(grad_output):
        return
    t.mul_(grad_output.detach().reshape(()).to(row_weight_dtype(t.dtype)))


# ---------------------------------------------------------------- cross_entropy

class _CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, row_weight, reduction, ignore_index, softcap, scale,
                smoothing, inplace, backend):
        impl = _BACKENDS[backend]
        rows = logits.shape[0]
        loss = new_empty((rows,), row_weight_dtype(logits.dtype), logits.device)
        opts = (ignore_index, softcap, scale, smoothing)
        ctx.meta = (impl, reduction, opts, inplace)
        if reduction == "none":
            impl.loss_and_grad(logits, labels, loss, None, None, *opts)
            ctx.save_for_backward(logits, labels)
            return loss
        grad = None
        if ctx.needs_input_grad[0]:
            grad = logits if inplace else new_empty(logits.shape, logits.dtype, logits.device)
            impl.loss_and_grad(logits, labels, loss, grad, row_weight, *opts)
        else:
            impl.loss_and_grad(logits, labels, loss, None, None, *opts)
        ctx.grad = grad  # the finished gradient, scaled by grad_output in backward
        return loss.sum() * row_weight.reshape(())

    @staticmethod
    def backward(ctx, grad_output):
        impl, reduction, opts, inplace = ctx.meta
        if reduction == "none":
            logits, labels = ctx.saved_tensors
            grad = logits if inplace else new_empty(logits.shape, logits.dtype, logits.device)
            scratch = new_empty((logits.shape[0],), row_weight_dtype(logits.dtype), logits.device)
            weight = grad_output.detach().to(scratch.dtype).contiguous()
            impl.loss_and_grad(logits, labels, scratch, grad, weight, *opts)
            return grad, None, None, None, None, None, None, None, None, None
        grad = ctx.grad
        if grad is None:
            raise RuntimeError("cross_entropy: backward ran twice through the same graph (its "
                               "gradient buffer is consumed by the first); call backward once")
        ctx.grad = None
        _scale_by(grad, grad_output, allow_sync=True)
        return grad, None, None, None, None, None, None, None, None, None


def cross_entropy(logits, labels, ignore_index=-100, reduction="mean", num_items_in_batch=None,
                  softcap=None, logit_scale=None, label_smoothing=0.0, *, inplace_backward=False,
                  backend=None):
    """Cross-entropy of logits [..., V] against integer labels [...] (float32 result).

    inplace_backward=True writes the gradient into the logits' own memory (saves a [N, V]
    buffer): only use it when nothing else needs the logits after this call."""
    softcap_f, scale_f, smoothing = _options(reduction, num_items_in_batch, softcap, logit_scale,
                                             label_smoothing)
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must be [..., vocab] with vocab >= 1, got {tuple(logits.shape)}")
    x = rows_view(logits)
    y = _flat_labels(labels, x.shape[0])
    if y.device != x.device:
        raise ValueError(f"labels are on {y.device} but logits on {x.device}; move them together")
    chosen = dispatch.backend_for("cross_entropy", x.device, x.dtype, backend)
    weight = _row_weight(y, ignore_index, reduction, num_items_in_batch, row_weight_dtype(x.dtype))
    out = _CrossEntropyFunction.apply(x, y, weight, reduction, int(ignore_index), softcap_f,
                                      scale_f, smoothing, bool(inplace_backward), chosen)
    return out.view(labels.shape) if reduction == "none" else out


# ---------------------------------------------------------------- fused_linear_cross_entropy

def auto_chunk_rows(tokens, vocab, dtype, device, budget=CHUNK_BYTES):
    """Tokens per chunk so that one chunk of logits takes at most `budget` bytes (and at most a
    quarter of the free GPU memory)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = min(budget, free // 4)
    rows = max(1, budget // (vocab * torch.empty((), dtype=dtype).element_size()))
    if rows >= 256:
        rows = rows // 128 * 128  # whole matmul tiles
    return max(1, min(tokens, rows))


def _linear_ce_chunks(impl, hidden, weight, bias, labels, loss, row_weight, need_dh, need_dw,
                      need_db, opts, chunk):
    """One pass over token chunks: row losses into `loss`; when row_weight is given also the
    gradients d_hidden and dW (hidden's dtype) and db (float32, cast by the caller).

    dW is accumulated straight into the returned gradient, in the weight's dtype: each chunk's
    d_logits.T @ h is one GEMM with beta = 1 (cuBLAS sums the chunk's tokens in float32 and
    rounds into dW once per chunk). A float32 accumulator would be vocab x hidden x 4 bytes
    (1.96 GiB for Llama-3's head) beyond the outputs, plus a pass to cast it; the per-chunk
    rounding costs about 2^-9 relative error per chunk (bf16), far below the bf16 noise of the
    logits themselves (tests bound it against float64). db is only vocab floats: float32."""
    rows, hidden_dim = hidden.shape
    vocab = weight.shape[0]
    dh = new_empty(hidden.shape, hidden.dtype, hidden.device) if need_dh else None
    dw = new_empty((vocab, hidden_dim), weight.dtype, hidden.device) if need_dw else None
    if dw is not None and rows == 0:
        dw.zero_()
    db = torch.zeros(vocab, dtype=torch.float32, device=hidden.device) if need_db else None
    with_grad = row_weight is not None
    per_row = with_grad and row_weight.numel() > 1
    # One buffer for every chunk's logits (a fresh one per chunk would briefly hold two).
    buffer = torch.empty(min(chunk, rows), vocab, dtype=hidden.dtype, device=hidden.device)
    for start in range(0, rows, chunk):
        end = min(rows, start + chunk)
        h = hidden[start:end]
        logits = buffer[: end - start]
        if bias is None:
            torch.mm(h, weight.t(), out=logits)
        else:
            torch.addmm(bias, h, weight.t(), out=logits)
        w = row_weight[start:end] if per_row else row_weight
        # in place: the chunk's logits become its d_logits
        impl.loss_and_grad(logits, labels[start:end], loss[start:end],
                           logits if with_grad else None, w, *opts)
        if not with_grad:
            continue
        if need_dh:
            torch.mm(logits, weight, out=dh[start:end])
        if need_dw:
            if start == 0:  # the first chunk writes dW (no zero fill, no read of it)
                torch.mm(logits.t(), h, out=dw)
            else:
                dw.addmm_(logits.t(), h)
        if need_db:
            db.add_(logits.sum(0, dtype=torch.float32))
    return dh, dw, db


class _FusedLinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, row_weight, reduction, ignore_index, softcap,
                scale, smoothing, chunk, backend):
        impl = _BACKENDS[backend]
        opts = (ignore_index, softcap, scale, smoothing)
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                bias is not None and ctx.needs_input_grad[2])
        ctx.meta = (impl, reduction, opts, chunk, need)
        ctx.param_dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        ctx.math_dtype = row_weight_dtype(hidden.dtype)
        loss = new_empty((hidden.shape[0],), row_weight_dtype(hidden.dtype), hidden.device)
        if reduction == "none" or not any(need):
            _linear_ce_chunks(impl, hidden, weight, bias, labels, loss, None, False, False, False,
                              opts, chunk)
            if reduction == "none":
                ctx.save_for_backward(hidden, weight, bias, labels)
                return loss
            ctx.grads = (None, None, None)
        else:
            ctx.grads = _linear_ce_chunks(impl, hidden, weight, bias, labels, loss, row_weight,
                                          *need, opts, chunk)
        return loss.sum() * row_weight.reshape(())

    @staticmethod
    def backward(ctx, grad_output):
        impl, reduction, opts, chunk, need = ctx.meta
        if reduction == "none":
            hidden, weight, bias, labels = ctx.saved_tensors
            scratch = new_empty((hidden.shape[0],), row_weight_dtype(hidden.dtype), hidden.device)
            row_weight = grad_output.detach().to(scratch.dtype).reshape(-1).contiguous()
            dh, dw, db = _linear_ce_chunks(impl, hidden, weight, bias, labels, scratch,
                                           row_weight, *need, opts, chunk)
        else:
            if ctx.grads is None:
                raise RuntimeError("fused_linear_cross_entropy: backward ran twice through the "
                                   "same graph; call backward once")
            dh, dw, db = ctx.grads
            ctx.grads = None
            # Skipping the scaling when grad_output == 1 saves a pass over dW (1 GiB for
            # Llama-3). On the GPU that check runs on the device (no sync); a host check
            # elsewhere is only worth its sync with a trainable head.
            for t in (dh, dw, db):
                if t is not None:
                    _scale_by(t, grad_output, allow_sync=dw is not None)
        b_dtype = ctx.param_dtypes[1]
        db = db.to(b_dtype) if db is not None else None  # dW is already in the weight's dtype
        return dh, dw, db, None, None, None, None, None, None, None, None, None


def fused_linear_cross_entropy(hidden, weight, labels, bias=None, ignore_index=-100,
                               reduction="mean", num_items_in_batch=None, softcap=None,
                               logit_scale=None, label_smoothing=0.0, *, chunk_size=None,
                               backend=None):
    """cross_entropy(hidden @ weight.T (+ bias), labels) without materialising the logits.

    hidden [..., H], weight [V, H], bias [V] or None, labels [...]. Matmuls run in the inputs'
    dtype (autocast's dtype when autocast is on) with float32 accumulation inside each GEMM;
    dW / db are computed only when weight / bias require grad (dW accumulated chunk by chunk in
    the matmul dtype, db in float32).
    chunk_size: tokens per chunk (default: auto_chunk_rows)."""
    softcap_f, scale_f, smoothing = _options(reduction, num_items_in_batch, softcap, logit_scale,
                                             label_smoothing)
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"weight must be [vocab, hidden] with hidden = {hidden.shape[-1]} "
                         f"(hidden's last dim), got {tuple(weight.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be [{weight.shape[0]}] (one per vocab row), got "
                         f"{tuple(bias.shape)}")
    if torch.is_autocast_enabled(hidden.device.type):
        dtype = torch.get_autocast_dtype(hidden.device.type)
    else:
        dtype = weight.dtype
    h = rows_view(hidden).to(dtype)
    w = weight.to(dtype)
    b = bias.to(dtype) if bias is not None else None
    y = _flat_labels(labels, h.shape[0])
    if y.device != h.device or w.device != h.device:
        raise ValueError("hidden, weight and labels must be on one device")
    chosen = dispatch.backend_for("fused_linear_cross_entropy", h.device, dtype, backend)
    if chunk_size is None:
        # A trainable head rewrites dW (vocab x hidden) once per chunk: bigger chunks, fewer
        # passes over it, just inside the 0.5 GiB of extra memory.
        trainable = torch.is_grad_enabled() and weight.requires_grad
        chunk = auto_chunk_rows(h.shape[0], w.shape[0], dtype, h.device,
                                TRAIN_HEAD_CHUNK_BYTES if trainable else CHUNK_BYTES)
    else:
        chunk = int(chunk_size)
        if chunk < 1:
            raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size!r}")
    row_weight = _row_weight(y, ignore_index, reduction, num_items_in_batch,
                             row_weight_dtype(dtype))
    with torch.autocast(h.device.type, enabled=False):
        out = _FusedLinearCrossEntropyFunction.apply(h, w, b, y, row_weight, reduction,
                                                     int(ignore_index), softcap_f, scale_f,
                                                     smoothing, chunk, chosen)
    return out.view(labels.shape) if reduction == "none" else out
