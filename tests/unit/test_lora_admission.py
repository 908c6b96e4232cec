"""The `--max-loras` admission rule (`sluice.lora.admission`) inside the real scheduler, and the
prefix cache keyed by adapter. No torch: a tiny fake worker samples token 7 for every request
whose prompt is computed."""

from __future__ import annotations

from sluice.config import CacheConfig, SchedulerConfig
from sluice.core.kv_cache.hashing import block_extra_keys, hash_token_blocks
from sluice.core.request import Request
from sluice.core.sched.scheduler import Scheduler
from sluice.lora.admission import LoRAAdmission
from sluice.lora.request import LoRARequest
from sluice.messages import EngineCoreRequest
from sluice.sampling_params import SamplingParams
from sluice.step import ModelRunnerOutput, SchedulerOutput

BS = 4
ADAPTERS = {i: LoRARequest(f"a{i}", i, f"/adapters/a{i}") for i in range(1, 6)}


def make_scheduler(max_loras: int | None = 2, *, max_num_seqs: int = 16,
                   num_blocks: int = 128, caching: bool = True) -> Scheduler:
    return Scheduler(
        SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=256),
        CacheConfig(block_size=BS, enable_prefix_caching=caching), 64, num_blocks,
        admission=None if max_loras is None else LoRAAdmission(max_loras))


def add(s: Scheduler, rid: str, lora: int = 0, *, max_tokens: int = 4,
        prompt: list[int] | None = None) -> Request:
    request = Request(rid, prompt or [1, 2, 3], SamplingParams(max_tokens=max_tokens,
                                                               ignore_eos=True),
                      None, 0.0, lora_request=ADAPTERS.get(lora))
    s.add_request(request)
    return request


def step(s: Scheduler) -> SchedulerOutput:
    so = s.schedule()
    sampled = {}
    for rid, n in so.num_scheduled_tokens.items():
        r = s.requests[rid]
        if r.num_computed_tokens >= r.num_tokens:   # advanced at schedule time
            sampled[rid] = [7]
    s.update_from_output(so, ModelRunnerOutput(sampled_token_ids=sampled))
    return so


def running_adapters(s: Scheduler) -> set[int]:
    return {r.lora_int_id for r in s.running if r.lora_int_id}


def test_at_most_max_loras_adapters_per_step_base_not_counted():
    s = make_scheduler(max_loras=2)
    for rid, lora in [("x1", 1), ("b1", 0), ("x2", 2), ("x3", 3), ("b2", 0), ("y2", 2),
                      ("y1", 1)]:
        add(s, rid, lora)
    so = step(s)
    admitted = [r.request_id for r in so.scheduled_new_reqs]
    # x3 is skipped (both slots taken) and keeps its place; base and adapter 2 still get in;
    # adapter 1 (fewest running, lowest id) drains for x3, so y1 behind x3 waits
    assert admitted == ["x1", "b1", "x2", "b2", "y2"]
    assert {r.request_id: r.lora_request for r in so.scheduled_new_reqs}["x2"] == ADAPTERS[2]
    assert [r.request_id for r in s.waiting] == ["x3", "y1"]
    stats = s.make_stats()
    assert stats.running_lora_adapters == {"a1": 1, "a2": 2}
    assert stats.waiting_lora_adapters == {"a3": 1, "a1": 1}


def test_every_step_respects_the_limit_and_all_finish():
    s = make_scheduler(max_loras=2, max_num_seqs=5)
    for i in range(30):
        add(s, f"r{i}", lora=(i * 7) % 6, max_tokens=1 + i % 5)   # adapters 0 (base) .. 5
    for _ in range(500):
        if not s.has_unfinished_requests():
            break
        step(s)
        assert len(running_adapters(s)) <= 2
    assert not s.has_unfinished_requests()


def test_blocked_request_is_not_starved_by_later_arrivals():
    """Adapters 1 and 2 hold both slots and keep receiving requests every step; the request
    of adapter 3 still gets in once the draining adapter (the one with fewer running) ends."""
    s = make_scheduler(max_loras=2)
    add(s, "one-1", 1, max_tokens=3)
    add(s, "two-1", 2, max_tokens=50)
    add(s, "two-2", 2, max_tokens=50)
    add(s, "three", 3)
    step(s)
    assert running_adapters(s) == {1, 2}
    admitted_three_at = None
    for i in range(40):
        add(s, f"one-late-{i}", 1, max_tokens=50)   # would keep adapter 1 active forever
        add(s, f"two-late-{i}", 2, max_tokens=2)
        so = step(s)
        assert len(running_adapters(s)) <= 2
        if any(r.request_id == "three" for r in so.scheduled_new_reqs):
            admitted_three_at = i
            break
        # adapter 1 drains: none of its later arrivals is admitted; adapter 2 keeps flowing
        assert not any(r.request_id.startswith("one-late") for r in so.scheduled_new_reqs)
    assert admitted_three_at is not None and admitted_three_at <= 4
    assert running_adapters(s) == {2, 3}


def test_older_requests_of_the_draining_adapter_still_go_first():
    policy = LoRAAdmission(max_loras=1)
    s = make_scheduler(max_loras=None)
    running = add(s, "run", 1)
    policy.begin_step([running])
    older, blocked, newer = (Request(rid, [1], SamplingParams(), None, 0.0,
                                     lora_request=ADAPTERS[lora])
                             for rid, lora in (("older", 1), ("blocked", 2), ("newer", 1)))
    assert policy.may_admit(older)
    policy.admitted(older)
    assert not policy.may_admit(blocked) and policy.draining == 1
    assert not policy.may_admit(newer)
    base = Request("base", [1], SamplingParams(), None, 0.0)
    assert policy.may_admit(base)
    policy.begin_step([])          # adapter 1 finished: its slot is free again
    assert policy.draining is None and policy.may_admit(blocked)


def test_engine_request_carries_the_adapter_to_the_worker():
    core_request = EngineCoreRequest("r", [1, 2, 3], SamplingParams(), None, 0.0,
                                     lora_request=ADAPTERS[4])
    request = Request.from_engine_core_request(core_request)
    assert request.lora_request == ADAPTERS[4] and request.lora_int_id == 4
    s = make_scheduler()
    s.add_request(request)
    assert s.schedule().scheduled_new_reqs[0].lora_request == ADAPTERS[4]


# ---- prefix cache keyed by adapter -----------------------------------------------------------

def test_block_extra_keys():
    assert block_extra_keys(0, None) is None and block_extra_keys(3, None, 0) is None
    assert block_extra_keys(0, "s", 2) == ("salt", "s", "lora", 2)
    assert block_extra_keys(1, "s", 2) == ("lora", 2)
    tokens = list(range(12))
    base = hash_token_blocks(tokens, BS)
    a1, a2 = hash_token_blocks(tokens, BS, lora_int_id=1), hash_token_blocks(tokens, BS,
                                                                              lora_int_id=2)
    assert len({*base, *a1, *a2}) == 9   # no block hash shared between the three
    assert hash_token_blocks(tokens, BS, lora_int_id=1) == a1   # stable


def test_same_prompt_under_two_adapters_or_base_shares_no_blocks():
    prompt = list(range(1, 14))   # 3 full blocks + 1 token
    s = make_scheduler(max_loras=3)
    s.kv_cache_manager.enable_kv_cache_events()
    add(s, "first-a1", 1, prompt=prompt, max_tokens=1)
    step(s)
    assert not s.has_unfinished_requests()
    stored = [e for e in s.kv_cache_manager.take_events() if type(e).__name__ == "BlockStored"]
    assert stored and all(e.lora_id == 1 for e in stored)   # KV events name the adapter
    # the blocks of "first-a1" stay cached; only the same adapter finds them
    for rid, lora, expected_hit in [("a2", 2, 0), ("base", 0, 0), ("again-a1", 1, 12)]:
        request = add(s, rid, lora, prompt=prompt, max_tokens=1)
        step(s)
        assert request.num_cached_tokens == expected_hit, rid
    stats = s.make_stats()
    assert stats.prefix_cache_hits == 12
