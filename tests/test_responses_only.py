"""train_on_responses_only: labels checked token by token on the shipped BPE tokenizer for every chat
format, packed rows, collated batches, the all-masked error, and an SFTTrainer run whose loss is
exactly the cross-entropy over the response tokens and falls."""
import pytest
import torch

from fastft.assets import load_default_dataset, load_default_tokenizer
from fastft.chat_templates import available_chat_templates, get_chat_template
from tests import helpers
from fastft.responses_only import ResponseMasker, derive_parts_from_template, train_on_responses_only

SYSTEM = {"role": "system", "content": "You are a terse calculator."}
CONVERSATION = [
    {"role": "user", "content": "What is 2+3?"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "And 4+4?"},
    {"role": "assistant", "content": "8"},
]
# The text of each run of trained tokens in CONVERSATION (with a system message): the answers, each
# with its end-of-turn marker; nothing of the system or user turns.
TRAINED_RUNS = {
    "llama-3.1": ["5<|eot_id|>", "8<|eot_id|>"],
    "llama-3": ["5<|eot_id|>", "8<|eot_id|>"],
    "chatml": ["5<|im_end|>\n", "8<|im_end|>\n"],
    "qwen-2.5": ["5<|im_end|>\n", "8<|im_end|>\n"],
    "qwen-3": ["5<|im_end|>\n", "<think>\n\n</think>\n\n8<|im_end|>\n"],
    "mistral": ["5</s>", "8</s>"],
    "gemma": ["5<end_of_turn>\n", "8<end_of_turn>\n"],
    "gemma-3": ["5<end_of_turn>\n", "8<end_of_turn>\n"],
    "phi-3": ["5<|end|>\n", "8<|end|>\n<|endoftext|>"],
    "phi-4": ["5<|im_end|>", "8<|im_end|>"],
    "alpaca": ["5</s>\n\n", "8</s>\n\n"],
    # The space after "ASSISTANT:" / ">>> Assistant:" is merged by BPE into the answer's token.
    "vicuna": [" 5</s>", " 8</s>"],
    "zephyr": ["5</s>\n", "8</s>\n"],
    "unsloth": [" 5</s>\n", " 8</s>\n"],
}


def family_tokenizer(name):
    return get_chat_template(helpers.family_tokenizer(name), name)


def tokenize(tokenizer, messages):
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def trained_runs(tokenizer, input_ids, labels):
    """Decode each maximal run of positions whose label is not -100; check labels equal the ids there."""
    assert len(labels) == len(input_ids)
    runs, current = [], []
    for token_id, label in zip(input_ids, labels):
        if label == -100:
            if current:
                runs.append(current)
                current = []
        else:
            assert label == token_id
            current.append(token_id)
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


def test_all_formats_covered():
    assert sorted(TRAINED_RUNS) == sorted(available_chat_templates())


def test_chatml_token_by_token():
    tokenizer = load_default_tokenizer()
    input_ids = tokenize(tokenizer, [SYSTEM] + CONVERSATION)
    masker = ResponseMasker(tokenizer, "<|im_start|>user\n", "<|im_start|>assistant\n")
    labels = masker.labels(input_ids)
    tokens = tokenizer.convert_ids_to_tokens(input_ids)
    # Written out: which tokens of the rendered conversation are trained.
    expected_trained = []
    in_answer = False
    for i, token in enumerate(tokens):
        if token == "<|im_start|>":
            in_answer = False
        expected_trained.append(in_answer)
        if i >= 2 and tokens[i - 2 : i + 1] == ["<|im_start|>", "assistant", "Ċ"]:
            in_answer = True
    assert [t for t, keep in zip(tokens, expected_trained) if keep] == ["5", "<|im_end|>", "Ċ", "8", "<|im_end|>", "Ċ"]
    assert labels == [tid if keep else -100 for tid, keep in zip(input_ids, expected_trained)]


@pytest.mark.parametrize("name", sorted(TRAINED_RUNS))
def test_parts_derived_from_each_template(name):
    tokenizer = family_tokenizer(name)
    input_ids = tokenize(tokenizer, [SYSTEM] + CONVERSATION)
    labels = ResponseMasker(tokenizer)(dict(input_ids=input_ids))["labels"]
    assert trained_runs(tokenizer, input_ids, labels) == TRAINED_RUNS[name]


def test_derived_parts_match_the_documented_strings():
    assert derive_parts_from_template(family_tokenizer("llama-3.1")) == (
        "<|start_header_id|>user<|end_header_id|>\n\n",
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
    )
    assert derive_parts_from_template(family_tokenizer("gemma-3")) == ("<start_of_turn>user\n", "<start_of_turn>model\n")
    assert derive_parts_from_template(load_default_tokenizer()) == ("<|im_start|>user\n", "<|im_start|>assistant\n")
    tokenizer = load_default_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        derive_parts_from_template(tokenizer)


def test_explicit_llama_strings_equal_derived():
    tokenizer = family_tokenizer("llama-3.1")
    input_ids = tokenize(tokenizer, [SYSTEM] + CONVERSATION)
    explicit = ResponseMasker(
        tokenizer,
        instruction_part="<|start_header_id|>user<|end_header_id|>\n\n",
        response_part="<|start_header_id|>assistant<|end_header_id|>\n\n",
    )
    assert explicit.labels(input_ids) == ResponseMasker(tokenizer).labels(input_ids)


def test_packed_rows_are_masked_per_sequence():
    """In a packed row the second conversation's system turn follows the first answer: with
    seq_lengths it must not be trained on."""
    tokenizer = load_default_tokenizer()
    first = tokenize(tokenizer, CONVERSATION[:2])
    second = tokenize(tokenizer, [SYSTEM] + CONVERSATION[2:])
    masker = ResponseMasker(tokenizer)
    packed = masker({"input_ids": first + second, "seq_lengths": [len(first), len(second)]})["labels"]
    assert packed == masker.labels(first) + masker.labels(second)
    assert trained_runs(tokenizer, first + second, packed) == ["5<|im_end|>\n", "8<|im_end|>\n"]


def test_mask_batch_keeps_padding_and_handles_padding_free():
    tokenizer = load_default_tokenizer()
    masker = ResponseMasker(tokenizer)
    a, b = tokenize(tokenizer, CONVERSATION[:2]), tokenize(tokenizer, [SYSTEM] + CONVERSATION[2:])
    width = max(len(a), len(b))
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([a + [pad] * (width - len(a)), b + [pad] * (width - len(b))])
    attention = (torch.arange(width)[None, :] < torch.tensor([[len(a)], [len(b)]])).long()
    batch = masker.mask_batch({"input_ids": input_ids.clone(), "attention_mask": attention})
    expected = [masker.labels(a) + [-100] * (width - len(a)), masker.labels(b) + [-100] * (width - len(b))]
    assert batch["labels"].tolist() == expected
    flat = {
        "input_ids": torch.tensor([a + b]),
        "position_ids": torch.tensor([list(range(len(a))) + list(range(len(b)))]),
        "labels": torch.tensor([[-100] + a[1:] + [-100] + b[1:]]),
    }
    out = masker.mask_batch(flat)["labels"][0].tolist()
    assert out == masker.labels(a) + masker.labels(b)


def test_wrong_parts_raise_with_rendered_text():
    tokenizer = load_default_tokenizer()
    records = [{"input_ids": tokenize(tokenizer, CONVERSATION)} for _ in range(3)]
    with pytest.raises(ValueError) as err:
        train_on_responses_only(
            records,
            tokenizer=tokenizer,
            instruction_part="<|start_header_id|>user<|end_header_id|>\n\n",
            response_part="<|start_header_id|>assistant<|end_header_id|>\n\n",
        )
    message = str(err.value)
    assert "loss exactly 0" in message
    assert repr("<|start_header_id|>assistant<|end_header_id|>\n\n") in message
    assert repr("<|start_header_id|>user<|end_header_id|>\n\n") in message
    # The sample as rendered from its token ids, so the user can copy the real markers.
    assert "<|im_start|>assistant\\n5<|im_end|>" in message


def test_records_are_tokenised_masked_and_fully_masked_ones_dropped():
    tokenizer = load_default_tokenizer()
    records = [{"messages": [SYSTEM] + CONVERSATION}, {"messages": CONVERSATION[:1]}]  # 2nd: no answer
    out = train_on_responses_only(records, tokenizer=tokenizer)
    assert len(out) == 1
    assert out[0]["input_ids"] == tokenize(tokenizer, [SYSTEM] + CONVERSATION)
    assert trained_runs(tokenizer, out[0]["input_ids"], out[0]["labels"]) == ["5<|im_end|>\n", "8<|im_end|>\n"]
    function = train_on_responses_only(None, tokenizer=tokenizer, return_function=True)
    assert function({"input_ids": out[0]["input_ids"]})["labels"] == out[0]["labels"]


def test_hf_dataset_input():
    from datasets import Dataset

    tokenizer = load_default_tokenizer()
    ds = Dataset.from_list([{"input_ids": tokenize(tokenizer, CONVERSATION)}] * 2)
    out = train_on_responses_only(ds, tokenizer=tokenizer)
    assert isinstance(out, Dataset) and out.column_names == ["input_ids", "labels"]
    assert trained_runs(tokenizer, out[0]["input_ids"], out[0]["labels"]) == ["5<|im_end|>\n", "8<|im_end|>\n"]


def _tiny_llama(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config)


def _sft_config(tmp_path, max_steps):
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=16, learning_rate=1e-2,
        lr_scheduler_type="constant", logging_steps=1, report_to="none", save_strategy="no", use_cpu=True,
        seed=0, max_length=64, disable_tqdm=True,
    )


def test_sft_trainer_trains_on_responses_only(tmp_path):
    from datasets import Dataset
    from trl import SFTTrainer

    tokenizer = load_default_tokenizer()
    records = load_default_dataset()
    train = Dataset.from_list(records[:128])
    evals = Dataset.from_list(records[128:160])
    model = _tiny_llama(tokenizer)
    trainer = SFTTrainer(
        model=model, args=_sft_config(tmp_path, 24), train_dataset=train, eval_dataset=evals, processing_class=tokenizer
    )
    trainer = train_on_responses_only(trainer)
    for row in list(trainer.train_dataset)[:5] + list(trainer.eval_dataset)[:5]:
        assert len(trained_runs(tokenizer, row["input_ids"], row["labels"])) == 1
        (run,) = trained_runs(tokenizer, row["input_ids"], row["labels"])
        answer = tokenizer.decode(row["input_ids"]).split("<|im_start|>assistant\n")[1]
        assert run == answer and run.endswith("<|im_end|>\n") and run[:-11].isdigit()

    # The collated batch carries those labels, and the trainer's loss is the cross-entropy over
    # exactly the response tokens (not over the whole sequence).
    batch = next(iter(trainer.get_train_dataloader()))
    masker = ResponseMasker(tokenizer)
    for ids, labels, attention in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        n = int(attention.sum())
        assert labels[:n].tolist() == masker.labels(ids[:n].tolist())
        assert (labels[n:] == -100).all()
    model.eval()
    with torch.no_grad():
        trainer_loss = trainer.compute_loss(model, dict(batch)).item()
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    shifted_logits, shifted_labels = logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1)
    response_loss = torch.nn.functional.cross_entropy(shifted_logits, shifted_labels, ignore_index=-100).item()
    full_labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)[:, 1:].reshape(-1)
    full_loss = torch.nn.functional.cross_entropy(shifted_logits, full_labels, ignore_index=-100).item()
    assert trainer_loss == pytest.approx(response_loss, rel=1e-4)
    # ...and that is a real restriction: far fewer tokens than the whole sequences. (Comparing
    # the two loss values instead is data-dependent: at random init both sit near log(vocab).)
    assert (shifted_labels != -100).sum() * 3 < (full_labels != -100).sum()
    assert trainer_loss != pytest.approx(full_loss, rel=1e-6)

    model.train()
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 24
    assert all(loss > 0.1 for loss in losses)
    assert sum(losses[-4:]) / 4 < 0.6 * sum(losses[:4]) / 4, losses


def test_sft_trainer_wrong_parts_raise(tmp_path):
    from datasets import Dataset
    from trl import SFTTrainer

    tokenizer = load_default_tokenizer()
    trainer = SFTTrainer(
        model=_tiny_llama(tokenizer), args=_sft_config(tmp_path, 1),
        train_dataset=Dataset.from_list(load_default_dataset()[:8]), processing_class=tokenizer,
    )
    with pytest.raises(ValueError, match="every label would be -100"):
        train_on_responses_only(trainer, instruction_part="### Instruction:\n", response_part="### Response:\n")


def test_other_collators_are_wrapped(tmp_path):
    """A collator that rebuilds labels from input_ids (ignoring the dataset's labels) is wrapped so
    that its batches are masked too."""
    from datasets import Dataset
    from trl import SFTTrainer

    tokenizer = load_default_tokenizer()

    def full_sequence_collator(features):
        batch = tokenizer.pad([{"input_ids": f["input_ids"]} for f in features], return_tensors="pt")
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        return batch

    trainer = SFTTrainer(
        model=_tiny_llama(tokenizer), args=_sft_config(tmp_path, 1),
        train_dataset=Dataset.from_list(load_default_dataset()[:8]), processing_class=tokenizer,
        data_collator=full_sequence_collator,
    )
    trainer = train_on_responses_only(trainer)
    batch = next(iter(trainer.get_train_dataloader()))
    masker = ResponseMasker(tokenizer)
    assert (batch["labels"] == -100).sum() > (batch["attention_mask"] == 0).sum()
    for ids, labels, attention in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        n = int(attention.sum())
        assert labels[:n].tolist() == masker.labels(ids[:n].tolist())
        assert (labels[n:] == -100).all()


def test_guide_flow_sharegpt_text_field_llama31(tmp_path):
    """The documented golden path: llama-3.1 template, ShareGPT data standardised, rendered to a
    "text" column, SFTTrainer, then train_on_responses_only with the Llama 3 header strings."""
    from datasets import Dataset
    from trl import SFTTrainer

    from fastft.chat_templates import standardize_sharegpt
    from fastft.data import chatml_to_sharegpt

    tokenizer = get_chat_template(load_default_tokenizer(), chat_template="llama-3.1")
    sharegpt = Dataset.from_list(chatml_to_sharegpt(load_default_dataset()[:16]))
    ds = standardize_sharegpt(sharegpt)
    ds = ds.map(
        lambda examples: {
            "text": [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=False)
                     for c in examples["conversations"]]
        },
        batched=True,
        remove_columns=["conversations"],
    )
    args = _sft_config(tmp_path, 1)
    args.dataset_text_field = "text"
    args.max_length = 256  # Llama 3.1's date header is long in this small BPE
    trainer = SFTTrainer(model=_tiny_llama(tokenizer), args=args, train_dataset=ds, processing_class=tokenizer)
    trainer = train_on_responses_only(
        trainer,
        instruction_part="<|start_header_id|>user<|end_header_id|>\n\n",
        response_part="<|start_header_id|>assistant<|end_header_id|>\n\n",
    )
    assert len(trainer.train_dataset) == 16
    for row in trainer.train_dataset:
        (run,) = trained_runs(tokenizer, row["input_ids"], row["labels"])
        assert run.endswith("<|eot_id|>") and run[: -len("<|eot_id|>")].isdigit(), run


def test_sft_trainer_packing(tmp_path):
    """With packing TRL concatenates examples (recording seq_lengths) and collates padding-free:
    every packed example is masked on its own, so a system turn after an answer stays masked."""
    from datasets import Dataset
    from trl import SFTTrainer

    tokenizer = load_default_tokenizer()
    records = load_default_dataset()[:24]
    records = [{"messages": [SYSTEM] + r["messages"]} if i % 2 else r for i, r in enumerate(records)]
    args = _sft_config(tmp_path, 1)
    args.packing = True
    args.per_device_train_batch_size = 2
    trainer = SFTTrainer(
        model=_tiny_llama(tokenizer), args=args, train_dataset=Dataset.from_list(records), processing_class=tokenizer
    )
    trainer = train_on_responses_only(trainer)
    answers = 0
    for row in trainer.train_dataset:
        assert "seq_lengths" in row and len(row["seq_lengths"]) > 1
        runs = trained_runs(tokenizer, row["input_ids"], row["labels"])
        assert all(run.endswith("<|im_end|>\n") and run[:-11].isdigit() for run in runs), runs
        answers += len(runs)
    assert answers == len(records)
    batch = next(iter(trainer.get_train_dataloader()))
    assert "position_ids" in batch
    trained = tokenizer.decode(batch["input_ids"][batch["labels"] != -100])
    assert "terse" not in trained and "What" not in trained and "<|im_start|>" not in trained
