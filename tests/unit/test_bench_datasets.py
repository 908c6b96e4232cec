"""Benchmark workloads: seeded random requests and JSON workload files (no torch)."""

from __future__ import annotations

import json

import pytest

from sluice.bench.datasets import (BenchRequest, WorkloadError, input_len_bounds,
                                   load_json_workload, random_requests, workload_summary)


class FakeTokenizer:
    all_special_ids = [0, 1, 2, 3]

    def __init__(self, size: int = 50):
        self.size = size

    def __len__(self) -> int:
        return self.size

    def encode(self, text: str) -> list[int]:
        return [4 + (ord(c) % (self.size - 4)) for c in text]


def test_random_requests_are_seeded():
    a = random_requests(16, output_len=8, vocab_size=1000, seed=3, input_len_range=(5, 40))
    b = random_requests(16, output_len=8, vocab_size=1000, seed=3, input_len_range=(5, 40))
    c = random_requests(16, output_len=8, vocab_size=1000, seed=4, input_len_range=(5, 40))
    assert a == b
    assert a != c


def test_random_requests_bounds():
    reqs = random_requests(200, output_len=7, vocab_size=100, seed=0, input_len_range=(3, 9),
                           special_token_ids=[0, 1, 99])
    lengths = {r.prompt_len for r in reqs}
    assert lengths == set(range(3, 10))  # inclusive on both ends, all values hit
    ids = {t for r in reqs for t in r.prompt_token_ids}
    assert min(ids) >= 2 and max(ids) <= 98
    assert all(r.output_len == 7 for r in reqs)
    assert all(isinstance(t, int) for t in reqs[0].prompt_token_ids)


def test_random_requests_tokenizer_caps_vocab_and_skips_specials():
    reqs = random_requests(50, output_len=4, vocab_size=32000, seed=1, input_len_range=(20, 20),
                           tokenizer=FakeTokenizer(50))
    ids = {t for r in reqs for t in r.prompt_token_ids}
    assert ids <= set(range(4, 50))
    assert len(ids) > 30


def test_input_len_with_range_ratio_matches_vllm():
    assert input_len_bounds(160, 0.6) == (64, 256)
    assert input_len_bounds(100, 0.0) == (100, 100)
    reqs = random_requests(100, output_len=1, vocab_size=500, seed=0, input_len=10,
                           range_ratio=0.5)
    assert {r.prompt_len for r in reqs} <= set(range(5, 16))


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_prompts=0, input_len_range=(1, 2)), "num_prompts"),
    (dict(output_len=0, input_len_range=(1, 2)), "output_len"),
    (dict(), "exactly one"),
    (dict(input_len=4, input_len_range=(1, 2)), "exactly one"),
    (dict(input_len_range=(5, 2)), "min <= max"),
    (dict(input_len=10, range_ratio=1.0), "range_ratio"),
    (dict(input_len_range=(1, 2), vocab_size=2, special_token_ids=[0, 1]), "no token ids"),
])
def test_random_requests_errors(kwargs, match):
    args = dict(num_prompts=2, output_len=3, vocab_size=100)
    args.update(kwargs)
    with pytest.raises(WorkloadError, match=match):
        random_requests(**args)


def test_load_json_workload(tmp_path):
    path = tmp_path / "w.json"
    path.write_text(json.dumps([{"prompt_token_ids": [5, 6, 7], "output_len": 4},
                                {"prompt": "hi", "output_len": 2, "note": "ignored"}]))
    reqs = load_json_workload(path, tokenizer=FakeTokenizer())
    assert reqs[0] == BenchRequest([5, 6, 7], 4)
    assert reqs[1].prompt == "hi" and reqs[1].prompt_token_ids == FakeTokenizer().encode("hi")
    assert workload_summary(reqs) == {"num_requests": 2, "total_prompt_tokens": 5,
                                      "total_output_tokens": 6, "min_prompt_len": 2,
                                      "max_prompt_len": 3}


@pytest.mark.parametrize("content, match", [
    ("[1, 2", "invalid JSON at line 1"),
    ('{"prompt_token_ids": [1], "output_len": 1}', "expected a JSON list"),
    ("[]", "empty"),
    ("[3]", "entry 0: expected an object"),
    ('[{"prompt_token_ids": [1], "output_len": 0}]', "'output_len' must be a positive"),
    ('[{"prompt_token_ids": [1], "output_len": true}]', "'output_len' must be a positive"),
    ('[{"prompt_token_ids": [1]}]', "'output_len' must be a positive"),
    ('[{"output_len": 2}]', "exactly one of 'prompt_token_ids' or 'prompt'"),
    ('[{"prompt": "a", "prompt_token_ids": [1], "output_len": 2}]', "exactly one"),
    ('[{"prompt_token_ids": [1, -2], "output_len": 2}]', "non-negative integers"),
    ('[{"prompt_token_ids": "12", "output_len": 2}]', "non-negative integers"),
    ('[{"prompt_token_ids": [], "output_len": 2}]', "prompt is empty"),
    ('[{"prompt_token_ids": [1], "output_len": 2}, {"prompt": "", "output_len": 1}]',
     "entry 1: 'prompt' must be a non-empty string"),
    ('[{"prompt_token_ids": [100], "output_len": 2}]', r"outside the vocabulary \[0, 100\)"),
])
def test_load_json_workload_errors(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(WorkloadError, match=match):
        load_json_workload(path, tokenizer=FakeTokenizer(), vocab_size=100)


def test_load_json_workload_missing_file_and_tokenizer(tmp_path):
    with pytest.raises(WorkloadError, match="does not exist"):
        load_json_workload(tmp_path / "nope.json")
    path = tmp_path / "w.json"
    path.write_text('[{"prompt": "text", "output_len": 3}]')
    with pytest.raises(WorkloadError, match="no tokenizer was given"):
        load_json_workload(path)
