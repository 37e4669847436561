"""Ollama Modelfile beside the GGUF: FROM, a TEMPLATE (Go text/template) equivalent to the
model's Jinja chat template for the formats we recognise, and PARAMETER stop lines."""
from __future__ import annotations

# Each entry: how to recognise the Jinja template, the Go template, and the stop strings.
_CHATML = (
    '{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
    '{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
    '<|im_start|>assistant\n'
)
_LLAMA3 = (
    '{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}'
    '{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}'
    '<|start_header_id|>assistant<|end_header_id|>\n\n'
)
_GEMMA = (
    '{{- range $i, $m := .Messages }}'
    '{{- if eq $m.Role "assistant" }}<start_of_turn>model\n{{ $m.Content }}<end_of_turn>\n'
    '{{- else }}<start_of_turn>user\n{{ if and $.System (eq $i 0) }}{{ $.System }}\n\n{{ end }}{{ $m.Content }}<end_of_turn>\n'
    '{{- end }}{{ end }}<start_of_turn>model\n'
)
_MISTRAL = (
    '{{- range $i, $m := .Messages }}'
    '{{- if eq $m.Role "user" }}[INST] {{ if and $.System (eq $i 0) }}{{ $.System }}\n\n{{ end }}{{ $m.Content }} [/INST]'
    '{{- else if eq $m.Role "assistant" }} {{ $m.Content }}</s>{{ end }}{{ end }}'
)
_ALPACA = (
    '{{ if .System }}{{ .System }}\n\n{{ end }}'
    '{{- range .Messages }}{{ if eq .Role "user" }}### Instruction:\n{{ .Content }}\n\n'
    '{{ else if eq .Role "assistant" }}### Response:\n{{ .Content }}\n\n{{ end }}{{ end }}### Response:\n'
)
_PHI3 = (
    '{{- if .System }}<|system|>\n{{ .System }}<|end|>\n{{ end }}'
    '{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n'
)

FORMATS = {
    "chatml": (("<|im_start|>",), _CHATML, ["<|im_start|>", "<|im_end|>"]),
    "llama-3": (("<|start_header_id|>",), _LLAMA3, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
    "gemma": (("<start_of_turn>",), _GEMMA, ["<start_of_turn>", "<end_of_turn>"]),
    "phi-3": (("<|assistant|>", "<|end|>"), _PHI3, ["<|end|>", "<|user|>", "<|assistant|>"]),
    "mistral": (("[INST]",), _MISTRAL, ["[INST]", "[/INST]", "</s>"]),
    "alpaca": (("### Instruction",), _ALPACA, ["### Instruction:", "### Response:"]),
}


def detect_format(chat_template: str | None) -> str | None:
    if not chat_template:
        return None
    for name, (markers, _, _) in FORMATS.items():
        if all(m in chat_template for m in markers):
            return name
    return None


def modelfile_text(gguf_filename: str, chat_template: str | None, eos_token: str | None = None) -> str:
    """The Modelfile for `gguf_filename` (relative path, in the same folder)."""
    fmt = detect_format(chat_template)
    lines = [f"FROM ./{gguf_filename}", ""]
    if fmt is None:
        lines.append("# fastft: chat template not recognised; Ollama will use the template stored in the GGUF if it knows it.")
        stops = [eos_token] if eos_token else []
    else:
        _, go_template, stops = FORMATS[fmt]
        lines.append(f"# chat format: {fmt}")
        lines.append(f'TEMPLATE """{go_template}"""')
        if eos_token and eos_token not in stops:
            stops = stops + [eos_token]
    lines.append("")
    for s in stops:
        lines.append(f'PARAMETER stop "{s}"')
    return "\n".join(lines) + "\n"
