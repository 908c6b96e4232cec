"""Sleep mode and prefix-cache reset of an in-process `EngineCore` (the HTTP routes and the
process's RSS are tested in tests/entrypoints/test_ops_endpoints.py)."""

from __future__ import annotations

import gc
import time
import weakref

import pytest

from _sluice_engine_helpers import make_config
from sluice.errors import ConfigError, EngineBusyError
from sluice.messages import EngineCoreRequest, FinishReason
from sluice.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
PROMPT = [5 + i % 50 for i in range(140)]  # > 2 blocks of 64: prefix-cache hits possible


def _request(request_id: str) -> EngineCoreRequest:
    return EngineCoreRequest(request_id, PROMPT, GREEDY, None, time.monotonic())


def _run(engine, request_id: str) -> tuple[list[int], int, float]:
    """(tokens, prefix-cache hit tokens, scheduled time) of one request run to the end."""
    engine.add_request(_request(request_id))
    tokens, hits, scheduled = [], 0, 0.0
    while engine.has_unfinished_requests():
        outputs = engine.step()
        hits += outputs.scheduler_stats.prefix_cache_hits
        for out in outputs.outputs:
            tokens += out.new_token_ids
            scheduled = scheduled or out.scheduled_time
    return tokens, hits, scheduled


@pytest.fixture(scope="module")
def engine(llama_dir):
    from sluice.engine.core import EngineCore
    engine = EngineCore(make_config(llama_dir, enable_sleep_mode=True))
    yield engine
    engine.shutdown()


def test_reset_prefix_cache_refused_while_blocks_are_held(engine):
    reference, _, scheduled = _run(engine, "a")
    assert scheduled > 0  # the first output carries the first-scheduled time
    assert _run(engine, "b")[1] > 0  # the repeated prompt hits the cache
    engine.add_request(_request("held"))
    engine.step()  # "held" now holds KV blocks
    assert not engine.reset_prefix_cache()
    engine.abort_requests(["held"])
    assert engine.reset_prefix_cache()
    tokens, hits, _ = _run(engine, "c")
    assert hits == 0 and tokens == reference


def test_sleep_refused_while_busy_then_both_levels_wake_to_the_same_output(engine):
    reference = _run(engine, "ref")[0]
    engine.add_request(_request("busy"))
    with pytest.raises(EngineBusyError, match="in flight"):
        engine.sleep(1)
    assert engine.sleep_level == 0
    engine.abort_requests(["busy"])
    engine.step()

    runner = engine.executor.worker.model_runner
    assert gc.get_freeze_count() > 0   # the startup heap is frozen (sluice.gc_heap)
    model = weakref.ref(runner.model)
    engine.sleep(1)
    assert gc.get_freeze_count() == 0   # thawed, so released objects in cycles can go
    assert engine.sleep_level == 1 and runner.kv_caches == [] and runner.model is not None
    engine.add_request(_request("while-asleep"))  # refused: finished as aborted, no crash
    out = engine.step().outputs
    assert [(o.request_id, o.finish_reason) for o in out] == [("while-asleep",
                                                                FinishReason.ABORT)]
    engine.sleep(2)  # deeper: the weights go too
    assert engine.sleep_level == 2 and runner.model is None and model() is None
    engine.sleep(1)  # shallower: nothing changes
    assert engine.sleep_level == 2
    engine.wake_up()
    assert engine.sleep_level == 0 and runner.kv_caches and runner.model is not None
    assert gc.get_freeze_count() > 0
    tokens, hits, _ = _run(engine, "after")
    assert tokens == reference and hits == 0  # the prefix cache was reset by the sleep
    engine.wake_up()  # awake: no-op


def test_sleep_needs_sleep_mode(llama_dir):
    from sluice.engine.core import EngineCore
    engine = EngineCore(make_config(llama_dir))
    try:
        with pytest.raises(ConfigError, match="--enable-sleep-mode"):
            engine.sleep(1)
    finally:
        engine.shutdown()
