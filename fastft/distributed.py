"""Multi-GPU training helpers: fastft models on PyTorch's own engines (DDP and FSDP2).

fastft does not ship a distributed engine. A model from FastLanguageModel trains under
`torchrun` / `accelerate launch` with DistributedDataParallel or with FSDP2
(`torch.distributed.fsdp.fully_shard`), through TRL's SFTTrainer or a plain loop. These helpers
are the small pieces users need around that:

    init_distributed()                  process group from torchrun's env (nccl on GPU, gloo on CPU)
    is_main_process(), rank(), local_rank(), world_size()
    ddp_wrap(model)                     DistributedDataParallel with the options fastft models need
    fsdp2_wrap(model)                   fully_shard each decoder layer, then the root
    trainer_distributed_kwargs(model)   TrainingArguments / SFTConfig keywords for DDP or FSDP2
    full_state_dict(model)              the unsharded state dict on rank 0 (collective under FSDP2)
    save_on_main(model, directory)      the files a single-GPU run would write, written by rank 0
    one_gpu_per_process(training_args)  a single process with several GPUs visible trains on one

Why the wrapping is what it is:
- fastft's fused causal-LM loss reads `lm_head.weight` inside the causal-LM forward instead of
  calling `lm_head(...)`. Under FSDP2 a parameter is unsharded only while the forward of the
  unit owning it runs, so the head must belong to the unit whose forward calls the op: the
  root. fsdp2_wrap never shards lm_head, the embeddings or the final norm on their own, so the
  fused linear cross-entropy runs on the full head weight. (When the head is a unit of its own,
  as accelerate's FSDP2 preparation makes it, together with the final norm, its class is no
  longer nn.Linear and fastft's patched forward calls `lm_head(...)`, then the fused
  cross-entropy on the logits: correct, but the [tokens, vocab] logits are built.)
- fused LoRA and the other fused ops read their weights from the modules at call time, inside
  the decoder layer's forward, where FSDP2 has gathered the layer: they see full weights.
- DDP: every LoRA parameter is used in every step, and transformers' Trainer would otherwise
  ask DDP to search for unused parameters for a PeftModel (it only skips that search for
  plain PreTrainedModels), which is slower and fails with reentrant checkpointing.
"""
from __future__ import annotations

import logging
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

logger = logging.getLogger("fastft")


# ---------------------------------------------------------------- ranks and process group

def world_size() -> int:
    """Processes in the job: the process group's size, else torchrun's WORLD_SIZE, else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """Global rank of this process (0 when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """Rank of this process on its machine (torchrun / accelerate set LOCAL_RANK)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_distributed() -> bool:
    return world_size() > 1


def is_main_process() -> bool:
    """True on global rank 0 (and in a single-process run): the process that saves and logs."""
    return rank() == 0


def distributed_device_map():
    """What FastLanguageModel.from_pretrained should use as device_map when none is given:
    {"": local_rank} under a multi-process launch on GPUs (every process holds its own copy,
    on its own GPU; device_map="auto" would split one model over all GPUs in every process),
    {"": "cuda:0"}-style current device for one GPU, None on the CPU."""
    if not torch.cuda.is_available():
        return None
    if is_distributed():
        return {"": local_rank()}
    return {"": torch.cuda.current_device()}


def one_gpu_per_process(training_args):
    """Keep a single-process run on one GPU; returns training_args. With several GPUs visible
    and no launcher, transformers' Trainer sets n_gpu to their count and wraps the model in
    nn.DataParallel, which TRL's SFTTrainer refuses and fastft's models are not built for (one
    device per process: fused ops, offloaded checkpointing, cast caches). To use them all,
    start one process per GPU (torchrun / accelerate launch)."""
    n = training_args.n_gpu  # 1 under a launcher: every process has its own GPU
    if n > 1:
        logger.warning(f"fastft: {n} GPUs are visible to this one process; it trains on "
                       f"{training_args.device} only. For all of them start one process per GPU: "
                       f"torchrun --nproc_per_node {n} your_script.py (or accelerate launch).")
        training_args._n_gpu = 1  # what Trainer itself sets for a model split with device_map
    return training_args


def bnb_4bit_quant_storage(compute_dtype: torch.dtype):
    """The bnb_4bit_quant_storage QLoRA should load with: under a multi-process launch the
    compute dtype (FSDP2 shards and all-gathers floating tensors; packed uint8 weights cannot be
    sharded, and a bf16 / fp16 storage holds the same bytes), else None (bitsandbytes' uint8)."""
    if is_distributed():
        return compute_dtype if compute_dtype in (torch.bfloat16, torch.float16, torch.float32) \
            else torch.bfloat16
    return None


def init_distributed(backend: str | None = None, timeout_minutes: float = 30.0) -> tuple[int, int]:
    """Create the default process group from the launcher's environment (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT) when it does not exist yet; with a GPU backend also select this
    process's GPU (LOCAL_RANK). backend None: nccl with CUDA, gloo on the CPU. Returns (rank, world_size); a single-process
    run (no WORLD_SIZE, or 1) creates nothing and returns (0, 1)."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {missing} are not set: start the "
                           "script with `torchrun --nproc_per_node N script.py` or `accelerate launch`.")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend != "gloo":  # a GPU backend: this process's GPU (gloo leaves CUDA untouched)
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes))
    return dist.get_rank(), dist.get_world_size()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# ---------------------------------------------------------------- unwrapping

def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's model inside DDP / torch.compile wrappers (FSDP2 needs no unwrapping: it keeps
    the model object and changes its class)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def is_fsdp2(model: nn.Module) -> bool:
    """True when fully_shard has been applied to `model` or any module in it."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return any(isinstance(m, FSDPModule) for m in unwrap_model(model).modules())


# ---------------------------------------------------------------- DDP

def ddp_wrap(model: nn.Module, **ddp_kwargs) -> nn.Module:
    """DistributedDataParallel for a plain training loop: this process's GPU (or CPU with gloo),
    find_unused_parameters=False (see the module doc). Extra keywords go to DDP."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("ddp_wrap needs a process group: call fastft.distributed.init_distributed() "
                           "first (under torchrun / accelerate launch).")
    if is_fsdp2(model):
        raise ValueError("The model is already sharded with FSDP2 (fully_shard); use it as it is, "
                         "without DDP.")
    device = next(model.parameters()).device
    ddp_kwargs.setdefault("find_unused_parameters", False)
    if device.type == "cuda":
        ddp_kwargs.setdefault("device_ids", [device.index])
        ddp_kwargs.setdefault("output_device", device.index)
    return nn.parallel.DistributedDataParallel(model, **ddp_kwargs)


# ---------------------------------------------------------------- FSDP2

def _base_transformers_model(model):
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def decoder_layer_classes(model: nn.Module) -> list[type]:
    """The classes fsdp2_wrap shards one by one: transformers' `_no_split_modules` (the decoder
    layer, e.g. LlamaDecoderLayer) present in the model, else every GradientCheckpointingLayer."""
    model = unwrap_model(model)
    base = _base_transformers_model(model)
    present = {type(m) for m in model.modules()}
    # FSDP2 changes a sharded module's class to a subclass: match the original class names too
    by_name = {}
    for cls in present:
        for c in cls.__mro__:
            by_name.setdefault(c.__name__, c)
    names = list(getattr(base, "_no_split_modules", None) or [])
    found = [by_name[n] for n in names if n in by_name]
    if not found:
        try:
            from transformers.modeling_layers import GradientCheckpointingLayer
        except ImportError:
            GradientCheckpointingLayer = None
        if GradientCheckpointingLayer is not None:
            found = sorted({c for c in present if issubclass(c, GradientCheckpointingLayer)
                            and c is not GradientCheckpointingLayer}, key=lambda c: c.__name__)
    return found


def _layer_class_names(model) -> list[str]:
    names = []
    for cls in decoder_layer_classes(model):
        # the class transformers defines, not FSDP2's dynamic FSDP<Name> subclass
        orig = next((c for c in cls.__mro__ if not c.__name__.startswith("FSDP")), cls)
        if orig.__name__ not in names:
            names.append(orig.__name__)
    return names


def default_mixed_precision(device: torch.device, model: nn.Module | None = None):
    """GPU, 16-bit model: reduce gradients in fp32, and compute with every parameter in its own
    dtype, as one GPU does (fastft's fused LoRA casts fp32 factors to the activations' dtype
    itself). A param_dtype=bf16 policy made QLoRA train differently from one GPU on the H200
    (run 52: LoRA updates 19% off; without it the run matched DDP exactly, run 53).
    A float32 model, or the CPU: none (everything stays in the parameters' dtype)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if device.type != "cuda":
        return None
    if model is not None and not any(p.dtype in (torch.bfloat16, torch.float16) for p in model.parameters()
                                     if type(p).__name__ != "Params4bit"):
        return None  # a float32 model
    return MixedPrecisionPolicy(reduce_dtype=torch.float32)


def _compute_policy(upcast_from: torch.dtype):
    """For a unit whose 16-bit trainable weights were upcast to fp32 (see below): compute in
    their 16-bit dtype, as one GPU does, and reduce in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=upcast_from, reduce_dtype=torch.float32)


def _uniform_trainable_dtypes(units: list[nn.Module]) -> dict:
    """FSDP2 needs one dtype for the trainable parameters of each unit. LoRA factors are fp32
    while e.g. a modules_to_save copy of lm_head is bf16: upcast such units' trainable
    parameters to fp32. Returns {unit: (the upcast parameters' names, their 16-bit dtype)}."""
    upcast = {}
    seen = set()
    for unit in units:
        params = [(n, p) for n, p in unit.named_parameters() if p.requires_grad and id(p) not in seen]
        seen.update(id(p) for _, p in unit.named_parameters())
        if len({p.dtype for _, p in params}) > 1:
            for n, p in params:
                if p.dtype != torch.float32:
                    names, _ = upcast.setdefault(unit, ([], p.dtype))
                    p.data = p.data.float()
                    names.append(n)
    return upcast


def _check_4bit_storage(model, param_dtype) -> None:
    """Packed 4-bit weights stored as a float dtype must not be cast by the mixed-precision
    policy (a cast would convert the packed bytes as numbers): storage dtype == param_dtype."""
    if param_dtype is None:
        return
    for name, p in model.named_parameters():
        if type(p).__name__ == "Params4bit" and p.is_floating_point() and p.dtype != param_dtype:
            raise ValueError(
                f"{name} holds packed 4-bit data stored as {p.dtype}, but FSDP2 would cast it to "
                f"{param_dtype} (mixed precision) and corrupt it. Load with "
                f"BitsAndBytesConfig(bnb_4bit_quant_storage={param_dtype}) and dtype={param_dtype}, or pass "
                f"mixed_precision=MixedPrecisionPolicy(param_dtype={p.dtype}, reduce_dtype=torch.float32).")


def fsdp2_wrap(model: nn.Module, *, mesh=None, mixed_precision="auto", reshard_after_forward: bool = True,
               layer_classes=None, cpu_offload: bool = False) -> nn.Module:
    """Shard `model` (a FastLanguageModel model, with or without LoRA) with FSDP2 for a plain
    training loop: fully_shard on every decoder layer, then on the root, which keeps the
    embeddings, the final norm and lm_head (where fastft's fused loss reads the head weight).

    mesh: a 1-D DeviceMesh (default: all processes, on this process's GPU or the CPU).
    mixed_precision: "auto" (GPU, 16-bit model: parameters keep their dtypes, gradients are
    reduced in fp32, see default_mixed_precision; a float32 model or the CPU: none), None, or a
    torch.distributed.fsdp.MixedPrecisionPolicy. layer_classes: classes or class names to shard
    one by one (default: the model's decoder layer, see decoder_layer_classes). cpu_offload:
    keep sharded parameters and gradients in CPU memory between uses.

    4-bit QLoRA weights must be stored in a floating dtype to be sharded: load with
    BitsAndBytesConfig(bnb_4bit_quant_storage=<the compute dtype>) (bnb_4bit_quant_storage(dtype)
    below gives it); uint8-packed ones are left unsharded (replicated) with a warning.
    Returns the same model object (FSDP2 changes its class in place); build the optimizer after."""
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard

    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise ValueError("fsdp2_wrap got a DDP-wrapped model; pass the model itself (FSDP2 replaces DDP).")
    if isinstance(model, FSDPModule):
        return model
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("fsdp2_wrap needs a process group: call fastft.distributed.init_distributed() "
                           "first (under torchrun / accelerate launch).")
    params = list(model.parameters())
    if not params:
        raise ValueError("fsdp2_wrap: the model has no parameters.")
    device = next((p.device for p in params if p.device.type != "meta"), params[0].device)
    if mesh is None:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type if device.type in ("cuda", "cpu") else "cpu",
                                (dist.get_world_size(),))
    auto = mixed_precision == "auto"
    # with the default policy, units whose 16-bit trainable weights get upcast below compute in
    # 16 bits on a GPU, as one GPU does
    upcast_units_compute_16bit = auto and device.type == "cuda"
    if auto:
        mixed_precision = default_mixed_precision(device, model)
    if mixed_precision is None:
        mixed_precision = MixedPrecisionPolicy()

    if layer_classes is None:
        classes = decoder_layer_classes(model)
    else:
        wanted = {c if isinstance(c, str) else c.__name__ for c in layer_classes}
        classes = [c for c in {type(m) for m in model.modules()}
                   if any(k.__name__ in wanted for k in c.__mro__)]
    if not classes:
        raise ValueError(
            f"fsdp2_wrap found no decoder layers to shard in {type(unwrap_model(model)).__name__}; pass "
            "layer_classes=[...] (e.g. ['LlamaDecoderLayer']).")
    layers = [m for m in model.modules() if isinstance(m, tuple(classes)) and m is not model]
    # innermost first: a unit must be sharded before the unit that contains it
    depth = {id(m): name.count(".") for name, m in model.named_modules()}
    layers.sort(key=lambda m: -depth[id(m)])

    head = getattr(_base_transformers_model(model), "get_output_embeddings", lambda: None)()
    if head is not None and any(head is m or any(head is s for s in m.modules()) for m in layers):
        raise ValueError("fsdp2_wrap: lm_head sits inside a layer chosen for sharding; fastft's fused loss "
                         "needs the head in the root unit. Choose layer_classes that exclude it.")

    upcast = _uniform_trainable_dtypes(layers + [model])
    if upcast:
        names = [n for unit_names, _ in upcast.values() for n in unit_names]
        logger.info(f"fastft: FSDP2 needs one dtype per unit for trainable weights; {len(names)} "
                    f"trainable tensor(s) upcast to float32 (e.g. {names[0]})"
                    + ("; their units compute in the 16-bit dtype." if upcast_units_compute_16bit else "."))

    for unit_dtype in {mixed_precision.param_dtype} | {dt for _, dt in upcast.values() if upcast_units_compute_16bit}:
        _check_4bit_storage(model, unit_dtype)
    ignored = {p for p in params if not p.is_floating_point() and not p.requires_grad}
    if ignored:
        logger.warning(
            f"fastft: {len(ignored)} frozen non-floating parameter(s) (4-bit weights packed as uint8) "
            "cannot be sharded and stay replicated on every GPU. Load QLoRA with "
            "BitsAndBytesConfig(bnb_4bit_quant_storage=torch.bfloat16) to shard them.")

    kwargs = dict(mesh=mesh, mp_policy=mixed_precision)
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    if ignored:
        kwargs["ignored_params"] = ignored
    def unit_kwargs(unit):
        if upcast_units_compute_16bit and unit in upcast:
            return {**kwargs, "mp_policy": _compute_policy(upcast[unit][1])}
        return kwargs

    for layer in layers:
        fully_shard(layer, reshard_after_forward=reshard_after_forward, **unit_kwargs(layer))
    # root: torch's default (None) keeps the root's parameters gathered from forward to
    # backward, the head included, which the loss needs again at the start of backward.
    fully_shard(model, **unit_kwargs(model))
    from fastft.lora import forget_replaced_weights

    forget_replaced_weights()  # free the unsharded weights now, not as each layer first runs
    return model


# ---------------------------------------------------------------- Trainer / SFTConfig glue

def trainer_distributed_kwargs(model=None, fsdp: bool = False, reshard_after_forward: bool = True) -> dict:
    """Keywords to add to TrainingArguments / SFTConfig so a fastft model trains under a
    multi-process launch. DDP: ddp_find_unused_parameters=False. fsdp=True: FSDP2 sharding each
    decoder layer (class names read from `model`) when the script is started by `torchrun`
    (with `accelerate launch --config_file examples/accelerate_fsdp2.yaml` the config file
    supplies this instead). Empty in a single-process run."""
    if not is_distributed():
        return {}
    out = {"ddp_find_unused_parameters": False}
    if fsdp:
        if model is None:
            raise ValueError("trainer_distributed_kwargs(fsdp=True) needs the model, to name its decoder layer class.")
        names = _layer_class_names(model)
        if not names:
            raise ValueError(f"No decoder layer class found in {type(unwrap_model(model)).__name__} for FSDP2 "
                             "auto-wrapping; set fsdp_config['transformer_layer_cls_to_wrap'] yourself.")
        config = {"version": 2, "transformer_layer_cls_to_wrap": names,
                  "reshard_after_forward": reshard_after_forward, "state_dict_type": "FULL_STATE_DICT",
                  "cpu_ram_efficient_loading": False}
        out["fsdp"] = _fsdp_flag()
        out["fsdp_config"] = config
    return out


def _fsdp_flag():
    """`fsdp=True` on transformers versions that take it, else the legacy option string."""
    from transformers import TrainingArguments

    if hasattr(TrainingArguments, "_apply_legacy_fsdp_to_config"):
        return True
    return "full_shard auto_wrap"


# ---------------------------------------------------------------- state dicts and saving

def full_state_dict(model: nn.Module, trainable_only: bool = False) -> dict:
    """The model's complete (unsharded) state dict, on the CPU, with the same keys as
    `model.state_dict()` of the unwrapped model. Under FSDP2 this is a collective (call it on
    every rank) and only rank 0 gets the tensors (the others get {}). trainable_only: only the
    parameters that train (e.g. LoRA factors), so the frozen base is not gathered."""
    inner = unwrap_model(model)
    if is_fsdp2(inner):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
        state = get_model_state_dict(inner, options=options)
        return state if is_main_process() else {}
    if trainable_only:
        names = {n for n, p in inner.named_parameters() if p.requires_grad}
        return {k: v for k, v in inner.state_dict().items() if k in names}
    return inner.state_dict()


def _is_quantized(model: nn.Module) -> bool:
    """bitsandbytes 4-/8-bit layers inside (checked on modules: FSDP2 replaces the parameters)."""
    base = _base_transformers_model(model)
    if getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False):
        return True
    return any(type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in model.modules())


def _original_class(module: nn.Module) -> type:
    """The class a module had before fully_shard swapped in its FSDP<Name> subclass."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))


def _unsharded_copy(model: nn.Module, state: dict) -> nn.Module:
    """A plain CPU copy of an FSDP2-sharded transformers / peft model holding `state` (the full
    state dict): same classes, config, adapters and fastft save methods; no FSDP. Built on the
    meta device and filled by assignment, so the copy costs no second set of weights."""
    base = _base_transformers_model(model)
    with torch.device("meta"):
        copy = _original_class(base)(base.config)
    if _is_peft_model(model):
        from peft import PeftModel

        names = list(model.peft_config)
        peft_cls = _original_class(model) if issubclass(_original_class(model), PeftModel) else PeftModel
        copy = peft_cls(copy, model.peft_config[names[0]], adapter_name=names[0])
        for name in names[1:]:
            copy.add_adapter(name, model.peft_config[name])
        copy.set_adapter(model.active_adapter)
    missing, unexpected = copy.load_state_dict(state, strict=False, assign=True)
    # non-persistent buffers (e.g. rotary inv_freq) are not in a state dict; FSDP2 leaves buffers
    # unsharded, so this process's own ones are complete
    own = dict(model.named_buffers())
    for name, buf in list(copy.named_buffers()):
        if buf.is_meta and name in own:
            owner, _, leaf = name.rpartition(".")
            copy.get_submodule(owner).register_buffer(leaf, own[name].detach().cpu().clone(), persistent=False)
    getattr(_base_transformers_model(copy), "tie_weights", lambda: None)()
    if getattr(base, "generation_config", None) is not None:  # the loaded one, not one derived from config
        import copy as _copy

        _base_transformers_model(copy).generation_config = _copy.deepcopy(base.generation_config)
    left = [n for n, t in list(copy.named_parameters()) + list(copy.named_buffers()) if t.is_meta]
    if left or unexpected:
        raise RuntimeError(f"fastft: cannot rebuild the unsharded model for saving (missing {left[:5]}, "
                           f"unexpected {unexpected[:5]}).")
    for attr in ("max_seq_length", "_fastft_full_finetuning", "_fastft_checkpointing", "fastft_family"):
        for src, dst in ((model, copy), (base, _base_transformers_model(copy))):
            if attr in src.__dict__:
                object.__setattr__(dst, attr, src.__dict__[attr])
    copy.eval()
    try:
        from fastft.save import attach_save_methods

        attach_save_methods(copy)
    except ImportError:
        pass
    return copy


def _is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def save_on_main(model: nn.Module, save_directory: str, tokenizer=None, save_method: str = "lora",
                 **kwargs) -> None:
    """Save from rank 0 exactly what a single-GPU run saves. Call it on EVERY rank: under FSDP2
    the full weights are gathered collectively first; all ranks return once the files exist.

    save_method "lora" (default): the adapter (a PeftModel) or, for a model without adapters
    (full fine-tuning), the whole model, through save_pretrained. "merged_16bit" / "merged_4bit" /
    "merged_4bit_forced": model.save_pretrained_merged on rank 0; under FSDP2 the full weights
    are gathered to rank 0's CPU memory first (4-bit QLoRA models sharded with FSDP2: save the
    adapter and merge in one process, see the error). kwargs go to the save call."""
    inner = unwrap_model(model)
    sharded = is_fsdp2(inner)
    if save_method not in ("lora", None):
        if sharded and _is_quantized(inner):
            # decided identically on every rank, before any collective
            raise NotImplementedError(
                f"save_method={save_method!r} of a 4-/8-bit (QLoRA) model sharded with FSDP2 is not supported; "
                "save the adapter with save_on_main(model, dir) and merge afterwards in a single process: "
                "model, tok = FastLanguageModel.from_pretrained(dir); "
                f"model.save_pretrained_merged(out_dir, tok, save_method={save_method!r}).")
        # FSDP2: gather every weight to rank 0's CPU and merge from an unsharded copy there
        state = full_state_dict(inner) if sharded else None

        def save_merged():
            target = _unsharded_copy(inner, state) if sharded else inner
            saver = getattr(target, "save_pretrained_merged", None)
            if saver is None:
                raise AttributeError("This model has no save_pretrained_merged; load it with FastLanguageModel.")
            saver(save_directory, tokenizer, save_method=save_method, **kwargs)

        _on_main(save_merged)
        return

    state = None
    if sharded:
        # gather on every rank; only rank 0 keeps tensors
        state = full_state_dict(inner, trainable_only=_is_peft_model(inner))

    def save():
        if state is not None:
            kwargs["state_dict"] = state
        inner.save_pretrained(save_directory, **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(save_directory)

    _on_main(save)


def _on_main(fn) -> None:
    """Run fn on rank 0; every rank returns when it is done, and raises if it failed (instead
    of the other ranks waiting for rank 0 until the process-group timeout)."""
    error = None
    if is_main_process():
        try:
            fn()
        except Exception as exc:  # re-raised below, after telling the other ranks
            error = exc
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        message = [f"{type(error).__name__}: {error}" if error is not None else None]
        dist.broadcast_object_list(message, src=0)
        if error is None and message[0] is not None:
            raise RuntimeError(f"fastft: saving on rank 0 failed ({message[0]}).")
    if error is not None:
        raise error
