"""save_pretrained_merged / push_to_hub*: adapters round-trip, merged checkpoints reload with plain
transformers and match the un-merged LoRA model, interrupted saves leave nothing that looks done."""
import json
import os

import pytest
import torch

import fastft  # noqa: F401  (before transformers/peft, as users import it)

pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from _fastft_save_helpers import FAMILIES, add_lora, logits, rel_err, sample_ids, tiny_model  # noqa: E402

from fastft import save  # noqa: E402


# tiny tensors: one intra-op thread is faster (see conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")


def _lora_effect(pm, ids):
    with pm.disable_adapter():
        plain = logits(pm, ids)
    return rel_err(logits(pm, ids), plain)


def _load(path, dtype=torch.float32):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_16bit_matches_unmerged(family, tmp_path):
    base, tok = tiny_model(family, tmp_path)
    pm = add_lora(base)
    ids = sample_ids(len(tok))
    ref = logits(pm, ids)
    assert _lora_effect(pm, ids) > 1e-2  # the adapter really changes the model

    save.attach_save_methods(pm)
    out = pm.save_pretrained_merged(str(tmp_path / "merged"), tok, save_method="merged_16bit")
    files = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "tokenizer.json", save.MARKER_FILE} <= files
    config = json.load(open(os.path.join(out, "config.json")))
    assert "quantization_config" not in config
    from safetensors import safe_open

    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert not any("lora_" in k or "base_layer" in k for k in keys)

    merged = _load(out)
    err = rel_err(logits(merged, ids), ref)
    assert err < 1e-3, err
    assert torch.equal(logits(pm, ids), ref)  # saving left the live model untouched
    reloaded_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert reloaded_tok("hello world")["input_ids"] == tok("hello world")["input_ids"]


def test_adapters_roundtrip_through_peft(tmp_path):
    import peft

    base, tok = tiny_model("qwen3", tmp_path)
    pm = add_lora(base)
    ids = sample_ids(len(tok))
    ref = logits(pm, ids)
    out = save.save_pretrained_merged(pm, str(tmp_path / "lora"), tok, save_method="lora")
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= set(os.listdir(out))
    fresh = _load(str(tmp_path / "base-qwen3"))
    again = peft.PeftModel.from_pretrained(fresh, out)
    assert torch.allclose(logits(again, ids), ref, atol=1e-5, rtol=1e-5)


def test_merged_from_bf16_base_is_exact_fp32_merge(tmp_path):
    base, tok = tiny_model("llama", tmp_path, dtype=torch.bfloat16)
    pm = add_lora(base)
    lay = pm.base_model.model.model.layers[1].mlp.down_proj
    # independent reference: W + scaling * B @ A in fp32, cast once to the model dtype
    expect = (lay.base_layer.weight.float()
              + lay.scaling["default"] * lay.lora_B["default"].weight.float() @ lay.lora_A["default"].weight.float()
              ).to(torch.bfloat16)
    out = save.save_pretrained_merged(pm, str(tmp_path / "m"), tok, save_method="merged_16bit")
    assert json.load(open(os.path.join(out, "config.json")))["dtype"] == "bfloat16"
    from safetensors.torch import load_file

    sd = load_file(os.path.join(out, "model.safetensors"))
    assert sd["model.layers.1.mlp.down_proj.weight"].dtype == torch.bfloat16
    assert torch.equal(sd["model.layers.1.mlp.down_proj.weight"], expect)
    ids = sample_ids(len(tok))
    merged = _load(out, torch.bfloat16)
    assert rel_err(logits(merged, ids), logits(pm, ids)) < 3e-2  # bf16 rounding of W + dW vs W, dW apart


def test_merged_from_4bit_base_with_rslora(tmp_path):
    base, tok = tiny_model("llama", tmp_path, load_in_4bit=True)
    assert type(base.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    pm = add_lora(base, use_rslora=True, r=4, alpha=8)
    lay = pm.base_model.model.model.layers[0].self_attn.q_proj
    assert abs(lay.scaling["default"] - 8 / 4**0.5) < 1e-9  # rslora: alpha / sqrt(r)
    ids = sample_ids(len(tok))
    # train mode: bitsandbytes' CPU eval path repacks weights with bf16 absmax, which is lossy;
    # the training path dequantises exactly, which is what the merge reproduces
    pm.train()
    ref = logits(pm, ids)
    out = save.save_pretrained_merged(pm, str(tmp_path / "m16"), tok, save_method="merged_16bit")
    merged = _load(out)
    err = rel_err(logits(merged, ids), ref)
    assert err < 1e-3, err


def test_merged_4bit_loads_as_nf4_with_transformers(tmp_path):
    import bitsandbytes.functional as bnbf

    base, tok = tiny_model("qwen2", tmp_path)
    pm = add_lora(base)
    ids = sample_ids(len(tok))
    ref = logits(pm, ids)
    m16 = save.save_pretrained_merged(pm, str(tmp_path / "m16"), tok, save_method="merged_16bit")
    m4 = save.save_pretrained_merged(pm, str(tmp_path / "m4"), tok, save_method="merged_4bit")
    qc = json.load(open(os.path.join(m4, "config.json")))["quantization_config"]
    assert qc["load_in_4bit"] and qc["bnb_4bit_quant_type"] == "nf4"
    loaded = _load(m4)
    full = _load(m16)
    q = loaded.model.layers[1].self_attn.q_proj
    assert type(q).__name__ == "Linear4bit"
    # the stored NF4 is exactly bitsandbytes' quantisation of the merged weight
    w = full.model.layers[1].self_attn.q_proj.weight.detach()
    packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    assert torch.equal(save._dequantized_weight(q), bnbf.dequantize_4bit(packed, state))
    # biases and norms are not quantised
    assert torch.equal(q.bias, full.model.layers[1].self_attn.q_proj.bias)
    # NF4 on random Gaussian weights: ~10% per-weight error, compounding over 2 layers
    loaded.train()
    assert rel_err(logits(loaded, ids), ref) < 0.35


def test_sharded_save_writes_index(tmp_path):
    base, tok = tiny_model("llama", tmp_path)
    pm = add_lora(base)
    ids = sample_ids(len(tok))
    out = save.save_pretrained_merged(pm, str(tmp_path / "sharded"), tok, max_shard_size="300KB")
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3
    assert all(os.path.isfile(os.path.join(out, s)) for s in shards)
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not any(f.endswith(".part") for f in os.listdir(out))
    assert rel_err(logits(_load(out), ids), logits(pm, ids)) < 1e-3


def test_active_adapter_is_the_one_merged(tmp_path):
    base, tok = tiny_model("mistral", tmp_path)
    pm = add_lora(base)
    import peft

    pm.add_adapter("second", peft.LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B.second" in n:
                p.normal_(0, 0.05)
    pm.set_adapter("second")
    ids = sample_ids(len(tok))
    ref = logits(pm, ids)
    out = save.save_pretrained_merged(pm, str(tmp_path / "m"), tok)
    assert rel_err(logits(_load(out), ids), ref) < 1e-3


def test_interrupted_save_leaves_no_complete_looking_model(tmp_path, monkeypatch):
    base, tok = tiny_model("llama", tmp_path)
    pm = add_lora(base)
    target = tmp_path / "out"
    calls = {"n": 0}
    real_flush = save.ShardWriter.flush

    def failing_flush(self):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated interruption")
        real_flush(self)

    monkeypatch.setattr(save.ShardWriter, "flush", failing_flush)
    with pytest.raises(KeyboardInterrupt):
        save.save_pretrained_merged(pm, str(target), tok, max_shard_size="300KB")
    assert not target.exists()
    assert not [p for p in os.listdir(tmp_path) if "fastft-tmp" in p]

    # an interrupted re-save keeps the previous complete save intact
    monkeypatch.setattr(save.ShardWriter, "flush", real_flush)
    save.save_pretrained_merged(pm, str(target), tok)
    before = sorted(os.listdir(target))
    calls["n"] = 0
    monkeypatch.setattr(save.ShardWriter, "flush", failing_flush)
    with pytest.raises(KeyboardInterrupt):
        save.save_pretrained_merged(pm, str(target), tok, max_shard_size="300KB")
    assert sorted(os.listdir(target)) == before
    assert json.load(open(target / save.MARKER_FILE))["save_method"] == "merged_16bit"


def test_target_checks(tmp_path, monkeypatch):
    base, tok = tiny_model("qwen2", tmp_path)
    pm = add_lora(base)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save.save_pretrained_merged(pm, str(foreign), tok)
    assert (foreign / "notes.txt").read_text() == "mine"
    save.save_pretrained_merged(pm, str(foreign), tok, overwrite=True)
    assert not (foreign / "notes.txt").exists() and (foreign / "model.safetensors").exists()
    # a previous fastft save is replaced without overwrite=True
    save.save_pretrained_merged(pm, str(foreign), tok, save_method="lora")
    assert (foreign / "adapter_model.safetensors").exists() and not (foreign / "model.safetensors").exists()

    with pytest.raises(ValueError, match="save_method"):
        save.save_pretrained_merged(pm, str(tmp_path / "x"), tok, save_method="merged_8bit")

    class Tiny:
        free = 1000

    monkeypatch.setattr(save.shutil, "disk_usage", lambda p: Tiny)
    with pytest.raises(OSError, match="disk space"):
        save.save_pretrained_merged(pm, str(tmp_path / "nodisk"), tok)
    assert not (tmp_path / "nodisk").exists()
    monkeypatch.undo()
    monkeypatch.setattr(save, "available_memory_bytes", lambda: 100_000)
    with pytest.raises(MemoryError, match="maximum_memory_usage"):
        save.save_pretrained_merged(pm, str(tmp_path / "nomem"), tok)
    assert not (tmp_path / "nomem").exists()


def test_attach_and_push_wrappers_upload_what_save_writes(tmp_path):
    base, tok = tiny_model("llama", tmp_path)
    pm = add_lora(base)
    assert save.attach_save_methods(pm) is pm
    save.attach_save_methods(pm)  # idempotent
    plain = save.attach_save_methods(_load(str(tmp_path / "base-llama")))
    seen = []

    def fake_upload(folder, repo_id, token=None, private=None, commit_message=None):
        seen.append((repo_id, sorted(os.listdir(folder)), json.load(open(os.path.join(folder, save.MARKER_FILE)))))
        return "ok"

    assert pm.push_to_hub("me/adapters", tok, uploader=fake_upload) == "ok"
    assert pm.push_to_hub_merged("me/merged", tok, save_method="merged_16bit", uploader=fake_upload) == "ok"
    assert plain.push_to_hub_merged("me/plain", tok, uploader=fake_upload) == "ok"
    assert pm.push_to_hub_gguf("me/gguf", tok, quantization_method="q8_0", uploader=fake_upload) == "ok"
    (r1, f1, m1), (r2, f2, m2), (r3, f3, _), (r4, f4, m4) = seen
    assert r1 == "me/adapters" and "adapter_model.safetensors" in f1 and m1["save_method"] == "lora"
    assert "model.safetensors" in f2 and "config.json" in f2 and "tokenizer.json" in f2 and m2["save_method"] == "merged_16bit"
    assert "model.safetensors" in f3
    assert any(f.endswith(".Q8_0.gguf") for f in f4) and "Modelfile" in f4 and m4["save_method"] == "gguf"
    with pytest.raises(ValueError, match="repo_id"):
        pm.push_to_hub_merged("", tok, uploader=fake_upload)
    with pytest.raises(ValueError, match="LoRA"):
        save.save_pretrained_merged(plain, str(tmp_path / "nolora"), tok, save_method="lora")


def test_lora_on_embeddings_and_lm_head_merges(tmp_path):
    """Continued pretraining targets embed_tokens and lm_head too (the guide's recipe)."""
    import peft

    base, tok = tiny_model("llama", tmp_path)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens", "lm_head"])
    pm = peft.get_peft_model(base, cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n or "lora_embedding" in n:  # peft starts embedding A at zero
                p.normal_(0, 0.05)
    pm.eval()
    ids = sample_ids(len(tok))
    assert _lora_effect(pm, ids) > 1e-2
    out = save.save_pretrained_merged(pm, str(tmp_path / "m"), tok)
    merged = _load(out)
    emb_change = rel_err(merged.model.embed_tokens.weight.detach(), base.model.embed_tokens.base_layer.weight.detach())
    assert emb_change > 1e-3
    assert rel_err(logits(merged, ids), logits(pm, ids)) < 1e-3


def test_lora_on_tied_lm_head_unties_the_saved_model(tmp_path):
    import peft

    base, tok = tiny_model("qwen2", tmp_path)  # tie_word_embeddings=True
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    pm.eval()
    ids = sample_ids(len(tok))
    out = save.save_pretrained_merged(pm, str(tmp_path / "m"), tok)
    assert json.load(open(os.path.join(out, "config.json")))["tie_word_embeddings"] is False
    assert rel_err(logits(_load(out), ids), logits(pm, ids)) < 1e-3


def test_dora_adapters_merge(tmp_path):
    import peft

    base, tok = tiny_model("qwen3", tmp_path)
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "down_proj"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.1 * torch.randn_like(p))
    pm.eval()
    ids = sample_ids(len(tok))
    assert _lora_effect(pm, ids) > 1e-2
    out = save.save_pretrained_merged(pm, str(tmp_path / "m"), tok)
    assert rel_err(logits(_load(out), ids), logits(pm, ids)) < 1e-3


def test_through_fastft_loader(tmp_path):
    """The golden path: FastLanguageModel.from_pretrained -> get_peft_model -> save_pretrained_merged
    (the loader binds the save methods; its fused LoRA forwards stay in place)."""
    try:
        from fastft import FastLanguageModel
    except ImportError as e:  # the loader is optional for these tests
        pytest.skip(f"fastft.loader not importable: {e}")
    _, tok = tiny_model("llama", tmp_path)
    model, tok2 = FastLanguageModel.from_pretrained(str(tmp_path / "base-llama"), max_seq_length=128,
                                                    load_in_4bit=False, dtype=torch.float32)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    model.eval()
    ids = sample_ids(len(tok))
    ref = logits(model, ids)
    out = model.save_pretrained_merged(str(tmp_path / "m"), tok2, save_method="merged_16bit")
    assert rel_err(logits(_load(out), ids), ref) < 1e-3


def test_save_functions_reject_unknown_arguments_and_push_to_hub(tmp_path):
    """Arguments other tools' scripts pass are accepted and ignored; an unknown one is a
    TypeError naming it, push_to_hub=True a ValueError naming the call to use instead; both
    before anything is written."""
    save_pretrained_gguf = save.save_pretrained_gguf
    with pytest.raises(TypeError, match="save_pretrained_merged got unexpected arguments: colour"):
        save.save_pretrained_merged(None, str(tmp_path / "m"), None, colour="red")
    with pytest.raises(ValueError, match=r"push_to_hub_merged\(repo_id"):
        save.save_pretrained_merged(None, str(tmp_path / "m"), None, push_to_hub=True, token="t")
    with pytest.raises(TypeError, match="save_pretrained_gguf got unexpected arguments: colour"):
        save_pretrained_gguf(None, str(tmp_path / "g"), None, colour="red")
    with pytest.raises(ValueError, match=r"push_to_hub_gguf\(repo_id"):
        save_pretrained_gguf(None, str(tmp_path / "g"), None, push_to_hub=True)
    save.check_save_kwargs("f", {"token": "t", "push_to_hub": False}, {"token"}, "g()")  # accepted
    assert not any(tmp_path.iterdir())
