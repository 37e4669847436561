"""Dataset formats: detection, ShareGPT <-> ChatML, to_sharegpt for multi-column data, conversion to
messages, JSON/JSONL loading and the shipped default task. Each case runs on lists of dicts and on
datasets.Dataset."""
import json
import re

import pytest

Dataset = pytest.importorskip("datasets").Dataset  # absent on the GPU machine

from fastft.assets import default_dataset_path, default_tokenizer_path, load_default_dataset
from fastft.data import (
    chatml_to_sharegpt,
    detect_format,
    load_json_dataset,
    standardize_sharegpt,
    to_chatml,
    to_sharegpt,
)

SHAREGPT = [
    {"conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "What is 2+3?"},
        {"from": "gpt", "value": "5"},
        {"from": "human", "value": "And 4+4?"},
        {"from": "gpt", "value": "8"},
    ]},
    {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]},
]
CHATML_OF_SHAREGPT = [
    {"conversations": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+3?"},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "And 4+4?"},
        {"role": "assistant", "content": "8"},
    ]},
    {"conversations": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
]
ALPACA = [
    {"instruction": "Add the numbers.", "input": "2 3", "output": "5"},
    {"instruction": "Say hi.", "input": "", "output": "Hi!"},
]
TEXT = [{"text": "Once upon a time."}, {"text": "The end."}]
MESSAGES = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}]


def as_list(ds):
    return ds.to_list() if isinstance(ds, Dataset) else ds


@pytest.fixture(params=["list", "dataset"])
def container(request):
    return (lambda rows: rows) if request.param == "list" else Dataset.from_list


def test_detect_format(container):
    assert detect_format(container(TEXT)) == "text"
    assert detect_format(container(ALPACA)) == "alpaca"
    assert detect_format(container(SHAREGPT)) == "sharegpt"
    assert detect_format(container(MESSAGES)) == "chatml"
    assert detect_format(container(CHATML_OF_SHAREGPT)) == "chatml"  # standardised, column kept


def test_detect_format_error_names_formats_and_columns(container):
    with pytest.raises(ValueError) as err:
        detect_format(container([{"question": "q", "answer": "a"}]))
    message = str(err.value)
    assert "['question', 'answer']" in message
    for expected in ('"text"', '"instruction"', '"conversations"', '"messages"', "to_sharegpt"):
        assert expected in message
    with pytest.raises(ValueError, match="neither ShareGPT"):
        detect_format(container([{"messages": [{"speaker": "a", "says": "b"}]}]))


def test_standardize_sharegpt(container):
    out = standardize_sharegpt(container(SHAREGPT))
    assert isinstance(out, Dataset) == (container == Dataset.from_list)
    assert isinstance(out, list) == (container != Dataset.from_list)
    assert as_list(out) == CHATML_OF_SHAREGPT
    # Already standardised data passes through unchanged.
    assert as_list(standardize_sharegpt(out)) == CHATML_OF_SHAREGPT


def test_standardize_sharegpt_unknown_speaker():
    with pytest.raises(ValueError, match="'narrator'"):
        standardize_sharegpt([{"conversations": [{"from": "narrator", "value": "x"}]}])
    with pytest.raises(ValueError, match="columns seen"):
        standardize_sharegpt(ALPACA)


def test_sharegpt_round_trip(container):
    chatml = standardize_sharegpt(container(SHAREGPT))
    back = chatml_to_sharegpt(chatml)
    assert as_list(back) == SHAREGPT
    again = standardize_sharegpt(chatml_to_sharegpt(to_chatml(container(SHAREGPT))))
    assert [row["conversations"] for row in as_list(again)] == [row["conversations"] for row in CHATML_OF_SHAREGPT]


def test_to_chatml_from_alpaca(container):
    out = as_list(to_chatml(container(ALPACA)))
    assert out == [
        {"messages": [{"role": "user", "content": "Add the numbers.\n\n2 3"}, {"role": "assistant", "content": "5"}]},
        {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]},
    ]
    with_system = as_list(to_chatml(container(ALPACA[1:]), system_message="Be kind."))
    assert with_system[0]["messages"][0] == {"role": "system", "content": "Be kind."}


def test_to_chatml_from_sharegpt_and_messages(container):
    out = as_list(to_chatml(container(SHAREGPT)))
    assert out == [{"messages": row["conversations"]} for row in CHATML_OF_SHAREGPT]
    assert as_list(to_chatml(container(MESSAGES))) == MESSAGES
    # A system message is not added twice.
    out = as_list(to_chatml(container(SHAREGPT[:1]), system_message="Other"))
    assert [t["role"] for t in out[0]["messages"]].count("system") == 1


def test_to_chatml_rejects_raw_text():
    with pytest.raises(ValueError, match="raw text"):
        to_chatml(TEXT)


def test_alpaca_through_chat_template():
    from fastft.assets import load_default_tokenizer

    tokenizer = load_default_tokenizer()
    messages = to_chatml(ALPACA)[0]["messages"]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>user\nAdd the numbers.\n\n2 3<|im_end|>\n<|im_start|>assistant\n5<|im_end|>\n"
    )


MULTI_COLUMN = [
    {"name": "Ada", "city": "London", "note": "", "answer": "Hello Ada"},
    {"name": "Bo", "city": "Oslo", "note": "likes tea", "answer": "Hei Bo"},
]


def test_to_sharegpt_merged_prompt_and_optional_parts(container):
    out = as_list(
        to_sharegpt(
            container(MULTI_COLUMN),
            merged_prompt="Greet {name} from {city}.[[\nNote: {note}]]",
            output_column_name="answer",
        )
    )
    assert out == [
        {"conversations": [{"from": "human", "value": "Greet Ada from London."}, {"from": "gpt", "value": "Hello Ada"}]},
        {"conversations": [
            {"from": "human", "value": "Greet Bo from Oslo.\nNote: likes tea"},
            {"from": "gpt", "value": "Hei Bo"},
        ]},
    ]
    assert detect_format(out) == "sharegpt"
    kept = as_list(to_sharegpt(container(MULTI_COLUMN), "{name}", output_column_name="answer",
                               remove_unused_columns=False))
    assert kept[0]["city"] == "London" and "conversations" in kept[0]


def test_to_sharegpt_default_prompt_is_merged_column(container):
    out = as_list(to_sharegpt(container(ALPACA)))  # merged_column_name="instruction", output "output"
    assert out[0]["conversations"] == [{"from": "human", "value": "Add the numbers."}, {"from": "gpt", "value": "5"}]


def test_to_sharegpt_conversation_extension_is_seeded():
    rows = [{"q": f"q{i}", "a": f"a{i}"} for i in range(6)]
    one = to_sharegpt(rows, "{q}", output_column_name="a", conversation_extension=3, random_state=1)
    two = to_sharegpt(rows, "{q}", output_column_name="a", conversation_extension=3, random_state=1)
    assert one == two
    for i, row in enumerate(one):
        turns = row["conversations"]
        assert len(turns) == 6
        assert turns[0] == {"from": "human", "value": f"q{i}"}
        assert [t["from"] for t in turns] == ["human", "gpt"] * 3
        for human, gpt in zip(turns[::2], turns[1::2]):
            assert gpt["value"] == "a" + human["value"][1:]


def test_to_sharegpt_errors():
    with pytest.raises(ValueError, match="'missing'"):
        to_sharegpt(MULTI_COLUMN, "{name}", output_column_name="missing")
    with pytest.raises(ValueError, match="nope"):
        to_sharegpt(MULTI_COLUMN, "{nope}", output_column_name="answer")


def test_load_json_dataset(tmp_path):
    records = [{"text": "a"}, {"text": "b"}]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    assert load_json_dataset(jsonl) == records
    plain = tmp_path / "d.json"
    plain.write_text(json.dumps(records))
    assert load_json_dataset(plain) == records
    wrapped = tmp_path / "w.json"
    wrapped.write_text(json.dumps({"data": records}))
    assert load_json_dataset(wrapped) == records
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        load_json_dataset(bad)
    with pytest.raises(FileNotFoundError):
        load_json_dataset(tmp_path / "absent.jsonl")


def test_shipped_default_task():
    records = load_default_dataset()
    assert 200 <= len(records) <= 1000
    assert detect_format(records) == "chatml"
    for record in records:
        user, assistant = record["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        a, b = map(int, re.findall(r"\d+", user["content"]))
        assert 0 <= a <= 9 and 0 <= b <= 9
        assert assistant["content"] == str(a + b)
    total = default_dataset_path().stat().st_size + sum(
        p.stat().st_size for p in default_tokenizer_path().iterdir()
    )
    assert total < 1_000_000


def test_shipped_tokenizer_is_compact_on_the_task():
    from fastft.assets import load_default_tokenizer

    tokenizer = load_default_tokenizer()
    assert 512 <= len(tokenizer) <= 2000
    for record in load_default_dataset()[:50]:
        text = tokenizer.apply_chat_template(record["messages"], tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert len(ids) <= 24, text
        assert tokenizer.decode(ids) == text
        answer = record["messages"][1]["content"]
        assert len(tokenizer(answer, add_special_tokens=False)["input_ids"]) == 1
