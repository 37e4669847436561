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


def _add_train_args(p):
    a = p.add_argument
    a("--config", help="YAML or JSON file with the options below (command-line flags win)")
    a("--model", help="hub id or local directory (default: the embedded random-init model)")
    a("--data", help="JSON/JSONL file or a datasets name (default: the embedded task)")
    a("--format", choices=["auto", "alpaca", "sharegpt", "chatml", "text"])
    a("--chat-template", help="e.g. chatml, llama-3.1, qwen-2.5, gemma-3")
    a("--load-in-4bit", action="store_true", default=None, help="QLoRA (bitsandbytes NF4)")
    a("--max-seq-length", type=int)
    a("--lora-r", type=int)
    a("--lora-alpha", type=int)
    a("--target-modules", help="comma-separated, e.g. q_proj,v_proj")
    a("--max-steps", type=int)
    a("--epochs", type=float)
    a("--batch-size", type=int)
    a("--grad-accum", type=int)
    a("--lr", type=float)
    a("--packing", action="store_true", default=None)
    a("--responses-only", action=argparse.BooleanOptionalAction, default=None,
      help="train only on assistant turns (default on)")
    a("--output", help="output directory (default fastft_output)")
    a("--overwrite", action="store_true", default=None, help="replace a non-empty --output")
    a("--save", action="append", help="extra export: merged_16bit, merged_4bit, gguf:q4_k_m "
      "(repeatable; gguf:q8_0+q4_k_m writes several)")
    a("--eval-examples", type=int)
    a("--seed", type=int)
    a("--gradient-checkpointing", choices=["none", "true", "unsloth", "offload"])


def _train_config(args):
    from fastft.train import TrainConfig, load_config_file

    values = load_config_file(args.config) if args.config else {}
    for key in ("model", "data", "format", "chat_template", "load_in_4bit", "max_seq_length",
                "lora_r", "lora_alpha", "target_modules", "max_steps", "epochs", "batch_size",
                "grad_accum", "lr", "packing", "responses_only", "output", "overwrite", "save",
                "eval_examples", "seed", "gradient_checkpointing"):
        value = getattr(args, key, None)
        if value is not None:
            values[key] = value
    if isinstance(values.get("target_modules"), str):
        values["target_modules"] = [m.strip() for m in values["target_modules"].split(",") if m.strip()]
    if isinstance(values.get("save"), str):
        values["save"] = [values["save"]]
    if values.get("gradient_checkpointing") == "true":
        values["gradient_checkpointing"] = True
    if values.get("model") is None and values.get("data") is None:
        return TrainConfig.embedded_default(**values)
    return TrainConfig(**values)


def _cmd_train(args) -> int:
    from fastft.train import UsageError, run

    try:
        run(_train_config(args))
    except UsageError as exc:
        print(f"fastft train: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _cmd_export(args) -> int:
    from pathlib import Path

    from fastft.train import UsageError, export

    try:
        if not os.path.isdir(args.adapter):
            raise UsageError(f"{args.adapter!r} is not a directory (give the adapter folder "
                             "written by `fastft train`, e.g. fastft_output/adapter)")
        from fastft import FastLanguageModel

        model, tokenizer = FastLanguageModel.from_pretrained(args.adapter)
        out = Path(args.output)
        for item in args.save:
            print(f"{item}: {export(model, tokenizer, item, out, overwrite=args.overwrite)}")
    except UsageError as exc:
        print(f"fastft export: error: {exc}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastft", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="fine-tune (no arguments: the embedded default job)")
    _add_train_args(p)
    p.set_defaults(func=_cmd_train)
    p = sub.add_parser("export", help="merge / convert a trained adapter (merged, GGUF)")
    p.add_argument("adapter", help="adapter folder written by `fastft train`")
    p.add_argument("--save", action="append", required=True,
                   help="merged_16bit, merged_4bit, gguf:q4_k_m ... (repeatable)")
    p.add_argument("--output", default="fastft_export")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_export)
    p = sub.add_parser("env", help="versions, GPU, and the backend each op will use")
    p.set_defaults(func=_cmd_env)
    p = sub.add_parser("bench", help="run the GPU micro-benchmarks in bench/")
    p.add_argument("pytest_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=_cmd_bench)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
