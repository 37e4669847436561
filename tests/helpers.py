"""Shared test utilities: backends to test, tolerances, relative error."""
import torch

from fastft import dispatch

# ||out - ref|| / ||ref|| bounds against a float64 reference, by the dtype computed in.
RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.2e-2, torch.float64: 1e-12}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), "non-finite values (unwritten / poisoned elements?)"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def backends(op, device):
    """Backends of `op` that can run on `device` (kernel dtypes)."""
    return [b for b in dispatch.TABLE[op]
            if dispatch.why_not(op, b, device, torch.float32) is None]


def gpu_backends(op):
    return [b for b in ("cuda", "triton") if b in dispatch.TABLE[op]]


# The BOS / EOS strings of each family's own tokenizer; the shipped test tokenizer is given them so
# that templates printing bos_token / eos_token show the family's real tokens.
FAMILY_SPECIAL = {
    "llama-3.1": ("<|begin_of_text|>", "<|eot_id|>"),
    "llama-3": ("<|begin_of_text|>", "<|eot_id|>"),
    "mistral": ("<s>", "</s>"),
    "gemma": ("<bos>", "<eos>"),
    "gemma-3": ("<bos>", "<eos>"),
    "alpaca": ("<s>", "</s>"),
    "vicuna": ("<s>", "</s>"),
    "zephyr": ("<s>", "</s>"),
    "unsloth": ("<s>", "</s>"),
}


def profiled_names(fn) -> list:
    """The names of the events the profiler's CUDA activity records while fn() runs (its kernels
    among them), for tests that check which kernels a call launches."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events()]


def family_tokenizer(name):
    """The shipped tokenizer with chat format `name`'s BOS / EOS tokens (no template installed)."""
    from fastft.assets import load_default_tokenizer

    tokenizer = load_default_tokenizer()
    if name in FAMILY_SPECIAL:
        bos, eos = FAMILY_SPECIAL[name]
        tokenizer.add_special_tokens({"bos_token": bos, "eos_token": eos})
    return tokenizer
