"""Train on the assistant's answers only: every label outside an assistant turn becomes -100.

    trainer = SFTTrainer(...)
    trainer = train_on_responses_only(trainer)            # parts derived from the chat template
    trainer = train_on_responses_only(
        trainer,
        instruction_part="<|start_header_id|>user<|end_header_id|>\\n\\n",
        response_part="<|start_header_id|>assistant<|end_header_id|>\\n\\n",
    )

A response runs from the end of a `response_part` to the start of the next `instruction_part` (or
the next `response_part`, or the end of the sequence), so multi-turn conversations train on every
assistant turn, including its end-of-turn token. Matching is done on token ids. A part is tried as
tokenised on its own and, failing that, with its surrounding whitespace stripped, because BPE may
merge a part's leading/trailing whitespace with the neighbouring text.

With TRL's SFTTrainer the tokenised datasets get a "labels" column that TRL's collator passes to the
loss unchanged; any other collator is wrapped so that its batches are masked the same way.
"""
from __future__ import annotations

import bisect
import logging
from collections.abc import Sequence

import numpy as np

from fastft.data import _column_names, _first_rows, _is_hf_dataset

__all__ = ["ResponseMasker", "derive_parts_from_template", "train_on_responses_only"]

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
_SAMPLE_SIZE = 64

_PROBE_USER_1 = "Fastft probe question one"
_PROBE_ASSISTANT_1 = "Fastft probe answer one"
_PROBE_USER_2 = "Fastft probe question two"


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _decode(tokenizer, ids) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _common_token_prefix_chars(tokenizer, a: str, b: str) -> int:
    """Length in characters of the common prefix of a and b: all of b when b is a prefix of a;
    otherwise the common prefix ending on a token boundary (a plain character prefix could end
    inside a marker such as '<|')."""
    if a.startswith(b):
        return len(b)
    ids_a, ids_b = _encode(tokenizer, a), _encode(tokenizer, b)
    k = 0
    while k < min(len(ids_a), len(ids_b)) and ids_a[k] == ids_b[k]:
        k += 1
    prefix = _decode(tokenizer, ids_a[:k])
    if a.startswith(prefix):
        return len(prefix)
    # Decoding did not reproduce the text (e.g. SentencePiece spaces): fall back to characters.
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def derive_parts_from_template(tokenizer) -> tuple[str, str]:
    """(instruction_part, response_part) of the tokenizer's chat template, found by rendering a probe
    conversation: the response part is what add_generation_prompt appends (or, for formats without a
    generation prompt such as Mistral's, the text between a user message and its answer); the
    instruction part is what starts a second user turn."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "The tokenizer has no chat template, so instruction_part / response_part cannot be derived. "
            "Pass both strings, or install a template first: tokenizer = get_chat_template(tokenizer, 'chatml')."
        )

    def render(messages, generation_prompt=False):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    user1 = {"role": "user", "content": _PROBE_USER_1}
    assistant1 = {"role": "assistant", "content": _PROBE_ASSISTANT_1}
    user2 = {"role": "user", "content": _PROBE_USER_2}
    try:
        without_prompt, with_prompt = render([user1]), render([user1], True)
        one_exchange, two_users = render([user1, assistant1]), render([user1, assistant1, user2])
    except Exception as err:
        raise ValueError(
            f"Rendering a probe conversation with the tokenizer's chat template failed ({err}); pass "
            "instruction_part and response_part explicitly."
        ) from err

    response_part = with_prompt[_common_token_prefix_chars(tokenizer, with_prompt, without_prompt):]
    if not response_part.strip():
        start = one_exchange.index(_PROBE_USER_1) + len(_PROBE_USER_1)
        response_part = one_exchange[start : one_exchange.index(_PROBE_ASSISTANT_1)]

    # The text between the first answer and the second question is "end of the assistant turn" +
    # "start of a user turn"; the end of turn is what also follows the answer when it is last.
    gap_start = two_users.index(_PROBE_ASSISTANT_1) + len(_PROBE_ASSISTANT_1)
    gap = two_users[gap_start : two_users.index(_PROBE_USER_2)]
    turn_end = one_exchange[one_exchange.index(_PROBE_ASSISTANT_1) + len(_PROBE_ASSISTANT_1) :]
    instruction_part = gap[_common_token_prefix_chars(tokenizer, gap, turn_end) :]
    if not response_part.strip() or not instruction_part.strip():
        raise ValueError(
            f"Could not find the user / assistant markers of this chat template (found instruction_part="
            f"{instruction_part!r}, response_part={response_part!r}); pass both explicitly."
        )
    return instruction_part, response_part


class _Part:
    """One marker string and the token-id sequences it may appear as in tokenised text: as written;
    with surrounding whitespace stripped (BPE may merge it into the neighbouring text); and
    stripped with one leading space (GPT-2-style BPE merges a preceding space into the marker)."""

    def __init__(self, tokenizer, text: str):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"instruction_part / response_part must be non-empty strings, got {text!r}.")
        self.text = text
        core = text.strip()
        self.variants: list[tuple[int, ...]] = []
        for variant in (text, core, " " + core):
            ids = tuple(_encode(tokenizer, variant))
            if ids and ids not in self.variants:
                self.variants.append(ids)
        self.trailing_ws = len(text) - len(text.rstrip())

    def describe(self) -> str:
        return f"{self.text!r} (token ids {' or '.join(str(list(v)) for v in self.variants)})"


def _find(seq: np.ndarray, pattern: tuple) -> np.ndarray:
    """Start positions of `pattern` in `seq`."""
    m = len(pattern)
    if m == 0 or len(seq) < m:
        return np.empty(0, dtype=np.int64)
    starts = np.flatnonzero(seq[: len(seq) - m + 1] == pattern[0])
    for k in range(1, m):
        if starts.size == 0:
            break
        starts = starts[seq[starts + k] == pattern[k]]
    return starts


class ResponseMasker:
    """Computes labels for tokenised sequences: the token id inside assistant turns, -100 elsewhere.

    `masker(example)` takes a dict with "input_ids" (and optionally "seq_lengths" for packed rows)
    and returns {"labels": [...]}; `masker.labels(input_ids)` works on a bare id list.
    """

    def __init__(self, tokenizer, instruction_part=None, response_part=None):
        if tokenizer is None:
            raise ValueError("train_on_responses_only needs the tokenizer (pass tokenizer=...).")
        self.tokenizer = tokenizer
        if instruction_part is None or response_part is None:
            derived_instruction, derived_response = derive_parts_from_template(tokenizer)
            instruction_part = derived_instruction if instruction_part is None else instruction_part
            response_part = derived_response if response_part is None else response_part
        as_list = lambda p: [p] if isinstance(p, str) else list(p)  # noqa: E731
        self.instruction_parts = [_Part(tokenizer, p) for p in as_list(instruction_part)]
        self.response_parts = [_Part(tokenizer, p) for p in as_list(response_part)]
        self._whitespace_cache: dict[int, int | None] = {}

    # -- matching ----------------------------------------------------------------------------

    def _matches(self, seq: np.ndarray, parts) -> list[tuple[int, int, _Part, bool]]:
        """(start, end, part, stripped) for every occurrence of any part; `stripped` says a variant
        without the part's trailing whitespace matched."""
        found = []
        for part in parts:
            for index, variant in enumerate(part.variants):
                starts = _find(seq, variant)
                if starts.size:
                    found += [(int(s), int(s) + len(variant), part, index > 0) for s in starts]
                    break
        return found

    def _whitespace_chars(self, token_id: int) -> int | None:
        """Number of characters of a whitespace-only token, None if it has other characters."""
        if token_id not in self._whitespace_cache:
            text = _decode(self.tokenizer, [token_id])
            self._whitespace_cache[token_id] = len(text) if text and not text.strip() else None
        return self._whitespace_cache[token_id]

    def _segment_labels(self, seq: np.ndarray, out: np.ndarray) -> int:
        """Fill `out` (already -100) with the trainable labels of one sequence; returns the number
        of response markers found."""
        responses = sorted(self._matches(seq, self.response_parts), key=lambda m: m[0])
        if not responses:
            return 0
        stops = sorted({m[0] for m in self._matches(seq, self.instruction_parts)} | {m[0] for m in responses})
        for start, end, part, stripped in responses:
            if stripped and part.trailing_ws:
                # The stripped marker matched: its trailing whitespace is in the next token(s).
                budget = part.trailing_ws
                while end < len(seq):
                    width = self._whitespace_chars(int(seq[end]))
                    if width is None or width > budget:
                        break
                    budget -= width
                    end += 1
            i = bisect.bisect_left(stops, end)
            stop = stops[i] if i < len(stops) else len(seq)
            out[end:stop] = seq[end:stop]
        return len(responses)

    def labels(self, input_ids: Sequence[int], seq_lengths: Sequence[int] | None = None) -> list[int]:
        seq = np.asarray(input_ids, dtype=np.int64)
        out = np.full(seq.shape, IGNORE_INDEX, dtype=np.int64)
        bounds = [len(seq)] if not seq_lengths else list(np.cumsum(seq_lengths))
        begin = 0
        for stop in bounds:
            self._segment_labels(seq[begin:stop], out[begin:stop])
            begin = stop
        return out.tolist()

    def __call__(self, example: dict) -> dict:
        return {"labels": self.labels(example["input_ids"], example.get("seq_lengths"))}

    # -- checks ------------------------------------------------------------------------------

    def check_sample(self, rows: list[dict]) -> None:
        """Raise when no row of the sample would train on anything (loss would be exactly 0)."""
        if not rows:
            return
        trainable = 0
        multi_turn_without_instruction = 0
        for row in rows:
            seq = np.asarray(row["input_ids"], dtype=np.int64)
            labels = self.labels(seq, row.get("seq_lengths"))
            trainable += any(label != IGNORE_INDEX for label in labels)
            n_responses = len(self._matches(seq, self.response_parts))
            if n_responses > 1 and not self._matches(seq, self.instruction_parts):
                multi_turn_without_instruction += 1
        if trainable == 0:
            first = rows[0]["input_ids"]
            text = _decode(self.tokenizer, first)
            if len(text) > 2000:
                text = text[:2000] + " ...[truncated]"
            looked_for = "\n".join(
                [f"  response_part:    {p.describe()}" for p in self.response_parts]
                + [f"  instruction_part: {p.describe()}" for p in self.instruction_parts]
            )
            raise ValueError(
                f"train_on_responses_only: none of the first {len(rows)} examples contains the response marker, "
                "so every label would be -100 and the loss exactly 0.\n"
                f"Looked for:\n{looked_for}\n"
                f"First example as rendered from its token ids:\n{text!r}\n"
                "Pass the markers your chat template really prints (copy them from the text above), or omit "
                "instruction_part / response_part to derive them from tokenizer.chat_template."
            )
        if multi_turn_without_instruction:
            logger.warning(
                "train_on_responses_only: %d sampled examples have several responses but no instruction_part %r; "
                "user turns after the first answer would be trained on. Check instruction_part.",
                multi_turn_without_instruction,
                [p.text for p in self.instruction_parts],
            )

    # -- datasets ----------------------------------------------------------------------------

    def apply(self, dataset, num_proc=None, name: str = "train", drop_fully_masked: bool = True):
        """Add / replace the "labels" column of a tokenised dataset (datasets.Dataset,
        IterableDataset or list of dicts). Examples left without any trainable token are dropped."""
        if dataset is None:
            return None
        if _is_hf_dataset(dataset):
            columns = _column_names(dataset)
            if "input_ids" not in columns:
                raise ValueError(_NOT_TOKENISED.format(name=name, columns=columns))
            self.check_sample(_first_rows(dataset, _SAMPLE_SIZE))
            kwargs = {}
            if type(dataset).__name__ == "Dataset":
                kwargs = {"num_proc": num_proc, "desc": f"Masking non-response tokens of the {name} dataset"}
            dataset = dataset.map(self, **kwargs)
            if drop_fully_masked:
                before = len(dataset) if hasattr(dataset, "__len__") else None
                keep_kwargs = {"num_proc": num_proc} if type(dataset).__name__ == "Dataset" else {}
                dataset = dataset.filter(_has_trainable_label, **keep_kwargs)
                if before is not None and len(dataset) < before:
                    logger.warning(
                        "train_on_responses_only: dropped %d of %d %s examples that have no response tokens "
                        "(e.g. truncated before the answer).",
                        before - len(dataset), before, name,
                    )
            return dataset
        if isinstance(dataset, (list, tuple)):
            if dataset and not all(isinstance(r, dict) and "input_ids" in r for r in dataset):
                raise ValueError(_NOT_TOKENISED.format(name=name, columns=sorted(dataset[0]) if dataset else []))
            self.check_sample(list(dataset[:_SAMPLE_SIZE]))
            out = [{**row, **self(row)} for row in dataset]
            if drop_fully_masked:
                kept = [row for row in out if _has_trainable_label(row)]
                if len(kept) < len(out):
                    logger.warning(
                        "train_on_responses_only: dropped %d of %d %s examples that have no response tokens.",
                        len(out) - len(kept), len(out), name,
                    )
                out = kept
            return out
        raise TypeError(f"Expected a datasets.Dataset or a list of dicts for the {name} dataset, got {type(dataset).__name__}.")

    def mask_batch(self, batch: dict) -> dict:
        """Mask a collated batch (tensors) in place: labels become -100 outside responses, keeping
        the -100s the collator already set (padding, sequence starts)."""
        import torch

        input_ids = batch["input_ids"]
        labels = batch.get("labels")
        if labels is None:
            labels = input_ids.clone()
            if "attention_mask" in batch:
                labels[batch["attention_mask"] == 0] = IGNORE_INDEX
        position_ids = batch.get("position_ids")
        new_rows = []
        for row in range(input_ids.shape[0]):
            seq_lengths = None
            if position_ids is not None:
                # Padding-free batches hold several sequences per row, each starting at position 0.
                starts = torch.nonzero(position_ids[row] == 0).flatten().tolist() + [input_ids.shape[1]]
                seq_lengths = [b - a for a, b in zip(starts, starts[1:]) if b > a]
                if starts[0] != 0:
                    seq_lengths = [starts[0]] + seq_lengths
            new_rows.append(self.labels(input_ids[row].tolist(), seq_lengths))
        masked = torch.tensor(new_rows, dtype=labels.dtype, device=labels.device)
        batch["labels"] = torch.where(masked == IGNORE_INDEX, torch.full_like(labels, IGNORE_INDEX), labels)
        return batch


_NOT_TOKENISED = (
    "train_on_responses_only needs tokenised data (an 'input_ids' column) in the {name} dataset; columns "
    "seen: {columns}. SFTTrainer tokenises when it is constructed, so call train_on_responses_only(trainer) "
    "after creating the trainer, or pass records with 'messages' / 'text' together with tokenizer=..."
)


def _has_trainable_label(example) -> bool:
    return any(label != IGNORE_INDEX for label in example["labels"])


def _tokenise_records(records, tokenizer, max_length=None) -> list[dict]:
    """Tokenise {"messages"} (through the chat template) or {"text"} records into {"input_ids"}."""
    out = []
    for row in records:
        if "input_ids" in row:
            ids = list(row["input_ids"])
        elif "messages" in row:
            text = tokenizer.apply_chat_template(row["messages"], tokenize=False)
            ids = _encode(tokenizer, text)
        elif "text" in row:
            ids = list(tokenizer(row["text"])["input_ids"])
        else:
            raise ValueError(_NOT_TOKENISED.format(name="given", columns=sorted(row)))
        if max_length is not None:
            ids = ids[:max_length]
        out.append({**row, "input_ids": ids})
    return out


class _MaskingCollator:
    """Wraps a data collator so that the labels of every batch are masked to the responses."""

    def __init__(self, collator, masker: ResponseMasker):
        self.collator = collator
        self.masker = masker

    def __call__(self, features):
        return self.masker.mask_batch(self.collator(features))

    def __getattr__(self, name):
        return getattr(self.collator, name)


def _collator_keeps_labels(collator) -> bool:
    """TRL's language-modeling collator pads the dataset's "labels" as they are."""
    try:
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
    except ImportError:  # pragma: no cover - trl is a dependency
        return False
    return isinstance(collator, DataCollatorForLanguageModeling)


def train_on_responses_only(
    trainer,
    instruction_part=None,
    response_part=None,
    force_match: bool = True,
    tokenizer=None,
    return_function: bool = False,
    num_proc=None,
    max_length=None,
):
    """Set labels outside assistant turns to -100.

    trainer: an (SFT)Trainer whose datasets are already tokenised (the usual case: call this after
        constructing SFTTrainer); or a datasets.Dataset / list of dicts, in which case the masked
        dataset is returned (records may hold "input_ids", or "messages" / "text" to be tokenised
        with `tokenizer`).
    instruction_part / response_part: the strings that start a user / an assistant turn (a list of
        strings is accepted too). Omitted: derived from the tokenizer's chat template.
    return_function: return the masking function (example dict -> {"labels": ...}) instead.
    force_match: accepted for compatibility; markers are always matched on whole token sequences.
    Raises ValueError when the markers occur in none of the first examples (all labels -100).
    """
    del force_match
    is_dataset = isinstance(trainer, (list, tuple)) or _is_hf_dataset(trainer)
    if tokenizer is None and not is_dataset:
        tokenizer = getattr(trainer, "processing_class", None) or getattr(trainer, "tokenizer", None)
        # A multimodal processor carries the text tokenizer inside it.
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    masker = ResponseMasker(tokenizer, instruction_part, response_part)
    if return_function:
        return masker

    if is_dataset:
        dataset = trainer
        if isinstance(dataset, (list, tuple)):
            dataset = _tokenise_records(dataset, tokenizer, max_length)
        return masker.apply(dataset, num_proc=num_proc, name="given")

    if not hasattr(trainer, "train_dataset"):
        raise TypeError(
            f"train_on_responses_only expects a Trainer (e.g. trl.SFTTrainer), a datasets.Dataset or a list of "
            f"dicts; got {type(trainer).__name__}."
        )
    trainer.train_dataset = masker.apply(trainer.train_dataset, num_proc=num_proc, name="train")
    eval_dataset = getattr(trainer, "eval_dataset", None)
    if isinstance(eval_dataset, dict):
        trainer.eval_dataset = {k: masker.apply(v, num_proc=num_proc, name=f"eval[{k}]") for k, v in eval_dataset.items()}
    elif eval_dataset is not None:
        trainer.eval_dataset = masker.apply(eval_dataset, num_proc=num_proc, name="eval")
    collator = getattr(trainer, "data_collator", None)
    if collator is not None and not _collator_keeps_labels(collator) and not isinstance(collator, _MaskingCollator):
        trainer.data_collator = _MaskingCollator(collator, masker)
    return trainer
