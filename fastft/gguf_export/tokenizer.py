"""Tokenizer -> GGUF metadata (tokenizer.ggml.*), from a transformers fast tokenizer.

Two vocabulary kinds, as llama.cpp reads them:
  "gpt2"  byte-level BPE (Llama 3, Qwen, GPT-2 ...): tokens as spelled in tokenizer.json, merges.
  "llama" SentencePiece style (Llama 2, Mistral, Gemma: '▁' word marker, <0xXX> byte tokens,
          or a Unigram model): tokens, scores (llama.cpp merges the highest-scoring pair first,
          so a BPE merge of rank i gets score -i), token types. Merges are written too, so
          readers that rebuild a BPE (transformers) get the exact merge order.
Token types follow llama.cpp: NORMAL, UNKNOWN, CONTROL (special tokens), USER_DEFINED (added,
not special), UNUSED (padding up to the embedding size), BYTE (<0xXX>).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")

# Split regexes of well-known byte-level BPE families -> llama.cpp pre-tokenizer names.
_LLAMA3_DIGITS = r"\p{N}{1,3}"
_CONTRACTIONS = "(?i:'s|'t|'re|'ve|'m|'ll|'d)"


@dataclass
class GGUFVocab:
    model: str  # "gpt2" | "llama"
    pre: str
    tokens: list[str]
    token_types: list[int]
    scores: list[float] | None
    merges: list[str]
    special_ids: dict[str, int] = field(default_factory=dict)  # bos / eos / unk / pad / eot
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None  # SentencePiece "dummy prefix" ('▁' before the text)
    chat_template: str | None = None


def _tokenizer_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None or not hasattr(backend, "to_str"):
        raise TypeError(
            f"GGUF export needs a fast (tokenizers-backed) tokenizer; got {type(tokenizer).__name__}. "
            "Load it with AutoTokenizer.from_pretrained(..., use_fast=True)."
        )
    return json.loads(backend.to_str())


def _pre_tokenizer_name(tj: dict) -> str:
    """llama.cpp's name for the text split that precedes BPE (it needs it to tokenize the same)."""
    text = json.dumps(tj.get("pre_tokenizer") or {})
    patterns = re.findall(r'"Regex": "((?:[^"\\]|\\.)*)"', text)
    pattern = json.loads('"' + patterns[0] + '"') if patterns else ""
    if pattern:
        cased_words = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]"  # splits on case changes (GPT-4o / Tekken)
        if cased_words in pattern:
            return "gpt-4o" if _CONTRACTIONS[:-1] in pattern and _LLAMA3_DIGITS in pattern else "tekken"
        if _CONTRACTIONS in pattern and _LLAMA3_DIGITS in pattern:
            return "llama-bpe"
        if _CONTRACTIONS in pattern and r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|" in pattern:
            return "qwen2"
        import warnings

        warnings.warn(
            f"fastft GGUF export: the tokenizer's split regex is not one fastft knows ({pattern[:80]}...); "
            "llama.cpp will split text with its default regex, so tokenization may differ slightly.",
            stacklevel=3,
        )
        return "default"
    if '"ByteLevel"' in text and '"use_regex": true' in text:
        return "gpt-2"
    return "default"


def _adds_space_prefix(tj: dict) -> bool:
    """Whether text gets a '▁' in front before tokenizing (Llama 2 / Mistral yes, Gemma no)."""
    text = json.dumps([tj.get("normalizer"), tj.get("pre_tokenizer")])
    if '"Prepend"' in text:
        return True
    for scheme in re.findall(r'"prepend_scheme": "(\w+)"', text):
        if scheme in ("first", "always"):
            return True
    return '"add_prefix_space": true' in text and '"Metaspace"' in text


def _merges_as_strings(merges) -> list[str]:
    out = []
    for m in merges:
        out.append(" ".join(m) if isinstance(m, (list, tuple)) else str(m))
    return out


def _chat_template_of(tokenizer) -> str | None:
    tpl = getattr(tokenizer, "chat_template", None)
    if isinstance(tpl, dict):  # named templates: llama.cpp reads the default one
        tpl = tpl.get("default") or next(iter(tpl.values()), None)
    return tpl if isinstance(tpl, str) and tpl.strip() else None


def _adds_bos_eos(tokenizer) -> tuple[bool, bool]:
    try:
        ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    except Exception:
        return False, False
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    add_bos = bos is not None and len(ids) > 0 and ids[0] == bos
    add_eos = eos is not None and len(ids) > 1 and ids[-1] == eos
    return bool(add_bos), bool(add_eos)


def build_vocab(tokenizer, vocab_size: int) -> GGUFVocab:
    """Collect what llama.cpp needs from `tokenizer`, padded to `vocab_size` (the embedding rows)."""
    tj = _tokenizer_json(tokenizer)
    model = tj["model"]
    kind = model.get("type")
    vocab: dict[str, int] = tokenizer.get_vocab()
    n_tok = max(vocab.values()) + 1 if vocab else 0
    if n_tok > vocab_size:
        raise ValueError(
            f"The tokenizer has {n_tok} tokens but the model's embedding has only {vocab_size} rows; "
            "resize the model's embeddings (model.resize_token_embeddings(len(tokenizer))) before export."
        )
    tokens: list[str | None] = [None] * vocab_size
    for text, idx in vocab.items():
        tokens[idx] = text

    added = {a["id"]: a for a in tj.get("added_tokens", [])}
    special_ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    special_ids |= {i for i, a in added.items() if a.get("special")}
    unk_id = tokenizer.unk_token_id

    byte_level = kind == "BPE" and not model.get("byte_fallback", False) and "ByteLevel" in json.dumps(tj.get("decoder") or {})
    spm_like = (kind == "BPE" and model.get("byte_fallback", False)) or kind == "Unigram"
    if not (byte_level or spm_like):
        raise NotImplementedError(
            f"GGUF export supports byte-level BPE and SentencePiece-style (byte-fallback BPE / Unigram) "
            f"tokenizers; this one is a {kind} model. Please open an issue with the model name."
        )

    types: list[int] = []
    NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
    for i in range(vocab_size):
        t = tokens[i]
        if t is None:
            tokens[i] = f"[PAD{i}]"
            types.append(UNUSED)
        elif i == unk_id:
            types.append(UNKNOWN)
        elif spm_like and _BYTE_TOKEN.fullmatch(t):
            types.append(BYTE)
        elif i in special_ids:
            types.append(CONTROL)
        elif i in added:
            types.append(USER_DEFINED)
        else:
            types.append(NORMAL)

    merges = _merges_as_strings(model.get("merges", [])) if kind == "BPE" else []
    scores = None
    if spm_like:
        if kind == "Unigram":
            scores = [0.0] * vocab_size
            for i, (_, s) in enumerate(model["vocab"]):
                if i < vocab_size:
                    scores[i] = float(s)
        else:
            # as SentencePiece scores BPE pieces: the token a merge produces scores -rank (earlier
            # merges win), single characters score below every merge, byte tokens 0
            n_merges = len(merges)
            scores = [-float(n_merges + 1)] * vocab_size
            for rank, m in enumerate(merges):
                left, right = m.split(" ", 1)
                idx = vocab.get(left + right)
                if idx is not None and scores[idx] == -float(n_merges + 1):
                    scores[idx] = -float(rank + 1)
            for i, ty in enumerate(types):
                if ty == BYTE:
                    scores[i] = 0.0
                elif ty in (CONTROL, USER_DEFINED, UNUSED, UNKNOWN):
                    scores[i] = -1000.0 - n_merges

    ids = {}
    for role in ("bos", "eos", "unk", "pad"):
        tid = getattr(tokenizer, f"{role}_token_id", None)
        if tid is not None:
            ids[role] = int(tid)
    add_bos, add_eos = _adds_bos_eos(tokenizer)
    return GGUFVocab(
        model="gpt2" if byte_level else "llama",
        pre=_pre_tokenizer_name(tj) if byte_level else "default",
        tokens=[str(t) for t in tokens],
        token_types=types,
        scores=scores,
        merges=merges,
        special_ids=ids,
        add_bos=add_bos,
        add_eos=add_eos,
        add_space_prefix=_adds_space_prefix(tj) if spm_like else None,
        chat_template=_chat_template_of(tokenizer),
    )


def add_vocab_to_writer(writer, v: GGUFVocab) -> None:
    writer.add_tokenizer_model(v.model)
    writer.add_tokenizer_pre(v.pre)
    writer.add_token_list(v.tokens)
    writer.add_token_types(v.token_types)
    if v.scores is not None:
        writer.add_token_scores(v.scores)
    if v.merges:
        writer.add_token_merges(v.merges)
    for role, tid in v.special_ids.items():
        getattr(writer, f"add_{role}_token_id")(tid)
    writer.add_add_bos_token(v.add_bos)
    writer.add_add_eos_token(v.add_eos)
    if v.add_space_prefix is not None:
        writer.add_add_space_prefix(v.add_space_prefix)
    if v.chat_template:
        writer.add_chat_template(v.chat_template)
