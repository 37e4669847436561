"""`python -m fastft.env` / `fastft env`: versions, GPU, what _C was built for, and the backend
each op will use."""
from __future__ import annotations

import importlib
import platform

import torch


def is_bf16_supported() -> bool:
    """True when the current CUDA GPU computes in bfloat16 natively (compute capability >= 8.0)."""
    if not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability()[0] >= 8


def _version(name: str) -> str:
    from importlib import metadata

    try:
        importlib.import_module(name)
    except Exception as exc:  # missing, or fails to import on this machine
        return f"not usable ({type(exc).__name__}: {exc})"
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "unknown"


def collect() -> dict:
    import fastft
    import fastft.ops  # noqa: F401  (registers the op backends)
    from fastft import _ext, dispatch

    info = {
        "fastft": fastft.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
    }
    for name in ("triton", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "gguf"):
        info[name] = _version(name)
    if torch.cuda.is_available():
        cap = torch.cuda.get_device_capability()
        info["gpu"] = torch.cuda.get_device_name()
        info["capability"] = f"{cap[0]}.{cap[1]}"
    else:
        info["gpu"] = "none (CPU)"
    info["fastft._C"] = "loaded" if _ext.C is not None else f"absent: {_ext.load_error}"
    info["_C archs"] = ";".join(_ext.arch_list()) or "-"
    info["triton interpreter"] = "on" if dispatch.triton_interpreter_on() else "off"
    info["backends"] = dispatch.report()
    return info


def main() -> int:
    info = collect()
    backends = info.pop("backends")
    width = max(len(k) for k in list(info) + list(backends)) + 2
    for key, value in info.items():
        print(f"{key:<{width}}{value}")
    print("backend per op:")
    for op, choice in backends.items():
        print(f"  {op:<{width}}{choice}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
