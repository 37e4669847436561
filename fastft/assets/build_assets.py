"""Builds the small assets shipped with fastft (run once; the output is committed):

  fastft/assets/data/default_task.jsonl  a few hundred ChatML examples of single-digit addition
  fastft/assets/tokenizer/               a byte-level BPE tokenizer trained on text generated here

Nothing is downloaded: the task data, and the English-like filler text the tokenizer also learns
from, are generated from word lists below with a fixed seed.

    python -m fastft.assets.build_assets        # or: python fastft/assets/build_assets.py
"""
from __future__ import annotations

import json
import random
from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent
TOKENIZER_DIR = ASSETS_DIR / "tokenizer"
DATASET_PATH = ASSETS_DIR / "data" / "default_task.jsonl"

SEED = 3407
NUM_EXAMPLES = 400
VOCAB_SIZE = 1536

PAD, BOS, IM_START, IM_END, ENDOFTEXT = "<pad>", "<s>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"
SPECIAL_TOKENS = [PAD, BOS, IM_START, IM_END, ENDOFTEXT]

# A few phrasings, so the model must read the numbers rather than a fixed position in one sentence.
QUESTION_FORMS = [
    "What is {a}+{b}?",
    "What is {a} + {b}?",
    "Add {a} and {b}.",
    "What is the sum of {a} and {b}?",
    "Compute {a} plus {b}.",
]

# Filler vocabulary: common chat / instruction words, role names used by the chat formats, so that
# text other than the task still tokenises into whole words rather than bytes.
WORDS = """
the a an of to in on for with and or but not is are was were be been has have had do does did
can will would should could may might must it this that these those there here what which who
how why when where you your we our they their he she his her i me my all any some each every
one two three four five six seven eight nine ten number numbers sum add plus minus times equal
answer question result compute calculate write read reverse word words letter letters sentence
text task tasks example examples please thank thanks hello hi yes no ok sure good great short long
first last next before after again more less most least than then now today time day year help
helpful assistant user system model human gpt instruction input output response request complete
completes appropriately describes describe below above chat between curious artificial intelligence
gives detailed polite answers questions data train training learn learning fine tune small large
language models token tokens format formats message messages turn turns role content value list
""".split()


def make_task_examples(rng: random.Random, n: int, low: int = 10, high: int = 99) -> list[dict]:
    examples = []
    seen = set()
    while len(examples) < n:
        a, b = rng.randint(low, high), rng.randint(low, high)
        form = rng.choice(QUESTION_FORMS)
        if (a, b, form) in seen:
            continue
        seen.add((a, b, form))
        examples.append(
            {
                "messages": [
                    {"role": "user", "content": form.format(a=a, b=b)},
                    {"role": "assistant", "content": str(a + b)},
                ]
            }
        )
    return examples


def make_filler_text(rng: random.Random, n_sentences: int) -> list[str]:
    lines = []
    for _ in range(n_sentences):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 12))]
        sentence = " ".join(words).capitalize() + rng.choice([".", "?", "!", ":", ","])
        lines.append(sentence)
    # Every number 0..199 in context: covers all operands and sums of the task.
    lines += [f"The number {i} is {i}." for i in range(200)]
    lines += [f"{i}" for i in range(200)] * 10  # answers follow a newline: the unspaced form too
    # Headers of the built-in chat formats, so that they tokenise compactly too.
    lines += [
        "### Instruction:\n", "### Response:\n", "USER: hi ASSISTANT: hello", ">>> User: hi\n>>> Assistant: hello",
        "<|user|>\n", "<|assistant|>\n", "<|system|>\n", "[INST] hi [/INST]", "<start_of_turn>model\n",
    ] * 20
    return lines


def render_chatml(example: dict) -> str:
    return "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in example["messages"])


def build_tokenizer(corpus: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from fastft.chat_templates import build_chat_template

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=BOS,
        eos_token=IM_END,  # the ChatML stop token, as in instruct models using ChatML
        pad_token=PAD,
        extra_special_tokens=[IM_START, ENDOFTEXT],
        model_max_length=512,
    )
    tokenizer.chat_template = build_chat_template("chatml")
    return tokenizer


def main() -> None:
    rng = random.Random(SEED)
    # The tokenizer learns from 2-digit sums (every number up to 198 becomes one token)...
    corpus_examples = make_task_examples(rng, NUM_EXAMPLES)
    corpus = [render_chatml(e) for e in corpus_examples] * 3 + make_filler_text(rng, 3000)
    # ...while the shipped task is single-digit addition: its 100 facts recur across phrasings,
    # so held-out questions test facts the model can learn within a minute on a CPU (2-digit
    # sums of unseen pairs stay at 0% held-out accuracy for a tiny model trained that briefly).
    examples = make_task_examples(random.Random(SEED + 1), NUM_EXAMPLES, low=0, high=9)

    DATASET_PATH.parent.mkdir(parents=True, exist_ok=True)
    with open(DATASET_PATH, "w", encoding="utf-8") as f:
        for example in examples:
            f.write(json.dumps(example, ensure_ascii=False) + "\n")

    tokenizer = build_tokenizer(corpus)
    TOKENIZER_DIR.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(TOKENIZER_DIR))

    sample = tokenizer.apply_chat_template(examples[0]["messages"], tokenize=False)
    ids = tokenizer(sample, add_special_tokens=False)["input_ids"]
    print(f"wrote {len(examples)} examples to {DATASET_PATH}")
    print(f"wrote tokenizer (vocab {len(tokenizer)}) to {TOKENIZER_DIR}")
    print(f"sample: {sample!r} -> {len(ids)} tokens: {tokenizer.convert_ids_to_tokens(ids)}")


if __name__ == "__main__":
    main()
