"""A model built for one pipeline stage (`layer_range`), in one process: the stages chained by
their hand-off tensors give the whole model's logits exactly; a stage holds only its layers'
weights (the first the embedding, the last the norm and LM head, a tied head as a copy of the
embedding), caches only its layers, and the fused decode stack steps aside for it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sluice.hf_config import load_model_spec
from sluice.model.attention import (allocate_kv_caches, build_attention_metadata,
                                    set_forward_context)
from sluice.model.attention.kv_cache import kv_cache_bytes_per_block
from sluice.model.loader import load_model
from sluice.model_spec.parallel_check import stage_layer_range
from sluice.testing.tiny_models import TinyModelSpec

BS = 16


def forward(model, num_layers: int, ids: list[int], intermediate=None) -> torch.Tensor:
    """One prefill of `ids` (request in block 1) on a fresh cache of `num_layers` layers."""
    n = len(ids)
    kv = allocate_kv_caches(model.spec, 3, BS, torch.float32, "cpu", num_layers=num_layers)
    md = build_attention_metadata(np.array([0, n], np.int32), np.array([n], np.int32),
                                  np.array([[1, 2]], np.int32),
                                  np.arange(BS, BS + n, dtype=np.int64), BS, "cpu")
    with torch.inference_mode(), set_forward_context(md, kv):
        return model(torch.tensor(ids), torch.arange(n), intermediate)


@pytest.mark.parametrize("tied", [False, True])
def test_three_stages_chained_equal_the_whole_model(tiny_model_factory, tied):
    model_dir = tiny_model_factory(f"llama-4-layers-tied-{tied}",
                                   TinyModelSpec(num_hidden_layers=4, tie_word_embeddings=tied))
    spec = load_model_spec(str(model_dir))
    ids = list(range(10, 30))
    whole = load_model(spec, torch.float32, "cpu", layer_ops="cpu")
    expected = whole.compute_logits(forward(whole, 4, ids))
    ranges = [stage_layer_range(4, 3, p) for p in range(3)]
    assert ranges == [(0, 1), (1, 3), (3, 4)]
    hand_off = None
    for p, layer_range in enumerate(ranges):
        stage = load_model(spec, torch.float32, "cpu", layer_ops="cpu", layer_range=layer_range)
        assert stage.model.fused_decode is None
        names = {name for name, _ in stage.named_parameters()}
        layers = {int(name.split(".")[2]) for name in names if name.startswith("model.layers.")}
        assert layers == set(range(*layer_range))
        assert ("model.embed_tokens.weight" in names) == (p == 0)
        assert ("model.norm.weight" in names) == (p == 2)
        assert ("lm_head.weight" in names) == (p == 2)   # tied: a copy of the embedding
        out = forward(stage, layer_range[1] - layer_range[0], ids, hand_off)
        if p < 2:
            assert out.shape == (2, len(ids), spec.hidden_size)
            hand_off = out
    assert torch.equal(stage.compute_logits(out), expected)


def test_a_stage_caches_only_its_layers(tiny_model_dir):
    spec = load_model_spec(str(tiny_model_dir("LlamaForCausalLM")))
    whole = kv_cache_bytes_per_block(spec, BS, torch.float32)
    assert kv_cache_bytes_per_block(spec, BS, torch.float32, num_layers=1) * 2 == whole
    assert len(allocate_kv_caches(spec, 2, BS, torch.float32, "cpu", num_layers=1)) == 1
