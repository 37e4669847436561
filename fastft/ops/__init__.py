"""The public op API (a contract for downstream trainers; see DESIGN.md).

Each op is one autograd function whose backend (CUDA, Triton or the torch reference) comes
from fastft.dispatch. Modules load on first use of one of their ops."""
import importlib

# public name -> module that defines it (one module per op family)
_OPS = {
    "rms_norm": "fastft.ops.norms",
    "layer_norm": "fastft.ops.norms",
    "rope": "fastft.ops.rope",
    "swiglu": "fastft.ops.activations",
    "geglu": "fastft.ops.activations",
    "cross_entropy": "fastft.ops.cross_entropy",
    "fused_linear_cross_entropy": "fastft.ops.cross_entropy",
    "nf4_dequantize": "fastft.ops.nf4",
    "nf4_matmul": "fastft.ops.nf4",
}
__all__ = sorted(_OPS)


def __getattr__(name):
    module = _OPS.get(name)
    if module is None:
        raise AttributeError(f"module 'fastft.ops' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def load_all():
    """Import every op module that exists (registers their backends with the dispatch table)."""
    for module in sorted(set(_OPS.values())):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:  # a real import error inside the module: surface it
                raise
