"""The pure parts behind the vLLM-compatible offline API: SamplingParams' new fields and their
validation, the sampler's allowed_token_ids / bad_words masks, best_of fan-out and selection,
generation_config.json defaults, prompt parsing and chat message normalisation."""

from __future__ import annotations

import json

import pytest
import torch

from sluice.errors import ConfigError, InvalidRequestError
from sluice.frontend.chat_template import message_for_template, template_kwargs
from sluice.frontend.input_processor import fan_out
from sluice.frontend.llm import _parse_prompts
from sluice.frontend.output_processor import OutputProcessor
from sluice.hf_config import generation_defaults
from sluice.messages import EngineCoreOutput, EngineCoreRequest, FinishReason, TokenLogprobs
from sluice.sample import Sampler, SamplingRow, build_sampling_metadata
from sluice.sample.metadata import banned_bad_word_tokens
from sluice.sampling_params import RequestOutputKind, SamplingParams

VOCAB = 32


@pytest.mark.parametrize("kwargs,message", [
    ({"best_of": 0}, "best_of must be at least 1, got 0."),
    ({"n": 3, "best_of": 2},
     "best_of must be greater than or equal to n, got n=3 and best_of=2."),
    ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens must be an integer >= 1 or -1"),
    ({"truncate_prompt_tokens": -2}, "truncate_prompt_tokens must be an integer >= 1 or -1"),
    ({"allowed_token_ids": []}, "allowed_token_ids is not None and empty!"),
    ({"allowed_token_ids": [-1]}, "allowed_token_ids contains out-of-vocab token id!"),
    ({"bad_words": [""]}, "bad_words must not contain empty"),
])
def test_new_fields_are_validated_like_vllm(kwargs, message):
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**kwargs)
    assert str(info.value).startswith(message)
    assert info.value.param == next(iter(k for k in kwargs if k != "n"))


def test_vocabulary_checks_of_token_lists():
    with pytest.raises(InvalidRequestError, match="out-of-vocab"):
        SamplingParams(allowed_token_ids=[1, VOCAB]).check_against_model(VOCAB, 5)
    with pytest.raises(InvalidRequestError, match=r"specified as bad: \[40\]"):
        SamplingParams(bad_words_token_ids=[[1, 40]]).check_against_model(VOCAB, 5)
    SamplingParams(allowed_token_ids=[0, VOCAB - 1], truncate_prompt_tokens=-1,
                   best_of=2).check_against_model(VOCAB, 5)


# ---- sampler masks -------------------------------------------------------------------------

def _sample(logits: torch.Tensor, params: list[SamplingParams],
            outputs: list[list[int]] | None = None) -> list[int]:
    rows = [SamplingRow(p, [1, 2], (outputs or [[]] * len(params))[i])
            for i, p in enumerate(params)]
    md = build_sampling_metadata(rows, VOCAB)
    return Sampler()(logits.clone(), md).sampled_token_ids.tolist()


def test_allowed_token_ids_mask_greedy_and_random_rows():
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(0))
    logits[:, 5] = 50.0  # the unconstrained favourite
    allowed = [3, 9, 17]
    params = [SamplingParams(temperature=0, allowed_token_ids=allowed),
              SamplingParams(temperature=1.0, allowed_token_ids=allowed),
              SamplingParams(temperature=0)]
    md = build_sampling_metadata([SamplingRow(p, [1], []) for p in params], VOCAB)
    assert not md.no_logits_processing and not md.is_plain_greedy
    for _ in range(20):
        tokens = _sample(logits, params)
        assert tokens[0] == max(allowed, key=lambda t: logits[0, t]) and tokens[1] in allowed
        assert tokens[2] == 5


def test_bad_words_ban_single_tokens_always_and_sequences_after_their_prefix():
    words = [[7], [4, 9], [2, 3, 11]]
    assert banned_bad_word_tokens(words, []) == [7]
    assert banned_bad_word_tokens(words, [1, 4]) == [7, 9]
    assert banned_bad_word_tokens(words, torch.tensor([2, 3])) == [7, 11]
    assert banned_bad_word_tokens(words, [3, 2]) == [7]
    logits = torch.zeros(2, VOCAB)
    logits[:, 9] = 10.0
    logits[:, 7] = 20.0
    logits[:, 12] = 5.0
    params = [SamplingParams(temperature=0, bad_words_token_ids=words)] * 2
    # Row 0 ends with 4, so [4, 9] bans 9 too; row 1 does not.
    assert _sample(logits, params, [[1, 4], [1, 5]]) == [12, 9]
    assert _sample(logits, [SamplingParams(temperature=0)] * 2) == [7, 7]


# ---- best_of -------------------------------------------------------------------------------

def _request(params: SamplingParams, request_id: str = "r") -> EngineCoreRequest:
    return EngineCoreRequest(request_id, [1, 2, 3], params, 0, 0.0)


def test_best_of_fans_out_best_of_children_that_report_logprobs():
    params = SamplingParams(n=2, best_of=4, seed=5, output_kind=RequestOutputKind.FINAL_ONLY)
    children = fan_out(_request(params))
    assert [c.request_id for c in children] == ["0_r", "1_r", "2_r", "3_r"]
    assert {(c.sampling_params.n, c.sampling_params.best_of, c.sampling_params.logprobs)
            for c in children} == {(1, None, 0)}
    assert [c.sampling_params.seed for c in children] == [5, 6, 7, 8]
    assert len(fan_out(_request(SamplingParams(best_of=1)))) == 1
    same = fan_out(_request(SamplingParams(n=2, best_of=2)))
    assert all(c.sampling_params.logprobs is None for c in same)


def test_best_of_returns_the_n_best_by_cumulative_logprob():
    proc = OutputProcessor(None)
    params = SamplingParams(n=2, best_of=4, max_tokens=2, detokenize=False,
                            output_kind=RequestOutputKind.FINAL_ONLY)
    children = proc.add_request(_request(params))
    scores = {0: [-3.0, -1.0], 1: [-0.5, -0.5], 2: [-2.0, -9.0], 3: [-0.1, -0.2]}
    result = []
    for step in range(2):
        outputs = [EngineCoreOutput(c.request_id, [10 * i + step],
                                    new_logprobs=[TokenLogprobs([10 * i + step],
                                                                [scores[i][step]], [1])],
                                    finish_reason=FinishReason.LENGTH if step else None)
                   for i, c in enumerate(children)]
        result += proc.process_outputs(outputs).request_outputs
    [final] = result
    assert [o.token_ids for o in final.outputs] == [[30, 31], [10, 11]]
    assert [o.index for o in final.outputs] == [0, 1]
    assert [o.cumulative_logprob for o in final.outputs] == pytest.approx([-0.3, -1.0])
    assert all(o.logprobs is None for o in final.outputs)


def test_best_of_cannot_stream():
    proc = OutputProcessor(None)
    with pytest.raises(InvalidRequestError) as info:
        proc.add_request(_request(SamplingParams(n=1, best_of=3, detokenize=False)))
    assert info.value.param == "best_of"
    assert not proc.has_unfinished_requests()


# ---- generation_config.json ------------------------------------------------------------------

def test_generation_defaults_modes(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "generation_config.json").write_text(json.dumps({
        "temperature": 0.6, "top_p": 0.95, "top_k": 20, "repetition_penalty": 1.05,
        "max_new_tokens": 64, "eos_token_id": [1, 2], "do_sample": True, "min_p": None,
        "top_k_typo": 3}))
    other = tmp_path / "other"
    other.mkdir()
    (other / "generation_config.json").write_text(json.dumps({"temperature": 0.2,
                                                               "top_p": 7}))
    assert generation_defaults("auto", str(model)) == {
        "temperature": 0.6, "top_p": 0.95, "top_k": 20, "repetition_penalty": 1.05,
        "max_tokens": 64}
    assert generation_defaults("vllm", str(model)) == {}
    assert generation_defaults(str(other), str(model)) == {"temperature": 0.2}  # top_p: range
    assert generation_defaults("auto", str(tmp_path)) == {}  # no file: no defaults
    with pytest.raises(ConfigError, match="--generation-config"):
        generation_defaults(str(tmp_path / "missing"), str(model))
    SamplingParams(**generation_defaults("auto", str(model)))  # always valid params


# ---- prompts and chat messages ---------------------------------------------------------------

def test_prompt_parsing():
    assert [(p.source, p.text) for p in _parse_prompts("a")] == [("a", "a")]
    assert [(p.source, p.text) for p in _parse_prompts([5, 6])] == [([5, 6], None)]
    parsed = _parse_prompts([{"prompt": "a"}, {"prompt_token_ids": [1], "cache_salt": "s"},
                             [2, 3], "b"])
    assert [(p.source, p.text, p.cache_salt) for p in parsed] == [
        ("a", "a", None), ([1], None, "s"), ([2, 3], None, None), ("b", "b", None)]
    for bad, match in [({"prompt": "a", "multi_modal_data": {}}, "multi_modal_data"),
                       ({"cache_salt": "s"}, "needs 'prompt'"),
                       ({"prompt": 5}, "must be a string")]:
        with pytest.raises(ValueError, match=match):
            _parse_prompts(bad)


def test_chat_messages_and_template_kwargs():
    assert message_for_template({"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}) == {
        "role": "user", "content": "a\nb"}
    assert message_for_template({"role": "assistant", "content": None, "name": "x"}) == {
        "role": "assistant", "content": "", "name": "x"}
    with pytest.raises(InvalidRequestError, match="image_url"):
        message_for_template({"role": "user", "content": [{"type": "image_url"}]})
    assert template_kwargs(False, "T", {"x": 1}, tools=[{"t": 1}],
                           continue_final_message=True) == {
        "add_generation_prompt": False, "continue_final_message": True, "tools": [{"t": 1}],
        "x": 1, "chat_template": "T"}
    with pytest.raises(InvalidRequestError, match="Cannot set both"):
        template_kwargs(True, None, None, continue_final_message=True)
    with pytest.raises(InvalidRequestError, match="tokenize"):
        template_kwargs(True, None, {"tokenize": True})
