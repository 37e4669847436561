"""Trainer glue: FastTrainer (trl's SFTTrainer) whose optimizer can give the embeddings and the
LM head their own learning rate, as continued pretraining wants (new-domain text moves the
embeddings a lot; a smaller rate there keeps them stable):

    args = FastTrainingArguments(learning_rate=5e-5, embedding_learning_rate=5e-6, ...)
    trainer = FastTrainer(model=model, processing_class=tokenizer, train_dataset=ds, args=args)

UnslothTrainer / UnslothTrainingArguments are the same classes under the names ported scripts use.
FastTrainer also accepts the older SFTTrainer keywords those scripts pass (tokenizer=,
dataset_text_field=, max_seq_length=, packing=, dataset_num_proc=) and moves them where trl
expects them now.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import os
from dataclasses import dataclass, field

from torch import nn
from transformers import Trainer
from trl import SFTConfig, SFTTrainer

from fastft.distributed import one_gpu_per_process

logger = logging.getLogger("fastft")

# Parameter-name parts that mark input embeddings / output head (incl. peft's wrapped copies).
EMBEDDING_NAME_PARTS = ("embed_tokens", "lm_head")


def is_embedding_parameter(name: str) -> bool:
    parts = name.split(".")
    return any(part in parts for part in EMBEDDING_NAME_PARTS)


@dataclass
class FastTrainingArguments(SFTConfig):
    """trl's SFTConfig plus `embedding_learning_rate`: the learning rate of embed_tokens / lm_head
    parameters (None: the same as learning_rate)."""

    embedding_learning_rate: float | None = field(
        default=None,
        metadata={"help": "Learning rate for embed_tokens / lm_head (continued pretraining); "
                          "None uses learning_rate."},
    )

    loss_head: str = field(
        default="trl",
        metadata={"help": "'trl': trl's fused LM head (also logs entropy and token accuracy); "
                          "'fastft': the model's own forward, whose loss fastft computes with its fused "
                          "linear cross-entropy kernels (no entropy / accuracy metrics)."},
    )

    def __post_init__(self):
        import torch

        if self.loss_head not in ("trl", "fastft"):
            raise ValueError(f"loss_head={self.loss_head!r} is not valid; use 'trl' or 'fastft'.")

        if self.bf16 is None and not self.fp16 and not torch.cuda.is_available():
            self.bf16 = False  # trl would pick bf16 and then refuse to run on a CPU-only machine
        if self.ddp_find_unused_parameters is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # The Trainer turns the search on for peft models; with fastft's offloaded
            # checkpointing that fails ("marked as ready twice"), and LoRA uses every parameter.
            self.ddp_find_unused_parameters = False
        super().__post_init__()
        if self.embedding_learning_rate is not None and self.embedding_learning_rate < 0:
            raise ValueError(f"embedding_learning_rate must be >= 0, got {self.embedding_learning_rate}.")


@contextlib.contextmanager
def frozen_gc():
    """Keep Python's garbage collector off the objects that exist when training starts.

    torch, transformers, trl and the model make ~550k tracked objects; each full collection
    walks them all (~0.3 s, seen on the H200 machine about once every ten 8B steps, baseline and
    fastft alike). gc.freeze() moves them out of the collector's view for the run; objects made
    during training are still collected, and gc.unfreeze() hands the rest back afterwards. Does
    nothing when the caller has frozen objects already (their choice stands)."""
    if gc.get_freeze_count() > 0:
        yield
        return
    gc.collect()  # what is garbage now is freed, not frozen
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


# SFTTrainer keywords of older trl versions -> the SFTConfig field that holds them now.
_LEGACY_ARGS = {"dataset_text_field": "dataset_text_field", "max_seq_length": "max_length",
                "packing": "packing", "dataset_num_proc": "dataset_num_proc"}


class FastTrainer(SFTTrainer):
    def __init__(self, *args, tokenizer=None, **kwargs):
        legacy = {k: kwargs.pop(k) for k in list(kwargs) if k in _LEGACY_ARGS}
        if tokenizer is not None:
            if kwargs.get("processing_class") is not None:
                raise ValueError("Pass the tokenizer once: tokenizer= or processing_class=, not both.")
            kwargs["processing_class"] = tokenizer
        # SFTTrainer(model, args, ...): the training arguments by keyword or second positional
        train_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if legacy:
            if train_args is None:
                raise ValueError(f"{sorted(legacy)} need args=FastTrainingArguments(...) (or SFTConfig) "
                                 "to hold them; put them there.")
            if not isinstance(train_args, SFTConfig):
                raise ValueError(f"{sorted(legacy)} are SFTConfig options; pass args=FastTrainingArguments"
                                 f"(...) instead of {type(train_args).__name__}.")
            for old, new in _LEGACY_ARGS.items():
                if old in legacy and legacy[old] is not None:
                    setattr(train_args, new, legacy[old])
        if train_args is not None:
            one_gpu_per_process(train_args)
        super().__init__(*args, **kwargs)

    def train(self, *args, **kwargs):
        with frozen_gc():  # no ~0.3 s collector pauses in the training loop
            return super().train(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if (getattr(self.args, "loss_head", "trl") == "fastft" and self.args.loss_type == "nll"
                and self.compute_loss_func is None and self.label_smoother is None):
            # transformers' Trainer path: model(**inputs, labels, num_items_in_batch) -> the patched
            # causal-LM forward -> fastft.ops.fused_linear_cross_entropy
            inputs = dict(inputs)
            inputs["use_cache"] = False
            return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    def create_optimizer(self, model=None):
        lr_embed = getattr(self.args, "embedding_learning_rate", None)
        if lr_embed is None or self.optimizer is not None:
            return super().create_optimizer(model) if model is not None else super().create_optimizer()
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        groups: dict[tuple[bool, bool], list] = {}
        counts = {True: 0, False: 0}
        for name, p in opt_model.named_parameters():
            if not p.requires_grad:
                continue
            embed = is_embedding_parameter(name)
            groups.setdefault((embed, name in decay), []).append(p)
            counts[embed] += p.numel()
        param_groups = []
        for (embed, decays), params in groups.items():
            group = {"params": params, "weight_decay": self.args.weight_decay if decays else 0.0}
            if embed:
                group["lr"] = lr_embed
            param_groups.append(group)
        if counts[True] == 0:
            logger.warning("fastft: embedding_learning_rate is set but no trainable embed_tokens / lm_head "
                           "parameters exist (add them to modules_to_save or target_modules).")
        else:
            logger.info(f"fastft: {counts[True]:,} embedding/lm_head parameters train at lr={lr_embed}, "
                        f"{counts[False]:,} others at lr={self.args.learning_rate}.")
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        for key in ("params", "model", "optimizer_dict"):
            if key in optimizer_kwargs:
                raise ValueError(f"optim={self.args.optim!r} builds its own parameter groups; it cannot be "
                                 "combined with embedding_learning_rate.")
        self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)
        if "bitsandbytes" in str(optimizer_cls) and optimizer_kwargs.get("optim_bits") == 8:
            # as transformers does: 8-bit optimizer states are too coarse for embeddings
            import bitsandbytes

            manager = bitsandbytes.optim.GlobalOptimManager.get_instance()
            for module in opt_model.modules():
                if isinstance(module, nn.Embedding):
                    manager.register_module_override(module, "weight", {"optim_bits": 32})
        return self.optimizer


UnslothTrainer = FastTrainer
UnslothTrainingArguments = FastTrainingArguments
