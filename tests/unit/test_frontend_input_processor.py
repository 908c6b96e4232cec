"""InputProcessor validation and n > 1 fan-out."""

from __future__ import annotations

import pytest

from sluice.errors import InvalidRequestError
from sluice.frontend.input_processor import InputProcessor, child_request_id, fan_out
from sluice.frontend.tokenizer import load_tokenizer
from sluice.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return load_tokenizer(tiny_tokenizer_dir)


@pytest.fixture
def proc(tok):
    return InputProcessor(tok, max_model_len=64, vocab_size=2048, max_logprobs=5,
                          eos_token_id=0)


def test_text_prompt_is_tokenized(proc, tok):
    req = proc.process("r1", "Hello world", SamplingParams(max_tokens=8), 12.5, priority=3)
    assert req.request_id == "r1"
    assert req.prompt_token_ids == tok.encode("Hello world")
    assert req.eos_token_id == 0 and req.arrival_time == 12.5 and req.priority == 3
    assert req.sampling_params.max_tokens == 8


def test_token_prompt_and_default_arrival(proc):
    req = proc.process("r", [5, 6, 7], SamplingParams(max_tokens=2))
    assert req.prompt_token_ids == [5, 6, 7] and req.arrival_time > 0


@pytest.mark.parametrize("bad", ["5", 1.5, None, True])
def test_token_ids_must_be_integers(proc, bad):
    with pytest.raises(InvalidRequestError, match="integers") as e:
        proc.process("r", [1, bad], SamplingParams())
    assert e.value.param == "prompt"


def test_max_tokens_none_is_materialised(proc):
    params = SamplingParams(max_tokens=None)
    req = proc.process("r", [5] * 10, params)
    assert req.sampling_params.max_tokens == 54
    assert params.max_tokens is None  # the caller's params are untouched


@pytest.mark.parametrize("prompt", ["", []])
def test_empty_prompt(proc, prompt):
    with pytest.raises(InvalidRequestError, match="empty") as e:
        proc.process("r", prompt, SamplingParams())
    assert e.value.param == "prompt"


@pytest.mark.parametrize("bad", [2048, -1, 10**9])
def test_token_ids_outside_vocab(proc, bad):
    with pytest.raises(InvalidRequestError, match=r"\[0, 2048\)") as e:
        proc.process("r", [1, bad], SamplingParams())
    assert e.value.param == "prompt"


def test_too_long_completion(proc):
    with pytest.raises(InvalidRequestError) as e:
        proc.process("r", [5] * 60, SamplingParams(max_tokens=10))
    assert str(e.value) == (
        "This model's maximum context length is 64 tokens. However, you requested 70 tokens "
        "(60 in the messages, 10 in the completion). Please reduce the length of the messages "
        "or completion.")
    assert e.value.param == "max_tokens"
    # Exactly at the limit is fine.
    req = proc.process("r", [5] * 54, SamplingParams(max_tokens=10))
    assert req.sampling_params.max_tokens == 10


def test_prompt_alone_too_long(proc):
    with pytest.raises(InvalidRequestError, match="70 in the messages") as e:
        proc.process("r", [5] * 70, SamplingParams(max_tokens=1))
    assert e.value.param == "prompt"
    with pytest.raises(InvalidRequestError, match="requested 64 tokens in the messages") as e:
        proc.process("r", [5] * 64, SamplingParams(max_tokens=None))
    assert e.value.param == "prompt"


def test_model_dependent_params(proc):
    with pytest.raises(InvalidRequestError) as e:
        proc.process("r", [5], SamplingParams(logprobs=6))
    assert e.value.param == "logprobs"
    with pytest.raises(InvalidRequestError) as e:
        proc.process("r", [5], SamplingParams(prompt_logprobs=9))
    assert e.value.param == "prompt_logprobs"
    with pytest.raises(InvalidRequestError) as e:
        proc.process("r", [5], SamplingParams(stop_token_ids=[4096]))
    assert e.value.param == "stop_token_ids"


def test_stop_strings_need_detokenize(proc):
    with pytest.raises(InvalidRequestError) as e:
        proc.process("r", [5], SamplingParams(stop=["x"], detokenize=False))
    assert e.value.param == "stop"


def test_min_tokens_against_materialised_max(proc):
    with pytest.raises(InvalidRequestError) as e:
        proc.process("r", [5] * 60, SamplingParams(max_tokens=None, min_tokens=10))
    assert e.value.param == "min_tokens"


def test_fan_out_children(proc):
    req = proc.process("abc", [5, 6], SamplingParams(n=3, seed=7, prompt_logprobs=2,
                                                       max_tokens=4))
    children = fan_out(req)
    assert [c.request_id for c in children] == ["0_abc", "1_abc", "2_abc"]
    assert [child_request_id("abc", i) for i in range(3)] == ["0_abc", "1_abc", "2_abc"]
    assert [c.sampling_params.seed for c in children] == [7, 8, 9]
    assert all(c.sampling_params.n == 1 for c in children)
    assert [c.sampling_params.prompt_logprobs for c in children] == [2, None, None]
    assert all(c.prompt_token_ids == [5, 6] and c.arrival_time == req.arrival_time
               for c in children)


def test_fan_out_without_seed_and_n1(proc):
    req = proc.process("x", [5], SamplingParams(n=2, max_tokens=1))
    assert [c.sampling_params.seed for c in fan_out(req)] == [None, None]
    single = proc.process("y", [5], SamplingParams(max_tokens=1))
    assert fan_out(single) == [single]


def test_generation_config_eos_ids_become_stop_tokens(tok):
    from sluice.messages import EngineReady
    ready = EngineReady(num_kv_blocks=8, block_size=16, max_model_len=64, vocab_size=2048,
                        model_name="m", eos_token_ids=[0, 2])
    proc = InputProcessor.from_ready(tok, ready, max_logprobs=5)
    req = proc.process("r", [5, 6], SamplingParams(max_tokens=4, stop_token_ids=[9]))
    assert req.eos_token_id == 0
    assert req.sampling_params.stop_token_ids == [9, 2]
    ignoring = proc.process("r2", [5, 6], SamplingParams(max_tokens=4, ignore_eos=True))
    assert ignoring.sampling_params.stop_token_ids == []
