"""Frontend state of one engine request (one sample), and logprobs conversion. No torch.

A `SampleState` folds the `EngineCoreOutput`s of one engine request into tokens, text (through
`StopStringDetokenizer`), logprobs and timestamps, and renders `CompletionOutput`s either
cumulatively or as deltas since the previous delta (its own cursor). Parent-level aggregation
(n > 1, output kinds) lives in `output_processor.py`.
"""

from __future__ import annotations

from typing import Sequence

from sluice.frontend.detokenizer import StopStringDetokenizer
from sluice.frontend.stats import FinishedRequestStats, FrontendStats
from sluice.frontend.tokenizer import Tokenizer
from sluice.messages import EngineCoreOutput, FinishReason, TokenLogprobs
from sluice.outputs import CompletionOutput, Logprob, PositionLogprobs
from sluice.sampling_params import SamplingParams


def convert_logprobs(entry: TokenLogprobs, tokenizer: Tokenizer | None) -> PositionLogprobs:
    """One position's `TokenLogprobs` as {token_id: Logprob}, the chosen token first.

    `decoded_token` is the token's own text (None without a tokenizer). A chosen token that is
    also among the top-k appears once.
    """
    position: PositionLogprobs = {}
    for token_id, logprob, rank in zip(entry.token_ids, entry.logprobs, entry.ranks):
        if token_id not in position:
            decoded = tokenizer.decode_token(token_id) if tokenizer is not None else None
            position[token_id] = Logprob(logprob=logprob, rank=rank, decoded_token=decoded)
    return position


def convert_prompt_logprobs(entries: Sequence[TokenLogprobs],
                            tokenizer: Tokenizer | None) -> list[PositionLogprobs | None]:
    """Engine prompt logprobs (entry i describes prompt token i+1) as the user sees them:
    entry 0 is None (the first prompt token has no context)."""
    return [None] + [convert_logprobs(e, tokenizer) for e in entries]


class SampleState:
    """Tokens, text, logprobs and timestamps of one engine request.

    `index` is the sample's place in its parent's `outputs`. `update` returns True when a stop
    string ended the sample while the engine still runs it (the caller must abort it there).
    """

    def __init__(self, request_id: str, index: int, prompt_token_ids: list[int],
                 params: SamplingParams, arrival_time: float, tokenizer: Tokenizer | None):
        self.request_id = request_id
        self.index = index
        self.params = params
        self.num_prompt_tokens = len(prompt_token_ids)
        self.arrival_time = arrival_time
        self._tokenizer = tokenizer
        self.detok: StopStringDetokenizer | None = None
        if params.detokenize and tokenizer is not None:
            self.detok = StopStringDetokenizer(tokenizer, prompt_token_ids, params)
        self.token_ids: list[int] = []
        self.want_logprobs = params.logprobs is not None
        self.logprobs: list[PositionLogprobs] | None = [] if self.want_logprobs else None
        self.cumulative_logprob: float | None = 0.0 if self.want_logprobs else None
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.finished_time: float | None = None
        self.scheduled_time: float | None = None  # from the engine's first output
        self.num_cached_tokens = 0
        self.kv_transfer_params: dict | None = None   # a KV connector's, on the last output
        self._sent_text = 0      # DELTA cursor: characters of `text` already delivered
        self._sent_tokens = 0    # DELTA cursor: tokens (and logprob positions) delivered

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        return self.detok.text if self.detok is not None else ""

    def update(self, out: EngineCoreOutput, now: float, stats: FrontendStats | None) -> bool:
        """Fold one engine output in. Returns True if a stop string finished the sample here
        while the engine had not finished it."""
        assert not self.finished, f"output for finished request {self.request_id}"
        if out.num_cached_tokens:
            self.num_cached_tokens = out.num_cached_tokens
        if out.scheduled_time and self.scheduled_time is None:
            self.scheduled_time = out.scheduled_time
        if out.kv_transfer_params is not None:
            self.kv_transfer_params = out.kv_transfer_params
        new_ids = out.new_token_ids
        if new_ids:
            self._record_times(now, len(new_ids), stats)
        # EOS / stop token: kept in token_ids, hidden from the text unless asked for.
        hide_last = (out.finish_reason == FinishReason.STOP and not isinstance(out.stop_reason, str)
                     and not self.params.include_stop_str_in_output)
        matched: str | None = None
        for j, token_id in enumerate(new_ids):
            self.token_ids.append(token_id)
            if self.want_logprobs and out.new_logprobs is not None and j < len(out.new_logprobs):
                entry = out.new_logprobs[j]
                self.logprobs.append(convert_logprobs(entry, self._tokenizer))
                self.cumulative_logprob += entry.logprobs[0]
            if self.detok is not None and not (hide_last and j == len(new_ids) - 1):
                matched = self.detok.add_token(token_id)
                if matched is not None:
                    break  # tokens after the stop string are dropped
        if matched is None and out.finish_reason is None:
            return False
        if matched is None and self.detok is not None:
            matched = self.detok.finish()
        if matched is not None:
            self.finish_reason, self.stop_reason = "stop", matched
        else:
            self.finish_reason, self.stop_reason = str(out.finish_reason), out.stop_reason
        self.finished_time = now
        return out.finish_reason is None

    def _record_times(self, now: float, num_new: int, stats: FrontendStats | None) -> None:
        if stats is not None:
            stats.num_generation_tokens += num_new
            if self.first_token_time is None:
                stats.ttfts.append(now - self.arrival_time)
                stats.num_prompt_tokens += self.num_prompt_tokens
            else:
                stats.itls.append(now - self.last_token_time)
        if self.first_token_time is None:
            self.first_token_time = now
        self.last_token_time = now

    def abort(self, now: float) -> None:
        """End the sample locally as aborted (the caller tells the engine)."""
        if not self.finished:
            self.finish_reason, self.stop_reason, self.finished_time = "abort", None, now

    def finished_stats(self) -> FinishedRequestStats:
        assert self.finished and self.finished_time is not None
        return FinishedRequestStats(
            request_id=self.request_id, finish_reason=self.finish_reason,
            arrival_time=self.arrival_time, finished_time=self.finished_time,
            first_token_time=self.first_token_time, last_token_time=self.last_token_time,
            num_prompt_tokens=self.num_prompt_tokens, num_generation_tokens=len(self.token_ids),
            num_cached_tokens=self.num_cached_tokens, scheduled_time=self.scheduled_time,
            max_tokens=self.params.max_tokens)

    def completion(self, delta: bool) -> CompletionOutput:
        """This sample as a `CompletionOutput`: everything so far, or (delta=True) what is new
        since the previous delta call (advances the cursor)."""
        text, token_ids, logprobs = self.text, self.token_ids, self.logprobs
        if delta:
            t0, k0 = self._sent_text, self._sent_tokens
            self._sent_text, self._sent_tokens = len(text), len(token_ids)
            text, token_ids = text[t0:], token_ids[k0:]
            logprobs = logprobs[k0:] if logprobs is not None else None
        else:
            token_ids = list(token_ids)
            logprobs = list(logprobs) if logprobs is not None else None
        return CompletionOutput(
            index=self.index, text=text, token_ids=token_ids,
            cumulative_logprob=self.cumulative_logprob, logprobs=logprobs,
            finish_reason=self.finish_reason, stop_reason=self.stop_reason)
