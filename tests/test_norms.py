"""rms_norm / layer_norm: the reference against float64, every backend against the reference."""
import pytest
import torch
import torch.nn.functional as F

from fastft.ops import layer_norm, rms_norm
from fastft.ops.norms import reference_layer_norm, reference_rms_norm
from tests.helpers import DTYPES, RTOL, backends, gpu_backends, rel_err

CPU_SHAPES = [(3, 37), (2, 5, 129), (4, 1030)]


def make(shape, dtype, device, strided=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    if strided:  # rows farther apart than their width: exercises the row-stride path
        full = torch.randn(*shape[:-1], shape[-1] + 7, generator=g)
        x = full[..., : shape[-1]]
    else:
        x = torch.randn(*shape, generator=g)
    x = (x * 2 + 0.5).to(device=device, dtype=dtype)
    w = (torch.randn(shape[-1], generator=g) * 0.5 + 1).to(device)
    b = (torch.randn(shape[-1], generator=g) * 0.1).to(device)
    dy = torch.randn(*shape, generator=g).to(device=device, dtype=dtype)
    return x, w, b, dy


def test_reference_matches_float64_formulas():
    x, w, b, _ = make((6, 53), torch.float64, "cpu")
    eps = 1e-6
    rms = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (w.double() + 1.0)
    assert rel_err(reference_rms_norm(x, w.double(), eps, offset=1.0), rms) < 1e-14
    ln = F.layer_norm(x, (53,), w.double(), b.double(), 1e-5)
    assert rel_err(reference_layer_norm(x, w.double(), b.double(), 1e-5), ln) < 1e-13


def run_case(fn, ref_fn, backend, shape, dtype, device, strided, w_dtype=None, frozen=False,
             with_bias=True):
    x, w, b, dy = make(shape, dtype, device, strided)
    w = w.to(w_dtype or dtype)
    b = b.to(w_dtype or dtype) if with_bias else None
    params = [p for p in (w, b) if p is not None]
    # float64 reference on the same (rounded) inputs
    x64 = x.detach().double().requires_grad_()
    p64 = [p.detach().double().requires_grad_(not frozen) for p in params]
    ref = ref_fn(x64, *p64)
    ref.backward(dy.double())
    # backend under test
    xt = x.detach().requires_grad_()
    pt = [p.detach().requires_grad_(not frozen) for p in params]
    out = fn(xt, *pt, backend=backend)
    assert out.dtype == dtype and out.shape == x.shape
    out.backward(dy)
    tol = RTOL[dtype]
    assert rel_err(out, ref) < tol
    assert rel_err(xt.grad, x64.grad) < tol * 2
    for p, q in zip(pt, p64):
        if frozen:
            assert p.grad is None
        else:
            assert p.grad.dtype == p.dtype
            assert rel_err(p.grad, q.grad) < tol * 2


@pytest.mark.parametrize("backend", backends("rms_norm", "cpu"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", CPU_SHAPES)
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rms_norm_cpu(backend, dtype, shape, offset):
    fn = lambda x, w, backend: rms_norm(x, w, 1e-6, offset, backend=backend)  # noqa: E731
    ref = lambda x, w: reference_rms_norm(x, w, 1e-6, offset)  # noqa: E731
    run_case(fn, ref, backend, shape, dtype, "cpu", strided=shape == (4, 1030), with_bias=False)


@pytest.mark.parametrize("backend", backends("layer_norm", "cpu"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", CPU_SHAPES)
def test_layer_norm_cpu(backend, dtype, shape):
    fn = lambda x, w, b, backend: layer_norm(x, w, b, 1e-5, backend=backend)  # noqa: E731
    ref = lambda x, w, b: reference_layer_norm(x, w, b, 1e-5)  # noqa: E731
    run_case(fn, ref, backend, shape, dtype, "cpu", strided=shape == (4, 1030))


@pytest.mark.parametrize("backend", backends("rms_norm", "cpu"))
def test_frozen_weight_and_fp32_weight(backend):
    fn = lambda x, w, backend: rms_norm(x, w, 1e-6, 0.0, backend=backend)  # noqa: E731
    ref = lambda x, w: reference_rms_norm(x, w, 1e-6, 0.0)  # noqa: E731
    run_case(fn, ref, backend, (5, 96), torch.bfloat16, "cpu", False, w_dtype=torch.float32,
             frozen=True, with_bias=False)
    run_case(fn, ref, backend, (5, 96), torch.bfloat16, "cpu", False, w_dtype=torch.float32,
             with_bias=False)


@pytest.mark.parametrize("backend", backends("layer_norm", "cpu"))
def test_layer_norm_without_affine(backend):
    x, _, _, dy = make((4, 77), torch.float32, "cpu")
    xt = x.clone().requires_grad_()
    out = layer_norm(xt, None, None, backend=backend)
    out.backward(dy)
    x64 = x.double().requires_grad_()
    ref = F.layer_norm(x64, (77,), eps=1e-5)
    ref.backward(dy.double())
    assert rel_err(out, ref) < 1e-5 and rel_err(xt.grad, x64.grad) < 1e-5


def test_float64_input_runs_on_the_reference():
    x, w, _, _ = make((3, 20), torch.float64, "cpu")
    out = rms_norm(x, w.double())
    assert out.dtype == torch.float64
    assert rel_err(out, reference_rms_norm(x, w.double())) < 1e-14


def test_triton_custom_ops_pass_opcheck():
    from fastft.ops import norms

    x, w, b, dy = make((4, 40), torch.float32, "cpu")
    y, rstd, mean = torch.empty_like(x), torch.empty(4), torch.empty(4)
    torch.library.opcheck(norms._triton_norm_fwd, (x, w, None, y, None, rstd, 1e-6, 0.0, True))
    torch.library.opcheck(norms._triton_norm_fwd, (x, w, b, y, mean, rstd, 1e-5, 0.0, False))
    dx, dwp = torch.empty_like(x), torch.empty(2, 40)
    torch.library.opcheck(norms._triton_norm_bwd,
                          (dy, x, w, mean, rstd, dx, dwp, dwp.clone(), 0.0, False))


@pytest.mark.parametrize("backend", backends("rms_norm", "cpu"))
def test_compiles_fullgraph(backend):
    x, w, _, _ = make((3, 48), torch.float32, "cpu")
    w.requires_grad_()

    def f(x, w):
        return rms_norm(x, w, 1e-6, 1.0, backend=backend).sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    out = compiled(x, w)
    out.backward()
    assert rel_err(out, reference_rms_norm(x.double(), w.double(), 1e-6, 1.0).sum()) < 1e-5
    assert w.grad is not None and torch.isfinite(w.grad).all()


# ------------------------------------------------------------------------------ GPU

GPU_SHAPES = [(4096, 4096), (3, 5, 4093), (257, 80), (33, 16384)]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", gpu_backends("rms_norm"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_rms_norm_gpu(backend, dtype, shape):
    for offset in (0.0, 1.0):
        fn = lambda x, w, backend: rms_norm(x, w, 1e-6, offset, backend=backend)  # noqa: E731
        ref = lambda x, w: reference_rms_norm(x, w, 1e-6, offset)  # noqa: E731
        run_case(fn, ref, backend, shape, dtype, "cuda", strided=shape[0] == 257,
                 with_bias=False)
    run_case(fn, ref, backend, shape, dtype, "cuda", False, w_dtype=torch.float32, frozen=True,
             with_bias=False)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", gpu_backends("layer_norm"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_layer_norm_gpu(backend, dtype, shape):
    fn = lambda x, w, b, backend: layer_norm(x, w, b, 1e-5, backend=backend)  # noqa: E731
    ref = lambda x, w, b: reference_layer_norm(x, w, b, 1e-5)  # noqa: E731
    run_case(fn, ref, backend, shape, dtype, "cuda", strided=shape[0] == 257)


@pytest.mark.gpu
def test_cuda_ops_pass_opcheck():
    import fastft.ops  # noqa: F401

    ops = torch.ops.fastft
    x, w, b, dy = make((64, 256), torch.bfloat16, "cuda")
    w, b = w.bfloat16(), b.bfloat16()
    y, rstd, mean = torch.empty_like(x), torch.empty(64, device="cuda"), torch.empty(64, device="cuda")
    torch.library.opcheck(ops.rms_norm_fwd, (x, w, y, rstd, 1e-6, 1.0))
    torch.library.opcheck(ops.layer_norm_fwd, (x, w, b, y, mean, rstd, 1e-5))
    dx, dw, db = torch.empty_like(x), torch.empty_like(w), torch.empty_like(b)
    torch.library.opcheck(ops.rms_norm_bwd, (dy, x, w, rstd, dx, dw, 1.0))
    torch.library.opcheck(ops.layer_norm_bwd, (dy, x, w, mean, rstd, dx, dw, db))
    torch.library.opcheck(ops.rms_norm_bwd, (dy, x, w, rstd, dx, None, 0.0))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", gpu_backends("rms_norm"))
def test_gpu_compiles_fullgraph(backend):
    x, w, _, _ = make((64, 512), torch.bfloat16, "cuda")
    w = w.bfloat16().requires_grad_()
    f = torch.compile(lambda x, w: rms_norm(x, w, backend=backend).float().sum(), fullgraph=True)
    out = f(x, w)
    out.backward()
    ref = reference_rms_norm(x.double(), w.double()).sum()
    assert abs(out.item() - ref.item()) <= 1e-2 * abs(ref.item()) + 1e-2


# Widths that reach every backward configuration of the CUDA kernel: 1 / 2 / 4 / 8 vectors a
# thread, a partly filled last vector slot (1032, 6144), the scalar loop (4093, odd), and row
# counts above, below and not a multiple of the dW partial-row grid (4 x SMs blocks).
BWD_SHAPES = [(1000, 8192), (7, 2, 6144), (5, 1032), (600, 4096), (3, 40), (9, 4093)]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", gpu_backends("rms_norm"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", BWD_SHAPES)
def test_rms_norm_backward_variants_gpu(backend, dtype, shape):
    for offset in (0.0, 1.0):
        fn = lambda x, w, backend: rms_norm(x, w, 1e-6, offset, backend=backend)  # noqa: E731
        ref = lambda x, w: reference_rms_norm(x, w, 1e-6, offset)  # noqa: E731
        for w_dtype in (None, torch.float32):
            for frozen in (False, True):
                run_case(fn, ref, backend, shape, dtype, "cuda", strided=offset == 1.0,
                         w_dtype=w_dtype, frozen=frozen, with_bias=False)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", gpu_backends("layer_norm"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", BWD_SHAPES)
def test_layer_norm_backward_variants_gpu(backend, dtype, shape):
    fn = lambda x, w, b, backend: layer_norm(x, w, b, 1e-5, backend=backend)  # noqa: E731
    ref = lambda x, w, b: reference_layer_norm(x, w, b, 1e-5)  # noqa: E731
    for w_dtype in (None, torch.float32):
        for frozen in (False, True):
            run_case(fn, ref, backend, shape, dtype, "cuda", strided=frozen, w_dtype=w_dtype,
                     frozen=frozen)
    # no affine parameters: dx only
    x, _, _, dy = make(shape, dtype, "cuda")
    xt = x.clone().requires_grad_()
    out = layer_norm(xt, None, None, backend=backend)
    out.backward(dy)
    x64 = x.double().requires_grad_()
    expect = F.layer_norm(x64, (shape[-1],), eps=1e-5)
    expect.backward(dy.double())
    assert rel_err(out, expect) < RTOL[dtype] and rel_err(xt.grad, x64.grad) < 2 * RTOL[dtype]
