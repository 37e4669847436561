"""Route a peft LoRA model's gated MLPs and attention projections through fastft's fused LoRA
functions (fastft/ops/lora.py).

    apply_fused_lora(model)   -> report dict; called by FastLanguageModel.get_peft_model
    remove_fused_lora(model)  undoes it

How the patch works (instance attributes only; nothing is changed on any class, so other
models in the process and peft itself are untouched, and removal is `del module.forward`):

* Gated MLP (a module with gate_proj / up_proj / down_proj and act_fn): its `forward` becomes
  one fused autograd node (lora_mlp), tiled over tokens for long inputs.
* Attention (q_proj / k_proj / v_proj / o_proj): the attention's own forward is NOT replaced, so
  rope, caches and the attention interface stay exactly transformers' code for every family.
  Instead the q/k/v projection modules get a forward that computes all three projections of
  their input in one fused node (lora_qkv) when the first of them is called, and hands the
  other two their results when they are then called with the same input tensor. o_proj gets
  the single-projection fused node (lora_linear).

Everything is read from peft's modules at call time: the active adapter(s), their A, B and
scaling. A call falls back to the module's normal forward (peft's path) whenever fusing would
not compute exactly what peft computes: adapters disabled (`disable_adapter()`, used by TRL as
the reference model) or merged, dropout > 0, DoRA or other LoRA variants, lora_bias,
fan_in_fan_out, a base layer that is neither a dense nn.Linear nor a bitsandbytes Linear4bit,
extra call arguments (e.g. peft's adapter_names mixed batches), and small inputs in eval mode
under no_grad (generation, where bitsandbytes' 4-bit GEMV is the better kernel).
Several active adapters are fused by stacking them into one rank-(r1+r2+…) term.
"""
from __future__ import annotations

import logging
import types
import weakref

import torch
from torch import nn

from fastft.offload import recomputing
from fastft.ops import lora as _lora_ops
from fastft.ops.lora import Base, Projection, lora_linear, lora_mlp, lora_qkv

logger = logging.getLogger(__name__)

# Below this many tokens an eval-mode no-grad call (generation) keeps peft's path.
NO_GRAD_MIN_TOKENS = 1024

_MARK = "_fastft_fused_lora"  # instance attribute: what we patched on this module


# --- reading peft's modules ------------------------------------------------------------------

def _is_lora_layer(module) -> bool:
    return "lora_A" in module._modules and hasattr(module, "get_base_layer")


# Parameters and submodules are read from nn.Module's own dicts: nn.Module.__getattr__ made a
# projection_of call cost ~45 us, and it runs 14 times per decoder layer and step. Anything
# not found there (a parametrization's property, say) falls back to getattr.

def _param(module, name):
    params = module._parameters
    return params[name] if name in params else getattr(module, name, None)


def _child(module, name):
    children = module._modules
    return children[name] if name in children else getattr(module, name, None)


# linear module -> (weight, bias, quant_state, Base) for 4-bit bases; weak, and outside the
# module so that copying or pickling a model never carries it along
_BASES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _quant_state_of(linear, weight):
    # bitsandbytes keeps a copy on the module: FSDP2's gathered weight has lost its own
    return getattr(weight, "quant_state", None) or getattr(linear, "quant_state", None)


def _base_of(linear) -> tuple[Base | None, str | None]:
    """(Base, None) for a dense nn.Linear or a bitsandbytes Linear4bit, else (None, why).
    The Base is kept on the module while its weight, bias and quant state stay the same objects,
    so what Base caches (a 4-bit weight's validated dequantisation) lasts across steps."""
    weight = _param(linear, "weight")
    if weight is None:
        return None, f"{type(linear).__name__} has no weight"
    bias = _param(linear, "bias")
    quant_state = _quant_state_of(linear, weight)
    kept = _BASES.get(linear)
    if kept is not None and kept[0] is weight and kept[1] is bias and kept[2] is quant_state:
        return kept[3], None
    if kept is not None:  # this module's weights were replaced, so probably others' were too
        forget_replaced_weights()
    if quant_state is not None:
        if getattr(quant_state, "quant_type", None) not in ("nf4", "fp4"):
            return None, f"unsupported quantisation {getattr(quant_state, 'quant_type', None)}"
        base = Base(weight, bias, quant_state)
        _BASES[linear] = (weight, bias, quant_state, base)
        return base, None
    if type(linear).__name__ not in ("Linear", "NonDynamicallyQuantizableLinear") \
            or not isinstance(linear, nn.Linear):
        return None, f"base layer {type(linear).__name__} is not a plain nn.Linear"
    if not weight.is_floating_point() or weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return None, f"base weight dtype {weight.dtype}"
    return Base(weight, bias), None


def forget_replaced_weights() -> None:
    """Drop what fastft caches for modules whose weight, bias or quant state is no longer the
    one cached. FSDP2's sharding (fastft.distributed.fsdp2_wrap, or accelerate's) replaces
    every parameter; without this the caches kept each replaced unsharded 4-bit weight alive
    until its layer next ran, so the first step began with the whole model twice in memory."""
    nf4 = _lora_ops._nf4_module()
    for linear, (weight, bias, quant_state, _) in list(_BASES.items()):
        current = _param(linear, "weight")
        if current is not weight or _param(linear, "bias") is not bias \
                or _quant_state_of(linear, current) is not quant_state:
            del _BASES[linear]
            if nf4 is not None:
                nf4.forget(quant_state)
    _PASS_PROJECTIONS.clear()  # its Projections hold Bases (and their weights) of the last pass


def projection_of(module) -> tuple[Projection | None, str | None]:
    """The fused view of one projection module as peft would compute it right now:
    (Projection, None), or (None, why peft's own path must run)."""
    if not _is_lora_layer(module):
        if isinstance(module, nn.Linear):
            base, why = _base_of(module)
            return (Projection(base) if base else None), why
        return None, f"{type(module).__name__} is not a Linear"
    if module.disable_adapters:
        return None, "adapters are disabled"
    if module.merged:
        return None, "adapters are merged"
    if getattr(module, "fan_in_fan_out", False):
        return None, "fan_in_fan_out"
    base_layer = module
    while "base_layer" in base_layer._modules:  # what peft's get_base_layer() returns
        base_layer = base_layer._modules["base_layer"]
    base, why = _base_of(base_layer)
    if base is None:
        return None, why
    terms = []
    variants = getattr(module, "lora_variant", {}) or {}
    all_A = _child(module, "lora_A")._modules
    all_B = _child(module, "lora_B")._modules
    dropouts = _child(module, "lora_dropout")._modules
    for name in module.active_adapters:
        if name not in all_A:
            continue
        if name in variants or getattr(module, "use_dora", {}).get(name, False):
            return None, f"adapter {name!r} is a LoRA variant (e.g. DoRA)"
        if not isinstance(dropouts[name], nn.Identity):
            return None, f"adapter {name!r} has lora_dropout > 0"
        lora_A, lora_B = all_A[name], all_B[name]
        if not isinstance(lora_A, nn.Linear) or not isinstance(lora_B, nn.Linear):
            return None, f"adapter {name!r} is not a linear LoRA"
        if _param(lora_A, "bias") is not None or _param(lora_B, "bias") is not None:
            return None, f"adapter {name!r} has lora_bias"
        terms.append((_param(lora_A, "weight"), _param(lora_B, "weight"), float(module.scaling[name])))
    if not terms:
        return Projection(base), None
    if len(terms) == 1:
        A, B, s = terms[0]
        return Projection(base, A, B, s), None
    # Several active adapters: one stacked term, scalings folded into B (autograd sees the cat).
    dtype = terms[0][0].dtype
    A = torch.cat([a.to(dtype) for a, _, _ in terms], dim=0)
    B = torch.cat([b.to(dtype) * s for _, b, s in terms], dim=1)
    return Projection(base, A, B, 1.0), None


# id(module) -> (module, peft state, Projection or None) for the current forward pass. A layer's
# projections are read in its forward and again in its recompute (~40 us a read, 14 reads per
# layer and step); within one pass they only change if peft's adapter state does, which the
# cached state (disabled / active / merged, read straight from the module's dict) catches.
_PASS_PROJECTIONS: dict = {}
_PROJECTIONS_PASS = [0]


def _peft_state(module):
    d = module.__dict__
    active = d.get("_active_adapter")
    merged = d.get("merged_adapters")
    scaling = d.get("scaling")  # peft's scale_layer / unscale_layer edit it in place
    return (d.get("_disable_adapters"), tuple(active) if isinstance(active, list) else active,
            len(merged) if merged is not None else None,
            tuple(scaling.values()) if isinstance(scaling, dict) else None)


def _projection(module) -> Projection | None:
    """projection_of(module)[0], read once per forward pass (see _PASS_PROJECTIONS)."""
    current = _lora_ops._FORWARD_PASS[0]
    if not current:  # outside a hooked model's pass: nothing is cached
        return projection_of(module)[0]
    if _PROJECTIONS_PASS[0] != current:
        _PASS_PROJECTIONS.clear()
        _PROJECTIONS_PASS[0] = current
    state = _peft_state(module)
    hit = _PASS_PROJECTIONS.get(id(module))
    if hit is not None and hit[0] is module and hit[1] == state:
        return hit[2]
    proj = projection_of(module)[0]
    _PASS_PROJECTIONS[id(module)] = (module, state, proj)
    return proj


def _generation_step(module, x) -> bool:
    """Eval mode, no grad and few tokens: generation, where peft's path (bitsandbytes' 4-bit
    GEMV for QLoRA) is the better one, except for the decoding steps of NF4 layers (see
    _nf4_decoding). Training mode always fuses, so a checkpointed layer's no-grad forward and
    its recomputation compute exactly the same thing."""
    return (not module.training and not torch.is_grad_enabled()
            and x.numel() // max(1, x.shape[-1]) < NO_GRAD_MIN_TOKENS
            and not _nf4_decoding(module, x))


def _nf4_decoding(module, x) -> bool:
    """At most 16 rows (one token per sequence), bf16/fp16, through an NF4 layer on a GPU:
    fastft's fused path multiplies these straight from the packed weight (nf4's small-M
    kernel), faster than bitsandbytes' GEMV on the H200 (bench/RESULTS.md, "NF4 matmul").
    FASTFT_NF4_FUSED_SMALL_M=0 leaves them to peft's path."""
    rows = x.numel() // max(1, x.shape[-1])
    if x.device.type != "cuda" or not _lora_ops.small_m_case(rows, _lora_ops._compute_dtype(x)):
        return False
    linear = getattr(module, "gate_proj", module)  # the MLP: its projections share the case
    linear = getattr(linear, "base_layer", linear)
    quant_state = _quant_state_of(linear, _param(linear, "weight"))
    return getattr(quant_state, "quant_type", None) == "nf4"


# --- activation detection ---------------------------------------------------------------------

def activation_kind(act_fn) -> str | None:
    """'swiglu' / 'geglu' / 'geglu_tanh' when act_fn computes SiLU / erf-GELU / tanh-GELU
    (checked numerically, so any class that implements them is recognised), else None."""
    if act_fn is None:
        return None
    probe = torch.linspace(-6.0, 6.0, 97, dtype=torch.float64)
    try:
        with torch.no_grad():
            got = act_fn(probe).double()
    except Exception:
        return None
    candidates = {
        "swiglu": torch.nn.functional.silu(probe),
        "geglu": torch.nn.functional.gelu(probe),
        "geglu_tanh": torch.nn.functional.gelu(probe, approximate="tanh"),
    }
    for kind, ref in candidates.items():
        if got.shape == ref.shape and torch.allclose(got, ref, atol=1e-6, rtol=1e-5):
            return kind
    return None


# --- the patched forwards ---------------------------------------------------------------------

def _class_forward(module, *args, **kwargs):
    return type(module).forward(module, *args, **kwargs)


def _fused_mlp_forward(self, x, *args, **kwargs):
    if args or kwargs or _generation_step(self, x):
        return _class_forward(self, x, *args, **kwargs)
    gate = _projection(self.gate_proj)
    up = _projection(self.up_proj)
    down = _projection(self.down_proj)
    if gate is None or up is None or down is None:
        return _class_forward(self, x)
    mark = getattr(self, _MARK)
    # In an offloaded checkpoint's recompute the layer output is only a root for backward.
    output_needed = not (mark.get("output_into_residual") and recomputing())
    return lora_mlp(x, gate, up, down, activation=mark["activation"],
                    tile_tokens=mark.get("tile_tokens", "auto"), output_needed=output_needed)


def _version_of(x) -> int:
    """x's version counter; inference-mode tensors have none (-1: identity alone must do)."""
    return -1 if x.is_inference() else x._version


class _QKVGroup:
    """Shared by the q, k and v projections of one attention module: holds the results of one
    fused call until each projection has taken its own."""

    def __init__(self, q, k, v):
        self.modules = (q, k, v)
        self.pending = None  # [x, x._version, q_out, k_out, v_out] with taken outputs set None

    def take(self, role, x):
        p = self.pending
        if p is not None and p[0] is x and p[1] == _version_of(x) and p[2 + role] is not None:
            out = p[2 + role]
            p[2 + role] = None
            if p[2] is None and p[3] is None and p[4] is None:
                self.pending = None
            return out
        return None


def _fused_qkv_forward(self, x, *args, **kwargs):
    mark = getattr(self, _MARK)
    group, role = mark["group"], mark["role"]
    if args or kwargs:
        group.pending = None
        return _class_forward(self, x, *args, **kwargs)
    out = group.take(role, x)
    if out is not None:
        return out
    group.pending = None
    if _generation_step(self, x):
        return _class_forward(self, x)
    projs = [_projection(m) for m in group.modules]
    if any(p is None for p in projs):
        return _class_forward(self, x)
    outs = list(lora_qkv(x, *projs, skip_when_attention_reuses=mark.get("outputs_feed_attention_only", False)))
    mine = outs[role]
    outs[role] = None
    group.pending = [x, _version_of(x), *outs]
    return mine


def _fused_linear_forward(self, x, *args, **kwargs):
    if args or kwargs or _generation_step(self, x):
        return _class_forward(self, x, *args, **kwargs)
    proj = _projection(self)
    if proj is None:
        return _class_forward(self, x)
    return lora_linear(x, proj, reuse_in_recompute=getattr(self, _MARK).get("reuse", False))


def _install(module, forward, mark):
    module.forward = types.MethodType(forward, module)
    object.__setattr__(module, _MARK, mark)


# --- public entry points ----------------------------------------------------------------------

_NO_ADAPTER = "no LoRA adapter on its projections"  # nothing to fuse: not reported as skipped


def _unfusable_reason(modules) -> str | None:
    """Why these projections cannot be fused as configured now (None: they can)."""
    if not any(_is_lora_layer(m) for m in modules):
        return _NO_ADAPTER
    for m in modules:
        _, why = projection_of(m)
        if why is not None:
            return why
    return None


def _family(model):
    from fastft.models.families import family_for

    return family_for(getattr(getattr(model, "config", None), "model_type", None))


def _mlp_output_into_residual(model) -> bool:
    """Whether the model's family adds the MLP output straight into the residual stream
    (families.py); unknown models: False, the safe answer."""
    family = _family(model)
    return bool(family is not None and family.mlp_output_into_residual)


def _qkv_feed_attention_only(model) -> bool:
    """Whether q/k/v reach attention only through RoPE and reshapes (no q/k norms, which read
    their input's values in backward); unknown models: False."""
    family = _family(model)
    return bool(family is not None and not family.qk_norm)


def apply_fused_lora(model, mlp: bool = True, attention: bool = True,
                     tile_tokens: int | None | str = "auto") -> dict:
    """Route the LoRA-wrapped gated MLPs and q/k/v/o projections of `model` (a peft model or a
    transformers model holding peft LoRA layers) through fastft's fused LoRA functions.

    For families whose MLP output goes straight into the residual sum, the fused MLP skips its
    down projection's matmul while an offloaded checkpoint recomputes the layer (the output
    values are not needed there, only the graph).

    Returns {"mlp": n, "qkv": n, "o_proj": n, "skipped": {module name: reason}}. Modules that
    cannot be fused (e.g. lora_dropout > 0) keep peft's path; one log line says why.
    Calling it again is harmless (already patched modules are left as they are)."""
    report = {"mlp": 0, "qkv": 0, "o_proj": 0, "skipped": {}}
    into_residual = _mlp_output_into_residual(model)
    qkv_feed_attention_only = _qkv_feed_attention_only(model)
    _hook_forward_passes(model)
    for name, module in model.named_modules():
        if mlp and all(hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj")) \
                and getattr(module, _MARK, None) is None:
            projs = (module.gate_proj, module.up_proj, module.down_proj)
            why = _unfusable_reason(projs)
            kind = activation_kind(getattr(module, "act_fn", None))
            if why is None and kind is None:
                why = "its activation is not SiLU / GELU"
            if why is None:
                _install(module, _fused_mlp_forward, {"activation": kind, "tile_tokens": tile_tokens,
                                                      "output_into_residual": into_residual})
                report["mlp"] += 1
            elif why != _NO_ADAPTER:
                report["skipped"][name] = why
        if attention and all(hasattr(module, a) for a in ("q_proj", "k_proj", "v_proj")):
            projs = (module.q_proj, module.k_proj, module.v_proj)
            if getattr(projs[0], _MARK, None) is None:
                why = _unfusable_reason(projs)
                if why is None:
                    group = _QKVGroup(*projs)
                    for role, proj in enumerate(projs):
                        _install(proj, _fused_qkv_forward, {
                            "group": group, "role": role,
                            "outputs_feed_attention_only": qkv_feed_attention_only})
                    report["qkv"] += 1
                elif why != _NO_ADAPTER:
                    report["skipped"][name + ".q_proj/k_proj/v_proj"] = why
            o_proj = getattr(module, "o_proj", None)
            if o_proj is not None and getattr(o_proj, _MARK, None) is None:
                why = _unfusable_reason((o_proj,))
                if why is None:
                    # its output is stashed by offloaded checkpoints, not recomputed (one GEMM
                    # saved per layer; the attention before it is reused the same way)
                    _install(o_proj, _fused_linear_forward, {"single": True, "reuse": True})
                    report["o_proj"] += 1
                elif why != _NO_ADAPTER:
                    report["skipped"][name + ".o_proj"] = why
    if report["skipped"]:
        reasons = sorted(set(report["skipped"].values()))
        logger.warning("fastft: %d module(s) keep peft's LoRA path (%s)", len(report["skipped"]),
                       "; ".join(reasons))
    return report


_PASS_HOOK = "_fastft_forward_pass_hook"


def _hook_forward_passes(model) -> None:
    """Each forward of the model (or of a transformers model inside it, when called directly)
    starts a new pass for the cached LoRA factor casts (fastft.ops.lora.new_forward_pass)."""
    from transformers import PreTrainedModel

    from fastft.ops.lora import new_forward_pass

    for m in model.modules():
        if (m is model or isinstance(m, PreTrainedModel)) and _PASS_HOOK not in m.__dict__:
            object.__setattr__(m, _PASS_HOOK, m.register_forward_pre_hook(new_forward_pass))


def remove_fused_lora(model) -> int:
    """Undo apply_fused_lora; returns how many modules were restored."""
    n = 0
    for m in model.modules():
        handle = m.__dict__.pop(_PASS_HOOK, None)
        if handle is not None:
            handle.remove()
    for module in model.modules():
        if getattr(module, _MARK, None) is not None:
            module.__dict__.pop("forward", None)
            object.__delattr__(module, _MARK)
            n += 1
    return n


def is_fused(module) -> bool:
    return getattr(module, _MARK, None) is not None
