"""CUDA-graph decoding (fastft.decoding, installed by FastLanguageModel.for_inference).

On the CPU the graphs are emulated (fastft.decoding._EMULATE_ON_CPU: a replay re-runs the
forward on the graph's input buffers and copies into its output), which tests everything but the
capture: which steps are graphed, the inputs' buffers, the cache counters put back after the
warm-ups, the graphs dropped when the model changes. The gpu tests capture real graphs."""
import inspect
import logging
import weakref

import pytest
import torch

import fastft.decoding as decoding
from fastft.loader import FastLanguageModel
from tests.tiny_models import FAMILIES, save_tiny_model

GRAPHED = FAMILIES  # full attention, or sliding windows graphed while they have room


@pytest.fixture
def emulate(monkeypatch):
    monkeypatch.setattr(decoding, "_EMULATE_ON_CPU", True)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {fam: save_tiny_model(fam, root / fam) for fam in FAMILIES}


def _lora_model(path, device="cpu", dtype=None, **load):
    model, tok = FastLanguageModel.from_pretrained(path, dtype=dtype, device_map={"": device}, **load)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False,
                                             init_lora_weights=False, random_state=1)
    return model, tok


def _generate(model, device="cpu", new=7, **extra):
    torch.manual_seed(0)
    ids = torch.randint(0, 256, (3, 6), device=device)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding in one row
    mask[2, :1] = 0
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, pad_token_id=0, output_scores=True,
                              return_dict_in_generate=True, **extra)


def _max_score_diff(a, b):
    """Largest score difference (min_new_tokens sets EOS to -inf in both: equal, not NaN)."""
    assert len(a.scores) == len(b.scores)
    return max(torch.where(x == y, 0.0, (x.float() - y.float()).abs()).max().item()
               for x, y in zip(a.scores, b.scores))


def _count_captures(model):
    """(the model's graph decoder, a list that grows by one at each capture it makes)"""
    decoder = model.get_base_model().__dict__[decoding._ATTR]
    captures = []
    real_capture = decoder.capture
    decoder.capture = lambda *a: captures.append(1) or real_capture(*a)
    return decoder, captures


@pytest.mark.parametrize("family", FAMILIES)
def test_graphed_generate_matches_eager(family, model_dirs, emulate):
    model, _ = _lora_model(model_dirs[family])
    FastLanguageModel.for_inference(model, use_cuda_graphs=False)
    eager_static = _generate(model, cache_implementation="static")
    eager = _generate(model)
    why = decoding.graph_decoding_supported(model)
    assert (why is None) == (family in GRAPHED), why
    FastLanguageModel.for_inference(model)
    graphed = _generate(model)
    lm = model.get_base_model()
    assert lm.generation_config.disable_compile  # transformers' compile cannot trace fused layers
    if family in GRAPHED:
        assert lm.generation_config.cache_implementation == "static"
        assert decoding.graph_count(model) == 1 and lm.__dict__[decoding._ATTR].failed is None
        assert torch.equal(graphed.sequences, eager_static.sequences)
        assert _max_score_diff(graphed, eager_static) <= 1e-5
    else:
        assert decoding.graph_count(model) == 0 and lm.generation_config.cache_implementation is None
    assert torch.equal(graphed.sequences, eager.sequences)
    assert _max_score_diff(graphed, eager) <= 1e-4


def test_sliding_windows_graphed_while_they_have_room(model_dirs, emulate):
    """Sliding-window layers (gemma2: every other layer, a window of 16) decode from graphs while
    the window has room for the new token, and eagerly once it is full (their update's roll and
    cat branches); the tokens equal eager static-cache decoding either way. The replays here
    leave the layers' Python-int counters alone, as a real CUDA graph's do, so run() must count
    for them."""
    model, _ = _lora_model(model_dirs["gemma2"])
    FastLanguageModel.for_inference(model, use_cuda_graphs=False)
    eager = _generate(model, new=16, cache_implementation="static")  # 6 + 16 tokens > 16
    FastLanguageModel.for_inference(model)
    decoder = model.get_base_model().__dict__[decoding._ATTR]
    real_capture, replays = decoder.capture, []

    def capture(*args):
        graph = real_capture(*args)
        if graph is not None:
            emulated = graph.replay

            def replay_without_python():
                counts = decoding._sliding_counters(graph.cache_ref())
                emulated()  # (re-runs the forward, whose update counts: undone below)
                for layer, count in counts:
                    setattr(layer, decoding._SLIDING_COUNTER, count)
                replays.append(1)
            graph.replay = replay_without_python
        return graph

    decoder.capture = capture
    graphed = _generate(model, new=16)
    assert torch.equal(graphed.sequences, eager.sequences)
    assert _max_score_diff(graphed, eager) <= 1e-5
    # the window (16) holds the prompt (6) and then has room for 10 decoding steps' tokens
    assert len(replays) == 10, len(replays)
    cache_layers = [type(layer).__name__ for layer in decoder.kept_cache[1].layers]
    assert "StaticSlidingWindowLayer" in cache_layers and "StaticLayer" in cache_layers


def test_graphs_follow_the_model(model_dirs, emulate):
    """Adapters disabled, trained in place or swapped for new tensors between generate calls:
    each call decodes with the model as it is then."""
    model, _ = _lora_model(model_dirs["llama"])
    FastLanguageModel.for_inference(model)

    def both():
        graphed = _generate(model)
        decoding.disable_graph_decoding(model)
        eager = _generate(model, cache_implementation="static")
        decoding.enable_graph_decoding(model)
        assert torch.equal(graphed.sequences, eager.sequences)
        assert _max_score_diff(graphed, eager) <= 1e-5
        return graphed

    first = both()
    with model.disable_adapter():
        off = both()
    assert _max_score_diff(first, off) > 1e-3  # the adapters do change the scores
    lora_B = next(p for n, p in model.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        lora_B.mul_(3.0)  # in place: same address, the graph reads the new values
    trained = both()
    assert _max_score_diff(first, trained) > 1e-3
    lora_B.data = lora_B.data * 0.5  # a new tensor: the graphs must be captured again
    both()
    # More steps than the graph saw at capture, a larger batch, a longer cache: new graphs
    longer = _generate(model, new=12)
    decoding.disable_graph_decoding(model)
    assert torch.equal(longer.sequences, _generate(model, new=12, cache_implementation="static").sequences)


def test_static_cache_kept_across_generate_calls(model_dirs, emulate):
    """One StaticCache serves the calls of one batch size and cache length, so their graphs are
    captured once; a cache a caller still holds is never reset under them."""
    model, _ = _lora_model(model_dirs["llama"])
    FastLanguageModel.for_inference(model, use_cuda_graphs=False)
    expected = _generate(model, cache_implementation="static").sequences
    FastLanguageModel.for_inference(model)
    decoder, captures = _count_captures(model)

    def sequences(**kw):  # the output object (and with it the cache) dropped at once
        return _generate(model, **kw).sequences

    assert torch.equal(sequences(), expected)
    kept = weakref.ref(decoder.kept_cache[1])  # (weakly: a reference here would count as held)
    for _ in range(2):  # the same cache, reset, and the same graph
        assert torch.equal(sequences(), expected)
        assert decoder.kept_cache[1] is kept() and len(captures) == 1 and decoding.graph_count(model) == 1
    assert torch.equal(sequences(new=4), expected[:, :10])  # shorter: the cache is as long as before
    assert decoder.kept_cache[1] is kept() and len(captures) == 1

    held = _generate(model)  # holds the cache (past_key_values) while the next calls run
    assert held.past_key_values is kept()
    keys = [layer.keys.clone() for layer in held.past_key_values.layers]
    assert torch.equal(sequences(), expected)
    assert decoder.kept_cache[1] is not held.past_key_values and len(captures) == 2  # new cache, graphs
    assert all(torch.equal(k, layer.keys) for k, layer in zip(keys, held.past_key_values.layers))

    # a longer call needs a longer cache; then the shorter calls use that one
    longer = sequences(new=12)
    kept = weakref.ref(decoder.kept_cache[1])
    assert torch.equal(sequences(), expected) and decoder.kept_cache[1] is kept()
    decoding.disable_graph_decoding(model)
    assert decoder.kept_cache is None and "_prepare_static_cache" not in model.get_base_model().__dict__
    assert torch.equal(longer, _generate(model, new=12, cache_implementation="static").sequences)


def test_stop_check_deferred_only_for_graphed_caches(model_dirs, emulate):
    """Inside a graphed generate call transformers' DeferredStopCheck is allowed on CUDA for the
    caches fastft.decoding made (the GPU test checks the tokens); everything else keeps
    transformers' own choice, and the class is put back after the call."""
    gen_utils = pytest.importorskip("transformers.generation.utils")
    base = getattr(gen_utils, "DeferredStopCheck", None)
    if base is None:
        pytest.skip("this transformers has no DeferredStopCheck")
    model, _ = _lora_model(model_dirs["llama"])
    FastLanguageModel.for_inference(model)
    seen = []
    real_prepare = model.get_base_model().__dict__[decoding._ATTR].static_cache

    def spy(lm, args, kwargs):  # runs inside generate: look at the class transformers will use
        cache = real_prepare(lm, args, kwargs)
        check = gen_utils.DeferredStopCheck
        cuda, cpu = torch.device("cuda"), torch.device("cpu")
        seen.append((check is not base, check.is_supported(cuda, cache, False, False),
                     check.is_supported(cuda, cache, False, True),  # an assistant model: no
                     check.is_supported(cpu, cache, False, False),
                     check.is_supported(cuda, object(), False, False) == base.is_supported(cuda, object(), False, False),
                     check.is_supported(cuda, cache, True, False) == bool(cache.is_croppable)))
        return cache

    model.get_base_model().__dict__[decoding._ATTR].static_cache = spy
    _generate(model, new=3)
    assert seen == [(True, True, False, False, True, True)]
    assert gen_utils.DeferredStopCheck is base


def test_cache_tensors_that_move_are_not_captured_every_step(model_dirs, emulate):
    """Beam search reorders the cache into new tensors at every step: it decodes eagerly (no
    capture per step), as does the rest of any call whose cache tensors were replaced."""
    model, _ = _lora_model(model_dirs["llama"])
    FastLanguageModel.for_inference(model, use_cuda_graphs=False)
    beams = _generate(model, cache_implementation="static", num_beams=3).sequences
    plain = _generate(model, cache_implementation="static").sequences
    FastLanguageModel.for_inference(model)
    decoder, captures = _count_captures(model)
    assert torch.equal(_generate(model, num_beams=3).sequences, beams) and captures == []

    class MoveTheCache:  # a logits processor that, at the third step, replaces a cache tensor
        steps = 0

        def __call__(self, input_ids, scores):
            self.steps += 1
            if self.steps == 3:
                layer = decoder.kept_cache[1].layers[0]
                layer.keys = layer.keys.clone()
            return scores

    from transformers import LogitsProcessorList

    moved = _generate(model, logits_processor=LogitsProcessorList([MoveTheCache()]))
    assert torch.equal(moved.sequences, plain) and len(captures) == 1 and decoding.graph_count(model) == 0
    assert torch.equal(_generate(model).sequences, plain)  # the next call graphs again
    assert len(captures) == 2 and decoding.graph_count(model) == 1


def test_generate_marks_the_nf4_weights_frozen(model_dirs, emulate):
    """generate's forwards, the prompt, the captured steps and a failed generate's cleanup
    included, run inside fastft.ops.nf4.frozen_weights (the NF4 kernels then load the weight
    before the PDL wait); a plain forward, before and after, does not."""
    from fastft.ops import nf4

    model, tok = _lora_model(model_dirs["qwen2"])
    lm = model.get_base_model()
    FastLanguageModel.for_inference(model)
    seen = []
    decoder = lm.__dict__[decoding._ATTR]
    inner = decoder.forward
    decoder.forward = lambda *a, **k: seen.append(nf4._FROZEN_WEIGHTS[0]) or inner(*a, **k)
    with torch.no_grad():
        model(**tok(["abc"], return_tensors="pt"))
    assert seen == [0]
    seen.clear()
    _generate(model, new=4)
    assert len(seen) >= 2 and all(depth == 1 for depth in seen), seen
    assert nf4._FROZEN_WEIGHTS[0] == 0
    with pytest.raises(ValueError, match="no_such_argument_anywhere"):
        model.generate(input_ids=torch.ones(1, 3, dtype=torch.long), max_new_tokens=2,
                       no_such_argument_anywhere=object(), do_sample=False)
    assert nf4._FROZEN_WEIGHTS[0] == 0


def test_only_generate_decoding_steps_are_graphed(model_dirs, emulate):
    model, tok = _lora_model(model_dirs["qwen2"])
    lm = model.get_base_model()
    signature = inspect.signature(lm.forward)
    FastLanguageModel.for_inference(model)
    # generate reads forward's signature (logits_to_keep, attention_mask, position_ids)
    assert inspect.signature(lm.forward) == signature and "logits_to_keep" in signature.parameters
    seen = []
    decoder = lm.__dict__[decoding._ATTR]
    real_capture = decoder.capture
    decoder.capture = lambda kwargs, *a: seen.append(tuple(kwargs["input_ids"].shape)) or real_capture(kwargs, *a)
    with torch.no_grad():
        model(**tok(["abc"], return_tensors="pt"))  # a plain forward: eager
    assert seen == [] and decoding.graph_count(model) == 0
    _generate(model, new=5)
    assert seen == [(3, 1)]  # the prompt (3, 6) ran eagerly, every decoding step from one graph
    # training mode, or grad enabled: eager
    model.train()
    with torch.no_grad():
        model.generate(**tok(["ab"], return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert seen == [(3, 1)]
    FastLanguageModel.for_training(model)
    assert decoding.graph_count(model) == 0 and decoding._ATTR not in lm.__dict__
    assert not set(decoding._WRAPPED) & set(lm.__dict__)
    assert lm.generation_config.cache_implementation is None


def test_capture_failure_falls_back_to_eager(model_dirs, emulate, caplog):
    model, _ = _lora_model(model_dirs["llama"])
    FastLanguageModel.for_inference(model, use_cuda_graphs=False)
    expected = _generate(model, cache_implementation="static")
    FastLanguageModel.for_inference(model)
    decoder = model.get_base_model().__dict__[decoding._ATTR]
    real_forward = decoder.forward
    calls = [0]

    def flaky_forward(**kwargs):  # the first warm-up raises, as an op that syncs would
        calls[0] += 1
        if calls[0] == 2:  # (call 1 is the prompt)
            raise RuntimeError("operation not permitted when stream is capturing")
        return real_forward(**kwargs)

    decoder.forward = flaky_forward
    with caplog.at_level(logging.WARNING, logger="fastft"):
        got = _generate(model)
    assert "decoding with CUDA graphs failed" in caplog.text
    assert decoder.failed is not None and decoding.graph_count(model) == 0
    assert torch.equal(got.sequences, expected.sequences)
    assert _max_score_diff(got, expected) <= 1e-5


def test_not_enabled_where_it_cannot_work(model_dirs, monkeypatch, caplog):
    model, _ = _lora_model(model_dirs["llama"])
    with caplog.at_level(logging.INFO, logger="fastft"):
        FastLanguageModel.for_inference(model)  # CPU, no emulation: no graphs
    assert "not on a CUDA device" in caplog.text
    assert decoding._ATTR not in model.get_base_model().__dict__
    monkeypatch.setattr(decoding, "_EMULATE_ON_CPU", True)
    monkeypatch.setenv("FASTFT_CUDA_GRAPHS", "0")
    assert decoding.graph_decoding_supported(model) == "FASTFT_CUDA_GRAPHS=0"
    monkeypatch.delenv("FASTFT_CUDA_GRAPHS")
    model.get_base_model().config._attn_implementation = "flash_attention_2"
    assert "attention 'flash_attention_2'" in decoding.graph_decoding_supported(model)


# --- gpu: real CUDA graphs ------------------------------------------------------------------------

def _gpu_graphed_matches_eager(model, tolerance):
    """(graphed, eager) generate outputs of `model` on the GPU, checked equal: eager decoding
    with the static cache first, then for_inference's graphs (one captured, none failed)."""
    FastLanguageModel.for_inference(model, use_cuda_graphs=False)
    eager = _generate(model, device="cuda", cache_implementation="static")
    FastLanguageModel.for_inference(model)
    graphed = _generate(model, device="cuda")
    assert model.get_base_model().__dict__[decoding._ATTR].failed is None
    assert decoding.graph_count(model) == 1
    assert torch.equal(graphed.sequences, eager.sequences)
    assert _max_score_diff(graphed, eager) <= tolerance
    return graphed, eager


@pytest.mark.gpu
@pytest.mark.parametrize("family", GRAPHED)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_graphed_generate_matches_eager(family, dtype, model_dirs):
    model, _ = _lora_model(model_dirs[family], device="cuda", dtype=dtype)
    eager = _gpu_graphed_matches_eager(model, 1e-5 if dtype == torch.float32 else 1e-2)[1]
    again = _generate(model, device="cuda")  # replays (the cache is reused or captured anew)
    assert torch.equal(again.sequences, eager.sequences)


@pytest.mark.gpu
def test_gpu_sliding_window_fills_during_a_graphed_call(model_dirs):
    """Real graphs on gemma2 (window 16) past the window: replays while it has room, eager steps
    after; the tokens equal eager static-cache decoding (the replays' counting is right)."""
    model, _ = _lora_model(model_dirs["gemma2"], device="cuda", dtype=torch.float32)
    FastLanguageModel.for_inference(model, use_cuda_graphs=False)
    eager = _generate(model, device="cuda", new=16, cache_implementation="static")
    FastLanguageModel.for_inference(model)
    graphed = _generate(model, device="cuda", new=16)
    assert model.get_base_model().__dict__[decoding._ATTR].failed is None
    assert decoding.graph_count(model) == 1
    assert torch.equal(graphed.sequences, eager.sequences)
    assert _max_score_diff(graphed, eager) <= 1e-5
    again = _generate(model, device="cuda", new=16)  # the kept cache, reset: replays again
    assert torch.equal(again.sequences, eager.sequences)


@pytest.mark.gpu
def test_gpu_graphed_generate_qlora(model_dirs):
    """A 4-bit (NF4) base: the decoding steps' fused small-M NF4 kernels inside the graph."""
    pytest.importorskip("bitsandbytes")
    model, _ = _lora_model(model_dirs["llama"], device="cuda", dtype=torch.bfloat16, load_in_4bit=True)
    graphed = _gpu_graphed_matches_eager(model, 1e-2)[0]
    with model.disable_adapter():
        off = _generate(model, device="cuda")
    assert _max_score_diff(off, graphed) > 1e-3
    # adapters changed in place between calls: the next call's prompt refreshes the bf16 casts
    # of the LoRA factors, which the graph reads
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(3.0)
    graphed = _generate(model, device="cuda")
    # the replays do not refresh the factors' bf16 casts (frozen_factor_copies): the copy
    # kernels of a call do not grow with its steps
    from torch.profiler import ProfilerActivity, profile

    def copy_kernels(new):
        _generate(model, device="cuda", new=new)  # (captures for this length first)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            _generate(model, device="cuda", new=new)
            torch.cuda.synchronize()
        return sum(1 for e in prof.events() if "multi_tensor_apply" in e.name)

    assert copy_kernels(4) == copy_kernels(12) > 0
    decoding.disable_graph_decoding(model)
    eager = _generate(model, device="cuda", cache_implementation="static")
    assert torch.equal(graphed.sequences, eager.sequences)
    assert _max_score_diff(graphed, eager) <= 1e-2


@pytest.mark.gpu
def test_gpu_deferred_stop_matches_eager(model_dirs, monkeypatch):
    """With graphs, transformers' DeferredStopCheck decides when to stop (read one step late, the
    step too many undone): rows that end on EOS at different steps match eager decoding, with the
    cache returned or not."""
    gen_utils = pytest.importorskip("transformers.generation.utils")
    base = getattr(gen_utils, "DeferredStopCheck", None)
    if base is None:
        pytest.skip("this transformers has no DeferredStopCheck")
    deferred = []
    real_init = base.__init__
    monkeypatch.setattr(base, "__init__", lambda self, *a, **k: deferred.append(1) or real_init(self, *a, **k))
    model, _ = _lora_model(model_dirs["llama"], device="cuda", dtype=torch.float32)

    def run(**kw):
        torch.manual_seed(0)
        ids = torch.randint(0, 256, (3, 6), device="cuda")
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                 do_sample=False, pad_token_id=0, **kw)
        return out if torch.is_tensor(out) else out.sequences

    FastLanguageModel.for_inference(model, use_cuda_graphs=False)
    free = run(eos_token_id=299, min_new_tokens=12)
    eos = int(free[0, 6 + 3])  # row 0 stops after 4 new tokens, the others where they meet it
    eager = run(eos_token_id=eos, cache_implementation="static")
    assert eager.shape[1] > 6 + 4 and eager[0, 10] == 0  # (row 0 padded after its EOS)
    FastLanguageModel.for_inference(model)
    assert torch.equal(run(eos_token_id=eos), eager)
    assert len(deferred) == 1
    assert torch.equal(run(eos_token_id=eos, return_dict_in_generate=True, output_scores=True), eager)
