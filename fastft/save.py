"""Saving and export: LoRA adapters, merged 16-bit / 4-bit checkpoints, GGUF, and Hub uploads.

The loader binds these onto models with `attach_save_methods(model)`, so users call them as
`model.save_pretrained_merged(dir, tokenizer, save_method="merged_16bit")` and so on.

Merged weights are produced one tensor at a time (`merged_tensor_plan`): a LoRA-wrapped linear
is dequantised if it is a bitsandbytes 4-bit layer, the active adapters' B @ A * scaling is
added in fp32, and the result is cast and handed to a shard writer that flushes shards to disk
as they fill, so peak memory is about one shard plus one layer. Every save goes to a temporary
folder beside the target and is renamed into place only when complete.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
import types
from dataclasses import dataclass
from typing import Callable

import torch

MARKER_FILE = ".fastft_save.json"
SAVE_METHODS = ("lora", "merged_16bit", "merged_4bit", "merged_4bit_forced")


# ----------------------------------------------------------------------------------------------
# model access
# ----------------------------------------------------------------------------------------------
def _is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # peft missing: nothing can be a PeftModel
        return False
    return isinstance(model, PeftModel)


def base_transformers_model(model):
    """The transformers model inside a PeftModel (LoRA layers still in place), or `model`."""
    if _is_peft_model(model):
        return model.get_base_model()
    return model


def _is_lora_layer(module) -> bool:
    return hasattr(module, "lora_A") and hasattr(module, "base_layer") and hasattr(module, "scaling")


def _is_modules_to_save(module) -> bool:
    return hasattr(module, "modules_to_save") and hasattr(module, "original_module")


def _is_bnb_4bit(module) -> bool:
    weight = getattr(module, "weight", None)
    return weight is not None and getattr(weight, "quant_state", None) is not None


def _dequantized_weight(linear) -> torch.Tensor:
    """fp32 weight of a plain or bitsandbytes-4-bit linear, on its own device."""
    weight = linear.weight
    if _is_bnb_4bit(linear):
        import copy

        import bitsandbytes.functional as bnbf

        data, state = weight.data, weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            # bitsandbytes repacks 4-bit weights for its CPU kernel at the first eval forward
            # (absmax then kept in bf16); undo that on a copy so the module stays as it is
            data, state = bnbf._convert_weight_packed_for_cpu_inverse(data, copy.copy(state))
        return bnbf.dequantize_4bit(data, state).float()
    # a fresh fp32 copy: callers add the LoRA delta in place (.float() of fp32 would alias)
    return weight.detach().to(torch.float32, copy=True)


def _active_adapter_names(layer) -> list[str]:
    names = layer.active_adapters if hasattr(layer, "active_adapters") else [layer.active_adapter]
    if isinstance(names, str):
        names = [names]
    return list(names)


def _merged_lora_weight(layer) -> torch.Tensor:
    """W + sum over active, not-yet-merged adapters of scaling * B @ A, in fp32.

    `layer.scaling[name]` is what peft computed for the adapter (alpha / r, or alpha / sqrt(r)
    with rslora), so merging here matches peft's own forward."""
    base = layer.get_base_layer()
    w = _dequantized_weight(base)
    if getattr(layer, "disable_adapters", False):
        return w
    already = set(getattr(layer, "merged_adapters", []) or [])
    for name in _active_adapter_names(layer):
        if name in already or name not in layer.lora_A:
            continue
        dora = getattr(layer, "use_dora", {}).get(name, False)
        if dora and getattr(layer, "fan_in_fan_out", False):
            raise NotImplementedError("fastft cannot merge DoRA on fan_in_fan_out layers; save with save_method='lora'.")
        if not hasattr(layer.lora_A[name], "weight") or layer.lora_A[name].weight.ndim != 2:
            raise NotImplementedError(
                f"fastft merges LoRA on linear layers only; {type(layer).__name__} is not one. "
                "Save with save_method='lora' instead."
            )
        a = layer.lora_A[name].weight.detach().float().to(w.device)
        b = layer.lora_B[name].weight.detach().float().to(w.device)
        delta = (b @ a) * float(layer.scaling[name])
        if getattr(layer, "fan_in_fan_out", False):
            delta = delta.t()
        if dora:
            # DoRA: rows of W + dW rescaled to the learned magnitudes, m / ||W + dW|| per output row
            w += delta
            magnitude = layer.lora_magnitude_vector[name].weight.detach().float().to(w.device)
            w *= (magnitude / torch.linalg.norm(w, dim=1)).unsqueeze(1)
        else:
            w += delta
    return w


def _merged_lora_embedding(layer) -> torch.Tensor:
    """Embedding table + scaling * (B @ A)^T for the active adapters (peft's embedding LoRA:
    lora_embedding_A is [r, num_embeddings], lora_embedding_B is [embedding_dim, r])."""
    w = layer.get_base_layer().weight.detach().to(torch.float32, copy=True)
    if getattr(layer, "disable_adapters", False):
        return w
    already = set(getattr(layer, "merged_adapters", []) or [])
    for name in _active_adapter_names(layer):
        if name in already or name not in layer.lora_embedding_A:
            continue
        a = layer.lora_embedding_A[name].detach().float().to(w.device)
        b = layer.lora_embedding_B[name].detach().float().to(w.device)
        w += (b @ a).t() * float(layer.scaling[name])
    return w


def _merged_lora_bias(layer) -> torch.Tensor | None:
    base = layer.get_base_layer()
    bias = None if getattr(base, "bias", None) is None else base.bias.detach().float().clone()
    if getattr(layer, "disable_adapters", False):
        return bias
    already = set(getattr(layer, "merged_adapters", []) or [])
    for name in _active_adapter_names(layer):
        if name in already or name not in layer.lora_B:
            continue
        lora_bias = getattr(layer.lora_B[name], "bias", None)
        if lora_bias is not None:  # peft's lora_bias=True: merged as scaling * bias_B
            extra = lora_bias.detach().float() * float(layer.scaling[name])
            bias = extra if bias is None else bias + extra.to(bias.device)
    return bias


@dataclass
class PlannedTensor:
    """One tensor of the merged checkpoint: its HF name, shape, and how to compute it (fp32).

    `produce()` may return a view of a live parameter: callers must not modify it in place."""

    name: str
    shape: tuple[int, ...]
    source_dtype: torch.dtype
    produce: Callable[[], torch.Tensor]
    module_path: str = ""  # owning module, e.g. "model.layers.0.self_attn.q_proj"
    is_linear_weight: bool = False


def merged_tensor_plan(model) -> list[PlannedTensor]:
    """The merged model's tensors in checkpoint order, each computed only when asked for.

    Names are the transformers checkpoint names (peft's `base_layer` / `lora_*` levels removed);
    tied weights appear once (the input embedding), as transformers saves them."""
    hf = base_transformers_model(model)
    plan: list[PlannedTensor] = []
    done_prefixes: list[str] = []
    seen_storage: dict[tuple, str] = {}

    def under_done(name: str) -> bool:
        return any(name == p or name.startswith(p + ".") for p in done_prefixes)

    def add(name, shape, dtype, fn, module_path, is_linear_weight=False):
        plan.append(PlannedTensor(name, tuple(int(s) for s in shape), dtype, fn, module_path, is_linear_weight))

    for mod_name, module in hf.named_modules():
        if mod_name and under_done(mod_name):
            continue
        prefix = mod_name + "." if mod_name else ""
        if _is_lora_layer(module):
            base = module.get_base_layer()
            if isinstance(base, torch.nn.Embedding) and hasattr(module, "lora_embedding_A"):
                add(prefix + "weight", tuple(base.weight.shape), base.weight.dtype,
                    (lambda m=module: _merged_lora_embedding(m)), mod_name)
                done_prefixes.append(mod_name)
                continue
            if not hasattr(base, "out_features"):
                raise NotImplementedError(
                    f"{mod_name}: fastft merges LoRA on nn.Linear / bitsandbytes Linear4bit layers only "
                    f"(got {type(base).__name__}); save with save_method='lora'."
                )
            wdtype = _compute_dtype_of(base)
            add(prefix + "weight", (base.out_features, base.in_features), wdtype,
                (lambda m=module: _merged_lora_weight(m)), mod_name, True)
            if getattr(base, "bias", None) is not None or any(
                getattr(module.lora_B[n], "bias", None) is not None for n in module.lora_B
            ):
                add(prefix + "bias", (base.out_features,), wdtype, (lambda m=module: _merged_lora_bias(m)), mod_name)
            done_prefixes.append(mod_name)
            continue
        if _is_modules_to_save(module):
            active = _active_adapter_names(module)
            chosen = module.modules_to_save[active[0]] if active and active[0] in module.modules_to_save else module.original_module
            for pname, p in chosen.state_dict().items():
                add(prefix + pname, p.shape, p.dtype, (lambda t=p: t.detach().float()), mod_name)
            done_prefixes.append(mod_name)
            continue
        if _is_bnb_4bit(module):
            add(prefix + "weight", (module.out_features, module.in_features), _compute_dtype_of(module),
                (lambda m=module: _dequantized_weight(m)), mod_name, True)
            if module.bias is not None:
                add(prefix + "bias", module.bias.shape, module.bias.dtype, (lambda t=module.bias: t.detach().float()), mod_name)
            done_prefixes.append(mod_name)
            continue
        tensors = list(module.named_parameters(recurse=False))
        non_persistent = getattr(module, "_non_persistent_buffers_set", set())
        tensors += [(n, b) for n, b in module.named_buffers(recurse=False) if n not in non_persistent and b is not None]
        for pname, t in tensors:
            if t.device.type == "meta":
                raise ValueError(f"{prefix + pname} is on the meta device (offloaded?); load the model fully before saving.")
            key = (t.device, t.data_ptr(), tuple(t.shape))
            if t.numel() > 0 and key in seen_storage:
                continue  # tied weight (e.g. lm_head = embed_tokens): saved once
            seen_storage[key] = prefix + pname
            is_lin = pname == "weight" and isinstance(module, torch.nn.Linear)
            add(prefix + pname, t.shape, t.dtype,
                (lambda t=t: t.detach().float() if t.is_floating_point() else t.detach()), mod_name, is_lin)
    return plan


def _compute_dtype_of(linear) -> torch.dtype:
    if _is_bnb_4bit(linear):
        dt = getattr(linear, "compute_dtype", None) or getattr(linear.weight.quant_state, "dtype", None)
        return dt or torch.float16
    return linear.weight.dtype


def default_merged_dtype(model) -> torch.dtype:
    """The 16-bit dtype a merged save writes when none is given: the model's own floating dtype
    (an fp32 model stays fp32 so nothing is lost silently), a 4-bit model's compute dtype."""
    hf = base_transformers_model(model)
    counts: dict[torch.dtype, int] = {}
    for module in hf.modules():
        if _is_lora_layer(module):
            continue
        if _is_bnb_4bit(module):
            dt = _compute_dtype_of(module)
            counts[dt] = counts.get(dt, 0) + module.in_features * module.out_features
            continue
        for p in module.parameters(recurse=False):
            if p.is_floating_point() and p.dtype in (torch.float16, torch.bfloat16, torch.float32):
                counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    if not counts:
        return torch.float16
    return max(counts, key=counts.get)


# ----------------------------------------------------------------------------------------------
# resources
# ----------------------------------------------------------------------------------------------
def available_memory_bytes(unknown: int = 1 << 40) -> int:
    """Host memory available now; `unknown` where it cannot be read (the default does not block
    a save; offloaded checkpointing passes 0 so that it does not stash)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return unknown


def parse_size(size) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?i?B)\s*", str(size), re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size={size!r}: give bytes as an int or a string like '5GB' / '500MB'.")
    unit = m.group(2).upper()
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    return int(float(m.group(1)) * base**power)


def check_disk_space(target_dir: str, needed_bytes: int) -> None:
    parent = os.path.dirname(os.path.abspath(target_dir)) or "."
    free = shutil.disk_usage(parent).free
    margin = 64 << 20
    if needed_bytes + margin > free:
        raise OSError(
            f"Not enough disk space to save to {target_dir!r}: need about {needed_bytes / 2**30:.2f} GiB, "
            f"{free / 2**30:.2f} GiB free. Free some space or save somewhere else."
        )


def check_memory(largest_tensor_bytes: int, maximum_memory_usage: float) -> int:
    """Returns the RAM budget for one shard; raises before writing if even one tensor won't fit."""
    if not (0.0 < maximum_memory_usage <= 0.95):
        raise ValueError(f"maximum_memory_usage={maximum_memory_usage} must be in (0, 0.95].")
    budget = int(available_memory_bytes() * maximum_memory_usage)
    # the largest tensor is held in fp32 while merging, plus its cast copy
    if 2 * largest_tensor_bytes > budget:
        raise MemoryError(
            f"Saving needs about {2 * largest_tensor_bytes / 2**30:.2f} GiB of RAM for its largest tensor but "
            f"maximum_memory_usage={maximum_memory_usage} allows {budget / 2**30:.2f} GiB. Free memory, or "
            "raise maximum_memory_usage (at most 0.95)."
        )
    return budget - 2 * largest_tensor_bytes


# ----------------------------------------------------------------------------------------------
# atomic target folder
# ----------------------------------------------------------------------------------------------
def _is_fastft_save(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MARKER_FILE))


def check_target(save_directory: str, overwrite: bool) -> None:
    if os.path.exists(save_directory) and not os.path.isdir(save_directory):
        raise FileExistsError(f"{save_directory!r} exists and is a file; pick a folder name.")
    if os.path.isdir(save_directory) and os.listdir(save_directory) and not _is_fastft_save(save_directory) and not overwrite:
        raise FileExistsError(
            f"{save_directory!r} is not empty and was not written by fastft; refusing to replace it. "
            "Pass overwrite=True to replace it, or pick another folder."
        )


class AtomicSaveDir:
    """Write into a temporary sibling folder; on success swap it into place, on failure delete it.

    A crash (even a kill) never leaves a half-written model under the target name: until the
    final rename the files live in `<target>.fastft-tmp-*`, and the marker file is written last."""

    def __init__(self, save_directory: str, overwrite: bool, info: dict):
        self.target = os.path.abspath(save_directory)
        check_target(self.target, overwrite)
        self.info = info
        self.tmp = None

    def __enter__(self) -> str:
        parent = os.path.dirname(self.target)
        os.makedirs(parent, exist_ok=True)
        self.tmp = tempfile.mkdtemp(prefix=os.path.basename(self.target) + ".fastft-tmp-", dir=parent)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        files = sorted(os.path.relpath(os.path.join(r, f), self.tmp) for r, _, fs in os.walk(self.tmp) for f in fs)
        import fastft

        marker = dict(self.info, fastft_version=fastft.__version__, files=files, time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        with open(os.path.join(self.tmp, MARKER_FILE), "w") as f:
            json.dump(marker, f, indent=2)
        old = None
        if os.path.exists(self.target):
            old = self.target + f".fastft-old-{os.getpid()}-{int(time.time())}"
            os.rename(self.target, old)
        os.rename(self.tmp, self.target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return False


# ----------------------------------------------------------------------------------------------
# safetensors shards
# ----------------------------------------------------------------------------------------------
class ShardWriter:
    """Collects tensors and writes a safetensors shard whenever `shard_bytes` would be exceeded;
    `finish()` renames shards to model-0000i-of-0000n and writes the index (or a single
    model.safetensors when everything fit in one shard)."""

    def __init__(self, folder: str, shard_bytes: int):
        self.folder = folder
        self.shard_bytes = max(1, shard_bytes)
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[str, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.shard_bytes:
            self.flush()
        self.pending[name] = tensor.detach().to("cpu").contiguous()
        self.pending_bytes += nbytes
        self.total_bytes += nbytes

    def flush(self) -> None:
        if not self.pending:
            return
        from safetensors.torch import save_file

        fname = f"shard-{len(self.shards):05d}.safetensors.part"
        save_file(self.pending, os.path.join(self.folder, fname), metadata={"format": "pt"})
        self.shards.append((fname, list(self.pending)))
        self.pending = {}
        self.pending_bytes = 0

    def finish(self) -> list[str]:
        self.flush()
        n = len(self.shards)
        if n == 1:
            os.rename(os.path.join(self.folder, self.shards[0][0]), os.path.join(self.folder, "model.safetensors"))
            return ["model.safetensors"]
        weight_map = {}
        names = []
        for i, (part, keys) in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.rename(os.path.join(self.folder, part), os.path.join(self.folder, final))
            names.append(final)
            for k in keys:
                weight_map[k] = final
        with open(os.path.join(self.folder, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}, f, indent=2)
        return names


# ----------------------------------------------------------------------------------------------
# configs and tokenizer
# ----------------------------------------------------------------------------------------------
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _untied_output_name(model, plan: list[PlannedTensor]) -> bool:
    """True when the config ties input/output embeddings but the merged checkpoint has its own
    output weight (LoRA on lm_head made them differ): the written config must untie them."""
    hf = base_transformers_model(model)
    if not getattr(hf.config, "tie_word_embeddings", False) or not hasattr(hf, "get_output_embeddings"):
        return False
    out = hf.get_output_embeddings()
    names = {t.name for t in plan}
    for mod_name, module in hf.named_modules():
        if module is out or (_is_lora_layer(module) and module.get_base_layer() is out):
            return mod_name + ".weight" in names
    return False


def _write_config(model, folder: str, dtype: torch.dtype, quantization_config: dict | None, untie: bool = False) -> None:
    import copy

    hf = base_transformers_model(model)
    config = copy.deepcopy(hf.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    if quantization_config is not None:
        config.quantization_config = quantization_config
    config.dtype = _dtype_name(dtype)
    if untie:
        config.tie_word_embeddings = False
    if not getattr(config, "architectures", None):
        config.architectures = [type(hf).__name__]
    config.save_pretrained(folder)
    gen = getattr(hf, "generation_config", None)
    if gen is not None:
        try:
            gen.save_pretrained(folder)
        except Exception as e:  # an invalid generation config must not lose the weights
            import warnings

            warnings.warn(f"fastft: generation_config.json not written ({e}).", stacklevel=3)


def _save_tokenizer(tokenizer, folder: str) -> None:
    if tokenizer is None:
        return
    if not hasattr(tokenizer, "save_pretrained"):
        raise TypeError(f"tokenizer must be a transformers tokenizer or processor, got {type(tokenizer).__name__}.")
    tokenizer.save_pretrained(folder)


# ----------------------------------------------------------------------------------------------
# merged 4-bit (bitsandbytes NF4, the layout transformers loads with load_in_4bit)
# ----------------------------------------------------------------------------------------------
def _bnb_4bit_targets(model, plan: list[PlannedTensor]) -> tuple[set[str], dict]:
    """Which linear weights to store in NF4 and the quantization_config describing them."""
    hf = base_transformers_model(model)
    qc = getattr(hf.config, "quantization_config", None)
    if qc is not None and not isinstance(qc, dict):
        qc = qc.to_dict()
    skip = set((qc or {}).get("llm_int8_skip_modules") or [])
    skip.add("lm_head")
    out_emb = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    out_name = next((n for n, m in hf.named_modules() if m is out_emb), None) if out_emb is not None else None
    if out_name:
        skip.add(out_name)
    targets = set()
    for t in plan:
        if not t.is_linear_weight:
            continue
        parts = t.module_path.split(".")
        # a skip entry names a module ("lm_head") or a path prefix ("model.vision_tower")
        if any(s in parts or t.module_path == s or t.module_path.startswith(s + ".") for s in skip):
            continue
        if t.shape[1] % 64 != 0:
            continue
        targets.add(t.name)
    compute = (qc or {}).get("bnb_4bit_compute_dtype") or _dtype_name(default_merged_dtype(model))
    config = {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "load_in_8bit": False,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": bool((qc or {}).get("bnb_4bit_use_double_quant", True)),
        "bnb_4bit_compute_dtype": compute if isinstance(compute, str) else _dtype_name(compute),
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": sorted(skip),
    }
    return targets, config


def _nf4_tensors(name: str, weight: torch.Tensor, double_quant: bool) -> dict[str, torch.Tensor]:
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(weight.contiguous(), blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    out = {name: packed}
    prefix = name  # "...q_proj.weight" -> "...q_proj.weight.absmax" etc., as bitsandbytes serialises
    for k, v in state.as_dict(packed=True).items():
        out[f"{prefix}.{k}"] = v
    return out


# ----------------------------------------------------------------------------------------------
# public save functions
# ----------------------------------------------------------------------------------------------
def check_save_kwargs(name: str, kwargs: dict, accepted: set, push_instead: str) -> None:
    """The extra keyword arguments of a save function: `accepted` ones (and push_to_hub=False)
    pass silently, since scripts written for other tools pass them; others are a TypeError;
    push_to_hub=True says which call to use instead."""
    unknown = set(kwargs) - set(accepted) - {"push_to_hub"}
    if unknown:
        raise TypeError(f"{name} got unexpected arguments: {', '.join(sorted(unknown))}.")
    if kwargs.get("push_to_hub"):
        raise ValueError(f"{name}(push_to_hub=True) is not supported; call {push_instead} instead.")


def save_pretrained_merged(
    model,
    save_directory: str,
    tokenizer=None,
    save_method: str = "merged_16bit",
    maximum_memory_usage: float = 0.75,
    overwrite: bool = False,
    max_shard_size="5GB",
    dtype: torch.dtype | None = None,
    **kwargs,
) -> str:
    """Save LoRA adapters ("lora") or the merged model ("merged_16bit", "merged_4bit").

    merged_16bit writes the model's dtype (bf16/fp16; an fp32 model stays fp32 unless `dtype`
    is given) without any quantization_config, loadable by plain
    `AutoModelForCausalLM.from_pretrained`. merged_4bit writes bitsandbytes NF4 weights with a
    `quantization_config`, loadable by transformers with bitsandbytes installed. Returns the
    folder written."""
    if save_method not in SAVE_METHODS:
        raise ValueError(f"save_method={save_method!r}; choose one of {', '.join(SAVE_METHODS)}.")
    # accepted for scripts written against the familiar signature; the save is always safetensors
    check_save_kwargs("save_pretrained_merged", kwargs,
                      {"token", "safe_serialization", "temporary_location", "save_peft_format"},
                      "model.push_to_hub_merged(repo_id, tokenizer, save_method=...)")
    if save_method == "merged_4bit_forced":
        save_method = "merged_4bit"

    if save_method == "lora":
        if not _is_peft_model(model):
            raise ValueError("save_method='lora' needs a model with LoRA adapters (from get_peft_model).")
        # adapters are small; the check only guards against writing into a full disk
        lora_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" in n)
        check_disk_space(save_directory, lora_bytes)
        with AtomicSaveDir(save_directory, overwrite, {"save_method": "lora"}) as tmp:
            model.save_pretrained(tmp)
            _save_tokenizer(tokenizer, tmp)
        return os.path.abspath(save_directory)

    plan = merged_tensor_plan(model)
    dtype = dtype or default_merged_dtype(model)
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"dtype={dtype}: merged checkpoints are written in float16, bfloat16 or float32.")
    elem = torch.tensor([], dtype=dtype).element_size()
    numels = [int(torch.Size(t.shape).numel()) for t in plan]
    largest = max(numels) * 4 if numels else 0
    shard_budget = check_memory(largest, maximum_memory_usage)
    shard_bytes = min(parse_size(max_shard_size), max(shard_budget, 1))

    quant_config = None
    nf4_targets: set[str] = set()
    if save_method == "merged_4bit":
        nf4_targets, quant_config = _bnb_4bit_targets(model, plan)
        needed = sum(n // 2 + n // 16 if t.name in nf4_targets else n * elem for t, n in zip(plan, numels))
    else:
        needed = sum(n * elem for n in numels)
    check_disk_space(save_directory, needed)

    with AtomicSaveDir(save_directory, overwrite, {"save_method": save_method, "dtype": _dtype_name(dtype)}) as tmp:
        writer = ShardWriter(tmp, shard_bytes)
        with torch.no_grad():
            for t in plan:
                value = t.produce()
                if t.name in nf4_targets:
                    for k, v in _nf4_tensors(t.name, value.to(dtype), quant_config["bnb_4bit_use_double_quant"]).items():
                        writer.add(k, v)
                elif value.is_floating_point():
                    writer.add(t.name, value.to(dtype))
                else:
                    writer.add(t.name, value)
                del value
        writer.finish()
        _write_config(model, tmp, dtype, quant_config, untie=_untied_output_name(model, plan))
        _save_tokenizer(tokenizer, tmp)
    return os.path.abspath(save_directory)


def save_pretrained_gguf(model, save_directory: str, tokenizer=None, quantization_method="q8_0", **kwargs) -> list[str]:
    """Write the merged model as GGUF file(s) (one per quantization method) plus an Ollama
    Modelfile. See fastft.gguf_export.writer.save_gguf for the options."""
    from fastft.gguf_export.writer import save_gguf

    return save_gguf(model, save_directory, tokenizer, quantization_method=quantization_method, **kwargs)


# ----------------------------------------------------------------------------------------------
# Hub uploads
# ----------------------------------------------------------------------------------------------
def _hub_upload(folder: str, repo_id: str, token=None, private=None, commit_message=None) -> str:
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(
        folder_path=folder,
        repo_id=repo_id,
        commit_message=commit_message or "Upload with fastft",
        ignore_patterns=[MARKER_FILE],
    )
    return getattr(info, "commit_url", str(info))


def _push(save_fn, repo_id, token, private, commit_message, uploader):
    if not isinstance(repo_id, str) or not repo_id.strip():
        raise ValueError("repo_id must be a Hub repository name such as 'username/my-model'.")
    uploader = uploader or _hub_upload
    with tempfile.TemporaryDirectory(prefix="fastft-push-") as scratch:
        folder = os.path.join(scratch, repo_id.replace("/", "__"))
        save_fn(folder)
        return uploader(folder, repo_id, token=token, private=private, commit_message=commit_message)


def push_to_hub(model, repo_id: str, tokenizer=None, token=None, private=None, commit_message=None, uploader=None, **kwargs):
    """Upload the LoRA adapters (and tokenizer) to the Hub."""
    return _push(lambda d: save_pretrained_merged(model, d, tokenizer, save_method="lora", **kwargs),
                 repo_id, token, private, commit_message, uploader)


def push_to_hub_merged(model, repo_id: str, tokenizer=None, save_method="merged_16bit", token=None, private=None,
                       commit_message=None, uploader=None, **kwargs):
    """Save with save_pretrained_merged into a scratch folder and upload it."""
    return _push(lambda d: save_pretrained_merged(model, d, tokenizer, save_method=save_method, **kwargs),
                 repo_id, token, private, commit_message, uploader)


def push_to_hub_gguf(model, repo_id: str, tokenizer=None, quantization_method="q8_0", token=None, private=None,
                     commit_message=None, uploader=None, **kwargs):
    """Save with save_pretrained_gguf into a scratch folder and upload the GGUF file(s) and Modelfile."""
    return _push(lambda d: save_pretrained_gguf(model, d, tokenizer, quantization_method=quantization_method, **kwargs),
                 repo_id, token, private, commit_message, uploader)


_METHODS = {
    "save_pretrained_merged": save_pretrained_merged,
    "save_pretrained_gguf": save_pretrained_gguf,
    "push_to_hub": push_to_hub,
    "push_to_hub_merged": push_to_hub_merged,
    "push_to_hub_gguf": push_to_hub_gguf,
}


def attach_save_methods(model):
    """Bind the save/push helpers onto `model` (a PreTrainedModel or PeftModel) as methods, so
    `model.save_pretrained_merged(...)` etc. work; calling it again is harmless. Returns model.

    `model.save_pretrained` is left as peft's / transformers' own (adapters for a PeftModel)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"attach_save_methods expects a torch model, got {type(model).__name__}.")
    for name, fn in _METHODS.items():
        # object.__setattr__ skips nn.Module's attribute routing; a bound method is a plain attribute
        object.__setattr__(model, name, types.MethodType(fn, model))
    return model

