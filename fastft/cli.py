"""The `fastft` command (also `python -m fastft`)."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys


def _cmd_env(args) -> int:
    from fastft import env

    return env.main()


def _cmd_bench(args) -> int:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    bench = os.path.join(root, "bench")
    if not os.path.isdir(bench):
        print("fastft bench: no bench/ directory next to this installation (run it from a "
              "source checkout)", file=sys.stderr)
        return 2
    cmd = [sys.executable, "-m", "pytest", bench, "-q", "-o", "python_files=bench_*.py",
           "-o", "python_functions=bench_*", *args.pytest_args]
    return subprocess.call(cmd, cwd=root)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastft", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("env", help="versions, GPU, and the backend each op will use")
    p.set_defaults(func=_cmd_env)
    p = sub.add_parser("bench", help="run the GPU micro-benchmarks in bench/")
    p.add_argument("pytest_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=_cmd_bench)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
