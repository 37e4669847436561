"""Tiny random-init models of each supported decoder family, for tests (no downloads).

    tiny_config(family, **overrides)            -> a transformers config (hidden 64, 2 layers, 4 heads,
                                                   2 kv heads, vocab 300, intermediate 128)
    save_tiny_model(family, path, dtype=...)    -> writes config + weights (+ a byte-level tokenizer)
    tiny_tokenizer()                            -> that tokenizer (256 byte tokens + a few specials,
                                                   deliberately without a pad token)

Families: llama, mistral, qwen2, qwen3, gemma2, gemma3 (text), and two that fastft does not
patch: gpt2, opt."""
from __future__ import annotations

import os

import torch

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3")
UNPATCHED_FAMILIES = ("gpt2", "opt")

VOCAB = 300
BOS, EOS = 256, 257  # ids of the tokenizer's "<s>" and "</s>"
SPECIALS = ("<s>", "</s>", "<|im_start|>", "<|im_end|>")

_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               bos_token_id=BOS, eos_token_id=EOS, pad_token_id=None)


def tiny_config(family: str, **overrides):
    """A tiny config of `family` (see FAMILIES / UNPATCHED_FAMILIES); overrides win."""
    import transformers as tf

    if family == "llama":  # Llama 3.x: llama3 rope scaling, untied head
        kw = dict(_COMMON, tie_word_embeddings=False,
                  rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 64})
        cls = tf.LlamaConfig
    elif family == "mistral":  # sliding window shorter than the test sequences
        kw = dict(_COMMON, sliding_window=16, tie_word_embeddings=False)
        cls = tf.MistralConfig
    elif family == "qwen2":  # q/k/v biases, tied embeddings
        kw = dict(_COMMON, tie_word_embeddings=True)
        cls = tf.Qwen2Config
    elif family == "qwen3":  # q/k RMSNorms
        kw = dict(_COMMON, head_dim=16, tie_word_embeddings=True)
        cls = tf.Qwen3Config
    elif family == "gemma2":  # (1+w) norms, gelu-tanh, logit + attention softcaps, sliding window
        kw = dict(_COMMON, head_dim=16, hidden_activation="gelu_pytorch_tanh",
                  final_logit_softcapping=30.0, attn_logit_softcapping=50.0, sliding_window=16,
                  query_pre_attn_scalar=16)
        cls = tf.Gemma2Config
    elif family == "gemma3":  # text model: (1+w) q/k norms, local/global layers
        kw = dict(_COMMON, head_dim=16, hidden_activation="gelu_pytorch_tanh", sliding_window=16,
                  query_pre_attn_scalar=16, layer_types=["sliding_attention", "full_attention"])
        cls = tf.Gemma3TextConfig
    elif family == "gpt2":
        kw = dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                  bos_token_id=BOS, eos_token_id=EOS)
        cls = tf.GPT2Config
    elif family == "opt":
        kw = dict(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=64,
                  bos_token_id=BOS, eos_token_id=EOS, pad_token_id=1)
        cls = tf.OPTConfig
    else:
        raise ValueError(f"unknown tiny family {family!r}; known: {FAMILIES + UNPATCHED_FAMILIES}")
    kw.update(overrides)
    return cls(**kw)


def tiny_tokenizer():
    """Byte-level tokenizer: ids 0-255 are bytes, then <s>, </s>, <|im_start|>, <|im_end|>.
    No pad token (fastft's loader must add one)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIALS))
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    assert out.convert_tokens_to_ids("<s>") == BOS and out.convert_tokens_to_ids("</s>") == EOS
    return out


def build_tiny_model(family: str, dtype=torch.float32, seed: int = 0, **overrides):
    """A random-init causal LM of `family` (deterministic for a seed), in eval mode."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # Random non-zero norm weights, so an offset mistake ((1 + w) vs w) cannot hide.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name or "_norm." in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def save_tiny_model(family: str, path, dtype=torch.float32, seed: int = 0, tokenizer: bool = True,
                    **overrides) -> str:
    """Write a tiny `family` model (and the byte-level tokenizer) to `path`; returns the path."""
    path = os.fspath(path)
    model = build_tiny_model(family, dtype=dtype, seed=seed, **overrides)
    model.save_pretrained(path)
    if tokenizer:
        tiny_tokenizer().save_pretrained(path)
    return path
