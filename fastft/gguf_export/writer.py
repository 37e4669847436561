"""Merged model -> GGUF file(s), written with the `gguf` package's GGUFWriter.

Tensors are streamed: the header and tensor table are written from the planned shapes and
types, then each tensor is merged (LoRA into base, NF4 dequantised), transformed the way
llama.cpp's converter does (Q/K row permutation for llama-architecture models, Gemma's stored
norm = 1 + w), quantised (fastft's torch K-quants on the GPU when there is one) and appended;
several quantisation methods are written in one pass over the model.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

import numpy as np
import torch

# quantization_method -> (base GGML type, llama.cpp file type name, K-mix)
QUANT_METHODS = {
    "f32": ("F32", "ALL_F32", None),
    "f16": ("F16", "MOSTLY_F16", None),
    "bf16": ("BF16", "MOSTLY_BF16", None),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0", None),
    "q4_0": ("Q4_0", "MOSTLY_Q4_0", None),
    "q4_k_m": ("Q4_K", "MOSTLY_Q4_K_M", "M"),
    "q5_k_m": ("Q5_K", "MOSTLY_Q5_K_M", "M"),
    "q6_k": ("Q6_K", "MOSTLY_Q6_K", None),
}
ALIASES = {"q4_k": "q4_k_m", "q5_k": "q5_k_m", "fp16": "f16", "float16": "f16", "bfloat16": "bf16",
           "fast_quantized": "q8_0", "quantized": "q4_k_m", "not_quantized": "f16"}

# K-quant row length must be a multiple of 256; llama.cpp then falls back like this
_K_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


@dataclass
class ArchSpec:
    gguf_arch: str
    permute_qk: bool = False  # llama.cpp's llama graph uses interleaved (GPT-J style) rope rows
    norm_plus_one: bool = False  # Gemma stores 1 + w for every RMSNorm weight
    post_attention_is_ffn_norm: bool = True  # llama: post_attention_layernorm feeds the MLP


ARCHS = {
    "llama": ArchSpec("llama", permute_qk=True),
    "mistral": ArchSpec("llama", permute_qk=True),
    "qwen2": ArchSpec("qwen2"),
    "qwen3": ArchSpec("qwen3"),
    "gemma2": ArchSpec("gemma2", norm_plus_one=True, post_attention_is_ffn_norm=False),
    "gemma3": ArchSpec("gemma3", norm_plus_one=True, post_attention_is_ffn_norm=False),
    "gemma3_text": ArchSpec("gemma3", norm_plus_one=True, post_attention_is_ffn_norm=False),
}

_LAYER_MAP = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}


def gguf_tensor_name(hf_name: str, spec: ArchSpec) -> str:
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf_name in fixed:
        return fixed[hf_name]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", hf_name)
    if m:
        layer, module, kind = m.groups()
        if module == "post_attention_layernorm":
            name = "ffn_norm" if spec.post_attention_is_ffn_norm else "post_attention_norm"
        else:
            name = _LAYER_MAP.get(module)
        if name is not None:
            return f"blk.{layer}.{name}.{kind}"
    raise NotImplementedError(
        f"GGUF export: no llama.cpp name for tensor {hf_name!r} of architecture {spec.gguf_arch}; "
        "this model variant is not supported yet."
    )


_VISION_PREFIXES = ("model.vision_tower.", "model.multi_modal_projector.", "vision_tower.", "multi_modal_projector.")


def text_model_name(hf_name: str) -> str | None:
    """Checkpoint name of the text model inside a vision-language model (Gemma 3), or None for
    vision tensors, which llama.cpp keeps in a separate mmproj file."""
    if hf_name.startswith(_VISION_PREFIXES):
        return None
    for outer, inner in (("model.language_model.", "model."), ("language_model.model.", "model."),
                         ("language_model.lm_head.", "lm_head.")):
        if hf_name.startswith(outer):
            return inner + hf_name[len(outer):]
    return hf_name


def _permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    # HF stores each head's rotary pairs as [first halves | second halves]; llama.cpp's llama
    # graph expects them interleaved: rows (h, 2, d/2) -> (h, d/2, 2)
    rest = w.shape[1:]
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *rest).swapaxes(1, 2).reshape(w.shape)


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    # llama.cpp's choice of layers kept at higher precision in the _M mixes: the first and last
    # eighth of the layers and every third one in between
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def choose_type(gguf_name: str, shape: tuple[int, ...], method: str, n_layers: int, has_output: bool) -> str:
    """The GGML type of one tensor under `method`, following llama.cpp's llama-quantize rules."""
    base, _, mix = QUANT_METHODS[method]
    if len(shape) < 2 or gguf_name == "rope_freqs.weight":
        return "F32"  # norms, biases, rope factors
    if base in ("F32", "F16", "BF16"):
        return base
    cols = shape[-1]
    t = base
    is_output = gguf_name == "output.weight" or (not has_output and gguf_name == "token_embd.weight")
    m = re.match(r"blk\.(\d+)\.", gguf_name)
    layer = int(m.group(1)) if m else -1
    if is_output and base != "Q8_0":
        t = "Q6_K"
    elif mix == "M" and (".attn_v." in gguf_name or ".ffn_down." in gguf_name) and _use_more_bits(layer, n_layers):
        t = "Q6_K"
    if t in _K_FALLBACK and cols % 256 != 0:
        t = _K_FALLBACK[t]
    if t != "F16" and cols % 32 != 0:
        t = "F16"
    return t


def _nbytes(type_name: str, shape: tuple[int, ...]) -> int:
    import gguf

    qt = gguf.GGMLQuantizationType[type_name]
    block, size = gguf.GGML_QUANT_SIZES[qt]
    n = math.prod(shape)
    return n // block * size


def _rope_params(config) -> dict:
    rp = getattr(config, "rope_parameters", None) or {}
    if "full_attention" in rp and isinstance(rp["full_attention"], dict):
        rp = rp["full_attention"]
    rp = dict(rp)
    if "rope_theta" not in rp and getattr(config, "rope_theta", None) is not None:
        rp["rope_theta"] = config.rope_theta
    legacy = getattr(config, "rope_scaling", None)
    if isinstance(legacy, dict) and "rope_type" not in rp:
        rp.update(legacy)
    rp.setdefault("rope_type", rp.get("type", "default"))
    return rp


def _local_rope_theta(config) -> float | None:
    rp = getattr(config, "rope_parameters", None) or {}
    if isinstance(rp.get("sliding_attention"), dict):
        return rp["sliding_attention"].get("rope_theta")
    return getattr(config, "rope_local_base_freq", None)


def llama3_rope_factors(rp: dict, head_dim: int) -> torch.Tensor:
    """Per-frequency divisors for Llama 3.1-style rope scaling, stored as rope_freqs.weight
    (llama.cpp divides each rotary frequency by the factor)."""
    base = float(rp["rope_theta"])
    factor = float(rp.get("factor", 8.0))
    low = float(rp.get("low_freq_factor", 1.0))
    high = float(rp.get("high_freq_factor", 4.0))
    old_ctx = float(rp.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    wavelen = 2 * math.pi / freqs
    smooth = (old_ctx / wavelen - low) / (high - low)
    mid = 1.0 / ((1 - smooth) / factor + smooth)
    out = torch.where(wavelen < old_ctx / high, torch.ones_like(freqs), torch.where(wavelen > old_ctx / low, torch.full_like(freqs, factor), mid))
    return out.float()


def _add_arch_metadata(w, config, spec: ArchSpec, model_type: str, n_vocab: int) -> list[tuple[str, torch.Tensor]]:
    """Architecture key/values; returns extra tensors the architecture needs (rope factors)."""
    import gguf

    hidden = config.hidden_size
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    head_dim = getattr(config, "head_dim", None) or hidden // n_head
    w.add_context_length(int(config.max_position_embeddings))
    w.add_embedding_length(int(hidden))
    w.add_block_count(int(config.num_hidden_layers))
    w.add_feed_forward_length(int(config.intermediate_size))
    w.add_head_count(int(n_head))
    w.add_head_count_kv(int(n_kv))
    w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    w.add_vocab_size(int(n_vocab))
    w.add_key_length(int(head_dim))
    w.add_value_length(int(head_dim))
    rp = _rope_params(config)
    w.add_rope_freq_base(float(rp.get("rope_theta", 10000.0)))
    if spec.gguf_arch == "llama":
        w.add_rope_dimension_count(int(head_dim))
    extra: list[tuple[str, torch.Tensor]] = []
    rtype = rp.get("rope_type", "default")
    if rtype == "llama3":
        extra.append(("rope_freqs.weight", llama3_rope_factors(rp, head_dim)))
    elif rtype == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rp["factor"]))
    elif rtype == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rp["factor"]))
        if rp.get("original_max_position_embeddings"):
            w.add_rope_scaling_orig_ctx_len(int(rp["original_max_position_embeddings"]))
    elif rtype not in ("default", None):
        raise NotImplementedError(f"GGUF export: rope_type {rtype!r} is not supported yet.")

    if spec.gguf_arch in ("gemma2", "gemma3"):
        sw = getattr(config, "sliding_window", None)
        if sw:
            w.add_sliding_window(int(sw))
        if getattr(config, "attn_logit_softcapping", None):
            w.add_attn_logit_softcapping(float(config.attn_logit_softcapping))
        if getattr(config, "final_logit_softcapping", None):
            w.add_final_logit_softcapping(float(config.final_logit_softcapping))
        local = _local_rope_theta(config)
        if spec.gguf_arch == "gemma3" and local is not None:
            w.add_rope_freq_base_swa(float(local))
    elif spec.gguf_arch in ("qwen2", "qwen3") and getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None):
        w.add_sliding_window(int(config.sliding_window))
    return extra


def _normalise_methods(quantization_method) -> list[str]:
    methods = [quantization_method] if isinstance(quantization_method, str) else list(quantization_method)
    out = []
    for m in methods:
        key = str(m).lower()
        key = ALIASES.get(key, key)
        if key not in QUANT_METHODS:
            raise ValueError(
                f"quantization_method={m!r} is not supported; choose from {', '.join(QUANT_METHODS)} (or a list)."
            )
        if key not in out:
            out.append(key)
    if not out:
        raise ValueError("quantization_method is empty; give e.g. 'q4_k_m' or ['q4_k_m', 'q8_0'].")
    return out


def _file_stem(model, config) -> str:
    name = getattr(config, "_name_or_path", "") or ""
    stem = os.path.basename(str(name).rstrip("/")) or "model"
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-.") or "model"
    return stem


def _quant_device(prefer: str | None) -> torch.device:
    if prefer:
        return torch.device(prefer)
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def save_gguf(
    model,
    save_directory: str,
    tokenizer=None,
    quantization_method="q8_0",
    maximum_memory_usage: float = 0.75,
    overwrite: bool = False,
    model_name: str | None = None,
    device: str | None = None,
    write_modelfile: bool = True,
    **kwargs,
) -> list[str]:
    """Write one GGUF per quantization method (and an Ollama Modelfile) into `save_directory`.

    Returns the GGUF paths. `tokenizer` is required (llama.cpp needs the vocabulary)."""
    import gguf

    from fastft import save as fsave
    from fastft.gguf_export.kquants import quantize
    from fastft.gguf_export.ollama import modelfile_text
    from fastft.gguf_export.tokenizer import add_vocab_to_writer, build_vocab

    # arguments scripts pass for other tools' conversion steps: nothing to do here
    fsave.check_save_kwargs("save_pretrained_gguf", kwargs,
                            {"first_conversion", "temporary_location", "token", "private"},
                            "model.push_to_hub_gguf(repo_id, tokenizer, quantization_method=...)")
    if tokenizer is None:
        raise ValueError("save_pretrained_gguf needs the tokenizer (llama.cpp reads the vocabulary from the GGUF).")
    methods = _normalise_methods(quantization_method)

    hf = fsave.base_transformers_model(model)
    config = hf.config
    model_type = getattr(config, "model_type", None)
    spec = ARCHS.get(model_type)
    if spec is None:
        raise NotImplementedError(
            f"GGUF export supports {', '.join(sorted(set(ARCHS) - {'gemma3_text'}))}; this model is {model_type!r}. "
            "Save with save_pretrained_merged and convert with llama.cpp's convert_hf_to_gguf.py."
        )
    top_config = config
    if getattr(config, "text_config", None) is not None:
        config = config.text_config  # vision-language model: the GGUF holds the text model
    tokenizer = tokenizer if hasattr(tokenizer, "get_vocab") else getattr(tokenizer, "tokenizer", tokenizer)

    plan = fsave.merged_tensor_plan(model)
    n_vocab = int(config.vocab_size)
    vocab = build_vocab(tokenizer, n_vocab)

    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    n_layers = int(config.num_hidden_layers)

    entries = []  # (gguf name, shape, producer)
    for t in plan:
        text_name = text_model_name(t.name)
        if text_name is None:
            continue
        gname = gguf_tensor_name(text_name, spec)
        shape = t.shape

        def produce(t=t, gname=gname):
            x = t.produce().float()
            if spec.permute_qk and gname.endswith("attn_q.weight"):
                x = _permute_qk(x, n_head)
            elif spec.permute_qk and gname.endswith("attn_k.weight"):
                x = _permute_qk(x, n_kv)
            elif spec.permute_qk and (gname.endswith("attn_q.bias") or gname.endswith("attn_k.bias")):
                x = _permute_qk(x, n_head if "attn_q" in gname else n_kv)
            if spec.norm_plus_one and gname.endswith("norm.weight"):
                x = x + 1.0
            return x

        entries.append((gname, shape, produce))

    stem = model_name or _file_stem(model, top_config)
    files = [f"{stem}.{m.upper()}.gguf" for m in methods]

    # a pass over the metadata only: the extra tensors (rope factors) and the byte sizes
    probe = gguf.GGUFWriter(None, spec.gguf_arch)
    extras = _add_arch_metadata(probe, config, spec, model_type, n_vocab)
    for name, tensor in extras:
        entries.append((name, tuple(tensor.shape), (lambda tensor=tensor: tensor)))
    has_output = any(e[0] == "output.weight" for e in entries)
    types = {m: [choose_type(name, shape, m, n_layers, has_output) for name, shape, _ in entries] for m in methods}
    total = sum(_nbytes(ty, shape) for m in methods for (_, shape, _), ty in zip(entries, types[m]))
    largest = max(math.prod(shape) for _, shape, _ in entries) * 4
    fsave.check_memory(largest * 2, maximum_memory_usage)
    fsave.check_disk_space(save_directory, total + len(vocab.tokens) * 64)

    qdev = _quant_device(device)
    with fsave.AtomicSaveDir(save_directory, overwrite, {"save_method": "gguf", "quantization_methods": methods}) as tmp:
        writers = []
        try:
            for m, fname in zip(methods, files):
                w = gguf.GGUFWriter(os.path.join(tmp, fname), spec.gguf_arch)
                w.add_name(stem)
                w.add_file_type(int(gguf.LlamaFileType[QUANT_METHODS[m][1]]))
                w.add_quantization_version(gguf.GGML_QUANT_VERSION)
                _add_arch_metadata(w, config, spec, model_type, n_vocab)
                add_vocab_to_writer(w, vocab)
                for (name, shape, _), ty in zip(entries, types[m]):
                    qt = gguf.GGMLQuantizationType[ty]
                    # a float dtype makes the writer take `shape` as the logical shape (not bytes)
                    w.add_tensor_info(name, shape, np.dtype(np.float32), _nbytes(ty, shape), raw_dtype=qt)
                w.write_header_to_file()
                w.write_kv_data_to_file()
                w.write_ti_data_to_file()
                writers.append(w)
            with torch.no_grad():
                for i, (name, shape, produce) in enumerate(entries):
                    x = produce()
                    if x.device != qdev and x.ndim >= 2:
                        x = x.to(qdev)
                    for m, w in zip(methods, writers):
                        data = quantize(x, types[m][i])
                        w.write_tensor_data(data)
                    del x
        finally:
            for w in writers:
                w.close()
        if write_modelfile:
            eos_tok = getattr(tokenizer, "eos_token", None)
            with open(os.path.join(tmp, "Modelfile"), "w") as f:
                f.write(modelfile_text(files[0], vocab.chat_template, eos_tok))
    return [os.path.join(os.path.abspath(save_directory), f) for f in files]
