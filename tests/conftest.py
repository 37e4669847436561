"""Test setup: CPU runs Triton kernels through its interpreter; outputs are poisoned."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
if os.environ.get("PYTEST_XDIST_WORKER"):
    # one intra-op thread per xdist worker: -n auto already fills the cores, and oversubscribed
    # OpenMP pools made CPU-heavy tests (the K-quant quantisers) tens of times slower
    torch.set_num_threads(1)
if not HAS_CUDA:
    # Must be set before triton.jit decorates anything (our kernels are imported lazily).
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Tests pick backends explicitly; an override left in the shell would skew them.
for _var in [v for v in os.environ if v.startswith("FASTFT_BACKEND")]:
    del os.environ[_var]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run by bench/device.sh on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def poison_outputs():
    """Every kernel output starts as NaN, so an element a kernel fails to write fails a test."""
    from fastft.ops import _common

    old = _common.POISON
    _common.POISON = True
    yield
    _common.POISON = old


@pytest.fixture(autouse=True)
def fresh_dispatch():
    from fastft import dispatch

    dispatch.clear_cache()
    yield
    dispatch.clear_cache()


def _leave_class_patches_as_found():
    """Undo the fastft class patches made since this generator started (see below)."""
    patcher = sys.modules.get("fastft.models.patcher")
    before = set(patcher._ORIGINALS) if patcher is not None else set()
    yield
    patcher = sys.modules.get("fastft.models.patcher")
    if patcher is not None:
        patcher.unpatch_all(keep=before)


# Each test, and each module's fixtures, leave fastft's class patches as they found them.
# Loading a FastLanguageModel patches transformers' classes; a later test in the same xdist
# worker that compares with plain transformers + peft would otherwise run the patched forwards
# (and, e.g., get no logits from the fused loss).
@pytest.fixture(scope="module", autouse=True)
def restore_class_patches_of_module():
    yield from _leave_class_patches_as_found()


@pytest.fixture(autouse=True)
def restore_class_patches():
    yield from _leave_class_patches_as_found()


@pytest.fixture
def torch_backend_unpatched(monkeypatch):
    """Model tests on the torch reference backend (fast on CPU), with every class patch undone
    before and after, so tests that patch and tests that compare with plain transformers mix."""
    from fastft import dispatch
    from fastft.models import unpatch_all

    monkeypatch.setenv("FASTFT_BACKEND", "torch")
    dispatch.clear_cache()
    unpatch_all()
    yield
    unpatch_all()
    dispatch.clear_cache()


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-tensor tests (OpenMP threads spinning on a
    shared CI box made them far slower); restored afterwards for the other test files."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
