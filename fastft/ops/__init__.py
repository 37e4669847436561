"""The public op API (a contract for downstream trainers; see DESIGN.md).

Each op is one autograd function whose backend (CUDA, Triton or the torch reference) comes
from fastft.dispatch.

The functions are imported eagerly, and after their modules: importing a submodule binds its
name on this package, so a lazy `rope` would later resolve to the module fastft/ops/rope.py
instead of the function. Importing them here once, function last, keeps the names right."""
from fastft.ops.norms import layer_norm, rms_norm  # noqa: I001
from fastft.ops.rope import rope
from fastft.ops.activations import geglu, swiglu
from fastft.ops.cross_entropy import cross_entropy, fused_linear_cross_entropy
from fastft.ops.nf4 import nf4_dequantize, nf4_matmul

__all__ = ["rms_norm", "layer_norm", "rope", "swiglu", "geglu", "cross_entropy",
           "fused_linear_cross_entropy", "nf4_dequantize", "nf4_matmul"]


def load_all():
    """Every op module is imported above (each registers its backends with dispatch)."""
