"""FastLanguageModel / FastModel: load a model (16-bit, QLoRA 4-bit, 8-bit or full fine-tuning),
patch it with fastft's fused ops, add LoRA adapters, switch between training and inference.

    model, tokenizer = FastLanguageModel.from_pretrained("unsloth/Llama-3.1-8B", max_seq_length=2048,
                                                         load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(model, r=16, use_gradient_checkpointing="unsloth")
    ... trainer.train() ...
    FastLanguageModel.for_inference(model)
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import os

import torch
from torch import nn

from fastft.env import is_bf16_supported

logger = logging.getLogger("fastft")

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CHECKPOINTING_CHOICES = (True, False, "unsloth", "offload")
# target_modules entries that are trained in full (moved to modules_to_save) rather than by LoRA
FULLY_TRAINED_TARGETS = ("lm_head", "embed_tokens")

# Existing tokens that can serve as padding (checked in order) before a new one is added.
PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<|finetune_right_pad|>", "<pad>", "<|pad|>",
                  "[PAD]", "<PAD>", "<|PAD_TOKEN|>", "<|vision_pad|>",
                  "<|reserved_special_token_0|>", "<unk>")
NEW_PAD_TOKEN = "<|pad|>"

_DTYPE_NAMES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
                "fp16": torch.float16, "half": torch.float16, "float32": torch.float32,
                "fp32": torch.float32, "float": torch.float32}


# ---------------------------------------------------------------- small helpers

def _cuda() -> bool:
    return torch.cuda.is_available()


def resolve_dtype(dtype) -> torch.dtype:
    """dtype=None: bfloat16 where the GPU supports it, else float16; float32 on the CPU."""
    if isinstance(dtype, str):
        if dtype.lower() not in _DTYPE_NAMES:
            raise ValueError(f"dtype={dtype!r} is not a dtype fastft knows; use torch.bfloat16, "
                             "torch.float16, torch.float32 or None (automatic).")
        dtype = _DTYPE_NAMES[dtype.lower()]
    if dtype is None:
        if not _cuda():
            return torch.float32
        return torch.bfloat16 if is_bf16_supported() else torch.float16
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"dtype={dtype} is not supported; use torch.bfloat16, torch.float16, "
                         "torch.float32 or None (automatic).")
    if dtype == torch.bfloat16 and _cuda() and not is_bf16_supported():
        logger.warning("fastft: this GPU does not compute in bfloat16; using float16 instead.")
        return torch.float16
    return dtype


def _default_device_map():
    # One GPU holds the whole model (splitting layers across GPUs makes training slow); under
    # torchrun / accelerate each process takes its LOCAL_RANK's GPU. CPU: none.
    if not _cuda():
        return None
    return {"": int(os.environ.get("LOCAL_RANK", torch.cuda.current_device()))}


def check_bitsandbytes(device: str) -> None:
    """Raise a clear error when bitsandbytes cannot quantise on `device`."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError("load_in_4bit / load_in_8bit need bitsandbytes: `pip install bitsandbytes` "
                          "(or load in 16-bit with load_in_4bit=False).")
    try:
        import bitsandbytes.functional as bnbf

        probe = torch.ones(64, 64, dtype=torch.float32, device=device)
        bnbf.quantize_4bit(probe, quant_type="nf4")
    except Exception as exc:
        raise RuntimeError(
            f"bitsandbytes cannot run 4-bit/8-bit quantisation on {device} here "
            f"({type(exc).__name__}: {exc}). Install a bitsandbytes build for this device, or load "
            "in 16-bit with load_in_4bit=False, load_in_8bit=False.") from exc


def _base_model(model):
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def _is_quantized(model) -> bool:
    base = _base_model(model)
    return bool(getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False)
                or getattr(base, "hf_quantizer", None) is not None)


def choose_attn_implementation(config, model_cls, requested):
    """The user's choice, else the fastest attention the model class and device support."""
    if requested is not None:
        return requested
    if model_cls is None:
        return None  # let transformers decide
    if _cuda() and getattr(model_cls, "_supports_flash_attn", False) \
            and importlib.util.find_spec("flash_attn") is not None \
            and getattr(config, "attn_logit_softcapping", None) is not None:
        return "flash_attention_2"  # the one fast kernel with attention-logit softcapping (Gemma 2)
    if getattr(model_cls, "_supports_sdpa", False):
        return "sdpa"
    return "eager"


def _causal_lm_class(config):
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM._model_mapping[type(config)]
    except Exception:  # remote code or not a causal LM
        return None


# ---------------------------------------------------------------- tokenizer padding

def ensure_pad_token(model, tokenizer):
    """Give `tokenizer` a pad token that is not EOS (reusing an unused special token when the
    vocabulary has one, else adding NEW_PAD_TOKEN and resizing the embeddings if needed)."""
    if tokenizer is None:
        return tokenizer
    tok = getattr(tokenizer, "tokenizer", tokenizer)  # processors wrap the tokenizer
    eos_ids = set()
    for source in (tok.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(source, int):
            eos_ids.add(source)
        elif isinstance(source, (list, tuple)):
            eos_ids.update(i for i in source if isinstance(i, int))
    if tok.pad_token is not None and tok.pad_token_id not in eos_ids:
        _set_model_pad(model, tok.pad_token_id)
        return tokenizer
    rows = model.get_input_embeddings().weight.shape[0] if model is not None else None
    vocab = tok.get_vocab()
    taken = eos_ids | {tok.bos_token_id}
    for cand in PAD_CANDIDATES:
        idx = vocab.get(cand)
        if idx is not None and idx not in taken and (rows is None or idx < rows):
            tok.pad_token = cand
            _set_model_pad(model, idx)
            return tokenizer
    tok.add_special_tokens({"pad_token": NEW_PAD_TOKEN})
    if model is not None and len(tok) > rows:
        model.resize_token_embeddings(len(tok))
        logger.info(f"fastft: added pad token {NEW_PAD_TOKEN!r}; embeddings resized to {len(tok)} rows.")
    _set_model_pad(model, tok.pad_token_id)
    return tokenizer


def _set_model_pad(model, pad_id):
    if model is None:
        return
    model.config.pad_token_id = pad_id
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.pad_token_id = pad_id


# ---------------------------------------------------------------- checkpointing

def _enable_hf_checkpointing(model):
    base = _base_model(model)
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _disable_checkpointing(model):
    base = _base_model(model)
    if not getattr(base, "supports_gradient_checkpointing", False):
        return
    if hasattr(base, "activation_checkpointing_disable"):
        base.activation_checkpointing_disable()
    else:
        base.gradient_checkpointing_disable()


def set_gradient_checkpointing(model, mode) -> str:
    """Apply use_gradient_checkpointing: True (transformers'), "unsloth"/"offload" (fastft's
    offloaded checkpointing when fastft.offload exists), False (off). Returns what was applied."""
    if mode not in CHECKPOINTING_CHOICES:
        raise ValueError(f"use_gradient_checkpointing={mode!r} is not valid; use True (standard "
                         "checkpointing), \"unsloth\" or \"offload\" (offloaded) or False.")
    base = _base_model(model)
    if mode in (True, False) and "_fastft_checkpoint_func" in vars(base):
        from fastft.offload import disable_offloaded_checkpointing  # back to transformers' own

        disable_offloaded_checkpointing(base)
    if mode is False:
        _disable_checkpointing(model)
        applied = "off"
    elif not getattr(base, "supports_gradient_checkpointing", False):
        logger.warning(f"fastft: {type(base).__name__} does not support gradient checkpointing; "
                       "training without it.")
        applied = "off"
    elif mode in ("unsloth", "offload") and importlib.util.find_spec("fastft.offload") is not None:
        from fastft.offload import enable_offloaded_checkpointing

        enable_offloaded_checkpointing(base)
        applied = "offload"
    else:
        if mode in ("unsloth", "offload"):
            logger.warning("fastft: offloaded checkpointing (fastft.offload) is not available; "
                           "using transformers' gradient checkpointing instead.")
        _enable_hf_checkpointing(model)
        applied = "hf"
    if applied != "off":
        base.config.use_cache = False
    object.__setattr__(base, "_fastft_checkpointing", mode)
    return applied


# ---------------------------------------------------------------- the public API

class FastLanguageModel:
    """Unsloth-style entry points for causal language models."""

    _auto_class = "AutoModelForCausalLM"

    @classmethod
    def from_pretrained(cls, model_name: str = "unsloth/Llama-3.2-1B-Instruct", max_seq_length: int = 2048,
                        dtype=None, load_in_4bit: bool = False, load_in_8bit: bool = False,
                        full_finetuning: bool = False, token: str | None = None, device_map=None,
                        trust_remote_code: bool = False, attn_implementation: str | None = None,
                        tokenizer_name: str | None = None, fix_tokenizer: bool = True,
                        use_gradient_checkpointing=None, revision: str | None = None,
                        patch: bool = True, **kwargs):
        """Load `model_name` (hub id or local directory) -> (model, tokenizer).

        dtype None: bf16 where supported, else fp16 (fp32 on CPU). load_in_4bit: QLoRA (NF4,
        double quantisation, compute dtype = dtype); checkpoints already quantised (their config
        has a quantization_config, e.g. *-bnb-4bit) load as they are. full_finetuning: every
        weight trains (no adapters). A directory holding a LoRA adapter (adapter_config.json)
        loads its base model with the adapter on top."""
        from transformers import AutoConfig, AutoTokenizer, BitsAndBytesConfig
        import transformers

        # Unsloth's vLLM options: accepted so scripts port, but generation uses transformers.
        if kwargs.pop("fast_inference", False):
            logger.warning("fastft: fast_inference=True (vLLM) is not supported; generation uses "
                           "transformers' generate().")
        for ignored in ("max_lora_rank", "gpu_memory_utilization", "float8_kv_cache",
                        "use_exact_model_name", "resize_model_vocab", "random_state"):
            if ignored in kwargs:
                kwargs.pop(ignored)
        if load_in_4bit and load_in_8bit:
            raise ValueError("Choose one of load_in_4bit=True (QLoRA) and load_in_8bit=True, not both.")
        if full_finetuning and (load_in_4bit or load_in_8bit):
            raise ValueError("full_finetuning=True trains every weight, which needs 16/32-bit weights: "
                             "set load_in_4bit=False and load_in_8bit=False (or use LoRA/QLoRA).")
        if max_seq_length is not None and (not isinstance(max_seq_length, int) or max_seq_length <= 0):
            raise ValueError(f"max_seq_length must be a positive int, got {max_seq_length!r}.")

        hub = dict(token=token, revision=revision, trust_remote_code=trust_remote_code)
        hub = {k: v for k, v in hub.items() if v is not None}

        adapter_dir = None
        if os.path.isfile(os.path.join(str(model_name), "adapter_config.json")):
            from peft import PeftConfig

            adapter_dir = model_name
            model_name = PeftConfig.from_pretrained(adapter_dir).base_model_name_or_path

        config = AutoConfig.from_pretrained(model_name, **hub)
        dtype = resolve_dtype(dtype)
        device = "cuda" if _cuda() else "cpu"

        pre_quantized = getattr(config, "quantization_config", None) is not None
        quantization_config = kwargs.pop("quantization_config", None)
        if pre_quantized:
            if full_finetuning:
                raise ValueError(f"{model_name} is a quantised checkpoint; full_finetuning needs the "
                                 "16-bit one (drop the -bnb-4bit suffix).")
            method = getattr(config.quantization_config, "get", lambda k, d=None: d)("quant_method") \
                if isinstance(config.quantization_config, dict) else \
                getattr(config.quantization_config, "quant_method", None)
            if str(method) in ("bitsandbytes", "QuantizationMethod.BITS_AND_BYTES"):
                check_bitsandbytes(device)
            logger.info(f"fastft: {model_name} is already quantised ({method}); it loads as it is.")
        elif quantization_config is None and (load_in_4bit or load_in_8bit):
            check_bitsandbytes(device)
            if load_in_4bit:
                # Several processes (FSDP2): pack the 4-bit bytes in the compute dtype, the storage
                # bitsandbytes can shard; one process keeps the default uint8.
                storage = {"bnb_4bit_quant_storage": dtype} \
                    if int(os.environ.get("WORLD_SIZE", "1")) > 1 else {}
                quantization_config = BitsAndBytesConfig(
                    load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                    bnb_4bit_compute_dtype=dtype, **storage)
            else:
                quantization_config = BitsAndBytesConfig(load_in_8bit=True)

        auto_cls = getattr(transformers, cls._auto_class)
        model_cls = _causal_lm_class(config) if cls._auto_class == "AutoModelForCausalLM" else None
        attn = choose_attn_implementation(config, model_cls, attn_implementation)

        load_kwargs = dict(hub, dtype=dtype, device_map=device_map if device_map is not None
                           else _default_device_map(), **kwargs)
        if quantization_config is not None:
            load_kwargs["quantization_config"] = quantization_config
        if attn is not None:
            load_kwargs["attn_implementation"] = attn
        model = cls._load(auto_cls, model_name, load_kwargs)

        tokenizer = None
        tok_source = tokenizer_name or (adapter_dir if adapter_dir and _has_tokenizer(adapter_dir) else model_name)
        try:
            tokenizer = AutoTokenizer.from_pretrained(tok_source, **hub)
        except Exception as exc:  # e.g. a checkpoint shipped without tokenizer files
            logger.warning(f"fastft: no tokenizer loaded from {tok_source} ({type(exc).__name__}: {exc}); "
                           "pass tokenizer_name=... to choose one.")
        if tokenizer is not None:
            if fix_tokenizer:
                ensure_pad_token(model, tokenizer)
            if max_seq_length:
                getattr(tokenizer, "tokenizer", tokenizer).model_max_length = max_seq_length

        limit = getattr(config, "max_position_embeddings", None)
        if max_seq_length and limit and max_seq_length > limit:
            logger.info(f"fastft: max_seq_length={max_seq_length} is longer than the model's "
                           f"max_position_embeddings={limit}; quality beyond {limit} tokens is not assured.")

        if patch:
            from fastft.models import patch_model

            patch_model(model)
        if cls._auto_class == "AutoModelForCausalLM":
            # Packed rows (position_ids restarting, no attention mask) stay inside their own
            # sequence even when the caller leaves use_cache on (transformers then ignores them).
            from fastft.packing import ensure_packed_attention

            ensure_packed_attention(model)

        object.__setattr__(model, "max_seq_length", max_seq_length)
        object.__setattr__(model, "_fastft_full_finetuning", bool(full_finetuning))
        if full_finetuning:
            for p in model.parameters():
                if p.is_floating_point():
                    p.requires_grad_(True)
        if use_gradient_checkpointing is not None:
            object.__setattr__(model, "_fastft_checkpointing_request", use_gradient_checkpointing)
            if full_finetuning:
                set_gradient_checkpointing(model, use_gradient_checkpointing)

        if adapter_dir is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=True)
            object.__setattr__(model, "max_seq_length", max_seq_length)
            adapter_cfg = model.peft_config[model.active_adapter]
            _maybe_fuse_lora(model, getattr(adapter_cfg, "lora_dropout", 0.0),
                             getattr(adapter_cfg, "bias", "none"))

        from fastft.save import attach_save_methods

        attach_save_methods(model)
        return model, tokenizer

    @staticmethod
    def _load(auto_cls, model_name, load_kwargs):
        return auto_cls.from_pretrained(model_name, **load_kwargs)

    # ------------------------------------------------------------ adapters

    @staticmethod
    def get_peft_model(model, r: int = 16, target_modules=DEFAULT_TARGET_MODULES, lora_alpha: int = 16,
                       lora_dropout: float = 0.0, bias: str = "none", layers_to_transform=None,
                       layers_pattern=None, use_gradient_checkpointing="unsloth", random_state: int = 3407,
                       max_seq_length: int | None = None, use_rslora: bool = False, modules_to_save=None,
                       init_lora_weights=True, loftq_config=None, task_type: str = "CAUSAL_LM",
                       use_dora: bool = False, **kwargs):
        """Add LoRA adapters (real peft modules: peft's save/load keep working) and set up
        checkpointing. With full_finetuning=True (from_pretrained) the model is returned as it is."""
        from peft import LoraConfig, get_peft_model

        if max_seq_length is not None:
            object.__setattr__(_base_model(model), "max_seq_length", max_seq_length)
        if getattr(_base_model(model), "_fastft_full_finetuning", False):
            logger.warning("fastft: full_finetuning=True: every weight trains, no LoRA adapters are "
                           "added; get_peft_model returns the model unchanged.")
            set_gradient_checkpointing(model, use_gradient_checkpointing)
            return model
        if _is_peft_model(model):
            logger.warning("fastft: the model already has LoRA adapters; get_peft_model leaves it as is.")
            return model
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"r (the LoRA rank) must be a positive int, got {r!r}.")
        if bias not in ("none", "all", "lora_only"):
            raise ValueError(f"bias={bias!r} is not valid; use 'none', 'all' or 'lora_only'.")
        if not 0.0 <= float(lora_dropout) < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}.")
        if use_gradient_checkpointing not in CHECKPOINTING_CHOICES:
            raise ValueError(f"use_gradient_checkpointing={use_gradient_checkpointing!r} is not valid; use "
                             "True, False, \"unsloth\" or \"offload\".")
        target_modules = check_target_modules(model, target_modules, "target_modules")
        if not isinstance(target_modules, str):
            # Embeddings / head named as targets train in full (modules_to_save), as continued
            # pretraining recipes intend; trl's fused LM head also refuses a LoRA-wrapped lm_head.
            full = [t for t in target_modules if t in FULLY_TRAINED_TARGETS]
            if full:
                target_modules = [t for t in target_modules if t not in FULLY_TRAINED_TARGETS]
                if not target_modules:
                    raise ValueError(f"target_modules {full} alone: name at least one projection for "
                                     "LoRA, or use modules_to_save to train only those.")
                modules_to_save = list(dict.fromkeys(list(modules_to_save or []) + full))
                logger.info(f"fastft: {full} in target_modules train in full (modules_to_save), "
                            "not through LoRA.")
        if modules_to_save is not None:
            modules_to_save = list(check_target_modules(model, modules_to_save, "modules_to_save"))

        lora_fields = set(LoraConfig.__dataclass_fields__)
        extra = {k: v for k, v in kwargs.items() if k in lora_fields}
        for k in sorted(set(kwargs) - lora_fields):
            logger.warning(f"fastft: get_peft_model ignores the unknown option {k}={kwargs[k]!r}.")
        if loftq_config:
            init_lora_weights = "loftq"
        config = LoraConfig(
            r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, bias=bias,
            target_modules=target_modules, use_rslora=use_rslora, modules_to_save=modules_to_save,
            init_lora_weights=init_lora_weights, loftq_config=loftq_config or {}, task_type=task_type,
            layers_to_transform=layers_to_transform, layers_pattern=layers_pattern, use_dora=use_dora,
            **extra)

        base = model
        if _is_quantized(base):
            _prepare_quantized_for_training(base)
        torch.manual_seed(random_state)
        peft_model = get_peft_model(base, config)
        _upcast_trainable_fp16(peft_model)

        set_gradient_checkpointing(peft_model, use_gradient_checkpointing)
        _maybe_fuse_lora(peft_model, lora_dropout, bias)

        from fastft.save import attach_save_methods

        attach_save_methods(peft_model)
        object.__setattr__(peft_model, "max_seq_length",
                           max_seq_length or getattr(base, "max_seq_length", None))
        return peft_model

    # ------------------------------------------------------------ modes

    @staticmethod
    def for_inference(model, use_cuda_graphs: bool = True):
        """Evaluation mode for generation: eval(), checkpointing off, KV cache on. Decoding
        steps of NF4 (QLoRA) layers then run on the fused small-M kernel (fastft.lora). On a
        GPU, `generate` also decodes from CUDA graphs over transformers' static KV cache
        (fastft.decoding; use_cuda_graphs=False or FASTFT_CUDA_GRAPHS=0: eager, dynamic cache),
        with one static cache kept for the next call of the same batch size and length (memory
        held until for_training, which releases it with the graphs).
        transformers' automatic torch.compile of static-cache decoding is turned off: it traces
        with fullgraph=True, which fastft's fused layers do not support (it failed in run 83)."""
        base = _base_model(model)
        model.eval()
        _disable_checkpointing(model)
        base.config.use_cache = True
        if getattr(base, "generation_config", None) is not None:
            base.generation_config.use_cache = True
            base.generation_config.disable_compile = True
        from fastft.attention import install_sdpa_wrapper

        install_sdpa_wrapper()  # decoding steps skip transformers' K / V copy per query head
        if use_cuda_graphs:
            from fastft.decoding import enable_graph_decoding

            enable_graph_decoding(model)
        return model

    @staticmethod
    def for_training(model, use_gradient_checkpointing=None):
        """Back to training: train(), checkpointing as chosen in get_peft_model (or the argument)."""
        from fastft.decoding import disable_graph_decoding

        base = _base_model(model)
        disable_graph_decoding(model)
        model.train()
        mode = use_gradient_checkpointing
        if mode is None:
            mode = getattr(base, "_fastft_checkpointing", None)
        if mode is not None and mode is not False:
            set_gradient_checkpointing(model, mode)
        base.config.use_cache = False
        return model


class FastModel(FastLanguageModel):
    """Generic loader: causal LMs exactly as FastLanguageModel; other architectures through
    AutoModel (unpatched) when AutoModelForCausalLM does not know them."""

    @staticmethod
    def _load(auto_cls, model_name, load_kwargs):
        try:
            return auto_cls.from_pretrained(model_name, **load_kwargs)
        except ValueError as exc:
            if "Unrecognized configuration class" not in str(exc):
                raise
            from transformers import AutoModel

            load_kwargs = dict(load_kwargs)
            if load_kwargs.get("attn_implementation") in ("sdpa",):
                load_kwargs.pop("attn_implementation")
            logger.warning(f"fastft: {model_name} is not a causal LM; loading it with AutoModel.")
            return AutoModel.from_pretrained(model_name, **load_kwargs)


# ---------------------------------------------------------------- get_peft_model helpers

def _adaptable(module) -> bool:
    """Layers peft's LoRA can wrap: linear (incl. bitsandbytes), embedding, conv, GPT-2's Conv1D."""
    if isinstance(module, (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d)):
        return True
    return type(module).__name__ in ("Conv1D", "Linear4bit", "Linear8bitLt")


# Module names peft adds inside the layers it wraps: never targets themselves.
_PEFT_INTERNALS = {"base_layer", "lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B",
                   "lora_dropout", "lora_magnitude_vector", "modules_to_save", "original_module"}


def _user_modules(model):
    for name, m in _base_model(model).named_modules():
        if name and not _PEFT_INTERNALS.intersection(name.split(".")):
            yield name, m


def valid_target_modules(model) -> list[str]:
    """Short names of the layers of `model` that LoRA can target (e.g. q_proj, lm_head)."""
    names = {name.rsplit(".", 1)[-1] for name, m in _user_modules(model)
             if _adaptable(m) or hasattr(m, "base_layer")}
    return sorted(names)


def check_target_modules(model, targets, what: str):
    """Validate a list of module names (a string is peft's regex / "all-linear": passed as is)."""
    if isinstance(targets, str):
        return targets
    targets = list(targets)
    if not targets:
        raise ValueError(f"{what} is empty; name at least one module, e.g. {list(DEFAULT_TARGET_MODULES)}.")
    names = [name for name, _ in _user_modules(model)]
    unknown = [t for t in targets
               if not any(n == t or n.endswith("." + t) for n in names)]
    if unknown:
        raise ValueError(
            f"{what} {unknown} not found in {type(_base_model(model)).__name__}. Valid module names "
            f"in this model: {valid_target_modules(model)}.")
    return targets


def _prepare_quantized_for_training(model):
    """The parts of peft's prepare_model_for_kbit_training that QLoRA needs, without casting the
    whole non-quantised model to float32 (that costs gigabytes for large vocabularies)."""
    for p in model.parameters():
        p.requires_grad_(False)
    # With reentrant checkpointing the first layer's input must require grad; harmless otherwise.
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()


def _upcast_trainable_fp16(model):
    """fp16 AMP's grad scaler refuses fp16 trainable weights: keep trainable ones in float32."""
    for p in model.parameters():
        if p.requires_grad and p.dtype == torch.float16:
            p.data = p.data.float()


def _maybe_fuse_lora(model, lora_dropout, bias):
    if importlib.util.find_spec("fastft.lora") is None:
        return
    if float(lora_dropout) != 0.0 or bias != "none":
        logger.warning(f"fastft: lora_dropout={lora_dropout}, bias={bias!r}: the fused LoRA kernels need "
                    "lora_dropout=0 and bias='none'; peft's own LoRA path is used.")
        return
    from fastft.lora import apply_fused_lora

    report = apply_fused_lora(model)
    object.__setattr__(model, "fastft_fused_lora", report)
    if isinstance(report, dict):
        logger.info(f"fastft: fused LoRA on {report.get('mlp', 0)} MLPs, {report.get('qkv', 0)} q/k/v "
                    f"groups, {report.get('o_proj', 0)} o_proj.")


def _has_tokenizer(path) -> bool:
    return any(os.path.isfile(os.path.join(path, f))
               for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
