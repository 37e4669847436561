"""The capability-dispatch table: which backend runs each op on a given device.

The table is data: for each op an ordered tuple of backends; the first whose condition holds
(and that has an implementation registered for the op) wins. Conditions live in CONDITIONS.
Automatic choices are cached per (op, device, dtype); overrides are read from the environment
on every call, so tests and users can flip them at run time:

    FASTFT_BACKEND=cuda|triton|torch           all ops
    FASTFT_BACKEND_<OP>=cuda|triton|torch      one op (e.g. FASTFT_BACKEND_RMS_NORM=triton)

A forced backend that cannot run raises BackendUnavailable: never a silent fallback.
"""
from __future__ import annotations

import functools
import os

import torch

BACKEND_NAMES = ("cuda", "triton", "torch")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# op -> backends in order of preference.
TABLE: dict[str, tuple[str, ...]] = {
    # CUDA first (bench/RESULTS.md, H200). On the GPU the two backends of these ops are within
    # 0-6% of each other (CUDA RoPE now the faster), but each Triton call goes through
    # torch.library's Python custom-op layer: bench/host_overhead.py put ~0.2 ms of host time
    # on each such call, ~13 calls per decoder layer per step, and the 8B LoRA step at 2 x 2048
    # was bound by the host (issue time ~80% of wall). The C++ ops cost microseconds.
    "rms_norm": ("cuda", "triton", "torch"),
    "layer_norm": ("cuda", "triton", "torch"),
    "rope": ("cuda", "triton", "torch"),
    "swiglu": ("cuda", "triton", "torch"),
    "geglu": ("cuda", "triton", "torch"),
    "cross_entropy": ("cuda", "triton", "torch"),
    "fused_linear_cross_entropy": ("cuda", "triton", "torch"),
    "nf4_dequantize": ("cuda", "triton", "torch"),
    "nf4_matmul": ("cuda", "triton", "torch"),
}

# op -> backend -> implementation object (registered by the op modules in fastft/ops/).
_IMPLS: dict[str, dict[str, object]] = {}


class BackendUnavailable(RuntimeError):
    """A backend was forced (argument or environment) but cannot run here."""


def register(op: str, backend: str, impl) -> None:
    if op not in TABLE:
        raise KeyError(f"op {op!r} is not in fastft.dispatch.TABLE; add it there first")
    if backend not in TABLE[op]:
        raise KeyError(f"backend {backend!r} is not listed for op {op!r} in the dispatch table")
    _IMPLS.setdefault(op, {})[backend] = impl


def implementation(op: str, backend: str):
    return _IMPLS[op][backend]


# --- conditions --------------------------------------------------------------------------

def triton_interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_TRITON_IMPORT_ERROR: list = []  # filled once; a list so dynamo sees a plain read


def _triton_import_error() -> str | None:
    if not _TRITON_IMPORT_ERROR:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401

            _TRITON_IMPORT_ERROR.append(None)
        except Exception as exc:  # ImportError, or a broken install
            _TRITON_IMPORT_ERROR.append(f"triton does not import ({exc})")
    return _TRITON_IMPORT_ERROR[0]


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@functools.lru_cache(maxsize=None)
def _built_for_device(index: int) -> bool:
    from fastft import _ext

    return _ext.built_for_device(index)


def _dtype_problem(dtype) -> str | None:
    if dtype is not None and dtype not in KERNEL_DTYPES:
        return f"dtype {dtype} is not supported by the kernels (float32, float16, bfloat16 are)"
    return None


def _cuda_problem(op: str, device: torch.device, dtype) -> str | None:
    from fastft import _ext

    if device.type != "cuda":
        return f"tensors are on {device.type}, the CUDA kernels need CUDA tensors"
    if _ext.C is None:
        return f"fastft._C is not built ({_ext.load_error})"
    index = device.index if device.index is not None else torch.cuda.current_device()
    cap = _capability(index)
    if cap < (7, 0):
        return f"compute capability {cap[0]}.{cap[1]} is below 7.0"
    if not _built_for_device(index):
        return (f"fastft._C was built for {_ext.arch_list()} which does not include this GPU's "
                f"compute capability {cap[0]}.{cap[1]}; rebuild with TORCH_CUDA_ARCH_LIST="
                f"{cap[0]}.{cap[1]}")
    return _dtype_problem(dtype)


def _triton_problem(op: str, device: torch.device, dtype) -> str | None:
    err = _triton_import_error()
    if err:
        return err
    if device.type == "cuda":
        cap = _capability(device.index if device.index is not None else torch.cuda.current_device())
        if cap < (7, 0):
            return f"compute capability {cap[0]}.{cap[1]} is below 7.0"
    elif device.type == "cpu":
        if not triton_interpreter_on():
            return "tensors are on the CPU and the Triton interpreter is off (TRITON_INTERPRET=1)"
    else:
        return f"Triton kernels do not run on {device.type} tensors"
    return _dtype_problem(dtype)


def _torch_problem(op: str, device: torch.device, dtype) -> str | None:
    return None


CONDITIONS = {"cuda": _cuda_problem, "triton": _triton_problem, "torch": _torch_problem}


# --- selection ---------------------------------------------------------------------------

def forced_backend(op: str) -> tuple[str | None, str | None]:
    """(backend, the variable that forced it) from the environment, or (None, None)."""
    for var in (f"FASTFT_BACKEND_{op.upper()}", "FASTFT_BACKEND"):
        value = os.environ.get(var, "").strip().lower()
        if value and value != "auto":
            if value not in BACKEND_NAMES:
                raise BackendUnavailable(
                    f"{var}={value!r} is not a backend; use one of {', '.join(BACKEND_NAMES)} "
                    f"(or unset it for automatic choice)")
            return value, var
    return None, None


def why_not(op: str, backend: str, device, dtype=None) -> str | None:
    """None when `backend` can run `op` on this device and dtype, else the reason."""
    device = torch.device(device)
    if backend not in TABLE[op]:
        return f"op {op} has no {backend} backend (it has {', '.join(TABLE[op])})"
    problem = CONDITIONS[backend](op, device, dtype)
    if problem is None and backend not in _IMPLS.get(op, {}):
        problem = f"no {backend} implementation of {op} is registered"
    return problem


@functools.lru_cache(maxsize=None)
def _auto_choice(op: str, device: torch.device, dtype) -> str:
    for backend in TABLE[op]:
        if why_not(op, backend, device, dtype) is None:
            return backend
    raise BackendUnavailable(f"no backend of {op} can run on {device} with {dtype}")


def backend_for(op: str, device, dtype=None, backend: str | None = None) -> str:
    """The backend that runs `op` for tensors on `device` with `dtype`.

    `backend` (a call argument) beats the environment; both are checked, never ignored.
    Under torch.compile the choice is made once, at trace time, and baked into the graph."""
    return _backend_for_constant(op, torch.device(device), dtype, backend)


@torch.compiler.assume_constant_result
def _backend_for_constant(op, device, dtype, backend):
    return _backend_for(op, device, dtype, backend)


def _backend_for(op: str, device, dtype=None, backend: str | None = None) -> str:
    if op not in TABLE:
        raise KeyError(f"unknown op {op!r}; known: {', '.join(sorted(TABLE))}")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    source = "backend="
    if backend is None:
        backend, var = forced_backend(op)
        source = f"{var}="
    if backend is None:
        return _auto_choice(op, device, dtype)
    backend = backend.lower()
    if backend not in BACKEND_NAMES:
        raise BackendUnavailable(f"{source}{backend!r} is not a backend; use one of {BACKEND_NAMES}")
    problem = why_not(op, backend, device, dtype)
    if problem:
        raise BackendUnavailable(
            f"{source}{backend} forces the {backend} backend for {op}, but it cannot run here: "
            f"{problem}. Unset the override or pick a backend listed by `python -m fastft.env`.")
    return backend


def clear_cache() -> None:
    _auto_choice.cache_clear()


def report(device=None) -> dict[str, str]:
    """op -> chosen backend (or the reason none can run) for a device, for `fastft env`."""
    import fastft.ops

    fastft.ops.load_all()
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    out = {}
    for op in sorted(TABLE):
        try:
            out[op] = backend_for(op, device, torch.bfloat16 if torch.device(device).type == "cuda"
                                  else torch.float32)
        except BackendUnavailable as exc:
            out[op] = f"unavailable: {exc}"
    return out
