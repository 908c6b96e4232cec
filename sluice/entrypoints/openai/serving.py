"""What every endpoint shares: the server state, admission (model name, queue limit, engine
health, draining), running several generations at once, client-disconnect handling, and the
graceful drain on shutdown.

Contract with the engine (`AsyncLLM`): `generate(...)` is an async iterator that raises
`InvalidRequestError` before its first output for bad input; cancelling the task that iterates
it aborts the request in the engine (its KV blocks are freed). `Generations` therefore runs one
pump task per prompt and aborts everything by cancelling those tasks.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse

from sluice.config import EngineConfig
from sluice.entrypoints.openai.errors import APIError
from sluice.entrypoints.openai.limits import RequestLimits
from sluice.errors import EngineDeadError, InvalidRequestError
from sluice.frontend.offload import Offloader
from sluice.hf_config import generation_defaults
from sluice.outputs import Logprob, PositionLogprobs, RequestOutput
from sluice.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

T = TypeVar("T")

DISCONNECT_POLL_S = 0.25
SSE_DONE = "data: [DONE]\n\n"
RETRY_AFTER_S = 1
"""The Retry-After of a 429: the queue moves on within about a second of engine steps."""
DRAIN_POLL_S = 0.05
FLUSH_AFTER_FAIL_S = 2.0
"""After the shutdown grace period has ended the remaining requests with an error, how long
their error responses get to reach the clients before the server stops."""
SHUTTING_DOWN = "The server is shutting down; retry on another instance."
MIN_LOGPROB = -9999.0
"""What the API reports instead of -inf (JSON has no infinity), as OpenAI and vLLM do."""
REQUEST_ID_HEADER = "x-request-id"


#: characters a JSON string may hold raw that line readers built on str.splitlines (httpx's
#: `aiter_lines`, ...) take for line ends, splitting an event: sent as JSON escapes instead
#: (the same string to any JSON parser; outside strings JSON never holds them)
_LINE_BREAKING = str.maketrans({"\u0085": "\\u0085", "\u2028": "\\u2028",
                                "\u2029": "\\u2029"})


def sse(data: str) -> str:
    """One server-sent event carrying `data` (a JSON document), with U+0085 / U+2028 / U+2029
    escaped (`_LINE_BREAKING`): each event stays one line for any client's line reader."""
    return f"data: {data.translate(_LINE_BREAKING)}\n\n"


@dataclass
class ServerState:
    """Per-app state: the engine, its config and runtime facts, request bounds, counters, the
    generations in flight (for the shutdown drain) and the offload pool."""

    engine: Any  # AsyncLLM (typed loosely: the frontend must not be imported eagerly)
    config: EngineConfig
    model_name: str
    max_model_len: int
    limits: RequestLimits
    metrics: Any = None  # sluice.metrics.prometheus.PrometheusMetrics
    num_in_flight: int = 0
    """Sequences (prompts x n) admitted and not yet answered."""
    draining: bool = False
    grace_cut: bool = False
    """Set by `cut_grace` (a second shutdown signal): the drain ends the in-flight requests now."""
    offloader: Offloader = field(default_factory=lambda: Offloader(name="sluice-api"))
    lora: Any = None
    """The adapters served by name (`sluice.lora.registry.LoRARegistry`; None without
    --enable-lora)."""
    generations: "weakref.WeakSet[Generations]" = field(default_factory=weakref.WeakSet)

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def served_model_names(self) -> tuple[str, ...]:
        """Every name the API answers to (--served-model-name); the first is reported."""
        names = self.config.model.served_model_name
        return names if self.model_name in names else (self.model_name, *names)

    def check_model(self, model: str | None) -> None:
        """404 unless `model` is None, one of the served model's names or an adapter's."""
        self.resolve_model(model)

    def resolve_model(self, model: str | None) -> Any:
        """The `LoRARequest` of adapter `model`, None for the base model (None or one of its
        names); 404 naming `model` otherwise (also for any adapter without --enable-lora)."""
        if model is None or model in self.served_model_names:
            return None
        lora_request = self.lora.get(model) if self.lora is not None else None
        if lora_request is None:
            raise APIError(404, f"The model `{model}` does not exist.", param="model")
        return lora_request

    def reported_model(self, model: str | None) -> str:
        """The `model` a response reports: the adapter's name for an adapter request (already
        resolved), else the served model's first name."""
        return self.model_name if model is None or model in self.served_model_names else model

    def num_queued(self) -> int:
        """Sequences admitted but not running: unfinished (counted here and by the engine,
        whichever is larger, since a just-admitted request may not be registered yet) minus
        those running at the engine's last step."""
        unfinished = max(self.num_in_flight, int(self.engine.num_unfinished_requests))
        stats = getattr(self.engine, "latest_scheduler_stats", None)
        running = stats.num_running_reqs if stats is not None else 0
        return max(0, unfinished - running)

    def admit(self, num_sequences: int = 1) -> "Admission":
        """Admit `num_sequences` engine sequences (prompts x n) until the returned ticket is
        released, or refuse: 503 when the engine is dead or the server drains, 429 (with
        Retry-After) when `--max-num-queued-requests` sequences would be waiting."""
        if self.engine.is_dead:
            raise EngineDeadError()
        if self.draining:
            raise APIError(503, SHUTTING_DOWN)
        limit = self.config.scheduler.max_num_queued_requests
        if limit is not None and self.num_queued() + num_sequences > limit:
            raise APIError(429, f"The server already has {limit} sequences waiting "
                           f"(--max-num-queued-requests {limit}); this request needs "
                           f"{num_sequences}. Retry later.",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
        self.num_in_flight += num_sequences
        return Admission(self, num_sequences)

    def cut_grace(self) -> None:
        """End a running drain's grace period now (its in-flight requests end at once)."""
        self.grace_cut = True

    async def drain(self, grace_s: float) -> int:
        """Shut down gracefully: from now on new requests get 503; in-flight ones may run for
        up to `grace_s` seconds (or until `cut_grace`); then each remaining generation is ended
        with a 503-type error (a JSON error, or an error event and `[DONE]` on a stream), and
        their responses get `FLUSH_AFTER_FAIL_S` to go out. Returns the number of generations
        ended that way."""
        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while self.num_in_flight > 0 and loop.time() < deadline and not self.grace_cut:
            await asyncio.sleep(DRAIN_POLL_S)
        if self.num_in_flight == 0:
            return 0
        ended = [g for g in list(self.generations) if g.fail(APIError(503, SHUTTING_DOWN))]
        deadline = loop.time() + FLUSH_AFTER_FAIL_S
        while self.num_in_flight > 0 and loop.time() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)
        return len(ended)


class Admission:
    """A ticket for admitted sequences; `release()` is idempotent (also a context manager)."""

    def __init__(self, state: ServerState, num_sequences: int):
        self._state: ServerState | None = state
        self._num = num_sequences

    def release(self) -> None:
        if self._state is not None:
            self._state.num_in_flight -= self._num
            self._state = None

    def __enter__(self) -> "Admission":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class CleanupStreamingResponse(StreamingResponse):
    """A streaming response that runs `cleanup()` however it ends (finished, client gone
    before the first chunk, cancelled): aborting generations and releasing admission must
    not depend on the body iterator ever being started."""

    def __init__(self, content: AsyncIterator[str], cleanup: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache"})
        self._cleanup = cleanup

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._cleanup()


def get_state(request: Request) -> ServerState:
    return request.app.state.sluice


class Generations:
    """Several engine generations (one per prompt) iterated together.

    `start()` waits until every generation produced its first output, so a validation error
    (raised by the engine before the first output) surfaces before any response is sent; it
    then re-raises that error after aborting the others. Iterating yields `(prompt_index,
    RequestOutput)` as they arrive. `abort()` cancels everything (synchronous, so it is safe in
    a `finally` of a cancelled stream); `fail(error)` ends it with `error` instead (the
    consumer raises it), for the shutdown drain.
    """

    _DONE = object()

    def __init__(self, iterators: Sequence[AsyncIterator[RequestOutput]]):
        self._queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
        self._num = len(iterators)
        self._tasks = [asyncio.create_task(self._pump(i, it)) for i, it in enumerate(iterators)]
        self._buffer: list[tuple[int, RequestOutput]] = []
        self._open = self._num
        self._finished = False

    async def _pump(self, index: int, iterator: AsyncIterator[RequestOutput]) -> None:
        try:
            async for output in iterator:
                self._queue.put_nowait((index, output))
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # noqa: BLE001 - delivered to the consumer
            self._queue.put_nowait((index, e))
        finally:
            self._queue.put_nowait((index, self._DONE))

    async def _next(self) -> tuple[int, Any]:
        index, item = await self._queue.get()
        if item is self._DONE:
            self._open -= 1
        elif isinstance(item, BaseException):
            self.abort()
            raise item
        return index, item

    async def start(self) -> None:
        """Wait for the first output of every generation (raises the first error)."""
        pending = set(range(self._num))
        try:
            while pending:
                index, item = await self._next()
                if item is self._DONE:
                    pending.discard(index)
                    continue
                pending.discard(index)
                self._buffer.append((index, item))
        except BaseException:
            self.abort()
            raise

    def first_outputs(self) -> list[tuple[int, RequestOutput]]:
        """The outputs `start()` waited for and iteration has not yet yielded (prompt index,
        output): a stream reads the prompt's token count there before its first chunk."""
        return list(self._buffer)

    async def __aiter__(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        try:
            for entry in self._buffer:
                yield entry
            self._buffer.clear()
            while self._open > 0:
                index, item = await self._next()
                if item is not self._DONE:
                    yield index, item
        finally:
            self.abort()

    async def final_outputs(self) -> list[RequestOutput]:
        """The last output of each generation, in prompt order (for FINAL_ONLY requests)."""
        last: dict[int, RequestOutput] = {}
        async for index, output in self:
            last[index] = output
        missing = [i for i in range(self._num) if i not in last]
        if missing:
            raise EngineDeadError("The engine ended a request without a result.")
        return [last[i] for i in range(self._num)]

    def abort(self) -> None:
        self._finished = True
        for task in self._tasks:
            if not task.done():
                task.cancel()

    def fail(self, error: BaseException) -> bool:
        """End every generation (aborting it in the engine) and make the consumer raise
        `error`; False when it had already ended."""
        if self._finished or self._open == 0:
            return False
        self.abort()
        self._queue.put_nowait((0, error))
        return True


def start_generations(state: ServerState, prompts: Sequence[str | list[int]],
                      params: SamplingParams, request_id: str, *, priority: int,
                      add_special_tokens: bool, cache_salt: str | None = None,
                      kv_transfer_params: dict[str, Any] | None = None,
                      lora_request: Any = None) -> Generations:
    """One engine generation per prompt, ids `{request_id}-{i}` (registered for the drain),
    under adapter `lora_request` (`ServerState.resolve_model`; None: the base model).
    A non-zero `priority` needs --scheduling-policy priority (else a 400 naming it: fcfs would
    ignore it)."""
    if priority != 0 and state.config.scheduler.scheduling_policy != "priority":
        raise InvalidRequestError(
            f"priority {priority} needs a server started with --scheduling-policy priority; "
            "this one schedules first come, first served (send priority 0 or leave it out).",
            param="priority")
    extra: dict[str, Any] = {} if cache_salt is None else {"cache_salt": cache_salt}
    if lora_request is not None:
        extra["lora_request"] = lora_request
    if kv_transfer_params is not None:   # a 400 naming the key unless a connector takes it
        from sluice.kv_transfer.params import check_for_server
        extra["kv_transfer_params"] = check_for_server(
            kv_transfer_params, state.config.cache.kv_transfer_config, n=params.n)
        if len(prompts) != 1:
            raise InvalidRequestError("kv_transfer_params needs exactly one prompt.",
                                      param="prompt")
    generations = Generations([
        state.engine.generate(prompt, params, f"{request_id}-{i}", priority=priority,
                              add_special_tokens=add_special_tokens, **extra)
        for i, prompt in enumerate(prompts)])
    state.generations.add(generations)
    return generations


async def run_unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (which aborts its engine requests) if the client goes away
    first; then raises `APIError(499)` (answered to nobody, logged at info)."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_S)

    watcher = asyncio.create_task(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            # cancel() only requests it: wait until the task has run its cancellation, so
            # that it reads as cancelled below (not InvalidStateError from result()).
            await asyncio.wait({task})
    if task.cancelled():
        logger.info("Client disconnected; aborted request %s",
                    getattr(request.state, "request_id", "?"))
        raise APIError(499, "The client disconnected before the response was ready.")
    return task.result()


async def render_conversation(state: ServerState, conversation: list[dict[str, Any]],
                              template_kwargs: dict[str, Any]) -> str:
    """The conversation rendered by the chat template on the offload pool: a request-supplied
    template is a 400 unless trusted, and then has a time limit; the result is bounded like a
    text prompt (param 'messages')."""
    time_limit_s = state.limits.template_time_limit(template_kwargs)
    text = await state.offloader.run(state.tokenizer.apply_chat_template, conversation,
                                     time_limit_s=time_limit_s, **template_kwargs)
    state.limits.check_prompt_chars(text, "messages")
    return text


def sampling_defaults(state: ServerState) -> dict[str, Any]:
    """The model's default sampling parameters (`--generation-config`, read once; see
    `hf_config.generation_defaults`) that fill the fields a request leaves unset; {} for an
    engine without a config. Raises `ConfigError` for a --generation-config directory without
    generation_config.json (build_app calls this once, so that happens at startup)."""
    config = getattr(state.engine, "config", None)  # the engine's: its model is a local dir
    if config is None:
        return {}
    return generation_defaults(config.model.generation_config, config.model.model)


def base_request_id(request: Request, body_request_id: str | None) -> str:
    """The id a response is named by: the X-Request-Id header when the client sent a usable
    one, else the body's `request_id` (vLLM's extra), else the generated one."""
    given = request.headers.get(REQUEST_ID_HEADER)
    if body_request_id is not None and given != request.state.request_id:
        return body_request_id
    return request.state.request_id


def token_text(token_id: int, logprob: Logprob | None, tokenizer: Any, as_id: bool) -> str:
    """How a logprobs entry names a token: 'token_id:{id}' with return_tokens_as_token_ids,
    else its decoded text."""
    if as_id:
        return f"token_id:{token_id}"
    if logprob is not None and logprob.decoded_token is not None:
        return logprob.decoded_token
    return tokenizer.decode_token(token_id)


def prompt_logprobs_body(token_ids: Sequence[int],
                         positions: Sequence[PositionLogprobs | None] | None, num_top: int,
                         tokenizer: Any) -> list[dict[str, dict[str, Any]] | None] | None:
    """vLLM's `prompt_logprobs`: per prompt token None (the first) or {str(token_id):
    {"logprob", "rank", "decoded_token"}} for the prompt token itself and the `num_top` most
    likely ones (the engine may have computed more, for echo). None when `positions` is."""
    if positions is None:
        return None
    out: list[dict[str, dict[str, Any]] | None] = []
    for token_id, position in zip(token_ids, positions):
        if position is None:
            out.append(None)
            continue
        out.append({str(tid): {"logprob": max(lp.logprob, MIN_LOGPROB), "rank": lp.rank,
                               "decoded_token": token_text(tid, lp, tokenizer, False)}
                    for tid, lp in position.items() if lp.rank <= num_top or tid == token_id})
    return out


def prompt_error_param(exc: InvalidRequestError, is_chat: bool) -> InvalidRequestError:
    """For chat requests a 'prompt' problem is a 'messages' problem."""
    if is_chat and exc.param == "prompt":
        return InvalidRequestError(exc.message.replace("prompt", "conversation"), "messages")
    return exc


def kv_transfer_extra(outputs: Sequence[RequestOutput]) -> dict[str, Any]:
    """The response's `kv_transfer_params` (vLLM's: what a prefill engine returns for the
    decode request), as an extra field only when an output carries them."""
    for output in outputs:
        if output.kv_transfer_params is not None:
            return {"kv_transfer_params": output.kv_transfer_params}
    return {}
