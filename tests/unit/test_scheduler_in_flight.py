"""The scheduler with several steps in flight (pipeline parallelism's batch queue).

A request in a step whose output is not back is neither scheduled again nor preempted; with
pp > 1 the cached requests carry the tokens sampled for them (`CachedRequestData.new_token_ids`)
so that pipeline stages that do not sample can follow. The soak drives the scheduler as
`EngineCore.step_with_batch_queue` does, with the fake worker executing each batch when it is
submitted (the order every pipeline stage runs them in).
"""

from __future__ import annotations

import random
from collections import deque

from test_scheduler import BS, FakeWorker, add, assert_all_blocks_free, tokens

from sluice.config import CacheConfig, SchedulerConfig
from sluice.core.request import RequestStatus
from sluice.core.sched.scheduler import Scheduler


def make_pp_scheduler(*, num_blocks: int = 64, max_model_len: int = 64, budget: int = 64,
                      max_num_seqs: int = 16, pp: int = 2) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget),
                     CacheConfig(block_size=BS, enable_prefix_caching=True), max_model_len,
                     num_blocks, pipeline_parallel_size=pp)


def test_a_request_in_flight_is_not_scheduled_again_until_its_output_is_back():
    s, w = make_pp_scheduler(), FakeWorker()
    add(s, "a", range(5))
    so1 = s.schedule()
    assert so1.num_scheduled_tokens == {"a": 5} and s.in_flight == {"a"}
    add(s, "b", range(10, 13))
    so2 = s.schedule()
    assert so2.num_scheduled_tokens == {"b": 3}          # a is still in the pipeline
    assert s.schedule().is_empty
    out1, out2 = w.execute(so1), w.execute(so2)
    assert [o.new_token_ids for o in s.update_from_output(so1, out1)] == [[100]]
    so3 = s.schedule()
    assert so3.num_scheduled_tokens == {"a": 1} and s.in_flight == {"a", "b"}
    [cached] = so3.scheduled_cached_reqs
    assert cached.new_token_ids == [100]                  # what stages before the last lack
    s.update_from_output(so2, out2)
    s.update_from_output(so3, w.execute(so3))
    assert not s.in_flight


def test_a_burst_spreads_over_pp_batches():
    """With pp stages, one step takes at most ceil(max_num_seqs / pp) sequences, so a burst
    fills pp batches that overlap in the pipeline instead of one batch holding everyone."""
    s, w = make_pp_scheduler(max_num_seqs=4, pp=2), FakeWorker()
    for name in "abcd":
        add(s, name, range(3))
    so1, so2 = s.schedule(), s.schedule()
    assert sorted(so1.num_scheduled_tokens) == ["a", "b"]
    assert sorted(so2.num_scheduled_tokens) == ["c", "d"]
    assert s.schedule().is_empty                          # everyone is in the pipeline
    s.update_from_output(so1, w.execute(so1))
    assert sorted(s.schedule().num_scheduled_tokens) == ["a", "b"]
    unlimited = make_pp_scheduler(max_num_seqs=4, pp=1)
    for name in "abcd":
        add(unlimited, name, range(3))
    assert len(unlimited.schedule().num_scheduled_tokens) == 4


def test_without_pipeline_parallelism_no_tokens_are_sent():
    s, w = make_pp_scheduler(pp=1), FakeWorker()
    add(s, "a", range(5))
    so = s.schedule()
    s.update_from_output(so, w.execute(so))
    [cached] = s.schedule().scheduled_cached_reqs
    assert cached.new_token_ids == []


def test_a_chunk_of_the_prompt_carries_no_tokens():
    s, w = make_pp_scheduler(budget=4), FakeWorker()
    add(s, "a", range(6))
    so = s.schedule()
    s.update_from_output(so, w.execute(so))
    so = s.schedule()
    [cached] = so.scheduled_cached_reqs
    assert so.num_scheduled_tokens == {"a": 2} and cached.new_token_ids == []


def test_preemption_passes_over_requests_in_flight():
    # 4 usable blocks of 4 tokens; two 8-token prompts fill them; token 8 needs a new block.
    s, w = make_pp_scheduler(num_blocks=5), FakeWorker()
    a, b = add(s, "a", range(8)), add(s, "b", range(20, 28))
    so = s.schedule()
    s.update_from_output(so, w.execute(so))
    s.in_flight.add("b")          # as if b were in another batch still in the pipeline
    so = s.schedule()
    # the tail (b) is in flight, so a, needing a block, preempts itself; b is left alone
    assert so.is_empty and so.finished_request_ids == {"a"}
    assert a.status == RequestStatus.PREEMPTED and b.status == RequestStatus.RUNNING


def _drive_with_batch_queue(s: Scheduler, w: FakeWorker, queue: deque, depth: int,
                            got: dict[str, list]) -> int:
    """One `EngineCore.step_with_batch_queue`: submit while there is room, else pop one.
    Returns the number of batches in flight after submitting."""
    submitted = False
    if len(queue) < depth and s.has_unfinished_requests():
        so = s.schedule()
        if not so.is_empty or so.finished_request_ids:
            for cached in so.scheduled_cached_reqs:   # the carried tokens are the right ones
                st = w.states[cached.request_id]
                end = cached.num_computed_tokens + so.num_scheduled_tokens[cached.request_id]
                assert st.token_ids[end - len(cached.new_token_ids):end] == \
                    cached.new_token_ids
                assert not cached.new_token_ids or \
                    end - len(cached.new_token_ids) >= st.num_prompt_tokens
            queue.append((so, w.execute(so)))
            submitted = True
    in_flight = len(queue)
    if not queue or (submitted and len(queue) < depth):
        return in_flight
    so, out = queue.popleft()
    for o in s.update_from_output(so, out):
        got.setdefault(o.request_id, []).append(o)
    return in_flight


def test_randomized_soak_with_two_batches_in_flight():
    rng = random.Random(1)
    s, w = make_pp_scheduler(num_blocks=16, max_model_len=40, budget=12, max_num_seqs=6), \
        FakeWorker()
    queue: deque = deque()
    expected: dict[str, int] = {}
    got: dict[str, list] = {}
    aborted: set[str] = set()
    max_queue = 0
    for i in range(50):
        prompt = [rng.randint(0, 30) for _ in range(rng.randint(1, 20))]
        max_tokens = rng.randint(1, 12)
        add(s, f"r{i}", prompt, max_tokens=max_tokens, arrival=float(i))
        expected[f"r{i}"] = min(max_tokens, 40 - len(prompt))
        if rng.random() < 0.1:
            aborted.update(s.finish_requests(f"r{rng.randint(0, i)}",
                                             RequestStatus.FINISHED_ABORTED))
        for _ in range(rng.randint(0, 3)):
            max_queue = max(max_queue, _drive_with_batch_queue(s, w, queue, 2, got))
    for _ in range(3000):
        if not (s.has_unfinished_requests() or queue):
            break
        _drive_with_batch_queue(s, w, queue, 2, got)
    assert not queue and not s.in_flight and max_queue == 2
    for rid, n in expected.items():
        outs = got.get(rid, [])
        if rid in aborted:
            continue
        assert tokens(outs) == [100 + k for k in range(n)], rid
        assert outs[-1].finished
    assert_all_blocks_free(s)
    assert s.make_stats().num_preemptions > 0
