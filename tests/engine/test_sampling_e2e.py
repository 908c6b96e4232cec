"""Sampling parameters through the whole offline engine: seeds, n, logprobs, stops, chat."""

from __future__ import annotations

import math

import pytest
import torch

from sluice.sampling_params import SamplingParams

from _sluice_engine_helpers import PROMPTS, _hf_model, hf_greedy


@pytest.fixture(scope="module")
def llm(llama_dir):
    from sluice.frontend.llm import LLM
    engine = LLM(str(llama_dir), kv_cache_memory="32MiB", max_model_len=512, max_logprobs=5)
    yield engine
    engine.shutdown()


def _hf_logprobs(model_dir, token_ids: list[int]) -> torch.Tensor:
    """log_softmax of HF's logits at every position of `token_ids` ([len, vocab])."""
    with torch.no_grad():
        logits = _hf_model(str(model_dir))(torch.tensor([token_ids])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def test_top_k_1_equals_greedy(llm):
    greedy = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)
    top1 = llm.generate(PROMPTS, SamplingParams(temperature=1.0, top_k=1, max_tokens=16),
                        use_tqdm=False)
    assert [o.outputs[0].token_ids for o in greedy] == [o.outputs[0].token_ids for o in top1]


def test_seeded_sampling_is_reproducible_regardless_of_batch(llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=20)
    alone = llm.generate(PROMPTS[1], params, use_tqdm=False)[0].outputs[0].token_ids
    in_batch = llm.generate(PROMPTS, [SamplingParams(temperature=1.0, max_tokens=20)] * 1
                            + [params] + [SamplingParams(temperature=0.7, max_tokens=5)] * 4,
                            use_tqdm=False)[1].outputs[0].token_ids
    other_seed = llm.generate(PROMPTS[1], params.with_updates(seed=99),
                              use_tqdm=False)[0].outputs[0].token_ids
    assert alone == in_batch
    assert alone != other_seed


def test_n_samples_differ_and_are_indexed(llm):
    out = llm.generate(PROMPTS[0], SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=12),
                       use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) == 3
    again = llm.generate(PROMPTS[0], SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=12),
                         use_tqdm=False)[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]


def test_logprobs_match_hf(llm, llama_dir):
    """Sampled-token logprobs are the raw model's log_softmax. fp32 on both sides; the paged
    attention sums in a different order than HF's SDPA, so allow 1e-4 absolute."""
    out = llm.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=8, logprobs=3),
                       use_tqdm=False)[0]
    completion = out.outputs[0]
    ref = _hf_logprobs(llama_dir, out.prompt_token_ids + completion.token_ids)
    start = len(out.prompt_token_ids) - 1
    assert len(completion.logprobs) == len(completion.token_ids)
    total = 0.0
    for i, (token_id, position) in enumerate(zip(completion.token_ids, completion.logprobs)):
        row = ref[start + i]
        assert position[token_id].rank == 1  # greedy picks the top token
        assert math.isclose(position[token_id].logprob, row[token_id].item(), abs_tol=1e-4)
        top = torch.topk(row, 3)
        assert set(top.indices.tolist()) <= set(position)
        for rank, token in enumerate(top.indices.tolist(), start=1):
            assert position[token].rank == rank
        total += position[token_id].logprob
    assert math.isclose(completion.cumulative_logprob, total, abs_tol=1e-4)


def test_prompt_logprobs_match_hf(llm, llama_dir):
    out = llm.generate(PROMPTS[3], SamplingParams(temperature=0, max_tokens=1,
                                                  prompt_logprobs=2), use_tqdm=False)[0]
    ref = _hf_logprobs(llama_dir, out.prompt_token_ids)
    assert out.prompt_logprobs[0] is None
    assert len(out.prompt_logprobs) == len(out.prompt_token_ids)
    for i in range(1, len(out.prompt_token_ids)):
        token_id = out.prompt_token_ids[i]
        entry = out.prompt_logprobs[i][token_id]
        assert math.isclose(entry.logprob, ref[i - 1][token_id].item(), abs_tol=1e-4)
        assert entry.rank == int((ref[i - 1] > ref[i - 1][token_id]).sum()) + 1


def test_stop_string_trims_output(llm):
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    full = llm.generate(PROMPTS[0], params, use_tqdm=False)[0].outputs[0].text
    stop = full[6:9]
    cut = full.index(stop)
    out = llm.generate(PROMPTS[0], params.with_updates(stop=[stop]), use_tqdm=False)[0]
    assert out.outputs[0].text == full[:cut]
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == stop
    kept = llm.generate(PROMPTS[0], params.with_updates(stop=[stop],
                                                        include_stop_str_in_output=True),
                        use_tqdm=False)[0]
    assert kept.outputs[0].text == full[:cut + len(stop)]


def test_stop_token_ids_and_min_tokens(llm, llama_dir):
    ids = llm.tokenizer.encode(PROMPTS[1])
    greedy = hf_greedy(llama_dir, ids, 24)
    k = next(i for i in range(3, 24) if greedy[i] not in greedy[:i])
    params = SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[greedy[k]])
    out = llm.generate(PROMPTS[1], params, use_tqdm=False)[0].outputs[0]
    assert out.token_ids == greedy[:k + 1]
    assert out.finish_reason == "stop" and out.stop_reason == greedy[k]
    longer = llm.generate(PROMPTS[1], params.with_updates(min_tokens=k + 2),
                          use_tqdm=False)[0].outputs[0]
    assert len(longer.token_ids) > k + 1  # the stop token was masked until min_tokens


def test_max_tokens_gives_length(llm):
    out = llm.generate(PROMPTS[2], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"


def test_chat_applies_the_template(llm, llama_dir):
    messages = [{"role": "user", "content": "What is a list?"}]
    out = llm.chat(messages, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0]
    expected_prompt = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert out.prompt_token_ids == llm.tokenizer.encode(expected_prompt, add_special_tokens=False)
    assert out.outputs[0].token_ids == hf_greedy(llama_dir, out.prompt_token_ids, 8)[
        :len(out.outputs[0].token_ids)]


def test_token_id_prompts_and_bad_input(llm):
    from sluice.errors import InvalidRequestError
    ids = llm.tokenizer.encode(PROMPTS[0])
    by_ids = llm.generate([ids], SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)
    by_text = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=6),
                           use_tqdm=False)
    assert by_ids[0].outputs[0].token_ids == by_text[0].outputs[0].token_ids
    with pytest.raises(InvalidRequestError) as err:
        llm.generate([[10**6]], SamplingParams(max_tokens=4), use_tqdm=False)
    assert err.value.param == "prompt"
    with pytest.raises(InvalidRequestError, match="maximum context length"):
        llm.generate(PROMPTS[0], SamplingParams(max_tokens=10_000), use_tqdm=False)
    # the engine still serves after bad input
    assert llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=6),
                        use_tqdm=False)[0].outputs[0].token_ids == by_text[0].outputs[0].token_ids
