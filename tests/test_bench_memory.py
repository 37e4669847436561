"""bench/train_step.py's memory breakdown: the live set at the allocation peak of a trace,
grouped by the innermost fastft / transformers / peft frame (a synthetic allocator trace)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "bench"))
from train_step import live_at_peak  # noqa: E402


def frames(*names):
    # innermost first, as the allocator records them
    return [{"filename": f, "line": i + 1, "name": f"fn{i}"} for i, f in enumerate(names)]


TORCH = "/site-packages/torch/nn/functional.py"
LORA = "/repo/fastft/ops/lora.py"
LLAMA = "/site-packages/transformers/models/llama/modeling_llama.py"


def test_live_at_peak_groups_the_peak_not_the_end():
    events = [
        {"action": "alloc", "addr": 1, "size": 100, "frames": frames(TORCH, LORA, LLAMA)},
        {"action": "alloc", "addr": 2, "size": 50, "frames": frames(LLAMA)},
        {"action": "free_requested", "addr": 2, "size": 50},
        {"action": "free_completed", "addr": 2, "size": 50},
        {"action": "alloc", "addr": 3, "size": 70, "frames": frames(TORCH, LORA)},
        {"action": "alloc", "addr": 4, "size": 30, "frames": frames(TORCH)},  # peak: 200
        {"action": "segment_alloc", "addr": 9, "size": 4096},
        {"action": "free_requested", "addr": 1, "size": 100},
        {"action": "alloc", "addr": 5, "size": 60, "frames": frames(LLAMA)},  # 160 < 200
    ]
    out = live_at_peak(events)
    assert out["peak_bytes_during_trace"] == 200
    sites = {s["site"]: (s["blocks"], s["bytes"]) for s in out["sites"]}
    # blocks 1 and 3 (the fastft frame inside, not torch's or transformers'), block 4 unplaced
    assert sites == {"lora.py:2 fn1": (2, 170), "(no fastft / transformers / peft frame)": (1, 30)}
    assert out["other_bytes"] == 0


def test_live_at_peak_top_and_other():
    events = [{"action": "alloc", "addr": i, "size": 10 * (i + 1), "frames": frames(f"/x/fastft/m{i}.py")}
              for i in range(5)]
    out = live_at_peak(events, top=2)
    assert [s["bytes"] for s in out["sites"]] == [50, 40]
    assert out["other_bytes"] == 10 + 20 + 30
    assert live_at_peak([])["peak_bytes_during_trace"] == 0
