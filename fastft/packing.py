"""Padding-free packing: several sequences concatenated in one row, told apart by position_ids
that restart at 0, with attention kept inside each sequence and no loss across borders.

What does the work (checked by tests/test_packing.py):
* transformers 5 recognises packed rows from position_ids when no attention_mask is passed
  (masking_utils.find_packed_sequence_indices): SDPA / eager / flex get a block-diagonal causal
  mask, flash-attention gets varlen boundaries. RoPE follows position_ids, so it restarts at
  each sequence's start.
* TRL's SFTConfig(padding_free=True) (or packing=True with the "bfd" strategy) collates exactly
  so: input_ids / position_ids / labels flattened into one row, no attention_mask, the label of
  each sequence's first token set to -100 (the causal shift would otherwise train the last
  token of one sequence to predict the first token of the next).

* But transformers skips that detection when a cache is in play, and a forward that leaves
  use_cache at the config default (True, also in training mode) creates one: a packed batch
  then silently attends across sequence borders. TRL passes use_cache=False; a plain training
  loop usually does not. `ensure_packed_attention(model)` installs a decoder pre-hook that
  turns the cache off for packed batches (and, where the installed transformers cannot detect
  packed rows at all, passes `block_diagonal_causal_mask` explicitly).

`pack_sequences` gives TRL's padding-free layout without TRL.
"""
from __future__ import annotations

import torch

IGNORE_INDEX = -100


def sequence_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] index of the packed sequence each token belongs to (a new one starts wherever the
    position does not continue the previous one by +1)."""
    if position_ids.dim() == 1:
        position_ids = position_ids[None]
    first = position_ids[:, :1] - 1
    return (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)


def is_packed(position_ids: torch.Tensor | None) -> bool:
    """True when some row holds more than one sequence."""
    if position_ids is None:
        return False
    return bool((sequence_ids(position_ids)[:, -1] > 0).any())


def block_diagonal_causal_mask(position_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[B, 1, T, T] additive mask (0 where query t may attend key s, the dtype's minimum
    elsewhere): causal and only within the same packed sequence. transformers uses a 4-D mask
    passed as attention_mask as is, for eager and SDPA attention."""
    seq = sequence_ids(position_ids)
    t = seq.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=seq.device).tril()
    allowed = (seq[:, :, None] == seq[:, None, :]) & causal
    mask = torch.zeros(allowed.shape, dtype=dtype, device=seq.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def pack_sequences(sequences, labels=None, pad_to_multiple_of: int | None = None, pad_token_id: int = 0):
    """Collate token lists into one padding-free row (the layout TRL's padding-free collator
    produces): input_ids, position_ids, labels [1, T]; the first label of every sequence and
    any padding are IGNORE_INDEX; also cu_seq_lens_q/k and max_length_q/k for varlen kernels."""
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("pack_sequences needs at least one sequence and no empty sequences")
    if labels is not None and [len(l) for l in labels] != [len(s) for s in sequences]:
        raise ValueError("pack_sequences: labels must have one list per sequence, each as long as it")
    ids = torch.cat([torch.as_tensor(s, dtype=torch.long) for s in sequences])
    pos = torch.cat([torch.arange(len(s)) for s in sequences])
    lab = (ids.clone() if labels is None
           else torch.cat([torch.as_tensor(l, dtype=torch.long) for l in labels]))
    lengths = torch.tensor([len(s) for s in sequences])
    starts = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]])
    lab[starts] = IGNORE_INDEX
    total = ids.numel()
    if pad_to_multiple_of:
        padded = -(-total // pad_to_multiple_of) * pad_to_multiple_of
        extra = padded - total
        ids = torch.cat([ids, torch.full((extra,), pad_token_id, dtype=torch.long)])
        pos = torch.cat([pos, torch.zeros(extra, dtype=torch.long)])  # pads: own "sequences"
        lab = torch.cat([lab, torch.full((extra,), IGNORE_INDEX, dtype=torch.long)])
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(torch.int32)
    return {"input_ids": ids[None], "position_ids": pos[None], "labels": lab[None],
            "cu_seq_lens_q": cu, "cu_seq_lens_k": cu,
            "max_length_q": int(lengths.max()), "max_length_k": int(lengths.max())}


def transformers_detects_packing() -> bool:
    """Whether the installed transformers builds per-sequence masks from packed position_ids."""
    try:
        from transformers import masking_utils
    except ImportError:
        return False
    return hasattr(masking_utils, "find_packed_sequence_indices")


_HOOK_ATTR = "_fastft_packing_hook"


def _decoder(model):
    """The module whose forward takes position_ids and builds the mask (e.g. LlamaModel)."""
    inner = model
    for _ in range(6):
        get_decoder = getattr(inner, "get_decoder", None)
        if callable(get_decoder):
            dec = get_decoder()
            if dec is not None and dec is not inner:
                inner = dec
                continue
        nxt = getattr(inner, "base_model", None)
        if nxt is None or nxt is inner:
            nxt = getattr(inner, "model", None)
        if nxt is None or nxt is inner:
            break
        inner = nxt
    return inner


def _make_pre_hook(use_mask: bool):
    def hook(module, args, kwargs):
        position_ids = kwargs.get("position_ids")
        if kwargs.get("attention_mask") is not None or not is_packed(position_ids):
            return None
        if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
            return None  # generation with a cache: not a packed training batch
        # transformers only looks for packed rows when no cache is in play, and a forward with
        # use_cache left at the config's default (True) creates one: packed batches never
        # need a cache, so switch it off (TRL passes use_cache=False for the same reason).
        kwargs["use_cache"] = False
        if use_mask:
            impl = getattr(getattr(module, "config", None), "_attn_implementation", None) or ""
            if "flash" not in impl:  # flash-attention takes the borders from position_ids itself
                dtype = next(module.parameters()).dtype
                kwargs["attention_mask"] = block_diagonal_causal_mask(position_ids, dtype)
        return args, kwargs

    return hook


def ensure_packed_attention(model, use_mask: bool | None = None) -> str:
    """Make attention respect packed-sequence borders whenever a packed batch (position_ids
    restarting at 0, no attention_mask) reaches the model, whatever the caller passes for
    use_cache. Installs a forward pre-hook on the decoder (once) that turns the cache off for such
    batches and, with use_mask (default: only when the installed transformers cannot detect
    packed rows itself), passes fastft's block-diagonal causal mask.
    Returns "transformers" or "mask": which of the two builds the per-sequence attention."""
    if use_mask is None:
        use_mask = not transformers_detects_packing()
    decoder = _decoder(model)
    remove_packed_attention(model)
    handle = decoder.register_forward_pre_hook(_make_pre_hook(use_mask), with_kwargs=True)
    object.__setattr__(decoder, _HOOK_ATTR, handle)
    return "mask" if use_mask else "transformers"


def remove_packed_attention(model) -> None:
    decoder = _decoder(model)
    handle = decoder.__dict__.pop(_HOOK_ATTR, None)
    if handle is not None:
        handle.remove()
