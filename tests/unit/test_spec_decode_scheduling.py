"""The engine side of speculative decoding without a model: the scheduler gives a caught-up
request the n-gram proposer's drafts with KV slots for them, takes rejected positions back
off `num_computed_tokens`, counts drafts and acceptances, and steps aside (no drafts) for
large batches, structured output, the max_tokens / max_model_len limits and a short budget.
The metrics built from those counts are checked at the end."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from sluice.config import CacheConfig, SchedulerConfig
from sluice.core.request import Request
from sluice.core.sched.scheduler import Scheduler
from sluice.messages import SchedulerStats
from sluice.metrics.loggers import LoggingStatLogger
from sluice.metrics.spec_decode import SpecDecodeMetrics
from sluice.frontend.stats import FrontendStats
from sluice.sampling_params import SamplingParams, StructuredOutputsParams
from sluice.spec_decode.config import parse_speculative_config
from sluice.spec_decode.planner import SpeculationPlanner
from sluice.step import ModelRunnerOutput

PROMPT = [5, 6, 7, 8, 9, 5, 6, 7]   # the suffix "5 6 7" occurred before, followed by 8 9 5


def _scheduler(k: int = 3, budget: int = 64, max_model_len: int = 64,
               disable_by_batch_size: int = 100) -> Scheduler:
    spec = parse_speculative_config({"method": "ngram", "num_speculative_tokens": k,
                                     "prompt_lookup_min": 1, "prompt_lookup_max": 3,
                                     "disable_by_batch_size": disable_by_batch_size})
    return Scheduler(SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=8),
                     CacheConfig(block_size=4, enable_prefix_caching=True), max_model_len,
                     num_kv_blocks=64, speculation=SpeculationPlanner(spec, max_model_len))


def _request(rid: str = "r", prompt: list[int] = PROMPT, **params) -> Request:
    params.setdefault("max_tokens", 20)
    return Request(rid, prompt, SamplingParams(temperature=0.0, **params), None, 0.0)


def _prefilled(scheduler: Scheduler, request: Request, first_token: int) -> None:
    """Admit `request` and finish its prefill, sampling `first_token`."""
    scheduler.add_request(request)
    so = scheduler.schedule()
    assert so.num_scheduled_tokens[request.request_id] == request.num_prompt_tokens
    scheduler.update_from_output(so, ModelRunnerOutput(
        sampled_token_ids={request.request_id: [first_token]}))


def test_drafts_are_scheduled_with_slots_and_rejections_rolled_back():
    scheduler = _scheduler()
    request = _request()
    _prefilled(scheduler, request, 8)      # tokens ... 5 6 7 8: "7 8" -> 9 5 6
    so = scheduler.schedule()
    assert so.scheduled_spec_decode_tokens == {"r": [9, 5, 6]}
    assert so.num_scheduled_tokens["r"] == 4
    assert so.total_num_scheduled_tokens == 4
    assert request.num_computed_tokens == 9 + 3    # advanced over the drafts at schedule time
    blocks = scheduler.kv_cache_manager.get_block_ids("r")
    assert len(blocks) * 4 >= 9 + 3                  # slots for every draft position
    # the worker accepted 9 and 5, rejected 6 and emitted its own token 42
    outputs = scheduler.update_from_output(so, ModelRunnerOutput(
        sampled_token_ids={"r": [9, 5, 42]}))
    assert outputs[0].new_token_ids == [9, 5, 42]
    assert request.all_token_ids[-4:] == [8, 9, 5, 42]
    assert request.num_computed_tokens == request.num_tokens - 1 == 11
    stats = scheduler.make_stats()
    assert (stats.spec_decode_num_drafts, stats.spec_decode_num_draft_tokens,
            stats.spec_decode_num_accepted_tokens) == (1, 3, 2)
    assert stats.spec_decode_accepted_per_position == [1, 1, 0]
    assert scheduler.make_stats().spec_decode_num_drafts == 0   # counters reset


def test_all_rejected_leaves_one_new_token():
    scheduler = _scheduler()
    request = _request()
    _prefilled(scheduler, request, 8)
    so = scheduler.schedule()
    scheduler.update_from_output(so, ModelRunnerOutput(sampled_token_ids={"r": [77]}))
    assert request.num_computed_tokens == request.num_tokens - 1 == 9
    assert scheduler.make_stats().spec_decode_num_accepted_tokens == 0


def test_a_stop_inside_the_accepted_drafts_finishes_there():
    scheduler = _scheduler()
    request = _request(stop_token_ids=[5])
    _prefilled(scheduler, request, 8)
    so = scheduler.schedule()
    outputs = scheduler.update_from_output(so, ModelRunnerOutput(
        sampled_token_ids={"r": [9, 5, 6, 1]}))
    assert outputs[0].new_token_ids == [9, 5]
    assert outputs[0].finish_reason is not None and request.is_finished
    assert scheduler.kv_cache_manager.get_block_ids("r") == []   # freed


def test_limits_of_the_draft_count():
    # max_tokens: a step emits at most drafts + 1 tokens, so 2 outputs left -> 1 draft
    scheduler = _scheduler()
    request = _request(max_tokens=3)
    _prefilled(scheduler, request, 8)
    assert scheduler.schedule().scheduled_spec_decode_tokens == {"r": [9]}
    # max_model_len: drafts stay inside the context (9 tokens known, 11 allowed -> 2)
    scheduler = _scheduler(max_model_len=11)
    request = _request(max_tokens=None)
    _prefilled(scheduler, request, 8)
    assert scheduler.schedule().scheduled_spec_decode_tokens == {"r": [9, 5]}
    # the token budget: what is left after the request's own token
    scheduler = _scheduler(budget=10)
    request = _request()
    _prefilled(scheduler, request, 8)
    so = scheduler.schedule()
    assert so.scheduled_spec_decode_tokens == {"r": [9, 5, 6]}
    scheduler = _scheduler(budget=8)
    scheduler.add_request(_request("a"))
    scheduler.add_request(_request("b", prompt=[1, 2, 3, 4, 5, 6, 7]))
    so = scheduler.schedule()       # a's whole prompt, then 0 budget for b
    scheduler.update_from_output(so, ModelRunnerOutput(sampled_token_ids={"a": [8]}))
    so = scheduler.schedule()       # a decodes with its drafts, b's prefill takes the rest
    assert so.scheduled_spec_decode_tokens == {"a": [9, 5, 6]}
    assert so.num_scheduled_tokens == {"a": 4, "b": 4}


def test_no_drafts_for_large_batches_structured_output_or_without_a_match():
    scheduler = _scheduler(disable_by_batch_size=2)
    for rid in ("a", "b"):
        scheduler.add_request(_request(rid))
    so = scheduler.schedule()
    scheduler.update_from_output(so, ModelRunnerOutput(sampled_token_ids={"a": [8], "b": [8]}))
    so = scheduler.schedule()
    assert so.scheduled_spec_decode_tokens == {}
    assert so.num_scheduled_tokens == {"a": 1, "b": 1}

    scheduler = _scheduler()
    request = _request(structured_outputs=StructuredOutputsParams(regex="[0-9]+"))
    _prefilled(scheduler, request, 8)
    assert scheduler.schedule().scheduled_spec_decode_tokens == {}

    scheduler = _scheduler()
    _prefilled(scheduler, _request(prompt=[1, 2, 3]), 4)   # 4 never occurred before
    assert scheduler.schedule().scheduled_spec_decode_tokens == {}


def test_preemption_under_priority_keeps_drafts_consistent():
    """Six requests of mixed priorities on 9 KV blocks: requests are preempted (also ones
    already scheduled with drafts, under the priority policy), and every step's drafts
    belong to a scheduled request with 1 + drafts tokens; a worker that accepts every draft
    brings each request to exactly max_tokens outputs."""
    spec = parse_speculative_config({"method": "ngram", "num_speculative_tokens": 3,
                                     "prompt_lookup_min": 1, "disable_by_batch_size": 100})
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8,
                                          scheduling_policy="priority"),
                          CacheConfig(block_size=4, enable_prefix_caching=False), 64,
                          num_kv_blocks=9, speculation=SpeculationPlanner(spec, 64))
    outputs: dict[str, list[int]] = {}
    for i in range(6):
        request = Request(f"r{i}", [5, 6, 7, 8] * 2, SamplingParams(temperature=0.0,
                                                                     max_tokens=12),
                          None, float(i), priority=-i)
        scheduler.add_request(request)
    preemptions = 0
    for _ in range(200):
        if not scheduler.has_unfinished_requests():
            break
        so = scheduler.schedule()
        for rid, drafts in so.scheduled_spec_decode_tokens.items():
            assert so.num_scheduled_tokens[rid] == 1 + len(drafts)
            assert rid not in so.finished_request_ids
        sampled = {}
        for rid, n in so.num_scheduled_tokens.items():
            request = scheduler.requests[rid]
            if request.num_computed_tokens >= request.num_tokens:   # reached the end: sample
                sampled[rid] = so.scheduled_spec_decode_tokens.get(rid, []) + [5]
        for out in scheduler.update_from_output(so, ModelRunnerOutput(sampled)):
            outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
        preemptions += scheduler.make_stats().num_preemptions
    assert not scheduler.has_unfinished_requests()
    assert preemptions > 0
    assert sorted(outputs) == [f"r{i}" for i in range(6)]
    assert all(len(tokens) == 12 for tokens in outputs.values())


def test_log_line_and_prometheus_series():
    stats = SchedulerStats(num_running_reqs=1, spec_decode_num_drafts=4,
                           spec_decode_num_draft_tokens=12, spec_decode_num_accepted_tokens=6,
                           spec_decode_accepted_per_position=[4, 2, 0])
    logger = LoggingStatLogger()
    logger.record(stats, FrontendStats(num_generation_tokens=10))
    line = logger.log()
    assert ("SpecDecoding: Mean acceptance length: 2.50, Drafted tokens: 12, Accepted tokens: "
            "6, Draft acceptance rate: 50.0%, Per-position acceptance rate: 1.000, 0.500, "
            "0.000") in line

    registry = CollectorRegistry()
    metrics = SpecDecodeMetrics(registry)
    metrics.record(stats, ("m", "0"))
    metrics.record(stats, ("m", "0"))
    text = generate_latest(registry).decode()
    for series, value in (
            ('vllm:spec_decode_num_drafts_total{engine="0",model_name="m"}', 8.0),
            ('vllm:spec_decode_num_draft_tokens_total{engine="0",model_name="m"}', 24.0),
            ('vllm:spec_decode_num_accepted_tokens_total{engine="0",model_name="m"}', 12.0),
            ('vllm:spec_decode_num_emitted_tokens_total{engine="0",model_name="m"}', 20.0),
            ('vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="m",'
             'position="1"}', 4.0),
            ('vllm:spec_decode_draft_acceptance_rate{engine="0",model_name="m"}', 0.5),
            ('vllm:spec_decode_mean_acceptance_length{engine="0",model_name="m"}', 2.5)):
        assert f"{series} {value}" in text, series


def test_worker_drafts_are_used_only_for_the_state_they_continue():
    spec = parse_speculative_config({"model": "/draft", "num_speculative_tokens": 3,
                                     "disable_by_batch_size": 100})
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8),
                          CacheConfig(block_size=4, enable_prefix_caching=True), 64,
                          num_kv_blocks=64, speculation=SpeculationPlanner(spec, 64))
    request = _request(prompt=[1, 2, 3, 4, 5])
    scheduler.add_request(request)
    so = scheduler.schedule()
    assert so.propose_drafts   # the worker's draft model is asked to propose
    assert len(scheduler.kv_cache_manager.get_block_ids("r")) * 4 >= 5 + 3   # lookahead slots
    scheduler.update_from_output(so, ModelRunnerOutput(sampled_token_ids={"r": [6]},
                                                       draft_token_ids={"r": [7, 8, 9]}))
    so = scheduler.schedule()
    assert so.scheduled_spec_decode_tokens == {"r": [7, 8, 9]}
    scheduler.update_from_output(so, ModelRunnerOutput(sampled_token_ids={"r": [7, 1]},
                                                       draft_token_ids={"r": [2, 3, 4]}))
    assert request.num_computed_tokens == request.num_tokens - 1 == 7
    # drafts proposed for an older state of the request are not used
    scheduler.speculation.take_worker_drafts(request, [5, 5, 5])
    request.append_output_token_ids(9)   # the request moved on since
    assert scheduler.speculation.propose(request) == []


def test_ngram_backs_off_after_full_rejections():
    """A request whose drafts were all rejected skips proposing for 1, then 2, then 4 steps
    (drafts would cost a verification forward for one token); an acceptance resets it."""
    scheduler = _scheduler()
    request = _request(prompt=[5, 6, 7, 8] * 3, max_tokens=60)
    _prefilled(scheduler, request, 5)
    pattern = []
    for _ in range(10):
        so = scheduler.schedule()
        drafts = so.scheduled_spec_decode_tokens.get("r", [])
        pattern.append(len(drafts) > 0)
        # reject everything: emit a token that never continues the pattern's n-grams
        scheduler.update_from_output(so, ModelRunnerOutput(sampled_token_ids={"r": [5]}))
    assert pattern[:8] == [True, False, True, False, False, True, False, False]
    so = scheduler.schedule()
    while not so.scheduled_spec_decode_tokens:
        scheduler.update_from_output(so, ModelRunnerOutput(sampled_token_ids={"r": [5]}))
        so = scheduler.schedule()
    drafts = so.scheduled_spec_decode_tokens["r"]
    scheduler.update_from_output(so, ModelRunnerOutput(sampled_token_ids={"r": drafts[:1] + [5]}))
    assert request.draft_state.backoff == 0   # an acceptance resets the backoff
