"""FastTrainer / FastTrainingArguments: embed_tokens / lm_head get embedding_learning_rate, the
rest learning_rate; Unsloth aliases; the older SFTTrainer keywords ported scripts pass."""
import pytest
import torch

from fastft.models import unpatch_all
from tests.tiny_models import save_tiny_model


pytestmark = pytest.mark.usefixtures("torch_backend_unpatched")


@pytest.fixture
def cpt_setup(tmp_path):
    """A tiny llama with LoRA + trainable embed_tokens / lm_head and a raw-text data set."""
    from datasets import Dataset

    from fastft import FastLanguageModel

    path = save_tiny_model("llama", tmp_path / "model")
    model, tok = FastLanguageModel.from_pretrained(path, max_seq_length=48)
    model = FastLanguageModel.get_peft_model(
        model, r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                    "down_proj"],
        modules_to_save=["embed_tokens", "lm_head"], use_gradient_checkpointing=False)
    texts = [f"Line {i}: the cat sat on mat number {i * 7 % 13}." for i in range(24)]
    return model, tok, Dataset.from_dict({"text": texts}), tmp_path


def _args(tmp_path, **kw):
    from fastft import FastTrainingArguments

    base = dict(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4,
                learning_rate=5e-3, embedding_learning_rate=5e-4, weight_decay=0.01,
                logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True,
                use_cpu=not torch.cuda.is_available(), max_length=48, lr_scheduler_type="linear")
    base.update(kw)
    return FastTrainingArguments(**base)


def _group_lrs(trainer, model):
    by_id = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for group in trainer.optimizer.param_groups:
        for p in group["params"]:
            out[by_id[id(p)]] = (group["lr"], group["weight_decay"])
    return out


def test_embedding_learning_rate_groups(cpt_setup):
    from fastft import FastTrainer
    from fastft.trainer import is_embedding_parameter

    model, tok, ds, tmp = cpt_setup
    trainer = FastTrainer(model=model, processing_class=tok, train_dataset=ds, args=_args(tmp))
    trainer.create_optimizer()
    lrs = _group_lrs(trainer, model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(lrs) == trainable  # every trainable parameter is in exactly one group
    embed = {n for n in trainable if is_embedding_parameter(n)}
    assert any("embed_tokens" in n for n in embed) and any("lm_head" in n for n in embed)
    assert all(lrs[n][0] == 5e-4 for n in embed)
    assert all(lrs[n][0] == 5e-3 for n in trainable - embed)
    decay = set(trainer.get_decay_parameter_names(model))
    assert all(lrs[n][1] == (0.01 if n in decay else 0.0) for n in trainable)


def test_training_keeps_the_ratio_and_moves_embeddings(cpt_setup):
    from fastft import FastTrainer

    model, tok, ds, tmp = cpt_setup
    emb = next(p for n, p in model.named_parameters() if "embed_tokens" in n and p.requires_grad)
    before = emb.detach().clone()
    trainer = FastTrainer(model=model, processing_class=tok, train_dataset=ds,
                          args=_args(tmp, max_steps=3))
    trainer.train()
    assert not torch.equal(before, emb.detach())
    # the scheduler scales both groups from their own starting rates
    lrs = sorted({g["initial_lr"] for g in trainer.optimizer.param_groups})
    assert lrs == [5e-4, 5e-3]


def test_without_embedding_learning_rate_is_plain_sft(cpt_setup):
    from fastft import FastTrainer

    model, tok, ds, tmp = cpt_setup
    trainer = FastTrainer(model=model, processing_class=tok, train_dataset=ds,
                          args=_args(tmp, embedding_learning_rate=None))
    trainer.create_optimizer()
    assert {g["lr"] for g in trainer.optimizer.param_groups} == {5e-3}


def test_unsloth_names_and_legacy_keywords(cpt_setup):
    from fastft import FastTrainer, FastTrainingArguments, UnslothTrainer, UnslothTrainingArguments

    assert UnslothTrainer is FastTrainer and UnslothTrainingArguments is FastTrainingArguments
    model, tok, ds, tmp = cpt_setup
    ds = ds.rename_column("text", "body")
    args = _args(tmp)
    trainer = UnslothTrainer(model=model, tokenizer=tok, train_dataset=ds, dataset_text_field="body",
                             max_seq_length=40, packing=False, args=args)
    assert trainer.processing_class is tok
    assert args.dataset_text_field == "body" and args.max_length == 40
    assert max(len(x) for x in trainer.train_dataset["input_ids"]) <= 40
    with pytest.raises(ValueError, match="not both"):
        FastTrainer(model=model, tokenizer=tok, processing_class=tok, train_dataset=ds, args=args)
    with pytest.raises(ValueError, match="embedding_learning_rate"):
        FastTrainingArguments(output_dir=str(tmp), embedding_learning_rate=-1.0,
                              use_cpu=not torch.cuda.is_available())


def test_one_process_with_several_gpus_visible_trains_on_one(cpt_setup):
    """SFTTrainer refuses a single process that sees several GPUs (Trainer would use
    nn.DataParallel); FastTrainer keeps such a process on one GPU instead. The count is forced
    (no GPU here): without fastft.distributed.one_gpu_per_process this raises."""
    from fastft import FastTrainer

    model, tok, ds, tmp = cpt_setup
    args = _args(tmp)
    assert args.n_gpu <= 1
    args._n_gpu = 2  # what transformers sets with two GPUs visible and no launcher
    trainer = FastTrainer(model=model, processing_class=tok, train_dataset=ds, args=args)
    assert trainer.args.n_gpu == 1


def test_embeddings_in_target_modules_train_in_full(tmp_path):
    """The continued-pretraining recipe names lm_head / embed_tokens in target_modules: they
    train in full (modules_to_save) at embedding_learning_rate; trl accepts that."""
    from datasets import Dataset

    from fastft import FastLanguageModel, FastTrainer

    path = save_tiny_model("llama", tmp_path / "model")
    model, tok = FastLanguageModel.from_pretrained(path, max_seq_length=48)
    model = FastLanguageModel.get_peft_model(
        model, r=4, target_modules=["q_proj", "v_proj", "lm_head", "embed_tokens"],
        use_gradient_checkpointing=False)
    cfg = model.peft_config["default"]
    assert set(cfg.target_modules) == {"q_proj", "v_proj"}
    assert set(cfg.modules_to_save) >= {"lm_head", "embed_tokens"}
    head = next(p for n, p in model.named_parameters() if "lm_head.modules_to_save" in n)
    before = head.detach().clone()
    ds = Dataset.from_dict({"text": [f"row {i} says {i * 3}" for i in range(16)]})
    trainer = FastTrainer(model=model, processing_class=tok, train_dataset=ds,
                          args=_args(tmp_path, max_steps=2))
    trainer.train()
    assert not torch.equal(before, head.detach())
    assert sorted({g["initial_lr"] for g in trainer.optimizer.param_groups}) == [5e-4, 5e-3]


def test_fastft_loss_head_matches_trl_loss(tmp_path, monkeypatch):
    """loss_head="fastft" computes the loss through the patched forward (fastft's fused linear
    cross-entropy); its first-step loss equals trl's fused head's on the same model and batch."""
    from datasets import Dataset

    import importlib

    from fastft import FastLanguageModel, FastTrainer

    # (importlib: the package attribute fastft.ops.cross_entropy is the function, not the module)
    ce = importlib.import_module("fastft.ops.cross_entropy")

    calls = []
    real = ce.fused_linear_cross_entropy
    monkeypatch.setattr(ce, "fused_linear_cross_entropy",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    path = save_tiny_model("qwen2", tmp_path / "model")
    ds = Dataset.from_dict({"text": [f"item {i}: {i * 11 % 17} apples" for i in range(16)]})
    first = {}
    for head in ("trl", "fastft"):
        unpatch_all()
        model, tok = FastLanguageModel.from_pretrained(path, max_seq_length=48)
        model = FastLanguageModel.get_peft_model(model, r=4, random_state=1,
                                                 use_gradient_checkpointing=False)
        calls.clear()
        trainer = FastTrainer(model=model, processing_class=tok, train_dataset=ds,
                              args=_args(tmp_path, embedding_learning_rate=None, max_steps=2,
                                         loss_head=head, gradient_accumulation_steps=2))
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        assert len(losses) == 2
        first[head] = losses[0]
        assert (len(calls) > 0) == (head == "fastft")
    assert first["fastft"] == pytest.approx(first["trl"], rel=1e-4)
    with pytest.raises(ValueError, match="loss_head"):
        _args(tmp_path, loss_head="liger")


def test_training_runs_with_the_collector_off_the_startup_objects(cpt_setup):
    """FastTrainer.train freezes the objects that exist at its start (no full-collection pauses
    over torch/transformers/the model during the loop) and unfreezes them afterwards; a caller's
    own gc.freeze() is left alone."""
    import gc

    from transformers import TrainerCallback

    from fastft import FastTrainer
    from fastft.trainer import frozen_gc

    seen = []

    class Watch(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            seen.append(gc.get_freeze_count())

    model, tok, ds, tmp = cpt_setup
    assert gc.get_freeze_count() == 0
    trainer = FastTrainer(model=model, processing_class=tok, train_dataset=ds,
                          args=_args(tmp, max_steps=2), callbacks=[Watch()])
    trainer.train()
    assert len(seen) == 2 and all(n > 100_000 for n in seen)  # torch alone is >100k objects
    assert gc.get_freeze_count() == 0
    # The frozen count is no exact witness: a frozen object that dies leaves the count (CI saw
    # it drop by 2 inside the block). So check the property itself: gc.get_objects() lists
    # only unfrozen objects; a probe made after the caller's freeze must stay unfrozen inside
    # frozen_gc (it did not freeze again), and the caller's objects stay frozen after it.
    def collector_sees(obj):
        return any(o is obj for o in gc.get_objects())

    callers = [[]]
    gc.freeze()
    try:
        probe = [[]]
        assert not collector_sees(callers) and collector_sees(probe)
        with frozen_gc():
            assert collector_sees(probe)  # not frozen a second time
        assert not collector_sees(callers)  # not unfrozen by us
        assert gc.get_freeze_count() > 100_000
    finally:
        gc.unfreeze()
    assert collector_sees(callers)
