"""fastft's own GGML quantisers, checked against the `gguf` package's independent dequantiser.

A wrong byte layout decodes to garbage (rel. RMSE ~ 1), so "round trip error near the format's
theoretical error" is a layout test as well as a quality test.

Theoretical error: a uniform quantiser with step D has RMS error D / sqrt(12). For each format
the test derives D per sub-block from the data itself (range / 15 for Q4_K's 32-value
sub-blocks, range / 31 for Q5_K, max|x| / 32 for Q6_K's 16-value sub-blocks), i.e. the error of
the plain min/max choice of scales before the 6-bit/8-bit scale rounding. A scale search should
beat or match it; the quantised scales add a little, so the bound allows 3% on top. Measured on
N(0,1) weights (seed 0, 256 x 2048): Q4_K 0.0719 vs 0.0808 theoretical, Q5_K 0.0363 vs 0.0391,
Q6_K 0.0177 vs 0.0192.
"""
import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from fastft.gguf_export import kquants  # noqa: E402


# tiny tensors: one intra-op thread is faster (see conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")


def _roundtrip(w: torch.Tensor, type_name: str) -> np.ndarray:
    data = kquants.quantize(w, type_name)
    return gguf.quants.dequantize(data, gguf.GGMLQuantizationType[type_name])


def _rel_rmse(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a - ref) ** 2)) / np.sqrt(np.mean(ref**2)))


def _theoretical_rel_rmse(w: np.ndarray, type_name: str) -> float:
    if type_name == "Q6_K":
        sub = w.reshape(-1, 16)
        step = np.abs(sub).max(axis=1) / 32.0
    else:
        nmax = {"Q4_K": 15, "Q5_K": 31}[type_name]
        sub = w.reshape(-1, 32)
        step = (sub.max(axis=1) - np.minimum(sub.min(axis=1), 0.0)) / nmax
    return float(np.sqrt(np.mean(step**2) / 12.0) / np.sqrt(np.mean(w**2)))


@pytest.mark.parametrize("type_name,bytes_per_block", [("Q4_K", 144), ("Q5_K", 176), ("Q6_K", 210)])
def test_kquant_roundtrip_matches_theoretical_error(type_name, bytes_per_block):
    torch.manual_seed(0)
    w = torch.randn(256, 2048)
    data = kquants.quantize(w, type_name)
    assert data.dtype == np.uint8
    assert data.shape == (256, 2048 // 256 * bytes_per_block)
    deq = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[type_name])
    assert deq.shape == (256, 2048)
    err = _rel_rmse(deq, w.numpy())
    theory = _theoretical_rel_rmse(w.numpy(), type_name)
    assert err <= 1.03 * theory, (type_name, err, theory)
    # and not suspiciously small (that would mean the test compares a tensor with itself)
    assert err > 0.5 * theory


def test_q8_0_bit_exact_with_gguf_reference():
    torch.manual_seed(1)
    w = torch.randn(64, 320) * 3
    w[3] = 0.0  # all-zero block: d = 0
    ours = kquants.quantize(w, "Q8_0")
    ref = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q8_0)
    assert ours.dtype == ref.dtype and ours.shape == ref.shape
    assert np.array_equal(ours, ref)


@pytest.mark.parametrize("type_name", ["Q4_K", "Q5_K", "Q6_K"])
def test_kquant_edge_rows(type_name):
    torch.manual_seed(2)
    w = torch.randn(6, 512)
    w[0] = 0.0  # zeros
    w[1] = 0.37  # constant positive
    w[2] = -1.25  # constant negative
    w[3] = w[3].abs() + 0.5  # all positive, offset from 0
    w[4] = w[4] * 1000.0  # large magnitude
    w[5, :256] = 0.0  # half a row of zeros, the rest random
    deq = _roundtrip(w, type_name)
    assert np.isfinite(deq).all()
    np.testing.assert_array_equal(deq[0], 0.0)
    for r in range(1, 6):
        row_err = _rel_rmse(deq[r], w[r].numpy())
        assert row_err < 0.12, (type_name, r, row_err)
    np.testing.assert_array_equal(deq[5, :256], 0.0)


def test_quantize_handles_views_bf16_and_3d():
    torch.manual_seed(3)
    base = torch.randn(512, 256).to(torch.bfloat16)
    view = base.t()  # non-contiguous [256, 512]
    a = kquants.quantize(view, "Q4_K")
    b = kquants.quantize(view.contiguous().float(), "Q4_K")
    assert np.array_equal(a, b)
    bf = kquants.quantize(view, "BF16")
    back = torch.from_numpy(bf.copy()).view(torch.bfloat16)
    assert torch.equal(back, view.contiguous())


def test_bad_row_length_is_a_clear_error():
    with pytest.raises(ValueError, match="not a multiple of 256"):
        kquants.quantize(torch.randn(4, 320), "Q4_K")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    torch.manual_seed(4)
    w = torch.randn(128, 1024)
    for t in ("Q4_K", "Q5_K", "Q6_K", "Q8_0"):
        cpu = gguf.quants.dequantize(kquants.quantize(w, t), gguf.GGMLQuantizationType[t])
        gpu = gguf.quants.dequantize(kquants.quantize(w.cuda(), t), gguf.GGMLQuantizationType[t])
        # float reductions differ in order on the GPU; a handful of values may round the other way
        assert _rel_rmse(gpu, cpu) < 1e-2
