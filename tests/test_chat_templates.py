"""get_chat_template: every format renders a fixed conversation to the exact string written out here
(from the families' published prompt formats), with and without a system message and with the
generation prompt; plus name aliases, errors, ShareGPT mapping, special tokens and EOS handling."""
import pytest

from fastft.assets import load_default_tokenizer
from fastft.chat_templates import available_chat_templates, get_chat_template
from tests.helpers import family_tokenizer

SYSTEM = {"role": "system", "content": "You are a terse calculator."}
CONVERSATION = [
    {"role": "user", "content": "What is 2+3?"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "And 4+4?"},
    {"role": "assistant", "content": "8"},
]
PROMPT_ONLY = CONVERSATION[:3]


# name -> (no system, with system, generation prompt after the second question)
EXPECTED = {
    "llama-3.1": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+3?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n5<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAnd 4+4?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n8<|eot_id|>",
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\nYou are a terse calculator.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+3?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n5<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAnd 4+4?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n8<|eot_id|>",
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+3?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n5<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAnd 4+4?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
    ),
    "llama-3": (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+3?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n5<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAnd 4+4?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n8<|eot_id|>",
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a terse calculator.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+3?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n5<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAnd 4+4?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n8<|eot_id|>",
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+3?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n5<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAnd 4+4?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
    ),
    "chatml": (
        "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n5<|im_end|>\n"
        "<|im_start|>user\nAnd 4+4?<|im_end|>\n<|im_start|>assistant\n8<|im_end|>\n",
        "<|im_start|>system\nYou are a terse calculator.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n5<|im_end|>\n"
        "<|im_start|>user\nAnd 4+4?<|im_end|>\n<|im_start|>assistant\n8<|im_end|>\n",
        "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n5<|im_end|>\n"
        "<|im_start|>user\nAnd 4+4?<|im_end|>\n<|im_start|>assistant\n",
    ),
    "mistral": (
        "<s>[INST] What is 2+3? [/INST]5</s>[INST] And 4+4? [/INST]8</s>",
        "<s>[INST] You are a terse calculator.\n\nWhat is 2+3? [/INST]5</s>[INST] And 4+4? [/INST]8</s>",
        "<s>[INST] What is 2+3? [/INST]5</s>[INST] And 4+4? [/INST]",
    ),
    "gemma": (
        "<bos><start_of_turn>user\nWhat is 2+3?<end_of_turn>\n<start_of_turn>model\n5<end_of_turn>\n"
        "<start_of_turn>user\nAnd 4+4?<end_of_turn>\n<start_of_turn>model\n8<end_of_turn>\n",
        "<bos><start_of_turn>user\nYou are a terse calculator.\n\nWhat is 2+3?<end_of_turn>\n"
        "<start_of_turn>model\n5<end_of_turn>\n"
        "<start_of_turn>user\nAnd 4+4?<end_of_turn>\n<start_of_turn>model\n8<end_of_turn>\n",
        "<bos><start_of_turn>user\nWhat is 2+3?<end_of_turn>\n<start_of_turn>model\n5<end_of_turn>\n"
        "<start_of_turn>user\nAnd 4+4?<end_of_turn>\n<start_of_turn>model\n",
    ),
    "gemma-3": (
        "<bos><start_of_turn>user\nWhat is 2+3?<end_of_turn>\n<start_of_turn>model\n5<end_of_turn>\n"
        "<start_of_turn>user\nAnd 4+4?<end_of_turn>\n<start_of_turn>model\n8<end_of_turn>\n",
        "<bos><start_of_turn>user\nYou are a terse calculator.\n\nWhat is 2+3?<end_of_turn>\n"
        "<start_of_turn>model\n5<end_of_turn>\n"
        "<start_of_turn>user\nAnd 4+4?<end_of_turn>\n<start_of_turn>model\n8<end_of_turn>\n",
        "<bos><start_of_turn>user\nWhat is 2+3?<end_of_turn>\n<start_of_turn>model\n5<end_of_turn>\n"
        "<start_of_turn>user\nAnd 4+4?<end_of_turn>\n<start_of_turn>model\n",
    ),
    "qwen-2.5": (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n5<|im_end|>\n"
        "<|im_start|>user\nAnd 4+4?<|im_end|>\n<|im_start|>assistant\n8<|im_end|>\n",
        "<|im_start|>system\nYou are a terse calculator.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n5<|im_end|>\n"
        "<|im_start|>user\nAnd 4+4?<|im_end|>\n<|im_start|>assistant\n8<|im_end|>\n",
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n5<|im_end|>\n"
        "<|im_start|>user\nAnd 4+4?<|im_end|>\n<|im_start|>assistant\n",
    ),
    # Qwen 3 prints an (empty) think block in the assistant turn after the last user message only.
    "qwen-3": (
        "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n5<|im_end|>\n"
        "<|im_start|>user\nAnd 4+4?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n8<|im_end|>\n",
        "<|im_start|>system\nYou are a terse calculator.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n5<|im_end|>\n"
        "<|im_start|>user\nAnd 4+4?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n8<|im_end|>\n",
        "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n5<|im_end|>\n"
        "<|im_start|>user\nAnd 4+4?<|im_end|>\n<|im_start|>assistant\n",
    ),
    "phi-3": (
        "<|user|>\nWhat is 2+3?<|end|>\n<|assistant|>\n5<|end|>\n"
        "<|user|>\nAnd 4+4?<|end|>\n<|assistant|>\n8<|end|>\n<|endoftext|>",
        "<|system|>\nYou are a terse calculator.<|end|>\n"
        "<|user|>\nWhat is 2+3?<|end|>\n<|assistant|>\n5<|end|>\n"
        "<|user|>\nAnd 4+4?<|end|>\n<|assistant|>\n8<|end|>\n<|endoftext|>",
        "<|user|>\nWhat is 2+3?<|end|>\n<|assistant|>\n5<|end|>\n<|user|>\nAnd 4+4?<|end|>\n<|assistant|>\n",
    ),
    "phi-4": (
        "<|im_start|>user<|im_sep|>What is 2+3?<|im_end|><|im_start|>assistant<|im_sep|>5<|im_end|>"
        "<|im_start|>user<|im_sep|>And 4+4?<|im_end|><|im_start|>assistant<|im_sep|>8<|im_end|>",
        "<|im_start|>system<|im_sep|>You are a terse calculator.<|im_end|>"
        "<|im_start|>user<|im_sep|>What is 2+3?<|im_end|><|im_start|>assistant<|im_sep|>5<|im_end|>"
        "<|im_start|>user<|im_sep|>And 4+4?<|im_end|><|im_start|>assistant<|im_sep|>8<|im_end|>",
        "<|im_start|>user<|im_sep|>What is 2+3?<|im_end|><|im_start|>assistant<|im_sep|>5<|im_end|>"
        "<|im_start|>user<|im_sep|>And 4+4?<|im_end|><|im_start|>assistant<|im_sep|>",
    ),
    "alpaca": (
        "<s>Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nWhat is 2+3?\n\n### Response:\n5</s>\n\n"
        "### Instruction:\nAnd 4+4?\n\n### Response:\n8</s>\n\n",
        "<s>You are a terse calculator.\n\n### Instruction:\nWhat is 2+3?\n\n### Response:\n5</s>\n\n"
        "### Instruction:\nAnd 4+4?\n\n### Response:\n8</s>\n\n",
        "<s>Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nWhat is 2+3?\n\n### Response:\n5</s>\n\n"
        "### Instruction:\nAnd 4+4?\n\n### Response:\n",
    ),
    "vicuna": (
        "<s>A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: What is 2+3? ASSISTANT: 5</s>"
        "USER: And 4+4? ASSISTANT: 8</s>",
        "<s>You are a terse calculator. USER: What is 2+3? ASSISTANT: 5</s>USER: And 4+4? ASSISTANT: 8</s>",
        "<s>A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: What is 2+3? ASSISTANT: 5</s>"
        "USER: And 4+4? ASSISTANT:",
    ),
    "zephyr": (
        "<|user|>\nWhat is 2+3?</s>\n<|assistant|>\n5</s>\n<|user|>\nAnd 4+4?</s>\n<|assistant|>\n8</s>\n",
        "<|system|>\nYou are a terse calculator.</s>\n"
        "<|user|>\nWhat is 2+3?</s>\n<|assistant|>\n5</s>\n<|user|>\nAnd 4+4?</s>\n<|assistant|>\n8</s>\n",
        "<|user|>\nWhat is 2+3?</s>\n<|assistant|>\n5</s>\n<|user|>\nAnd 4+4?</s>\n<|assistant|>\n",
    ),
    "unsloth": (
        "<s>You are a helpful assistant to the user\n>>> User: What is 2+3?\n>>> Assistant: 5</s>\n"
        ">>> User: And 4+4?\n>>> Assistant: 8</s>\n",
        "<s>You are a terse calculator.\n>>> User: What is 2+3?\n>>> Assistant: 5</s>\n"
        ">>> User: And 4+4?\n>>> Assistant: 8</s>\n",
        "<s>You are a helpful assistant to the user\n>>> User: What is 2+3?\n>>> Assistant: 5</s>\n"
        ">>> User: And 4+4?\n>>> Assistant: ",
    ),
}


def render(tokenizer, messages, generation_prompt=False, **kwargs):
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt, **kwargs
    )


def test_every_template_has_expected_strings():
    assert sorted(EXPECTED) == sorted(available_chat_templates())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_template_renders_official_format(name):
    tokenizer = get_chat_template(family_tokenizer(name), chat_template=name)
    no_system, with_system, generation = EXPECTED[name]
    assert render(tokenizer, CONVERSATION) == no_system
    assert render(tokenizer, [SYSTEM] + CONVERSATION) == with_system
    assert render(tokenizer, PROMPT_ONLY, generation_prompt=True) == generation


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_template_markers_are_single_tokens(name):
    """Markers the format adds as special tokens must tokenise as one token each."""
    from fastft.chat_templates import CHAT_TEMPLATES

    tokenizer = get_chat_template(family_tokenizer(name), chat_template=name)
    for token in CHAT_TEMPLATES[name].special_tokens:
        ids = tokenizer(token, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, (token, ids)
        assert tokenizer.convert_ids_to_tokens(ids[0]) == token


def test_qwen3_reasoning_and_enable_thinking():
    tokenizer = get_chat_template(load_default_tokenizer(), "qwen-3")
    thought = [
        {"role": "user", "content": "What is 2+3?"},
        {"role": "assistant", "content": "5", "reasoning_content": "2 plus 3 is 5."},
    ]
    assert render(tokenizer, thought) == (
        "<|im_start|>user\nWhat is 2+3?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n2 plus 3 is 5.\n</think>\n\n5<|im_end|>\n"
    )
    inline = [thought[0], {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n5"}]
    assert render(tokenizer, inline) == (
        "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n<think>\nadd them\n</think>\n\n5<|im_end|>\n"
    )
    assert render(tokenizer, thought[:1], generation_prompt=True, enable_thinking=False) == (
        "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )


@pytest.mark.parametrize(
    "alias, canonical",
    [("llama3", "llama-3"), ("Llama-3.1", "llama-3.1"), ("llama3.2", "llama-3.1"), ("qwen2.5", "qwen-2.5"),
     ("qwen25", "qwen-2.5"), ("Qwen3", "qwen-3"), ("gemma2", "gemma"), ("gemma_3", "gemma-3"),
     ("phi3", "phi-3"), ("phi-3.5", "phi-3"), ("PHI4", "phi-4"), ("ChatML", "chatml")],
)
def test_aliases(alias, canonical):
    a = get_chat_template(family_tokenizer(canonical), alias)
    b = get_chat_template(family_tokenizer(canonical), canonical)
    assert a.chat_template == b.chat_template
    assert render(a, CONVERSATION) == EXPECTED[canonical][0]


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as err:
        get_chat_template(load_default_tokenizer(), "llama-9")
    message = str(err.value)
    assert "'llama-9'" in message
    for name in available_chat_templates():
        assert name in message


def test_sharegpt_mapping():
    tokenizer = get_chat_template(
        load_default_tokenizer(),
        "chatml",
        mapping={"role": "from", "content": "value", "user": "human", "assistant": "gpt"},
    )
    sharegpt = [
        {"from": "system", "value": "You are a terse calculator."},
        {"from": "human", "value": "What is 2+3?"},
        {"from": "gpt", "value": "5"},
        {"from": "human", "value": "And 4+4?"},
        {"from": "gpt", "value": "8"},
    ]
    assert render(tokenizer, sharegpt) == EXPECTED["chatml"][1]
    assert render(tokenizer, sharegpt[:4], generation_prompt=True) == (
        "<|im_start|>system\nYou are a terse calculator.<|im_end|>\n" + EXPECTED["chatml"][2]
    )


def test_system_message_override():
    tokenizer = get_chat_template(load_default_tokenizer(), "qwen-2.5", system_message="Answer with digits.")
    assert render(tokenizer, CONVERSATION[:2]) == (
        "<|im_start|>system\nAnswer with digits.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n5<|im_end|>\n"
    )
    with pytest.raises(ValueError, match="no default system message"):
        get_chat_template(load_default_tokenizer(), "chatml", system_message="x")


def test_custom_template_tuple():
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}<|turn_end|>{% endfor %}"
    tokenizer = get_chat_template(load_default_tokenizer(), (template, "<|turn_end|>"))
    assert render(tokenizer, CONVERSATION[:2]) == "[user] What is 2+3?<|turn_end|>[assistant] 5<|turn_end|>"
    assert tokenizer.eos_token == "<|turn_end|>"
    assert len(tokenizer("<|turn_end|>", add_special_tokens=False)["input_ids"]) == 1
    with pytest.raises(ValueError, match="pair"):
        get_chat_template(load_default_tokenizer(), (template,))


def test_tokens_added_and_model_resized():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = load_default_tokenizer()
    original_eos_id = tokenizer.eos_token_id
    vocab_before = len(tokenizer)
    assert "<|eot_id|>" not in tokenizer.get_vocab()
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=vocab_before, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=2)
    )
    model.generation_config.eos_token_id = original_eos_id
    get_chat_template(tokenizer, "llama-3.1", model=model)
    vocab = tokenizer.get_vocab()
    for token in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"):
        assert token in vocab
    assert len(tokenizer) == vocab_before + 3
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    assert model.get_output_embeddings().weight.shape[0] == len(tokenizer)
    # map_eos_token: the turn end is the EOS now, and generation stops at it (and at the old EOS).
    assert tokenizer.eos_token == "<|eot_id|>"
    eos_ids = model.generation_config.eos_token_id
    assert tokenizer.convert_tokens_to_ids("<|eot_id|>") in eos_ids and original_eos_id in eos_ids


def test_map_eos_token_false_keeps_eos():
    tokenizer = load_default_tokenizer()
    get_chat_template(tokenizer, "gemma", map_eos_token=False)
    assert tokenizer.eos_token == "<|im_end|>"
    assert "<end_of_turn>" in tokenizer.get_vocab()
    get_chat_template(tokenizer, "gemma", map_eos_token=True)
    assert tokenizer.eos_token == "<end_of_turn>"


def test_pad_token_added_when_missing():
    tokenizer = load_default_tokenizer()
    tokenizer.pad_token = None
    get_chat_template(tokenizer, "chatml")
    assert tokenizer.pad_token is not None and tokenizer.pad_token != tokenizer.eos_token


def test_shipped_tokenizer_has_chatml():
    tokenizer = load_default_tokenizer()
    assert render(tokenizer, CONVERSATION) == EXPECTED["chatml"][0]
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.bos_token is not None


def test_unsloth_style_imports():
    import fastft
    from fastft.chat_templates import standardize_sharegpt, to_sharegpt, train_on_responses_only

    assert fastft.get_chat_template is get_chat_template
    assert fastft.standardize_sharegpt is standardize_sharegpt
    assert fastft.to_sharegpt is to_sharegpt
    assert fastft.train_on_responses_only is train_on_responses_only
    assert callable(fastft.detect_format)
