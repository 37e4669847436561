"""Dataset formats for fine-tuning and converters between them.

Four layouts are recognised (one record shown each):

  text      {"text": "..."}                                               raw text, continued pretraining
  alpaca    {"instruction": "...", "input": "...", "output": "..."}       "input" may be absent / empty
  sharegpt  {"conversations": [{"from": "human", "value": "..."}, ...]}
  chatml    {"messages": [{"role": "user", "content": "..."}, ...]}       also "conversations" holding role/content

Every function takes a `datasets.Dataset` or a plain list of dicts and returns the same kind.
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

__all__ = [
    "FORMATS",
    "chatml_to_sharegpt",
    "detect_format",
    "load_json_dataset",
    "standardize_data_formats",
    "standardize_sharegpt",
    "to_chatml",
    "to_sharegpt",
]

FORMATS = {
    "text": 'raw text: a "text" column of strings, e.g. {"text": "Once upon a time ..."}',
    "alpaca": 'Alpaca: "instruction" and "output" columns ("input" optional), '
    'e.g. {"instruction": "Add the numbers.", "input": "2 3", "output": "5"}',
    "sharegpt": 'ShareGPT: a "conversations" column of lists of {"from", "value"} turns, '
    'e.g. {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}',
    "chatml": 'ChatML: a "messages" (or "conversations") column of lists of {"role", "content"} turns, '
    'e.g. {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}',
}

_SYSTEM_ALIASES = ("system",)
_USER_ALIASES = ("user", "human", "input")
_ASSISTANT_ALIASES = ("gpt", "assistant", "output", "model", "bot")


# ----------------------------------------------------------------------------------------- helpers


def _is_hf_dataset(ds) -> bool:
    return type(ds).__module__.startswith("datasets.")


def _column_names(ds) -> list[str]:
    if _is_hf_dataset(ds):
        names = ds.column_names
        if names is None:  # an IterableDataset whose features are unknown: look at the first row
            first = next(iter(ds), None)
            return list(first) if first else []
        return list(names)
    if isinstance(ds, dict):
        raise TypeError(
            "Got a dict; pass a list of records (dicts) or a datasets.Dataset. For a DatasetDict pick a split, "
            "e.g. ds['train']."
        )
    if not isinstance(ds, (list, tuple)):
        raise TypeError(f"Expected a datasets.Dataset or a list of dicts, got {type(ds).__name__}.")
    if not ds:
        return []
    if not all(isinstance(row, dict) for row in ds[:100]):
        raise TypeError("Expected a list of dicts (one record per dict).")
    names = {}
    for row in ds[:100]:
        names.update(dict.fromkeys(row))
    return list(names)


def _first_rows(ds, n: int = 5) -> list[dict]:
    if _is_hf_dataset(ds):
        rows = []
        for row in ds:
            rows.append(row)
            if len(rows) >= n:
                break
        return rows
    return list(ds[:n])


def _map(ds, fn, remove_columns=None):
    """Apply `fn(row) -> dict of new/updated columns` to every record, keeping the container type."""
    remove_columns = [c for c in (remove_columns or []) if c in _column_names(ds)]
    if _is_hf_dataset(ds):
        return ds.map(fn, remove_columns=remove_columns or None)
    out = []
    for row in ds:
        new = {k: v for k, v in row.items() if k not in remove_columns}
        new.update(fn(row))
        out.append(new)
    return out


def _turns_key_layout(turns) -> str | None:
    """'sharegpt' / 'chatml' for a list of turn dicts, None when it is neither."""
    if not isinstance(turns, (list, tuple)):
        return None
    for turn in turns:
        if not isinstance(turn, dict):
            return None
        if "from" in turn and "value" in turn and turn.get("from") is not None:
            return "sharegpt"
        if "role" in turn and "content" in turn and turn.get("role") is not None:
            return "chatml"
    return None


# ------------------------------------------------------------------------------------------ public


def load_json_dataset(path) -> list[dict]:
    """Read a .jsonl file (one JSON object per line) or a .json file (a list of objects, or an object
    holding one such list) into a list of dicts."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No such data file: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".jsonl" or (path.suffix.lower() != ".json" and not text.lstrip().startswith("[")):
        records = []
        for line_no, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({err.msg}); JSONL needs one object per line.") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{line_no}: expected a JSON object per line, got {type(record).__name__}.")
            records.append(record)
        return records
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}).") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise ValueError(f"{path}: expected a list of records, or an object holding exactly one list of records.")
        data = lists[0]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise ValueError(f"{path}: expected a list of JSON objects (records).")
    return data


def detect_format(ds) -> str:
    """Name the layout of a dataset: 'chatml', 'sharegpt', 'alpaca' or 'text'.

    Raises ValueError saying what each layout expects, and which columns were found, when the data
    matches none of them."""
    columns = _column_names(ds)
    rows = _first_rows(ds)
    for column in ("messages", "conversations"):
        if column in columns:
            layouts = {_turns_key_layout(row.get(column)) for row in rows} - {None}
            if len(layouts) == 1:
                return layouts.pop()
            if len(layouts) > 1:
                raise ValueError(
                    f"Column {column!r} mixes ShareGPT turns (from/value) and ChatML turns (role/content); "
                    "run standardize_sharegpt(ds) first."
                )
            sample = rows[0].get(column) if rows else None
            raise ValueError(
                f"Column {column!r} is present but its turns are neither ShareGPT {{'from', 'value'}} nor "
                f"ChatML {{'role', 'content'}} dicts; first value seen: {str(sample)[:200]!r}."
            )
    if "instruction" in columns and "output" in columns:
        return "alpaca"
    if "text" in columns:
        return "text"
    expected = "\n".join(f"  - {desc}" for desc in FORMATS.values())
    raise ValueError(
        f"Could not recognise the dataset format: columns seen {columns}. Expected one of:\n{expected}\n"
        "For other multi-column data, build conversations with to_sharegpt(ds, merged_prompt=..., "
        "output_column_name=...)."
    )


def standardize_sharegpt(
    dataset,
    aliases_for_system=_SYSTEM_ALIASES,
    aliases_for_user=_USER_ALIASES,
    aliases_for_assistant=_ASSISTANT_ALIASES,
):
    """Turn ShareGPT turns {"from", "value"} into ChatML turns {"role", "content"} (human -> user,
    gpt -> assistant, system -> system). The column keeps its name ("conversations" or "messages").
    Data already in role/content form is returned unchanged."""
    columns = _column_names(dataset)
    column = next((c for c in ("conversations", "messages") if c in columns), None)
    if column is None:
        raise ValueError(
            f"standardize_sharegpt expects a 'conversations' column ({FORMATS['sharegpt']}); columns seen: {columns}."
        )
    role_of = {}
    for role, aliases in (("system", aliases_for_system), ("user", aliases_for_user), ("assistant", aliases_for_assistant)):
        for alias in aliases:
            role_of[alias] = role

    def convert(row):
        turns = []
        for turn in row[column]:
            if "from" not in turn or turn.get("from") is None:
                turns.append({"role": turn["role"], "content": turn["content"]})
                continue
            source = turn["from"]
            role = role_of.get(source)
            if role is None:
                raise ValueError(
                    f"Unknown ShareGPT speaker {source!r}; known: {sorted(role_of)}. Pass it through "
                    "aliases_for_user / aliases_for_assistant / aliases_for_system."
                )
            turns.append({"role": role, "content": turn["value"]})
        return {column: turns}

    return _map(dataset, convert)


# Unsloth's name for the same function.
standardize_data_formats = standardize_sharegpt


def chatml_to_sharegpt(dataset, user_name: str = "human", assistant_name: str = "gpt", column: str = "conversations"):
    """The inverse of standardize_sharegpt: role/content turns (in "messages" or "conversations")
    become {"from", "value"} turns in `column`."""
    columns = _column_names(dataset)
    source = next((c for c in ("messages", "conversations") if c in columns), None)
    if source is None:
        raise ValueError(f"chatml_to_sharegpt expects a 'messages' column ({FORMATS['chatml']}); columns seen: {columns}.")
    name_of = {"user": user_name, "assistant": assistant_name, "system": "system"}

    def convert(row):
        return {column: [{"from": name_of.get(t["role"], t["role"]), "value": t["content"]} for t in row[source]]}

    return _map(dataset, convert, remove_columns=[source] if source != column else None)


_PLACEHOLDER = re.compile(r"\{([^{}]+)\}")
_OPTIONAL = re.compile(r"\[\[(.*?)\]\]", re.DOTALL)


def _fill_prompt(merged_prompt: str, row: dict) -> str:
    """Fill {column} placeholders; an [[optional part]] is kept only when every column it names is
    non-empty in this row."""

    def value(name):
        if name not in row:
            raise KeyError(f"merged_prompt names column {{{name}}} which is not in the dataset; columns: {list(row)}.")
        v = row[name]
        return "" if v is None else str(v)

    def optional(match):
        part = match.group(1)
        names = _PLACEHOLDER.findall(part)
        if all(value(n).strip() for n in names):
            return _PLACEHOLDER.sub(lambda m: value(m.group(1)), part)
        return ""

    text = _OPTIONAL.sub(optional, merged_prompt)
    return _PLACEHOLDER.sub(lambda m: value(m.group(1)), text)


def to_sharegpt(
    dataset,
    merged_prompt: str = "",
    merged_column_name: str = "instruction",
    output_column_name: str = "output",
    remove_unused_columns: bool = True,
    conversation_extension: int = 1,
    random_state: int = 3407,
):
    """Build ShareGPT conversations from multi-column data.

    merged_prompt: the human turn, with {column} placeholders and [[optional parts]] that appear only
        when all columns inside them are non-empty, e.g. "{instruction}[[\\nYour input is:\\n{input}]]".
        Empty means "{<merged_column_name>}".
    output_column_name: the column holding the assistant's answer.
    conversation_extension: > 1 merges that many randomly chosen rows into one multi-turn conversation
        (seeded by random_state).
    Returns records with a "conversations" column of {"from": "human"/"gpt", "value"} turns.
    """
    columns = _column_names(dataset)
    if output_column_name not in columns:
        raise ValueError(f"output_column_name {output_column_name!r} is not a column; columns seen: {columns}.")
    if not merged_prompt:
        if merged_column_name not in columns:
            raise ValueError(
                f"No merged_prompt given and merged_column_name {merged_column_name!r} is not a column; "
                f"columns seen: {columns}. Pass merged_prompt, e.g. '{{{columns[0] if columns else 'question'}}}'."
            )
        merged_prompt = "{" + merged_column_name + "}"
    missing = [n for n in _PLACEHOLDER.findall(merged_prompt) if n not in columns]
    if missing:
        raise ValueError(f"merged_prompt names columns {missing} that the dataset lacks; columns seen: {columns}.")
    if conversation_extension < 1:
        raise ValueError("conversation_extension must be >= 1.")

    def one_turn(row):
        return [
            {"from": "human", "value": _fill_prompt(merged_prompt, row)},
            {"from": "gpt", "value": "" if row[output_column_name] is None else str(row[output_column_name])},
        ]

    if _is_hf_dataset(dataset) and conversation_extension == 1:
        removed = columns if remove_unused_columns else []
        return dataset.map(lambda row: {"conversations": one_turn(row)}, remove_columns=removed or None)

    rows = list(dataset)
    conversations = [one_turn(row) for row in rows]
    if conversation_extension > 1:
        rng = random.Random(random_state)
        extended = []
        for conversation in conversations:
            turns = list(conversation)
            for _ in range(conversation_extension - 1):
                turns += conversations[rng.randrange(len(conversations))]
            extended.append(turns)
        conversations = extended
    records = []
    for row, conversation in zip(rows, conversations):
        record = {} if remove_unused_columns else dict(row)
        record["conversations"] = conversation
        records.append(record)
    if _is_hf_dataset(dataset):
        from datasets import Dataset

        return Dataset.from_list(records)
    return records


def to_chatml(dataset, system_message: str | None = None):
    """Convert chatml / sharegpt / alpaca data into a "messages" column of role/content turns.

    Alpaca rows become [system?], user (instruction, then the input after a blank line when it is
    non-empty), assistant (output). system_message, when given, is put first in conversations that
    have no system turn. Raw text has no turns and is rejected."""
    fmt = detect_format(dataset)
    if fmt == "text":
        raise ValueError(
            "This dataset is raw text ({'text': ...}); it has no user/assistant turns to convert. Train on the "
            "'text' column directly (continued pretraining), or supply conversational data."
        )

    def with_system(turns):
        if system_message and not (turns and turns[0]["role"] == "system"):
            return [{"role": "system", "content": system_message}] + turns
        return turns

    if fmt == "alpaca":

        def convert(row):
            prompt = str(row["instruction"])
            extra = row.get("input")
            if extra is not None and str(extra).strip():
                prompt = prompt + "\n\n" + str(extra)
            return {
                "messages": with_system(
                    [{"role": "user", "content": prompt}, {"role": "assistant", "content": str(row["output"])}]
                )
            }

        return _map(dataset, convert, remove_columns=["instruction", "input", "output"])

    columns = _column_names(dataset)
    if fmt == "sharegpt":
        dataset = standardize_sharegpt(dataset)
    source = "messages" if "messages" in columns else "conversations"

    def convert(row):
        return {"messages": with_system([{"role": t["role"], "content": t["content"]} for t in row[source]])}

    return _map(dataset, convert, remove_columns=[source] if source != "messages" else None)
