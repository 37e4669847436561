"""Print a benchmark JSON (from bench/device.sh) as the markdown table used in RESULTS.md, and
optionally save it under bench/results/ with the commit and date.

    python bench/summarize.py OUT/kernels.json [--save]"""
import argparse
import datetime
import json
import os
import subprocess

BASELINES = ("torch_compile", "torch_eager")


def table(data):
    rows = data["rows"]
    by_key = {}
    for r in rows:
        by_key.setdefault((r["op"], r.get("direction", ""), r["shape"]), {})[r["backend"]] = r
    lines = ["| op | direction | shape | backend | time (ms) | GB/s | % copy BW | vs torch.compile |",
             "|---|---|---|---|---|---|---|---|"]
    for (op, direction, shape), group in by_key.items():
        base = group.get("torch_compile")
        for backend, r in group.items():
            frac = f"{100 * r['frac_copy_bw']:.1f}%" if "frac_copy_bw" in r else "-"
            gbps = (f"{r['gbps']:.0f}" if "gbps" in r else
                    f"{r['tflops']:.0f} TFLOP/s" if "tflops" in r else r.get("unsupported", "-"))
            ratio = f"{base['ms'] / r['ms']:.2f}x" if base else "-"
            lines.append(f"| {op} | {direction} | {shape} | {backend} | {r['ms']:.4f} | {gbps} | "
                         f"{frac} | {ratio} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("json")
    ap.add_argument("--save", action="store_true", help="copy into bench/results/ with metadata")
    args = ap.parse_args()
    data = json.load(open(args.json))
    print(f"GPU: {data['gpu']}  measured copy bandwidth: {data['copy_gbps']:.0f} GB/s")
    print(table(data))
    if args.save:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                                capture_output=True, text=True).stdout.strip()
        now = datetime.datetime.now(datetime.timezone.utc)
        data.update(commit=commit, date=now.isoformat(timespec="seconds"))
        name = os.path.join(root, "bench", "results",
                            f"{now:%Y%m%d-%H%M}-{os.path.basename(args.json)}")
        with open(name, "w") as f:
            json.dump(data, f, indent=1)
        print("saved", name)


if __name__ == "__main__":
    main()
