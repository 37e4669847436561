"""Build logic of setup.py, checked without a toolkit: arch defaults and the clear failure."""
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_setup_helpers():
    import importlib.util

    src = open(os.path.join(ROOT, "setup.py")).read().split("ext_modules, cmdclass =")[0]
    spec = importlib.util.spec_from_loader("fastft_setup", loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__file__ = os.path.join(ROOT, "setup.py")
    exec(compile(src, "setup.py", "exec"), module.__dict__)
    return module


def test_default_arch_list_fits_nvcc():
    s = load_setup_helpers()
    cuda12 = s.default_arch_list((12, 4)).split(";")
    assert "7.0" in cuda12 and "10.0" not in cuda12 and cuda12[-1].endswith("+PTX")
    cuda128 = s.default_arch_list((12, 8)).split(";")
    assert "10.0" in cuda128 and "12.0+PTX" in cuda128
    cuda13 = s.default_arch_list((13, 0)).split(";")
    assert "7.0" not in cuda13 and "7.2" not in cuda13 and "9.0" in cuda13


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the CPU-only failure message")
def test_forced_cuda_build_without_cuda_torch_fails_clearly():
    env = dict(os.environ, FASTFT_BUILD_CUDA="1")
    proc = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert proc.returncode != 0
    assert "FASTFT_BUILD_CUDA=1" in proc.stderr and "CPU-only build" in proc.stderr


def test_bad_build_mode_is_rejected():
    env = dict(os.environ, FASTFT_BUILD_CUDA="yes")
    proc = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "auto, 1 or 0" in proc.stderr


def test_auto_mode_builds_pure_python_here():
    env = dict(os.environ, FASTFT_BUILD_CUDA="auto")
    proc = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "fastft" in proc.stdout


def test_triton_kernels_installed_under_fastft():
    import fastft.triton_kernels

    assert os.path.samefile(os.path.dirname(fastft.triton_kernels.__file__),
                            os.path.join(ROOT, "triton_kernels"))
