"""The main job behind `fastft train`: load, tokenise, LoRA fine-tune, evaluate, save, export.

With no model and no data it runs the embedded default: a small random-init Llama built from the
config shipped in fastft/configs/, the tokenizer and the arithmetic data set shipped in
fastft/assets/, so it needs no network and shows the task being learned (accuracy before and
after) within a few minutes on a CPU."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_MODEL_CONFIG = CONFIG_DIR / "default_model.json"
SAVE_CHOICES = ("lora", "merged_16bit", "merged_4bit", "gguf:<method>")


class UsageError(Exception):
    """Bad input from the user: printed as one clear message, exit code 2."""


@dataclasses.dataclass
class TrainConfig:
    model: str | None = None          # hub id or local dir; None = the embedded default model
    data: str | None = None           # JSON/JSONL file or a datasets name; None = embedded task
    format: str = "auto"              # auto | alpaca | sharegpt | chatml | text
    chat_template: str | None = None  # e.g. chatml, llama-3.1; default: the tokenizer's own
    load_in_4bit: bool = False
    max_seq_length: int = 512
    lora_r: int = 16
    lora_alpha: int = 32
    target_modules: list | None = None
    max_steps: int | None = None
    epochs: float = 1.0
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-4
    packing: bool = False
    responses_only: bool = True
    output: str = "fastft_output"
    overwrite: bool = False
    save: list = dataclasses.field(default_factory=list)  # extra exports: merged_16bit, gguf:q8_0...
    eval_examples: int = 40
    seed: int = 3407
    gradient_checkpointing: str = "unsloth"

    @classmethod
    def embedded_default(cls, **overrides):
        """The default job: tuned so the shipped addition task is visibly learned on a CPU."""
        # Measured on the 2-core CPU machine: 47 s, held-out accuracy 0% -> 72.5%.
        base = dict(max_steps=600, batch_size=16, lr=3e-3, lora_r=16, lora_alpha=32,
                    max_seq_length=64, eval_examples=40, gradient_checkpointing="none")
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)


def load_config_file(path: str) -> dict:
    """Keys of a YAML or JSON config file, with dashes allowed in key names."""
    if not os.path.isfile(path):
        raise UsageError(f"config file {path!r} does not exist")
    text = open(path, encoding="utf-8").read()
    if path.endswith(".json"):
        data = json.loads(text)
    else:
        import yaml

        data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise UsageError(f"config file {path!r} must hold a mapping of option: value")
    data = {k.replace("-", "_"): v for k, v in data.items()}
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UsageError(f"config file {path!r} has unknown keys {unknown}; known keys: "
                         f"{sorted(known)}")
    return data


# ------------------------------------------------------------------------------ validation

def validate(cfg: TrainConfig) -> None:
    """Checks that need no model: fail before minutes of loading, never after."""
    if cfg.data and not os.path.exists(cfg.data) and (cfg.data.endswith((".json", ".jsonl"))
                                                       or os.sep in cfg.data):
        raise UsageError(f"data file {cfg.data!r} does not exist (give a JSON/JSONL file or a "
                         "datasets name)")
    if cfg.format not in ("auto", "alpaca", "sharegpt", "chatml", "text"):
        raise UsageError(f"--format {cfg.format!r}: use auto, alpaca, sharegpt, chatml or text")
    out = Path(cfg.output)
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise UsageError(f"output directory {str(out)!r} is not empty; pass --overwrite to "
                         "replace what is there, or choose another --output")
    for item in cfg.save:
        if item not in ("lora", "merged_16bit", "merged_4bit") and not item.startswith("gguf:"):
            raise UsageError(f"--save {item!r}: use one of {', '.join(SAVE_CHOICES)}")
    if cfg.load_in_4bit:
        problem = bitsandbytes_problem()
        if problem:
            raise UsageError(f"--load-in-4bit needs bitsandbytes, which cannot run here: {problem}."
                             " Drop --load-in-4bit (16-bit LoRA) or install a working bitsandbytes.")
    if cfg.batch_size < 1 or cfg.grad_accum < 1 or cfg.max_seq_length < 8:
        raise UsageError("--batch-size and --grad-accum must be >= 1 and --max-seq-length >= 8")


def bitsandbytes_problem() -> str | None:
    try:
        import bitsandbytes  # noqa: F401
        import bitsandbytes.functional as bnbf
        import torch

        w = torch.randn(64, 64)
        q, state = bnbf.quantize_4bit(w, quant_type="nf4")
        bnbf.dequantize_4bit(q, state)
    except Exception as exc:  # missing, or no kernels for this platform
        return f"{type(exc).__name__}: {exc}"
    return None


# ------------------------------------------------------------------------------ model

def build_default_model(tokenizer, folder: Path, seed: int) -> str:
    """Random-init Llama from the shipped config, saved to `folder` so the normal loader (and a
    later `fastft export`) read it like any local checkpoint."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = json.loads(DEFAULT_MODEL_CONFIG.read_text())
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = LlamaConfig(**spec, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=eos)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


# ------------------------------------------------------------------------------ data

def load_records(cfg: TrainConfig) -> list[dict]:
    from fastft import data as fdata

    if cfg.data is None:
        from fastft.assets import load_default_dataset

        return load_default_dataset()
    if os.path.exists(cfg.data):
        try:
            return fdata.load_json_dataset(cfg.data)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    try:
        import datasets

        return list(datasets.load_dataset(cfg.data, split="train"))
    except Exception as exc:
        raise UsageError(f"could not load data set {cfg.data!r}: {exc}") from None


def to_conversations(records: list[dict], fmt: str):
    """(kind, rows): kind 'text' with rows of strings, or 'chat' with rows of message lists."""
    from fastft import data as fdata

    try:
        detected = fdata.detect_format(records)
    except ValueError as exc:
        raise UsageError(f"the data set matches no known format: {exc}") from None
    if fmt != "auto" and fmt != detected:
        raise UsageError(f"--format {fmt} was asked for, but the data looks like {detected}; "
                         f"use --format {detected} or --format auto")
    if detected == "text":
        return "text", [str(r["text"]) for r in records]
    return "chat", [r["messages"] for r in fdata.to_chatml(records)]


def tokenise_chat(tokenizer, conversation, max_len: int, responses_only: bool):
    """input_ids and a completion mask (1 on assistant tokens) for one conversation.

    Renders growing prefixes of the conversation with the chat template, so the assistant spans
    are exactly what the template produces for each assistant turn."""
    ids: list[int] = []
    mask: list[int] = []
    for i, turn in enumerate(conversation):
        text = tokenizer.apply_chat_template(conversation[: i + 1], tokenize=False)
        if turn["role"] == "assistant":
            prompt = tokenizer.apply_chat_template(conversation[:i], tokenize=False,
                                                   add_generation_prompt=True)
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            new_prompt = prompt_ids[len(ids):]
            ids += new_prompt
            mask += [0] * len(new_prompt)
        full_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        new = full_ids[len(ids):]
        ids += new
        mask += [1 if (turn["role"] == "assistant" or not responses_only) else 0] * len(new)
    return ids[:max_len], mask[:max_len]


def tokenise(tokenizer, kind, rows, cfg: TrainConfig, progress) -> list[dict]:
    out = []
    for row in progress(rows, desc="tokenising", unit="ex"):
        if kind == "text":
            ids = tokenizer(row, add_special_tokens=True)["input_ids"][: cfg.max_seq_length]
            mask = [1] * len(ids)
        else:
            ids, mask = tokenise_chat(tokenizer, row, cfg.max_seq_length, cfg.responses_only)
        if any(mask):
            out.append({"input_ids": ids, "completion_mask": mask})
    if not out:
        raise UsageError("after tokenising, no example has a token to learn from (every label "
                         "would be masked); check --format / --chat-template / --max-seq-length")
    return out


# ------------------------------------------------------------------------------ evaluation

def answer_accuracy(model, tokenizer, conversations, max_new_tokens=8) -> float:
    """Exact match of the greedy answer to the first assistant turn, given the turns before."""
    import torch

    eos = [t for t in {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
           if isinstance(t, int) and t >= 0]
    was_training = model.training
    model.eval()
    correct = 0
    device = next(model.parameters()).device
    with torch.no_grad():
        for conv in conversations:
            k = next(i for i, t in enumerate(conv) if t["role"] == "assistant")
            prompt = tokenizer.apply_chat_template(conv[:k], tokenize=False,
                                                   add_generation_prompt=True)
            ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
            out = model.generate(input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device),
                                 max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=eos)
            text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
            correct += text == conv[k]["content"].strip()
    if was_training:
        model.train()
    return correct / max(1, len(conversations))


# ------------------------------------------------------------------------------ the job

def run(cfg: TrainConfig, log=print) -> dict:
    """Runs the whole job; returns the summary it prints. Raises UsageError on bad input."""
    import torch
    from tqdm.auto import tqdm

    validate(cfg)
    t_start = time.time()
    random.seed(cfg.seed)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    from fastft import FastLanguageModel

    # ---- model and tokenizer
    stage = tqdm(total=4, desc="loading", unit="step", leave=False)
    if cfg.model is None:
        from fastft.assets import load_default_tokenizer

        tokenizer = load_default_tokenizer()
        model_path = build_default_model(tokenizer, out / "base_model", cfg.seed)
        log(f"model: embedded default (random-init Llama from {DEFAULT_MODEL_CONFIG.name}), "
            f"saved to {model_path}")
    else:
        model_path = cfg.model
    stage.update(1)
    try:
        model, tokenizer = FastLanguageModel.from_pretrained(
            model_path, max_seq_length=cfg.max_seq_length, load_in_4bit=cfg.load_in_4bit)
    except (OSError, ValueError) as exc:
        raise UsageError(f"could not load model {model_path!r}: {exc}") from None
    stage.update(1)
    if cfg.chat_template:
        from fastft import get_chat_template

        try:
            tokenizer = get_chat_template(tokenizer, chat_template=cfg.chat_template)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    elif tokenizer.chat_template is None:
        from fastft import get_chat_template

        tokenizer = get_chat_template(tokenizer, chat_template="chatml")
    stage.update(1)

    # ---- data
    kind, rows = to_conversations(load_records(cfg), cfg.format)
    rng = random.Random(cfg.seed)
    order = list(range(len(rows)))
    rng.shuffle(order)
    n_eval = min(cfg.eval_examples, len(rows) // 5) if kind == "chat" else 0
    eval_rows = [rows[i] for i in order[:n_eval]]
    train_rows = [rows[i] for i in order[n_eval:]]
    train_set = tokenise(tokenizer, kind, train_rows, cfg, tqdm)
    stage.update(1)
    stage.close()
    n_tokens = sum(len(r["input_ids"]) for r in train_set)
    log(f"data: {len(train_set)} training examples ({n_tokens} tokens, {kind}), "
        f"{len(eval_rows)} held out for evaluation")

    # ---- LoRA
    try:
        model = FastLanguageModel.get_peft_model(
            model, r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0, bias="none",
            target_modules=cfg.target_modules or ["q_proj", "k_proj", "v_proj", "o_proj",
                                                  "gate_proj", "up_proj", "down_proj"],
            use_gradient_checkpointing=False if cfg.gradient_checkpointing == "none"
            else cfg.gradient_checkpointing, random_state=cfg.seed)
    except ValueError as exc:
        raise UsageError(str(exc)) from None

    acc_before = answer_accuracy(model, tokenizer, eval_rows) if eval_rows else None
    if acc_before is not None:
        log(f"accuracy before training: {acc_before:.1%} on {len(eval_rows)} held-out examples")

    # ---- train
    stats = train_with_trl(model, tokenizer, train_set, cfg, out)

    acc_after = answer_accuracy(model, tokenizer, eval_rows) if eval_rows else None
    if acc_after is not None:
        log(f"accuracy after training:  {acc_after:.1%}")

    # ---- save and export
    saved = {}
    adapter_dir = out / "adapter"
    model.save_pretrained(str(adapter_dir))
    tokenizer.save_pretrained(str(adapter_dir))
    saved["lora"] = str(adapter_dir)
    for item in tqdm(cfg.save, desc="export", unit="file", disable=not cfg.save):
        saved[item] = export(model, tokenizer, item, out, overwrite=cfg.overwrite)

    summary = {
        "model": cfg.model or "embedded default",
        "train_examples": len(train_set),
        "steps": stats["steps"],
        "first_loss": stats["first_loss"],
        "final_loss": stats["final_loss"],
        "tokens_per_second": stats["tokens_per_second"],
        "peak_memory_gib": stats["peak_memory_gib"],
        "accuracy_before": acc_before,
        "accuracy_after": acc_after,
        "saved": saved,
        "seconds": round(time.time() - t_start, 1),
        "device": str(next(model.parameters()).device),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    log("summary:")
    for key, value in summary.items():
        if isinstance(value, float):
            value = f"{value:.4g}"
        log(f"  {key:<18} {value}")
    return summary


def export(model, tokenizer, item: str, out: Path, overwrite: bool) -> str:
    if item.startswith("gguf:"):
        method = item.split(":", 1)[1]
        files = model.save_pretrained_gguf(str(out / "gguf"), tokenizer,
                                           quantization_method=method.split("+"))
        return ", ".join(files)
    return model.save_pretrained_merged(str(out / item), tokenizer, save_method=item,
                                        overwrite=overwrite)


def train_with_trl(model, tokenizer, train_set, cfg: TrainConfig, out: Path) -> dict:
    """SFTTrainer on the pre-tokenised set; completion_mask keeps the loss on the responses."""
    import datasets
    import torch
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    steps_per_epoch = math.ceil(len(train_set) / (cfg.batch_size * cfg.grad_accum))
    max_steps = cfg.max_steps or max(1, int(steps_per_epoch * cfg.epochs))
    on_gpu = torch.cuda.is_available()
    bf16 = on_gpu and torch.cuda.is_bf16_supported()
    args = SFTConfig(
        output_dir=str(out / "checkpoints"), max_steps=max_steps,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.lr,
        lr_scheduler_type="linear", warmup_steps=min(5, max_steps // 10), logging_steps=max(1, max_steps // 10),
        save_strategy="no", report_to="none", seed=cfg.seed, bf16=bf16, fp16=on_gpu and not bf16,
        max_length=cfg.max_seq_length, packing=cfg.packing, completion_only_loss=True,
        include_num_input_tokens_seen=True, dataloader_pin_memory=on_gpu,
        disable_tqdm=False,
    )
    from fastft.distributed import one_gpu_per_process

    one_gpu_per_process(args)
    record = {"losses": []}

    class Progress(TrainerCallback):
        """Adds tokens/s and peak memory to each logged line (shown by the progress bar)."""

        def on_train_begin(self, args, state, control, **kw):
            record["t0"] = time.time()
            if on_gpu:
                torch.cuda.reset_peak_memory_stats()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs is None or "loss" not in logs:
                return
            record["losses"].append(logs["loss"])
            elapsed = max(time.time() - record["t0"], 1e-9)
            logs["tokens_per_s"] = round(state.num_input_tokens_seen / elapsed, 1)
            if on_gpu:
                logs["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)

    trainer = SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(train_set),
                         processing_class=tokenizer, callbacks=[Progress()])
    from fastft.trainer import frozen_gc

    with frozen_gc():
        result = trainer.train()
    elapsed = time.time() - record["t0"]
    losses = record["losses"] or [result.training_loss]
    return {
        "steps": trainer.state.global_step,
        "first_loss": losses[0],
        "final_loss": losses[-1],
        "tokens_per_second": trainer.state.num_input_tokens_seen / max(elapsed, 1e-9),
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None,
    }
