"""Time save_pretrained_gguf on a Llama-3.1-8B-shaped model (random init, bf16, on the GPU).

    python bench/bench_gguf_export.py --out DIR [--method q4_k_m] [--layers 32] [--no-lora]

Builds the model from a LlamaConfig (no download), adds LoRA r=16 on every projection (so the
merge path is timed too), exports with fastft's own quantisers on the GPU, and writes
DIR/bench_gguf_export.json with the wall time, the time spent quantising, the file size and
a quality spot check (Q4_K rel. RMSE of one dequantised weight). The GGUF itself goes to a
scratch folder (--work, default under /tmp) and is deleted unless --keep.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_tokenizer():
    """A small byte-level BPE with Llama-3 style specials; the GGUF pads it to the model vocab."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["The quick brown fox jumps over the lazy dog. 0123456789"] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for bench_gguf_export.json")
    ap.add_argument("--work", default=None, help="scratch folder for the GGUF (default: a temp dir)")
    ap.add_argument("--method", default="q4_k_m")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--no-lora", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the GGUF file")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, to check the script runs (CPU)")
    args = ap.parse_args()

    from fastft import save  # before transformers, as users do
    import numpy as np
    import torch
    import transformers

    from fastft.gguf_export import kquants

    if not torch.cuda.is_available():
        print("warning: no CUDA device; timing the CPU path", file=sys.stderr)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    config = transformers.LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=args.layers,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128009,
        rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_theta": 500000.0},
    )
    if args.smoke:
        config.vocab_size, config.hidden_size, config.intermediate_size = 4096, 512, 1024
        config.num_attention_heads, config.num_key_value_heads, config.num_hidden_layers = 4, 2, 2
    config._name_or_path = "llama-3.1-8b-shaped"
    t0 = time.perf_counter()
    torch.manual_seed(0)
    old_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config)
    torch.set_default_dtype(old_dtype)
    model.eval()
    if not args.no_lora:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(
            r=16, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 1e-3)
    if device == "cuda":
        torch.cuda.synchronize()
    build_s = time.perf_counter() - t0
    tokenizer = tiny_tokenizer()

    # time spent inside the quantisers (includes the device->host copy of the packed bytes)
    quant_time = [0.0]
    real_quantize = kquants.quantize

    def timed_quantize(x, t):
        s = time.perf_counter()
        out = real_quantize(x, t)
        quant_time[0] += time.perf_counter() - s
        return out

    kquants.quantize = timed_quantize
    work = args.work or tempfile.mkdtemp(prefix="fastft-bench-gguf-")
    target = os.path.join(work, "gguf")
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    files = save.save_pretrained_gguf(model, target, tokenizer, quantization_method=args.method, overwrite=True)
    export_s = time.perf_counter() - t0
    kquants.quantize = real_quantize

    # spot check: one Q4_K weight read back with gguf's dequantiser against the merged weight
    import gguf

    reader = gguf.GGUFReader(files[0])
    t = next(t for t in reader.tensors if t.name == "blk.1.attn_q.weight")
    deq = gguf.quants.dequantize(t.data, t.tensor_type)
    base = save.base_transformers_model(model)
    want = save._merged_lora_weight(base.model.layers[1].self_attn.q_proj) if not args.no_lora else base.model.layers[1].self_attn.q_proj.weight.float()
    from fastft.gguf_export.writer import _permute_qk

    want = _permute_qk(want.float(), config.num_attention_heads).cpu().numpy()
    spot = float(np.sqrt(np.mean((deq - want) ** 2)) / np.sqrt(np.mean(want**2)))

    result = {
        "bench": "gguf_export",
        "method": args.method,
        "model": ("SMOKE (tiny shapes) " if args.smoke else "") + f"Llama-3.1-8B-shaped ({config.num_hidden_layers} layers), bf16, random init" + ("" if args.no_lora else ", LoRA r=16 merged"),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "export_seconds": round(export_s, 2),
        "quantize_seconds": round(quant_time[0], 2),
        "build_seconds": round(build_s, 2),
        "file_bytes": os.path.getsize(files[0]),
        "peak_gpu_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None,
        "spot_check": {"tensor": "blk.1.attn_q.weight", "type": t.tensor_type.name, "rel_rmse": round(spot, 5)},
        "under_2_minutes": export_s < 120,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_gguf_export.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    if not args.keep:
        shutil.rmtree(target, ignore_errors=True)
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
