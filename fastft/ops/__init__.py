"""The public op API (a contract for downstream trainers; see DESIGN.md).

Each op is one autograd function whose backend (CUDA, Triton or the torch reference) comes
from fastft.dispatch."""
from fastft.ops.norms import layer_norm, rms_norm

__all__ = ["rms_norm", "layer_norm"]
