"""Per-family descriptions: only what differs between the decoder families fastft patches.

The generic patcher (patcher.py) reads these. Class names follow transformers' convention
`<prefix>RMSNorm`, `<prefix>MLP`, `<prefix>ForCausalLM` inside `transformers.models.<module>`;
a family whose classes are named otherwise sets the names explicitly.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]          # config.model_type values this family covers
    module: str                           # transformers.models.<module>.modeling_<module>
    prefix: str                           # class-name prefix, e.g. "Llama"
    norm_offset: float = 0.0              # RMSNorm scale is (offset + w): Gemma stores w around 0
    activation: str = "silu"              # gated-MLP activation in the usual config ("hidden_act")
    final_logit_softcap: bool = False     # config.final_logit_softcapping applies tanh-capping to logits
    qk_norm: bool = False                 # RMSNorm on q and k per head (same norm class, so patched too)
    sliding_window: bool = False          # some/all layers use a sliding-window mask (transformers' own)
    attn_logit_softcap: bool = False      # attention scores are softcapped: SDPA cannot do it
    # The MLP's output goes straight into the residual sum (no norm after it), so a checkpoint
    # recompute never needs its values and the fused MLP may skip computing them.
    mlp_output_into_residual: bool = True
    causal_lm: str | None = None          # causal-LM class name when not <prefix>ForCausalLM
    norm: str | None = None               # RMSNorm class name when not <prefix>RMSNorm
    mlp: str | None = None                # MLP class name when not <prefix>MLP

    @property
    def modeling_module(self) -> str:
        return f"transformers.models.{self.module}.modeling_{self.module}"

    @property
    def norm_class(self) -> str:
        return self.norm or f"{self.prefix}RMSNorm"

    @property
    def mlp_class(self) -> str:
        return self.mlp or f"{self.prefix}MLP"

    @property
    def causal_lm_class(self) -> str:
        return self.causal_lm or f"{self.prefix}ForCausalLM"


LLAMA = Family("llama", ("llama",), "llama", "Llama")
MISTRAL = Family("mistral", ("mistral",), "mistral", "Mistral", sliding_window=True)
QWEN2 = Family("qwen2", ("qwen2",), "qwen2", "Qwen2", sliding_window=True)
QWEN3 = Family("qwen3", ("qwen3",), "qwen3", "Qwen3", qk_norm=True, sliding_window=True)
GEMMA2 = Family("gemma2", ("gemma2",), "gemma2", "Gemma2", norm_offset=1.0,
                activation="gelu_pytorch_tanh", final_logit_softcap=True, sliding_window=True,
                attn_logit_softcap=True, mlp_output_into_residual=False)  # post_feedforward_layernorm
# Gemma 3 text (Gemma3ForCausalLM, model_type gemma3_text). The multimodal "gemma3" checkpoints
# share the norm / MLP / rope code, so those are patched too; their head stays transformers'.
GEMMA3 = Family("gemma3", ("gemma3_text", "gemma3"), "gemma3", "Gemma3", norm_offset=1.0,
                activation="gelu_pytorch_tanh", final_logit_softcap=True, qk_norm=True,
                sliding_window=True, mlp_output_into_residual=False)  # post_feedforward_layernorm

FAMILIES: tuple[Family, ...] = (LLAMA, MISTRAL, QWEN2, QWEN3, GEMMA2, GEMMA3)


def family_for(model_type: str | None) -> Family | None:
    """The family description for a config.model_type, or None when fastft does not patch it."""
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    return None
