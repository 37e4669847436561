"""One-token decoding steps with grouped KV heads and a mask (fastft.attention._grouped_decode):
the query heads of a KV group attend as that head's queries instead of transformers copying K
and V out to every query head. Checked against transformers' own SDPA function (float64 as the
reference) and, through generate, against the model with transformers' function."""
import types

import pytest
import torch

import fastft.attention as attention
from fastft.loader import FastLanguageModel
from tests.tiny_models import save_tiny_model

sdpa_module = pytest.importorskip("transformers.integrations.sdpa_attention")


def _inputs(dtype, batch=3, kv_heads=2, groups=3, dim=24, length=37, mask_kind="bool", seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, kv_heads * groups, 1, dim, generator=g)
    k = torch.randn(batch, kv_heads, length, dim, generator=g)
    v = torch.randn(batch, kv_heads, length, dim + 8, generator=g)  # (a value width of its own)
    keep = torch.rand(batch, 1, 1, length, generator=g) < 0.7
    keep[..., 0] = True  # every row attends somewhere
    if mask_kind == "bool":
        mask = keep
    else:  # additive, as transformers' float masks
        mask = torch.where(keep, 0.0, torch.finfo(dtype).min).to(dtype)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # (B, 1, H, D) storage, as a layer makes it
    return [t.to(dtype) for t in (q, k, v)], mask


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_grouped_decode_matches_transformers_sdpa(device, dtype, mask_kind):
    (q, k, v), mask = _inputs(dtype, mask_kind=mask_kind)
    q, k, v, mask = (t.to(device) for t in (q, k, v, mask))
    module = types.SimpleNamespace(num_key_value_groups=3, is_causal=True)
    scaling = 0.37
    got = attention._grouped_decode(module, q, k, v, mask, 0.0, (), {"scaling": scaling})
    assert got is not None and got[1] is None
    got = got[0]
    same, _ = sdpa_module.sdpa_attention_forward(module, q, k, v, mask, scaling=scaling)
    ref_mask = mask if mask.dtype == torch.bool else mask.double()
    ref, _ = sdpa_module.sdpa_attention_forward(module, q.double(), k.double(), v.double(), ref_mask,
                                               scaling=scaling)
    assert got.shape == same.shape == (3, 1, 6, 32) and got.dtype == dtype and got.is_contiguous()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (got.double() - ref).abs().max().item() <= tol * ref.abs().max().item()
    assert (got.float() - same.float()).abs().max().item() <= tol * same.float().abs().max().item()


def test_grouped_decode_leaves_other_calls_to_transformers():
    (q, k, v), mask = _inputs(torch.float32)
    module = types.SimpleNamespace(num_key_value_groups=3)
    call = attention._grouped_decode
    assert call(module, q, k, v, mask, 0.0, (), {}) is not None
    assert call(module, q, k, v, None, 0.0, (), {}) is None  # no mask: transformers uses enable_gqa
    assert call(module, q.expand(-1, -1, 2, -1), k, v, mask, 0.0, (), {}) is None  # two tokens
    assert call(types.SimpleNamespace(num_key_value_groups=1), q, k, v, mask, 0.0, (), {}) is None
    assert call(module, q, k, v, mask, 0.1, (), {}) is None  # dropout
    assert call(module, q, k, v, mask, 0.0, (), {"softcap": 50.0}) is None
    assert call(module, q, k, v, mask, 0.0, (), {"position_bias": torch.zeros(1)}) is None
    assert call(module, q, k, v, mask.expand(-1, 6, -1, -1), 0.0, (), {}) is None  # a mask per head


def test_generate_with_padding_matches_transformers_attention(tmp_path, monkeypatch):
    """Left-padded greedy decoding (a 4-D mask at every step) of a GQA model: the same tokens and
    scores with transformers' SDPA function as with the wrapper's grouped path."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    path = save_tiny_model("llama", tmp_path / "llama")  # 4 query heads on 2 KV heads
    model, _ = FastLanguageModel.from_pretrained(path, dtype=torch.float32, device_map={"": "cpu"})
    FastLanguageModel.for_inference(model)
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is attention._reusing_sdpa
    taken = []
    real = attention._grouped_decode
    monkeypatch.setattr(attention, "_grouped_decode", lambda *a: taken.append(1) or real(*a))

    def generate():
        torch.manual_seed(0)
        ids = torch.randint(0, 256, (3, 7))
        mask = torch.ones_like(ids)
        mask[0, :3] = 0
        mask[1, :1] = 0
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6,
                                  do_sample=False, pad_token_id=0, output_scores=True,
                                  return_dict_in_generate=True)

    grouped = generate()
    assert len(taken) >= 5 * model.config.num_hidden_layers  # every decoding step's layers
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "sdpa", attention._ORIGINAL["sdpa"])
    plain = generate()
    assert torch.equal(grouped.sequences, plain.sequences)
    # (min_new_tokens sets EOS to -inf in both: equal, not NaN)
    assert max(torch.where(a == b, 0.0, (a - b).abs()).max().item()
               for a, b in zip(grouped.scores, plain.scores)) <= 1e-4
