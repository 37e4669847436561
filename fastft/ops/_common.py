"""Helpers shared by the op modules."""
from __future__ import annotations

import contextlib

import torch

# Tests set this so that every output a kernel should write starts as NaN (or -1 for
# integers): an element the kernel forgets to write then fails the comparison.
POISON = False


def new_empty(shape, dtype, device) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    if POISON:
        out.fill_(float("nan") if dtype.is_floating_point else -1)
    return out


def rows_view(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, last_dim] with a contiguous last dim (a view when possible)."""
    if x.dim() == 0:
        raise ValueError("expected a tensor with at least one dimension")
    if x.stride(-1) != 1 and x.shape[-1] > 1:
        x = x.contiguous()
    return x.reshape(-1, x.shape[-1])


def triton_programs(device: torch.device, rows: int, per_sm: int = 4) -> int:
    """How many programs a row-looping Triton kernel should launch."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(rows, sms * per_sm))
    return max(1, min(rows, 4))  # interpreter: a few programs exercise the row loop


_EXT = []  # fastft._ext, imported on first use (an import statement per call cost ~3 us)


def cuda_ops():
    """torch.ops.fastft when fastft._C is loaded, else None."""
    if not _EXT:
        from fastft import _ext

        _EXT.append(_ext)
    return torch.ops.fastft if _EXT[0].C is not None else None


def launch_device(t: torch.Tensor):
    """Context in which a Triton kernel for `t` launches on t's GPU (Triton launches on the
    current CUDA device); nothing to do for CPU tensors under the interpreter."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
