"""Patched models against unpatched transformers: loss, logits and LoRA gradients (fp32 on CPU,
bf16 on GPU), padding, labels -100, gradient accumulation, logits_to_keep, softcapping; the
patch registry (idempotent, reversible, per class)."""
import os

import pytest
import torch

import fastft.ops
from fastft import dispatch
from fastft.models import is_patched, patch_model, patched_names, unpatch_all
from fastft.models.families import FAMILIES as FAMILY_SPECS
from fastft.models.patcher import OP_MODULES
from tests.helpers import rel_err
from tests.tiny_models import FAMILIES, build_tiny_model

TOL = 1e-4
OPS = ("rms_norm", "rope", "swiglu", "geglu", "fused_linear_cross_entropy", "cross_entropy")


@pytest.fixture(autouse=True)
def _unpatch():
    unpatch_all()
    yield
    unpatch_all()


@pytest.fixture
def torch_backend(monkeypatch):
    monkeypatch.setenv("FASTFT_BACKEND", "torch")
    dispatch.clear_cache()
    yield
    dispatch.clear_cache()


@pytest.fixture
def op_calls(monkeypatch):
    """Counts calls of each public op (proves the patched forwards really run)."""
    import importlib

    calls = {name: 0 for name in OPS}
    for name in OPS:
        module = importlib.import_module(OP_MODULES[name])
        fn = getattr(module, name)

        def counted(*args, _fn=fn, _name=name, **kwargs):
            calls[_name] += 1
            return _fn(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    return calls


def make_batch(vocab=256, batch=3, seq=21, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0          # left padding
    mask[2, -4:] = 0         # right padding
    labels = ids.clone()
    labels[mask == 0] = -100
    labels[0, :5] = -100     # a masked prompt
    return ids, mask, labels


def lora_model(family, seed=0, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                          "down_proj"), dtype=torch.float32, **overrides):
    from peft import LoraConfig, get_peft_model

    model = build_tiny_model(family, dtype=dtype, seed=seed, **overrides)
    torch.manual_seed(seed + 1)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                  target_modules=list(targets)))
    g = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():  # non-zero B, so every adapter changes the output and gets a gradient
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g).to(p.dtype))
    return peft_model


def run(model, ids, mask, labels, **kwargs):
    """(loss, logits, {lora param: grad}) of one forward/backward."""
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, attention_mask=mask, labels=labels, **kwargs).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    return loss.detach(), logits, grads


def compare(ref, got, mask, tol):
    (l0, z0, g0), (l1, z1, g1) = ref, got
    assert rel_err(l1, l0) <= tol, f"loss {l1.item()} vs {l0.item()}"
    keep = mask.bool()
    assert rel_err(z1[keep], z0[keep]) <= tol
    assert g0 and set(g0) == set(g1)
    for name in g0:
        assert g0[name].abs().sum() > 0, f"{name} got no gradient"
        assert rel_err(g1[name], g0[name]) <= tol, name


@pytest.mark.parametrize("family", FAMILIES)
def test_patched_matches_transformers_fp32(family, torch_backend, op_calls):
    model = lora_model(family)
    ids, mask, labels = make_batch()
    ref = run(model, ids, mask, labels)
    assert all(v == 0 for v in op_calls.values())
    assert patch_model(model).name == family
    got = run(model, ids, mask, labels)
    compare(ref, got, mask, TOL)
    act = "geglu" if family.startswith("gemma") else "swiglu"
    for op in ("rms_norm", "rope", act, "fused_linear_cross_entropy"):
        assert op_calls[op] > 0, f"{op} was never called: the patch is not wired"


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_gradient_accumulation_equals_one_big_batch(family, torch_backend):
    model = lora_model(family)
    ids, mask, labels = make_batch(batch=4, seed=3)
    labels[3, 2:9] = -100
    ref = run(model, ids, mask, labels)  # unpatched, one batch of 4
    patch_model(model)
    big = run(model, ids, mask, labels)
    compare(ref, big, mask, TOL)

    n_items = (labels[:, 1:] != -100).sum()  # what the Trainer counts: shifted labels
    total_loss, grads = 0.0, {}
    for rows in (slice(0, 2), slice(2, 4)):
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids[rows], attention_mask=mask[rows], labels=labels[rows],
                     num_items_in_batch=n_items).loss
        loss.backward()
        total_loss += loss.detach()
        for n, p in model.named_parameters():
            if p.requires_grad:
                grads[n] = grads.get(n, 0) + p.grad.detach().clone()
    assert rel_err(total_loss, big[0]) <= TOL
    for n, g in big[2].items():
        assert rel_err(grads[n], g) <= TOL, n


def test_num_items_in_batch_matches_transformers(torch_backend):
    model = lora_model("qwen2")
    ids, mask, labels = make_batch()
    n = torch.tensor(57)
    ref = run(model, ids, mask, labels, num_items_in_batch=n)
    patch_model(model)
    got = run(model, ids, mask, labels, num_items_in_batch=n)
    compare(ref, got, mask, TOL)


def test_logit_softcap_is_applied(torch_backend):
    # A cap small enough to change the loss a lot: parity proves the fused loss applies it.
    model = lora_model("gemma2", final_logit_softcapping=2.0)
    with torch.no_grad():  # logits of a few units, so a cap of 2 bites
        model.get_output_embeddings().weight.mul_(50.0)
    ids, mask, labels = make_batch()
    ref = run(model, ids, mask, labels)
    patch_model(model)
    got = run(model, ids, mask, labels)
    compare(ref, got, mask, TOL)
    model.base_model.model.config.final_logit_softcapping = None
    uncapped = run(model, ids, mask, labels)
    assert rel_err(uncapped[0], got[0]) > 1e-2


def test_logits_to_keep_with_labels(torch_backend):
    model = lora_model("llama")
    ids, mask, labels = make_batch()
    k = 7
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    expected = torch.nn.functional.cross_entropy(logits[:, -k:].reshape(-1, logits.shape[-1]),
                                                 shifted[:, -k:].reshape(-1), ignore_index=-100)
    patch_model(model)
    model.train()
    loss = model(input_ids=ids, attention_mask=mask, labels=labels, logits_to_keep=k).loss
    assert rel_err(loss.detach(), expected) <= TOL
    positions = torch.tensor([0, 4, 11, 20])
    loss = model(input_ids=ids, attention_mask=mask, labels=labels, logits_to_keep=positions).loss
    expected = torch.nn.functional.cross_entropy(
        logits[:, positions].reshape(-1, logits.shape[-1]), shifted[:, positions].reshape(-1))
    assert rel_err(loss.detach(), expected) <= TOL


def test_logits_returned_only_when_asked(torch_backend, monkeypatch):
    model = lora_model("qwen3")
    ids, mask, labels = make_batch()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, labels=labels)
    patch_model(model)
    model.train()
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits is None and out.loss.requires_grad
    # Evaluation (no autograd): transformers' head, logits for compute_metrics
    with torch.no_grad():
        ev = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert ev.logits is not None and rel_err(ev.loss, ref.loss) <= TOL
    monkeypatch.setenv("FASTFT_RETURN_LOGITS", "1")
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits is not None and rel_err(out.logits, ref.logits) <= TOL
    monkeypatch.setenv("FASTFT_RETURN_LOGITS", "0")
    with torch.no_grad():
        ev = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert ev.logits is None and rel_err(ev.loss, ref.loss) <= TOL
    # return_dict=False gives a tuple that starts with the loss
    out = model(input_ids=ids, attention_mask=mask, labels=labels, return_dict=False)
    assert isinstance(out, tuple) and rel_err(out[0].detach(), ref.loss) <= TOL


def test_lora_on_lm_head_uses_head_forward(torch_backend, op_calls):
    model = lora_model("llama", targets=("q_proj", "v_proj", "lm_head"))
    ids, mask, labels = make_batch()
    ref = run(model, ids, mask, labels)
    patch_model(model)
    got = run(model, ids, mask, labels)
    compare(ref, got, mask, TOL)
    assert op_calls["cross_entropy"] > 0  # LoRA-wrapped head: its forward, then the fused CE


def test_generate_after_patching(torch_backend):
    model = build_tiny_model("llama")
    ids = torch.randint(0, 256, (1, 5))
    ref = model.generate(ids, max_new_tokens=6, do_sample=False)
    patch_model(model)
    got = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(ref, got)


def test_patches_are_per_class_idempotent_and_reversible(torch_backend):
    from transformers.models.llama import modeling_llama as ml

    before = (ml.LlamaRMSNorm.forward, ml.LlamaMLP.forward, ml.LlamaForCausalLM.forward,
              ml.apply_rotary_pos_emb)
    a, b = build_tiny_model("llama"), build_tiny_model("llama", seed=1)
    patch_model(a)
    names = patched_names()
    assert len(names) == 4
    assert is_patched(ml.LlamaRMSNorm, "forward") and is_patched(ml, "apply_rotary_pos_emb")
    assert "forward" not in vars(a.model.norm)  # the class is patched, not the instance
    after = (ml.LlamaRMSNorm.forward, ml.LlamaMLP.forward, ml.LlamaForCausalLM.forward,
             ml.apply_rotary_pos_emb)
    assert all(x is not y for x, y in zip(before, after))
    patch_model(b)  # idempotent: nothing patched twice
    assert patched_names() == names
    assert (ml.LlamaRMSNorm.forward, ml.LlamaMLP.forward, ml.LlamaForCausalLM.forward,
            ml.apply_rotary_pos_emb) == after
    unpatch_all()
    assert (ml.LlamaRMSNorm.forward, ml.LlamaMLP.forward, ml.LlamaForCausalLM.forward,
            ml.apply_rotary_pos_emb) == before
    assert patched_names() == []


def test_patched_forward_keeps_signature(torch_backend):
    import inspect

    from transformers.models.gemma2 import modeling_gemma2 as mg

    before = inspect.signature(mg.Gemma2ForCausalLM.forward)
    patch_model(build_tiny_model("gemma2"))
    assert inspect.signature(mg.Gemma2ForCausalLM.forward) == before


def test_unknown_architecture_is_left_alone(caplog):
    model = build_tiny_model("gpt2")
    with caplog.at_level("INFO", logger="fastft"):
        assert patch_model(model) is None
    lines = [r.getMessage() for r in caplog.records if r.name == "fastft"]
    assert len(lines) == 1 and "'gpt2'" in lines[0] and "transformers' own code" in lines[0]
    assert patched_names() == []


def test_every_family_description_resolves_to_transformers_classes():
    import importlib

    for fam in FAMILY_SPECS:
        module = importlib.import_module(fam.modeling_module)
        for cls_name in (fam.norm_class, fam.mlp_class, fam.causal_lm_class):
            assert hasattr(module, cls_name), (fam.name, cls_name)
        assert hasattr(module, "apply_rotary_pos_emb"), fam.name


def test_triton_backends_wired_through_the_interpreter(op_calls):
    """One family with the automatic backends (Triton interpreter on CPU): kernels really run."""
    if not dispatch.triton_interpreter_on():
        pytest.skip("Triton interpreter is off (GPU machine: covered by the gpu tests)")
    fastft.ops.load_all()
    chosen = {op: dispatch.backend_for(op, "cpu", torch.float32)
              for op in ("rms_norm", "rope", "swiglu", "fused_linear_cross_entropy")}
    assert set(chosen.values()) == {"triton"}, chosen
    model = lora_model("llama")
    ids, mask, labels = make_batch(batch=3, seq=13)
    os.environ["FASTFT_BACKEND"] = "torch"
    try:
        dispatch.clear_cache()
        patch_model(model)
        ref = run(model, ids, mask, labels)  # torch reference backends
    finally:
        del os.environ["FASTFT_BACKEND"]
        dispatch.clear_cache()
    for name in op_calls:
        op_calls[name] = 0
    got = run(model, ids, mask, labels)
    compare(ref, got, mask, 1e-4)
    assert all(op_calls[op] > 0 for op in chosen), op_calls


# ---------------------------------------------------------------- GPU (bf16, CUDA / Triton)

GPU_SHAPE = dict(hidden_size=256, intermediate_size=704, vocab_size=1000)


def _gpu_models(family):
    """(fp32 model, bf16 copy with the same weights; LoRA weights stay fp32 as peft keeps them)."""
    import copy

    over = dict(GPU_SHAPE)
    if family in ("qwen3", "gemma2", "gemma3"):
        over["head_dim"] = 64
    model32 = lora_model(family, **over).cuda()
    model16 = copy.deepcopy(model32).to(torch.bfloat16)
    for name, p in model16.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
    return model32, model16


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("family", FAMILIES)
def test_patched_matches_transformers_bf16_gpu(family, backend, monkeypatch):
    fastft.ops.load_all()
    act = "geglu" if family.startswith("gemma") else "swiglu"
    for op in ("rms_norm", "rope", act, "fused_linear_cross_entropy"):
        problem = dispatch.why_not(op, backend, "cuda", torch.bfloat16)
        if problem:
            pytest.skip(f"{op}: {problem}")
    ids, mask, labels = (t.cuda() for t in make_batch(vocab=1000, batch=4, seq=67))
    model32, model = _gpu_models(family)
    ref32 = run(model32, ids, mask, labels)   # the oracle
    ref16 = run(model, ids, mask, labels)     # transformers in bf16: the error budget
    monkeypatch.setenv("FASTFT_BACKEND", backend)
    dispatch.clear_cache()
    patch_model(model)
    got = run(model, ids, mask, labels)
    keep = mask.bool()

    def check(a16, b16, a32):
        budget = max(1.5 * rel_err(a16, a32), 1e-2)
        assert rel_err(b16, a32) <= budget

    check(ref16[0], got[0], ref32[0])
    check(ref16[1][keep], got[1][keep], ref32[1][keep])
    for name in ref32[2]:
        check(ref16[2][name], got[2][name], ref32[2][name])
