"""swiglu / geglu: the reference against float64 and transformers' ACT2FN, every backend against
the reference, separate and fused (strided) gate/up, in-place and out-of-place backward."""
import pytest
import torch
import torch.nn.functional as F

from fastft.ops import geglu, swiglu
from fastft.ops import activations as A
from tests.helpers import DTYPES, RTOL, backends, gpu_backends, rel_err

ACTS = ["silu", "gelu", "gelu_tanh"]
CPU_SHAPES = [(3, 37), (2, 5, 129), (4, 1030)]


def call(act, gate, up, backend, inplace_backward=True):
    if act == "silu":
        return swiglu(gate, up, inplace_backward=inplace_backward, backend=backend)
    return geglu(gate, up, "none" if act == "gelu" else "tanh",
                 inplace_backward=inplace_backward, backend=backend)


def op_name(act):
    return "swiglu" if act == "silu" else "geglu"


def make(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    gate = (torch.randn(*shape, generator=g) * 2).to(device, dtype)  # spans both GELU tails
    up = torch.randn(*shape, generator=g).to(device, dtype)
    dh = torch.randn(*shape, generator=g).to(device, dtype)
    return gate, up, dh


def run_case(backend, act, shape, dtype, device, kind):
    """kind: 'proj' (separate non-leaf projections: backward in place), 'fused' (two halves of
    one non-leaf gate_up tensor: in place), 'leaf' (leaves requiring grad: out of place),
    'out_of_place' (inplace_backward=False)."""
    gate0, up0, dh = make(shape, dtype, device)
    g64, u64 = gate0.double().requires_grad_(), up0.double().requires_grad_()
    ref = A.reference_glu(g64, u64, act)
    ref.backward(dh.double())
    tol = RTOL[dtype]
    if kind == "fused":
        base = torch.cat([gate0, up0], -1).requires_grad_()
        fused = base * 1
        gate, up = fused.chunk(2, dim=-1)
    elif kind == "leaf":
        gate, up = gate0.clone().requires_grad_(), up0.clone().requires_grad_()
    else:
        bg, bu = gate0.clone().requires_grad_(), up0.clone().requires_grad_()
        gate, up = bg * 1, bu * 1
    out = call(act, gate, up, backend, inplace_backward=kind != "out_of_place")
    assert out.shape == gate.shape and out.dtype == dtype
    assert rel_err(out, ref) < tol
    out.backward(dh)
    if kind == "fused":
        d_gate, d_up = base.grad.chunk(2, dim=-1)
        assert torch.equal(fused.detach(), base.grad)  # gradients were written into the buffer
    elif kind == "leaf":
        d_gate, d_up = gate.grad, up.grad
        assert torch.equal(gate.detach(), gate0) and torch.equal(up.detach(), up0)
    else:
        d_gate, d_up = bg.grad, bu.grad
        if kind == "proj":
            assert torch.equal(gate.detach(), d_gate) and torch.equal(up.detach(), d_up)
        else:
            assert torch.equal(gate.detach(), gate0) and torch.equal(up.detach(), up0)
    assert rel_err(d_gate, g64.grad) < 2 * tol
    assert rel_err(d_up, u64.grad) < 2 * tol


# ------------------------------------------------------------------------- reference

@pytest.mark.parametrize("act", ACTS)
def test_reference_matches_float64_formulas_and_transformers(act):
    from transformers.activations import ACT2FN

    hf = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}[act]
    gate, up, dh = make((6, 53), torch.float64, "cpu")
    x = gate
    if act == "silu":
        expect = x / (1 + torch.exp(-x))
    elif act == "gelu":
        expect = 0.5 * x * (1 + torch.erf(x / 2 ** 0.5))
    else:
        expect = 0.5 * x * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (x + 0.044715 * x ** 3)))
    assert rel_err(A.reference_glu(gate, up, act), expect * up) < 1e-14
    assert rel_err(ACT2FN[hf](gate) * up, expect * up) < 1e-14
    # the explicit derivative the kernels use, against autograd of the formula
    g = gate.clone().requires_grad_()
    A.reference_glu(g, up, act).backward(dh)
    a, da = A._act_and_grad(gate, act)
    assert rel_err(a, expect) < 1e-14
    assert rel_err(dh * up * da, g.grad) < 1e-13


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_in_low_precision_is_close_to_float64(act, dtype):
    gate, up, _ = make((7, 301), dtype, "cpu")
    out = A.reference_glu(gate, up, act)
    assert out.dtype == dtype
    assert rel_err(out, A.reference_glu(gate.double(), up.double(), act)) < RTOL[dtype] / 2


@pytest.mark.parametrize("act", ACTS)
def test_matches_transformers_activations_in_bf16(act):
    from transformers.activations import ACT2FN

    hf = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}[act]
    gate, up, _ = make((5, 211), torch.bfloat16, "cpu")
    expect = ACT2FN[hf](gate.double()) * up.double()
    for backend in backends(op_name(act), "cpu"):
        assert rel_err(call(act, gate, up, backend), expect) < RTOL[torch.bfloat16]


# ------------------------------------------------- the erf approximation of the kernels

# erfc(z) = t * exp(-z^2 + P(t)), t = 1 / (1 + z/2) for z >= 0: the formula the CUDA and Triton
# GeGLU kernels use (coefficients copied from csrc/activations.cu, highest degree first; Triton
# folds log2(e) and the 0.5 into them).
ERFC_COEFFS = (0.17087277, -0.82215223, 1.48851587, -1.13520398, 0.27886807, -0.18628806,
               0.09678418, 0.37409196, 1.00002368, -1.26551223)


def erfc_fit(z):
    t = 1 / (1 + 0.5 * z)
    p = torch.zeros_like(z)
    for c in ERFC_COEFFS:
        p = p * t + c
    return t * torch.exp(p - z * z)


def test_erfc_fit_is_accurate_in_float64_and_float32():
    z = torch.linspace(0, 14, 1_400_001, dtype=torch.float64)
    ref = torch.special.erfc(z)
    fit = erfc_fit(z)
    assert ((fit - ref).abs() / ref).max() < 1.1e-7  # relative, tails included
    # GELU's cdf as the kernels form it, evaluated in float32 over gates in [-20, 20]
    g = torch.linspace(-20, 20, 800_001, dtype=torch.float64)
    g32 = g.float()
    half = 0.5 * erfc_fit(g32.abs() * 0.7071067811865476)
    cdf = torch.where(g32 >= 0, 1 - half, half).double()
    ref_cdf = 0.5 * torch.special.erfc(-g32.double() / 2 ** 0.5)
    assert (cdf - ref_cdf).abs().max() < 5e-7
    low = ref_cdf > 1e-30  # the lower tail keeps its relative accuracy (no 1 - x cancellation)
    assert ((cdf - ref_cdf).abs() / ref_cdf)[low & (g < 0)].max() < 1e-4


def test_folded_erfc_fit_of_the_triton_kernel_is_the_same_function():
    # Triton forms 0.5 * erfc(z) as t * 2^(L*P(t) - 1 - g^2 * L/2), L = log2(e), z = |g|/sqrt 2
    # (its coefficients are these times L, the constant term's minus 1); the kernel's own
    # constants are checked end to end by the pointwise tests
    L = 1 / torch.log(torch.tensor(2.0, dtype=torch.float64))
    g = torch.linspace(0, 18, 180_001, dtype=torch.float64)
    t = 1 / (1 + g * (0.5 / 2 ** 0.5))
    p = torch.zeros_like(g)
    for i, c in enumerate(ERFC_COEFFS):
        p = p * t + (c * L - (1 if i == len(ERFC_COEFFS) - 1 else 0))
    folded = t * torch.exp2(p - g * g * (L / 2))
    ref = 0.5 * torch.special.erfc(g / 2 ** 0.5)
    assert ((folded - ref).abs() / ref).max() < 1.1e-7


def check_pointwise_gelu_erf(backend, device):
    """fp32 GeGLU (erf) value, gradient and the backward's h at every gate in a dense grid over
    both tails, elementwise against float64: catches a bad coefficient that a norm-based check
    could hide."""
    g64 = torch.linspace(-12, 12, 24_003, dtype=torch.float64)
    gate = g64.float().to(device).reshape(3, -1).requires_grad_()
    up = torch.ones_like(gate, requires_grad=True)
    out = geglu(gate, up, "none", inplace_backward=False, backend=backend)
    out.backward(torch.ones_like(out))
    g = gate.detach().double().cpu().flatten()
    cdf = 0.5 * torch.special.erfc(-g / 2 ** 0.5)
    pdf = torch.exp(-0.5 * g * g) / (2 * torch.pi) ** 0.5
    bound = 2e-6 + 1e-6 * g.abs()
    assert ((out.detach().double().cpu().flatten() - g * cdf).abs() <= bound).all()
    assert ((gate.grad.double().cpu().flatten() - (cdf + g * pdf)).abs() <= bound).all()
    assert ((up.grad.double().cpu().flatten() - g * cdf).abs() <= bound).all()
    # h as the backward writes it (backend.backward(..., h=h))
    g32 = gate.detach()
    h = torch.full_like(g32, float("nan"))
    A._BACKENDS[backend].backward(torch.ones_like(g32), g32.clone(), torch.ones_like(g32), None,
                                  None, "gelu", h=h)
    assert ((h.double().cpu().flatten() - g * cdf).abs() <= bound).all()


@pytest.mark.parametrize("backend", backends("geglu", "cpu"))
def test_gelu_erf_pointwise_accuracy_cpu(backend):
    check_pointwise_gelu_erf(backend, "cpu")


# ------------------------------------------------------------------------- backends

@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", CPU_SHAPES)
@pytest.mark.parametrize("kind", ["proj", "fused", "leaf", "out_of_place"])
def test_glu_cpu(act, dtype, shape, kind):
    for backend in backends(op_name(act), "cpu"):
        run_case(backend, act, shape, dtype, "cpu", kind)


@pytest.mark.parametrize("backend", backends("swiglu", "cpu"))
def test_same_tensor_as_gate_and_up_is_not_overwritten(backend):
    x0, _, dh = make((4, 33), torch.float32, "cpu")
    b = x0.clone().requires_grad_()
    x = b * 1
    out = swiglu(x, x, backend=backend)
    out.backward(dh)
    x64 = x0.double().requires_grad_()
    (F.silu(x64) * x64).backward(dh.double())
    assert rel_err(b.grad, x64.grad) < 1e-5
    assert torch.equal(x.detach(), x0)


@pytest.mark.parametrize("backend", backends("swiglu", "cpu"))
def test_only_one_input_requires_grad(backend):
    gate0, up0, dh = make((3, 40), torch.float32, "cpu")
    w = up0.clone().requires_grad_()
    up = w * 1
    out = swiglu(gate0, up, backend=backend)  # gate: a plain tensor, never overwritten
    out.backward(dh)
    assert torch.equal(gate0, make((3, 40), torch.float32, "cpu")[0])
    assert rel_err(w.grad, dh.double() * F.silu(gate0.double())) < 1e-5


@pytest.mark.parametrize("backend", backends("swiglu", "cpu"))
def test_out_of_place_backward_leaves_versions_alone(backend):
    """A leaf gate saved by another node too: no in-place write, no version bump, no error."""
    gate0, up0, dh = make((3, 40), torch.float32, "cpu")
    gate = gate0.clone().requires_grad_()  # leaf: never overwritten
    bu = up0.clone().requires_grad_()
    up = bu * 1  # an intermediate: could be overwritten, but only both or neither are
    other = gate * up  # saves gate and up
    out = swiglu(gate, up, backend=backend)
    ((out * dh).sum() + other.sum()).backward()
    assert gate._version == 0 and torch.equal(gate.detach(), gate0)
    g64, u64 = gate0.double().requires_grad_(), up0.double().requires_grad_()
    ((F.silu(g64) * u64 * dh.double()).sum() + (g64 * u64).sum()).backward()
    assert rel_err(gate.grad, g64.grad) < 1e-5 and rel_err(bu.grad, u64.grad) < 1e-5


def test_overwriting_a_buffer_another_node_saved_fails_loudly():
    gate0, up0, dh = make((3, 40), torch.float32, "cpu")
    bg = gate0.clone().requires_grad_()
    gate = bg * 1
    other = gate * gate  # saves gate
    out = swiglu(gate, up0.clone().requires_grad_() * 1, backend="torch")
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (out * dh).sum().add(other.sum()).backward()


def test_bad_inputs_raise_clear_errors():
    a = torch.randn(3, 8)
    with pytest.raises(ValueError, match="same shape"):
        swiglu(a, torch.randn(3, 9))
    with pytest.raises(ValueError, match="dtype"):
        swiglu(a, a.double())
    with pytest.raises(ValueError, match="approximate"):
        geglu(a, a, approximate="sigmoid")


def test_float64_runs_on_the_reference():
    gate, up, _ = make((3, 20), torch.float64, "cpu")
    assert rel_err(geglu(gate, up, "tanh"), A.reference_glu(gate, up, "gelu_tanh")) < 1e-14


# ------------------------------------------- backward that also writes h = act(gate) * up
# backend.backward(dh, gate, up, d_gate, d_up, act, h=...): one kernel reads dh, gate, up and
# writes h, d_gate, d_up (the fused LoRA MLP backward needs both).

H_LAYOUTS = ["new", "inplace", "h_over_dh", "fused", "h_strided"]


def poisoned(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def run_backward_with_h(backend, act, rows, n, dtype, device, layout, seed=0):
    """layout: 'new' (d_gate, d_up, h all new), 'inplace' (gradients over gate / up, h new),
    'h_over_dh' (in place and h written over dh), 'fused' (gate / up the halves of one
    [rows, 2n] buffer, in place, h a strided view into a wider buffer), 'h_strided' (gate, up,
    dh contiguous, h strided: the kernels may not treat the rows as one flat row). Every output
    starts as NaN. Checks h, d_gate, d_up against float64 and the gradients against the same
    backend's backward without h."""
    impl = A._BACKENDS[backend]
    gate0, up0, dh0 = make((rows, n), dtype, device, seed)
    g64, u64, d64 = gate0.double(), up0.double(), dh0.double()
    a64, da64 = A._act_and_grad(g64, act)
    h_ref, dg_ref, du_ref = a64 * u64, d64 * u64 * da64, d64 * a64
    # the same backend without h (the existing call), out of place
    dg_plain, du_plain = poisoned(gate0.shape, dtype, device), poisoned(gate0.shape, dtype, device)
    impl.backward(dh0, gate0, up0, dg_plain, du_plain, act)
    dh = dh0.clone()
    if layout == "fused":
        buf = torch.cat([gate0, up0], -1)
        gate, up = buf.chunk(2, -1)
    else:
        gate, up = gate0.clone(), up0.clone()
    if layout in ("fused", "h_strided"):
        h = poisoned((rows, n + 5), dtype, device)[:, 2:2 + n]
    elif layout == "h_over_dh":
        h = dh
    else:
        h = poisoned(gate0.shape, dtype, device)
    if layout == "new":
        d_gate, d_up = poisoned(gate0.shape, dtype, device), poisoned(gate0.shape, dtype, device)
        impl.backward(dh, gate, up, d_gate, d_up, act, h=h)
        assert torch.equal(gate, gate0) and torch.equal(up, up0)  # inputs untouched
    else:
        impl.backward(dh, gate, up, None, None, act, h=h)
        d_gate, d_up = gate, up
    if layout != "h_over_dh":
        assert torch.equal(dh, dh0)
    if layout in ("fused", "h_strided"):  # nothing written outside h's columns
        assert h._base[:, :2].isnan().all() and h._base[:, 2 + n:].isnan().all()
    tol = RTOL[dtype]
    assert rel_err(h, h_ref) < tol
    assert rel_err(d_gate, dg_ref) < 2 * tol
    assert rel_err(d_up, du_ref) < 2 * tol
    # the same arithmetic as without h, and h is the forward's output: equal up to a last-bit
    # difference (separate kernel instantiations, torch's strided vs contiguous CPU loops,
    # the forward's SiLU formula), elementwise
    # (fp32: fast-math reciprocals / divisions, and the CUDA erf-GELU with h, whose compiled
    # arithmetic differs from the forward kernel's by up to ~45 ulps where the result nearly
    # cancels (H200, 3 of 1.4M elements); 16-bit: one ulp after rounding; atol: subnormal
    # results, whose ulp is not relative)
    eps = torch.finfo(dtype).eps * (64 if dtype == torch.float32 else 2)
    tiny = torch.finfo(dtype).smallest_normal
    torch.testing.assert_close(d_gate, dg_plain, rtol=eps, atol=tiny)
    torch.testing.assert_close(d_up, du_plain, rtol=eps, atol=tiny)
    fwd = poisoned(gate0.shape, dtype, device)
    impl.forward(gate0, up0, fwd, act)
    torch.testing.assert_close(h, fwd, rtol=eps, atol=tiny)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,n", [(3, 37), (5, 129), (4, 1030)])
@pytest.mark.parametrize("layout", H_LAYOUTS)
def test_backward_with_h_cpu(act, dtype, rows, n, layout):
    for backend in backends(op_name(act), "cpu"):
        run_backward_with_h(backend, act, rows, n, dtype, "cpu", layout)


def test_triton_custom_ops_pass_opcheck():
    gate, up, dh = make((4, 40), torch.float32, "cpu")
    fused = torch.cat([gate, up], -1)
    g, u = fused.chunk(2, -1)
    for act in range(3):
        torch.library.opcheck(A._triton_glu_fwd, (g, u, torch.empty_like(gate), act))
        torch.library.opcheck(A._triton_glu_bwd,
                              (dh, g.clone(), u.clone(), torch.empty_like(gate),
                               torch.empty_like(up), act))
        torch.library.opcheck(A._triton_glu_bwd_inplace, (dh, gate.clone(), up.clone(), act))
        # with h
        torch.library.opcheck(A._triton_glu_bwd_h,
                              (dh, g.clone(), u.clone(), torch.empty_like(gate),
                               torch.empty_like(up), act, torch.empty_like(gate)))
        torch.library.opcheck(A._triton_glu_bwd_inplace_h,
                              (dh, gate.clone(), up.clone(), act, torch.empty_like(gate)))


@pytest.mark.parametrize("backend", backends("swiglu", "cpu"))
def test_compiles_fullgraph(backend):
    gate0, up0, dh = make((3, 48), torch.float32, "cpu")
    bg, bu = gate0.clone().requires_grad_(), up0.clone().requires_grad_()

    def f(bg, bu):
        return (geglu(bg * 1, bu * 1, "tanh", backend=backend) * dh).sum()

    out = torch.compile(f, backend="aot_eager", fullgraph=True)(bg, bu)
    out.backward()
    g64, u64 = gate0.double().requires_grad_(), up0.double().requires_grad_()
    ref = (A.reference_glu(g64, u64, "gelu_tanh") * dh.double()).sum()
    ref.backward()
    assert abs(out.item() - ref.item()) < 1e-4 * (1 + abs(ref.item()))
    assert rel_err(bg.grad, g64.grad) < 1e-5 and rel_err(bu.grad, u64.grad) < 1e-5


# ------------------------------------------------------------------------------ GPU

GPU_SHAPES = [(3, 5, 4093), (257, 80), (33, 11), (2, 1000, 688)]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", gpu_backends("swiglu"))
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_glu_gpu(backend, act, dtype, shape):
    for kind in ("proj", "fused", "leaf", "out_of_place"):
        run_case(backend, act, shape, dtype, "cuda", kind)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", gpu_backends("swiglu"))
@pytest.mark.parametrize("act", ACTS)
def test_glu_gpu_llama_shape(backend, act):
    for kind in ("proj", "fused"):
        run_case(backend, act, (4096, 14336), torch.bfloat16, "cuda", kind)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", gpu_backends("geglu"))
def test_gelu_erf_pointwise_accuracy_gpu(backend):
    check_pointwise_gelu_erf(backend, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", gpu_backends("swiglu"))
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_glu_gpu_misaligned_falls_back_to_scalar_path(backend, act, dtype):
    # gate/up one element off a 16-byte boundary and an odd width: the 1-element-vector kernels
    gate0, up0, dh = make((37, 1001), dtype, "cuda", seed=3)
    n = gate0.numel()
    buf = torch.zeros(2 * n + 1, dtype=dtype, device="cuda")
    gate = buf[1:1 + n].view_as(gate0).copy_(gate0).requires_grad_()
    up = buf[1 + n:].view_as(up0).copy_(up0).requires_grad_()
    g64, u64 = gate0.double().requires_grad_(), up0.double().requires_grad_()
    ref = A.reference_glu(g64, u64, act)
    ref.backward(dh.double())
    out = call(act, gate, up, backend, inplace_backward=False)
    assert rel_err(out, ref) < RTOL[dtype]
    out.backward(dh)
    assert rel_err(gate.grad, g64.grad) < 2 * RTOL[dtype]
    assert rel_err(up.grad, u64.grad) < 2 * RTOL[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch"] + gpu_backends("swiglu"))
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,n", [(3, 4093), (257, 80), (33, 11), (2000, 688), (1, 8)])
def test_backward_with_h_gpu(backend, act, dtype, rows, n):
    for layout in H_LAYOUTS:
        run_backward_with_h(backend, act, rows, n, dtype, "cuda", layout, seed=rows)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", gpu_backends("swiglu"))
@pytest.mark.parametrize("act", ACTS)
def test_backward_with_h_gpu_llama_shape(backend, act):
    for layout in ("inplace", "h_over_dh", "fused"):
        run_backward_with_h(backend, act, 4096, 14336, torch.bfloat16, "cuda", layout)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", gpu_backends("swiglu"))
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("misaligned", ["h_pointer", "h_stride"])
def test_backward_with_misaligned_h_gpu(backend, act, dtype, misaligned):
    """Only h off the 16-byte grid (its pointer one element off, or a row stride that is not a
    multiple of the vector): the kernels must take the 1-element path (a vector store there
    faults) and still write every element once."""
    rows, n = 45, 1024
    gate0, up0, dh = make((rows, n), dtype, "cuda", seed=5)
    g64, u64 = gate0.double(), up0.double()
    a64, da64 = A._act_and_grad(g64, act)
    if misaligned == "h_pointer":
        buf = poisoned((rows * n + 1,), dtype, "cuda")
        h = buf[1:].view(rows, n)
    else:
        buf = poisoned((rows, n + 1), dtype, "cuda")
        h = buf[:, :n]
    gate, up = gate0.clone(), up0.clone()
    A._BACKENDS[backend].backward(dh, gate, up, None, None, act, h=h)
    assert rel_err(h, a64 * u64) < RTOL[dtype]
    assert rel_err(gate, dh.double() * u64 * da64) < 2 * RTOL[dtype]
    assert rel_err(up, dh.double() * a64) < 2 * RTOL[dtype]
    if misaligned == "h_pointer":
        assert buf[0].isnan()  # nothing written before h
    else:
        assert buf[:, n].isnan().all()  # nothing written past each row of h


@pytest.mark.gpu
def test_cuda_ops_pass_opcheck():
    import fastft.ops.activations  # noqa: F401

    gate, up, dh = make((64, 200), torch.bfloat16, "cuda")
    fused = torch.cat([gate, up], -1)
    g, u = fused.chunk(2, -1)
    ops = torch.ops.fastft
    for act in range(3):
        torch.library.opcheck(ops.glu_fwd, (g, u, torch.empty_like(gate), act))
        torch.library.opcheck(ops.glu_bwd, (dh, g.clone(), u.clone(), torch.empty_like(gate),
                                            torch.empty_like(up), act))
        torch.library.opcheck(ops.glu_bwd_inplace, (dh, gate.clone(), up.clone(), act))
        # with h (a strided view: row stride != width)
        h = torch.empty(64, 207, dtype=gate.dtype, device="cuda")[:, 3:203]
        torch.library.opcheck(ops.glu_bwd, (dh, g.clone(), u.clone(), torch.empty_like(gate),
                                            torch.empty_like(up), act), {"h": h})
        torch.library.opcheck(ops.glu_bwd_inplace, (dh, gate.clone(), up.clone(), act),
                              {"h": torch.empty_like(gate)})


@pytest.mark.gpu
@pytest.mark.parametrize("backend", gpu_backends("swiglu"))
def test_gpu_compiles_fullgraph(backend):
    gate0, up0, dh = make((64, 1000), torch.bfloat16, "cuda")
    bg, bu = gate0.clone().requires_grad_(), up0.clone().requires_grad_()
    f = torch.compile(lambda bg, bu: (swiglu(bg * 1, bu * 1, backend=backend) * dh).float().sum(),
                      fullgraph=True)
    f(bg, bu).backward()
    g64, u64 = gate0.double().requires_grad_(), up0.double().requires_grad_()
    (A.reference_glu(g64, u64, "silu") * dh.double()).sum().backward()
    assert rel_err(bg.grad, g64.grad) < 2 * RTOL[torch.bfloat16]
    assert rel_err(bu.grad, u64.grad) < 2 * RTOL[torch.bfloat16]


# ------------------------------------------------------------------- inside a real model

@pytest.mark.parametrize("backend,checkpointing",
                         [("torch", False), ("torch", True)]
                         + [(b, True) for b in backends("swiglu", "cpu") if b != "torch"])
def test_tiny_llama_with_fused_rope_and_swiglu_matches_transformers(monkeypatch, backend,
                                                                    checkpointing):
    """rope (in place on the projection views) and swiglu (in-place backward) swapped into a
    random-init Llama: loss and every gradient match the unpatched model, with and without
    gradient checkpointing (which recomputes the layers, ops included, during backward)."""
    import transformers.models.llama.modeling_llama as llama
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastft.ops import rope

    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=88,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).float()
    if checkpointing:  # renamed activation_checkpointing_enable in newer transformers
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable({"use_reentrant": False})
        assert getattr(model, "is_activation_checkpointing", None) or \
            model.is_gradient_checkpointing
    model.train()
    ids = torch.randint(0, 97, (2, 13))
    position_ids = torch.stack([torch.arange(13), torch.cat([torch.arange(6), torch.arange(7)])])

    def loss_and_grads():
        model.zero_grad()
        out = model(input_ids=ids, labels=ids, position_ids=position_ids)
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    ref_loss, ref_grads = loss_and_grads()
    calls = {"rope": 0, "swiglu": 0}

    def fused_rope(q, k, cos, sin, unsqueeze_dim=1):
        calls["rope"] += 1
        out_q, out_k = rope(q, k, cos, sin, unsqueeze_dim, backend=backend)
        assert out_q.data_ptr() == q.data_ptr()  # rotated in place into the projection output
        return out_q, out_k

    def fused_mlp(self, x):
        calls["swiglu"] += 1
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x), backend=backend))

    monkeypatch.setattr(llama, "apply_rotary_pos_emb", fused_rope)
    monkeypatch.setattr(llama.LlamaMLP, "forward", fused_mlp)
    loss, grads = loss_and_grads()
    assert calls["rope"] >= 2 and calls["swiglu"] >= 2
    assert abs(loss.item() - ref_loss.item()) < 1e-5
    for name, g in ref_grads.items():
        assert rel_err(grads[name], g) < 1e-4, name
