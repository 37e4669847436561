"""Chat templates: `get_chat_template(tokenizer, "llama-3.1")` installs a Jinja template that renders
the official prompt format of a model family, adds the special tokens that format needs and sets the
stop token.

Every template here was written for fastft from the published formats. Where the official template
prints `bos_token` / `eos_token`, ours does too (so with the family's own tokenizer the output is the
official string byte for byte); where the official one prints a literal marker (`<|eot_id|>`,
`<|im_end|>`, ...), ours prints the same literal. Tool calling is not rendered.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = [
    "CHAT_TEMPLATES",
    "ChatTemplate",
    "available_chat_templates",
    "get_chat_template",
    "resolve_chat_template_name",
]


@dataclass(frozen=True)
class ChatTemplate:
    """One prompt format.

    template: Jinja source. `{DEFAULT_SYSTEM}` (if present) is replaced by a Jinja string literal
        holding the default system message.
    stop_token: the token that ends an assistant turn; None means "the tokenizer's own eos_token".
    special_tokens: literal markers the format prints; added to the tokenizer when missing.
    default_system_message: system prompt used when a conversation has none (None: no default).
    """

    template: str
    stop_token: str | None
    special_tokens: tuple[str, ...] = ()
    default_system_message: str | None = None
    extra_stop_tokens: tuple[str, ...] = field(default_factory=tuple)


def _jinja_str(text: str) -> str:
    """A Jinja string literal that evaluates to `text`."""
    escaped = text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n").replace("\r", "\\r")
    return "'" + escaped + "'"


# In all templates below every tag starts with `{%-` or `{{-`, so the line breaks between tags are
# layout only and never reach the output. Jinja string literals use '\n' escapes for real newlines.

_BOS = "{%- if bos_token %}{{- bos_token }}{%- endif %}"
_EOS = "(eos_token if eos_token else '')"

# Gemma 2 / Gemma 3 (google/gemma-2-*-it, google/gemma-3-*-it). Gemma has no system role: like the
# official Gemma 3 template, a system message is put before the first user message (the Gemma 2
# template raises instead; we render the Gemma 3 way so data with system prompts still works).
_GEMMA = r"""
{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- if messages[0]['content'] is string %}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' %}
    {%- else %}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' %}
    {%- endif %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set first_user_prefix = '' %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Gemma conversations must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}
    {{- '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}
    {%- if message['content'] is string %}
        {{- message['content'] | trim }}
    {%- else %}
        {%- for item in message['content'] %}
            {%- if item['type'] == 'image' %}
                {{- '<start_of_image>' }}
            {%- elif item['type'] == 'text' %}
                {{- item['text'] | trim }}
            {%- endif %}
        {%- endfor %}
    {%- endif %}
    {{- '<end_of_turn>\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<start_of_turn>model\n' }}
{%- endif %}
"""

# Llama 3.1 / 3.2 / 3.3 Instruct (meta-llama/Llama-3.1-8B-Instruct): a system block is always
# printed, carrying the knowledge-cutoff and date lines; contents are trimmed.
_LLAMA31 = r"""
{{- bos_token }}
{%- if date_string is not defined %}
    {%- set date_string = '26 Jul 2024' %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set system_message = '' %}
    {%- set loop_messages = messages %}
{%- endif %}
{{- '<|start_header_id|>system<|end_header_id|>\n\n' }}
{{- 'Cutting Knowledge Date: December 2023\n' }}
{{- 'Today Date: ' + date_string + '\n\n' }}
{{- system_message }}
{{- '<|eot_id|>' }}
{%- for message in loop_messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

# Llama 3 Instruct (meta-llama/Meta-Llama-3-8B-Instruct): no default system block.
_LLAMA3 = r"""
{%- for message in messages %}
    {%- if loop.first %}
        {{- bos_token }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

# ChatML (OpenAI's format, used by many fine-tunes): no BOS, no default system message.
_CHATML = r"""
{%- for message in messages %}
    {{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# Qwen 2.5 Instruct: ChatML with Qwen's default system message.
_QWEN25 = r"""
{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {{- '<|im_start|>system\n' + {DEFAULT_SYSTEM} + '<|im_end|>\n' }}
    {%- set loop_messages = messages %}
{%- endif %}
{%- for message in loop_messages %}
    {{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# Qwen 3: ChatML; assistant turns after the last user message carry a <think> block (empty when the
# message has no reasoning), earlier ones are printed without their reasoning.
# `enable_thinking=False` at generation time prints an empty think block after the prompt.
_QWEN3 = r"""
{%- set ns = namespace(last_query_index=-1) %}
{%- for message in messages %}
    {%- if message['role'] == 'user' %}
        {%- set ns.last_query_index = loop.index0 %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- set content = message['content'] if message['content'] is string else '' %}
    {%- if message['role'] == 'assistant' %}
        {%- set reasoning = '' %}
        {%- if message['reasoning_content'] is defined and message['reasoning_content'] is string %}
            {%- set reasoning = message['reasoning_content'] %}
        {%- elif '</think>' in content %}
            {%- set reasoning = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index and (loop.last or reasoning) %}
            {{- '<|im_start|>assistant\n<think>\n' + reasoning.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
        {%- else %}
            {{- '<|im_start|>assistant\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>' + message['role'] + '\n' + content + '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}
"""

# Mistral Instruct (v0.1 / v0.2 style). It has no system role: the system message goes before the
# first user message, separated by a blank line.
_MISTRAL = r"""
{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_prefix = messages[0]['content'] + '\n\n' %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set system_prefix = '' %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Mistral conversations must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {{- '[INST] ' + (system_prefix if loop.first else '') + message['content'] + ' [/INST]' }}
    {%- else %}
        {{- message['content'] + eos_token }}
    {%- endif %}
{%- endfor %}
"""

# Phi-3 / Phi-3.5 mini instruct. The official template ends a training text with eos_token, which is
# '<|endoftext|>' in Phi-3's tokenizer; we print that literal so that mapping the tokenizer's eos to
# '<|end|>' cannot change the text.
_PHI3 = r"""
{%- for message in messages %}
    {{- '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|assistant|>\n' }}
{%- else %}
    {{- '<|endoftext|>' }}
{%- endif %}
"""

# Phi-4: ChatML-like with <|im_sep|> after the role and no newlines.
_PHI4 = r"""
{%- for message in messages %}
    {{- '<|im_start|>' + message['role'] + '<|im_sep|>' + message['content'] + '<|im_end|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant<|im_sep|>' }}
{%- endif %}
"""

# Stanford Alpaca's prompt, extended to several turns: each response ends with eos_token and a blank line.
_ALPACA = (
    _BOS
    + r"""
{%- if messages[0]['role'] == 'system' %}
    {{- messages[0]['content'] + '\n\n' }}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {{- {DEFAULT_SYSTEM} + '\n\n' }}
    {%- set loop_messages = messages %}
{%- endif %}
{%- for message in loop_messages %}
    {%- if message['role'] == 'user' %}
        {{- '### Instruction:\n' + message['content'] + '\n\n' }}
    {%- elif message['role'] == 'assistant' %}
        {{- '### Response:\n' + message['content'] + EOS + '\n\n' }}
    {%- else %}
        {{- raise_exception('The alpaca format has only user and assistant turns after the system message') }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '### Response:\n' }}
{%- endif %}
""".replace("EOS", _EOS)
)

# Vicuna v1.1 (FastChat): "SYSTEM USER: ... ASSISTANT: ...</s>USER: ... ASSISTANT:".
_VICUNA = (
    _BOS
    + r"""
{%- if messages[0]['role'] == 'system' %}
    {{- messages[0]['content'] + ' ' }}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {{- {DEFAULT_SYSTEM} + ' ' }}
    {%- set loop_messages = messages %}
{%- endif %}
{%- for message in loop_messages %}
    {%- if message['role'] == 'user' %}
        {{- 'USER: ' + message['content'] + ' ' }}
    {%- elif message['role'] == 'assistant' %}
        {{- 'ASSISTANT: ' + message['content'] + EOS }}
    {%- else %}
        {{- raise_exception('The vicuna format has only user and assistant turns after the system message') }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- 'ASSISTANT:' }}
{%- endif %}
""".replace("EOS", _EOS)
)

# Zephyr (HuggingFaceH4/zephyr-7b-beta): every turn ends with eos_token and a newline; no BOS.
_ZEPHYR = r"""
{%- for message in messages %}
    {{- '<|' + message['role'] + '|>\n' + message['content'] + EOS + '\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|assistant|>\n' }}
{%- endif %}
""".replace("EOS", _EOS)

# Unsloth's compact format: "SYSTEM\n>>> User: ...\n>>> Assistant: ...</s>\n".
_UNSLOTH = (
    _BOS
    + r"""
{%- if messages[0]['role'] == 'system' %}
    {{- messages[0]['content'] + '\n' }}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {{- {DEFAULT_SYSTEM} + '\n' }}
    {%- set loop_messages = messages %}
{%- endif %}
{%- for message in loop_messages %}
    {%- if message['role'] == 'user' %}
        {{- '>>> User: ' + message['content'] + '\n' }}
    {%- elif message['role'] == 'assistant' %}
        {{- '>>> Assistant: ' + message['content'] + EOS + '\n' }}
    {%- else %}
        {{- raise_exception('The unsloth format has only user and assistant turns after the system message') }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '>>> Assistant: ' }}
{%- endif %}
""".replace("EOS", _EOS)
)

_LLAMA3_TOKENS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")

CHAT_TEMPLATES: dict[str, ChatTemplate] = {
    "llama-3.1": ChatTemplate(_LLAMA31, "<|eot_id|>", _LLAMA3_TOKENS),
    "llama-3": ChatTemplate(_LLAMA3, "<|eot_id|>", _LLAMA3_TOKENS),
    "chatml": ChatTemplate(_CHATML, "<|im_end|>", ("<|im_start|>", "<|im_end|>")),
    # [INST] / [/INST] and Zephyr's <|user|> are plain text in those tokenizers: not added as tokens.
    "mistral": ChatTemplate(_MISTRAL, None),
    "gemma": ChatTemplate(_GEMMA, "<end_of_turn>", ("<start_of_turn>", "<end_of_turn>")),
    "gemma-3": ChatTemplate(_GEMMA, "<end_of_turn>", ("<start_of_turn>", "<end_of_turn>")),
    "qwen-2.5": ChatTemplate(
        _QWEN25,
        "<|im_end|>",
        ("<|im_start|>", "<|im_end|>"),
        default_system_message="You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
    ),
    "qwen-3": ChatTemplate(_QWEN3, "<|im_end|>", ("<|im_start|>", "<|im_end|>")),
    "phi-3": ChatTemplate(
        _PHI3,
        "<|end|>",
        ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>"),
        extra_stop_tokens=("<|endoftext|>",),
    ),
    "phi-4": ChatTemplate(_PHI4, "<|im_end|>", ("<|im_start|>", "<|im_sep|>", "<|im_end|>")),
    "alpaca": ChatTemplate(
        _ALPACA,
        None,
        default_system_message="Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.",
    ),
    "vicuna": ChatTemplate(
        _VICUNA,
        None,
        default_system_message="A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    ),
    "zephyr": ChatTemplate(_ZEPHYR, None),
    "unsloth": ChatTemplate(_UNSLOTH, None, default_system_message="You are a helpful assistant to the user"),
}

# Spellings users type, after _normalise_name (lower case, no '-', '_', '.', ' ').
_ALIASES = {
    "llama31": "llama-3.1",
    "llama32": "llama-3.1",  # Llama 3.2 / 3.3 use the 3.1 format
    "llama33": "llama-3.1",
    "llama3": "llama-3",
    "chatml": "chatml",
    "mistral": "mistral",
    "gemma": "gemma",
    "gemma2": "gemma",
    "gemma3": "gemma-3",
    "qwen25": "qwen-2.5",
    "qwen2": "qwen-2.5",
    "qwen3": "qwen-3",
    "phi3": "phi-3",
    "phi35": "phi-3",
    "phi4": "phi-4",
    "alpaca": "alpaca",
    "vicuna": "vicuna",
    "zephyr": "zephyr",
    "unsloth": "unsloth",
}


def _normalise_name(name: str) -> str:
    return re.sub(r"[-_.\s]", "", name.lower())


def available_chat_templates() -> list[str]:
    """The canonical template names (aliases such as 'llama3' or 'qwen2.5' are accepted too)."""
    return list(CHAT_TEMPLATES)


def resolve_chat_template_name(name: str) -> str:
    """Map a user-typed name ('Llama3.1', 'qwen2.5', 'gemma_3') to its canonical name."""
    canonical = _ALIASES.get(_normalise_name(name))
    if canonical is None:
        raise ValueError(
            f"Unknown chat template {name!r}. Valid names: {', '.join(CHAT_TEMPLATES)} "
            "(also spelled without dashes, e.g. 'llama3', 'qwen2.5'). To use your own template pass "
            "chat_template=(jinja_template, eos_token)."
        )
    return canonical


_DEFAULT_MAPPING = {"role": "role", "content": "content", "user": "user", "assistant": "assistant"}


def _mapping_preamble(mapping: dict) -> str:
    """Jinja that rewrites `messages` from a ShareGPT-like layout into role/content messages, so the
    template proper can stay written for role/content."""
    unknown = set(mapping) - {"role", "content", "user", "assistant", "system"}
    if unknown:
        raise ValueError(
            f"mapping has unknown keys {sorted(unknown)}; expected 'role', 'content', 'user', 'assistant' "
            "and optionally 'system', e.g. {'role': 'from', 'content': 'value', 'user': 'human', 'assistant': 'gpt'}"
        )
    role_key = mapping.get("role", "role")
    content_key = mapping.get("content", "content")
    role_names = {mapping.get(r, r): r for r in ("user", "assistant", "system")}
    lines = ["{%- set ns_map = namespace(messages=[]) %}", "{%- for m in messages %}"]
    lines.append("{%- set r = m[" + _jinja_str(role_key) + "] %}")
    for source, target in role_names.items():
        lines.append("{%- if r == " + _jinja_str(source) + " %}{%- set r = " + _jinja_str(target) + " %}{%- endif %}")
    lines.append(
        "{%- set ns_map.messages = ns_map.messages + [{'role': r, 'content': m[" + _jinja_str(content_key) + "]}] %}"
    )
    lines.append("{%- endfor %}")
    lines.append("{%- set messages = ns_map.messages %}")
    return "\n".join(lines)


def build_chat_template(name: str, system_message: str | None = None, mapping: dict | None = None) -> str:
    """The Jinja source of a named template, with the default system message and ShareGPT key mapping
    filled in."""
    spec = CHAT_TEMPLATES[resolve_chat_template_name(name)]
    template = spec.template
    if "{DEFAULT_SYSTEM}" in template:
        template = template.replace("{DEFAULT_SYSTEM}", _jinja_str(system_message or spec.default_system_message))
    elif system_message is not None:
        raise ValueError(
            f"The {name!r} format has no default system message to replace; put a system turn in the "
            "conversation instead of passing system_message."
        )
    template = template.strip()
    if mapping is not None and dict(mapping) != _DEFAULT_MAPPING:
        template = _mapping_preamble(mapping) + "\n" + template
    return template


def _add_missing_tokens(tokenizer, tokens) -> list[str]:
    """Add `tokens` as special tokens where the tokenizer lacks them; return the ones added."""
    from tokenizers import AddedToken

    vocab = tokenizer.get_vocab()
    missing = [t for t in dict.fromkeys(tokens) if t and t not in vocab]
    if missing:
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
    return missing


def _resize_model(model, tokenizer) -> None:
    embeddings = model.get_input_embeddings()
    if embeddings is not None and embeddings.weight.shape[0] < len(tokenizer):
        # mean-initialised new rows (transformers' default) keep the new tokens' logits sane.
        model.resize_token_embeddings(len(tokenizer))


def _set_generation_stop(model, tokenizer, stop_tokens) -> None:
    generation_config = getattr(model, "generation_config", None)
    if generation_config is None:
        return
    ids = []
    current = generation_config.eos_token_id
    if current is not None:
        ids.extend(current if isinstance(current, (list, tuple)) else [current])
    for token in stop_tokens:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is not None and token_id not in ids:
            ids.append(token_id)
    if ids:
        generation_config.eos_token_id = ids if len(ids) > 1 else ids[0]


def get_chat_template(
    tokenizer,
    chat_template="chatml",
    mapping: dict | None = None,
    map_eos_token: bool = True,
    system_message: str | None = None,
    model=None,
):
    """Install a chat template on `tokenizer` (modified in place and returned).

    chat_template: a name (see `available_chat_templates()`; aliases like 'llama3', 'qwen2.5' work)
        or a tuple (jinja_template, stop_token) for your own format; stop_token may be "eos_token"
        to mean the tokenizer's own EOS.
    mapping: key mapping for ShareGPT-style messages, e.g.
        {"role": "from", "content": "value", "user": "human", "assistant": "gpt"}; the template then
        reads such messages directly.
    map_eos_token: make the format's stop token (e.g. '<|im_end|>') the tokenizer's eos_token, so
        that generation and training stop at the end of an assistant turn.
    system_message: replaces the default system prompt of formats that have one (qwen-2.5,
        alpaca, vicuna, unsloth).
    model: when given, its embeddings are resized if tokens were added and the stop token is added
        to its generation_config.eos_token_id.
    """
    if tokenizer is None:
        raise ValueError("get_chat_template needs a tokenizer (got None).")
    if isinstance(chat_template, (tuple, list)):
        if len(chat_template) != 2 or not all(isinstance(x, str) for x in chat_template):
            raise ValueError("A custom chat_template must be a (jinja_template, stop_token) pair of strings.")
        template, stop_token = chat_template
        if stop_token == "eos_token":
            stop_token = None
        special_tokens = (stop_token,) if stop_token else ()
        extra_stop = ()
        if mapping is not None and dict(mapping) != _DEFAULT_MAPPING:
            template = _mapping_preamble(mapping) + "\n" + template
    elif isinstance(chat_template, str):
        name = resolve_chat_template_name(chat_template)
        spec = CHAT_TEMPLATES[name]
        template = build_chat_template(name, system_message=system_message, mapping=mapping)
        stop_token = spec.stop_token
        special_tokens = spec.special_tokens + ((stop_token,) if stop_token else ())
        extra_stop = spec.extra_stop_tokens
    else:
        raise TypeError(
            f"chat_template must be a template name or a (jinja_template, stop_token) tuple, not {type(chat_template).__name__}."
        )

    added = _add_missing_tokens(tokenizer, special_tokens)
    if stop_token and map_eos_token and tokenizer.eos_token != stop_token:
        tokenizer.eos_token = stop_token
    if tokenizer.pad_token is None:
        # Trainers need a pad token; one distinct from EOS keeps EOS trainable in the labels.
        _add_missing_tokens(tokenizer, ["<|fastft_pad|>"])
        tokenizer.pad_token = "<|fastft_pad|>"
        added.append("<|fastft_pad|>")
    tokenizer.chat_template = template

    if model is not None:
        if added:
            _resize_model(model, tokenizer)
        stop_tokens = [t for t in (stop_token, *extra_stop) if t]
        if tokenizer.eos_token:
            stop_tokens.append(tokenizer.eos_token)
        _set_generation_stop(model, tokenizer, stop_tokens)
    return tokenizer


# Scripts written for Unsloth import these helpers from its chat_templates module; keep that working.
from fastft.data import standardize_data_formats, standardize_sharegpt, to_sharegpt  # noqa: E402
from fastft.responses_only import train_on_responses_only  # noqa: E402

__all__ += ["standardize_data_formats", "standardize_sharegpt", "to_sharegpt", "train_on_responses_only"]
