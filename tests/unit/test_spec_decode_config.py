"""`--speculative-config` parsing: vLLM's keys and defaults; every bad value names its key."""

from __future__ import annotations

import pytest

from sluice.errors import ConfigError
from sluice.spec_decode.config import parse_speculative_config


def test_ngram_and_its_lookup_defaults():
    c = parse_speculative_config('{"method": "ngram", "num_speculative_tokens": 4}')
    assert (c.method, c.num_speculative_tokens, c.prompt_lookup_min, c.prompt_lookup_max) == (
        "ngram", 4, 5, 5)
    c = parse_speculative_config({"method": "ngram", "num_speculative_tokens": 3,
                                  "prompt_lookup_max": 3})
    assert (c.prompt_lookup_min, c.prompt_lookup_max) == (3, 3)
    assert parse_speculative_config(None) is None


def test_a_model_means_draft_model():
    c = parse_speculative_config('{"model": "/models/draft", "num_speculative_tokens": 2}')
    assert (c.method, c.model) == ("draft_model", "/models/draft")


@pytest.mark.parametrize("value, needle", [
    ('{"method": "eagle", "num_speculative_tokens": 2}', "not supported"),
    ('{"method": "nope", "num_speculative_tokens": 2}', "unknown method"),
    ('{"method": "ngram"}', "num_speculative_tokens"),
    ('{"method": "ngram", "num_speculative_tokens": 0}', "num_speculative_tokens"),
    ('{"method": "ngram", "num_speculative_tokens": true}', "num_speculative_tokens"),
    ('{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, '
     '"prompt_lookup_max": 2}', "prompt_lookup_min"),
    ('{"method": "draft_model", "num_speculative_tokens": 2}', "needs \\\"model\\\""),
    ('{"model": "x", "num_speculative_tokens": 2, "draft_tensor_parallel_size": 2}',
     "draft_tensor_parallel_size"),
    ('{"method": "ngram", "num_speculative_tokens": 2, "speculative_token_tree": "x"}',
     "unknown key"),
    ('{"num_speculative_tokens": 2}', "method"),
    ('not json', "not valid JSON"),
])
def test_errors_name_the_key(value, needle):
    with pytest.raises(ConfigError) as e:
        parse_speculative_config(value)
    assert needle.replace("\\", "") in str(e.value)


def test_disable_by_batch_size_defaults_to_four():
    assert parse_speculative_config({"method": "ngram", "num_speculative_tokens": 2}
                                    ).disable_by_batch_size == 4
    assert parse_speculative_config({"method": "ngram", "num_speculative_tokens": 2,
                                     "disable_by_batch_size": 64}).disable_by_batch_size == 64


@pytest.mark.parametrize("overrides, needle", [
    ({"pipeline_parallel_size": 2}, "pipeline parallelism"),
    ({"tensor_parallel_size": 2, "draft": True}, "tensor parallelism"),
    ({"kv_transfer_config": '{"kv_connector": "ZmqPullConnector", "kv_role": "kv_both"}',
      "draft": True}, "--kv-transfer-config"),
])
def test_what_speculation_does_not_combine_with(overrides, needle):
    from sluice.config_sources import build_engine_config
    overrides = dict(overrides)
    spec = ({"model": "/models/draft", "num_speculative_tokens": 2} if overrides.pop("draft", 0)
            else {"method": "ngram", "num_speculative_tokens": 2})
    with pytest.raises(ConfigError, match=needle):
        build_engine_config(overrides={"speculative_config": spec, **overrides})
    spec_text = build_engine_config(overrides={"speculative_config": spec}
                                    ).scheduler.speculative_config
    assert parse_speculative_config(spec_text).num_speculative_tokens == 2  # a dict is JSON
