"""Summary of an Nsight Compute source page (SASS, CSV; bench/nf4_ncu_source.sh): instructions
executed and warp-stall samples by opcode, the instructions with the most samples, and (where
the page has the column) those with the most excess shared-memory wavefronts (bank conflicts).

    python bench/ncu_sass_summary.py sass.csv [TOP]
"""
import csv
import sys
from collections import Counter


def number(text):
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def main(path, top=30):
    with open(path, newline="") as f:
        lines = f.read().splitlines()
    start = next(i for i, line in enumerate(lines) if "Source" in line and "Address" in line)
    rows = list(csv.DictReader(lines[start:]))
    columns = rows[0].keys()
    executed = next(c for c in columns if c.startswith("Instructions Executed"))
    samples = next(c for c in columns if c.startswith("Warp Stall Sampling (All"))
    reasons = [c for c in columns if c.startswith("stall_")]
    print(f"{len(rows)} instructions; columns: {executed!r}, {samples!r}, {len(reasons)} reasons")
    by_op_exec, by_op_samples = Counter(), Counter()
    for r in rows:
        op = r["Source"].split()[0] if r["Source"].split() else "?"
        if op.startswith("@"):
            op = r["Source"].split()[1]
        op = op.split(".")[0]
        by_op_exec[op] += number(r[executed])
        by_op_samples[op] += number(r[samples])
    total_exec, total_samples = sum(by_op_exec.values()), sum(by_op_samples.values())
    print(f"executed {total_exec:.0f}, samples {total_samples:.0f}")
    for op, n in by_op_exec.most_common(20):
        print(f"  {op:10s} exec {n:10.0f} ({100 * n / total_exec:4.1f}%)"
              f"  samples {100 * by_op_samples[op] / max(total_samples, 1):4.1f}%")
    print("top instructions by samples (index, address, samples, executed, top reasons, source):")
    ranked = sorted(enumerate(rows), key=lambda ir: -number(ir[1][samples]))[:top]
    for i, r in ranked:
        why = sorted(((number(r[c]), c[6:]) for c in reasons), reverse=True)[:2]
        why = " ".join(f"{c}={v:.0f}" for v, c in why if v)
        print(f"  {i:5d} {r['Address']:>6s} {number(r[samples]):6.0f} {number(r[executed]):8.0f}"
              f"  {why:40s} {r['Source'][:60]}")
    excess = next((c for c in columns if c.startswith("L1 Wavefronts Shared Excessive")), None)
    if excess:
        total = sum(number(r[excess]) for r in rows)
        print(f"excess shared-memory wavefronts {total:.0f}; top instructions (index, address, "
              "excess, executed, source):")
        for i, r in sorted(enumerate(rows), key=lambda ir: -number(ir[1][excess]))[:top]:
            if number(r[excess]) > 0:
                print(f"  {i:5d} {r['Address']:>6s} {number(r[excess]):8.0f} "
                      f"{number(r[executed]):8.0f}  {r['Source'][:70]}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 30)
