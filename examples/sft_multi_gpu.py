"""LoRA / QLoRA supervised fine-tuning of a FastLanguageModel on several GPUs with TRL's SFTTrainer,
data-parallel (DDP) or sharded (FSDP2). One process per GPU; every process runs this script.

    torchrun --nproc_per_node 2 examples/sft_multi_gpu.py                          # DDP
    torchrun --nproc_per_node 2 examples/sft_multi_gpu.py --fsdp                   # FSDP2
    accelerate launch --config_file examples/accelerate_ddp.yaml examples/sft_multi_gpu.py
    accelerate launch --config_file examples/accelerate_fsdp2.yaml examples/sft_multi_gpu.py
    python examples/sft_multi_gpu.py                                               # one GPU

--data takes a .jsonl / .json file of {"messages": [{"role": ..., "content": ...}, ...]}
conversations; without it the small task shipped with fastft is used. See examples/README.md.
"""
from __future__ import annotations

import argparse
import os
import sys

# fastft first, so its patches are in place before transformers / peft / trl are imported
from fastft import FastLanguageModel, get_chat_template, is_bf16_supported
from fastft import distributed as fd


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="unsloth/Llama-3.2-1B-Instruct", help="hub id or local directory")
    p.add_argument("--data", default=None, help="conversations (.jsonl/.json); default: fastft's shipped task")
    p.add_argument("--output-dir", default="outputs/sft_multi_gpu")
    p.add_argument("--fsdp", action="store_true",
                   help="shard with FSDP2 when started by torchrun (with accelerate launch, the config file decides)")
    p.add_argument("--load-in-4bit", action="store_true", help="QLoRA")
    p.add_argument("--max-seq-length", type=int, default=2048)
    p.add_argument("--r", type=int, default=16, help="LoRA rank")
    p.add_argument("--checkpointing", default="unsloth", choices=["unsloth", "true", "false"],
                   help="gradient checkpointing: unsloth = fastft's offloaded one, true = transformers'")
    p.add_argument("--batch-size", type=int, default=2, help="per GPU")
    p.add_argument("--grad-accum", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--max-steps", type=int, default=60)
    p.add_argument("--seed", type=int, default=3407)
    p.add_argument("--chat-template", default="chatml",
                   help="installed when the tokenizer has no chat template of its own")
    return p.parse_args(argv)


def load_conversations(path):
    from fastft.data import load_json_dataset

    if path is None:
        from fastft.assets import load_default_dataset

        return load_default_dataset()
    return load_json_dataset(path)


def main(argv=None):
    args = parse_args(argv)
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    on_gpu = torch.cuda.is_available()
    by_accelerate_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if args.fsdp and by_accelerate_fsdp:
        print("note: FSDP comes from the accelerate config file; --fsdp is not needed.", file=sys.stderr)
    if args.fsdp and not on_gpu:
        print("note: accelerate shards with FSDP only on GPUs; on the CPU the Trainer runs DDP.", file=sys.stderr)
    dtype = torch.bfloat16 if on_gpu and is_bf16_supported() else (torch.float16 if on_gpu else torch.float32)

    # Each process loads the whole model onto its own GPU (device_map={"": LOCAL_RANK});
    # FSDP2 then keeps only this process's shard. QLoRA under several processes stores the
    # packed 4-bit weights as `dtype` so FSDP2 can shard them (DDP does not mind either way).
    load = dict(max_seq_length=args.max_seq_length, dtype=dtype, load_in_4bit=args.load_in_4bit,
                device_map=fd.distributed_device_map())
    storage = fd.bnb_4bit_quant_storage(dtype)
    if args.load_in_4bit and storage is not None:
        from transformers import BitsAndBytesConfig

        load["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=storage)
    model, tokenizer = FastLanguageModel.from_pretrained(args.model, **load)
    checkpointing = {"unsloth": "unsloth", "true": True, "false": False}[args.checkpointing]
    model = FastLanguageModel.get_peft_model(model, r=args.r, lora_alpha=args.r, lora_dropout=0.0,
                                             use_gradient_checkpointing=checkpointing, random_state=args.seed)
    if getattr(tokenizer, "chat_template", None) is None:
        tokenizer = get_chat_template(tokenizer, chat_template=args.chat_template, model=model)

    conversations = [{"messages": row["messages"]} for row in load_conversations(args.data)]
    train_set = Dataset.from_list(conversations)

    config = SFTConfig(
        output_dir=args.output_dir,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        max_steps=args.max_steps,
        lr_scheduler_type="linear",
        warmup_steps=min(5, args.max_steps // 10),
        logging_steps=1,
        seed=args.seed,
        max_length=args.max_seq_length,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu=not on_gpu,
        # fastft already set up checkpointing in get_peft_model; the Trainer must not replace it
        gradient_checkpointing=False,
        save_strategy="no",
        report_to="none",
        # DDP: every LoRA weight is used each step (no unused-parameter search); FSDP2 under
        # torchrun: shard each decoder layer, the root keeps embeddings, norm and lm_head
        **fd.trainer_distributed_kwargs(model, fsdp=args.fsdp and not by_accelerate_fsdp),
    )
    # started by plain `python` with several GPUs visible: train on one (the Trainer would use
    # nn.DataParallel, which SFTTrainer refuses)
    fd.one_gpu_per_process(config)
    trainer = SFTTrainer(model=model, args=config, train_dataset=train_set, processing_class=tokenizer)
    stats = trainer.train()

    # Collective under FSDP2 (every rank gathers its shard), written by rank 0 only: the same
    # adapter files a one-GPU run writes.
    adapter_dir = os.path.join(args.output_dir, "lora_adapter")
    fd.save_on_main(model, adapter_dir, tokenizer=tokenizer)
    if fd.is_main_process():
        engine = "FSDP2" if fd.is_fsdp2(model) else ("DDP" if fd.is_distributed() else "one process")
        print(f"trained {stats.global_step} steps on {fd.world_size()} process(es) ({engine}); "
              f"final loss {stats.training_loss:.4f}; adapter saved to {adapter_dir}")
    return stats


if __name__ == "__main__":
    main()
