"""Layers: RoPE numerics vs transformers, fused norm/activation, fused-linear weight loaders."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from sluice.hf_config import RopeSpec
from sluice.model.layers import (MergedColumnLinear, QKVLinear, RMSNorm, RotaryEmbedding,
                                 SiluAndMul)

MAX_POS = 32
ROPES = {
    "default": {},
    "linear": {"rope_type": "linear", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
    "dynamic": {"rope_type": "dynamic", "factor": 1.7},
}


def _hf_and_ours(kind: str, num_positions: int):
    params = {"rope_theta": 10000.0, "rope_type": "default", **ROPES[kind]}
    cfg = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4,
                                   max_position_embeddings=MAX_POS, rope_parameters=params)
    scaling = {k: v for k, v in ROPES[kind].items() if k != "rope_type"}
    spec = RopeSpec(theta=10000.0, rope_type=params["rope_type"], scaling=scaling)
    return LlamaRotaryEmbedding(cfg), RotaryEmbedding(16, num_positions, spec, MAX_POS)


@pytest.mark.parametrize("kind", list(ROPES))
def test_rotary_matches_hf_token_by_token(kind):
    """Each position fed alone, as HF does while generating with a KV cache (for dynamic this
    is the documented equivalence past max_position_embeddings)."""
    hf, ours = _hf_and_ours(kind, 80)
    x = torch.randn(1, 3, 1, 16)  # [batch, heads, seq, D]
    for p in range(80):
        cos, sin = hf(x, torch.tensor([[p]]))
        want, _ = apply_rotary_pos_emb(x, x, cos, sin)
        got = ours.apply(x[0].transpose(0, 1), *ours.cos_sin(torch.tensor([p]), torch.float32))
        # dynamic: float32 pow vectorised vs scalar may differ by 1 ulp in inv_freq, and the
        # angle p * inv_freq carries that ulp times p (seen: 2e-6 at p < 80 on an AMD EPYC).
        torch.testing.assert_close(got, want[0].transpose(0, 1), atol=5e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", ["default", "linear", "llama3", "dynamic"])
def test_rotary_matches_hf_whole_sequence(kind):
    """A single forward of MAX_POS tokens (dynamic == default within max_position_embeddings)."""
    hf, ours = _hf_and_ours(kind, MAX_POS)
    x = torch.randn(1, 3, MAX_POS, 16)
    pos = torch.arange(MAX_POS)
    cos, sin = hf(x, pos[None])
    want, _ = apply_rotary_pos_emb(x, x, cos, sin)
    got = ours.apply(x[0].transpose(0, 1), *ours.cos_sin(pos, torch.float32))
    torch.testing.assert_close(got, want[0].transpose(0, 1), atol=0, rtol=0)


def test_rmsnorm_fused_residual():
    norm = RMSNorm(8, eps=1e-6)
    norm.weight.data.uniform_(0.5, 1.5)
    x, res = torch.randn(5, 8), torch.randn(5, 8)
    normed, new_res = norm(x, res)
    assert torch.equal(new_res, x + res)
    assert torch.equal(normed, norm(x + res))
    hf = transformers.models.llama.modeling_llama.LlamaRMSNorm(8, eps=1e-6)
    hf.weight.data.copy_(norm.weight)
    assert torch.equal(norm(x), hf(x))


def test_silu_and_mul():
    x = torch.randn(3, 10)
    torch.testing.assert_close(SiluAndMul()(x), torch.nn.functional.silu(x[:, :5]) * x[:, 5:])


def test_qkv_linear_loader_equals_separate_projections():
    hidden, d, h, kvh = 12, 4, 3, 1
    layer = QKVLinear(hidden, d, h, kvh, bias=True)
    ws = {n: torch.randn(m * d, hidden) for n, m in (("q", h), ("k", kvh), ("v", kvh))}
    bs = {n: torch.randn(w.shape[0]) for n, w in ws.items()}
    for n in "qkv":
        layer.weight.weight_loader(layer.weight, ws[n], n)
        layer.bias.weight_loader(layer.bias, bs[n], n)
    x = torch.randn(2, hidden)
    q, k, v = layer.split(layer(x))
    for n, got in zip("qkv", (q, k, v)):
        torch.testing.assert_close(got, x @ ws[n].T + bs[n])
    with pytest.raises(ValueError, match="shape mismatch"):
        layer.weight.weight_loader(layer.weight, torch.randn(5, hidden), "k")


def test_merged_column_loader():
    layer = MergedColumnLinear(6, [4, 4], bias=False)
    gate, up = torch.randn(4, 6), torch.randn(4, 6)
    layer.weight.weight_loader(layer.weight, gate, 0)
    layer.weight.weight_loader(layer.weight, up, 1)
    assert torch.equal(layer.weight, torch.cat([gate, up]))
