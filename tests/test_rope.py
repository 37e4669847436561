"""rope: the reference against float64 and transformers, every backend against the reference,
in place and out of place, both layouts, GQA, partial rotary, per-row position ids."""
import importlib

import pytest
import torch

from fastft.ops import rope
from tests.helpers import DTYPES, RTOL, backends, gpu_backends, rel_err

# The module (fastft.ops.rope is the op; the module of the same name comes from sys.modules).
R = importlib.import_module("fastft.ops.rope")
reference_rope = R.reference_rope


def rotary_cos_sin(positions, rot, theta=10000.0, dtype=torch.float32):
    """cos/sin the way a rotary module builds them: [batch, seq, rot], halves repeated."""
    inv_freq = 1.0 / theta ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot)
    freqs = positions.double()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def make_cos_sin(kind, batch, seq, rot, g):
    if kind == "packed":  # per-row position ids: two packed sequences in row 0, offset in row 1
        row0 = torch.cat([torch.arange(seq // 2), torch.arange(seq - seq // 2)])
        pos = torch.stack([row0] + [torch.arange(seq) + 5 * i for i in range(1, batch)])
        return rotary_cos_sin(pos, rot)
    if kind == "shared2d":  # [seq, rot], the same for every batch row
        return rotary_cos_sin(torch.arange(seq) + 3, rot)
    if kind == "batch1":  # [1, seq, rot], broadcast over the batch
        return rotary_cos_sin(torch.arange(seq)[None] * 7, rot)
    # arbitrary values whose halves differ: backward must be the exact transpose
    return torch.randn(batch, seq, rot, generator=g), torch.randn(batch, seq, rot, generator=g)


# (head_dim, rot_dim, q heads, k heads, layout (unsqueeze_dim), cos kind, input kind)
CASES = [
    (64, 64, 4, 2, 1, "packed", "proj"),       # GQA, HF layout from a projection view
    (80, 32, 3, 1, 2, "batch1", "proj"),       # partial rotary (Phi-2 style), bshd layout
    (128, 128, 2, 2, 2, "shared2d", "leaf"),   # leaves requiring grad: out of place
    (256, 256, 2, 1, 1, "random", "proj"),
    (128, 64, 3, 1, 1, "random", "no_inplace"),
    (80, 80, 2, 2, 1, "packed", "plain"),      # plain tensors, no autograd
    (64, 64, 4, 2, 1, "packed", "fused_qkv"),  # q, k sliced from one qkv projection
    (96, 32, 3, 1, 2, "random", "fused_qkv"),
]


def make_case(case, dtype, device, batch=2, seq=7, seed=0):
    head_dim, rot, hq, hk, layout, cos_kind, kind = case
    g = torch.Generator().manual_seed(seed)
    cos, sin = make_cos_sin(cos_kind, batch, seq, rot, g)
    # projection outputs [b, s, h*d] viewed as [b, s, h, d] (and transposed for layout 1)
    qp = torch.randn(batch, seq, hq * head_dim, generator=g).to(device, dtype)
    kp = torch.randn(batch, seq, hk * head_dim, generator=g).to(device, dtype)
    dq = torch.randn(batch, seq, hq, head_dim, generator=g).to(device, dtype)
    dk = torch.randn(batch, seq, hk, head_dim, generator=g).to(device, dtype)
    if layout == 1:
        dq, dk = dq.transpose(1, 2), dk.transpose(1, 2)
    return qp, kp, cos.to(device, dtype), sin.to(device, dtype), dq, dk


def as_heads(p, heads, layout):
    t = p.view(p.shape[0], p.shape[1], heads, -1)
    return t.transpose(1, 2) if layout == 1 else t


def run_case(backend, case, dtype, device, batch=2, seq=7):
    head_dim, rot, hq, hk, layout, cos_kind, kind = case
    qp, kp, cos, sin, dq, dk = make_case(case, dtype, device, batch, seq)
    # float64 reference on the same rounded inputs
    qp64 = qp.double().requires_grad_()
    kp64 = kp.double().requires_grad_()
    ref_q, ref_k = reference_rope(as_heads(qp64, hq, layout), as_heads(kp64, hk, layout),
                                  cos.double(), sin.double(), layout)
    (ref_q * dq.double()).sum().add((ref_k * dk.double()).sum()).backward()

    if kind == "plain":
        q, k = as_heads(qp.clone(), hq, layout), as_heads(kp.clone(), hk, layout)
        out_q, out_k = rope(q, k, cos, sin, layout, backend=backend)
        assert out_q.data_ptr() == q.data_ptr() and out_k.data_ptr() == k.data_ptr()
        assert rel_err(out_q, ref_q) < RTOL[dtype] and rel_err(out_k, ref_k) < RTOL[dtype]
        return
    base_q = qp.clone().requires_grad_()
    base_k = kp.clone().requires_grad_()
    if kind == "fused_qkv":  # [b, s, (hq + 2 hk) d] -> q, k, v slices (Phi-3 style)
        v_part = torch.zeros(batch, seq, hk * head_dim, device=device, dtype=dtype)
        qkv = torch.cat([base_q, base_k, v_part], -1)
        q = as_heads(qkv[..., : hq * head_dim], hq, layout)
        k = as_heads(qkv[..., hq * head_dim: (hq + hk) * head_dim], hk, layout)
    elif kind == "leaf":
        q = as_heads(base_q.detach(), hq, layout).requires_grad_()
        k = as_heads(base_k.detach(), hk, layout).requires_grad_()
        before_q, before_k = q.detach().clone(), k.detach().clone()
    else:
        q = as_heads(base_q * 1, hq, layout)  # a non-leaf view, as a projection output is
        k = as_heads(base_k * 1, hk, layout)
    out_q, out_k = rope(q, k, cos, sin, layout, inplace=kind != "no_inplace", backend=backend)
    assert out_q.shape == q.shape and out_k.shape == k.shape and out_q.dtype == dtype
    if kind in ("proj", "fused_qkv"):  # rotated in place, into the projection's storage
        assert out_q.data_ptr() == q.data_ptr() and out_k.data_ptr() == k.data_ptr()
        assert torch.equal(q.detach(), out_q.detach())
    else:
        assert out_q.data_ptr() != q.data_ptr() and out_k.data_ptr() != k.data_ptr()
    if kind == "leaf":  # a leaf requiring grad is never overwritten
        assert torch.equal(q.detach(), before_q) and torch.equal(k.detach(), before_k)
    tol = RTOL[dtype]
    assert rel_err(out_q, ref_q) < tol and rel_err(out_k, ref_k) < tol
    ((out_q * dq).sum() + (out_k * dk).sum()).backward()
    grad_q = q.grad if kind == "leaf" else base_q.grad
    grad_k = k.grad if kind == "leaf" else base_k.grad
    ref_gq = as_heads(qp64.grad, hq, layout) if kind == "leaf" else qp64.grad
    ref_gk = as_heads(kp64.grad, hk, layout) if kind == "leaf" else kp64.grad
    assert rel_err(grad_q, ref_gq) < 2 * tol and rel_err(grad_k, ref_gk) < 2 * tol
    if rot < head_dim:  # pass-through dims: values and gradients unchanged
        tail = slice(rot, None)
        assert torch.equal(out_q[..., tail].detach(), as_heads(qp, hq, layout)[..., tail])


# ------------------------------------------------------------------------- reference

def test_reference_matches_transformers_float64():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 9, 64, generator=g, dtype=torch.float64)
    k = torch.randn(2, 2, 9, 64, generator=g, dtype=torch.float64)
    cos, sin = torch.randn(2, 9, 64, generator=g, dtype=torch.float64), torch.randn(
        2, 9, 64, generator=g, dtype=torch.float64)
    for layout in (1, 2):
        qq, kk = (q, k) if layout == 1 else (q.transpose(1, 2), k.transpose(1, 2))
        ref = reference_rope(qq, kk, cos, sin, layout)
        hf = apply_rotary_pos_emb(qq, kk, cos, sin, layout)
        assert rel_err(ref[0], hf[0]) < 1e-15 and rel_err(ref[1], hf[1]) < 1e-15
    # partial rotary as Phi/NeoX models do it: rotate the first rot dims, pass the rest
    c, s = cos[..., :32], sin[..., :32]
    ref = reference_rope(q, k, c, s)
    rq, rk = apply_rotary_pos_emb(q[..., :32], k[..., :32], c, s)
    assert rel_err(ref[0], torch.cat([rq, q[..., 32:]], -1)) < 1e-15
    assert rel_err(ref[1], torch.cat([rk, k[..., 32:]], -1)) < 1e-15


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_in_low_precision_is_close_to_float64(dtype):
    case = (80, 80, 3, 1, 1, "random", "proj")
    qp, kp, cos, sin, _, _ = make_case(case, dtype, "cpu")
    q, k = as_heads(qp, 3, 1), as_heads(kp, 1, 1)
    out = reference_rope(q, k, cos, sin)
    ref = reference_rope(q.double(), k.double(), cos.double(), sin.double())
    assert out[0].dtype == dtype
    # one rounding of the result: half an ulp of the dtype, relative
    assert rel_err(out[0], ref[0]) < RTOL[dtype] / 2 and rel_err(out[1], ref[1]) < RTOL[dtype] / 2


# ------------------------------------------------------------------------- backends

@pytest.mark.parametrize("backend", backends("rope", "cpu"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_rope_cpu(backend, dtype, case):
    run_case(backend, case, dtype, "cpu")


@pytest.mark.parametrize("backend", backends("rope", "cpu"))
def test_matches_transformers_with_its_rotary_module(backend):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import (LlamaRotaryEmbedding,
                                                          apply_rotary_pos_emb)

    config = LlamaConfig(hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=32, max_position_embeddings=64)
    rotary = LlamaRotaryEmbedding(config)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 11, 32, generator=g).bfloat16()
    k = torch.randn(2, 2, 11, 32, generator=g).bfloat16()
    position_ids = torch.stack([torch.arange(11), torch.arange(11) % 6])  # packed row 1
    cos, sin = rotary(q, position_ids)
    hf_q, hf_k = apply_rotary_pos_emb(q.double(), k.double(), cos.double(), sin.double())
    out_q, out_k = rope(q.clone(), k.clone(), cos, sin, backend=backend)
    assert rel_err(out_q, hf_q) < RTOL[torch.bfloat16]
    assert rel_err(out_k, hf_k) < RTOL[torch.bfloat16]


@pytest.mark.parametrize("backend", backends("rope", "cpu"))
def test_expanded_incoming_gradient(backend):
    """.sum() hands backward an expanded (stride-0) gradient: it must not be written in place."""
    qp, kp, cos, sin, _, _ = make_case((64, 64, 2, 1, 1, "random", "proj"), torch.float32,
                                       "cpu")
    bq, bk = qp.clone().requires_grad_(), kp.clone().requires_grad_()
    q, k = rope(as_heads(bq * 1, 2, 1), as_heads(bk * 1, 1, 1), cos, sin, backend=backend)
    (q.sum() + k.sum()).backward()
    q64, k64 = qp.double().requires_grad_(), kp.double().requires_grad_()
    rq, rk = reference_rope(as_heads(q64, 2, 1), as_heads(k64, 1, 1), cos.double(),
                            sin.double())
    (rq.sum() + rk.sum()).backward()
    assert rel_err(bq.grad, q64.grad) < 1e-5 and rel_err(bk.grad, k64.grad) < 1e-5


def test_overwriting_a_tensor_another_node_saved_fails_loudly():
    qp, kp, cos, sin, _, _ = make_case((64, 64, 2, 1, 1, "random", "proj"), torch.float32,
                                       "cpu")
    bq = qp.clone().requires_grad_()
    proj = bq * 1
    other = proj * proj  # saves proj for its backward
    q, k = rope(as_heads(proj, 2, 1), as_heads(kp.clone(), 1, 1), cos, sin, backend="torch")
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (q.sum() + other.sum()).backward()


@pytest.mark.parametrize("backend", backends("rope", "cpu"))
def test_out_of_place_leaves_inputs_and_their_versions_alone(backend):
    """inplace=False (and leaves) must not bump version counters: another node saved them."""
    qp, kp, cos, sin, _, _ = make_case((64, 64, 2, 1, 1, "random", "proj"), torch.float32,
                                       "cpu")
    bq, bk = qp.clone().requires_grad_(), kp.clone().requires_grad_()
    proj_q, proj_k = bq * 1, bk * 1
    other = (proj_q * proj_q).sum() + (proj_k * proj_k).sum()  # saves both projections
    q, k = as_heads(proj_q, 2, 1), as_heads(proj_k, 1, 1)
    versions = (q._version, k._version)
    out_q, out_k = rope(q, k, cos, sin, inplace=False, backend=backend)
    assert (q._version, k._version) == versions
    assert torch.equal(proj_q.detach(), qp) and torch.equal(proj_k.detach(), kp)
    (out_q.sum() + out_k.sum() + other).backward()  # no "modified by an inplace operation"
    q64, k64 = qp.double().requires_grad_(), kp.double().requires_grad_()
    rq, rk = reference_rope(as_heads(q64, 2, 1), as_heads(k64, 1, 1), cos.double(),
                            sin.double())
    (rq.sum() + rk.sum() + (q64 * q64).sum() + (k64 * k64).sum()).backward()
    assert rel_err(bq.grad, q64.grad) < 1e-5 and rel_err(bk.grad, k64.grad) < 1e-5
    # a leaf k (requires grad) keeps both out of place, whatever inplace says
    leaf_k = as_heads(kp.clone(), 1, 1).requires_grad_()
    q2 = as_heads(qp.clone().requires_grad_() * 1, 2, 1)
    out_q, _ = rope(q2, leaf_k, cos, sin, backend=backend)
    assert out_q.data_ptr() != q2.data_ptr() and leaf_k._version == 0


@pytest.mark.parametrize("backend", backends("rope", "cpu"))
def test_inference_mode_and_no_grad(backend):
    qp, kp, cos, sin, _, _ = make_case((64, 48, 2, 1, 1, "packed", "plain"), torch.bfloat16,
                                       "cpu")
    ref = reference_rope(as_heads(qp, 2, 1), as_heads(kp, 1, 1), cos, sin)
    for mode in (torch.inference_mode, torch.no_grad):
        with mode():
            q, k = as_heads(qp.clone(), 2, 1), as_heads(kp.clone(), 1, 1)
            out_q, out_k = rope(q, k, cos, sin, backend=backend)
        assert out_q.data_ptr() == q.data_ptr()
        assert rel_err(out_q, ref[0]) < RTOL[torch.bfloat16]
        assert rel_err(out_k, ref[1]) < RTOL[torch.bfloat16]


@pytest.mark.parametrize("backend", backends("rope", "cpu"))
def test_outputs_may_be_modified_in_place(backend):
    qp, kp, cos, sin, dq, dk = make_case((64, 64, 2, 1, 1, "random", "proj"), torch.float32,
                                         "cpu")
    bq, bk = qp.clone().requires_grad_(), kp.clone().requires_grad_()
    q, k = as_heads(bq * 1, 2, 1), as_heads(bk * 1, 1, 1)
    out_q, out_k = rope(q, k, cos, sin, backend=backend)
    assert out_q.data_ptr() == q.data_ptr()
    out_q.mul_(0.5)  # as a model scaling q in place would
    ((out_q * dq).sum() + (out_k * dk).sum()).backward()
    q64, k64 = qp.double().requires_grad_(), kp.double().requires_grad_()
    rq, rk = reference_rope(as_heads(q64, 2, 1), as_heads(k64, 1, 1), cos.double(),
                            sin.double())
    ((rq * 0.5 * dq.double()).sum() + (rk * dk.double()).sum()).backward()
    assert rel_err(bq.grad, q64.grad) < 1e-5 and rel_err(bk.grad, k64.grad) < 1e-5


def test_q_and_k_sharing_memory_are_not_overwritten():
    qp, _, cos, sin, _, _ = make_case((64, 64, 2, 2, 1, "random", "proj"), torch.float32, "cpu")
    q = as_heads(qp, 2, 1)
    before = q.clone()
    out_q, out_k = rope(q, q, cos, sin, backend="torch")
    assert torch.equal(q, before)
    ref = reference_rope(before, before, cos, sin)
    assert rel_err(out_q, ref[0]) < 1e-6 and rel_err(out_k, ref[1]) < 1e-6


def test_module_and_function_are_both_the_op():
    import fastft.ops

    fastft.ops.load_all()
    import fastft.ops.rope  # noqa: F401  (must not rebind the op's name to the module)
    from fastft.ops import rope as op

    assert callable(op) and not isinstance(op, type(R))

    qp, kp, cos, sin, _, _ = make_case((64, 64, 2, 1, 1, "random", "proj"), torch.float32,
                                       "cpu")
    ref = reference_rope(as_heads(qp, 2, 1), as_heads(kp, 1, 1), cos, sin)
    q, k = op(as_heads(qp, 2, 1), as_heads(kp, 1, 1), cos, sin, backend="torch")
    assert rel_err(q, ref[0]) < 1e-6


def test_overlapping_slices_of_one_projection_are_not_overwritten():
    g = torch.Generator().manual_seed(5)
    proj = torch.randn(2, 7, 3 * 16, generator=g)
    before = proj.clone()
    q = proj[..., : 2 * 16].view(2, 7, 2, 16)  # heads 0-1
    k = proj[..., 16: 2 * 16].view(2, 7, 1, 16)  # head 1 again: shares memory with q
    cos, sin = torch.randn(2, 7, 16, generator=g), torch.randn(2, 7, 16, generator=g)
    ref = reference_rope(q.clone(), k.clone(), cos, sin, 2)
    out = rope(q, k, cos, sin, 2, backend="torch")
    assert torch.equal(proj, before)
    assert rel_err(out[0], ref[0]) < 1e-6 and rel_err(out[1], ref[1]) < 1e-6
    assert R._disjoint_tokens(proj[..., :16].view(2, 7, 1, 16), proj[..., 32:].view(2, 7, 1, 16))
    assert not R._disjoint_tokens(q, k)


def test_bad_inputs_raise_clear_errors():
    q, k = torch.randn(1, 2, 5, 8), torch.randn(1, 1, 5, 8)
    cos = torch.randn(1, 5, 8)
    with pytest.raises(ValueError, match="unsqueeze_dim"):
        rope(q, k, cos, cos, unsqueeze_dim=3)
    with pytest.raises(ValueError, match="seq=5"):
        rope(q, k, cos[:, :4], cos[:, :4])
    with pytest.raises(ValueError, match="even"):
        rope(q, k, cos[..., :3], cos[..., :3])
    with pytest.raises(ValueError, match="4-D"):
        rope(q[0], k[0], cos, cos)
    with pytest.raises(ValueError, match="batch, seq and head_dim"):
        rope(q, torch.randn(1, 1, 5, 6), cos, cos)


def test_float64_runs_on_the_reference():
    qp, kp, cos, sin, _, _ = make_case((64, 48, 2, 1, 2, "random", "proj"), torch.float64,
                                       "cpu")
    q, k = as_heads(qp, 2, 2), as_heads(kp, 1, 2)
    ref = reference_rope(q, k, cos, sin, 2)
    out = rope(q.clone(), k.clone(), cos, sin, 2)
    assert rel_err(out[0], ref[0]) < 1e-14 and rel_err(out[1], ref[1]) < 1e-14


def test_triton_custom_op_passes_opcheck():
    qp, kp, cos, sin, _, _ = make_case((64, 48, 2, 1, 2, "random", "proj"), torch.float32,
                                       "cpu", seq=5)
    q, k = as_heads(qp, 2, 2), as_heads(kp, 1, 2)
    torch.library.opcheck(R._triton_rope_inplace, (q, k, cos, sin, False))
    torch.library.opcheck(R._triton_rope_out,
                          (q, k, cos, sin, torch.empty_like(q), torch.empty_like(k), True))


@pytest.mark.parametrize("cos_kind", ["packed", "batch1"])
def test_triton_launcher_splits_batch_rows_over_launches(monkeypatch, cos_kind):
    # batch rows go on grid axis 1 (at most 65535 a launch): with the limit at 2, five rows take
    # three launches from sliced tensors (cos/sin per row, or one row broadcast to all)
    kernels = importlib.import_module("fastft.triton_kernels.rope")
    monkeypatch.setattr(kernels, "_MAX_GRID_Y", 2)
    run_case("triton", (64, 32, 2, 1, 1, cos_kind, "no_inplace"), torch.float32, "cpu",
             batch=5, seq=3)
    run_case("triton", (64, 64, 3, 1, 2, cos_kind, "proj"), torch.float32, "cpu", batch=5,
             seq=3)


@pytest.mark.parametrize("backend", backends("rope", "cpu"))
def test_compiles_fullgraph(backend):
    qp, kp, cos, sin, dq, dk = make_case((64, 64, 2, 1, 1, "packed", "proj"), torch.float32,
                                         "cpu")
    bq, bk = qp.clone().requires_grad_(), kp.clone().requires_grad_()

    def f(bq, bk):
        q, k = rope(as_heads(bq * 1, 2, 1), as_heads(bk * 1, 1, 1), cos, sin, backend=backend)
        return (q * dq).sum() + (k * dk).sum()

    out = torch.compile(f, backend="aot_eager", fullgraph=True)(bq, bk)
    out.backward()
    q64, k64 = qp.double().requires_grad_(), kp.double().requires_grad_()
    rq, rk = reference_rope(as_heads(q64, 2, 1), as_heads(k64, 1, 1), cos.double(),
                            sin.double())
    ref = (rq * dq.double()).sum() + (rk * dk.double()).sum()
    ref.backward()
    assert abs(out.item() - ref.item()) < 1e-4 * (1 + abs(ref.item()))
    assert rel_err(bq.grad, q64.grad) < 1e-5 and rel_err(bk.grad, k64.grad) < 1e-5


# ------------------------------------------------------------------------------ GPU

GPU_CASES = [
    (128, 128, 32, 8, 1, "packed", "proj"),    # Llama-3.1-8B heads
    (64, 64, 14, 2, 2, "batch1", "proj"),
    (80, 32, 32, 32, 1, "random", "proj"),     # Phi-2: head_dim 80, rot 32
    (256, 256, 8, 4, 1, "shared2d", "leaf"),   # Gemma head_dim 256
    (128, 64, 12, 4, 2, "random", "no_inplace"),
    (96, 96, 6, 2, 1, "packed", "plain"),
    (128, 128, 32, 8, 1, "packed", "fused_qkv"),
    # CUDA kernel shapes: more heads than head slots (each thread loops over head groups),
    # rotated half-rows wider than a warp's column lanes (a thread takes several columns),
    # one vector a half-row, and out-of-place partial rotary with a wide tail copy
    (64, 64, 64, 64, 1, "packed", "proj"),
    (1024, 1024, 2, 1, 1, "random", "proj"),
    (1024, 512, 3, 1, 2, "random", "no_inplace"),
    (32, 16, 5, 3, 1, "random", "leaf"),
    (80, 32, 7, 1, 2, "packed", "leaf"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", gpu_backends("rope"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: "-".join(map(str, c)))
def test_rope_gpu(backend, dtype, case):
    run_case(backend, case, dtype, "cuda", batch=3, seq=1037)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", gpu_backends("rope"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_gpu_block_and_grid_limits(backend, dtype):
    # one column vector and one head slot a token (one thread): a CUDA block takes 32 tokens
    # along blockDim.z; seq 131 leaves the last block of each batch row partly empty
    run_case(backend, (16, 16, 1, 1, 2, "random", "proj"), dtype, "cuda", batch=3, seq=131)
    # more batch rows than grid.y takes (65535): the CUDA launcher launches again from row 65535
    run_case(backend, (32, 32, 2, 1, 1, "random", "proj"), dtype, "cuda", batch=65535 + 6, seq=2)
    # half-rows of 32+ vectors: 32 column lanes, so 8 head slots of 4 heads take 32 of the 45
    # heads and each thread loops to a second head group (partly past the last head); fp32
    # (half 256 = 64 vectors) also loops over two columns a thread
    run_case(backend, (512, 512, 37, 8, 1, "random", "proj"), dtype, "cuda", batch=2, seq=67)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", gpu_backends("rope"))
def test_rope_gpu_misaligned_falls_back_to_scalar_path(backend):
    # head_dim 66 (half 33): no 16-byte vectors; odd seq
    run_case(backend, (66, 66, 5, 1, 1, "random", "proj"), torch.bfloat16, "cuda", 2, 301)
    run_case(backend, (70, 38, 5, 1, 2, "packed", "no_inplace"), torch.float16, "cuda", 2, 77)


@pytest.mark.gpu
def test_cuda_op_passes_opcheck():
    import fastft.ops.rope  # noqa: F401

    qp, kp, cos, sin, _, _ = make_case((128, 64, 4, 2, 1, "random", "proj"), torch.bfloat16,
                                       "cuda", seq=33)
    q, k = as_heads(qp, 4, 1), as_heads(kp, 2, 1)
    q4, k4 = q.transpose(1, 2), k.transpose(1, 2)
    torch.library.opcheck(torch.ops.fastft.rope_inplace, (q4, k4, cos, sin, False))
    torch.library.opcheck(torch.ops.fastft.rope_out,
                          (q4, k4, cos, sin, torch.empty_like(q4), torch.empty_like(k4), True))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", gpu_backends("rope"))
def test_gpu_compiles_fullgraph(backend):
    qp, kp, cos, sin, dq, dk = make_case((128, 128, 8, 2, 1, "packed", "proj"), torch.bfloat16,
                                         "cuda", seq=65)
    bq, bk = qp.clone().requires_grad_(), kp.clone().requires_grad_()

    def f(bq, bk):
        q, k = rope(as_heads(bq * 1, 8, 1), as_heads(bk * 1, 2, 1), cos, sin, backend=backend)
        return ((q * dq).float().sum() + (k * dk).float().sum())

    out = torch.compile(f, fullgraph=True)(bq, bk)
    out.backward()
    q64, k64 = qp.double().requires_grad_(), kp.double().requires_grad_()
    rq, rk = reference_rope(as_heads(q64, 8, 1), as_heads(k64, 2, 1), cos.double(),
                            sin.double())
    ((rq * dq.double()).sum() + (rk * dk.double()).sum()).backward()
    assert rel_err(bq.grad, q64.grad) < 2 * RTOL[torch.bfloat16]
