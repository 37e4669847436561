"""Tiny random-init models and tokenizers for the save / GGUF tests (no downloads).

Dimensions are multiples of 256 where a K-quant needs them (hidden 256, intermediate 512), the
rest is as small as possible: 2 layers, a few hundred tokens of vocabulary.
"""
from __future__ import annotations

import os

import torch

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! This is a tiny corpus for a tiny tokenizer.",
    "fastft fine-tunes language models with LoRA and QLoRA, then exports GGUF files.",
    "Numbers like 12345 and 67890 appear, as do symbols: {}, [], (), <>, and émigré café.",
    "User: what is the capital of France?\nAssistant: Paris is the capital of France.",
    "Sphinx of black quartz, judge my vow. Pack my box with five dozen liquor jugs.",
] * 4

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


def byte_level_bpe_tokenizer(split=None):
    """Byte-level BPE with ChatML specials: GPT-2's own split (split=None), or Llama 3's /
    Qwen 2's split regex followed by a byte-level step, as their tokenizer.json files do."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    hf.chat_template = CHATML_TEMPLATE
    return hf


def sentencepiece_bpe_tokenizer(dummy_prefix=True):
    """SentencePiece-style BPE with byte fallback and the '▁' word marker (as Llama 2 / Mistral /
    Gemma ship), with <unk>/<s>/</s> and Gemma-style turn markers. Llama 2 / Mistral put a '▁'
    in front of the text (dummy prefix); Gemma does not."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    specials = ["<unk>", "<s>", "</s>", "<start_of_turn>", "<end_of_turn>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    if dummy_prefix:  # as current Llama 2 / Mistral tokenizer.json files do it
        tok.normalizer = None
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    else:
        tok.normalizer = normalizers.Replace(" ", "▁")
        tok.pre_tokenizer = None
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    trainer = trainers.BpeTrainer(vocab_size=640, special_tokens=specials + byte_tokens)
    tok.train_from_iterator(CORPUS, trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>",
        additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
    )
    hf.chat_template = GEMMA_TEMPLATE
    return hf


FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3")


def tiny_config(family: str, vocab_size: int, bos_id: int, eos_id: int, pad_id: int):
    import transformers as tf

    common = dict(
        vocab_size=vocab_size, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=512,
        bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id, rms_norm_eps=1e-6,
    )
    if family == "llama":
        return tf.LlamaConfig(**common, tie_word_embeddings=False)
    if family == "mistral":
        return tf.MistralConfig(**common, tie_word_embeddings=False, sliding_window=None)
    if family == "qwen2":
        return tf.Qwen2Config(**common, tie_word_embeddings=True)
    if family == "qwen3":
        # transformers' GGUF reader does not take head_dim from a qwen3 GGUF (it keeps the
        # config default, 128), so the tiny model uses 128 to be readable back
        return tf.Qwen3Config(**dict(common, head_dim=128), tie_word_embeddings=True)
    # Gemma: a GGUF does not carry query_pre_attn_scalar; llama.cpp scales by 1/sqrt(head_dim)
    # and transformers' GGUF reader keeps the default 256, so head_dim = 256 = the scalar.
    gemma = dict(common, num_attention_heads=2, num_key_value_heads=1, head_dim=256)
    if family == "gemma2":
        return tf.Gemma2Config(**gemma, sliding_window=128, query_pre_attn_scalar=256,
                               attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
    if family == "gemma3":
        return tf.Gemma3TextConfig(**gemma, sliding_window=128, query_pre_attn_scalar=256)
    raise ValueError(family)


def tokenizer_for(family: str):
    if family == "mistral":
        return sentencepiece_bpe_tokenizer(dummy_prefix=True)
    if family in ("gemma2", "gemma3"):
        return sentencepiece_bpe_tokenizer(dummy_prefix=False)
    if family == "llama":
        return byte_level_bpe_tokenizer(LLAMA3_SPLIT)
    if family in ("qwen2", "qwen3"):
        return byte_level_bpe_tokenizer(QWEN2_SPLIT)
    return byte_level_bpe_tokenizer()


def tiny_model(family: str, tmp_path, tokenizer=None, dtype=torch.float32, load_in_4bit=False, seed=0, **overrides):
    """A random-init model saved to disk and loaded back (as users load checkpoints);
    `overrides` change config fields (e.g. intermediate_size)."""
    import transformers as tf

    tokenizer = tokenizer or tokenizer_for(family)
    vocab = len(tokenizer)
    config = tiny_config(family, vocab, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config)
    # norms away from their init of exactly 1 (or 0 for Gemma) so the +1 handling is tested; biases non-zero
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    src = os.path.join(str(tmp_path), f"base-{family}")
    model.save_pretrained(src)
    tokenizer.save_pretrained(src)
    kwargs = {"dtype": dtype}
    if load_in_4bit:
        kwargs["quantization_config"] = tf.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=True
        )
    base = tf.AutoModelForCausalLM.from_pretrained(src, **kwargs)
    return base, tokenizer


def add_lora(model, seed=1, use_rslora=False, r=8, alpha=16):
    """LoRA on every linear projection, with B perturbed so the adapter is not a no-op."""
    import peft

    cfg = peft.LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=0.0, use_rslora=use_rslora,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    pm = peft.get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    pm.eval()
    return pm


def sample_ids(vocab: int, batch=2, seq=12, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def rel_err(a, b):
    return float((a - b).norm() / b.norm())
