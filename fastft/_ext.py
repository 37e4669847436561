"""Loads fastft._C (the CUDA kernels) if it was built, and says what it was built for."""
from __future__ import annotations

C = None
load_error: str | None = None

import importlib.util

if importlib.util.find_spec("fastft._C") is None:
    load_error = ("not built; install with a CUDA toolkit and a CUDA build of torch "
                  "(pip install --no-build-isolation .)")
else:
    try:
        import torch  # noqa: F401  (the extension links against libtorch: import it first)

        from fastft import _C as C  # type: ignore[attr-defined]
    except Exception as exc:  # e.g. built against another torch version
        C = None
        load_error = f"fails to load ({type(exc).__name__}: {exc}); rebuild it for this torch"


def arch_list() -> list[str]:
    """The TORCH_CUDA_ARCH_LIST entries _C was compiled for, e.g. ['8.0', '9.0+PTX']."""
    if C is None:
        return []
    try:
        from fastft import _build_info  # written by setup.py next to the build
    except ImportError:
        return []
    return [a for a in _build_info.CUDA_ARCH_LIST.replace(" ", ";").split(";") if a]


def built_for_device(index: int) -> bool:
    """Whether _C holds kernel code that this GPU can run: asks the driver which image
    it picked for one of our kernels (works however _C was built, setup.py or CMake)."""
    if C is None:
        return False
    import torch

    return int(torch.ops.fastft.kernel_image_version(index)) > 0


def built_for(capability: tuple[int, int]) -> bool:
    """Whether the arch list _C was built with covers this compute capability.

    Machine code (SASS) for major.minor runs on the same major with an equal or higher minor;
    PTX (the '+PTX' entry) is compiled by the driver for any newer GPU. Arch-specific targets
    ('9.0a') run on that exact capability only."""
    for entry in arch_list():
        ptx = entry.endswith("+PTX")
        arch = entry.replace("+PTX", "")
        specific = arch.endswith("a") or arch.endswith("f")
        major, minor = (int(p) for p in arch.rstrip("af").split("."))
        if specific:
            if capability == (major, minor):
                return True
        elif ptx and capability >= (major, minor):
            return True
        elif capability[0] == major and capability[1] >= minor:
            return True
    return False
