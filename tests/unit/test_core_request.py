"""Request state, stop conditions, waiting queues, and the no-torch rule for sluice.core."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sluice.core.request import Request, RequestStatus
from sluice.core.sched.queues import FCFSQueue, PriorityQueue, create_request_queue
from sluice.core.sched.stop import check_stop
from sluice.messages import EngineCoreRequest, FinishReason
from sluice.sampling_params import SamplingParams


def req(rid: str = "r", prompt=(1, 2, 3), eos: int | None = 2, priority: int = 0,
        arrival: float = 0.0, **params) -> Request:
    return Request(rid, list(prompt), SamplingParams(**params), eos, arrival, priority)


# ---- Request --------------------------------------------------------------------------------
def test_from_engine_core_request_and_token_lists():
    wire = EngineCoreRequest("a", [5, 6, 7], SamplingParams(max_tokens=4), eos_token_id=2,
                             arrival_time=1.5, priority=3, cache_salt="s")
    r = Request.from_engine_core_request(wire)
    assert (r.request_id, r.priority, r.arrival_time, r.cache_salt) == ("a", 3, 1.5, "s")
    assert r.status == RequestStatus.WAITING and r.finish_reason is None
    assert r.num_prompt_tokens == 3 and r.num_tokens == 3 and r.num_output_tokens == 0
    all_ids = r.all_token_ids
    r.append_output_token_ids(8)
    r.append_output_token_ids([9, 10])
    assert r.all_token_ids is all_ids  # appended in place, never rebuilt
    assert all_ids == [5, 6, 7, 8, 9, 10] and r.output_token_ids == [8, 9, 10]
    assert r.prompt_token_ids == [5, 6, 7] and r.num_tokens == 6
    wire.prompt_token_ids.append(99)  # the request owns its own copy
    assert r.prompt_token_ids == [5, 6, 7]


@pytest.mark.parametrize("status,reason", [
    (RequestStatus.WAITING, None), (RequestStatus.RUNNING, None),
    (RequestStatus.PREEMPTED, None), (RequestStatus.FINISHED_STOPPED, FinishReason.STOP),
    (RequestStatus.FINISHED_LENGTH_CAPPED, FinishReason.LENGTH),
    (RequestStatus.FINISHED_ABORTED, FinishReason.ABORT)])
def test_finish_reason_mapping(status, reason):
    r = req()
    r.status = status
    assert r.finish_reason == reason
    assert r.is_finished == (reason is not None)


# ---- stop conditions ------------------------------------------------------------------------
def feed(r: Request, tokens, max_model_len: int = 1000) -> int:
    """Append tokens one at a time; return how many were appended before the stop."""
    for i, tok in enumerate(tokens):
        r.append_output_token_ids(tok)
        if check_stop(r, max_model_len):
            return i + 1
    return -1


def test_eos_stops_and_stays_in_output():
    r = req(eos=2)
    assert feed(r, [5, 2, 7]) == 2
    assert r.status == RequestStatus.FINISHED_STOPPED and r.stop_reason is None
    assert r.output_token_ids == [5, 2]


def test_ignore_eos():
    r = req(eos=2, ignore_eos=True, max_tokens=3)
    assert feed(r, [2, 2, 2, 2]) == 3
    assert r.status == RequestStatus.FINISHED_LENGTH_CAPPED


def test_min_tokens_suppresses_eos_and_stop_tokens():
    r = req(eos=2, min_tokens=3, stop_token_ids=[9])
    assert feed(r, [2, 9, 2]) == 3  # the third output may stop
    assert r.status == RequestStatus.FINISHED_STOPPED


def test_stop_token_sets_stop_reason():
    r = req(eos=None, stop_token_ids=[9, 11])
    assert feed(r, [5, 11]) == 2
    assert r.status == RequestStatus.FINISHED_STOPPED and r.stop_reason == 11
    assert r.finish_reason == FinishReason.STOP


def test_max_tokens_and_max_model_len():
    r = req(max_tokens=4)
    assert feed(r, [5, 6, 7, 8, 9]) == 4
    assert r.status == RequestStatus.FINISHED_LENGTH_CAPPED
    r = req(prompt=(1, 2, 3), max_tokens=None)
    assert feed(r, [5] * 10, max_model_len=6) == 3  # 3 prompt + 3 outputs = 6
    assert r.finish_reason == FinishReason.LENGTH
    # max_model_len caps even before min_tokens is reached.
    r = req(prompt=(1, 2, 3), min_tokens=5, max_tokens=10)
    assert feed(r, [5] * 10, max_model_len=5) == 2


def test_eos_on_the_last_allowed_token_is_stop():
    r = req(eos=2, max_tokens=2)
    assert feed(r, [5, 2]) == 2
    assert r.finish_reason == FinishReason.STOP


# ---- queues ---------------------------------------------------------------------------------
def test_fcfs_queue():
    q = create_request_queue("fcfs")
    assert isinstance(q, FCFSQueue) and not q
    a, b, c, d = (req(x) for x in "abcd")
    for r in (a, b, c):
        q.add(r)
    q.prepend(d)
    assert [r.request_id for r in q] == ["d", "a", "b", "c"]
    assert q.peek() is d and q.pop() is d and len(q) == 3
    q.remove_requests({"b", "zzz"})
    assert [r.request_id for r in q] == ["a", "c"]


def test_priority_queue_orders_by_priority_then_arrival():
    q = create_request_queue("priority")
    assert isinstance(q, PriorityQueue)
    q.add(req("late-urgent", priority=0, arrival=5.0))
    q.add(req("low", priority=10, arrival=0.0))
    q.add(req("early-urgent", priority=0, arrival=1.0))
    q.add(req("mid", priority=3, arrival=0.5))
    assert [r.request_id for r in q] == ["early-urgent", "late-urgent", "mid", "low"]
    assert q.peek().request_id == "early-urgent"
    q.remove_requests({"late-urgent"})
    assert [q.pop().request_id for _ in range(3)] == ["early-urgent", "mid", "low"]
    with pytest.raises(IndexError):
        q.peek()


def test_priority_queue_prepend_restores_key_order():
    q = PriorityQueue()
    first = req("first", priority=1, arrival=0.0)
    q.add(req("second", priority=1, arrival=1.0))
    q.prepend(first)
    assert q.pop() is first


def test_unknown_policy():
    with pytest.raises(ValueError):
        create_request_queue("lifo")


# ---- import rule ----------------------------------------------------------------------------
def test_core_imports_no_torch():
    code = ("import sys, sluice.core.sched.scheduler, sluice.core.kv_cache.manager, "
            "sluice.core.request; assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
