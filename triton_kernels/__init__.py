"""Triton kernels of fastft, one module per op family (installed as fastft.triton_kernels).

Each module exposes launchers that write into caller-allocated outputs; fastft/ops/ wraps
them as torch custom ops. Importing this package needs triton."""
