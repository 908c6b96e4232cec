"""Engine outputs → user-facing `RequestOutput`s. No torch.

Contract (the frontend drives it; one instance per engine client, not thread-safe):

    request = input_processor.process(request_id, prompt, params, arrival_time)
    for engine_request in output_processor.add_request(request, prompt_text):
        engine_core.add_request(engine_request)            # n > 1: one child per sample
    ...
    processed = output_processor.process_outputs(engine_core_outputs.outputs)
    engine_core.abort_requests(processed.request_ids_to_abort)   # stop strings hit
    for out in processed.request_outputs:
        deliver(out)            # route by out.request_id: always the id the user gave
    ...
    engine_core.abort_requests(output_processor.abort_requests([request_id]))  # client gone

* Every `RequestOutput` carries the user's request id (for n > 1 the parent id; the children
  `f"{i}_{request_id}"` exist only between here and the engine), so an async frontend keeps one
  queue per user request id. `out.finished` is the last output of that request; its state is
  already dropped.
* Output kinds: CUMULATIVE delivers all `n` samples so far on every step that touched any;
  DELTA delivers only the samples touched this step, each with its new text/tokens/logprobs
  (`index` tells them apart); FINAL_ONLY delivers once, when all `n` samples finished.
  `cumulative_logprob` is always the running total. Prompt logprobs (entry 0 is None) are sent
  once with DELTA, and on every output otherwise, once they have arrived.
* `best_of > n` (FINAL_ONLY only; other kinds are refused in `add_request`): all `best_of`
  samples run; the final output holds the `n` with the highest cumulative logprob, best first,
  re-indexed 0..n-1. Their per-token `logprobs` are left out unless the request asked for them
  (the children ask for the sampled token's logprob to rank them, see `fan_out`).
* Stop strings are matched here, not in the engine: a sample that hits one is finished with
  finish_reason "stop", stop_reason = the string, and its engine id is returned in
  `request_ids_to_abort`. Outputs for unknown (finished or aborted) ids are ignored.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Iterable

from sluice.errors import InvalidRequestError
from sluice.frontend.input_processor import fan_out
from sluice.frontend.request_state import SampleState, convert_prompt_logprobs
from sluice.frontend.stats import FrontendStats
from sluice.frontend.tokenizer import Tokenizer
from sluice.messages import EngineCoreOutput, EngineCoreRequest
from sluice.outputs import CompletionOutput, PositionLogprobs, RequestMetrics, RequestOutput
from sluice.sampling_params import RequestOutputKind


@dataclass
class ProcessedOutputs:
    """What one `process_outputs` call produced."""
    request_outputs: list[RequestOutput] = field(default_factory=list)
    # Engine request ids that finished on a stop string here; the engine must abort them.
    request_ids_to_abort: list[str] = field(default_factory=list)


class _UserRequest:
    """One request as the user sent it: `n` samples, one output kind, one routing id."""

    def __init__(self, request: EngineCoreRequest, prompt: str | None,
                 samples: list[SampleState]):
        self.request_id = request.request_id
        self.prompt = prompt
        self.prompt_token_ids = request.prompt_token_ids
        self.output_kind = request.sampling_params.output_kind
        self.n = request.sampling_params.n
        self.wants_logprobs = request.sampling_params.logprobs is not None
        self.arrival_time = request.arrival_time
        self.samples = samples
        self.num_finished = 0
        self.prompt_logprobs: list[PositionLogprobs | None] | None = None
        self._prompt_logprobs_sent = False

    @property
    def finished(self) -> bool:
        return self.num_finished == len(self.samples)

    def make_output(self, touched: list[SampleState]) -> RequestOutput | None:
        """The output to deliver after `touched` samples changed, or None (FINAL_ONLY, not
        finished yet)."""
        finished = self.finished
        if self.output_kind == RequestOutputKind.FINAL_ONLY and not finished:
            return None
        delta = self.output_kind == RequestOutputKind.DELTA
        chosen = sorted(touched, key=lambda s: s.index) if delta else self.samples
        prompt_logprobs = self.prompt_logprobs
        if delta:
            if self._prompt_logprobs_sent:
                prompt_logprobs = None
            elif prompt_logprobs is not None:
                self._prompt_logprobs_sent = True
        outputs = [s.completion(delta) for s in chosen]
        if len(self.samples) > self.n:  # best_of > n: FINAL_ONLY, all samples finished
            outputs = self.best_outputs(outputs)
        return RequestOutput(
            request_id=self.request_id, prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            outputs=outputs, finished=finished,
            prompt_logprobs=prompt_logprobs, num_cached_tokens=self.samples[0].num_cached_tokens,
            metrics=self.metrics(), kv_transfer_params=self.samples[0].kv_transfer_params)

    def best_outputs(self, outputs: list[CompletionOutput]) -> list[CompletionOutput]:
        """The `n` outputs with the highest cumulative logprob (ties: lower index), best first,
        re-indexed; per-token logprobs dropped unless asked for."""
        def score(out: CompletionOutput) -> tuple[float, int]:
            total = out.cumulative_logprob
            return (-(total if total is not None else float("-inf")), out.index)

        best = sorted(outputs, key=score)[:self.n]
        return [dataclasses.replace(out, index=i,
                                    logprobs=out.logprobs if self.wants_logprobs else None)
                for i, out in enumerate(best)]

    def metrics(self) -> RequestMetrics:
        firsts = [s.first_token_time for s in self.samples if s.first_token_time is not None]
        lasts = [s.last_token_time for s in self.samples if s.last_token_time is not None]
        ends = [s.finished_time for s in self.samples if s.finished_time is not None]
        return RequestMetrics(
            arrival_time=self.arrival_time, first_token_time=min(firsts, default=None),
            last_token_time=max(lasts, default=None),
            finished_time=max(ends) if self.finished and ends else None,
            num_cached_tokens=self.samples[0].num_cached_tokens)


class OutputProcessor:
    """Per-request frontend state: detokenization, stop strings, logprobs, n > 1 aggregation,
    output kinds and timing. `log_stats=True` accumulates a `FrontendStats` (see `take_stats`).
    `tokenizer=None` serves `detokenize=False` requests only (text stays "")."""

    def __init__(self, tokenizer: Tokenizer | None, log_stats: bool = False):
        self.tokenizer = tokenizer
        self.log_stats = log_stats
        self._requests: dict[str, _UserRequest] = {}       # user request id -> state
        self._samples: dict[str, tuple[_UserRequest, SampleState]] = {}  # engine id -> state
        self._stats = FrontendStats()

    # ---- registration -------------------------------------------------------------------

    def add_request(self, request: EngineCoreRequest,
                    prompt: str | None = None) -> list[EngineCoreRequest]:
        """Register a processed request; return the engine requests to send (n > 1: children).

        `prompt` is the prompt text echoed in `RequestOutput.prompt` (None for token ids).
        Raises `InvalidRequestError(param="request_id")` if the id is already in flight, and
        `InvalidRequestError(param="best_of")` for `best_of > n` with a streaming output kind.
        """
        if request.request_id in self._requests or request.request_id in self._samples:
            raise InvalidRequestError(f"Request id {request.request_id!r} is already in use by "
                                      "an unfinished request.", param="request_id")
        params = request.sampling_params
        if params.num_sequences > params.n and params.output_kind != RequestOutputKind.FINAL_ONLY:
            raise InvalidRequestError(
                f"best_of={params.best_of} > n={params.n} needs every sample finished before "
                "the best are chosen, so it cannot be streamed; set stream=false or "
                "best_of=n.", param="best_of")
        engine_requests = fan_out(request)
        samples = [SampleState(r.request_id, i, request.prompt_token_ids, r.sampling_params,
                               request.arrival_time, self.tokenizer)
                   for i, r in enumerate(engine_requests)]
        user = _UserRequest(request, prompt, samples)
        if self.log_stats:
            self._stats.n_params.append(len(samples))
        self._requests[request.request_id] = user
        for sample in samples:
            self._samples[sample.request_id] = (user, sample)
        return engine_requests

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    def get_num_unfinished_requests(self) -> int:
        return len(self._requests)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._requests

    def engine_request_ids(self, request_id: str) -> list[str]:
        """The engine ids of the unfinished samples of user request `request_id`."""
        user = self._requests.get(request_id)
        return [s.request_id for s in user.samples if not s.finished] if user else []

    # ---- the step path ------------------------------------------------------------------

    def process_outputs(self, engine_core_outputs: list[EngineCoreOutput],
                        now: float | None = None) -> ProcessedOutputs:
        """Fold one engine step's outputs in; return what to deliver and what to abort.

        `now` (time.monotonic seconds) stamps token arrival; defaults to the current time.
        At most one `RequestOutput` per user request per call, in order of first appearance.
        """
        now = time.monotonic() if now is None else now
        stats = self._stats if self.log_stats else None
        result = ProcessedOutputs()
        touched: dict[str, tuple[_UserRequest, list[SampleState]]] = {}
        for out in engine_core_outputs:
            entry = self._samples.get(out.request_id)
            if entry is None:
                continue  # finished on a stop string, or aborted, while the engine ran it
            user, sample = entry
            if out.prompt_logprobs is not None:
                converted = convert_prompt_logprobs(out.prompt_logprobs, self.tokenizer)
                if user.prompt_logprobs is None:
                    user.prompt_logprobs = converted
                else:  # tolerate chunked delivery
                    user.prompt_logprobs.extend(converted[1:])
            if sample.update(out, now, stats):
                result.request_ids_to_abort.append(sample.request_id)
            if sample.finished:
                self._finish_sample(user, sample)
            group = touched.setdefault(user.request_id, (user, []))[1]
            if sample not in group:
                group.append(sample)
        for user, samples in touched.values():
            request_output = user.make_output(samples)
            if request_output is not None:
                result.request_outputs.append(request_output)
            if user.finished:
                del self._requests[user.request_id]
                self._user_finished(user)
        return result

    def _finish_sample(self, user: _UserRequest, sample: SampleState) -> None:
        del self._samples[sample.request_id]
        user.num_finished += 1
        if self.log_stats:
            self._stats.finished_requests.append(sample.finished_stats())

    # ---- aborts and stats ---------------------------------------------------------------

    def abort_requests(self, request_ids: Iterable[str], now: float | None = None) -> list[str]:
        """Drop the state of user requests (or of the parent of an engine child id) without
        delivering anything; return the engine ids the engine core must abort. Unknown ids
        are ignored."""
        now = time.monotonic() if now is None else now
        to_abort: list[str] = []
        for request_id in request_ids:
            user = self._requests.get(request_id)
            if user is None and request_id in self._samples:
                user = self._samples[request_id][0]
            if user is None:
                continue
            for sample in user.samples:
                if not sample.finished:
                    to_abort.append(sample.request_id)
                    sample.abort(now)
                    self._finish_sample(user, sample)
            del self._requests[user.request_id]
            self._user_finished(user)
        return to_abort

    def _user_finished(self, user: _UserRequest) -> None:
        if self.log_stats:
            self._stats.max_num_generation_tokens.append(
                max(len(s.token_ids) for s in user.samples))

    def take_stats(self) -> FrontendStats:
        """The timing facts since the previous call (empty unless `log_stats`); resets them."""
        stats, self._stats = self._stats, FrontendStats()
        return stats
