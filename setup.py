"""Build script: the pure-Python package always; fastft._C only when CUDA can be built.

FASTFT_BUILD_CUDA=auto (default) builds _C when torch is a CUDA build and nvcc is found,
=1 requires it (a clear error says what is missing), =0 never builds it.
TORCH_CUDA_ARCH_LIST and MAX_JOBS are honoured (torch.utils.cpp_extension reads both);
without TORCH_CUDA_ARCH_LIST the default list below fits the nvcc version.
"""
import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
MODE = os.environ.get("FASTFT_BUILD_CUDA", "auto").strip().lower()
if MODE not in ("auto", "1", "0"):
    sys.exit(f"FASTFT_BUILD_CUDA must be auto, 1 or 0, not {MODE!r}")


def nvcc_version(nvcc):
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def default_arch_list(cuda):
    """Archs that this nvcc can target: CUDA 13 dropped 7.0/7.2; Blackwell needs >= 12.8."""
    archs = ["7.5", "8.0", "8.6", "8.9", "9.0"]
    if cuda < (13, 0):
        archs.insert(0, "7.0")
    if cuda >= (12, 8):
        archs += ["10.0", "12.0"]
    archs[-1] += "+PTX"
    return ";".join(archs)


def cuda_build_problem():
    """None when _C can be built here, else a sentence saying what is missing."""
    try:
        import torch  # noqa: F401
        from torch.utils import cpp_extension
    except ImportError:
        return ("torch is not importable in the build environment; install torch first and "
                "build with `pip install --no-build-isolation .`")
    if torch.version.cuda is None:
        return (f"torch {torch.__version__} is a CPU-only build; install a CUDA build of torch")
    home = cpp_extension.CUDA_HOME
    nvcc = os.path.join(home, "bin", "nvcc") if home else shutil.which("nvcc")
    if not nvcc or not os.path.exists(nvcc):
        return "no CUDA toolkit found (nvcc not on PATH and CUDA_HOME unset)"
    return None


def extension_modules():
    if MODE == "0":
        return [], {}
    problem = cuda_build_problem()
    if problem:
        if MODE == "1":
            sys.exit(f"FASTFT_BUILD_CUDA=1 but fastft._C cannot be built: {problem}.")
        print(f"fastft: building without fastft._C ({problem}); Triton / torch backends serve.")
        return [], {}
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension

    cuda = nvcc_version(os.path.join(CUDA_HOME, "bin", "nvcc")) or (12, 0)
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = default_arch_list(cuda)
    archs = os.environ["TORCH_CUDA_ARCH_LIST"]
    with open(os.path.join(HERE, "fastft", "_build_info.py"), "w") as f:
        f.write(f"CUDA_ARCH_LIST = {archs!r}\nCUDA_VERSION = {'%d.%d' % cuda!r}\n")
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*.cu"))
    ext = CUDAExtension(
        name="fastft._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={
            "cxx": ["-O3"],
            "nvcc": ["-O3", "--use_fast_math", "-lineinfo",
                     "--expt-relaxed-constexpr"],
        },
        py_limited_api=False,
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = extension_modules()

setup(
    packages=find_packages(include=["fastft", "fastft.*"]) + ["fastft.triton_kernels"],
    package_dir={"fastft.triton_kernels": "triton_kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
