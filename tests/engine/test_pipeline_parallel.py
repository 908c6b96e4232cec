"""Pipeline parallelism (`-pp`): each stage a worker process holding a contiguous range of
layers, hidden states and residual handed on over gloo, the engine core keeping one batch per
stage in flight.

Greedy tokens with PP=2 equal PP=1's on a 3-layer llama split unevenly (2 + 1 by default,
1 + 2 with --pp-layer-partition), also with chunked prefill and preemption forced; at least two
batches are observed in flight; each stage's KV cache holds only its layers; TP=2 x PP=2 (four
ranks) equals TP=1 through the offline `LLM` API. Every rank runs one torch thread.
"""

from __future__ import annotations

import pytest

from sluice.engine.core import EngineCore
from sluice.frontend.llm import LLM
from sluice.sampling_params import SamplingParams
from sluice.testing.tiny_models import TinyModelSpec

from _sluice_engine_helpers import engine_children, make_config, run_engine_core

pytestmark = pytest.mark.timeout(300)

PROMPTS = [[5, 6, 7, 8, 9], [100, 200, 300], list(range(40, 70)), [7] * 9, [1500, 3, 99]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def llama3_dir(tiny_model_factory):
    """A tiny llama with 3 decoder layers: 2 stages split it unevenly."""
    return tiny_model_factory("llama-3-layers", TinyModelSpec(num_hidden_layers=3))


def run_core(model_dir, params=GREEDY, arrival_gap_steps=1, **overrides):
    """Greedy tokens per request, and the engine's facts, from an in-process EngineCore."""
    values = {"max_num_seqs": 4, "num_threads": overrides.get("pipeline_parallel_size", 1)}
    values.update(overrides)
    engine = EngineCore(make_config(model_dir, **values))
    try:
        run = run_engine_core(engine, PROMPTS, params, arrival_gap_steps=arrival_gap_steps)
        facts = {"blocks": engine.num_kv_blocks, "in_flight": engine.max_batches_in_flight,
                 "bytes_per_block": engine.executor.kv_cache_bytes_per_block(),
                 "preemptions": run.preemptions}
        return run.tokens, facts
    finally:
        engine.shutdown()


def test_pp2_uneven_split_matches_pp1_with_two_batches_in_flight(llama3_dir):
    ref, ref_facts = run_core(llama3_dir)
    tokens, facts = run_core(llama3_dir, pipeline_parallel_size=2)
    assert tokens == ref
    assert facts["in_flight"] == 2 and ref_facts["in_flight"] == 0
    # the first stage (2 of the 3 layers) is the largest per-block cache: 2/3 of PP=1's
    assert facts["bytes_per_block"] * 3 == ref_facts["bytes_per_block"] * 2
    assert engine_children() == []


def test_pp2_matches_pp1_with_chunked_prefill_and_preemption(llama3_dir):
    """A 16-token budget chunks the 30-token prompt; a cache of a few 16-token blocks
    preempts. The override puts 1 layer on stage 0 and 2 on stage 1."""
    long = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    tight = {"max_num_batched_tokens": 16, "block_size": 16, "max_model_len": 96,
             "arrival_gap_steps": 0, "params": long}
    ref, ref_facts = run_core(llama3_dir, kv_cache_memory="96KiB", **tight)
    # stage 1 holds 2 layers (8 KiB a block): 96 KiB is 12 blocks there, 8 with one stage
    tokens, facts = run_core(llama3_dir, kv_cache_memory="96KiB", pipeline_parallel_size=2,
                             pp_layer_partition="1,2", **tight)
    assert tokens == ref
    assert ref_facts["preemptions"] > 0 and facts["preemptions"] > 0
    assert facts["blocks"] > ref_facts["blocks"]


def test_tp2_x_pp2_matches_tp1(llama_dir):
    prompts = ["Hello world", "def main():", "The quick brown fox"]
    params = SamplingParams(temperature=0.0, max_tokens=8)

    def generate(**overrides):
        cfg = make_config(llama_dir, kv_cache_memory="16MiB", max_num_seqs=4, **overrides)
        with LLM(config=cfg) as llm:
            return [o.outputs[0].token_ids for o in llm.generate(prompts, params,
                                                                   use_tqdm=False)]

    ref = generate(num_threads=1)
    assert generate(tensor_parallel_size=2, pipeline_parallel_size=2, num_threads=4) == ref
    assert engine_children() == []


def test_more_stages_than_layers_is_refused_before_spawning(llama_dir):
    from sluice.errors import ConfigError
    with pytest.raises(ConfigError, match=r"--pipeline-parallel-size 3 exceeds the model's "
                                          r"num_hidden_layers \(2\)"):
        EngineCore(make_config(llama_dir, pipeline_parallel_size=3))
    with pytest.raises(ConfigError, match=r"--pp-layer-partition '2,1' does not split"):
        EngineCore(make_config(llama_dir, pipeline_parallel_size=2, pp_layer_partition="2,1"))
    assert engine_children() == []
