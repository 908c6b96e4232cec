"""Scheduler behaviour with a fake worker standing in for the model runner.

`FakeWorker` keeps its own per-request state from the `SchedulerOutput` diffs exactly as the real
worker does, and simulates the paged KV cache: each step it first writes every scheduled token
into its slot, then checks that each request's whole context reads back correctly through its
block table. That catches wrong block ids, bad prefix hits and premature eviction. The token
sampled as output number k of any request is 100 + k, so expected outputs are known even across
preemptions.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from sluice.config import CacheConfig, SchedulerConfig
from sluice.core.request import Request, RequestStatus
from sluice.core.sched.scheduler import Scheduler
from sluice.errors import ConfigError
from sluice.messages import EngineCoreOutput, FinishReason, TokenLogprobs
from sluice.sampling_params import SamplingParams
from sluice.step import ModelRunnerOutput, SchedulerOutput

BS = 4


@dataclass
class _State:
    token_ids: list[int]
    num_prompt_tokens: int
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int


class FakeWorker:
    def __init__(self, block_size: int = BS, script: dict[str, list[int]] | None = None):
        self.block_size = block_size
        self.script = script or {}
        self.states: dict[str, _State] = {}
        self.kv: dict[int, list[int | None]] = {}

    def next_token(self, rid: str, st: _State) -> int:
        k = len(st.token_ids) - st.num_prompt_tokens
        script = self.script.get(rid, [])
        return script[k] if k < len(script) else 100 + k

    def execute(self, so: SchedulerOutput) -> ModelRunnerOutput:
        for rid in so.finished_request_ids:
            self.states.pop(rid, None)
        for new in so.scheduled_new_reqs:
            assert new.request_id not in self.states
            self.states[new.request_id] = _State(list(new.token_ids), new.num_prompt_tokens,
                                                 new.sampling_params, list(new.block_ids),
                                                 new.num_computed_tokens)
        for cached in so.scheduled_cached_reqs:
            st = self.states[cached.request_id]
            st.block_ids.extend(cached.new_block_ids)
            assert st.num_computed_tokens == cached.num_computed_tokens
        order = ([r.request_id for r in so.scheduled_new_reqs]
                 + [r.request_id for r in so.scheduled_cached_reqs])
        assert sorted(order) == sorted(so.num_scheduled_tokens)
        assert so.total_num_scheduled_tokens == sum(so.num_scheduled_tokens.values())
        # Write all new K/V first (the whole batch), then "attend".
        for rid in order:
            st, n = self.states[rid], so.num_scheduled_tokens[rid]
            assert n > 0 and 0 not in st.block_ids
            assert st.num_computed_tokens + n <= len(st.token_ids)
            assert len(st.block_ids) * self.block_size >= st.num_computed_tokens + n
            for pos in range(st.num_computed_tokens, st.num_computed_tokens + n):
                block = self.kv.setdefault(st.block_ids[pos // self.block_size],
                                           [None] * self.block_size)
                block[pos % self.block_size] = st.token_ids[pos]
        out = ModelRunnerOutput()
        for rid in order:
            st = self.states[rid]
            end = st.num_computed_tokens + so.num_scheduled_tokens[rid]
            seen = [self.kv[st.block_ids[p // self.block_size]][p % self.block_size]
                    for p in range(end)]
            assert seen == st.token_ids[:end], f"{rid}: KV cache content is wrong"
            if st.sampling_params.prompt_logprobs is not None and len(st.token_ids) == \
                    st.num_prompt_tokens:
                out.prompt_logprobs[rid] = [
                    TokenLogprobs([st.token_ids[p + 1]], [-1.0], [1])
                    for p in range(st.num_computed_tokens, min(end, st.num_prompt_tokens - 1))]
            st.num_computed_tokens = end
            sampled = []
            if end == len(st.token_ids):
                token = self.next_token(rid, st)
                st.token_ids.append(token)
                sampled = [token]
                if st.sampling_params.logprobs is not None:
                    out.logprobs[rid] = [TokenLogprobs([token], [-0.5], [1])]
            out.sampled_token_ids[rid] = sampled
        return out


def make_scheduler(*, num_blocks: int = 64, max_model_len: int = 64, budget: int = 64,
                   max_num_seqs: int = 16, chunked: bool = True, caching: bool = True,
                   policy: str = "fcfs") -> Scheduler:
    return Scheduler(
        SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                        scheduling_policy=policy, enable_chunked_prefill=chunked),
        CacheConfig(block_size=BS, enable_prefix_caching=caching), max_model_len, num_blocks)


def add(s: Scheduler, rid: str, prompt, *, arrival: float = 0.0, priority: int = 0,
        eos: int | None = None, **params) -> Request:
    params.setdefault("max_tokens", 16)
    r = Request(rid, list(prompt), SamplingParams(**params), eos, arrival, priority)
    s.add_request(r)
    return r


def step(s: Scheduler, w: FakeWorker) -> tuple[SchedulerOutput, dict[str, EngineCoreOutput]]:
    so = s.schedule()
    outs = s.update_from_output(so, w.execute(so))
    assert len({o.request_id for o in outs}) == len(outs)
    return so, {o.request_id: o for o in outs}


def run(s: Scheduler, w: FakeWorker, max_steps: int = 500) -> dict[str, list[EngineCoreOutput]]:
    got: dict[str, list[EngineCoreOutput]] = {}
    for _ in range(max_steps):
        if not s.has_unfinished_requests():
            return got
        for rid, o in step(s, w)[1].items():
            got.setdefault(rid, []).append(o)
    raise AssertionError("did not finish")


def tokens(outs: list[EngineCoreOutput]) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


def assert_all_blocks_free(s: Scheduler) -> None:
    kv = s.kv_cache_manager
    assert kv.get_num_free_blocks() == kv.block_pool.num_usable_blocks
    assert not kv.req_to_blocks and kv.usage == 0.0


# ---- basics ---------------------------------------------------------------------------------
def test_single_request_prefill_then_decode():
    s, w = make_scheduler(), FakeWorker()
    add(s, "a", range(5), max_tokens=3)
    so, outs = step(s, w)
    [new] = so.scheduled_new_reqs
    assert (new.token_ids, new.num_computed_tokens, new.block_ids) == ([0, 1, 2, 3, 4], 0, [1, 2])
    assert so.num_scheduled_tokens == {"a": 5} and outs["a"].new_token_ids == [100]
    so, outs = step(s, w)
    [cached] = so.scheduled_cached_reqs
    assert (cached.num_computed_tokens, cached.new_block_ids) == (5, [])
    assert so.num_scheduled_tokens == {"a": 1} and not outs["a"].finished
    so, outs = step(s, w)
    assert outs["a"].new_token_ids == [102] and outs["a"].finish_reason == FinishReason.LENGTH
    assert not s.has_unfinished_requests() and s.has_finished_requests()
    assert_all_blocks_free(s)
    so = s.schedule()
    assert so.is_empty and so.finished_request_ids == {"a"}


def test_continuous_batching():
    s, w = make_scheduler(), FakeWorker()
    add(s, "a", range(5), max_tokens=4)
    step(s, w)
    add(s, "b", [7, 8, 9], max_tokens=2)
    so, outs = step(s, w)
    assert [r.request_id for r in so.scheduled_new_reqs] == ["b"]
    assert [r.request_id for r in so.scheduled_cached_reqs] == ["a"]
    assert so.num_scheduled_tokens == {"a": 1, "b": 3} and set(outs) == {"a", "b"}
    so, outs = step(s, w)
    assert outs["b"].finish_reason == FinishReason.LENGTH and not outs["a"].finished
    so, outs = step(s, w)
    assert so.finished_request_ids == {"b"} and so.num_scheduled_tokens == {"a": 1}
    assert outs["a"].finished and tokens([outs["a"]]) == [103]
    assert_all_blocks_free(s)


def test_chunked_prefill_arithmetic_with_tiny_budget():
    s, w = make_scheduler(budget=8), FakeWorker()
    add(s, "a", range(20), max_tokens=2)
    add(s, "b", range(50, 56), max_tokens=2)
    plan, produced = [], []
    while s.has_unfinished_requests():
        so, outs = step(s, w)
        plan.append(so.num_scheduled_tokens)
        produced.append({rid: o.new_token_ids for rid, o in outs.items()})
    assert plan == [{"a": 8}, {"a": 8}, {"a": 4, "b": 4}, {"a": 1, "b": 2}, {"b": 1}]
    assert produced == [{}, {}, {"a": [100]}, {"a": [101], "b": [100]}, {"b": [101]}]


def test_chunked_prefill_disabled_waits_for_room():
    s, w = make_scheduler(budget=16, max_model_len=16, chunked=False), FakeWorker()
    add(s, "a", range(10), max_tokens=3)
    add(s, "b", range(20, 30), max_tokens=3)
    assert step(s, w)[0].num_scheduled_tokens == {"a": 10}
    assert step(s, w)[0].num_scheduled_tokens == {"a": 1, "b": 10}


def test_chunked_prefill_disabled_needs_budget_for_max_model_len():
    with pytest.raises(ConfigError, match="max-num-batched-tokens"):
        make_scheduler(budget=16, max_model_len=32, chunked=False)


def test_max_num_seqs():
    s, w = make_scheduler(max_num_seqs=2), FakeWorker()
    add(s, "a", range(3), max_tokens=1)
    add(s, "b", range(3), max_tokens=3)
    add(s, "c", range(3), max_tokens=3)
    so, _ = step(s, w)
    assert set(so.num_scheduled_tokens) == {"a", "b"}
    so, _ = step(s, w)
    assert set(so.num_scheduled_tokens) == {"b", "c"}


def test_logprobs_pass_through_and_prompt_logprobs_arrive_with_first_token():
    s, w = make_scheduler(budget=4), FakeWorker()
    add(s, "a", range(10, 20), max_tokens=2, logprobs=0, prompt_logprobs=0)
    outs = run(s, w)["a"]
    assert len(outs) == 2
    first = outs[0]
    assert [e.token_ids[0] for e in first.prompt_logprobs] == list(range(11, 20))
    assert first.new_logprobs[0].token_ids == [100]
    assert outs[1].prompt_logprobs is None


# ---- stop conditions through the scheduler --------------------------------------------------
def test_stop_conditions():
    s = make_scheduler(max_model_len=10)
    w = FakeWorker(script={"eos": [5, 2, 9], "min": [2, 2, 2, 2], "stoptok": [5, 6, 7]})
    add(s, "eos", range(3), eos=2)
    add(s, "min", range(3), eos=2, min_tokens=3)
    add(s, "stoptok", range(3), stop_token_ids=[6])
    add(s, "maxtok", range(3), max_tokens=2)
    add(s, "maxlen", range(6), max_tokens=None)
    got = run(s, w)
    assert tokens(got["eos"]) == [5, 2] and got["eos"][-1].finish_reason == FinishReason.STOP
    assert tokens(got["min"]) == [2, 2, 2]
    stop = got["stoptok"][-1]
    assert tokens(got["stoptok"]) == [5, 6] and stop.stop_reason == 6
    assert stop.finish_reason == FinishReason.STOP
    assert tokens(got["maxtok"]) == [100, 101]
    assert got["maxtok"][-1].finish_reason == FinishReason.LENGTH
    assert tokens(got["maxlen"]) == [100, 101, 102, 103]  # 6 + 4 = max_model_len
    assert got["maxlen"][-1].finish_reason == FinishReason.LENGTH
    assert all(o.finish_reason is None for outs in got.values() for o in outs[:-1])
    assert_all_blocks_free(s)


# ---- abort ----------------------------------------------------------------------------------
def test_abort_running_and_waiting_frees_blocks():
    s, w = make_scheduler(max_num_seqs=1), FakeWorker()
    add(s, "a", range(9))
    add(s, "b", range(9))
    step(s, w)
    assert s.kv_cache_manager.usage > 0
    assert sorted(s.finish_requests(["a", "b", "nope"], RequestStatus.FINISHED_ABORTED)) == \
        ["a", "b"]
    assert not s.has_unfinished_requests() and len(s.waiting) == 0
    assert_all_blocks_free(s)
    assert s.schedule().finished_request_ids == {"a"}  # b never reached the worker


def test_abort_between_schedule_and_update_drops_the_output():
    s, w = make_scheduler(), FakeWorker()
    add(s, "a", range(5))
    add(s, "b", range(5))
    so = s.schedule()
    out = w.execute(so)
    s.finish_requests("a", RequestStatus.FINISHED_ABORTED)
    outs = s.update_from_output(so, out)
    assert [o.request_id for o in outs] == ["b"]
    assert "a" in s.schedule().finished_request_ids


# ---- prefix caching -------------------------------------------------------------------------
def test_prefix_hit_starts_computed_higher():
    s, w = make_scheduler(), FakeWorker()
    add(s, "a", range(10), max_tokens=1)
    run(s, w)
    add(s, "b", list(range(10)) + [77, 78], max_tokens=1)
    so, outs = step(s, w)
    [new] = so.scheduled_new_reqs
    assert new.num_computed_tokens == 8 and so.num_scheduled_tokens == {"b": 4}
    assert outs["b"].num_cached_tokens == 8
    add(s, "c", range(8), max_tokens=1)  # whole prompt cached: recompute the last block
    so, outs = step(s, w)
    assert so.scheduled_new_reqs[0].num_computed_tokens == 4 and so.num_scheduled_tokens["c"] == 4


def test_requests_admitted_in_the_same_step_share_a_prefix():
    s, w = make_scheduler(), FakeWorker()
    add(s, "a", range(9), max_tokens=2)
    add(s, "b", range(9), max_tokens=2)
    so, outs = step(s, w)
    a, b = so.scheduled_new_reqs
    assert so.num_scheduled_tokens == {"a": 9, "b": 1}
    assert b.num_computed_tokens == 8 and b.block_ids[:2] == a.block_ids[:2]
    assert outs["a"].new_token_ids == outs["b"].new_token_ids == [100]


def test_salt_isolates_prefix_cache():
    s, w = make_scheduler(), FakeWorker()
    s.add_request(Request("a", list(range(9)), SamplingParams(max_tokens=1), None, 0.0,
                          cache_salt="x"))
    run(s, w)
    s.add_request(Request("b", list(range(9)), SamplingParams(max_tokens=1), None, 0.0,
                          cache_salt="y"))
    assert s.schedule().scheduled_new_reqs[0].num_computed_tokens == 0
