"""Shared test utilities: backends to test, tolerances, relative error."""
import torch

from fastft import dispatch

# ||out - ref|| / ||ref|| bounds against a float64 reference, by the dtype computed in.
RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.2e-2, torch.float64: 1e-12}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), "non-finite values (unwritten / poisoned elements?)"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def backends(op, device):
    """Backends of `op` that can run on `device` (kernel dtypes)."""
    return [b for b in dispatch.TABLE[op]
            if dispatch.why_not(op, b, device, torch.float32) is None]


def gpu_backends(op):
    return [b for b in ("cuda", "triton") if b in dispatch.TABLE[op]]
