"""Where a small-M NF4 call's time goes: builds bench/nf4_timeline.cu (nvcc, sm_90a), runs it
per case and summarises its per-CTA timeline.

Usage (repo root, on the GPU machine): python3 bench/nf4_timeline.py OUT_DIR
  CASES="M N K frozen[ variant kparts];..." (default: the bar's shapes, M = 1, 4, 8, 16, frozen,
  and M = 1 not frozen), CALLS=8; BUILD_ONLY=1 only builds; EXE=path runs that build instead;
  NVCC_FLAGS adds flags to nvcc; CSRC=dir builds the kernels of another tree (an A/B against a
  copy of csrc/).
Writes OUT_DIR/timeline.json (one summary per case) and prints a table. Times in us; the phases
are per CTA from its own clock64, converted with the SM clock rate measured against the global
timer over the same CTAs; starts and ends across CTAs come from the global timer.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SLOT = dict(start_ns=0, sm=1, start=2, waited=3, table=4, staged=5, summed=6, end=7, end_ns=8,
            extra=9, warp_loop_end=16, iter=32)
ITERS = 8  # kTimelineIters: loop iterations timed per warp
# v4's finer marks (kTimelineExtra + k, nf4_stream.cu; only v4 sets them)
EXTRA_NAMES = {0: "warps started", 1: "levels in", 2: "table synced", 3: "x landed (M = 1)",
               4: "x converted (M = 1)", 5: "window 0 landed", 6: "last window landed"}
DEFAULT_CASES = ";".join(
    [f"{m} 14336 4096 1" for m in (1, 4, 8, 16)] + [f"{m} 4096 14336 1" for m in (1, 4, 8)]
    + ["1 14336 4096 0", "1 4096 14336 0"])


def nvcc():
    home = os.environ.get("CUDA_HOME")
    if not home:
        try:
            from torch.utils.cpp_extension import CUDA_HOME as home
        except Exception:
            home = None
    path = os.path.join(home, "bin", "nvcc") if home else shutil.which("nvcc")
    if not path or not os.path.exists(path):
        sys.exit("nvcc not found (set CUDA_HOME)")
    return path


def build(out_dir):
    exe = os.path.join(out_dir, "nf4_timeline")
    cmd = [nvcc(), "-O3", "--use_fast_math", "--expt-relaxed-constexpr", "-std=c++17",
           "-arch=sm_90a", "-lineinfo", "-I" + os.environ.get("CSRC", os.path.join(ROOT, "csrc")),
           os.path.join(HERE, "nf4_timeline.cu"), "-o", exe] + os.environ.get("NVCC_FLAGS", "").split()
    subprocess.run(cmd, check=True)
    return exe


def pct(v, q):
    return float(np.percentile(v, q)) if len(v) else float("nan")


def global_ns(t, clock, ghz):
    """A CTA's clock64 marks `clock` (cycles) as global-timer ns: its start in both clocks is the
    common point. t: [ctas, slots] of one call."""
    return t[:, SLOT["start_ns"]] + (clock - t[:, SLOT["start"]]) / ghz


CTA_MARKS = ("start", "scales", "x_landed", "x_converted", "window0", "last_window", "loop_end",
             "end")


def by_start_quarter(tl, ghz):
    """Each CTA's marks in us after the previous call's last CTA ended (its release), medians
    over the steady calls' CTAs grouped by their start (quarters, then the last-ending tenth):
    which chain sets the late CTAs' end (run 232: their prologue, not their first window). tl:
    [calls, ctas, slots] of one case; marks a CTA did not set are NaN."""
    rows = []
    for c in range(1, tl.shape[0]):
        t = tl[c]
        release = tl[c - 1, :, SLOT["end_ns"]].max()

        def mark(v):  # clock marks (0: not set) as global us after the release
            return np.where(v > 0, (global_ns(t, v, ghz) - release) / 1000.0, np.nan)
        warp_ends = t[:, SLOT["warp_loop_end"]:SLOT["warp_loop_end"] + 16].max(axis=1)
        rows.append(np.stack([
            (t[:, SLOT["start_ns"]] - release) / 1000.0, mark(t[:, SLOT["table"]]),
            *(mark(t[:, SLOT["extra"] + k]) for k in (3, 4, 5, 6)), mark(warp_ends),
            (t[:, SLOT["end_ns"]] - release) / 1000.0], axis=1)[t[:, SLOT["end_ns"]] > 0])
    if not rows:
        return {}
    a = np.concatenate(rows)
    edges = np.percentile(a[:, 0], [25, 50, 75])
    quarter = np.searchsorted(edges, a[:, 0], side="left")
    groups = {f"start q{k + 1}": a[quarter == k] for k in range(4)}
    groups["last-ending tenth"] = a[a[:, -1] >= np.percentile(a[:, -1], 90)]
    return {name: {m: float(np.nanmedian(g[:, i])) if np.isfinite(g[:, i]).any() else None
                   for i, m in enumerate(CTA_MARKS)}
            for name, g in groups.items() if len(g)}


def summarise(meta, raw):
    calls, ctas = meta["calls"], meta["ctas"]
    tl = raw.reshape(-1, meta["timeline_ctas"], meta["timeline_slots"])[:calls, :ctas].astype(
        np.int64)
    warps = 16 if meta["v3_kparts"] == 16 or meta["variant"] == 7 else 8  # v4: 16 consumers
    loop_ends = tl[:, :, SLOT["warp_loop_end"]:SLOT["warp_loop_end"] + warps]
    # [call, cta, warp, iteration, (start, scales ready)]; 0 where the warp had no such iteration
    iters = tl[:, :, SLOT["iter"]:SLOT["iter"] + 16 * ITERS * 2].reshape(calls, ctas, 16, ITERS, 2)[
        :, :, :warps]
    # CTAs that set their end marks: all but v4's second K part (it returns once its sums are
    # in the first part's shared memory), whose end-based numbers would be garbage
    ended = (tl[:, :, SLOT["end_ns"]] > 0) & (tl[:, :, SLOT["end"]] > 0)
    if not ended.any():
        # (run 237: FASTFT_NF4_V4_PROBE=1's decoding warps return before the epilogue)
        raise ValueError("no CTA set its end marks (a v4 timing probe whose warps return "
                         "before the epilogue, such as FASTFT_NF4_V4_PROBE=1?): nothing to time")
    # SM clock (cycles per ns) from the ended CTAs of all calls: total cycles over total ns
    d_clk = (tl[:, :, SLOT["end"]] - tl[:, :, SLOT["start"]])[ended]
    d_ns = (tl[:, :, SLOT["end_ns"]] - tl[:, :, SLOT["start_ns"]])[ended]
    ghz = float(d_clk.sum() / max(d_ns.sum(), 1))
    us = lambda cycles: cycles / ghz / 1000.0  # noqa: E731
    per_call = []
    for c in range(calls):
        t0 = tl[c][:, SLOT["start_ns"]].min()
        start = (tl[c][:, SLOT["start_ns"]] - t0) / 1000.0
        t = tl[c][ended[c]]  # (the phases and ends: ended CTAs only)
        warp_loop_ends = loop_ends[c][ended[c]]
        end = (t[:, SLOT["end_ns"]] - t0) / 1000.0
        first_wait_slot = "table" if meta["frozen"] else "waited"
        loop_end = warp_loop_ends.max(axis=1)
        phases = {
            "to_table" if meta["frozen"] else "to_wait": us(t[:, SLOT[first_wait_slot]] - t[:, SLOT["start"]]),
            "wait" if meta["frozen"] else "table": us(
                (t[:, SLOT["waited"]] - t[:, SLOT["table"]]) if meta["frozen"]
                else (t[:, SLOT["table"]] - t[:, SLOT["waited"]])),
            "stage_x": us(t[:, SLOT["staged"]] - np.maximum(t[:, SLOT["waited"]], t[:, SLOT["table"]])),
            "loop_slowest_warp": us(loop_end - t[:, SLOT["staged"]]),
            "loop_fastest_warp": us(warp_loop_ends.min(axis=1) - t[:, SLOT["staged"]]),
            "sum_parts": us(t[:, SLOT["summed"]] - loop_end),
            "write_y": us(t[:, SLOT["end"]] - t[:, SLOT["summed"]]),
            "cta_total": us(t[:, SLOT["end"]] - t[:, SLOT["start"]]),
        }
        per_call.append({
            "t0_ns": int(t0),
            "span": float(end.max()),
            "start_p50_p100": [pct(start, 50), pct(start, 100)],
            "end_p0_p50_p100": [pct(end, 0), pct(end, 50), pct(end, 100)],
            "phases_p50_p100": {k: [pct(v, 50), pct(v, 100)] for k, v in phases.items()},
            "ctas_per_sm_max": int(np.bincount(tl[c][:, SLOT["sm"]].astype(np.int64)).max()),
        })
    gaps = [(per_call[c + 1]["t0_ns"] - per_call[c]["t0_ns"]) / 1000.0 - per_call[c]["span"]
            for c in range(calls - 1)]
    starts = [(per_call[c + 1]["t0_ns"] - per_call[c]["t0_ns"]) / 1000.0 for c in range(calls - 1)]
    steady = per_call[1:] if calls > 1 else per_call
    mean_phase = {k: float(np.mean([p["phases_p50_p100"][k][0] for p in steady]))
                  for k in steady[0]["phases_p50_p100"]}
    # per iteration (steady calls): its length (to the next iteration's start or the warp's loop
    # end) and the wait for its scales, medians over warps and CTAs
    it_len, it_scale = [], []
    for k in range(ITERS):
        st = iters[1:, :, :, k, 0]
        nxt = iters[1:, :, :, k + 1, 0] if k + 1 < ITERS else np.zeros_like(st)
        nxt = np.where(nxt > 0, nxt, loop_ends[1:])
        ok = st > 0
        if not ok.any():
            break
        it_len.append(float(np.median(us(nxt - st)[ok])))
        it_scale.append(float(np.median(us(iters[1:, :, :, k, 1] - st)[ok])))
    # a kernel's own finer marks (slots 9..15: v4's, EXTRA_NAMES): median us from the CTA's start
    steady_tl = tl[1:] if calls > 1 else tl
    extra = {}
    for k in range(7):
        v = steady_tl[:, :, SLOT["extra"] + k]
        if (v > 0).any():
            extra[k] = float(np.median(us(v - steady_tl[:, :, SLOT["start"]])[v > 0]))
    # Across calls: call c's weight-independent work waits (PDL) for every CTA of call c - 1, so
    # its time is set by its slowest CTA after that release (release: call c - 1's last end in
    # global ns). Per steady call: the release -> waited latency and each CTA's end after the
    # release, as percentiles; and the tiles of the CTAs ending last (as the kernel splits them).
    tiles_total = (meta["N"] + 15) // 16
    G = meta["ctas"] // meta.get("v4_kparts", 1)  # (timeline CTA = blockIdx.y G + blockIdx.x)
    cta_tiles = np.array([((b % G + 1) * tiles_total) // G - ((b % G) * tiles_total) // G
                          for b in range(meta["ctas"])])
    after_release, waited_lag, late_tiles = [], [], []
    for c in range(1, calls):
        release = tl[c - 1, :, SLOT["end_ns"]].max()
        t = tl[c]
        waited_ns = global_ns(t, t[:, SLOT["waited"]], ghz)
        ends = (t[ended[c], SLOT["end_ns"]] - release) / 1000.0
        after_release.append([pct(ends, q) for q in (0, 50, 90, 100)])
        waited_lag.append([pct((waited_ns - release) / 1000.0, q) for q in (0, 50, 100)])
        late = np.argsort(ends)[-max(1, len(ends) // 10):]
        late_tiles.extend(cta_tiles[ended[c]][late].tolist())
    release_summary = {
        "end_after_release_p0_p50_p90_p100": np.mean(after_release, axis=0).tolist()
        if after_release else None,
        "waited_after_release_p0_p50_p100": np.mean(waited_lag, axis=0).tolist()
        if waited_lag else None,
        "tiles_of_last_tenth": {int(k): int(v) for k, v in
                                zip(*np.unique(late_tiles, return_counts=True))},
        "tiles_all": {int(k): int(v) for k, v in zip(*np.unique(cta_tiles, return_counts=True))},
    }
    copy_rate = meta.get("copy_gbs")
    return {
        "after_release": release_summary,
        "by_start_quarter": by_start_quarter(tl, ghz),
        **meta,
        "sm_ghz": ghz,
        "pct_copy_nf4": (100.0 * meta["packed_bytes"] / (meta["us_nf4"] * 1e3) / copy_rate
                         if copy_rate else None),
        "span_mean": float(np.mean([p["span"] for p in steady])),
        "call_to_call_start_mean": float(np.mean(starts)) if starts else None,
        "gap_end_to_next_start_mean": float(np.mean(gaps)) if gaps else None,
        "phase_median_mean": mean_phase,
        "extra_marks_us_from_start": extra,
        "iteration_us_median": it_len,
        "iteration_scales_wait_us_median": it_scale,
        "calls_detail": per_call,
    }


def main():
    out_dir = sys.argv[1] if len(sys.argv) > 1 else "/tmp/nf4-timeline"
    os.makedirs(out_dir, exist_ok=True)
    exe = os.environ.get("EXE") or build(out_dir)
    if os.environ.get("BUILD_ONLY"):
        return
    sys.path.insert(0, HERE)
    from common import copy_bandwidth_gbps  # the copy rate every bench's "% copy" uses

    rate = copy_bandwidth_gbps()
    calls = int(os.environ.get("CALLS", "8"))
    results = []
    for case in os.environ.get("CASES", DEFAULT_CASES).split(";"):
        args = case.split()
        if not args:
            continue
        binp = os.path.join(out_dir, "tl.bin")  # 40 MB, rewritten per case, removed at the end
        proc = subprocess.run([exe, args[0], args[1], args[2], str(calls), args[3], binp] + args[4:],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"case {case}: rc {proc.returncode} {proc.stderr.strip()}")
            continue
        meta = json.loads(proc.stdout.strip().splitlines()[-1])
        meta["copy_gbs"] = rate
        raw = np.fromfile(binp, dtype=np.uint64)
        try:
            s = summarise(meta, raw)
        except ValueError as e:
            print(f"case {case}: {e}")
            continue
        np.savez_compressed(os.path.join(out_dir, "tl_M{}_{}_{}_f{}.npz".format(*args[:4])),
                            tl=raw.reshape(-1, meta["timeline_ctas"], meta["timeline_slots"])[
                                :calls, :meta["ctas"]])
        results.append(s)
        ph = s["phase_median_mean"]
        print(f"M={s['M']:2d} {s['K']}->{s['N']} frozen={s['frozen']} kparts={s['v3_kparts']} "
              f"v4_kparts={s.get('v4_kparts', 1)} "
              f"splits={s['v3_splits']} ctas={s['ctas']}: {s['us_nf4']:.2f} us/call "
              f"({s['pct_copy_nf4']:.1f}% copy); loads only: v3 pattern {s['us_v3_loads4']:.2f} "
              f"(8 ahead {s['us_v3_loads8']:.2f}, L2 256B {s['us_v3_loads256']:.2f}, bulk "
              f"prefetch {s['us_v3_loads_prefetch']:.2f}), tile-contiguous {s['us_tiled1']:.2f}, "
              f"row pieces of 64 / 128 / 512 B {s['us_rows64B']:.2f} / {s['us_rows128B']:.2f} / "
              f"{s['us_rows512B']:.2f}; "
              f"span {s['span_mean']:.2f}, call-to-call "
              f"{s['call_to_call_start_mean']:.2f}, SM {s['sm_ghz']:.2f} GHz")
        print("   phases (median CTA, us): " + ", ".join(f"{k} {v:.2f}" for k, v in ph.items()))
        if s["extra_marks_us_from_start"]:
            marks = s["extra_marks_us_from_start"]
            print("   finer marks (us from the CTA's start): " + ", ".join(
                f"{EXTRA_NAMES.get(k, k)} {v:.2f}" for k, v in marks.items()))
        print("   iterations (us): " + " ".join(f"{v:.2f}" for v in s["iteration_us_median"])
              + "; of which waiting for scales: "
              + " ".join(f"{v:.2f}" for v in s["iteration_scales_wait_us_median"]))
        r = s["after_release"]
        if r["end_after_release_p0_p50_p90_p100"]:
            print("   after call c - 1's last CTA ended (us, steady calls' mean): waited p0/p50/p100 "
                  + "/".join(f"{v:.2f}" for v in r["waited_after_release_p0_p50_p100"])
                  + ", CTA ends p0/p50/p90/p100 "
                  + "/".join(f"{v:.2f}" for v in r["end_after_release_p0_p50_p90_p100"])
                  + f"; tiles per CTA {r['tiles_all']}, of the last tenth {r['tiles_of_last_tenth']}")
        if s["by_start_quarter"]:
            print("   CTAs by start (medians, us after the previous call ended): " + "; ".join(
                f"{name}: " + " ".join(f"{m} {v:.2f}" for m, v in marks.items() if v is not None)
                for name, marks in s["by_start_quarter"].items()))
        d = s["calls_detail"][min(1, len(s["calls_detail"]) - 1)]
        print(f"   call 1: starts p50/p100 {d['start_p50_p100'][0]:.2f}/{d['start_p50_p100'][1]:.2f}, "
              f"ends p0/p50/p100 {d['end_p0_p50_p100'][0]:.2f}/{d['end_p0_p50_p100'][1]:.2f}/"
              f"{d['end_p0_p50_p100'][2]:.2f}; max phases: "
              + ", ".join(f"{k} {v[1]:.2f}" for k, v in d["phases_p50_p100"].items()))
    if os.path.exists(os.path.join(out_dir, "tl.bin")):
        os.remove(os.path.join(out_dir, "tl.bin"))
    with open(os.path.join(out_dir, "timeline.json"), "w") as f:
        json.dump({"copy_gbs": rate, "cases": results}, f, indent=1)


if __name__ == "__main__":
    main()
