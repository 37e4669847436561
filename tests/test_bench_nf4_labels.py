"""bench/common.py's label of the fused NF4 kernel a profiler event names, which the small-M
benchmarks record (a forced kernel that does not apply falls back to another)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "bench"))
from common import nf4_kernel_label  # noqa: E402


def test_nf4_kernel_label_names_each_fused_kernel():
    ns = "void fastft::(anonymous namespace)::"
    args = "(fastft::NF4Weight, fastft::NF4GemvArgs, fastft::NF4LowRank)"
    assert nf4_kernel_label(f"{ns}nf4_gemv_v4_kernel<false, __nv_bfloat16, 1, 2, 1>{args}") == \
        "v4<false, __nv_bfloat16, 1, 2, 1>"
    assert nf4_kernel_label(f"{ns}nf4_gemv_v3_group_kernel<2, true, __half, 0, true, 8>{args}") \
        == "v3_group<2, true, __half, 0, true, 8>"
    assert nf4_kernel_label(f"{ns}nf4_gemv_v3_kernel<1, true, __half, 2, false, 16>{args}") == \
        "v3<1, true, __half, 2, false, 16>"
    assert nf4_kernel_label(f"{ns}nf4_gemv_kernel<__nv_bfloat16, 1>{args}") == \
        "v1<__nv_bfloat16, 1>"
    for other in ("cudaLaunchKernelExC", f"{ns}nf4_kernel<__half>{args}",
                  "void at::native::vectorized_elementwise_kernel<4, float>(int)"):
        assert nf4_kernel_label(other) is None, other
