"""Scheduler under KV pressure: preemption order, resume, stats, and a randomized soak."""

from __future__ import annotations

import random

from test_scheduler import (FakeWorker, add, assert_all_blocks_free, make_scheduler, run, step,
                            tokens)

from sluice.core.request import RequestStatus


def test_fcfs_preempts_the_tail_and_resumes_with_prompt_and_outputs():
    # 4 usable blocks of 4 tokens; two 7-token prompts take 2 blocks each.
    s, w = make_scheduler(num_blocks=5, caching=False), FakeWorker()
    add(s, "a", range(7), max_tokens=3)
    add(s, "b", range(20, 27), max_tokens=4)
    assert step(s, w)[0].num_scheduled_tokens == {"a": 7, "b": 7}
    assert step(s, w)[0].num_scheduled_tokens == {"a": 1, "b": 1}  # token 7: same block
    # Token 8 needs a third block each: b (the tail) is preempted so a can go on.
    so, outs = step(s, w)
    assert so.num_scheduled_tokens == {"a": 1} and so.finished_request_ids == {"b"}
    assert [c.new_block_ids for c in so.scheduled_cached_reqs] == [[3]]
    b = s.requests["b"]
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    assert s.waiting.peek() is b and outs["a"].finished
    # a finished; b comes back as a new request carrying prompt + its 2 outputs.
    so, outs = step(s, w)
    [new] = so.scheduled_new_reqs
    assert new.token_ids == list(range(20, 27)) + [100, 101] and new.num_prompt_tokens == 7
    assert new.num_computed_tokens == 0 and so.num_scheduled_tokens == {"b": 9}
    assert len(new.block_ids) == 3 and so.finished_request_ids == {"a"}
    assert outs["b"].new_token_ids == [102]
    got = run(s, w)
    assert tokens(got["b"]) == [103] and got["b"][-1].finished
    assert s.make_stats().num_preemptions == 1
    assert_all_blocks_free(s)


def test_preempted_request_hits_its_own_head_blocks_on_resume():
    s, w = make_scheduler(num_blocks=5, caching=True), FakeWorker()
    add(s, "a", range(7), max_tokens=3)
    add(s, "b", range(20, 27), max_tokens=4)
    for _ in range(3):
        step(s, w)
    # b's blocks were freed tail-first; a's new block evicted b's tail, not its head.
    so, _ = step(s, w)
    [new] = so.scheduled_new_reqs
    assert new.request_id == "b" and new.num_computed_tokens == 4
    assert so.num_scheduled_tokens == {"b": 5}
    assert s.requests["b"].num_cached_tokens == 0  # the first schedule's hit is kept


def _priority_scenario(policy: str):
    """b (low priority) runs first; a (urgent) joins; on step 3 only a needs a new block."""
    s, w = make_scheduler(num_blocks=5, caching=False, policy=policy), FakeWorker()
    add(s, "b", range(6), priority=5, arrival=0.0, max_tokens=8)
    step(s, w)
    add(s, "a", range(20, 28), priority=0, arrival=1.0, max_tokens=8)
    so, _ = step(s, w)
    assert so.num_scheduled_tokens == {"b": 1, "a": 8}
    return s, w, step(s, w)[0]


def test_fcfs_preempts_the_latest_even_if_urgent():
    s, _, so = _priority_scenario("fcfs")
    assert so.num_scheduled_tokens == {"b": 1} and so.finished_request_ids == {"a"}


def test_priority_policy_preempts_lowest_priority_even_if_already_scheduled():
    s, w, so = _priority_scenario("priority")
    # b had been scheduled this step before a failed to allocate; it is unscheduled again.
    assert so.num_scheduled_tokens == {"a": 1} and so.finished_request_ids == {"b"}
    assert so.total_num_scheduled_tokens == 1
    assert [c.request_id for c in so.scheduled_cached_reqs] == ["a"]
    assert s.requests["b"].status == RequestStatus.PREEMPTED
    got = run(s, w)
    assert tokens(got["a"])[-1] == 107 and len(tokens(got["b"])) == 6  # 2 before, 6 after
    assert_all_blocks_free(s)


def test_priority_admission_order():
    s, w = make_scheduler(policy="priority", max_num_seqs=1), FakeWorker()
    add(s, "low", range(3), priority=9, arrival=0.0, max_tokens=1)
    add(s, "high-late", range(3), priority=1, arrival=2.0, max_tokens=1)
    add(s, "high-early", range(3), priority=1, arrival=1.0, max_tokens=1)
    order = [next(iter(step(s, w)[0].num_scheduled_tokens)) for _ in range(3)]
    assert order == ["high-early", "high-late", "low"]


def test_no_admission_in_a_step_that_preempted():
    s, w = make_scheduler(num_blocks=5, caching=False), FakeWorker()
    add(s, "a", range(7), max_tokens=5)
    add(s, "b", range(20, 27), max_tokens=5)
    step(s, w)
    step(s, w)
    add(s, "c", [1], max_tokens=1)  # would fit in the budget, but blocks are contended
    so, _ = step(s, w)
    assert so.finished_request_ids == {"b"} and "c" not in so.num_scheduled_tokens


def test_stats_are_counters_since_previous_snapshot():
    s, w = make_scheduler(), FakeWorker()
    add(s, "a", range(9), max_tokens=3)
    step(s, w)
    add(s, "b", range(9), max_tokens=2)
    step(s, w)
    st = s.make_stats()
    assert (st.num_running_reqs, st.num_waiting_reqs) == (2, 0)
    assert st.num_prompt_tokens == 9 + 1 and st.num_generation_tokens == 3
    assert (st.prefix_cache_queries, st.prefix_cache_hits) == (18, 8)
    assert st.num_preemptions == 0 and 0 < st.kv_cache_usage < 1
    step(s, w)
    st = s.make_stats()
    assert st.num_prompt_tokens == 0 and st.num_generation_tokens == 2
    assert st.prefix_cache_queries == 0 and st.num_running_reqs == 0


def test_randomized_soak_keeps_kv_consistent_and_frees_everything():
    rng = random.Random(0)
    for policy in ("fcfs", "priority"):
        s = make_scheduler(num_blocks=24, max_model_len=40, budget=12, max_num_seqs=6,
                           policy=policy)
        w = FakeWorker()  # asserts KV content of every request every step
        prefixes = [list(range(k, k + 9)) for k in (0, 50, 90)]
        expected: dict[str, int] = {}
        got: dict[str, list] = {}
        aborted: set[str] = set()
        for i in range(60):
            prompt = rng.choice(prefixes)[:rng.randint(1, 9)] + [
                rng.randint(0, 30) for _ in range(rng.randint(0, 14))]
            max_tokens = rng.randint(1, 12)
            add(s, f"r{i}", prompt, max_tokens=max_tokens, priority=rng.randint(0, 3),
                arrival=float(i))
            expected[f"r{i}"] = min(max_tokens, 40 - len(prompt))
            if rng.random() < 0.15:
                aborted.update(s.finish_requests(f"r{rng.randint(0, i)}",
                                                 RequestStatus.FINISHED_ABORTED))
            for _ in range(rng.randint(0, 3)):
                for rid, o in step(s, w)[1].items():
                    got.setdefault(rid, []).append(o)
        for rid, outs in run(s, w, max_steps=2000).items():
            got.setdefault(rid, []).extend(outs)
        assert aborted
        for rid, n in expected.items():
            outs = got.get(rid, [])
            if rid in aborted:
                assert not (outs and outs[-1].finished), rid
                continue
            assert tokens(outs) == [100 + k for k in range(n)], rid
            assert outs[-1].finished and all(not o.finished for o in outs[:-1])
        assert_all_blocks_free(s)
        stats = s.make_stats()
        assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0
