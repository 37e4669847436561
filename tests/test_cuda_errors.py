"""Bad input to the CUDA ops raises a RuntimeError that says what is wrong, numbers included,
and the process lives on. (On the H200, run 104, a failed check whose message held a number
crashed the process: TORCH_CHECK formatted it through a stream in our library. The bindings'
FASTFT_CHECK formats messages itself; these calls each hit one such check.)"""
import pytest
import torch

import fastft.ops  # noqa: F401  (registers the ops)
from tests.helpers import backends

pytestmark = pytest.mark.gpu


@pytest.fixture
def ops():
    if "cuda" not in backends("nf4_matmul", "cuda"):
        pytest.skip("fastft._C is not built")
    return torch.ops.fastft


def test_gpu_rms_norm_weight_of_the_wrong_size(ops):
    x = torch.randn(4, 64, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(RuntimeError, match=r"weight must be a contiguous 1-D tensor of size 64, got \[32\]"):
        ops.rms_norm_fwd(x, torch.randn(32, dtype=torch.bfloat16, device="cuda"),
                         torch.empty_like(x), torch.empty(4, device="cuda"), 1e-6, 0.0)


def test_gpu_nf4_gemv_unknown_variant(ops):
    from fastft.ops.nf4 import _state_args, resolve
    from tests.test_nf4 import quantize

    _, packed, state = quantize((64, 256), True, device="cuda")
    st = resolve(packed, state)
    x = torch.randn(2, 256, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(RuntimeError, match="variant must be 0..3 or 5..7, got 4"):
        ops.nf4_gemv(x, *_state_args(st), None, st.blocksize, st.blocksize2, 4, 0, 0, 1, None,
                     None, 1.0, torch.empty(2, 64, dtype=torch.bfloat16, device="cuda"))


def test_gpu_low_rank_input_too_many_rows(ops):
    bf16 = torch.bfloat16
    with pytest.raises(RuntimeError, match="takes 1 to 16 rows of x, got 17"):
        ops.nf4_low_rank_input(torch.randn(17, 64, dtype=bf16, device="cuda"),
                               torch.randn(8, 64, dtype=bf16, device="cuda"), True,
                               torch.empty(17, 8, dtype=bf16, device="cuda"))
    with pytest.raises(RuntimeError, match=r"a must be \[R, 64\], got \[8, 56\]"):
        ops.nf4_low_rank_input(torch.randn(2, 64, dtype=bf16, device="cuda"),
                               torch.randn(8, 56, dtype=bf16, device="cuda"), True,
                               torch.empty(2, 8, dtype=bf16, device="cuda"))
    # and the process still works
    out = torch.empty(1, 8, dtype=bf16, device="cuda")
    x, a = torch.randn(1, 64, dtype=bf16, device="cuda"), torch.randn(8, 64, dtype=bf16, device="cuda")
    ops.nf4_low_rank_input(x, a, True, out)
    assert torch.allclose(out.float(), x.float() @ a.float().t(), rtol=2e-2, atol=2e-2)
