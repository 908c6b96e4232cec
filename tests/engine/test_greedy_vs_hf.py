"""End to end: sluice's greedy continuations equal HF transformers' `generate`, token for token.

Every case runs a batch of mixed-length prompts through the real engine (scheduler, paged KV
cache, model runner, sampler) and compares each request with HF's unpadded greedy output.
"""

from __future__ import annotations

import pytest

from sluice.config_sources import build_engine_config
from sluice.sampling_params import SamplingParams

from _sluice_engine_helpers import PROMPTS, hf_greedy, run_engine_core

MAX_NEW = 24
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)


def _engine(model_dir, **overrides):
    from sluice.engine.core import EngineCore
    overrides.setdefault("kv_cache_memory", "32MiB")
    overrides.setdefault("max_model_len", 512)
    return EngineCore(build_engine_config(overrides={"model": str(model_dir), **overrides}))


def _prompt_ids(model_dir) -> list[list[int]]:
    from sluice.frontend.tokenizer import load_tokenizer
    tokenizer = load_tokenizer(model_dir)
    return [tokenizer.encode(p) for p in PROMPTS]


def _assert_matches_hf(model_dir, prompts, run):
    for i, prompt in enumerate(prompts):
        assert run.tokens[str(i)] == hf_greedy(model_dir, prompt, MAX_NEW), f"request {i}"


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "MistralForCausalLM",
                                  "Qwen2ForCausalLM", "Qwen3ForCausalLM"])
def test_batch_of_mixed_prompts_matches_hf(tiny_model_dir, arch):
    model_dir = tiny_model_dir(arch)
    prompts = _prompt_ids(model_dir)
    run = run_engine_core(_engine(model_dir), prompts, GREEDY)
    assert run.max_running == len(prompts)  # really batched together
    _assert_matches_hf(model_dir, prompts, run)


def test_pure_torch_kernels_match_hf(llama_dir):
    """`--kernels torch` (the reference path: torch attention and layer ops, no C++) is wired
    through the worker and gives HF's tokens too."""
    prompts = _prompt_ids(llama_dir)
    engine = _engine(llama_dir, kernels="torch")
    runner = engine.executor.worker.model_runner
    assert runner.attn_backend == "torch_paged" and runner.layer_ops == "torch"
    run = run_engine_core(engine, prompts, GREEDY)
    _assert_matches_hf(llama_dir, prompts, run)


def test_tiny_chunked_prefill_matches_hf(llama_dir):
    """A 7-token budget splits every long prompt into chunks mixed with other requests' decodes
    (8-token blocks: chunks end inside blocks and cross their boundaries)."""
    prompts = _prompt_ids(llama_dir)
    engine = _engine(llama_dir, max_num_batched_tokens=7, max_num_seqs=4, max_model_len=None,
                     block_size=8)
    run = run_engine_core(engine, prompts, GREEDY)
    _assert_matches_hf(llama_dir, prompts, run)


@pytest.mark.parametrize("block_size", [None, 8])
def test_staggered_arrivals_match_hf(llama_dir, block_size):
    """Requests arriving while others decode (continuous batching), with the platform's block
    size and with 8-token blocks (every request spans many, allocated interleaved)."""
    prompts = _prompt_ids(llama_dir)
    engine = _engine(llama_dir, block_size=block_size)
    run = run_engine_core(engine, prompts, GREEDY, arrival_gap_steps=3)
    _assert_matches_hf(llama_dir, prompts, run)


def test_shared_prefixes_hit_the_cache_and_match_hf(llama_dir):
    from sluice.frontend.tokenizer import load_tokenizer
    tokenizer = load_tokenizer(llama_dir)
    system = tokenizer.encode(PROMPTS[3] * 2)  # > 3 full blocks of 16 tokens
    prompts = [system + tokenizer.encode(s) for s in (" First", " Second question", " Third")]
    engine = _engine(llama_dir, block_size=16)
    first = run_engine_core(engine, prompts[:1], GREEDY)
    rest = run_engine_core(engine, prompts[1:], GREEDY)
    assert rest.prefix_hits >= 2 * (len(system) // 16) * 16
    assert all(n >= (len(system) // 16) * 16 for n in rest.num_cached_tokens.values())
    assert first.tokens["0"] == hf_greedy(llama_dir, prompts[0], MAX_NEW)
    for i, prompt in enumerate(prompts[1:]):
        assert rest.tokens[str(i)] == hf_greedy(llama_dir, prompt, MAX_NEW)


def test_prefix_caching_off_has_no_hits(llama_dir):
    prompts = [_prompt_ids(llama_dir)[3]] * 2
    engine = _engine(llama_dir, enable_prefix_caching=False)
    run_engine_core(engine, prompts[:1], GREEDY)
    run = run_engine_core(engine, prompts[1:], GREEDY)
    assert run.prefix_hits == 0


def test_tiny_kv_cache_forces_preemption_and_matches_hf(llama_dir):
    """20 blocks of 16 tokens for six requests of up to ~60 tokens: the tail gets preempted,
    recomputed later, and still produces HF's tokens."""
    import torch

    from sluice.hf_config import load_model_spec
    from sluice.model.attention.kv_cache import kv_cache_bytes_per_block
    block_bytes = kv_cache_bytes_per_block(load_model_spec(llama_dir), 16, torch.float32)
    prompts = _prompt_ids(llama_dir)
    engine = _engine(llama_dir, kv_cache_memory=block_bytes * 12, max_model_len=128,
                     block_size=16)
    run = run_engine_core(engine, prompts, GREEDY)
    assert run.preemptions > 0
    _assert_matches_hf(llama_dir, prompts, run)


def test_offline_llm_generate_matches_hf_in_input_order(llama_dir):
    from sluice.frontend.llm import LLM
    llm = LLM(str(llama_dir), kv_cache_memory="32MiB", max_model_len=512)
    outputs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.prompt for o in outputs] == PROMPTS
    for output in outputs:
        assert output.finished and output.outputs[0].finish_reason == "length"
        assert output.outputs[0].token_ids == hf_greedy(llama_dir, output.prompt_token_ids,
                                                        MAX_NEW)
        assert output.outputs[0].text == llm.tokenizer.decode(output.outputs[0].token_ids)
    llm.shutdown()
