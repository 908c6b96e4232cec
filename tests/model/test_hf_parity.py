"""Our paged forward vs Hugging Face transformers logits, for every architecture and RoPE type.

Tolerance (all fp32): the two implementations run the same math in a different order (fused
q|k|v and gate|up GEMMs, SDPA over gathered paged KV vs HF's per-sequence SDPA), so logits of
magnitude ~3 differ by rounding only: observed max |diff| is ~1.5e-6 on these models. ATOL=5e-5
(rtol 0) keeps >30x headroom for other CPUs' reduction orders, while real bugs move logits far
more: a wrong RoPE type/factor ~1e0, a changed context token ~1e0, even rope_theta off by 1e-4
relative ~1e-4.
"""

from __future__ import annotations

import pytest
import torch

from _sluice_model_helpers import (PagedRunner, hf_logits, load_hf, load_ours, prompts,
                                   randomize_vectors)
from sluice.testing.tiny_models import TinyModelSpec

ATOL = dict(atol=5e-5, rtol=0.0)
ARCHS = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
LENGTHS = [5, 17, 33, 2, 64, 1]


def check_batch_prefill(model_dir, lengths=LENGTHS, block_size=16, layer_ops="torch"):
    ours, hf = load_ours(model_dir, layer_ops=layer_ops), load_hf(model_dir)
    ps = prompts(ours.spec.vocab_size, lengths)
    runner = PagedRunner(ours, block_size=block_size)
    for i, p in enumerate(ps):
        runner.add(str(i), p)
    out = runner.step([(str(i), len(p)) for i, p in enumerate(ps)])
    for i, p in enumerate(ps):
        torch.testing.assert_close(out[str(i)], hf_logits(hf, p), **ATOL)


@pytest.mark.parametrize("layer_ops", ["torch", "cpu"])
@pytest.mark.parametrize("arch", ARCHS)
def test_architecture_matches_hf(tiny_model_dir, tmp_path, arch, layer_ops):
    """Norm weights and biases randomised, so skipping one (e.g. Qwen2's q/k/v bias or
    Qwen3's q_norm/k_norm) would show. 'cpu' runs the C++ GEMM and fused elementwise ops."""
    d = randomize_vectors(tiny_model_dir(arch), tmp_path / arch)
    model = load_ours(d)
    assert model.model.layers[0].self_attn.qkv_proj.bias is not None or arch != "Qwen2ForCausalLM"
    check_batch_prefill(d, layer_ops=layer_ops)


def test_qwen3_explicit_head_dim_matches_hf(tiny_model_factory, tmp_path):
    """head_dim (32) != hidden_size / num_heads (16): projections are [H*32, 64]."""
    d = tiny_model_factory("qwen3_hd32", TinyModelSpec(architecture="Qwen3ForCausalLM",
                                                       extra={"head_dim": 32}))
    d = randomize_vectors(d, tmp_path / "qwen3_hd32")
    assert load_ours(d).spec.head_dim == 32
    check_batch_prefill(d)


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen2ForCausalLM"])
def test_tied_embeddings_match_hf(tiny_model_factory, arch):
    d = tiny_model_factory(f"tied_{arch}", TinyModelSpec(architecture=arch,
                                                         tie_word_embeddings=True))
    ours = load_ours(d)
    assert ours.lm_head.tied and ours.lm_head.lm_weight is ours.model.embed_tokens.weight
    check_batch_prefill(d)


ROPE_SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
}


def rope_model(factory, kind: str, max_pos: int = 1024):
    params = {"rope_theta": 10000.0, **ROPE_SCALINGS[kind]}
    spec = TinyModelSpec(max_position_embeddings=max_pos, extra={"rope_parameters": params})
    return factory(f"rope_{kind}_{max_pos}", spec)


@pytest.mark.parametrize("kind", list(ROPE_SCALINGS))
def test_rope_scaling_matches_hf(tiny_model_factory, kind):
    d = rope_model(tiny_model_factory, kind)
    assert load_ours(d).spec.rope.rope_type == kind
    check_batch_prefill(d, lengths=[5, 70, 130])


def test_dynamic_rope_past_max_position_matches_hf_generation(tiny_model_factory):
    """Past max_position_embeddings, dynamic NTK matches HF's token-by-token generation with a
    KV cache (see layers/rotary.py for exactly what is matched)."""
    from transformers import DynamicCache
    d = rope_model(tiny_model_factory, "dynamic", max_pos=32)
    ours, hf = load_ours(d), load_hf(d)
    seq = prompts(ours.spec.vocab_size, [60])[0]
    prompt_len = 20
    runner = PagedRunner(ours)
    runner.add("a", seq)
    got = [runner.step([("a", prompt_len)])["a"]]
    got += [runner.step([("a", 1)])["a"] for _ in range(prompt_len, len(seq))]
    cache = DynamicCache(config=hf.config)
    with torch.inference_mode():
        want = [hf(torch.tensor([seq[:prompt_len]]), past_key_values=cache).logits[0]]
        for p in range(prompt_len, len(seq)):
            want.append(hf(torch.tensor([[seq[p]]]), past_key_values=cache,
                           position_ids=torch.tensor([[p]])).logits[0])
    torch.testing.assert_close(torch.cat(got), torch.cat(want), **ATOL)


@pytest.mark.parametrize("arch", ARCHS)
def test_fused_decode_steps_match_hf(tiny_model_dir, tmp_path, arch, cpu_ops, monkeypatch):
    """With the C++ kernels, a step whose requests compute <= FUSED_MAX_QUERY_LEN tokens each
    runs every layer in one C++ call (sluice.model.fused_decode; oneDNN's GEMM for batched
    rows, the streaming GEMV for one): batched decodes of different lengths, a step of
    multi-token queries as a speculative verification makes (one query row per token, causal
    within the request), a long decode alone (split-KV attention) give HF's logits; a prefill
    step with longer queries stays in Python."""
    from sluice.model.fused_decode import FUSED_MAX_QUERY_LEN, FusedDecode
    calls = []
    real_call = FusedDecode.__call__
    monkeypatch.setattr(FusedDecode, "__call__",
                        lambda self, *a: calls.append(a[0].shape[0]) or real_call(self, *a))
    d = randomize_vectors(tiny_model_dir(arch), tmp_path / arch)
    ours = load_ours(d, layer_ops="cpu", attn_backend="cpu_paged")
    assert ours.model.fused_decode is not None
    hf = load_hf(d)
    seqs = dict(zip("abc", prompts(ours.spec.vocab_size, [20, 75, 230])))
    prefill = {"a": 8, "b": 70, "c": 190}
    runner = PagedRunner(ours, num_blocks=64, block_size=16)
    for rid, toks in seqs.items():
        runner.add(rid, toks)
    runner.step([(rid, n) for rid, n in prefill.items()])
    assert calls == []                                   # a prefill step is not fused
    got = {rid: [] for rid in seqs}
    steps = ([{"a": 1, "b": 1, "c": 1}] * 3             # batched decodes
             + [{"a": 3, "b": 1, "c": 5}, {"c": 4}]      # verification-shaped queries
             + [{"c": 1}] * 3 + [{"c": FUSED_MAX_QUERY_LEN}])   # "c" alone (split-KV)
    for step in steps:
        for rid, out in runner.step(list(step.items())).items():
            got[rid].append(out)
    assert calls == [sum(s.values()) for s in steps]
    for rid, toks in seqs.items():
        done = prefill[rid] + sum(len(o) for o in got[rid])
        want = hf_logits(hf, toks[:done])[prefill[rid]:]
        torch.testing.assert_close(torch.cat(got[rid]), want, **ATOL)


def test_chunked_prefill_then_decode_matches_hf(tiny_model_dir):
    ours, hf = load_ours(tiny_model_dir("Qwen3ForCausalLM")), load_hf(
        tiny_model_dir("Qwen3ForCausalLM"))
    seq = prompts(ours.spec.vocab_size, [78])[0]
    runner = PagedRunner(ours, block_size=16)
    runner.add("a", seq)
    chunks = [16, 21, 30]            # block-aligned, mid-block and crossing chunk boundaries
    got = [runner.step([("a", n)])["a"] for n in chunks]
    got += [runner.step([("a", 1)])["a"] for _ in range(sum(chunks), len(seq))]
    torch.testing.assert_close(torch.cat(got), hf_logits(hf, seq), **ATOL)


def test_mixed_batch_equals_each_request_alone(tiny_model_dir):
    """Decodes, fresh prefills and mid-prompt chunks in one batch give the same logits as
    running each request alone with the same history (and as HF)."""
    d = tiny_model_dir("LlamaForCausalLM")
    ours, hf = load_ours(d), load_hf(d)
    seqs = dict(zip("abcde", prompts(ours.spec.vocab_size, [40, 25, 50, 12, 30])))
    history = {"a": [39], "b": [], "c": [20], "d": [11], "e": [10, 9]}   # earlier steps
    now = {"a": 1, "b": 25, "c": 15, "d": 1, "e": 7}                     # this step
    batch = PagedRunner(ours, shuffle_seed=1)
    for rid, toks in seqs.items():
        batch.add(rid, toks)
        for n in history[rid]:
            batch.step([(rid, n)])
    mixed = batch.step([(rid, now[rid]) for rid in "dbaec"])
    for rid, toks in seqs.items():
        alone = PagedRunner(ours, shuffle_seed=2)
        alone.add(rid, toks)
        for n in history[rid]:
            alone.step([(rid, n)])
        single = alone.step([(rid, now[rid])])[rid]
        torch.testing.assert_close(mixed[rid], single, atol=1e-5, rtol=0)
        start = sum(history[rid])
        want = hf_logits(hf, toks[:start + now[rid]])[start:]
        torch.testing.assert_close(mixed[rid], want, **ATOL)


def test_block_placement_does_not_change_model_output(tiny_model_dir):
    """Oracle property at model level: contiguous vs randomly ordered blocks, bit for bit."""
    ours = load_ours(tiny_model_dir("Qwen2ForCausalLM"))
    seqs = prompts(ours.spec.vocab_size, [40, 23, 35])
    outs = []
    for shuffle in (None, 7):
        runner = PagedRunner(ours, shuffle_seed=shuffle)
        for rid, toks in zip("abc", seqs):
            runner.add(rid, toks)
        runner.step([("a", 39), ("b", 10), ("c", 20)])
        outs.append(runner.step([("a", 1), ("b", 13), ("c", 15)]))
    for rid in "abc":
        assert torch.equal(outs[0][rid], outs[1][rid])


def test_forward_needs_context_and_dummy_run_works(tiny_model_dir):
    from sluice.model.attention import set_forward_context
    ours = load_ours(tiny_model_dir("LlamaForCausalLM"))
    ids, pos = torch.tensor([5, 6, 7]), torch.tensor([0, 1, 2])
    with pytest.raises(RuntimeError, match="set_forward_context"):
        ours(ids, pos)
    with torch.inference_mode(), set_forward_context(None, []):   # profiling-style run
        assert ours.compute_logits(ours(ids, pos)).shape == (3, ours.spec.vocab_size)
