"""The generic decoder patcher: swaps fastft ops into transformers' modeling code, per class.

What it replaces, for a model whose family is described in families.py:
- `<Family>RMSNorm.forward`          -> fastft.ops.rms_norm (offset 1.0 for Gemma's 1 + w)
- `apply_rotary_pos_emb` (the modeling module's global, which the attention calls)
                                     -> fastft.ops.rope
- `<Family>MLP.forward`              -> gate_proj / up_proj (modules: LoRA-wrapped ones work),
                                        fastft.ops.swiglu or geglu, down_proj
- `<Family>ForCausalLM.forward`      -> with labels (and autograd on), the backbone's last hidden
                                        state goes straight into fastft.ops.fused_linear_cross_entropy
                                        on the shifted labels, so the [tokens, vocab] logits are never
                                        built; otherwise transformers' own forward runs unchanged.

Patches are set on classes / modules (never on instances), recorded in a registry of originals,
idempotent (patching twice changes nothing) and reversible with `unpatch_all()`.

Environment: FASTFT_RETURN_LOGITS=1 always runs transformers' head (logits returned even with
labels, e.g. for compute_metrics); =0 uses the fused loss even without autograd (evaluation
then returns logits=None). Unset: fused loss while training (autograd on), transformers' head
under torch.no_grad(), so evaluation gets its logits. A model can opt in per instance with
`model.fastft_return_logits = True`.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import logging
import os
import sys

import torch
from torch import nn

from fastft.models.families import Family, family_for

logger = logging.getLogger("fastft")

# ---------------------------------------------------------------- registry of originals

_MISSING = object()
# (id(owner), attribute) -> (owner, attribute, original value or _MISSING when inherited)
_ORIGINALS: dict[tuple[int, str], tuple[object, str, object]] = {}


def _set_patch(owner, name: str, new) -> bool:
    """Replace owner.name by `new` once; returns False when it was already patched."""
    key = (id(owner), name)
    if key in _ORIGINALS:
        return False
    _ORIGINALS[key] = (owner, name, owner.__dict__.get(name, _MISSING))
    setattr(owner, name, new)
    return True


def is_patched(owner, name: str) -> bool:
    return (id(owner), name) in _ORIGINALS


def original(owner, name: str):
    """The value owner.name had before fastft patched it (owner.name itself when not patched)."""
    entry = _ORIGINALS.get((id(owner), name))
    if entry is None:
        return getattr(owner, name)
    value = entry[2]
    if value is _MISSING:  # was inherited: look it up past the owner
        return getattr(super(owner, owner), name) if isinstance(owner, type) else None
    return value


def patched_names() -> list[str]:
    """'module.Class.attr' of everything currently patched (for logs and tests)."""
    out = []
    for owner, name, _ in _ORIGINALS.values():
        where = owner.__name__ if not isinstance(owner, type) else f"{owner.__module__}.{owner.__qualname__}"
        out.append(f"{where}.{name}")
    return out


def unpatch_all(keep=()) -> None:
    """Restore every original fastft replaced (newest first), except the patches whose keys
    are in `keep` (e.g. set(_ORIGINALS) taken earlier: undo only what came since)."""
    for key in reversed([k for k in _ORIGINALS if k not in keep]):
        owner, name, value = _ORIGINALS.pop(key)
        if value is _MISSING:
            delattr(owner, name)
        else:
            setattr(owner, name, value)


# ---------------------------------------------------------------- fused forwards

# public op -> the module that defines it (looked up at call time, so tests can spy on the ops)
OP_MODULES = {
    "rms_norm": "fastft.ops.norms",
    "rope": "fastft.ops.rope",
    "swiglu": "fastft.ops.activations",
    "geglu": "fastft.ops.activations",
    "cross_entropy": "fastft.ops.cross_entropy",
    "fused_linear_cross_entropy": "fastft.ops.cross_entropy",
}


def op(name: str):
    """The public op `name`, from the module that defines it."""
    module = OP_MODULES[name]
    return getattr(sys.modules.get(module) or importlib.import_module(module), name)


def _mark(fn, what: str):
    fn._fastft_patch = what
    return fn


def make_rms_norm_forward(offset: float):
    def forward(self, hidden_states):
        # Llama-style norms name it variance_epsilon, Gemma-style ones eps
        eps = self.variance_epsilon if hasattr(self, "variance_epsilon") else self.eps
        return op("rms_norm")(hidden_states, self.weight, eps, offset)

    return _mark(forward, f"rms_norm(offset={offset})")


def fast_apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    """transformers' apply_rotary_pos_emb through fastft.ops.rope (same contract)."""
    return op("rope")(q, k, cos, sin, unsqueeze_dim)


_mark(fast_apply_rotary_pos_emb, "rope")

# transformers activation classes -> (op, approximate); matched by name so versions that rename
# or add aliases still resolve. Anything else keeps the original MLP forward.
_GATED_ACTIVATIONS = {
    "SiLU": ("swiglu", None),
    "SiLUActivation": ("swiglu", None),
    "GELUTanh": ("geglu", "tanh"),
    "PytorchGELUTanh": ("geglu", "tanh"),
    "NewGELUActivation": ("geglu", "tanh"),
    "GELUActivation": ("geglu", "none"),
}


def gated_activation(act_fn) -> tuple[str, str | None] | None:
    return _GATED_ACTIVATIONS.get(type(act_fn).__name__)


def make_mlp_forward(orig_forward):
    def forward(self, x):
        kind = gated_activation(getattr(self, "act_fn", None))
        if kind is None:
            return orig_forward(self, x)
        gate = self.gate_proj(x)  # gate before up, as transformers does (same dropout RNG order)
        up = self.up_proj(x)
        if kind[0] == "swiglu":
            hidden = op("swiglu")(gate, up)
        else:
            hidden = op("geglu")(gate, up, approximate=kind[1])
        return self.down_proj(hidden)

    return _mark(forward, "gated_mlp")


def _return_logits(model) -> bool:
    """Should a forward with labels run transformers' own head (and return logits)?"""
    if getattr(model, "fastft_return_logits", False):
        return True
    flag = os.environ.get("FASTFT_RETURN_LOGITS", "").strip().lower()
    if flag in ("1", "true", "yes", "on"):
        return True
    if flag in ("0", "false", "no", "off"):
        return False
    return not torch.is_grad_enabled()


def _default_loss(model) -> bool:
    """True unless the user swapped the loss (model.loss_function = ... or config.loss_type)."""
    if "_loss_function" in model.__dict__:
        return False
    return getattr(model, "loss_type", None) in (None, "ForCausalLM")


def keep_positions(t: torch.Tensor, logits_to_keep) -> torch.Tensor:
    """transformers' logits_to_keep selection on dim 1 of a [batch, seq, ...] tensor: an int keeps
    the last n (0 = all), a 1-D tensor those positions, a 2-D integer tensor per-row positions, a
    2-D bool mask the True positions (flattened to [n_true, ...])."""
    if isinstance(logits_to_keep, int):
        return t if logits_to_keep == 0 else t[:, -logits_to_keep:]
    keep = logits_to_keep.to(t.device)
    if keep.dim() == 1:
        return t[:, keep]
    if keep.dtype == torch.bool:
        return t[keep]
    rows = torch.arange(t.shape[0], device=t.device)[:, None]
    return t[rows, keep]


def _plain_linear_head(head) -> bool:
    """A dense nn.Linear whose weight the fused op can read (not LoRA / modules_to_save / 4-bit).

    A head that FSDP2 made a unit of its own (class FSDPLinear, as accelerate's FSDP2 preparation
    does) is not: FSDP2 keeps its weight gathered only around the unit's own hooks, so it is
    called (see fastft/distributed.py)."""
    return type(head) is nn.Linear


def _full_tensor(t):
    """The whole tensor of an FSDP2-sharded parameter (differentiable), else t itself."""
    return t.full_tensor() if t is not None and hasattr(t, "full_tensor") else t


def _output_class():
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return CausalLMOutputWithPast


def make_causal_lm_forward(orig_forward, family: Family):
    sig = inspect.signature(orig_forward)
    var_kw = next((p.name for p in sig.parameters.values()
                   if p.kind is inspect.Parameter.VAR_KEYWORD), None)

    # wraps keeps the original signature visible (generate() validates model kwargs against it,
    # Trainer checks it for **kwargs to decide whether to pass num_items_in_batch)
    @functools.wraps(orig_forward)
    def forward(self, *args, **kwargs):
        bound = sig.bind(self, *args, **kwargs)
        arguments = dict(bound.arguments)
        labels = arguments.get("labels")
        if labels is None or _return_logits(self) or not _default_loss(self):
            return orig_forward(self, *args, **kwargs)

        extra = dict(arguments.pop(var_kw, {}) if var_kw else {})
        call = {k: v for k, v in arguments.items() if k not in ("self", "labels", "logits_to_keep")}
        return_dict = extra.pop("return_dict", call.pop("return_dict", None))
        call.update(extra)  # like transformers: the loss kwargs travel to the backbone too
        logits_to_keep = arguments.get("logits_to_keep", 0)
        ignore_index = extra.get("ignore_index", -100)
        num_items_in_batch = extra.get("num_items_in_batch")
        shift_labels = extra.get("shift_labels")

        backbone = getattr(self, self.base_model_prefix)
        outputs = backbone(**call)
        hidden = outputs[0]
        if shift_labels is None:  # tokens < n predict n; the last position has no target
            shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        hidden = keep_positions(hidden, logits_to_keep)
        shift_labels = keep_positions(shift_labels.to(hidden.device), logits_to_keep)

        head = self.get_output_embeddings()
        softcap = getattr(self.config, "final_logit_softcapping", None) \
            if family.final_logit_softcap else None
        flat_hidden = hidden.reshape(-1, hidden.shape[-1])
        flat_labels = shift_labels.reshape(-1)
        if _plain_linear_head(head):
            loss = op("fused_linear_cross_entropy")(
                flat_hidden, _full_tensor(head.weight), flat_labels, bias=_full_tensor(head.bias),
                ignore_index=ignore_index,
                num_items_in_batch=num_items_in_batch, softcap=softcap)
        else:  # LoRA / modules_to_save / quantised head: its own forward, then the fused CE
            loss = op("cross_entropy")(head(flat_hidden), flat_labels, ignore_index=ignore_index,
                                 num_items_in_batch=num_items_in_batch, softcap=softcap)

        out_cls = _output_class()
        names = {f.name for f in dataclasses.fields(out_cls)}
        rest = {k: v for k, v in outputs.items() if k in names and k not in ("loss", "logits")}
        result = out_cls(loss=loss, logits=None, **rest)
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        return result if return_dict else result.to_tuple()

    return _mark(forward, "causal_lm_fused_loss")


# ---------------------------------------------------------------- patching a model

def _base_model(model):
    """The transformers model under a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _op_available(name: str) -> str | None:
    """None when fastft.ops.<name> imports, else why not."""
    try:
        op(name)
        return None
    except Exception as exc:  # op module not written / broken: patch what we can, say so
        return f"{type(exc).__name__}: {exc}"


def patch_model(model) -> Family | None:
    """Patch the classes of `model`'s family (see module doc). Returns the family, or None (with
    one log line) when fastft does not know the architecture: the model then trains unpatched."""
    base = _base_model(model)
    config = getattr(base, "config", None)
    model_type = getattr(config, "model_type", None)
    family = family_for(model_type)
    arch = type(base).__name__
    if family is None:
        logger.warning(
            f"fastft: no fused patches for model type {model_type!r} ({arch}); it loads and trains "
            "with transformers' own code.")
        return None
    try:
        module = importlib.import_module(family.modeling_module)
    except ImportError as exc:
        logger.warning(f"fastft: cannot import {family.modeling_module} ({exc}); {arch} runs unpatched.")
        return None

    done, skipped, notes = [], [], []
    present = {type(m) for m in base.modules()}

    def want(op: str, what: str) -> bool:
        problem = _op_available(op)
        if problem:
            skipped.append(f"{what} (fastft.ops.{op} unavailable: {problem})")
        return problem is None

    norm_cls = getattr(module, family.norm_class, None)
    if norm_cls is not None and want("rms_norm", "RMSNorm"):
        _set_patch(norm_cls, "forward", make_rms_norm_forward(family.norm_offset))
        done.append("RMSNorm")

    rope_fn = getattr(module, "apply_rotary_pos_emb", None)
    if rope_fn is not None and want("rope", "rope"):
        params = list(inspect.signature(original(module, "apply_rotary_pos_emb")).parameters)
        if params[:5] == ["q", "k", "cos", "sin", "unsqueeze_dim"]:
            _set_patch(module, "apply_rotary_pos_emb", fast_apply_rotary_pos_emb)
            done.append("rope")
        else:
            skipped.append(f"rope (unexpected apply_rotary_pos_emb signature {params})")

    mlp_cls = getattr(module, family.mlp_class, None)
    if mlp_cls is not None:
        act = next((m.act_fn for m in base.modules() if type(m) is mlp_cls), None)
        act_op = (gated_activation(act) or ("swiglu",))[0] if act is not None else "swiglu"
        if want(act_op, "MLP"):
            _set_patch(mlp_cls, "forward", make_mlp_forward(original(mlp_cls, "forward")))
            done.append(f"MLP ({act_op})")

    head_cls = getattr(module, family.causal_lm_class, None)
    if head_cls is not None and not isinstance(base, head_cls):
        notes.append(f"head/loss stay transformers' ({arch} is not {family.causal_lm_class})")
    elif head_cls is not None and want("fused_linear_cross_entropy", "causal-LM loss") \
            and want("cross_entropy", "causal-LM loss"):
        _set_patch(head_cls, "forward",
                   make_causal_lm_forward(original(head_cls, "forward"), family))
        done.append("causal-LM loss")

    if norm_cls is not None and norm_cls not in present:
        skipped.append(f"no {family.norm_class} modules in {arch}")
    msg = f"fastft: patched {family.name} ({arch}): {', '.join(done) or 'nothing'}"
    if notes:
        msg += "; " + "; ".join(notes)
    if skipped:
        msg += "; not patched: " + "; ".join(skipped)
        logger.warning(msg)
    else:
        logger.info(msg)
    object.__setattr__(base, "fastft_family", family.name)
    return family
