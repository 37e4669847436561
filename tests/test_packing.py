"""Padding-free packing: a packed row gives each sequence exactly the logits and loss it gets in
a padded batch (transformers' own detection, fastft's fallback mask, TRL's padding-free path)."""
import pytest
import torch

from fastft.lora import apply_fused_lora
from fastft.packing import (IGNORE_INDEX, block_diagonal_causal_mask, ensure_packed_attention, is_packed,
                            pack_sequences, remove_packed_attention, sequence_ids, transformers_detects_packing)

from helpers import rel_err

LENGTHS = (5, 11, 3, 8)


def _model(attn="sdpa", lora=False, init_std=0.02):
    from transformers import LlamaForCausalLM

    from tiny_models import tiny_config

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config("llama", attn_implementation=attn, initializer_range=init_std)).float()
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    return model.eval()


def _sequences(seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 300, (n,), generator=g).tolist() for n in LENGTHS]


def _per_token_loss(logits, labels):
    """Next-token cross-entropy per position of `labels` (the causal shift done here)."""
    shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(shift_logits.transpose(1, 2).float(), shift_labels,
                                             ignore_index=IGNORE_INDEX, reduction="none")
    return loss, shift_labels != IGNORE_INDEX


def _padded_reference(model, seqs):
    """Per-sequence logits and mean losses from a right-padded batch with an attention mask."""
    t = max(map(len, seqs))
    ids = torch.zeros(len(seqs), t, dtype=torch.long)
    mask = torch.zeros(len(seqs), t, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    loss, valid = _per_token_loss(logits, labels)
    per_seq = [(loss[i] * valid[i]).sum() / valid[i].sum() for i in range(len(seqs))]
    return [logits[i, :len(s)] for i, s in enumerate(seqs)], torch.stack(per_seq)


def _packed_results(model, batch, seqs, **extra):
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], **extra).logits
    loss, valid = _per_token_loss(logits, batch["labels"])
    seq = sequence_ids(batch["position_ids"])[:, 1:]  # the sequence of each shifted target
    per_seq = torch.stack([(loss * valid * (seq == i)).sum() / (valid * (seq == i)).sum()
                           for i in range(len(seqs))])
    starts = [0]
    for s in seqs[:-1]:
        starts.append(starts[-1] + len(s))
    return [logits[0, a:a + len(s)] for a, s in zip(starts, seqs)], per_seq


def test_pack_sequences_layout():
    batch = pack_sequences([[1, 2, 3], [4, 5], [6]], pad_to_multiple_of=8, pad_token_id=9)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 9, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3, -100, 5, -100, -100, -100]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5, 6] and batch["max_length_k"] == 3
    assert sequence_ids(batch["position_ids"]).tolist() == [[0, 0, 0, 1, 1, 2, 3, 4]]
    assert is_packed(batch["position_ids"]) and not is_packed(torch.arange(5)[None])
    with pytest.raises(ValueError, match="empty"):
        pack_sequences([[1], []])


def test_block_diagonal_mask_values():
    mask = block_diagonal_causal_mask(torch.tensor([[0, 1, 2, 0, 1]]))
    allowed = (mask[0, 0] == 0).int().tolist()
    assert allowed == [[1, 0, 0, 0, 0],
                       [1, 1, 0, 0, 0],
                       [1, 1, 1, 0, 0],
                       [0, 0, 0, 1, 0],
                       [0, 0, 0, 1, 1]]


def test_pack_sequences_matches_trl_padding_free_collator():
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    seqs = _sequences()
    ours = pack_sequences(seqs)
    trl = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)([{"input_ids": s} for s in seqs])
    for key in ("input_ids", "position_ids", "labels", "cu_seq_lens_q"):
        assert ours[key].tolist() == trl[key].tolist(), key
    assert "attention_mask" not in trl  # what lets transformers see the packing


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_row_equals_padded_batch(attn):
    """transformers' own detection (no attention_mask) and fastft's explicit mask both keep
    attention and RoPE inside each sequence."""
    model = _model(attn, lora=True)
    seqs = _sequences()
    ref_logits, ref_loss = _padded_reference(model, seqs)
    batch = pack_sequences(seqs)
    assert transformers_detects_packing()
    # transformers' own detection, as TRL calls the model (use_cache=False)
    logits, loss = _packed_results(model, batch, seqs, use_cache=False)
    for a, b in zip(logits, ref_logits):
        assert rel_err(a, b) <= 1e-5
    assert rel_err(loss, ref_loss) <= 1e-5
    # a plain call (use_cache at its default) in training mode, with the hook: same again
    model.train()
    assert ensure_packed_attention(model) == "transformers"
    apply_fused_lora(model)
    logits_hook, loss_hook = _packed_results(model, batch, seqs)
    for a, b in zip(logits_hook, ref_logits):
        assert rel_err(a, b) <= 1e-5
    assert rel_err(loss_hook, ref_loss) <= 1e-5
    # fastft's explicit mask (the fallback for a transformers that cannot detect packing)
    assert ensure_packed_attention(model, use_mask=True) == "mask"
    logits_mask, loss_mask = _packed_results(model, batch, seqs)
    remove_packed_attention(model)
    for a, b in zip(logits_mask, ref_logits):
        assert rel_err(a, b) <= 1e-5
    assert rel_err(loss_mask, ref_loss) <= 1e-5
    # and a row that is NOT told about the borders differs: the test can fail
    with torch.no_grad():
        wrong = model(input_ids=batch["input_ids"]).logits
    assert rel_err(wrong[0, LENGTHS[0]:LENGTHS[0] + LENGTHS[1]], ref_logits[1]) > 1e-2


def test_packing_hook_leaves_ordinary_batches_alone():
    model = _model()
    ids = torch.randint(0, 300, (2, 7))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        ensure_packed_attention(model)
        ensure_packed_attention(model)  # idempotent: one hook
        assert len(model.model._forward_pre_hooks) == 1
        out = model(input_ids=ids, use_cache=True)
    assert out.past_key_values is not None  # unpacked: the cache stays as asked
    assert rel_err(out.logits, ref) <= 1e-6
    remove_packed_attention(model)
    assert not model.model._forward_pre_hooks


def _sft_trainer(tmp_path, model, padding_free, rows, steps=1, lr=1e-3, batch=4, packing=False):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from tiny_models import tiny_tokenizer

    tok = tiny_tokenizer()
    tok.pad_token = tok.eos_token
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=batch, max_steps=steps,
                     learning_rate=lr, logging_steps=1, report_to=[], save_strategy="no", bf16=False,
                     use_cpu=True, dataloader_num_workers=0, padding_free=padding_free, packing=packing,
                     max_length=64 if packing or not padding_free else None,
                     gradient_checkpointing=False, shuffle_dataset=False)
    return SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)


def test_trl_padding_free_loss_equals_padded_loss(tmp_path):
    """TRL's SFTTrainer with padding_free=True computes the same loss as with padded batches."""
    model = _model(lora=True)
    apply_fused_lora(model)
    rows = [{"input_ids": s} for s in _sequences()]
    losses = {}
    for padding_free in (False, True):
        trainer = _sft_trainer(tmp_path, model, padding_free, rows)
        batch = next(iter(trainer.get_train_dataloader()))
        assert ("attention_mask" in batch) is (not padding_free)
        assert ("position_ids" in batch) is padding_free
        assert batch["input_ids"].shape[0] == (1 if padding_free else len(rows))
        model.eval()
        with torch.no_grad():
            losses[padding_free] = trainer.compute_loss(model, batch).item()
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


def test_tiny_model_trains_padding_free(tmp_path):
    model = _model(lora=True, init_std=0.3)
    apply_fused_lora(model)
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": ((torch.randint(0, 250, (1,), generator=g) + 3 * torch.arange(int(n))) % 250).tolist()}
            for n in torch.randint(6, 20, (16,), generator=g)]
    # packing=True (TRL's default "bfd" strategy) packs rows up to max_length, padding-free
    trainer = _sft_trainer(tmp_path, model, False, rows, steps=8, lr=2e-2, batch=2, packing=True)
    batch = next(iter(trainer.get_train_dataloader()))
    assert "position_ids" in batch and "attention_mask" not in batch
    assert is_packed(batch["position_ids"])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < 0.9 * losses[0], losses


def test_fast_language_model_keeps_packed_rows_apart(tmp_path):
    """A packed row sent to a FastLanguageModel model with a plain call (use_cache left at its
    default, which makes transformers ignore the packing) matches the padded batch."""
    from fastft import FastLanguageModel
    from tiny_models import save_tiny_model

    save_tiny_model("llama", tmp_path / "m")
    model, _ = FastLanguageModel.from_pretrained(str(tmp_path / "m"), max_seq_length=64)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8,
                                             use_gradient_checkpointing=False)
    seqs = _sequences()
    ref_logits, _ = _padded_reference(model, seqs)
    logits, _ = _packed_results(model, pack_sequences(seqs), seqs)
    for a, b in zip(logits, ref_logits):
        assert rel_err(a, b) <= 1e-5
