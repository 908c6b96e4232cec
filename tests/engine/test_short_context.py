"""A max_model_len shorter than the startup profiling forward (256 tokens): the profile splits
its tokens over enough requests that none passes max_model_len (it used to index past the
RoPE cache: `sluice serve --max-model-len 64` died with an IndexError at startup)."""

from __future__ import annotations

from sluice.sampling_params import SamplingParams


def test_engine_starts_and_generates_with_a_short_context(llama_dir):
    from sluice.frontend.llm import LLM

    greedy = SamplingParams(temperature=0, max_tokens=6)
    outputs = {}
    for max_model_len in (32, 256):
        with LLM(str(llama_dir), kv_cache_memory="16MiB", max_model_len=max_model_len) as llm:
            outputs[max_model_len] = llm.generate(["The function returns"],
                                                  greedy)[0].outputs[0].token_ids
    assert len(outputs[32]) == 6
    assert outputs[32] == outputs[256]
