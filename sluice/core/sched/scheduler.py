"""The scheduler: one token budget per step, running requests first, then waiting ones.

Contract of one engine step (`EngineCore.step`)::

    so  = scheduler.schedule()                 # decides tokens per request; advances
                                               # request.num_computed_tokens by them
    out = executor.execute_model(so)           # computes exactly those tokens
    eco = scheduler.update_from_output(so, out)  # appends sampled tokens, checks stops,
                                                 # frees finished requests' blocks

`num_computed_tokens` is advanced at *schedule* time (as in vLLM): once `schedule()` returns, it
counts the tokens this step writes to the KV cache. The `SchedulerOutput` carries the value
*before* the step (what the worker's KV cache already holds). `update_from_output` never moves it.

Policy:
1. RUNNING requests, in order, get `min(num_tokens - num_computed_tokens, budget left)` tokens
   (1 for a decode, a chunk for a prefill). When blocks run out, the tail of the running list
   (fcfs: the last admitted; priority: largest priority value, then latest arrival) is preempted:
   blocks freed, `num_computed_tokens = 0`, back to the front of the waiting queue. This repeats
   until the allocation fits or the request preempted itself.
2. Only if nobody was preempted this step: admit WAITING requests in queue order while the budget,
   `max_num_seqs` and free blocks allow: prefix-cache lookup, then a (possibly chunked) prefill.
   The head of the queue is never skipped for budget or blocks (the walk ends there). Only an
   admission policy (`hooks.AdmissionPolicy`, e.g. `--max-loras`: `sluice.lora.admission`)
   may skip a request: it keeps its place in the queue and the walk goes on behind it.

New and resumed requests are sent in full (`NewRequestData`, prompt + outputs so far, all block
ids); running ones as diffs (`CachedRequestData`, only newly allocated block ids).
`finished_request_ids` = requests finished, aborted or preempted since the previous `schedule()`.

In flight: a request scheduled in a step whose `update_from_output` has not run yet is in
`in_flight`. With pipeline parallelism the engine core keeps several steps in the pipeline (its
batch queue), and such a request is skipped by later `schedule()` calls until its output is
back: it is neither scheduled again (its next token is not known yet) nor chosen for
preemption (its blocks are still being written); a request that must preempt someone and
finds only in-flight requests behind it preempts itself. Without pipeline parallelism each
step is updated before the next is scheduled, so `in_flight` is empty at every `schedule()`.
With pp > 1 the cached requests also carry their sampled tokens (`sluice.step`), and one step
schedules at most ceil(max_num_seqs / pp) sequences (`max_seqs_per_step`), so the running
requests spread over pp batches that overlap in the pipeline.

Hooks (`core.sched.hooks`, e.g. a KV connector; None: none of this happens): a waiting request
whose prompt an outside source supplies is allocated blocks and parked in
`waiting_for_remote_kv` (status WAITING_FOR_REMOTE_KV: neither scheduled nor freed) until a
step's output reports its load done (back to the front of the waiting queue with the loaded
tokens computed) or failed (blocks freed, recomputed from scratch). A finished request whose
blocks a hook holds (`on_finish`) leaves `requests` but keeps its blocks in `held` until the
hook releases them (`on_output` or `released`); `has_unfinished_requests` stays True meanwhile
so that the engine keeps stepping.

Speculative decoding (`speculation`, a `spec_decode.planner.SpeculationPlanner`; None: off):
a running request that has caught up (its one uncomputed token is the last sampled one) may
get d draft tokens this step. It is scheduled for 1 + d tokens, its KV slots cover the d
lookahead positions, and the drafts travel in `SchedulerOutput.scheduled_spec_decode_tokens`.
`num_computed_tokens` advances by 1 + d at schedule time like any scheduled token; when the
worker emits e tokens (e - 1 drafts accepted, 1 <= e <= d + 1), `update_from_output` takes
the d + 1 - e rejected positions back off `num_computed_tokens` (their KV slots stay
allocated and are overwritten by later steps; only full blocks of known tokens are ever
offered to the prefix cache, so rejected KV is never cached). Drafts ride on the token
budget: a request gets only as many as the budget left after its own token. With a draft
model the drafts come from the worker (`ModelRunnerOutput.draft_token_ids`, kept by the
planner), and while speculation is on every scheduled request gets `extra_lookahead` more KV
slots, where the draft model writes while it proposes (`spec_decode.draft_model`).
"""

from __future__ import annotations

import time

from dataclasses import dataclass, field
from typing import Iterable

from sluice.config import CacheConfig, SchedulerConfig
from sluice.core.kv_cache.hashing import make_block_hasher
from sluice.core.kv_cache.manager import KVCacheManager
from sluice.core.request import Request, RequestStatus
from sluice.core.sched.hooks import AdmissionPolicy, HookReport, SchedulerHooks
from sluice.core.sched.queues import create_request_queue
from sluice.core.sched.stop import check_stop
from sluice.errors import ConfigError
from sluice.messages import EngineCoreOutput, SchedulerStats
from sluice.spec_decode.planner import SpeculationPlanner
from sluice.step import (CachedRequestData, ModelRunnerOutput, NewRequestData,
                         SchedulerOutput)


@dataclass
class _StepPlan:
    """What one `schedule()` call has decided so far."""
    budget: int
    new_reqs: list[Request] = field(default_factory=list)      # new or resumed
    cached_reqs: list[Request] = field(default_factory=list)   # running from before
    num_scheduled: dict[str, int] = field(default_factory=dict)
    new_block_ids: dict[str, list[int]] = field(default_factory=dict)
    spec_tokens: dict[str, list[int]] = field(default_factory=dict)   # draft tokens
    num_preempted: int = 0
    lookahead: int = 0   # extra KV slots for every scheduled request (a draft model's)


class Scheduler:
    """Decides, each step, which tokens of which requests run. Pure Python; no torch."""

    def __init__(self, scheduler_config: SchedulerConfig, cache_config: CacheConfig,
                 max_model_len: int, num_kv_blocks: int, pipeline_parallel_size: int = 1,
                 hooks: SchedulerHooks | None = None,
                 admission: AdmissionPolicy | None = None,
                 speculation: SpeculationPlanner | None = None):
        self.config = scheduler_config
        self.speculation = speculation   # speculative decoding's drafts; None: off
        self.hooks = hooks   # `core.sched.hooks`: a KV connector; None: none of that
        self.admission = admission   # e.g. the --max-loras limit; None: budget and blocks only
        self.max_model_len = max_model_len
        self.max_num_seqs = scheduler_config.max_num_seqs
        self.token_budget = scheduler_config.token_budget
        self.enable_chunked_prefill = scheduler_config.enable_chunked_prefill
        self.policy = scheduler_config.scheduling_policy
        if not self.enable_chunked_prefill and self.token_budget < max_model_len:
            raise ConfigError(
                f"--max-num-batched-tokens ({self.token_budget}) is smaller than "
                f"max_model_len ({max_model_len}) with chunked prefill disabled, so a long "
                f"prompt could never be scheduled; raise --max-num-batched-tokens to at least "
                f"{max_model_len}, lower --max-model-len, or enable chunked prefill.")

        self.kv_cache_manager = KVCacheManager(num_kv_blocks, cache_config.block_size,
                                               cache_config.enable_prefix_caching,
                                               max_model_len)
        # Attach to each Request (done by `add_request` if the caller did not).
        self.block_hasher = (make_block_hasher(cache_config.block_size)
                             if cache_config.enable_prefix_caching else None)

        self.requests: dict[str, Request] = {}
        self.waiting = create_request_queue(self.policy)
        self.running: list[Request] = []
        self.finished_req_ids: set[str] = set()
        self.in_flight: set[str] = set()   # scheduled, output not back yet (see module doc)
        # hooks: requests in WAITING_FOR_REMOTE_KV -> tokens computed once their load is done;
        # finished requests whose blocks a hook holds (`on_finish`) until it releases them
        self.waiting_for_remote_kv: dict[str, tuple[Request, int]] = {}
        self.held: dict[str, Request] = {}
        self.send_token_ids = pipeline_parallel_size > 1
        # Sequences one step may schedule: with pp stages in flight, each batch takes its share
        # of max_num_seqs, so a burst of requests fills pp batches and the stages overlap
        # instead of one batch holding every request while the other stages idle.
        self.max_seqs_per_step = -(-self.max_num_seqs // pipeline_parallel_size)
        # Counters since the previous make_stats().
        self._num_preemptions = 0
        self._num_prompt_tokens = 0
        self._num_generation_tokens = 0

    # ---- requests in and out ------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        assert request.request_id not in self.requests, f"duplicate {request.request_id!r}"
        assert request.num_tokens <= self.max_model_len, (
            f"{request.request_id}: prompt of {request.num_tokens} tokens exceeds "
            f"max_model_len {self.max_model_len}; the frontend must reject it")
        if self.block_hasher is not None and request.block_hasher is None:
            request.set_block_hasher(self.block_hasher)
        self.requests[request.request_id] = request
        self.waiting.add(request)

    def finish_requests(self, request_ids: str | Iterable[str],
                        finished_status: RequestStatus) -> list[str]:
        """Finish (typically abort) requests wherever they are; unknown or already finished
        ids are ignored. Frees their blocks. Returns the ids actually finished."""
        assert finished_status.is_finished
        if isinstance(request_ids, str):
            request_ids = (request_ids,)
        running_ids: set[str] = set()
        waiting_ids: set[str] = set()
        for rid in request_ids:
            request = self.requests.pop(rid, None)
            if request is None:
                continue
            if request.status == RequestStatus.RUNNING:
                running_ids.add(rid)
                self.finished_req_ids.add(rid)  # the worker holds its state
            elif self.waiting_for_remote_kv.pop(rid, None) is None:
                waiting_ids.add(rid)
            request.status = finished_status
            if self.hooks is not None:   # an abort never holds blocks
                self.hooks.on_finish(request, self.kv_cache_manager.get_block_ids(rid))
            self.kv_cache_manager.free(request)
        if running_ids:
            self.running = [r for r in self.running if r.request_id not in running_ids]
        if waiting_ids:
            self.waiting.remove_requests(waiting_ids)
        return [*running_ids, *waiting_ids]

    def get_num_unfinished_requests(self) -> int:
        return len(self.waiting) + len(self.running) + len(self.waiting_for_remote_kv)

    def has_unfinished_requests(self) -> bool:
        """Unfinished requests, or (with hooks) held blocks that a later step releases."""
        return self.get_num_unfinished_requests() > 0 or bool(self.held)

    def has_finished_requests(self) -> bool:
        """Whether finished ids still have to reach the workers (via the next schedule())."""
        return bool(self.finished_req_ids)

    def reset_prefix_cache(self) -> bool:
        return self.kv_cache_manager.reset_prefix_cache()

    # ---- schedule ----------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        plan = _StepPlan(budget=self.token_budget)
        if self.hooks is not None:
            self._release_held(self.hooks.released())
        self._schedule_running(plan)
        if plan.num_preempted == 0:
            self._schedule_waiting(plan)
        output = self._make_output(plan)
        self._advance_computed_tokens(plan)
        self.in_flight.update(plan.num_scheduled)
        return output

    def _schedule_running(self, plan: _StepPlan) -> None:
        i = 0
        speculation = self.speculation
        if speculation is not None and not speculation.drafts_enabled(len(self.running)):
            speculation = None
        if speculation is not None:
            plan.lookahead = speculation.extra_lookahead
        while (i < len(self.running) and plan.budget > 0
               and len(plan.num_scheduled) < self.max_seqs_per_step):
            request = self.running[i]
            num_new = min(request.num_tokens - request.num_computed_tokens, plan.budget)
            if num_new <= 0 or request.request_id in self.in_flight:
                i += 1
                continue
            drafts: list[int] = []
            if speculation is not None and num_new == 1 == (request.num_tokens
                                                            - request.num_computed_tokens):
                drafts = speculation.propose(request)[:plan.budget - 1]
            lookahead = len(drafts) + plan.lookahead
            while (new_ids := self.kv_cache_manager.allocate_slots(
                    request, num_new, num_lookahead_tokens=lookahead)) is None:
                victim_index = self._victim_index()
                victim = self.running.pop(victim_index)
                self._preempt(victim, plan)
                if victim is request:
                    break
                if victim_index < i:  # an already scheduled request (priority policy)
                    i -= 1
            if new_ids is None:
                continue  # `request` preempted itself; running[i] is the next one
            plan.cached_reqs.append(request)
            plan.new_block_ids[request.request_id] = new_ids
            if drafts:
                plan.spec_tokens[request.request_id] = drafts
                num_new += len(drafts)
            plan.num_scheduled[request.request_id] = num_new
            plan.budget -= num_new
            i += 1

    def _victim_index(self) -> int:
        """Index in `running` of the request to preempt: the tail (fcfs), or the largest
        (priority, arrival_time) (priority policy), among those not in flight (the request
        being scheduled is not, so there is always one)."""
        running, in_flight = self.running, self.in_flight
        if self.policy == "priority":
            return max((j for j in range(len(running))
                        if running[j].request_id not in in_flight),
                       key=lambda j: (running[j].priority, running[j].arrival_time))
        j = len(running) - 1
        while running[j].request_id in in_flight:
            j -= 1
        return j

    def _preempt(self, request: Request, plan: _StepPlan) -> None:
        """Free `request`'s blocks and send it back to the front of the waiting queue (it is
        recomputed from scratch, with whatever the prefix cache still holds)."""
        rid = request.request_id
        self.kv_cache_manager.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.pending_prompt_logprobs = []
        if rid in plan.num_scheduled:  # undo its place in this step
            plan.budget += plan.num_scheduled.pop(rid)
            plan.new_block_ids.pop(rid)
            plan.spec_tokens.pop(rid, None)
            plan.cached_reqs = [r for r in plan.cached_reqs if r is not request]
        self.waiting.prepend(request)
        self.finished_req_ids.add(rid)  # the worker must forget it
        plan.num_preempted += 1
        self._num_preemptions += 1

    def _schedule_waiting(self, plan: _StepPlan) -> None:
        admission = self.admission
        if admission is None:
            self._admit_waiting(plan, None)
            return
        admission.begin_step(self.running)
        skipped: list[Request] = []
        try:
            self._admit_waiting(plan, skipped)
        finally:   # the skipped requests go back to their places, in order
            for request in reversed(skipped):
                self.waiting.prepend(request)

    def _admit_waiting(self, plan: _StepPlan, skipped: list[Request] | None) -> None:
        """Admit from the head of the waiting queue; requests the admission policy refuses
        are moved to `skipped` (None: there is no policy)."""
        kv = self.kv_cache_manager
        admission = self.admission
        while (self.waiting and plan.budget > 0 and len(self.running) < self.max_num_seqs
               and len(plan.num_scheduled) < self.max_seqs_per_step):
            request = self.waiting.peek()
            if admission is not None and not admission.may_admit(request):
                skipped.append(self.waiting.pop())
                continue
            if request.num_computed_tokens:   # back from a remote KV load, holding its blocks
                hit_blocks, num_hit = [], 0
            else:
                hit_blocks, num_hit = kv.get_computed_blocks(request)
                if self.hooks is not None and request.num_cached_tokens < 0:
                    num_external, load_async = self.hooks.on_admit(request, num_hit)
                    if num_external:
                        assert load_async, "only asynchronous external loads are supported"
                        if not self._wait_for_remote_kv(request, hit_blocks, num_hit,
                                                        num_external):
                            break
                        continue
            num_new = request.num_tokens - request.num_computed_tokens - num_hit
            if num_new > plan.budget:
                if not self.enable_chunked_prefill:
                    break
                num_new = plan.budget
            if kv.allocate_slots(request, num_new, num_hit, hit_blocks,
                                 num_lookahead_tokens=plan.lookahead) is None:
                break
            self.waiting.pop()
            if request.num_cached_tokens < 0:   # first admission
                request.num_cached_tokens = num_hit
                request.scheduled_time = time.monotonic()
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens += num_hit
            self.running.append(request)
            if admission is not None:
                admission.admitted(request)
            plan.new_reqs.append(request)
            plan.num_scheduled[request.request_id] = num_new
            plan.budget -= num_new

    # ---- hooks: external KV (`core.sched.hooks`) -------------------------------------------
    def _wait_for_remote_kv(self, request: Request, hit_blocks: list, num_hit: int,
                            num_external: int) -> bool:
        """Allocate blocks for the local hit plus `num_external` tokens loaded from outside
        (not offered to the prefix cache until they have arrived) and park the request in
        WAITING_FOR_REMOTE_KV. False (nothing changed) when the blocks do not fit."""
        kv = self.kv_cache_manager
        if kv.allocate_slots(request, num_external, num_hit, hit_blocks,
                             delay_cache_blocks=True) is None:
            return False
        self.waiting.pop()
        request.num_cached_tokens = num_hit + num_external
        request.scheduled_time = time.monotonic()
        request.status = RequestStatus.WAITING_FOR_REMOTE_KV
        request.num_computed_tokens = num_hit
        self.hooks.after_allocate(request, kv.get_block_ids(request.request_id), num_external)
        self.waiting_for_remote_kv[request.request_id] = (request, num_hit + num_external)
        return True

    def _apply_hook_report(self, report: HookReport) -> None:
        """Loads done: the request is schedulable with the loaded tokens computed. Loads
        failed: its blocks are freed and it is recomputed from scratch. Held: freed."""
        for rid in report.finished_loading:
            request, num_loaded = self.waiting_for_remote_kv.pop(rid, (None, 0))
            if request is not None:
                self.kv_cache_manager.cache_blocks(request, num_loaded)
                request.num_computed_tokens = num_loaded
                request.status = RequestStatus.WAITING
                self.waiting.prepend(request)
        for rid in report.failed_loading:
            request, _ = self.waiting_for_remote_kv.pop(rid, (None, 0))
            if request is not None:
                self.kv_cache_manager.free(request)
                request.num_computed_tokens = 0
                request.num_cached_tokens = -1
                request.status = RequestStatus.WAITING
                self.waiting.prepend(request)
        self._release_held(report.released)

    def _release_held(self, request_ids: Iterable[str]) -> None:
        for rid in request_ids:
            request = self.held.pop(rid, None)
            if request is not None:
                self.kv_cache_manager.free(request)

    def _make_output(self, plan: _StepPlan) -> SchedulerOutput:
        """Build the step's diff; must run before `_advance_computed_tokens`."""
        kv = self.kv_cache_manager
        new_reqs = [
            NewRequestData(request_id=r.request_id, token_ids=list(r.all_token_ids),
                           num_prompt_tokens=r.num_prompt_tokens,
                           sampling_params=r.sampling_params,
                           block_ids=kv.get_block_ids(r.request_id),
                           num_computed_tokens=r.num_computed_tokens,
                           eos_token_id=r.eos_token_id, lora_request=r.lora_request)
            for r in plan.new_reqs]
        cached_reqs = [
            CachedRequestData(request_id=r.request_id,
                              new_block_ids=plan.new_block_ids[r.request_id],
                              num_computed_tokens=r.num_computed_tokens,
                              new_token_ids=self._sampled_token_ids(r, plan))
            for r in plan.cached_reqs]
        finished, self.finished_req_ids = self.finished_req_ids, set()
        return SchedulerOutput(
            scheduled_new_reqs=new_reqs, scheduled_cached_reqs=cached_reqs,
            num_scheduled_tokens=dict(plan.num_scheduled),
            total_num_scheduled_tokens=sum(plan.num_scheduled.values()),
            finished_request_ids=finished,
            scheduled_spec_decode_tokens=plan.spec_tokens,
            propose_drafts=plan.lookahead > 0,
            kv_connector_metadata=self.hooks.step_metadata() if self.hooks else None)

    def _sampled_token_ids(self, request: Request, plan: _StepPlan) -> list[int]:
        """With pp > 1: the sampled tokens among those this step computes (`sluice.step`)."""
        if not self.send_token_ids:
            return []
        start = request.num_computed_tokens
        end = start + plan.num_scheduled[request.request_id]
        return request.all_token_ids[max(start, request.num_prompt_tokens):end]

    def _advance_computed_tokens(self, plan: _StepPlan) -> None:
        for rid, num_new in plan.num_scheduled.items():
            request = self.requests[rid]
            start = request.num_computed_tokens
            self._num_prompt_tokens += max(0, min(start + num_new, request.num_prompt_tokens)
                                           - start)
            request.num_computed_tokens = start + num_new

    # ---- update ------------------------------------------------------------------------
    def update_from_output(self, scheduler_output: SchedulerOutput,
                           model_runner_output: ModelRunnerOutput) -> list[EngineCoreOutput]:
        """Append each scheduled request's sampled tokens, check stops, free finished
        requests. Returns one output per request that produced tokens or finished; requests
        aborted since `schedule()` are skipped."""
        self.in_flight.difference_update(scheduler_output.num_scheduled_tokens)
        if self.hooks is not None:
            self._apply_hook_report(self.hooks.on_output(model_runner_output))
        outputs: list[EngineCoreOutput] = []
        finished_ids: set[str] = set()
        sampled_by_id = model_runner_output.sampled_token_ids
        spec_tokens = scheduler_output.scheduled_spec_decode_tokens
        for rid in scheduler_output.num_scheduled_tokens:
            request = self.requests.get(rid)
            if request is None or request.status != RequestStatus.RUNNING:
                continue
            if rid in spec_tokens:
                self._take_back_rejected(request, len(spec_tokens[rid]),
                                         len(sampled_by_id.get(rid, ())))
            before_first_token = request.num_output_tokens == 0
            if before_first_token and rid in model_runner_output.prompt_logprobs:
                request.pending_prompt_logprobs.extend(model_runner_output.prompt_logprobs[rid])
            new_token_ids: list[int] = []
            for token_id in sampled_by_id.get(rid, ()):
                request.append_output_token_ids(token_id)
                new_token_ids.append(token_id)
                if check_stop(request, self.max_model_len):
                    break
            if not new_token_ids:
                continue
            self._num_generation_tokens += len(new_token_ids)
            if rid in model_runner_output.draft_token_ids and not request.is_finished:
                self.speculation.take_worker_drafts(request,
                                                    model_runner_output.draft_token_ids[rid])
            outputs.append(self._make_core_output(request, new_token_ids, model_runner_output,
                                                  before_first_token))
            if request.is_finished:
                finished_ids.add(rid)
                outputs[-1].kv_transfer_params = self._free_finished(request)
        if finished_ids:
            self.running = [r for r in self.running if r.request_id not in finished_ids]
        return outputs

    def _take_back_rejected(self, request: Request, num_draft: int, num_emitted: int) -> None:
        """Speculative decoding: of the 1 + num_draft positions computed, the last
        num_draft + 1 - num_emitted held rejected drafts; they are not computed after all."""
        request.num_computed_tokens -= num_draft + 1 - num_emitted
        self.speculation.record(request, num_draft, num_emitted)

    def _make_core_output(self, request: Request, new_token_ids: list[int],
                          model_runner_output: ModelRunnerOutput,
                          first_tokens: bool) -> EngineCoreOutput:
        logprobs = model_runner_output.logprobs.get(request.request_id)
        if logprobs is not None:
            logprobs = logprobs[:len(new_token_ids)]
        prompt_logprobs = None
        if first_tokens and request.sampling_params.prompt_logprobs is not None:
            prompt_logprobs, request.pending_prompt_logprobs = (
                request.pending_prompt_logprobs, [])
        return EngineCoreOutput(
            request_id=request.request_id, new_token_ids=new_token_ids,
            new_logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            finish_reason=request.finish_reason, stop_reason=request.stop_reason,
            num_cached_tokens=max(0, request.num_cached_tokens),
            scheduled_time=request.scheduled_time if first_tokens else 0.0)

    def _free_finished(self, request: Request) -> dict | None:
        """Free a finished request's blocks, unless a hook holds them (`self.held`); returns
        the hook's parameters for its output (kv_transfer_params)."""
        hold, params = False, None
        if self.hooks is not None:
            hold, params = self.hooks.on_finish(
                request, self.kv_cache_manager.get_block_ids(request.request_id))
        if hold:
            self.held[request.request_id] = request
        else:
            self.kv_cache_manager.free(request)
        del self.requests[request.request_id]
        self.finished_req_ids.add(request.request_id)
        return params

    # ---- stats -------------------------------------------------------------------------
    def make_stats(self) -> SchedulerStats:
        """A snapshot; the counters cover the time since the previous call."""
        prefix = self.kv_cache_manager.take_prefix_cache_stats()
        stats = SchedulerStats(
            num_running_reqs=len(self.running), num_waiting_reqs=len(self.waiting),
            kv_cache_usage=self.kv_cache_manager.usage,
            prefix_cache_queries=prefix.queries, prefix_cache_hits=prefix.hits,
            num_preemptions=self._num_preemptions, num_prompt_tokens=self._num_prompt_tokens,
            num_generation_tokens=self._num_generation_tokens)
        self._num_preemptions = self._num_prompt_tokens = self._num_generation_tokens = 0
        if self.admission is not None:   # with --enable-lora (the only policy so far)
            stats.running_lora_adapters = _count_adapters(self.running)
            stats.waiting_lora_adapters = _count_adapters(self.waiting)
        if self.speculation is not None:
            spec = self.speculation.take_counters()
            stats.spec_decode_num_drafts = spec.num_drafts
            stats.spec_decode_num_draft_tokens = spec.num_draft_tokens
            stats.spec_decode_num_accepted_tokens = spec.num_accepted_tokens
            stats.spec_decode_accepted_per_position = spec.accepted_per_position
        if self.hooks is not None:
            hook_stats = self.hooks.take_stats()
            stats.kv_transfer_failures = hook_stats.transfer_failures
            stats.kv_transfer_bytes = hook_stats.bytes_received
            stats.kv_transfer_seconds = hook_stats.transfer_seconds
        return stats


def _count_adapters(requests: Iterable[Request]) -> dict[str, int]:
    """Adapter name -> number of `requests` with that adapter (base-model requests omitted)."""
    counts: dict[str, int] = {}
    for request in requests:
        if request.lora_request is not None:
            name = request.lora_request.lora_name
            counts[name] = counts.get(name, 0) + 1
    return counts
