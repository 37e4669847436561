"""bench/nf4_timeline.py's per-CTA summary by start time (which chain sets a call's last CTA),
on a synthetic timeline whose answer is known; a timeline without end marks is refused."""
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "bench"))
import nf4_timeline  # noqa: E402


def test_by_start_quarter_groups_ctas_by_start_and_times_marks_from_the_release():
    slot = nf4_timeline.SLOT
    ctas, clock0 = 8, 10_000
    tl = np.zeros((2, ctas, 40), dtype=np.int64)
    tl[0, :, slot["end_ns"]] = 1_000 + np.arange(ctas)  # call 0: its last CTA ends at 1007 ns
    release = 1_007
    for i in range(ctas):
        row = tl[1, i]
        row[slot["start_ns"]] = release + (i - 4) * 100  # -0.4 .. +0.3 us
        row[slot["start"]] = clock0  # (clock marks: 1 cycle per ns below)
        row[slot["table"]] = clock0 + 500 + 10 * i  # scales 0.5 us (+ 10 ns i) after the start
        row[slot["extra"] + 5] = clock0 + 900  # window 0
        row[slot["warp_loop_end"]:slot["warp_loop_end"] + 16] = clock0 + 4_000
        row[slot["warp_loop_end"] + 3] = clock0 + 4_500  # the slowest warp
        row[slot["end_ns"]] = row[slot["start_ns"]] + 5_000 + 100 * i
    got = nf4_timeline.by_start_quarter(tl, 1.0)
    assert list(got) == ["start q1", "start q2", "start q3", "start q4", "last-ending tenth"]
    q1, q4, last = got["start q1"], got["start q4"], got["last-ending tenth"]
    assert np.isclose(q1["start"], -0.35) and np.isclose(q4["start"], 0.25)
    assert np.isclose(q1["scales"], -0.35 + 0.5 + 0.005)  # CTAs 0, 1
    assert np.isclose(q4["window0"], 0.25 + 0.9)
    assert np.isclose(q4["loop_end"], 0.25 + 4.5)
    assert np.isclose(last["start"], 0.3) and np.isclose(last["end"], 0.3 + 5.0 + 0.7)
    assert q1["x_landed"] is None  # a mark no CTA set


def test_summarise_refuses_a_timeline_whose_ctas_set_no_end_marks():
    """FASTFT_NF4_V4_PROBE=1 (the copies alone) returns from the decoding warps before the
    epilogue: the summary names that instead of failing inside numpy (run 237; main prints it
    and goes on to the next case)."""
    slot, calls, ctas = nf4_timeline.SLOT, 2, 4
    slots = slot["iter"] + 16 * nf4_timeline.ITERS * 2
    tl = np.zeros((calls, ctas, slots), dtype=np.uint64)
    tl[:, :, slot["start_ns"]] = 1_000
    tl[:, :, slot["start"]] = 5_000
    meta = dict(calls=calls, ctas=ctas, timeline_ctas=ctas, timeline_slots=slots, v3_kparts=0,
                variant=7, frozen=1)
    with pytest.raises(ValueError, match="no CTA set its end marks"):
        nf4_timeline.summarise(meta, tl.reshape(-1))
