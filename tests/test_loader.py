"""FastLanguageModel / FastModel: loading from local dirs (16-bit, 4-bit through bitsandbytes,
pre-quantised), pad tokens, attention choice, get_peft_model, checkpointing, modes, unknown
architectures, adapter save/load, the import-order warning."""
import importlib.util
import logging
import os
import subprocess
import sys

import pytest
import torch

from fastft import dispatch
from fastft.loader import FastLanguageModel, FastModel, ensure_pad_token, resolve_dtype
from fastft.models import patched_names, unpatch_all
from tests.helpers import rel_err
from tests.tiny_models import EOS, FAMILIES, VOCAB, save_tiny_model, tiny_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("torch_backend_unpatched")


def _plain_peft_with(model, lora):
    """peft's own LoRA (r=8, all 7 projections) on `model`, holding the adapter weights `lora`."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                             "gate_proj", "up_proj", "down_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(lora[n])
    return model


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {fam: save_tiny_model(fam, root / fam) for fam in FAMILIES + ("gpt2",)}


def _batch(tokenizer):
    enc = tokenizer(["The quick brown fox.", "Hi!"], return_tensors="pt", padding=True)
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    return enc, labels


@pytest.mark.parametrize("family", FAMILIES)
def test_from_pretrained_local_dir(family, model_dirs, caplog):
    with caplog.at_level(logging.INFO, logger="fastft"):
        model, tok = FastLanguageModel.from_pretrained(model_dirs[family], max_seq_length=128)
    assert model.dtype == torch.float32  # dtype=None on the CPU
    assert model.max_seq_length == 128 and tok.model_max_length == 128
    assert tok.pad_token is not None and tok.pad_token_id != tok.eos_token_id
    assert model.config.pad_token_id == tok.pad_token_id
    expected_attn = "eager" if family == "gemma2" else "sdpa"  # Gemma 2 softcaps attention
    assert model.config._attn_implementation == expected_attn
    assert any(f"patched {family}" in r.getMessage() for r in caplog.records)
    assert callable(model.save_pretrained_merged) and callable(model.save_pretrained_gguf)
    enc, labels = _batch(tok)
    out = model(**enc, labels=labels)
    assert torch.isfinite(out.loss)


def test_user_choices_are_kept(model_dirs):
    model, _ = FastLanguageModel.from_pretrained(model_dirs["llama"], attn_implementation="eager",
                                                 dtype=torch.bfloat16)
    assert model.config._attn_implementation == "eager" and model.dtype == torch.bfloat16


def test_resolve_dtype():
    assert resolve_dtype(None) == (torch.float32 if not torch.cuda.is_available() else
                                   (torch.bfloat16 if torch.cuda.get_device_capability()[0] >= 8
                                    else torch.float16))
    assert resolve_dtype("float16") == torch.float16
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype(torch.int8)
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("fp12")


def test_pad_token_added_and_embeddings_resized(tmp_path):
    # vocabulary exactly as large as the tokenizer: a new pad token needs a new embedding row
    path = save_tiny_model("llama", tmp_path / "m", vocab_size=len(tiny_tokenizer()))
    model, tok = FastLanguageModel.from_pretrained(path)
    assert tok.pad_token == "<|pad|>" and tok.pad_token_id == len(tok) - 1
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    assert model.get_output_embeddings().weight.shape[0] == len(tok)
    assert model.config.pad_token_id == tok.pad_token_id != EOS


def test_pad_token_reuses_an_existing_unused_token():
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|finetune_right_pad_id|>"]})
    tok.pad_token = tok.eos_token  # pad == EOS: collators would mask every EOS label
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2))
    n = len(tok)
    ensure_pad_token(model, tok)
    assert tok.pad_token == "<|finetune_right_pad_id|>" and len(tok) == n
    assert model.config.pad_token_id == tok.pad_token_id


def test_4bit_qlora_on_cpu(model_dirs):
    pytest.importorskip("bitsandbytes")
    model, tok = FastLanguageModel.from_pretrained(model_dirs["llama"], load_in_4bit=True)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert type(q_proj).__name__ == "Linear4bit"
    assert q_proj.weight.quant_state.quant_type == "nf4" and q_proj.weight.quant_state.nested
    assert model.config.quantization_config.bnb_4bit_compute_dtype == torch.float32
    model = FastLanguageModel.get_peft_model(model, r=8, use_gradient_checkpointing=True)
    enc, labels = _batch(tok)
    loss = model(**enc, labels=labels).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def test_prequantized_checkpoint_loads_as_is(model_dirs, tmp_path):
    pytest.importorskip("bitsandbytes")
    model, tok = FastLanguageModel.from_pretrained(model_dirs["qwen2"], load_in_4bit=True)
    enc, labels = _batch(tok)
    # (outside no_grad: bitsandbytes' CPU inference path repacks the weights for another kernel
    # whose results differ by ~3e-3 from the training path)
    ref = model(**enc).logits.detach()
    model.save_pretrained(tmp_path / "q-bnb-4bit")
    tok.save_pretrained(tmp_path / "q-bnb-4bit")
    unpatch_all()
    again, _ = FastLanguageModel.from_pretrained(str(tmp_path / "q-bnb-4bit"))  # no load_in_4bit
    assert type(again.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    assert rel_err(again(**enc).logits.detach(), ref) < 1e-5


def test_4bit_without_usable_bitsandbytes_is_a_clear_error(model_dirs, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        FastLanguageModel.from_pretrained(model_dirs["llama"], load_in_4bit=True)


def test_bad_load_options(model_dirs):
    with pytest.raises(ValueError, match="not both"):
        FastLanguageModel.from_pretrained(model_dirs["llama"], load_in_4bit=True, load_in_8bit=True)
    with pytest.raises(ValueError, match="full_finetuning"):
        FastLanguageModel.from_pretrained(model_dirs["llama"], load_in_4bit=True, full_finetuning=True)
    with pytest.raises(ValueError, match="max_seq_length"):
        FastLanguageModel.from_pretrained(model_dirs["llama"], max_seq_length=0)


def test_get_peft_model_real_peft_modules_and_save_load(model_dirs, tmp_path):
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    model, tok = FastLanguageModel.from_pretrained(model_dirs["gemma3"])
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False,
                                             random_state=7)
    assert isinstance(model, PeftModel)
    wrapped = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert model.peft_config["default"].r == 4 and model.peft_config["default"].lora_alpha == 8
    with torch.no_grad():  # make the adapter matter
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.3)
    enc, _ = _batch(tok)
    with torch.no_grad():
        ref = model(**enc).logits
    model.save_pretrained(tmp_path / "adapter")
    tok.save_pretrained(tmp_path / "adapter")
    unpatch_all()
    again, tok2 = FastLanguageModel.from_pretrained(str(tmp_path / "adapter"))
    assert isinstance(again, PeftModel) and tok2.pad_token == tok.pad_token
    with torch.no_grad():
        assert rel_err(again(**enc).logits, ref) < 1e-5


def test_same_random_state_same_adapters(model_dirs):
    weights = []
    for _ in range(2):
        model, _ = FastLanguageModel.from_pretrained(model_dirs["llama"])
        model = FastLanguageModel.get_peft_model(model, r=4, random_state=11,
                                                 use_gradient_checkpointing=False)
        weights.append({n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n})
    assert all(torch.equal(weights[0][n], weights[1][n]) for n in weights[0])


def test_get_peft_model_errors(model_dirs):
    model, _ = FastLanguageModel.from_pretrained(model_dirs["llama"])
    with pytest.raises(ValueError) as err:
        FastLanguageModel.get_peft_model(model, target_modules=["q_proj", "qkv_proj", "w1"])
    msg = str(err.value)
    assert "['qkv_proj', 'w1'] not found" in msg
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                 "lm_head", "embed_tokens"):
        assert f"'{name}'" in msg
    with pytest.raises(ValueError, match="modules_to_save"):
        FastLanguageModel.get_peft_model(model, modules_to_save=["embed_token"])
    with pytest.raises(ValueError, match="use_gradient_checkpointing"):
        FastLanguageModel.get_peft_model(model, use_gradient_checkpointing="yes")
    with pytest.raises(ValueError, match="rank"):
        FastLanguageModel.get_peft_model(model, r=0)
    with pytest.raises(ValueError, match="bias"):
        FastLanguageModel.get_peft_model(model, bias="some")
    with pytest.raises(ValueError, match="empty"):
        FastLanguageModel.get_peft_model(model, target_modules=[])


def test_full_finetuning_trains_every_weight(model_dirs, caplog):
    model, tok = FastLanguageModel.from_pretrained(model_dirs["qwen3"], full_finetuning=True)
    assert all(p.requires_grad for p in model.parameters())
    with caplog.at_level(logging.WARNING, logger="fastft"):
        same = FastLanguageModel.get_peft_model(model, r=8, use_gradient_checkpointing=False)
    assert same is model and "full_finetuning" in caplog.text
    enc, labels = _batch(tok)
    model(**enc, labels=labels).loss.backward()
    assert model.model.embed_tokens.weight.grad is not None
    assert model.model.layers[0].mlp.down_proj.weight.grad.abs().sum() > 0


def test_checkpointing_modes_and_inference_toggle(model_dirs, caplog):
    import importlib.util

    model, tok = FastLanguageModel.from_pretrained(model_dirs["mistral"])
    with caplog.at_level(logging.WARNING, logger="fastft"):
        model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing="unsloth")
    base = model.get_base_model()
    assert base.is_activation_checkpointing and base.config.use_cache is False
    if importlib.util.find_spec("fastft.offload") is None:
        assert "offloaded checkpointing (fastft.offload) is not available" in caplog.text
    enc, labels = _batch(tok)
    model.train()
    model(**enc, labels=labels).loss.backward()

    FastLanguageModel.for_inference(model)
    assert not model.training and not base.is_activation_checkpointing and base.config.use_cache
    out = model.generate(**tok(["ab"], return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert out.shape[1] == len(tok("ab").input_ids) + 3
    FastLanguageModel.for_training(model)
    assert model.training and base.is_activation_checkpointing and base.config.use_cache is False

    plain, _ = FastLanguageModel.from_pretrained(model_dirs["llama"])
    plain = FastLanguageModel.get_peft_model(plain, r=4, use_gradient_checkpointing=True)
    assert plain.get_base_model().is_activation_checkpointing
    off, _ = FastLanguageModel.from_pretrained(model_dirs["qwen2"])
    off = FastLanguageModel.get_peft_model(off, r=4, use_gradient_checkpointing=False)
    assert not off.get_base_model().is_activation_checkpointing


def test_unknown_architecture_loads_and_trains_unpatched(model_dirs, caplog):
    with caplog.at_level(logging.INFO, logger="fastft"):
        model, tok = FastLanguageModel.from_pretrained(model_dirs["gpt2"])
    lines = [r.getMessage() for r in caplog.records if r.name == "fastft" and "patch" in r.getMessage()]
    assert len(lines) == 1 and "no fused patches for model type 'gpt2'" in lines[0]
    assert patched_names() == []
    with pytest.raises(ValueError, match="c_attn"):  # the default targets do not exist in GPT-2
        FastLanguageModel.get_peft_model(model)
    model = FastLanguageModel.get_peft_model(model, r=4, target_modules=["c_attn", "c_fc"],
                                             use_gradient_checkpointing=False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    enc, labels = _batch(tok)
    losses = []
    for _ in range(5):
        loss = model(**enc, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_fast_model_loads_causal_lms(model_dirs):
    model, tok = FastModel.from_pretrained(model_dirs["qwen2"])
    assert type(model).__name__ == "Qwen2ForCausalLM" and "qwen2" in " ".join(patched_names())
    model = FastModel.get_peft_model(model, r=4, use_gradient_checkpointing=False)
    enc, labels = _batch(tok)
    assert torch.isfinite(model(**enc, labels=labels).loss)


def test_public_names():
    import fastft

    assert fastft.FastLanguageModel is FastLanguageModel and fastft.FastModel is FastModel
    assert fastft.is_bf16_supported() in (True, False)


def _run(code):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=120)


def test_import_order_warning():
    late = _run("import transformers, peft\nimport fastft")
    assert late.returncode == 0, late.stderr
    assert "fastft was imported after transformers, peft" in late.stderr
    assert "Put `import fastft`" in late.stderr
    early = _run("import fastft\nimport transformers, peft")
    assert early.returncode == 0, early.stderr
    assert "fastft was imported after" not in early.stderr


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_fast_path_matches_plain_transformers_and_peft(family, model_dirs):
    """The whole fastft path (patches, fused LoRA when available, offloaded checkpointing)
    against plain transformers + peft with the same weights: loss and LoRA grads."""
    from transformers import AutoModelForCausalLM

    model, tok = FastLanguageModel.from_pretrained(model_dirs[family])
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, random_state=5,
                                             use_gradient_checkpointing="unsloth")
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    enc, labels = _batch(tok)

    def loss_and_grads(m):
        m.train()
        loss = m(**enc, labels=labels).loss
        loss.backward()
        return loss.detach(), {n: p.grad.detach().clone() for n, p in m.named_parameters() if "lora_" in n}

    if importlib.util.find_spec("fastft.lora") is not None:  # the fused LoRA path is what runs
        assert model.fastft_fused_lora["mlp"] == 2 and model.fastft_fused_lora["qkv"] == 2
    got = loss_and_grads(model)
    unpatch_all()
    plain = AutoModelForCausalLM.from_pretrained(model_dirs[family],
                                                 attn_implementation=model.config._attn_implementation)
    ref = loss_and_grads(_plain_peft_with(plain, lora))
    assert rel_err(got[0], ref[0]) <= 1e-4
    assert set(got[1]) == set(ref[1])
    for n in ref[1]:
        assert rel_err(got[1][n], ref[1][n]) <= 1e-4, n


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_qlora_gpu_matches_plain_transformers_and_peft(family, tmp_path, monkeypatch):
    """bf16 QLoRA on the GPU through the whole fastft path (automatic backends) against plain
    transformers + peft on the same 4-bit weights."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    monkeypatch.delenv("FASTFT_BACKEND", raising=False)
    dispatch.clear_cache()
    over = dict(hidden_size=256, intermediate_size=704, vocab_size=1000)
    if family == "gemma3":
        over["head_dim"] = 64
    path = save_tiny_model(family, tmp_path / "m", **over)
    model, tok = FastLanguageModel.from_pretrained(path, load_in_4bit=True, dtype=torch.bfloat16)
    assert next(model.parameters()).is_cuda
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, random_state=5,
                                             use_gradient_checkpointing="unsloth")
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.2 * torch.randn(p.shape, generator=g).to(p))
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    enc, labels = _batch(tok)
    enc, labels = enc.to("cuda"), labels.cuda()

    def loss_and_grads(m):
        m.train()
        loss = m(**enc, labels=labels).loss
        loss.backward()
        return loss.detach().float(), {n: p.grad.detach().float() for n, p in m.named_parameters()
                                       if "lora_" in n}

    got = loss_and_grads(model)
    unpatch_all()
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    plain = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.bfloat16,
                                                 device_map={"": 0},
                                                 attn_implementation=model.config._attn_implementation)
    ref = loss_and_grads(_plain_peft_with(plain, lora))
    # two bf16 computations, each ~2-5% from the exact gradients (see the fp32-oracle parity
    # tests in test_patching): 0.1 still catches any wiring mistake, which costs O(1)
    assert rel_err(got[0], ref[0]) <= 1e-2
    for n in ref[1]:
        assert rel_err(got[1][n], ref[1][n]) <= 1e-1, n


def test_fast_model_loads_a_non_causal_architecture(tmp_path, caplog):
    from transformers import DistilBertConfig, DistilBertModel

    config = DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=1, n_heads=2, hidden_dim=64,
                              max_position_embeddings=64)
    DistilBertModel(config).save_pretrained(tmp_path / "bert")
    tiny_tokenizer().save_pretrained(tmp_path / "bert")
    with caplog.at_level(logging.WARNING, logger="fastft"):
        model, tok = FastModel.from_pretrained(str(tmp_path / "bert"))
    assert type(model).__name__ == "DistilBertModel"
    assert "not a causal LM" in caplog.text and "no fused patches for model type 'distilbert'" in caplog.text
    out = model(**tok(["hello"], return_tensors="pt"))
    assert out.last_hidden_state.shape[-1] == 32


def test_lora_dropout_keeps_peft_path_with_one_line(model_dirs, caplog):
    if importlib.util.find_spec("fastft.lora") is None:
        pytest.skip("fastft.lora (fused LoRA) is not in this checkout")
    model, tok = FastLanguageModel.from_pretrained(model_dirs["llama"])
    with caplog.at_level(logging.WARNING, logger="fastft"):
        model = FastLanguageModel.get_peft_model(model, r=4, lora_dropout=0.1,
                                                 use_gradient_checkpointing=False)
    lines = [r.getMessage() for r in caplog.records if "peft's own LoRA path" in r.getMessage()]
    assert len(lines) == 1 and "lora_dropout=0.1" in lines[0]
    assert getattr(model, "fastft_fused_lora", None) is None
    enc, labels = _batch(tok)
    model(**enc, labels=labels).loss.backward()
