"""Benchmarks collect their rows here; the session writes them as JSON to $FASTFT_BENCH_OUT."""
import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

ROWS = []


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="benchmarks need a CUDA GPU")
        for item in items:
            item.add_marker(skip)


@pytest.fixture
def record(benchmark):
    """record(op=..., shape=..., backend=..., ms=..., bytes=... or flops=..., baseline=...)"""
    from common import copy_bandwidth_gbps

    def add(**row):
        if "bytes" in row:
            row["gbps"] = row["bytes"] / row["ms"] / 1e6
            row["frac_copy_bw"] = row["gbps"] / copy_bandwidth_gbps()
        if "flops" in row:
            row["tflops"] = row["flops"] / row["ms"] / 1e9
        ROWS.append(row)
        benchmark.extra_info.update({k: v for k, v in row.items() if not isinstance(v, dict)})
        return row

    return add


def pytest_sessionfinish(session, exitstatus):
    out = os.environ.get("FASTFT_BENCH_OUT")
    if out and ROWS:
        from common import copy_bandwidth_gbps, gpu_name

        with open(out, "w") as f:
            json.dump({"gpu": gpu_name(), "copy_gbps": copy_bandwidth_gbps(), "rows": ROWS}, f,
                      indent=1)
