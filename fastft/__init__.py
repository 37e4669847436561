"""fastft: fast, memory-lean fine-tuning of open LLMs on top of transformers, peft and TRL."""
import sys as _sys
import warnings as _warnings

__version__ = "0.1.0"

# Patches are applied to classes when fastft loads a model, but helpers that trl / peft bind
# at import time (e.g. a trainer's copy of a function) can miss them: say so, once.
_LATE = [m for m in ("transformers", "peft", "trl") if m in _sys.modules]
if _LATE:
    _warnings.warn(
        f"fastft was imported after {', '.join(_LATE)}; some of fastft's patches may be missed. "
        "Put `import fastft` (or `from fastft import ...`) before those imports.",
        stacklevel=2,
    )

# Public names -> the module that defines them. Loaded on first use so that `import fastft`
# stays cheap and does not import transformers itself.
_EXPORTS = {
    "FastLanguageModel": "fastft.loader",
    "FastModel": "fastft.loader",
    "is_bf16_supported": "fastft.env",
    "get_chat_template": "fastft.chat_templates",
    "standardize_sharegpt": "fastft.data",
    "to_sharegpt": "fastft.data",
    "detect_format": "fastft.data",
    "to_chatml": "fastft.data",
    "load_json_dataset": "fastft.data",
    "chatml_to_sharegpt": "fastft.data",
    "standardize_data_formats": "fastft.data",
    "train_on_responses_only": "fastft.responses_only",
    "UnslothTrainer": "fastft.trainer",
    "UnslothTrainingArguments": "fastft.trainer",
    "FastTrainer": "fastft.trainer",
    "FastTrainingArguments": "fastft.trainer",
}


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fastft' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))
