"""Offloaded gradient checkpointing (fastft/offload.py): same gradients as no checkpointing,
installed through transformers' GradientCheckpointingLayer hook, kept when trainers re-enable
checkpointing, and training works (HF Trainer / TRL)."""
import pytest
import torch

import fastft.offload as offload
from fastft.lora import apply_fused_lora
from fastft.offload import disable_offloaded_checkpointing, enable_offloaded_checkpointing

from helpers import rel_err


def _model(family="llama", attn="eager", lora=True, layers=2, seed=0, init_std=0.02, **overrides):
    """A tiny random-init model of `family` in training mode, with LoRA on all 7 projections."""
    from peft import LoraConfig, get_peft_model

    from tiny_models import build_tiny_model

    model = build_tiny_model(family, seed=seed, num_hidden_layers=layers, attn_implementation=attn,
                             initializer_range=init_std, **overrides)
    if lora:
        model = get_peft_model(model, LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    model.train()
    return model


def _grads(model, batches, seed=7):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    losses = []
    for ids in batches:  # gradient accumulation over the batches
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return losses, grads


def _count_offloads():
    calls = {"forward": 0, "backward": 0}
    fwd, bwd = offload.OffloadedCheckpoint.forward, offload.OffloadedCheckpoint.backward

    def counted_fwd(*a):
        calls["forward"] += 1
        return fwd(*a)

    def counted_bwd(*a):
        calls["backward"] += 1
        return bwd(*a)

    offload.OffloadedCheckpoint.forward = staticmethod(counted_fwd)
    offload.OffloadedCheckpoint.backward = staticmethod(counted_bwd)
    _UNDO.append(lambda: (setattr(offload.OffloadedCheckpoint, "forward", staticmethod(fwd)),
                          setattr(offload.OffloadedCheckpoint, "backward", staticmethod(bwd))))
    return calls


_UNDO = []


@pytest.fixture(autouse=True)
def _undo():
    yield
    while _UNDO:
        _UNDO.pop()()


def _assert_same(a, b, tol=1e-5):
    (losses_a, grads_a), (losses_b, grads_b) = a, b
    assert [l.item() for l in losses_a] == pytest.approx([l.item() for l in losses_b], rel=tol)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    for name in grads_a:
        assert rel_err(grads_a[name], grads_b[name]) <= tol, name


@pytest.mark.parametrize("fused", [False, True])
def test_offloaded_checkpointing_gives_the_same_gradients(fused):
    model = _model()
    if fused:
        apply_fused_lora(model)
    batches = [torch.randint(0, 300, (2, 13)), torch.randint(0, 300, (2, 13))]  # two accumulation steps
    ref = _grads(model, batches)
    n = enable_offloaded_checkpointing(model)
    assert n == 2
    calls = _count_offloads()
    got = _grads(model, batches)
    assert calls == {"forward": 2 * 2, "backward": 2 * 2}
    _assert_same(got, ref)
    # every LoRA factor got a gradient although no input of the layers requires grad
    lora = [name for name in got[1] if "lora_" in name]
    assert len(lora) == 2 * 7 * 2


def test_dropout_rng_is_replayed_in_the_recomputation():
    model = _model(attention_dropout=0.3)
    batches = [torch.randint(0, 300, (2, 11))]
    ref = _grads(model, batches)
    enable_offloaded_checkpointing(model)
    _assert_same(_grads(model, batches), ref)
    # and the dropout really is random (a different seed gives different grads)
    other = _grads(model, batches, seed=8)
    assert max(rel_err(other[1][name], ref[1][name]) for name in ref[1]) > 1e-4


@pytest.mark.parametrize("attn", ["eager", "sdpa"])  # sdpa: attention reused in the recompute
def test_full_finetune_with_input_grads(attn):
    """No LoRA: every parameter (embeddings included, so the layer inputs require grad) matches."""
    model = _model(attn=attn, lora=False, layers=2)
    batches = [torch.randint(0, 300, (3, 9))]
    ref = _grads(model, batches)
    enable_offloaded_checkpointing(model)
    calls = _count_sdpa_runs()
    _assert_same(_grads(model, batches), ref)
    assert "model.embed_tokens.weight" in ref[1]
    if attn == "sdpa":
        assert calls == {"first forward": 2, "recompute": 0, "plain": 0}


def test_hook_survives_trainer_reenable_and_can_be_removed():
    model = _model(layers=2)
    enable_offloaded_checkpointing(model)
    base = model.get_base_model()
    layers = base.model.layers
    func = layers[0]._gradient_checkpointing_func
    assert isinstance(func, offload._CheckpointFunction)
    # what HF Trainer / TRL do with gradient_checkpointing=True
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert all(l._gradient_checkpointing_func is func and l.gradient_checkpointing for l in layers)
    assert torch.utils.checkpoint.checkpoint is not func  # nothing process-wide
    disable_offloaded_checkpointing(model)
    assert not any(l.gradient_checkpointing for l in layers)
    model.gradient_checkpointing_enable()
    assert not isinstance(layers[0]._gradient_checkpointing_func, offload._CheckpointFunction)


def test_second_backward_through_the_same_graph_says_what_to_do():
    model = _model(layers=1)
    enable_offloaded_checkpointing(model)
    ids = torch.randint(0, 300, (1, 6))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph"):
        loss.backward()


def test_rejects_models_without_checkpointing_support():
    with pytest.raises(TypeError, match="transformers model"):
        enable_offloaded_checkpointing(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])  # sdpa: the recompute reuses attention
def test_trl_sft_trainer_trains_with_offloaded_checkpointing(tmp_path, attn):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from tiny_models import tiny_tokenizer

    model = _model(attn=attn, init_std=0.3)  # larger init: a LoRA-only tiny model learns in a few steps
    apply_fused_lora(model)
    enable_offloaded_checkpointing(model)
    calls = _count_offloads()
    sdpa_calls = _count_sdpa_runs() if attn == "sdpa" else None
    torch.manual_seed(0)
    rows = [{"input_ids": ((torch.randint(0, 250, (1,)) + 3 * torch.arange(24)) % 250).tolist()}
            for _ in range(16)]
    tok = tiny_tokenizer()
    tok.pad_token = tok.eos_token
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=8,
                     learning_rate=2e-2, logging_steps=1, report_to=[], save_strategy="no",
                     gradient_checkpointing=True, gradient_accumulation_steps=2, bf16=False,
                     use_cpu=True, dataloader_num_workers=0, max_length=32)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert calls["backward"] > 0  # the trainer's gradient_checkpointing=True kept our function
    if sdpa_calls is not None:
        assert sdpa_calls["first forward"] > 0 and sdpa_calls["recompute"] == 0, sdpa_calls
    assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.gpu
@pytest.mark.parametrize("registered", [False, True])
def test_gpu_offload_uses_pinned_host_copies_and_matches(registered, monkeypatch):
    """Host copies are page-locked (torch's pinned allocator, or for large inputs fastft's
    registered buffers, reused across steps) and the gradients match no checkpointing."""
    if registered:
        monkeypatch.setattr(offload, "REGISTERED_MIN_BYTES", 0)
    model = _model().cuda()
    batches = [torch.randint(0, 300, (2, 64), device="cuda") for _ in range(2)]
    ref = _grads(model, batches)
    enable_offloaded_checkpointing(model)
    pinned = []
    orig = offload._Offloader.offload

    def spy(self, x):
        slot = orig(self, x)
        pinned.append((slot.host.device.type, slot.host.is_pinned(), slot.stream is not None,
                       slot.pooled is not None))
        return slot

    offload._Offloader.offload = spy
    _UNDO.append(lambda: setattr(offload._Offloader, "offload", orig))
    got = _grads(model, batches)
    assert pinned and all(p == ("cpu", True, True, registered) for p in pinned)
    _assert_same(got, ref)
    if registered:  # the second micro-batch reused the first one's buffers
        func = model.get_base_model().model.layers[0]._gradient_checkpointing_func
        assert len(func.offloader.free) == 2
        _assert_same(_grads(model, batches), ref)


def test_deepcopy_of_an_offloading_model_is_independent():
    import copy

    model = _model()
    enable_offloaded_checkpointing(model)
    clone = copy.deepcopy(model)
    base, cbase = model.get_base_model(), clone.get_base_model()
    func, cfunc = base.model.layers[0]._gradient_checkpointing_func, cbase.model.layers[0]._gradient_checkpointing_func
    assert isinstance(cfunc, offload._CheckpointFunction) and cfunc is not func
    assert cbase.model.layers[1]._gradient_checkpointing_func is cfunc
    assert cbase._set_gradient_checkpointing.__self__ is cbase
    batches = [torch.randint(0, 300, (2, 9))]
    _assert_same(_grads(clone, batches), _grads(model, batches))


def test_offloaded_checkpoint_function_on_its_own():
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 8)
    x = torch.randn(3, 8, requires_grad=True)

    def block(h, scale):
        return torch.tanh(lin(h)) * scale, None

    out, extra = offload.offloaded_checkpoint(block, x, 2.0)
    assert extra is None
    out.sum().backward()
    got = (x.grad.clone(), lin.weight.grad.clone())
    x.grad = None
    lin.zero_grad()
    ref_out, _ = block(x, 2.0)
    ref_out.sum().backward()
    assert torch.equal(out.detach(), ref_out.detach())
    assert rel_err(got[0], x.grad) <= 1e-6 and rel_err(got[1], lin.weight.grad) <= 1e-6
    with pytest.raises(TypeError, match="hidden states"):
        offload.offloaded_checkpoint(block, 3, 2.0)


def _record_mlp_output_needed():
    import fastft.ops.lora as ops

    seen = []
    orig = ops._LoRAMLP.forward

    def recording(ctx, x, gate, up, down, kind, tile_tokens, output_needed, *rest):
        seen.append(output_needed)
        return orig(ctx, x, gate, up, down, kind, tile_tokens, output_needed, *rest)

    ops._LoRAMLP.forward = staticmethod(recording)
    _UNDO.append(lambda: setattr(ops._LoRAMLP, "forward", staticmethod(orig)))
    return seen


@pytest.mark.parametrize("family,tile_tokens,skips", [
    ("llama", "auto", True),    # MLP output goes straight into the residual: recompute skips it
    ("llama", 5, True),         # tiled MLP: the recompute computes nothing at all
    ("gemma2", "auto", False),  # post_feedforward_layernorm reads the MLP output: never skipped
])
def test_recompute_skips_the_mlp_output_only_where_nothing_reads_it(family, tile_tokens, skips):
    model = _model(family, init_std=0.2)
    apply_fused_lora(model, tile_tokens=tile_tokens)
    batches = [torch.randint(0, 200, (2, 13)), torch.randint(0, 200, (1, 9))]
    ref = _grads(model, batches)
    enable_offloaded_checkpointing(model)
    seen = _record_mlp_output_needed()
    got = _grads(model, batches)
    # per batch: 2 layers forward (output needed), then 2 recomputes
    assert seen == ([True, True] + [not skips] * 2) * 2
    _assert_same(got, ref)


# --- reuse instead of recompute (attention output, o_proj output) -----------------------------

def _sdpa_model(family="llama", seed=0, lora=True):
    return _model(family, attn="sdpa", lora=lora, seed=seed, init_std=0.2)


def _count_sdpa_runs():
    """Counts transformers' own sdpa function calls (under our wrapper), forward vs recompute."""
    import fastft.attention as attention

    attention.install_sdpa_wrapper()
    calls = {"first forward": 0, "recompute": 0, "plain": 0}
    original = attention._ORIGINAL["sdpa"]

    def counting(*args, **kwargs):
        key = ("first forward" if offload.stashing() else
               "recompute" if offload.recomputing() else "plain")
        calls[key] += 1
        return original(*args, **kwargs)

    attention._ORIGINAL["sdpa"] = counting
    _UNDO.append(lambda: attention._ORIGINAL.__setitem__("sdpa", original))
    return calls


def _count_recomputed_projections():
    import fastft.ops.lora as ops

    calls = []
    orig = ops._project

    def counting(x2, proj, dtype, out=None, xa=None):
        if offload.recomputing():
            calls.append(proj.base.out_features)
        return orig(x2, proj, dtype, out=out, xa=xa)

    ops._project = counting
    _UNDO.append(lambda: setattr(ops, "_project", orig))
    return calls


@pytest.mark.parametrize("family,fused,reuse_qkv", [
    ("llama", True, True),    # attention output, q/k/v and o_proj output stashed
    ("llama", True, False),   # FASTFT_OFFLOAD_REUSE_QKV=0: q/k/v recomputed
    ("llama", False, True),   # peft's own projections: only attention's output
    ("qwen3", True, True),    # q/k norms read q/k in backward: q/k/v recomputed
])
def test_reused_attention_and_projections_give_the_same_gradients(family, fused, reuse_qkv, monkeypatch):
    """With room on the host, the recompute takes attention's output (and its backward state),
    o_proj's output and, where nothing but RoPE sits between them and attention, q/k/v from the
    first forward instead of recomputing them; gradients are those of no checkpointing (GQA:
    4 query / 2 kv heads)."""
    monkeypatch.setattr(offload, "REUSE_QKV", reuse_qkv)
    model = _sdpa_model(family)
    if fused:
        apply_fused_lora(model)
    batches = [torch.randint(0, 200, (2, 13)), torch.randint(0, 200, (1, 9))]
    ref = _grads(model, batches)
    enable_offloaded_checkpointing(model)
    calls = _count_sdpa_runs()
    projections = _count_recomputed_projections()
    got = _grads(model, batches)
    assert calls == {"first forward": 2 * 2, "recompute": 0, "plain": 0}
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    q_width, kv_width = cfg.num_attention_heads * head_dim, cfg.num_key_value_heads * head_dim
    skips_qkv = fused and reuse_qkv and family == "llama"
    if fused:  # per layer and batch: gate and up always, q/k/v unless skipped; never o_proj
        per_layer = [cfg.intermediate_size] * 2 + ([] if skips_qkv else [q_width, kv_width, kv_width])
        assert sorted(projections) == sorted(per_layer * 2 * 2)
    offloader = model.get_base_model().model.layers[0]._gradient_checkpointing_func.offloader
    # per layer of the last batch (1 x 9 tokens, fp32): attention output [+ o_proj output]
    # [+ q, k, v] and the small log-sum-exp
    widths = q_width + (cfg.hidden_size if fused else 0) + (q_width + 2 * kv_width if skips_qkv else 0)
    per_layer_bytes = offloader.stashed_bytes / 2
    assert 9 * widths * 4 <= per_layer_bytes <= 9 * widths * 4 + 9 * cfg.num_attention_heads * 4 + 256
    _assert_same(got, ref, tol=1e-5)


def test_stashed_qkv_comes_back_after_the_mlp_backward_before(monkeypatch):
    """q/k/v (read only by the attention backward) are not brought back with the layer's input:
    the copy of layer i-1's starts when layer i's attention backward has run (the step's memory
    peak), ahead of layer i-1's restore; gradients stay those of no checkpointing."""
    import fastft.ops.lora as ops

    model = _sdpa_model()
    apply_fused_lora(model)
    batches = [torch.randint(0, 200, (2, 13))]
    ref = _grads(model, batches)
    enable_offloaded_checkpointing(model)
    events = []
    copy_back = offload._Offloader._copy_back

    def spy_copy_back(slot, device, late):
        waiting = sum(1 for e in slot.stash if e[1] is not None
                      for i, f in enumerate(e[4]) if f == late and (e[2] is None or e[2][i] is None))
        if late and waiting:
            events.append("late copy")
        return copy_back(slot, device, late)

    mlp_backward = ops._LoRAMLP.backward

    def spy_mlp_backward(ctx, dy):
        events.append("mlp backward")
        return mlp_backward(ctx, dy)

    restore = offload._Offloader.restore

    def spy_restore(self, slot, device):
        events.append("restore")
        return restore(self, slot, device)

    monkeypatch.setattr(offload._Offloader, "_copy_back", staticmethod(spy_copy_back))
    monkeypatch.setattr(offload._Offloader, "restore", spy_restore)
    monkeypatch.setattr(ops._LoRAMLP, "backward", staticmethod(spy_mlp_backward))
    import fastft.attention as attention

    reused_backward = attention._ReusedAttention.backward

    def spy_attention_backward(ctx, grad_out):
        events.append("attention backward")
        result = reused_backward(ctx, grad_out)
        events.append("attention backward done")
        return result

    monkeypatch.setattr(attention._ReusedAttention, "backward", staticmethod(spy_attention_backward))
    got = _grads(model, batches)
    # layer 1 (first in backward): its late copy at its restore; layer 0's once layer 1's
    # attention backward has run, and ahead of layer 0's restore (prefetched, not on demand)
    assert events == ["restore", "late copy", "mlp backward", "attention backward", "late copy",
                      "attention backward done", "restore", "mlp backward", "attention backward",
                      "attention backward done"], events
    _assert_same(got, ref, tol=1e-5)


def test_without_host_room_the_recompute_recomputes(monkeypatch):
    monkeypatch.setattr(offload, "STASH_HOST_SHARE", 0.0)
    model = _sdpa_model()
    apply_fused_lora(model)
    batches = [torch.randint(0, 200, (2, 11))]
    ref = _grads(model, batches)
    enable_offloaded_checkpointing(model)
    calls = _count_sdpa_runs()
    got = _grads(model, batches)
    assert calls["recompute"] == 2 and calls["first forward"] == 2
    assert model.get_base_model().model.layers[0]._gradient_checkpointing_func.offloader.stashed_bytes == 0
    _assert_same(got, ref)


def test_reuse_with_a_padding_mask_and_accumulation():
    """A padded batch (a mask goes to SDPA) and gradient accumulation over two batches."""
    model = _sdpa_model()
    apply_fused_lora(model)
    ids = torch.randint(0, 200, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    labels = ids.masked_fill(mask == 0, -100)

    def grads():
        model.zero_grad(set_to_none=True)
        for _ in range(2):
            model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        return [], {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref = grads()
    enable_offloaded_checkpointing(model)
    _assert_same(grads(), ref)


def test_reuse_put_and_take_must_pair_up():
    """A recompute that asks for a different stashed result than the forward put fails loudly."""
    lin = torch.nn.Linear(8, 8)
    func = offload._CheckpointFunction(layers=1)
    x = torch.randn(3, 8, requires_grad=True)
    state = {"tag": "first"}

    def block(h):
        if offload.stashing():
            offload.stash_put(state["tag"], [h * 2])
        elif offload.replaying():
            offload.stash_take("second")
        return lin(h)

    out = func(block, x)
    with pytest.raises(RuntimeError, match="stashed 'second' but the first forward stashed 'first'"):
        out.sum().backward()


@pytest.mark.gpu
def test_gpu_reused_cudnn_attention_matches_no_checkpointing():
    """bf16 on the GPU: SDPA picks its fused kernel (cuDNN on an H200); the reused attention's
    backward runs it with the stashed output / log-sum-exp and the recomputed q, k, v."""
    model = _sdpa_model().to(torch.bfloat16).cuda()
    apply_fused_lora(model)
    batches = [torch.randint(0, 200, (2, 256), device="cuda"), torch.randint(0, 200, (1, 192), device="cuda")]
    ref = _grads(model, batches)
    enable_offloaded_checkpointing(model)
    calls = _count_sdpa_runs()
    got = _grads(model, batches)
    assert calls == {"first forward": 4, "recompute": 0, "plain": 0}
    offloader = model.get_base_model().model.layers[0]._gradient_checkpointing_func.offloader
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    # attention and o_proj outputs and q, k, v (bf16), plus the log-sum-exp (and RNG state)
    stashed = 192 * 2 * (3 * cfg.hidden_size + 2 * cfg.num_key_value_heads * head_dim)
    assert stashed <= offloader.stashed_bytes / 2 <= stashed + 192 * 4 * 64 + 4096
    for name in ref[1]:
        assert rel_err(got[1][name].float(), ref[1][name].float()) <= 2e-2, name


def test_copies_keep_dense_strides():
    """Stash copies take the source's strides when its elements are dense in some order (a
    transposed q/k/v view): host and device copies are then plain memcpys, with no re-layout
    kernel; other layouts (slices, broadcasts) get contiguous copies."""
    q = torch.randn(2, 7, 3, 5).transpose(1, 2)          # [b, h, s, d] view of [b, s, h, d]
    assert offload._dense_strides(q) == q.stride()
    copy = offload._empty_like_layout(q, "cpu")
    assert copy.stride() == q.stride() and copy.shape == q.shape
    assert offload._dense_strides(torch.randn(4, 6)[:, :3]) is None
    assert offload._dense_strides(torch.randn(3, 1, 4).expand(3, 2, 4)) is None
    sliced = offload._empty_like_layout(torch.randn(4, 6)[:, :3], "cpu")
    assert sliced.is_contiguous() and sliced.shape == (4, 3)


@pytest.mark.gpu
def test_gpu_host_round_trip_keeps_strides_and_values():
    off = offload._Offloader()
    stream = off.stream_for(torch.device("cuda"))
    q = torch.randn(2, 300, 4, 64, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    (host, _), = off._all_to_host([q], stream)
    stream.synchronize()
    assert host.is_pinned() and host.stride() == q.stride()
    assert torch.equal(host, q.cpu())
    back = offload._empty_like_layout(host, torch.device("cuda"))
    back.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    assert back.stride() == q.stride() and torch.equal(back, q)
