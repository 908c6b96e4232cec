"""The engine-side structured-output pieces without an engine: config parsing, grammar checks,
the manager's compile cache / held requests / bitmask rows / advancing, and the sampler's
grammar mask (the greedy fast path steps aside). Uses the demo model's tokenizer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import sluice
from sluice.core.request import Request
from sluice.errors import ConfigError, InvalidRequestError
from sluice.messages import EngineCoreOutput, FinishReason
from sluice.sample.grammar import grammar_mask
from sluice.sample.metadata import SamplingRow, build_sampling_metadata
from sluice.sample.sampler import Sampler
from sluice.sampling_params import SamplingParams, StructuredOutputsParams as SOP
from sluice.step import SchedulerOutput
from sluice.structured_output.backend import GuidanceBackend
from sluice.structured_output.config import (StructuredOutputsConfig,
                                             parse_structured_outputs_config)
from sluice.structured_output.grammar import check_structured_outputs
from sluice.structured_output.manager import StructuredOutputManager
from sluice.structured_output.output import GrammarOutput

DEMO = Path(sluice.__file__).resolve().parent / "assets" / "demo_model"
VOCAB = 4096


@pytest.fixture(scope="module")
def manager():
    m = StructuredOutputManager(GuidanceBackend(StructuredOutputsConfig(), str(DEMO), VOCAB,
                                                [0]))
    yield m
    m.shutdown()


def _request(rid: str, so: SOP) -> Request:
    return Request(rid, [1, 2, 3], SamplingParams(structured_outputs=so), 0, 0.0)


def test_config_keys_and_backends():
    assert parse_structured_outputs_config(None).backend == "guidance"
    assert parse_structured_outputs_config('{"backend": "auto", "disable_any_whitespace": true}'
                                           ).disable_any_whitespace
    for bad in ('{"backend": "xgrammar"}', '{"nope": 1}', '[1]', '{"backend": "x"}',
                '{"reasoning_parser": "deepseek_r1"}'):
        with pytest.raises(ConfigError):
            parse_structured_outputs_config(bad)
    with pytest.raises(ConfigError, match="triton"):
        parse_structured_outputs_config('{"backend": "xgrammar"}')


@pytest.mark.parametrize("so,param", [(SOP(json={"type": "nope"}), "structured_outputs.json"),
                                      (SOP(regex="(a"), "structured_outputs.regex"),
                                      (SOP(grammar="start: x"), "structured_outputs.grammar"),
                                      (SOP(structural_tag="{}"),
                                       "structured_outputs.structural_tag")])
def test_invalid_constraints_name_the_field(so, param):
    with pytest.raises(InvalidRequestError) as info:
        check_structured_outputs(so)
    assert info.value.param == param


def _wait_ready(manager, n):
    ready, failed = [], []
    while len(ready) + len(failed) < n:
        manager.wait_for_any(5.0)
        r, f = manager.take_ready()
        ready += r
        failed += f
    return ready, failed


def test_hold_cache_rows_advance_and_stop(manager):
    so = SOP(choice=["yes", "no"])
    a, b = _request("a", so), _request("b", so)
    manager.hold(a)
    manager.hold(b)
    manager.hold(_request("bad", SOP(regex="(a")))
    ready, failed = _wait_ready(manager, 3)
    assert {r.request_id for r in ready} == {"a", "b"}
    assert failed[0].request_id == "bad" and failed[0].finish_reason == FinishReason.ABORT
    assert len(manager._cache) == 2 and manager.active   # one compile per distinct constraint
    # a samples this step (all tokens computed); b is mid-prefill (samples nothing)
    a.num_computed_tokens, b.num_computed_tokens = 3, 1
    so_out = SchedulerOutput(num_scheduled_tokens={"a": 3, "b": 1}, total_num_scheduled_tokens=4)
    grammar = manager.grammar_output(so_out, {"a": a, "b": b})
    assert grammar.request_ids == ["a"]
    allowed = grammar.allowed(VOCAB)[0]
    from transformers import PreTrainedTokenizerFast
    tok = PreTrainedTokenizerFast.from_pretrained(str(DEMO))
    yes = tok.encode("yes", add_special_tokens=False)
    assert allowed[yes[0]] and not allowed[0]      # EOS not before the grammar can end
    assert manager.advance([EngineCoreOutput("a", yes)]) == ["a"]   # complete: stopped
    assert manager.advance([EngineCoreOutput("b", [], finish_reason=FinishReason.ABORT)]) == []
    manager.drop(["a", "b"])
    assert not manager.active


def test_sampler_applies_the_mask_before_the_greedy_fast_path():
    logits = torch.randn(2, 64)
    best = logits.argmax(-1)
    bits = np.zeros((1, 2), dtype=np.int32)
    bits[0, 0] = 1 << 5                                    # row "r1" may only pick token 5
    g = GrammarOutput.from_array(["r1"], bits)
    rows = [SamplingRow(SamplingParams(temperature=0), [1], []) for _ in range(2)]
    md = build_sampling_metadata(rows, vocab_size=64)
    assert md.is_plain_greedy
    md.grammar_mask = grammar_mask(g, {"r0": 0, "r1": 1}, 64, "cpu")
    assert not md.is_plain_greedy                          # the screen steps aside
    out = Sampler()(logits.clone(), md)
    assert out.sampled_token_ids.tolist() == [int(best[0]), 5]
