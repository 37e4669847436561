"""CUDA-graph decoding for `generate` (installed by FastLanguageModel.for_inference).

At one new token per sequence, eager decoding is bound by the host, not the GPU: an 8-layer
Llama-3.1-8B-shaped QLoRA forward takes ~18 ms of Python and kernel launches on the H200's
host against ~2 ms of GPU work (bench/RUNS.md, run 73). So for_inference has `generate` use
transformers' static KV cache, whose decoding steps have fixed shapes and fixed addresses
(input_ids (B, 1), a 4-D mask as long as the cache, the cache's tensors updated in place), and
replays each such step from a CUDA graph captured the first time its shapes are seen.

What a graph bakes in, and how it stays correct:
- Addresses: of the cache (a graph belongs to one cache object: weakly held, its tensors'
  addresses checked at each step), and of the parameters and buffers, which are part of a
  "fingerprint" of the model taken when each `generate` call starts, with the train / eval
  flags, peft's adapter state (disable_adapter(), set_adapter(), merges, scalings) and the
  FASTFT_* settings. Any change drops the graphs; the next decoding step captures again.
- Values of parameters are read at replay, so adapters trained in place between calls are used.
- The cache's in-place counters (StaticLayer.cumulative_length): capture needs warm-up forwards,
  which advance them, so they are saved before and put back after.
- Sliding-window layers (StaticSlidingWindowLayer) also count in a Python int, which picks the
  branch of their update and which a replay does not advance: steps are graphed only while every
  window has room for the new token (update's in-place branch), and after each replay the ints
  are set as the step's forward would have set them. Steps past a full window run eagerly.
- One static cache is kept across `generate` calls (transformers would make a new one per call,
  and a new cache means new graphs: at 32 layers two warm-up forwards and a capture, ~0.2 s per
  call). A call of the same batch size and cache length takes it again, reset in place, unless
  something outside still holds it (e.g. a kept `return_dict_in_generate` output): then the
  call gets a new one, as in transformers, and that becomes the kept cache.
- While a graphed generate call runs, transformers' DeferredStopCheck may decide when to stop
  (see _allow_deferred_stop_checks), so the host does not wait for the GPU at every step.
Steps that do not fit run eagerly, exactly as before: grad enabled, train mode, more than one
new token per sequence (the prompt), a cache other than a plain StaticCache of full-attention
and sliding-window layers, a full sliding window, extra model inputs, or outputs asked for
besides the logits; and whole calls whose cache tensors move between steps (beam search).
Graphs are used only inside `generate`, never in a user's own forward loop.
"""
from __future__ import annotations

import functools
import inspect
import logging
import os
import sys
import weakref

import torch

logger = logging.getLogger(__name__)

_ATTR = "_fastft_graph_decoding"
# Forward keyword arguments a graphed step accepts: tensors copied into the graph's inputs...
_TENSOR_INPUTS = ("input_ids", "attention_mask", "position_ids", "cache_position")
# ...and plain values, part of the graph's key (outputs beyond the logits are not supported).
_PLAIN_INPUTS = ("use_cache", "return_dict", "logits_to_keep", "output_attentions",
                 "output_hidden_states")
_CACHE_NAMES = ("past_key_values", "cache")  # transformers <= 5.17 / later
# Marks the caches this module makes for generate (the ones its deferred stop check is for).
_GRAPHED_CACHE = "_fastft_graph_decoding"
# The causal LM's methods enable_graph_decoding replaces on the instance (undone by disable).
_WRAPPED = ("forward", "generate", "_prepare_static_cache")
# StaticCache layers a graph can follow; a sliding window's host-side int counter is kept by
# _sliding_counters (see the module's doc)
_SLIDING_LAYER = "StaticSlidingWindowLayer"
_GRAPHED_LAYERS = ("StaticLayer", _SLIDING_LAYER)
_SLIDING_COUNTER = "cumulative_length_int"
# Tests on CPU set this: a "graph" then re-runs the forward on its inputs' buffers at each
# replay, which exercises everything here except the capture itself.
_EMULATE_ON_CPU = False


def graph_decoding_supported(model) -> str | None:
    """None when for_inference can decode `model` (a causal LM, peft-wrapped or not) with CUDA
    graphs, else why not."""
    if os.environ.get("FASTFT_CUDA_GRAPHS", "1") == "0":
        return "FASTFT_CUDA_GRAPHS=0"
    lm = _causal_lm(model)
    if lm is None or not callable(getattr(lm, "generate", None)):
        return "not a model with generate()"
    device = next((p.device for p in lm.parameters()), None)
    if device is None or not _graph_device(device):
        return "the model is not on a CUDA device"
    config = lm.config
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder models keep the dynamic cache"
    if not getattr(lm, "_can_compile_fullgraph", False):
        return f"{type(lm).__name__} does not support transformers' static cache"
    if getattr(config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return f"attention {getattr(config, '_attn_implementation', None)!r} (graphs: sdpa or eager)"
    kinds = _static_layer_kinds(config)
    if kinds is None or not set(kinds) <= set(_GRAPHED_LAYERS):
        return f"cache layers {sorted(set(kinds or ()) - set(_GRAPHED_LAYERS))} (graphs: full or sliding-window attention)"
    return None


def enable_graph_decoding(model) -> bool:
    """Make `generate` on `model` decode with CUDA graphs (see the module's doc). Returns whether
    it did; when not, says why once in the log and changes nothing."""
    why = graph_decoding_supported(model)
    if why is not None:
        logger.info(f"fastft: generate keeps eager decoding: {why}.")
        return False
    lm = _causal_lm(model)
    if _ATTR in lm.__dict__:
        return True
    gen_config = getattr(lm, "generation_config", None)
    decoder = _GraphDecoder(lm, gen_config)
    if gen_config is not None:
        if gen_config.cache_implementation is None:
            gen_config.cache_implementation = "static"
        gen_config.disable_compile = True  # transformers would torch.compile for a static cache
    object.__setattr__(lm, _ATTR, decoder)

    # functools.wraps keeps the original signatures visible: generate reads forward's (whether
    # it takes logits_to_keep, attention_mask, position_ids) to decide what to pass.
    @functools.wraps(decoder.forward)
    def forward(*args, **kwargs):
        if decoder.generating and not args:
            output = decoder.run(lm, kwargs)
            if output is not None:
                return output
        return decoder.forward(*args, **kwargs)

    @functools.wraps(decoder.generate)
    def generate(*args, **kwargs):
        decoder.begin_generate(lm, kwargs)
        decoder.generating += 1
        undo = _allow_deferred_stop_checks()
        try:
            with _nf4_ops().frozen_weights():  # (the NF4 kernels' early loads: see there)
                return decoder.generate(*args, **kwargs)
        finally:
            decoder.generating -= 1
            undo()

    lm.forward = forward
    lm.generate = generate
    if decoder.prepare_static_cache is not None:
        @functools.wraps(decoder.prepare_static_cache)
        def _prepare_static_cache(*args, **kwargs):
            return decoder.static_cache(lm, args, kwargs)

        lm._prepare_static_cache = _prepare_static_cache
    return True


def disable_graph_decoding(model) -> bool:
    """Undo enable_graph_decoding (for_training calls it): eager decoding, the generation config
    as it was, the graphs and their memory released."""
    lm = _causal_lm(model)
    decoder = None if lm is None else lm.__dict__.get(_ATTR)
    if decoder is None:
        return False
    decoder.graphs.clear()
    decoder.kept_cache = None
    for name in _WRAPPED:
        lm.__dict__.pop(name, None)
        if name in decoder.own_methods:
            lm.__dict__[name] = decoder.own_methods[name]
    if decoder.gen_config is not None:
        decoder.gen_config.cache_implementation, decoder.gen_config.disable_compile = decoder.saved_config
    object.__delattr__(lm, _ATTR)
    return True


def graph_count(model) -> int:
    """How many decoding graphs `model` holds now (for tests and benchmarks)."""
    lm = _causal_lm(model)
    decoder = None if lm is None else lm.__dict__.get(_ATTR)
    return 0 if decoder is None else len(decoder.graphs)


# --- helpers ------------------------------------------------------------------------------------

def _causal_lm(model):
    """The transformers model whose forward generate calls (under peft's wrappers)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _static_layer_kinds(config):
    """Class names of the layers transformers' StaticCache builds for `config` (allocated lazily,
    so this costs nothing), or None when it cannot build one."""
    try:
        from transformers import StaticCache

        cache = StaticCache(config=config, max_cache_len=8)
    except Exception:
        return None
    return [type(layer).__name__ for layer in cache.layers]


def _lora_ops():
    from fastft.ops import lora

    return lora


def _nf4_ops():
    from fastft.ops import nf4

    return nf4


def _model_fingerprint(lm):
    """What a captured graph depends on besides its inputs (see the module's doc)."""
    from fastft.lora import _peft_state

    parts = []
    for m in lm.modules():
        d = m.__dict__
        parts.append(m.training)
        if "_disable_adapters" in d or "_active_adapter" in d:
            parts.append(_peft_state(m))
    parts.extend(t.data_ptr() for t in lm.parameters())
    parts.extend(t.data_ptr() for t in lm.buffers())
    parts.append(tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("FASTFT_"))))
    return tuple(parts)


def _cache_tensors(cache):
    """The cache's tensors as (owner, attribute name, tensor): its layers' keys / values and
    in-place counters (cumulative_length), and any tensor the cache object holds itself."""
    found = []
    for owner in [cache, *getattr(cache, "layers", ())]:
        for name, value in vars(owner).items():
            if torch.is_tensor(value):
                found.append((owner, name, value))
    return found


def _sliding_counters(cache):
    """[(layer, its Python-int token count)] of the cache's sliding-window layers."""
    return [(layer, getattr(layer, _SLIDING_COUNTER)) for layer in cache.layers
            if type(layer).__name__ == _SLIDING_LAYER]


def _graph_device(device) -> bool:
    return device.type == "cuda" or (_EMULATE_ON_CPU and device.type == "cpu")


@functools.lru_cache(maxsize=None)
def _deferring_subclass(base):
    """transformers' DeferredStopCheck, also allowed where the cache is one this module made."""

    class GraphedDeferredStopCheck(base):
        fastft_graphed = True

        @staticmethod
        def is_supported(device, cache, cache_is_returned, is_assistant, *args, **kwargs):
            # (CUDA only, not the emulated CPU graphs: it records CUDA events, which a CPU lacks)
            if getattr(cache, _GRAPHED_CACHE, False) and not is_assistant and device.type == "cuda":
                # (a returned cache must be croppable: the one step too many is undone on it)
                return bool(getattr(cache, "is_croppable", False)) or not cache_is_returned
            return base.is_supported(device, cache, cache_is_returned, is_assistant, *args, **kwargs)

    return GraphedDeferredStopCheck


def _allow_deferred_stop_checks():
    """For one graphed generate call: let transformers' DeferredStopCheck decide when to stop.
    It reads "all sequences finished?" one step late, through an asynchronous copy, so that the
    host queues the next step's graph while the GPU runs this one; the one step too many is then
    undone (its token dropped; a returned cache cropped). transformers enables it on MPS only;
    with graphs a CUDA step is ~6 ms of GPU against ~1 ms of generate's Python, which the
    synchronous check ran one after the other (bench/RUNS.md, runs 90-93). Other models'
    calls keep the check transformers chooses: the subclass defers only for this module's caches.
    Returns the undo."""
    try:
        from transformers.generation import utils as gen_utils
    except ImportError:
        return lambda: None
    base = getattr(gen_utils, "DeferredStopCheck", None)
    if base is None or getattr(base, "fastft_graphed", False) \
            or not callable(getattr(base, "is_supported", None)):
        return lambda: None  # (a transformers without it, or a call inside another one)
    gen_utils.DeferredStopCheck = _deferring_subclass(base)

    def undo():
        if gen_utils.DeferredStopCheck is _deferring_subclass(base):
            gen_utils.DeferredStopCheck = base
    return undo


class _Graph:
    """One captured decoding step: its input buffers, the output it writes, the cache it uses."""

    __slots__ = ("replay", "inputs", "output_type", "output_fields", "cache_ref", "cache_ptrs")


class _GraphDecoder:
    def __init__(self, lm, gen_config):
        self.forward = lm.forward   # transformers' (or fastft's patched) forward, bound
        self.generate = lm.generate
        # generate's maker of a new StaticCache per call (None in a transformers without it)
        self.prepare_static_cache = getattr(lm, "_prepare_static_cache", None)
        self.own_methods = {k: lm.__dict__[k] for k in _WRAPPED if k in lm.__dict__}
        self.gen_config = gen_config
        self.saved_config = None if gen_config is None else (gen_config.cache_implementation,
                                                             gen_config.disable_compile)
        self.graphs: dict = {}
        self.fingerprint = None
        self.kept_cache = None     # (key, StaticCache) reused by the next generate call
        self.generating = 0        # > 0 inside generate
        self.eager_call = False    # this generate call decodes eagerly (see begin_generate, run)
        self.failed: str | None = None  # why a capture failed: eager from then on

    def begin_generate(self, lm, kwargs):
        # adapters trained in place since the last call: the graphs read the factors' cast
        # copies, which they do not refresh themselves (frozen_factor_copies)
        _lora_ops().refresh_factor_copies()
        fingerprint = _model_fingerprint(lm)
        if fingerprint != self.fingerprint:
            self.graphs.clear()
            self.kept_cache = None  # (the model may have moved device or dtype)
            self.fingerprint = fingerprint
        # Beam search reorders the cache between steps with index_select, i.e. into new tensors,
        # which a graph cannot follow: every step would capture again (3 forwards' cost each).
        config = kwargs.get("generation_config") or self.gen_config
        self.eager_call = (kwargs.get("num_beams", getattr(config, "num_beams", 1)) or 1) > 1

    def static_cache(self, lm, args, kwargs):
        """generate's StaticCache for this call: the kept one, reset, where it fits and nothing
        else holds it; else a new one from transformers' own method, kept from then on."""
        make = self.prepare_static_cache
        try:
            bound = inspect.signature(make).bind(*args, **kwargs).arguments
            batch, length = int(bound["batch_size"]), int(bound["max_cache_len"])
            plain = bound["cache_implementation"] == "static" and bound.get("prefill_chunk_size") is None
        except (TypeError, KeyError, ValueError):
            return make(*args, **kwargs)
        if not plain or getattr(lm.config, "is_encoder_decoder", False):
            return make(*args, **kwargs)
        # transformers sizes a static cache to the longest call so far (fewer recompilations)
        length = max(length, getattr(lm, "_previous_max_cache_length", -1))
        key = (batch, length)
        if self.kept_cache is not None and self.kept_cache[0] == key:
            cache = self.kept_cache[1]
            # Held by anyone else (resetting it would change it under them)? A fresh object
            # referenced the same way (a tuple, a name, getrefcount's argument) is the baseline,
            # so the check does not depend on how an interpreter counts those references.
            probe_tuple = (key, object())
            probe = probe_tuple[1]
            if sys.getrefcount(cache) <= sys.getrefcount(probe):
                cache.reset()  # in place: same tensors, so the step's graphs stay valid
                lm._previous_max_cache_length = length
                return cache
        self.kept_cache = None  # (dropped before the new one is allocated)
        cache = make(*args, **kwargs)
        if type(cache).__name__ == "StaticCache":
            self.kept_cache = (key, cache)
            setattr(cache, _GRAPHED_CACHE, True)
        return cache

    # -- one decoding step

    def step_key(self, lm, kwargs):
        """(key, cache, tensors) when this forward call can run as a graph, else None."""
        if torch.is_grad_enabled() or lm.training or self.failed is not None or self.eager_call:
            return None
        ids = kwargs.get("input_ids")
        if not torch.is_tensor(ids) or ids.dim() != 2 or ids.shape[1] != 1:
            return None
        if not _graph_device(ids.device):
            return None
        cache_name = next((n for n in _CACHE_NAMES if kwargs.get(n) is not None), None)
        cache = kwargs.get(cache_name) if cache_name else None
        if type(cache).__name__ != "StaticCache" or not cache.layers:
            return None
        for layer in cache.layers:
            kind = type(layer).__name__
            if kind not in _GRAPHED_LAYERS or not getattr(layer, "is_initialized", False) \
                    or layer.keys.device != ids.device:
                return None
            if kind == _SLIDING_LAYER:
                count = getattr(layer, _SLIDING_COUNTER, None)
                if type(count) is not int or count + ids.shape[1] > layer.max_cache_len:
                    return None  # a full window: update's other branches (roll, cat) run eagerly
        tensors, plain = {}, []  # tensors: {(name,) or (name, key in a dict of masks): tensor}
        for name, value in kwargs.items():
            if name == cache_name or value is None:
                continue
            if name in _TENSOR_INPUTS and torch.is_tensor(value):
                tensors[(name,)] = value
            elif name == "attention_mask" and isinstance(value, dict) \
                    and all(torch.is_tensor(v) for v in value.values()):
                tensors.update(((name, k), v) for k, v in value.items())  # one mask per layer kind
            elif name in _PLAIN_INPUTS and not torch.is_tensor(value):
                if name.startswith("output_") and value:
                    return None
                if name == "return_dict" and not value:
                    return None
                plain.append((name, value))
            else:
                return None  # an input the graph would not copy (embeddings, images, ...)
        for path, t in tensors.items():
            if t.device != ids.device:
                return None
            if path[0] == "attention_mask" and (
                    t.dim() != 4 or t.shape[-1] not in {layer.keys.shape[2] for layer in cache.layers}):
                return None  # a 2-D mask grows each step: only transformers' 4-D static ones fit
        key = (tuple((p, tuple(t.shape), t.dtype) for p, t in sorted(tensors.items())),
               tuple(sorted(plain)), cache_name, id(cache), torch.is_inference_mode_enabled())
        return key, cache, tensors

    def run(self, lm, kwargs):
        step = self.step_key(lm, kwargs)
        if step is None:
            return None
        key, cache, tensors = step
        graph = self.graphs.get(key)
        if graph is not None and graph.cache_ref() is not cache:
            del self.graphs[key]
            graph = None
        elif graph is not None and graph.cache_ptrs != [t.data_ptr() for _, _, t in _cache_tensors(cache)]:
            # the cache's tensors were replaced between steps (as beam search's reorder does):
            # they may move again at every step, so the rest of this call decodes eagerly
            del self.graphs[key]
            self.eager_call = True
            return None
        if graph is None:
            # Graphs of other caches are of earlier generate calls (transformers 5.17 makes a new
            # StaticCache per call, so each call captures again): released before this capture.
            for stale in [k for k, g in self.graphs.items() if g.cache_ref() is not cache]:
                del self.graphs[stale]
            graph = self.capture(kwargs, cache, tensors)
            if graph is None:
                return None
            self.graphs[key] = graph
        for path, value in tensors.items():
            graph.inputs[path].copy_(value)
        sliding = _sliding_counters(cache)
        graph.replay()
        for layer, count in sliding:  # what the step's update would have counted
            setattr(layer, _SLIDING_COUNTER, count + tensors[("input_ids",)].shape[1])
        fields = {k: (cache if v is _CACHE else v.clone() if torch.is_tensor(v) else v)
                  for k, v in graph.output_fields.items()}
        return graph.output_type(**fields)

    def capture(self, kwargs, cache, tensors):
        inputs = {path: t.clone() for path, t in tensors.items()}
        call = dict(kwargs)
        for path, buffer in inputs.items():
            if len(path) == 1:
                call[path[0]] = buffer
            else:
                call[path[0]] = dict(call[path[0]]) if call[path[0]] is kwargs[path[0]] else call[path[0]]
                call[path[0]][path[1]] = buffer
        counters = [(owner, name, t.clone()) for owner, name, t in _cache_tensors(cache)
                    if name not in ("keys", "values")]
        sliding = _sliding_counters(cache)

        def restore_counters():
            for owner, name, saved in counters:
                getattr(owner, name).copy_(saved)
            for layer, count in sliding:
                setattr(layer, _SLIDING_COUNTER, count)

        def warm_up():  # lazy inits, workspaces, kernel plans (emulated too: tests the restore)
            for _ in range(2):
                self.forward(**call)
                restore_counters()

        emulate = inputs[("input_ids",)].device.type != "cuda"
        try:
            if emulate:
                warm_up()
                output = self.forward(**call)
                restore_counters()

                # (the cache weakly held, as by a real graph: a strong reference here, or to
                # the output that names it, would keep the next generate call from reusing it)
                cache_name = next(n for n in _CACHE_NAMES if kwargs.get(n) is cache)
                call_without_cache = {k: v for k, v in call.items() if k != cache_name}
                cache_ref = weakref.ref(cache)
                written = {k: v for k, v in output.items() if torch.is_tensor(v)}

                def replay():  # what a graph's replay does: recompute into the same output
                    again = self.forward(**call_without_cache, **{cache_name: cache_ref()})
                    for name, value in written.items():
                        value.copy_(again[name])
            else:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    warm_up()
                torch.cuda.current_stream().wait_stream(side)
                # Each graph has a memory pool of its own: one shared with graphs released since
                # tripped the caching allocator's "use_count > 0" assert in a capture (run 85).
                cuda_graph = torch.cuda.CUDAGraph()
                # (the LoRA factors' cast copies, refreshed by the warm-ups, are read as they are:
                # see fastft.ops.lora.frozen_factor_copies)
                with torch.cuda.graph(cuda_graph), _lora_ops().frozen_factor_copies():
                    output = self.forward(**call)
                # (the capture ran no kernel, so the tensor counters are as they were, but its
                # Python did count in the sliding windows' ints)
                restore_counters()
                replay = cuda_graph.replay
        except Exception as exc:  # a host sync or an op capture does not allow: stay eager
            restore_counters()
            self.failed = f"{type(exc).__name__}: {exc}"
            logger.warning(f"fastft: decoding with CUDA graphs failed ({self.failed.splitlines()[0]}); "
                           "generate decodes eagerly from now on (FASTFT_CUDA_GRAPHS=0 skips the attempt).")
            return None
        graph = _Graph()
        graph.replay = replay
        graph.inputs = inputs
        graph.output_type = type(output)
        graph.output_fields = {k: (_CACHE if v is cache else v) for k, v in output.items()}
        graph.cache_ref = weakref.ref(cache)
        graph.cache_ptrs = [t.data_ptr() for _, _, t in _cache_tensors(cache)]
        return graph


_CACHE = object()  # stands for the step's cache among a graph's output fields
