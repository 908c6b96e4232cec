"""Structured output inside the engine core: a grammar-constrained greedy run gives the same
tokens with chunked prefill and preemption forced as with ample memory, every output matches
its regex, and a rerun served from the prefix cache gives them again (the grammar state lives
engine-side and advances only with sampled tokens, so recomputation never re-advances it)."""

from __future__ import annotations

import re

import torch

from _sluice_engine_helpers import PROMPTS, run_engine_core

REGEX = "[a-z]{2,8}( [a-z]{2,8}){9,12}\\."


def _engine(model_dir, **overrides):
    from sluice.config_sources import build_engine_config
    from sluice.engine.core import EngineCore
    overrides.setdefault("kv_cache_memory", "32MiB")
    overrides.setdefault("max_model_len", 128)
    return EngineCore(build_engine_config(overrides={"model": str(model_dir), **overrides}))


def test_constrained_tokens_survive_chunking_preemption_and_prefix_hits(llama_dir):
    from sluice.frontend.tokenizer import load_tokenizer
    from sluice.hf_config import load_model_spec
    from sluice.model.attention.kv_cache import kv_cache_bytes_per_block
    from sluice.sampling_params import SamplingParams, StructuredOutputsParams

    tokenizer = load_tokenizer(llama_dir)
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    params = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True,
                            structured_outputs=StructuredOutputsParams(regex=REGEX))

    roomy = _engine(llama_dir, block_size=16)   # the 34-token prompt fills 2 blocks
    reference = run_engine_core(roomy, prompts, params)
    for i in range(len(prompts)):
        text = tokenizer.decode(reference.tokens[str(i)])
        assert re.fullmatch(REGEX, text), (i, text)
    again = run_engine_core(roomy, prompts, params)   # same engine: prefix-cache hits
    assert again.prefix_hits > 0
    assert again.tokens == reference.tokens
    roomy.shutdown()

    block_bytes = kv_cache_bytes_per_block(load_model_spec(llama_dir), 16, torch.float32)
    tight = _engine(llama_dir, kv_cache_memory=block_bytes * 9, block_size=16,
                    max_num_batched_tokens=16, max_num_seqs=8)   # chunked prefill, preemption
    run = run_engine_core(tight, prompts, params)
    tight.shutdown()
    assert run.preemptions > 0, {k: len(v) for k, v in reference.tokens.items()}
    assert run.tokens == reference.tokens
