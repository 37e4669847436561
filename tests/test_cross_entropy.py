"""cross_entropy / fused_linear_cross_entropy against F.cross_entropy in float64."""
import importlib
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from fastft.ops import cross_entropy, fused_linear_cross_entropy
from fastft.ops.cross_entropy import (TRAIN_HEAD_CHUNK_BYTES, auto_chunk_rows,
                                      reference_cross_entropy)
from tests.helpers import DTYPES, RTOL, backends, gpu_backends, rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CE = "cross_entropy"
FLCE = "fused_linear_cross_entropy"
LOSS_RTOL = 2e-5  # losses are computed in float32 from the (rounded) inputs

# (softcap, logit_scale, label_smoothing)
OPTION_SETS = {
    "plain": (None, None, 0.0),
    "softcap_scale": (4.0, 0.7, 0.0),
    "smoothing": (None, None, 0.1),
    "all": (6.0, 1.3, 0.2),
}


def make_logits(rows, vocab, dtype, device="cpu", seed=0, ignored=0.25, strided=False):
    g = torch.Generator().manual_seed(seed)
    if strided:  # rows farther apart than the vocab: exercises the row stride
        x = (torch.randn(rows, vocab + 5, generator=g) * 3)[:, :vocab]
    else:
        x = torch.randn(rows, vocab, generator=g) * 3
    labels = torch.randint(0, vocab, (rows,), generator=g)
    labels[torch.rand(rows, generator=g) < ignored] = -100
    labels[0] = vocab - 1  # the last column (the masked tail of a block) as a target
    return x.to(device=device, dtype=dtype), labels.to(device)


def reference(x, labels, reduction, opts, num_items=None, grad_output=None):
    """float64 loss and d loss / d x of the reference on the same (rounded) inputs."""
    softcap, scale, smoothing = opts
    x64 = x.detach().double().requires_grad_()
    loss = reference_cross_entropy(x64, labels, -100, reduction, num_items, softcap, scale,
                                   smoothing)
    loss.backward(grad_output.double() if grad_output is not None else None)
    return loss.detach(), x64.grad


def run_ce(backend, x, labels, reduction, opts, num_items=None, grad_output=None,
           inplace=False):
    softcap, scale, smoothing = opts
    xt = x.detach().clone().requires_grad_()
    loss = cross_entropy(xt, labels, reduction=reduction, num_items_in_batch=num_items,
                         softcap=softcap, logit_scale=scale, label_smoothing=smoothing,
                         inplace_backward=inplace, backend=backend)
    assert loss.dtype == torch.float32
    loss.backward(grad_output)
    return loss.detach(), xt.grad


def check_ce(backend, rows, vocab, dtype, reduction, opts, device="cpu", strided=False, seed=0):
    x, labels = make_logits(rows, vocab, dtype, device, seed=seed, strided=strided)
    grad_output = None
    if reduction == "none":  # non-uniform, with a zero and negatives: each row's own weight
        grad_output = torch.randn(rows, generator=torch.Generator().manual_seed(seed + 1))
        grad_output[1] = 0.0
        grad_output = grad_output.to(device)
    ref_loss, ref_grad = reference(x, labels, reduction, opts, grad_output=grad_output)
    loss, grad = run_ce(backend, x, labels, reduction, opts, grad_output=grad_output)
    assert loss.shape == ref_loss.shape
    assert rel_err(loss, ref_loss) < LOSS_RTOL
    assert grad.dtype == dtype and grad.shape == x.shape
    assert rel_err(grad, ref_grad) < RTOL[dtype]
    assert (grad[labels == -100] == 0).all()


# ------------------------------------------------------------------- the reference itself

def test_reference_is_torch_cross_entropy():
    x, labels = make_logits(9, 40, torch.float64, seed=3)
    for reduction in ("mean", "sum", "none"):
        for smoothing in (0.0, 0.15):
            ours = reference_cross_entropy(x, labels, reduction=reduction,
                                           label_smoothing=smoothing)
            torchs = F.cross_entropy(x, labels, reduction=reduction, label_smoothing=smoothing)
            assert rel_err(ours, torchs) < 1e-14
    # softcap and scale by their formulas; label smoothing by its definition
    z = 5.0 * torch.tanh(x * 0.5 / 5.0)
    ours = reference_cross_entropy(x, labels, reduction="sum", softcap=5.0, logit_scale=0.5,
                                   label_smoothing=0.1)
    logp = torch.log_softmax(z, -1)
    valid = labels != -100
    nll = -logp[valid].gather(1, labels[valid, None]).squeeze(1)
    smooth = -logp[valid].mean(-1)
    assert rel_err(ours, (0.9 * nll + 0.1 * smooth).sum()) < 1e-14
    # num_items_in_batch: the sum divided by it; an all-ignored mean is 0
    ours = reference_cross_entropy(x, labels, num_items_in_batch=17)
    assert rel_err(ours, F.cross_entropy(x, labels, reduction="sum") / 17) < 1e-14
    none = torch.full_like(labels, -100)
    assert reference_cross_entropy(x, none).item() == 0.0


# ------------------------------------------------------------------- cross_entropy on CPU

@pytest.mark.parametrize("backend", backends(CE, "cpu"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_cpu(backend, dtype, reduction):
    # vocab not a multiple of any block; rows strided for one case
    check_ce(backend, 7, 1003, dtype, reduction, OPTION_SETS["plain"],
             strided=dtype == torch.float16)


@pytest.mark.parametrize("backend", backends(CE, "cpu"))
@pytest.mark.parametrize("options", ["softcap_scale", "smoothing", "all"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cross_entropy_options_cpu(backend, options, reduction):
    check_ce(backend, 6, 2999, torch.float32, reduction, OPTION_SETS[options], seed=5)
    check_ce(backend, 5, 1500, torch.bfloat16, reduction, OPTION_SETS[options], seed=6)


@pytest.mark.parametrize("backend", backends(CE, "cpu"))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_gives_zero_loss_and_grads(backend, reduction):
    x, _ = make_logits(4, 1001, torch.bfloat16)
    labels = torch.full((4,), -100)
    loss, grad = run_ce(backend, x, labels, reduction, OPTION_SETS["all"],
                        grad_output=torch.ones(4) if reduction == "none" else None)
    assert torch.isfinite(loss).all() and (loss == 0).all()
    assert torch.isfinite(grad).all() and (grad == 0).all()


@pytest.mark.parametrize("backend", backends(CE, "cpu"))
def test_gradient_accumulation_equals_one_batch(backend):
    """Two micro-batches with num_items_in_batch = total non-ignored count == one big batch."""
    x, labels = make_logits(10, 1201, torch.float32, seed=11, ignored=0.4)
    labels[5:8] = -100  # micro-batches with different numbers of real tokens
    big_loss, big_grad = run_ce(backend, x, labels, "mean", OPTION_SETS["smoothing"])
    total = int((labels != -100).sum())
    micro_losses, micro_grads = [], []
    for part in (slice(0, 4), slice(4, 10)):
        loss, grad = run_ce(backend, x[part], labels[part], "mean", OPTION_SETS["smoothing"],
                            num_items=torch.tensor(total))
        micro_losses.append(loss)
        micro_grads.append(grad)
    assert rel_err(sum(micro_losses), big_loss) < 1e-6
    assert rel_err(torch.cat(micro_grads), big_grad) < 1e-6
    # and against the float64 reference
    ref_loss, ref_grad = reference(x, labels, "mean", OPTION_SETS["smoothing"])
    assert rel_err(sum(micro_losses), ref_loss) < LOSS_RTOL
    assert rel_err(torch.cat(micro_grads), ref_grad) < RTOL[torch.float32]
    # an int num_items_in_batch and reduction="sum" mean the same thing
    loss, _ = run_ce(backend, x[:4], labels[:4], "sum", OPTION_SETS["smoothing"], num_items=total)
    assert rel_err(loss, micro_losses[0]) < 1e-7


@pytest.mark.parametrize("backend", backends(CE, "cpu"))
def test_grad_output_scales_the_gradient(backend):
    """A scalar grad_output that is not 1 (loss scaling, loss / accumulation steps)."""
    x, labels = make_logits(5, 1100, torch.float32, seed=2)
    xt = x.clone().requires_grad_()
    (cross_entropy(xt, labels, backend=backend) * -2.5).backward()
    _, ref_grad = reference(x, labels, "mean", OPTION_SETS["plain"])
    assert rel_err(xt.grad, -2.5 * ref_grad) < 1e-5


def test_triton_scale_unless_one():
    """The device-side grad_output scaling of the GPU backward (run here by the interpreter):
    untouched when the scale is 1, else float32 math and one rounding (the scale itself is not
    rounded to the gradient's dtype first)."""
    from fastft.triton_kernels.cross_entropy import scale_unless_one

    for dtype in DTYPES:
        t = (torch.randn(1000, 7) * 3).to(dtype)  # several steps per program, a short last one
        ref = t.clone()
        scale_unless_one(t, torch.ones(1))
        assert torch.equal(t, ref)
        scale_unless_one(t, torch.full((1,), -0.37))
        expected = (ref.float() * torch.tensor(-0.37)).to(dtype)
        if dtype == torch.bfloat16:  # the interpreter truncates to bf16 (the GPU rounds): 1 ulp
            assert ((t.float() - expected.float()).abs() <= expected.float().abs() * 2 ** -7).all()
            assert (t != ref).any()
        else:
            assert torch.equal(t, expected)


@pytest.mark.parametrize("backend", backends(CE, "cpu"))
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_inplace_backward(backend, reduction):
    x, labels = make_logits(6, 1030, torch.bfloat16, seed=4)
    logits = x.clone()
    leaf = torch.zeros_like(x, requires_grad=True)
    z = leaf + logits  # the gradient to `leaf` passes through the in-place buffer
    grad_output = torch.linspace(-1, 2, 6) if reduction == "none" else None
    loss = cross_entropy(z, labels, reduction=reduction, inplace_backward=True, backend=backend)
    loss.backward(grad_output)
    ref_loss, ref_grad = reference(x, labels, reduction, OPTION_SETS["plain"], None, grad_output)
    assert rel_err(loss, ref_loss) < LOSS_RTOL
    assert rel_err(leaf.grad, ref_grad) < RTOL[torch.bfloat16]


@pytest.mark.parametrize("backend", backends(CE, "cpu"))
def test_no_grad_and_batched_shapes(backend):
    x, labels = make_logits(6, 1001, torch.float32, seed=8)
    with torch.no_grad():
        loss = cross_entropy(x.view(2, 3, 1001), labels.view(2, 3), reduction="none",
                             backend=backend)
    assert loss.shape == (2, 3)
    ref = reference_cross_entropy(x.double(), labels, reduction="none")
    assert rel_err(loss.view(-1), ref) < LOSS_RTOL
    loss = cross_entropy(x, labels, backend=backend)  # no grad needed: loss only
    assert rel_err(loss, reference_cross_entropy(x.double(), labels)) < LOSS_RTOL


def test_bad_arguments_raise_clear_errors():
    x, labels = make_logits(3, 50, torch.float32)
    with pytest.raises(ValueError, match="reduction"):
        cross_entropy(x, labels, reduction="avg")
    with pytest.raises(ValueError, match="num_items_in_batch"):
        cross_entropy(x, labels, reduction="none", num_items_in_batch=3)
    with pytest.raises(TypeError, match="integer"):
        cross_entropy(x, labels.float())
    with pytest.raises(ValueError, match="labels has"):
        cross_entropy(x, labels[:2])
    with pytest.raises(ValueError, match="softcap"):
        cross_entropy(x, labels, softcap=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        cross_entropy(x, labels, label_smoothing=1.5)
    bad = labels.clone()
    bad[1] = 50
    with pytest.raises(ValueError, match=r"labels must be in \[0, 50\)"):
        cross_entropy(x, bad, backend="torch")
    h = torch.randn(3, 8)
    with pytest.raises(ValueError, match="weight must be"):
        fused_linear_cross_entropy(h, torch.randn(50, 9), labels)
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_cross_entropy(h, torch.randn(50, 8), labels, chunk_size=0)


def test_float64_runs_on_the_reference():
    x, labels = make_logits(4, 30, torch.float64)
    xt = x.clone().requires_grad_()
    loss = cross_entropy(xt, labels, softcap=3.0, label_smoothing=0.1)
    loss.backward()
    ref_loss, ref_grad = reference(x, labels, "mean", (3.0, None, 0.1))
    assert rel_err(loss, ref_loss) < 1e-12 and rel_err(xt.grad, ref_grad) < 1e-12


@pytest.mark.parametrize("backend", backends(CE, "cpu"))
def test_compiles_fullgraph(backend):
    x, labels = make_logits(4, 1001, torch.float32, seed=9)
    xt = x.clone().requires_grad_()
    f = torch.compile(lambda a, b: cross_entropy(a, b, softcap=5.0, backend=backend) * 3.0,
                      backend="aot_eager", fullgraph=True)
    loss = f(xt, labels)
    loss.backward()
    ref_loss, ref_grad = reference(x, labels, "mean", (5.0, None, 0.0))
    assert rel_err(loss, 3.0 * ref_loss) < LOSS_RTOL
    assert rel_err(xt.grad, 3.0 * ref_grad) < 1e-5


def test_triton_custom_ops_pass_opcheck():
    module = importlib.import_module("fastft.ops.cross_entropy")  # the name is also the function

    x, labels = make_logits(5, 1030, torch.float32, seed=1)
    loss, grad = torch.empty(5), torch.empty_like(x)
    weight = torch.full((1,), 0.25)
    opcheck = torch.library.opcheck
    opcheck(module._triton_cross_entropy, (x, labels, loss, grad, weight, -100, 3.0, 0.5, 0.1))
    opcheck(module._triton_cross_entropy, (x, labels, loss, None, None, -100, 0.0, 1.0, 0.0))
    opcheck(module._triton_cross_entropy_inplace,
            (x.clone(), labels, loss, torch.rand(5), -100, 0.0, 1.0, 0.0))


@pytest.mark.skipif("triton" not in backends(CE, "cpu"), reason="triton does not import")
@pytest.mark.skipif("triton" not in backends(CE, "cpu"), reason="triton does not import")
def test_triton_programs_looping_over_rows(monkeypatch):
    """FASTFT_CE_TRITON_PROGRAMS_PER_SM: fewer programs than rows, each looping over rows."""
    monkeypatch.setenv("FASTFT_CE_TRITON_PROGRAMS_PER_SM", "1")
    check_ce("triton", 7, 1003, torch.bfloat16, "mean", OPTION_SETS["all"], seed=21)
    check_ce("triton", 5, 1003, torch.float32, "none", OPTION_SETS["plain"], seed=22)
    monkeypatch.setenv("FASTFT_CE_TRITON_BLOCK", "256")  # four steps per row, a short last one
    check_ce("triton", 5, 1003, torch.bfloat16, "sum", OPTION_SETS["all"], seed=23)
    monkeypatch.setenv("FASTFT_CE_TRITON_BLOCK", "100")
    with pytest.raises(ValueError, match="FASTFT_CE_TRITON_BLOCK"):
        check_ce("triton", 5, 1003, torch.bfloat16, "sum", OPTION_SETS["all"], seed=23)


@pytest.mark.parametrize("backend", backends(CE, "cpu"))
def test_masked_vocab_minus_inf_logits(backend):
    """-inf logits (a masked vocabulary) add nothing and get a zero gradient, like torch."""
    check_masked(backend, "cpu", torch.float32)


def check_masked(backend, device, dtype):
    x, labels = make_logits(5, 1100, dtype, device, seed=13, ignored=0.0)
    x[:, 3:40] = float("-inf")
    x[2, :] = float("-inf")  # a whole row but its label masked ...
    x[2, labels[2]] = 1.0    # ... except the label
    for opts in (OPTION_SETS["plain"], (None, 0.5, 0.0)):
        ref_loss, ref_grad = reference(x, labels, "mean", opts)
        loss, grad = run_ce(backend, x, labels, "mean", opts)
        assert rel_err(loss, ref_loss) < LOSS_RTOL and rel_err(grad, ref_grad) < RTOL[dtype]


@pytest.mark.skipif("triton" not in backends(CE, "cpu"), reason="triton does not import")
def test_triton_label_out_of_range_gives_nan():
    x, labels = make_logits(3, 1000, torch.float32)
    labels[1] = 1000
    loss = cross_entropy(x, labels, reduction="none", backend="triton")
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()


COMPILE_FOR_SM90 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastft.triton_kernels import cross_entropy as K

sig = {"X": "*bf16", "Labels": "*i64", "Loss": "*fp32", "G": "*bf16", "RowWeight": "*fp32",
       "x_stride": "i64", "g_stride": "i64", "w_stride": "i32", "V": "i32", "rows": "i32",
       "ignore_index": "i32", "softcap": "fp32", "scale": "fp32", "smoothing": "fp32"}
for grad, extras, block in ((True, True, 8192), (False, False, 8192), (True, False, 16384)):
    flags = {"HAS_GRAD": grad, "HAS_SCALE": extras, "HAS_SOFTCAP": extras,
             "HAS_SMOOTHING": extras, "BLOCK": block}
    src = ASTSource(fn=K._cross_entropy_kernel,
                    signature={**sig, **{k: "constexpr" for k in flags}}, constexprs=flags)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 16})
    assert compiled.asm["cubin"]
for dtype in ("*bf16", "*fp16", "*fp32"):  # the backward's device-side grad_output scaling
    src = ASTSource(fn=K._scale_unless_one_kernel,
                    signature={"G": dtype, "Scale": "*fp32", "n": "i64", "BLOCK": "constexpr"},
                    constexprs={"BLOCK": 4096})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
    assert compiled.asm["cubin"]
print("compiled")
"""


def test_triton_kernel_compiles_for_sm90():
    """The interpreter is lenient: compile the real kernel variants for sm_90 (no GPU needed),
    in a subprocess because this one runs Triton in interpreter mode."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": ROOT,
           "TRITON_DEFAULT_FP_FUSION": "1"}
    proc = subprocess.run([sys.executable, "-c", COMPILE_FOR_SM90], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    if proc.returncode and ("ptxas" in proc.stderr or "GPUTarget" in proc.stderr):
        pytest.skip(f"this triton cannot compile ahead of time: {proc.stderr[-300:]}")
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]


# ------------------------------------------------------------------- fused_linear_cross_entropy

def make_head(rows, hidden, vocab, dtype, device="cpu", seed=0, with_bias=False, ignored=0.25):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, hidden, generator=g).to(device=device, dtype=dtype)
    w = (torch.randn(vocab, hidden, generator=g) * (2.0 / hidden ** 0.5)).to(device=device,
                                                                            dtype=dtype)
    b = (torch.randn(vocab, generator=g) * 0.5).to(device=device, dtype=dtype) \
        if with_bias else None
    labels = torch.randint(0, vocab, (rows,), generator=g)
    labels[torch.rand(rows, generator=g) < ignored] = -100
    return h, w, b, labels.to(device)


def check_flce(backend, rows, hidden, vocab, dtype, reduction, opts, train_head, with_bias,
               chunk, device="cpu", seed=0, num_items=None, labels=None):
    h, w, b, y = make_head(rows, hidden, vocab, dtype, device, seed, with_bias)
    if labels is not None:
        y = labels.to(device)
    softcap, scale, smoothing = opts
    grad_output = None
    if reduction == "none":
        grad_output = torch.randn(rows, generator=torch.Generator().manual_seed(seed + 7))
        grad_output[0] = 0.0
        grad_output = grad_output.to(device)
    # float64 reference on the full logits
    h64 = h.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_(train_head)
    b64 = b.detach().double().requires_grad_(train_head) if b is not None else None
    logits = h64 @ w64.t() + (b64 if b64 is not None else 0)
    ref = reference_cross_entropy(logits, y, -100, reduction, num_items, softcap, scale,
                                  smoothing)
    ref.backward(grad_output.double() if grad_output is not None else None)
    # the op
    ht = h.detach().requires_grad_()
    wt = w.detach().requires_grad_(train_head)
    bt = b.detach().requires_grad_(train_head) if b is not None else None
    loss = fused_linear_cross_entropy(ht, wt, y, bt, reduction=reduction,
                                      num_items_in_batch=num_items, softcap=softcap,
                                      logit_scale=scale, label_smoothing=smoothing,
                                      chunk_size=chunk, backend=backend)
    loss.backward(grad_output)
    # bf16/fp16 logits are rounded once by the matmul: a looser loss bound than plain CE
    loss_tol = LOSS_RTOL if dtype == torch.float32 else RTOL[dtype] / 2
    assert rel_err(loss, ref) < loss_tol
    assert ht.grad.dtype == dtype and rel_err(ht.grad, h64.grad) < 2 * RTOL[dtype]
    if train_head:
        assert wt.grad.dtype == dtype and rel_err(wt.grad, w64.grad) < 2 * RTOL[dtype]
        if b is not None:
            assert bt.grad.dtype == dtype and rel_err(bt.grad, b64.grad) < 2 * RTOL[dtype]
    else:
        assert wt.grad is None and (bt is None or bt.grad is None)
    return loss, ht.grad, wt.grad


@pytest.mark.parametrize("backend", backends(FLCE, "cpu"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fused_linear_cpu(backend, dtype, reduction):
    # 11 tokens in chunks of 4 (a short last chunk), trainable head with a bias
    check_flce(backend, 11, 48, 1003, dtype, reduction, OPTION_SETS["plain"], train_head=True,
               with_bias=True, chunk=4)


@pytest.mark.parametrize("backend", backends(FLCE, "cpu"))
@pytest.mark.parametrize("options", ["softcap_scale", "all"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_linear_options_frozen_head(backend, options, reduction):
    """The LoRA case: frozen head, no dW computed."""
    check_flce(backend, 9, 32, 1500, torch.bfloat16, reduction, OPTION_SETS[options],
               train_head=False, with_bias=False, chunk=5, seed=3)


@pytest.mark.parametrize("backend", backends(FLCE, "cpu"))
def test_fused_linear_all_ignored_and_accumulation(backend):
    labels = torch.full((6,), -100)
    loss, dh, dw = check_flce(backend, 6, 24, 1001, torch.float32, "mean", OPTION_SETS["plain"],
                              train_head=True, with_bias=False, chunk=4, labels=labels)
    assert loss.item() == 0.0 and (dh == 0).all() and (dw == 0).all()
    # two micro-batches with num_items_in_batch = the total count == one big batch
    h, w, _, y = make_head(10, 24, 1001, torch.float32, seed=12, ignored=0.3)
    total = int((y != -100).sum())
    wt = w.clone().requires_grad_()
    ht = h.clone().requires_grad_()
    fused_linear_cross_entropy(ht, wt, y, label_smoothing=0.1, chunk_size=3,
                               backend=backend).backward()
    big_dh, big_dw = ht.grad.clone(), wt.grad.clone()
    ht.grad, wt.grad = None, None
    for part in (slice(0, 3), slice(3, 10)):
        fused_linear_cross_entropy(ht[part], wt, y[part], label_smoothing=0.1,
                                   num_items_in_batch=torch.tensor(total), chunk_size=3,
                                   backend=backend).backward()
    assert rel_err(ht.grad, big_dh) < 1e-6 and rel_err(wt.grad, big_dw) < 1e-6


def check_dw_accumulation(backend, rows, hidden, vocab, chunk, device, seed=3, tol=1e-2):
    """dW summed chunk by chunk in bf16 (rounded once per chunk) against float64 over many
    chunks, with a grad_output that is not 1. The tolerance is a few times the measured error
    (0.46% for 16 chunks on CPU; bf16 rounding of the exact dW alone is 0.17%) and far below the
    error of a dW that misses one chunk's tokens (checked here too, so the bound can fail)."""
    h, w, _, y = make_head(rows, hidden, vocab, torch.bfloat16, device, seed=seed)
    wt = w.clone().requires_grad_()
    ht = h.clone().requires_grad_()
    (fused_linear_cross_entropy(ht, wt, y, chunk_size=chunk, backend=backend) * 0.75).backward()
    w64 = w.double().requires_grad_()
    h64 = h.double().requires_grad_()
    (reference_cross_entropy(h64 @ w64.t(), y) * 0.75).backward()
    assert wt.grad.dtype == torch.bfloat16 and rel_err(wt.grad, w64.grad) < tol
    assert rel_err(ht.grad, h64.grad) < tol
    # the same dW without one chunk's tokens: a wrong gradient this bound must reject
    keep = torch.ones(rows, dtype=torch.bool, device=device)
    keep[chunk:2 * chunk] = False
    w64b = w.double().requires_grad_()
    n = (y != -100).sum()
    (reference_cross_entropy(h.double()[keep] @ w64b.t(), y[keep], reduction="sum") * 0.75 / n
     ).backward()
    assert rel_err(w64b.grad, w64.grad) > 5 * tol


@pytest.mark.parametrize("backend", backends(FLCE, "cpu"))
def test_fused_linear_dw_accumulates_in_weight_dtype(backend):
    check_dw_accumulation(backend, 64, 32, 1003, 4, "cpu")


def test_fused_linear_chunk_choice():
    assert auto_chunk_rows(16384, 128256, torch.bfloat16, "cpu") == 1024
    # a trainable head: bigger chunks (fewer passes over dW), under 0.49 GiB of logits
    assert auto_chunk_rows(16384, 128256, torch.bfloat16, "cpu", TRAIN_HEAD_CHUNK_BYTES) == 2048
    assert 2048 * 128256 * 2 < 0.49 * (1 << 30) < 2176 * 128256 * 2
    assert auto_chunk_rows(100, 128256, torch.bfloat16, "cpu") == 100
    assert auto_chunk_rows(10 ** 6, 262144, torch.float32, "cpu") == 256
    assert auto_chunk_rows(10, 10 ** 9, torch.float32, "cpu") == 1


def test_fused_linear_under_autocast_and_batched():
    h, w, _, y = make_head(6, 16, 300, torch.float32, seed=1)
    ht = h.view(2, 3, 16).clone().requires_grad_()
    wt = w.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fused_linear_cross_entropy(ht, wt, y.view(2, 3), reduction="none")
    assert loss.shape == (2, 3)
    loss.sum().backward()
    assert ht.grad.dtype == torch.float32 and wt.grad.dtype == torch.float32
    ref = reference_cross_entropy(h.bfloat16().double() @ w.bfloat16().double().t(), y,
                                  reduction="none")
    assert rel_err(loss.view(-1), ref) < 1e-2


# ------------------------------------------------------------------------------ GPU

@pytest.mark.gpu
@pytest.mark.parametrize("backend", gpu_backends(CE))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [128256, 262144, 32003])
def test_cross_entropy_gpu(backend, dtype, vocab):
    rows = 64 if vocab > 200000 else 96
    for reduction in ("mean", "none"):
        check_ce(backend, rows, vocab, dtype, reduction, OPTION_SETS["plain"], "cuda",
                 strided=vocab == 32003)
    check_ce(backend, rows, vocab, dtype, "sum", OPTION_SETS["all"], "cuda", seed=2)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", gpu_backends(CE))
def test_cross_entropy_gpu_edge_cases(backend):
    for reduction in ("mean", "sum", "none"):
        x, _ = make_logits(33, 128256, torch.bfloat16, "cuda")
        labels = torch.full((33,), -100, device="cuda")
        loss, grad = run_ce(backend, x, labels, reduction, OPTION_SETS["all"],
                            grad_output=torch.ones(33, device="cuda")
                            if reduction == "none" else None)
        assert torch.isfinite(loss).all() and (loss == 0).all() and (grad == 0).all()
    for vocab in (2, 7, 4097):  # tiny and odd vocabularies, misaligned rows
        check_ce(backend, 17, vocab, torch.bfloat16, "mean", OPTION_SETS["smoothing"], "cuda",
                 strided=True)
    # one class: loss and gradient are exactly 0 (smoothing would make them rounding noise)
    check_ce(backend, 9, 1, torch.float32, "sum", OPTION_SETS["plain"], "cuda", strided=True)
    x, labels = make_logits(40, 50000, torch.float16, "cuda", seed=3)
    loss, grad = run_ce(backend, x, labels, "mean", OPTION_SETS["softcap_scale"], inplace=True)
    ref_loss, ref_grad = reference(x, labels, "mean", OPTION_SETS["softcap_scale"])
    assert rel_err(loss, ref_loss) < LOSS_RTOL and rel_err(grad, ref_grad) < RTOL[torch.float16]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", gpu_backends(CE))
def test_cross_entropy_gpu_masked_vocab(backend):
    check_masked(backend, "cuda", torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("blocks_per_sm", ["1", "2"])
def test_cuda_kernel_layouts(monkeypatch, blocks_per_sm):
    """Both layouts of the one-block-per-row CUDA kernel (1024 threads / 512 threads and half
    the row cache): the fallback of the sm_90 cluster kernel, forced by the variable."""
    monkeypatch.setenv("FASTFT_CE_BLOCKS_PER_SM", blocks_per_sm)
    for vocab, dtype in ((128256, torch.bfloat16), (262144, torch.float32), (50001, torch.float16)):
        check_ce("cuda", 48, vocab, dtype, "mean", OPTION_SETS["all"], "cuda", seed=1)
        check_ce("cuda", 40, vocab, dtype, "none", OPTION_SETS["plain"], "cuda", seed=2,
                 strided=True)


@pytest.mark.gpu
@pytest.mark.parametrize("cluster", ["0", "1", "2", "4", "8"])
def test_cuda_cluster_kernel(monkeypatch, cluster):
    """The sm_90 cluster kernel (a cluster per row) at every cluster size (a size whose slices
    would not fit falls back to the one-block-per-row kernel, which must be right too): every
    dtype, odd vocabs, tiny vocabs (no whole vector), every option, rows of 'none' with their
    own weights."""
    monkeypatch.setenv("FASTFT_CE_CLUSTER", cluster)
    cases = ((128256, torch.bfloat16), (32003, torch.bfloat16), (50001, torch.float16),
             (24577, torch.float32), (128256, torch.float32), (7, torch.bfloat16),
             (3, torch.float32), (4097, torch.float16))
    for i, (vocab, dtype) in enumerate(cases):
        check_ce("cuda", 37, vocab, dtype, "mean", OPTION_SETS["all"], "cuda", seed=i)
        check_ce("cuda", 29, vocab, dtype, "none", OPTION_SETS["plain"], "cuda", seed=50 + i)
        check_ce("cuda", 19, vocab, dtype, "sum", OPTION_SETS["smoothing"], "cuda", seed=90 + i)
    check_masked("cuda", "cuda", torch.bfloat16)


def strided_inplace(backend, rows, vocab, dtype, offset, opts, seed=0):
    """cross_entropy in place on a [rows, vocab] view of a wider buffer starting `offset`
    elements in: rows misaligned by different amounts (the kernels peel each row's head), and
    the gradient written into that view, so the elements around it must stay untouched."""
    x, labels = make_logits(rows, vocab, dtype, "cuda", seed=seed)
    leaf = torch.zeros(rows, vocab + 11, dtype=dtype, device="cuda", requires_grad=True)
    filler = torch.randn(rows, vocab + 11, device="cuda").to(dtype)
    filler[:, offset:offset + vocab] = x
    wide = leaf + filler
    view = wide[:, offset:offset + vocab]
    softcap, scale, smoothing = opts
    loss = cross_entropy(view, labels, softcap=softcap, logit_scale=scale,
                         label_smoothing=smoothing, inplace_backward=True, backend=backend)
    loss.backward()
    ref_loss, ref_grad = reference(x, labels, "mean", opts)
    assert rel_err(loss, ref_loss) < LOSS_RTOL
    assert rel_err(leaf.grad[:, offset:offset + vocab], ref_grad) < RTOL[dtype]
    def outside(t):
        return torch.cat([t[:, :offset], t[:, offset + vocab:]], 1)

    assert (outside(leaf.grad) == 0).all()  # the gradient of the columns outside the view
    assert torch.equal(outside(wide.detach()), outside(filler))  # no write outside the view


@pytest.mark.gpu
def test_cuda_cluster_kernel_ignored_and_misaligned_rows():
    """The default cluster kernel: runs of ignored rows (no cluster barrier for them), rows
    misaligned by different amounts (each row peels its own head), in place and not, and the
    loss alone."""
    for vocab, dtype, seed in ((128256, torch.bfloat16, 1), (32003, torch.float16, 2),
                               (24577, torch.float32, 3)):
        x, labels = make_logits(61, vocab, dtype, "cuda", seed=seed, ignored=0.4, strided=True)
        labels[10:17] = -100  # a run of ignored rows
        labels[-1] = -100  # the last row ignored
        for inplace in (False, True):
            loss, grad = run_ce("cuda", x.clone(), labels, "mean", OPTION_SETS["all"],
                                inplace=inplace)
            ref_loss, ref_grad = reference(x, labels, "mean", OPTION_SETS["all"])
            assert rel_err(loss, ref_loss) < LOSS_RTOL and rel_err(grad, ref_grad) < RTOL[dtype]
            assert (grad[labels == -100] == 0).all()
        with torch.no_grad():
            loss = cross_entropy(x, labels, reduction="none", backend="cuda")
        ref = reference_cross_entropy(x.double(), labels, reduction="none")
        assert rel_err(loss, ref) < LOSS_RTOL and (loss[labels == -100] == 0).all()
    strided_inplace("cuda", 45, 128256, torch.bfloat16, 3, OPTION_SETS["plain"], seed=5)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", gpu_backends(CE))
def test_gpu_grad_output_on_device_and_graph_capture(backend):
    """grad_output is applied on the device (no host read): a scale of 1 and of 0.37, in place
    and not, and the whole forward + backward captured in a CUDA graph and replayed."""
    x, labels = make_logits(70, 32003, torch.bfloat16, "cuda", seed=11)
    for scale in (1.0, 0.37):
        go = torch.tensor(scale, device="cuda")
        for inplace in (False, True):
            loss, grad = run_ce(backend, x, labels, "mean", OPTION_SETS["plain"],
                                grad_output=go, inplace=inplace)
            ref_loss, ref_grad = reference(x, labels, "mean", OPTION_SETS["plain"],
                                           grad_output=go)
            assert rel_err(loss, ref_loss) < LOSS_RTOL and rel_err(grad, ref_grad) < 1.2e-2
    xt = x.detach().clone().requires_grad_()
    cross_entropy(xt, labels, backend=backend).backward()  # warm-up (compiles, picks layouts)
    torch.cuda.synchronize()
    xt.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        (cross_entropy(xt, labels, backend=backend) * 0.5).backward()
    xt.grad.zero_()
    graph.replay()
    torch.cuda.synchronize()
    _, ref_grad = reference(x, labels, "mean", OPTION_SETS["plain"],
                            grad_output=torch.tensor(0.5, device="cuda"))
    assert rel_err(xt.grad, ref_grad) < 1.2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("backend", gpu_backends(CE))
def test_cross_entropy_gpu_strided_inplace(backend):
    for offset, (vocab, dtype) in zip((1, 3, 2), ((128256, torch.bfloat16),
                                                  (32003, torch.float16),
                                                  (50001, torch.float32))):
        strided_inplace(backend, 23, vocab, dtype, offset, OPTION_SETS["all"], seed=offset)
        strided_inplace(backend, 21, vocab, dtype, offset, OPTION_SETS["plain"], seed=7)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", gpu_backends(CE))
def test_cross_entropy_gpu_many_rows_and_loss_only(backend):
    """Llama-3's vocab over many rows (several waves of clusters / blocks), the gradient in
    place and separate, and the loss alone (no gradient buffer) against the reference."""
    x, labels = make_logits(1200, 128256, torch.bfloat16, "cuda", seed=17)
    for inplace in (False, True):
        loss, grad = run_ce(backend, x, labels, "mean", OPTION_SETS["smoothing"], inplace=inplace)
        ref_loss, ref_grad = reference(x, labels, "mean", OPTION_SETS["smoothing"])
        assert rel_err(loss, ref_loss) < LOSS_RTOL and rel_err(grad, ref_grad) < RTOL[x.dtype]
        assert (grad[labels == -100] == 0).all()
    with torch.no_grad():
        loss = cross_entropy(x, labels, reduction="none", softcap=30.0, backend=backend)
    ref = reference_cross_entropy(x.double(), labels, reduction="none", softcap=30.0)
    assert rel_err(loss, ref) < LOSS_RTOL and (loss[labels == -100] == 0).all()
    bad = labels.clone()
    bad[5] = 128256  # out of range, not ignored: NaN, not a silently wrong number
    if backend == "cuda":
        with torch.no_grad():
            loss = cross_entropy(x, bad, reduction="none", backend=backend)
        others = torch.ones_like(bad, dtype=torch.bool)
        others[5] = False
        assert torch.isnan(loss[5]) and torch.isfinite(loss[others]).all()


@pytest.mark.gpu
@pytest.mark.parametrize("per_sm", ["1", "2"])
def test_triton_programs_per_sm_gpu(monkeypatch, per_sm):
    monkeypatch.setenv("FASTFT_CE_TRITON_PROGRAMS_PER_SM", per_sm)
    check_ce("triton", 300, 128256, torch.bfloat16, "mean", OPTION_SETS["plain"], "cuda")
    check_ce("triton", 280, 32003, torch.float32, "none", OPTION_SETS["all"], "cuda", seed=3)
    monkeypatch.setenv("FASTFT_CE_TRITON_BLOCK", "16384")  # the benchmark's variant
    check_ce("triton", 300, 128256, torch.bfloat16, "mean", OPTION_SETS["all"], "cuda", seed=4)


@pytest.mark.gpu
def test_cuda_ops_pass_opcheck():
    importlib.import_module("fastft.ops.cross_entropy")  # registers the fake implementations
    ops = torch.ops.fastft
    x, labels = make_logits(16, 4099, torch.bfloat16, "cuda")
    loss, grad = torch.empty(16, device="cuda"), torch.empty_like(x)
    weight = torch.full((1,), 0.5, device="cuda")
    opcheck = torch.library.opcheck
    opcheck(ops.cross_entropy_fwd, (x, labels, loss, grad, weight, -100, 3.0, 0.5, 0.1))
    opcheck(ops.cross_entropy_fwd, (x, labels, loss, None, None, -100, 0.0, 1.0, 0.0))
    opcheck(ops.cross_entropy_fwd_inplace,
            (x.clone(), labels, loss, torch.rand(16, device="cuda"), -100, 0.0, 1.0, 0.0))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", gpu_backends(CE))
def test_gpu_compiles_fullgraph(backend):
    x, labels = make_logits(64, 32000, torch.bfloat16, "cuda", seed=3)
    xt = x.clone().requires_grad_()
    f = torch.compile(lambda a, b: cross_entropy(a, b, logit_scale=0.5, backend=backend),
                      fullgraph=True)
    loss = f(xt, labels)
    loss.backward()
    ref_loss, ref_grad = reference(x, labels, "mean", (None, 0.5, 0.0))
    assert rel_err(loss, ref_loss) < LOSS_RTOL and rel_err(xt.grad, ref_grad) < 1.2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("backend", gpu_backends(FLCE))
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("train_head", [False, True])
def test_fused_linear_gpu(backend, reduction, train_head):
    check_flce(backend, 600, 512, 128256, torch.bfloat16, reduction, OPTION_SETS["plain"],
               train_head, with_bias=False, chunk=256, device="cuda")
    check_flce(backend, 300, 256, 32003, torch.bfloat16, reduction, OPTION_SETS["all"],
               train_head, with_bias=True, chunk=None, device="cuda", seed=4)
    check_flce(backend, 130, 128, 5000, torch.float32, reduction, OPTION_SETS["smoothing"],
               train_head, with_bias=True, chunk=64, device="cuda", seed=5,
               num_items=77 if reduction != "none" else None)  # 'none' rejects num_items
    # Gemma-sized vocabulary with its final-logit softcap
    check_flce(backend, 200, 256, 262144, torch.bfloat16, reduction, (30.0, None, 0.0),
               train_head, with_bias=False, chunk=64, device="cuda", seed=6)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", gpu_backends(FLCE))
def test_fused_linear_gpu_dw_accumulation(backend):
    """dW in bf16 over 16 chunks, at Llama-3's vocab too; the auto chunk of a trainable head."""
    check_dw_accumulation(backend, 2048, 256, 32003, 128, "cuda")
    check_dw_accumulation(backend, 1024, 128, 128256, 64, "cuda", seed=4)
    check_flce(backend, 700, 256, 128256, torch.bfloat16, "mean", OPTION_SETS["plain"],
               train_head=True, with_bias=True, chunk=None, device="cuda", seed=8)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", gpu_backends(FLCE))
def test_fused_linear_gpu_autocast_trainable(backend):
    """float32 master weights under bf16 autocast: gradients come back in float32."""
    h, w, b, y = make_head(300, 128, 32003, torch.float32, "cuda", seed=9, with_bias=True)
    ht, wt, bt = (t.clone().requires_grad_() for t in (h, w, b))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = fused_linear_cross_entropy(ht, wt, y, bt, chunk_size=64, backend=backend)
    (loss * 2.0).backward()
    assert wt.grad.dtype == torch.float32 and bt.grad.dtype == torch.float32
    h64, w64, b64 = (t.bfloat16().double().requires_grad_() for t in (h, w, b))
    (reference_cross_entropy(h64 @ w64.t() + b64, y) * 2.0).backward()
    assert rel_err(loss, reference_cross_entropy(h64 @ w64.t() + b64, y)) < RTOL[torch.bfloat16]
    for ours, ref in ((ht.grad, h64.grad), (wt.grad, w64.grad), (bt.grad, b64.grad)):
        assert rel_err(ours, ref) < 2 * RTOL[torch.bfloat16]
