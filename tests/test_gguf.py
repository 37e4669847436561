"""save_pretrained_gguf: every family's GGUF read back by the `gguf` reader (tensors, shapes, types,
metadata, tokenizer) and by transformers' GGUF loader (logits against the un-merged LoRA model).

Expected names, types and layouts are written out here independently of fastft's tables.
Quantised files are judged against the error the format itself implies: each weight gets
uniform noise of one quantisation step per sub-block (the step a plain min/max choice gives,
see test_kquants.py), and the GGUF's logit error must be no worse than 1.5x that noise's.
"""
import copy
import math
import os
import re

import numpy as np
import pytest
import torch

import fastft  # noqa: F401  (before transformers/peft, as users import it)

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from _fastft_save_helpers import FAMILIES, add_lora, logits, rel_err, sample_ids, tiny_model  # noqa: E402

from fastft import save  # noqa: E402
from fastft.gguf_export import ollama, writer  # noqa: E402


# tiny tensors: one intra-op thread is faster (see conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")

GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2", "gemma3": "gemma3"}
GEMMA = ("gemma2", "gemma3")
# llama.cpp tensor names for the HF module names of these families
LAYER_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
}


def expected_name(hf_name, family):
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
    if hf_name in top:
        return top[hf_name]
    layer, module, kind = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", hf_name).groups()
    if module == "post_attention_layernorm":
        short = "post_attention_norm" if family in GEMMA else "ffn_norm"
    else:
        short = LAYER_NAMES[module]
    return f"blk.{layer}.{short}.{kind}"


def field(reader, key):
    f = reader.fields[key]
    return f.contents()


def tensors_by_name(reader):
    return {t.name: t for t in reader.tensors}


def dequant(t):
    return gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(int(s) for s in reversed(t.shape)))


def step_per_value(w: np.ndarray, type_name: str) -> np.ndarray:
    """Quantisation step of the plain min/max (or absmax) choice, per value, for `type_name`."""
    def per_block(n, fn):
        b = w.reshape(-1, n)
        return np.repeat(fn(b), n).reshape(w.shape)

    rng = lambda b: b.max(1) - np.minimum(b.min(1), 0.0)  # noqa: E731
    amax = lambda b: np.abs(b).max(1)  # noqa: E731
    table = {
        "Q4_K": (32, lambda b: rng(b) / 15), "Q5_K": (32, lambda b: rng(b) / 31), "Q6_K": (16, lambda b: amax(b) / 32),
        "Q8_0": (32, lambda b: amax(b) / 127), "Q4_0": (32, lambda b: amax(b) / 8), "Q5_0": (32, lambda b: amax(b) / 16),
        "Q5_1": (32, lambda b: (b.max(1) - b.min(1)) / 31),
    }
    if type_name in ("F32", "F16", "BF16"):
        return np.zeros_like(w)
    n, fn = table[type_name]
    return per_block(n, fn)


def noise_model_logit_error(merged, type_of_hf_name, ids, seed=0):
    """Logit error of the merged model after uniform +-step/2 noise on every quantised weight."""
    noisy = copy.deepcopy(merged)
    g = np.random.default_rng(seed)
    with torch.no_grad():
        for name, p in noisy.named_parameters():
            ty = type_of_hf_name.get(name)
            if ty is None or p.ndim != 2:
                continue
            w = p.detach().numpy()
            noise = (g.random(w.shape, dtype=np.float32) - 0.5) * step_per_value(w, ty)
            p.copy_(torch.from_numpy(w + noise))
    return rel_err(logits(noisy, ids), logits(merged, ids))


# every method on some family; each K-quant method costs a few seconds of CPU per family
METHODS = {
    "llama": ["f16", "q8_0", "q4_k_m", "bf16"],
    "mistral": ["f16", "q4_k_m"],
    "qwen2": ["f16", "q5_k_m"],
    "qwen3": ["f16", "q8_0", "q6_k"],
    "gemma2": ["f16", "q8_0", "q4_k_m"],
    "gemma3": ["bf16", "q6_k"],
}


@pytest.mark.parametrize("family", FAMILIES)
def test_gguf_export_reads_back(family, tmp_path):
    base, tok = tiny_model(family, tmp_path)
    pm = add_lora(base)
    ids = sample_ids(len(tok))
    ref = logits(pm, ids)
    merged = copy.deepcopy(pm).merge_and_unload()  # peft's own merge, as an independent reference
    merged_sd = {k: v for k, v in merged.state_dict().items()}
    if merged.config.tie_word_embeddings:
        merged_sd.pop("lm_head.weight", None)
    cfg = merged.config
    methods = METHODS[family]

    save.attach_save_methods(pm)
    files = pm.save_pretrained_gguf(str(tmp_path / "gguf"), tok, quantization_method=methods)
    assert [os.path.basename(f) for f in files] == [f"base-{family}.{m.upper()}.gguf" for m in methods]
    folder = os.path.dirname(files[0])
    assert sorted(os.listdir(folder)) == sorted([os.path.basename(f) for f in files] + ["Modelfile", save.MARKER_FILE])

    expected = {expected_name(k, family): tuple(v.shape) for k, v in merged_sd.items()}
    hf_of = {expected_name(k, family): k for k in merged_sd}
    arch = GGUF_ARCH[family]
    readers = {m: gguf.GGUFReader(f) for m, f in zip(methods, files)}
    for m, r in readers.items():
        ts = tensors_by_name(r)
        assert set(ts) == set(expected), (m, set(ts) ^ set(expected))
        for name, shape in expected.items():
            assert tuple(int(s) for s in reversed(ts[name].shape)) == shape, name
            if len(shape) == 1:
                assert ts[name].tensor_type == gguf.GGMLQuantizationType.F32, name
        assert field(r, "general.architecture") == arch
        assert field(r, f"{arch}.block_count") == 2
        assert field(r, f"{arch}.embedding_length") == 256
        assert field(r, f"{arch}.feed_forward_length") == 512
        assert field(r, f"{arch}.attention.head_count") == cfg.num_attention_heads
        assert field(r, f"{arch}.attention.head_count_kv") == cfg.num_key_value_heads
        assert field(r, f"{arch}.attention.key_length") == cfg.head_dim
        assert field(r, f"{arch}.context_length") == 512
        assert abs(field(r, f"{arch}.attention.layer_norm_rms_epsilon") - 1e-6) < 1e-12
        assert field(r, "tokenizer.ggml.model") == ("gpt2" if family in ("llama", "qwen2", "qwen3") else "llama")
        tokens = field(r, "tokenizer.ggml.tokens")
        assert len(tokens) == cfg.vocab_size == len(tok)
        assert tokens[tok.eos_token_id] == tok.eos_token
        assert field(r, "tokenizer.ggml.bos_token_id") == tok.bos_token_id
        assert field(r, "tokenizer.ggml.eos_token_id") == tok.eos_token_id
        assert field(r, "tokenizer.chat_template") == tok.chat_template
        types = field(r, "tokenizer.ggml.token_type")
        assert types[tok.eos_token_id] == gguf.TokenType.CONTROL
        if family in ("mistral",) + GEMMA:
            assert types[tok.convert_tokens_to_ids("<0x41>")] == gguf.TokenType.BYTE
            assert len(field(r, "tokenizer.ggml.scores")) == len(tok)
            assert field(r, "tokenizer.ggml.add_space_prefix") == (family == "mistral")
        else:
            assert len(field(r, "tokenizer.ggml.merges")) > 100
            assert field(r, "tokenizer.ggml.pre") == {"llama": "llama-bpe", "qwen3": "qwen2", "qwen2": "qwen2"}[family]
        if family == "gemma2":
            assert field(r, "gemma2.attn_logit_softcapping") == 50.0
            assert field(r, "gemma2.final_logit_softcapping") == 30.0
        if family in GEMMA:
            assert field(r, f"{arch}.attention.sliding_window") == 128

    # tensor types of the K-quant mixes, as llama.cpp picks them for a 2-layer model
    tied = "output.weight" not in expected
    out_name = "token_embd.weight" if tied else "output.weight"
    for m in methods:
        ts = tensors_by_name(readers[m])
        t = {n: ts[n].tensor_type.name for n in ts if len(expected[n]) == 2}
        if m == "q4_k_m":
            assert t[out_name] == "Q6_K"
            assert t["blk.0.attn_v.weight"] == "Q4_K" and t["blk.1.attn_v.weight"] == "Q6_K"
            assert t["blk.0.ffn_down.weight"] == "Q4_K" and t["blk.1.ffn_down.weight"] == "Q6_K"
            assert t["blk.0.attn_q.weight"] == "Q4_K" and t["blk.1.ffn_gate.weight"] == "Q4_K"
        if m == "q6_k":
            assert set(t.values()) == {"Q6_K"}
        if m == "q8_0":
            assert set(t.values()) == {"Q8_0"}
        if m in ("f16", "bf16"):
            assert set(t.values()) == {m.upper()}

    # stored values: Gemma norms are 1 + w; llama/mistral q/k rows interleaved per head
    hi = readers[methods[0]]
    ts = tensors_by_name(hi)
    for gname, hf_name in hf_of.items():
        stored = dequant(ts[gname])
        want = merged_sd[hf_name].float().numpy()
        if family in GEMMA and hf_name.endswith("norm.weight"):
            want = want + 1.0
        if family in ("llama", "mistral") and (".attn_q." in gname or ".attn_k." in gname):
            heads = cfg.num_attention_heads if ".attn_q." in gname else cfg.num_key_value_heads
            d = want.shape[0] // heads
            perm = np.empty_like(want)
            for h in range(heads):
                for i in range(d // 2):
                    perm[h * d + 2 * i] = want[h * d + i]
                    perm[h * d + 2 * i + 1] = want[h * d + d // 2 + i]
            want = perm
        tol = 1e-2 if ts[gname].tensor_type != gguf.GGMLQuantizationType.F32 else 1e-6
        assert rel_err(torch.from_numpy(np.array(stored, dtype=np.float32)), torch.from_numpy(want)) < tol, gname

    # quantised tensors: round-trip error no worse than the format's plain-step error
    for m in methods:
        ts = tensors_by_name(readers[m])
        for gname, hf_name in hf_of.items():
            ty = ts[gname].tensor_type.name
            if ty in ("F32", "F16", "BF16"):
                continue
            stored = dequant(ts[gname])
            want = dequant(tensors_by_name(hi)[gname]).astype(np.float32)
            err = np.sqrt(np.mean((stored - want) ** 2))
            theory = np.sqrt(np.mean(step_per_value(want, ty) ** 2) / 12)
            assert err <= 1.05 * theory + 1e-7, (m, gname, ty, err, theory)

    # transformers' own GGUF loader
    for m, f in zip(methods, files):
        loaded = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=os.path.basename(f), dtype=torch.float32)
        err = rel_err(logits(loaded, ids), ref)
        if m in ("f16", "bf16"):
            assert err <= 1e-2, (m, err)
        elif m == "q8_0":
            assert err <= 3e-2, (m, err)
        else:
            ts = tensors_by_name(readers[m])
            type_of = {hf_of[n]: ts[n].tensor_type.name for n in ts}
            if tied:
                type_of["lm_head.weight"] = type_of["model.embed_tokens.weight"]
            bound = noise_model_logit_error(merged, type_of, ids)
            assert err <= 1.5 * bound, (m, err, bound)
            assert err > 0.1 * bound  # the comparison is not vacuous

    # the tokenizer transformers rebuilds from the file encodes like the original (transformers
    # releases without a GGUF Gemma BPE builder rebuild Gemma vocabularies as a Unigram model from
    # the scores, an approximation of BPE: there the Gemma files are not compared)
    gtok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=os.path.basename(files[0]))
    import importlib

    try:
        mapping = importlib.import_module("transformers.integrations.gguf.gguf_tokenizer_mapping")
        gemma_as_bpe = hasattr(mapping, "gemma_tokenizer")
    except ImportError:
        gemma_as_bpe = False
    if gemma_as_bpe or family not in GEMMA:
        for text in ["Hello world! The quick brown fox.", "café 12345 émigré\n  two  spaces", "capital of France?"]:
            assert gtok(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"], text

    modelfile = open(os.path.join(folder, "Modelfile")).read()
    assert modelfile.startswith(f"FROM ./{os.path.basename(files[0])}\n")
    marker = "<start_of_turn>" if family in ("mistral",) + GEMMA else "<|im_start|>"
    assert marker in modelfile
    assert f'PARAMETER stop "{tok.eos_token}"' in modelfile


def test_choose_type_follows_llama_cpp_rules():
    more_bits_32 = [i for i in range(32) if writer.choose_type(f"blk.{i}.ffn_down.weight", (4096, 14336), "q4_k_m", 32, True) == "Q6_K"]
    assert more_bits_32 == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    assert writer.choose_type("blk.5.attn_q.weight", (4096, 4096), "q4_k_m", 32, True) == "Q4_K"
    assert writer.choose_type("blk.5.attn_q.weight", (4096, 4096), "q5_k_m", 32, True) == "Q5_K"
    assert writer.choose_type("output.weight", (128256, 4096), "q4_k_m", 32, True) == "Q6_K"
    assert writer.choose_type("token_embd.weight", (128256, 4096), "q4_k_m", 32, True) == "Q4_K"
    assert writer.choose_type("token_embd.weight", (128256, 4096), "q4_k_m", 32, False) == "Q6_K"  # tied
    assert writer.choose_type("output.weight", (128256, 4096), "q8_0", 32, True) == "Q8_0"
    assert writer.choose_type("blk.0.attn_norm.weight", (4096,), "q4_k_m", 32, True) == "F32"
    # rows that are not a multiple of 256 (K-quants) or 32 (everything else)
    # (4896 = 153 * 32; layer 4 of 24 is not a "more bits" layer, layer 0 is)
    assert writer.choose_type("blk.4.ffn_down.weight", (896, 4896), "q4_k_m", 24, True) == "Q5_0"
    assert writer.choose_type("blk.0.ffn_down.weight", (896, 4896), "q4_k_m", 24, True) == "Q8_0"
    assert writer.choose_type("blk.4.ffn_down.weight", (896, 4896), "q5_k_m", 24, True) == "Q5_1"
    assert writer.choose_type("blk.4.ffn_up.weight", (4896, 900), "q4_k_m", 24, True) == "F16"
    assert writer.choose_type("blk.4.ffn_up.weight", (4896, 896), "bf16", 24, True) == "BF16"
    with pytest.raises(ValueError, match="quantization_method"):
        writer._normalise_methods(["q4_k_m", "q3_k_xl"])
    assert writer._normalise_methods(["Q4_K_M", "q4_k", "not_quantized"]) == ["q4_k_m", "f16"]


def test_llama3_rope_factors_match_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rp = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192, "rope_theta": 500000.0}
    cfg = transformers.LlamaConfig(hidden_size=4096, num_attention_heads=32, max_position_embeddings=131072, rope_parameters=rp)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    plain = 1.0 / (500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float32) / 128))
    ours = writer.llama3_rope_factors(writer._rope_params(cfg), 128)
    assert ours.shape == (64,)
    torch.testing.assert_close(ours, (plain / scaled).float(), rtol=1e-4, atol=1e-4)


def test_modelfile_formats():
    llama3 = "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"
    text = ollama.modelfile_text("m.Q4_K_M.gguf", llama3, "<|eot_id|>")
    assert text.startswith("FROM ./m.Q4_K_M.gguf\n")
    assert 'TEMPLATE """' in text and "<|start_header_id|>{{ .Role }}<|end_header_id|>" in text
    assert text.count('PARAMETER stop "<|eot_id|>"') == 1
    assert ollama.detect_format("[INST] {{ message['content'] }} [/INST]") == "mistral"
    assert ollama.detect_format("### Instruction:\n{{ x }}\n### Response:") == "alpaca"
    assert ollama.detect_format(None) is None
    plain = ollama.modelfile_text("m.gguf", "{{ messages }}", "</s>")
    assert "TEMPLATE" not in plain and 'PARAMETER stop "</s>"' in plain


def test_interrupted_gguf_save_and_bad_inputs(tmp_path, monkeypatch):
    base, tok = tiny_model("qwen2", tmp_path)
    from fastft.gguf_export import kquants

    calls = {"n": 0}
    real = kquants.quantize

    def failing(x, t):
        calls["n"] += 1
        if calls["n"] == 6:
            raise RuntimeError("simulated crash")
        return real(x, t)

    monkeypatch.setattr(kquants, "quantize", failing)
    target = tmp_path / "g"
    with pytest.raises(RuntimeError, match="simulated"):
        save.save_pretrained_gguf(base, str(target), tok, quantization_method="q4_k_m")
    assert not target.exists()
    assert not [p for p in os.listdir(tmp_path) if "fastft-tmp" in p]
    monkeypatch.undo()

    with pytest.raises(ValueError, match="tokenizer"):
        save.save_pretrained_gguf(base, str(target), None)
    with pytest.raises(ValueError, match="quantization_method"):
        save.save_pretrained_gguf(base, str(target), tok, quantization_method="q2_k_xxl")
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=len(tok)))
    with pytest.raises(NotImplementedError, match="supports"):
        save.save_pretrained_gguf(gpt2, str(target), tok)
    assert not target.exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gguf_export_of_a_cuda_model_matches_cpu_export(tmp_path):
    base, tok = tiny_model("llama", tmp_path)
    pm = add_lora(base)
    ids = sample_ids(len(tok))
    ref = logits(pm, ids)
    cpu_file = save.save_pretrained_gguf(pm, str(tmp_path / "cpu"), tok, quantization_method="q4_k_m", device="cpu")[0]
    pm.cuda()
    gpu_file = save.save_pretrained_gguf(pm, str(tmp_path / "gpu"), tok, quantization_method="q4_k_m")[0]
    errs = []
    for f in (cpu_file, gpu_file):
        loaded = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(f), gguf_file=os.path.basename(f), dtype=torch.float32)
        errs.append(rel_err(logits(loaded, ids), ref))
    assert abs(errs[0] - errs[1]) < 0.2 * errs[0], errs


def test_gemma3_vision_language_model_exports_its_text_model(tmp_path):
    """Gemma 3 (4B and up) is a vision-language model; the GGUF holds its text model (llama.cpp
    keeps the vision tower in a separate mmproj file)."""
    from _fastft_save_helpers import tokenizer_for

    tok = tokenizer_for("gemma3")
    text = dict(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, max_position_embeddings=512, sliding_window=128,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=16)
    torch.manual_seed(0)
    vlm = transformers.Gemma3ForConditionalGeneration(transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4))
    with torch.no_grad():
        for n, p in vlm.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    pm = add_lora(vlm)
    ids = sample_ids(len(tok))
    ref = logits(pm, ids)
    f = save.save_pretrained_gguf(pm, str(tmp_path / "g"), tok, quantization_method="f16")[0]
    r = gguf.GGUFReader(f)
    names = {t.name for t in r.tensors}
    assert "token_embd.weight" in names and "blk.1.post_ffw_norm.weight" in names and "output.weight" not in names
    assert not any("vision" in n or "mm" in n for n in names)
    assert field(r, "general.architecture") == "gemma3" and field(r, "gemma3.block_count") == 2
    loaded = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(f), gguf_file=os.path.basename(f), dtype=torch.float32)
    assert rel_err(logits(loaded, ids), ref) <= 1e-2


def test_gguf_from_a_4bit_qlora_model(tmp_path):
    base, tok = tiny_model("qwen3", tmp_path, load_in_4bit=True)
    pm = add_lora(base)
    ids = sample_ids(len(tok))
    pm.train()  # bitsandbytes' exact dequantisation path (its CPU eval path keeps absmax in bf16)
    ref = logits(pm, ids)
    f = save.save_pretrained_gguf(pm, str(tmp_path / "g"), tok, quantization_method="q8_0")[0]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(f), gguf_file=os.path.basename(f), dtype=torch.float32)
    assert rel_err(logits(loaded, ids), ref) <= 3e-2


def test_pre_tokenizer_names_for_known_split_regexes():
    from fastft.gguf_export.tokenizer import _pre_tokenizer_name

    def tokenizer_json(pattern):
        return {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}}

    upper, lower = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]", r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
    contractions = "(?i:'s|'t|'re|'ve|'m|'ll|'d)"
    tail = r"| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    tekken = rf"[^\r\n\p{{L}}\p{{N}}]?{upper}*{lower}+|[^\r\n\p{{L}}\p{{N}}]?{upper}+{lower}*|\p{{N}}" + tail
    gpt4o = (rf"[^\r\n\p{{L}}\p{{N}}]?{upper}*{lower}+{contractions}?|[^\r\n\p{{L}}\p{{N}}]?{upper}+{lower}*{contractions}?"
             r"|\p{N}{1,3}" + tail)
    llama3 = contractions + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    qwen2 = contractions + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    assert _pre_tokenizer_name(tokenizer_json(tekken)) == "tekken"
    assert _pre_tokenizer_name(tokenizer_json(gpt4o)) == "gpt-4o"
    assert _pre_tokenizer_name(tokenizer_json(llama3)) == "llama-bpe"
    assert _pre_tokenizer_name(tokenizer_json(qwen2)) == "qwen2"
    assert _pre_tokenizer_name({"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}}) == "gpt-2"
    with pytest.warns(UserWarning, match="split regex"):
        assert _pre_tokenizer_name(tokenizer_json(r"\w+|\s+")) == "default"


def test_rows_that_do_not_fit_k_quant_blocks_fall_back(tmp_path):
    # intermediate 320 = 10 * 32: ffn_down rows are not a multiple of 256, so Q4_K -> Q5_0 and
    # the "more bits" layer's Q6_K -> Q8_0, as llama-quantize does
    base, tok = tiny_model("llama", tmp_path, intermediate_size=320)
    pm = add_lora(base)
    ids = sample_ids(len(tok))
    ref = logits(pm, ids)
    f = save.save_pretrained_gguf(pm, str(tmp_path / "g"), tok, quantization_method="q4_k_m")[0]
    ts = tensors_by_name(gguf.GGUFReader(f))
    assert ts["blk.0.ffn_down.weight"].tensor_type.name == "Q5_0"
    assert ts["blk.1.ffn_down.weight"].tensor_type.name == "Q8_0"
    assert ts["blk.0.ffn_up.weight"].tensor_type.name == "Q4_K"
    loaded = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(f), gguf_file=os.path.basename(f), dtype=torch.float32)
    err = rel_err(logits(loaded, ids), ref)
    merged = copy.deepcopy(pm).merge_and_unload()
    type_of = {k: ts[expected_name(k, "llama")].tensor_type.name for k in merged.state_dict()}
    assert err <= 1.5 * noise_model_logit_error(merged, type_of, ids), err
