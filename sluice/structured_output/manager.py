"""StructuredOutputManager: the engine core's half of structured output. Torch-free.

Lifecycle of a request with `sampling_params.structured_outputs`::

    add_request ─► hold(): compile on the pool thread (cached by constraint) ─► take_ready()
       │                     (not in the scheduler meanwhile;                   │ compiled: the
       │                      other requests keep stepping)                     │ scheduler gets it
       │                                                                        ▼
       │   each step: grammar_output(): one bitmask row per scheduled request that samples
       │              advance(outputs): each matcher consumes its request's new tokens;
       │              a grammar that cannot continue (stopped) finishes the request ("stop")
       └─ finished / aborted: drop()

* Compilation: `GuidanceBackend.compile` builds a template matcher per distinct constraint
  (the cache key is the encoded `StructuredOutputsParams`; least recently used evicted beyond
  `cache_size`); each request gets a `deep_copy` (one matcher per sequence, so n > 1 works:
  the frontend fans n out into n engine requests). Compilation and the lazy tokenizer build
  run on one pool thread (llguidance drops the GIL while compiling).
* Bitmask rows: a request samples in a step iff the step reaches its last known token,
  i.e. after `schedule()` advanced it, `num_computed_tokens == num_tokens` (`sluice.step`).
  Preemption and prefix caching need nothing: the matcher lives with the request, recompute
  samples nothing new until it reaches the end, and only sampled tokens advance it.
* Cost when no request has a grammar: `active` is False and `grammar_output` returns None at
  once; no tokenizer, no pool thread, no bitmask.
"""

from __future__ import annotations

import collections
import logging
import threading
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING, Any, Iterable, Mapping

import msgspec
import numpy as np

from sluice.errors import SluiceError
from sluice.messages import EngineCoreOutput
from sluice.structured_output.backend import GuidanceBackend
from sluice.structured_output.output import GrammarOutput

if TYPE_CHECKING:
    from sluice.core.request import Request
    from sluice.step import SchedulerOutput

logger = logging.getLogger(__name__)

_PARALLEL_FILL_ROWS = 8   # from this many rows the mask is filled on llguidance's threads


class StructuredOutputManager:
    def __init__(self, backend: GuidanceBackend, cache_size: int = 256):
        self.backend = backend
        self.cache_size = cache_size
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._cache: collections.OrderedDict[bytes, Future[Any]] = collections.OrderedDict()
        self._waiting: dict[str, tuple[Request, Future[Any]]] = {}
        self._matchers: dict[str, Any] = {}
        self._executor: Any = None   # llguidance.LLExecutor, for parallel mask fills
        self.num_words = -(-backend.vocab_size // 32)

    # ---- admission -----------------------------------------------------------------------
    def hold(self, request: Request) -> None:
        """Start compiling `request`'s constraint; it waits here until `take_ready`."""
        self._waiting[request.request_id] = (request, self._template(request))

    def _template(self, request: Request) -> Future[Any]:
        params = request.sampling_params.structured_outputs
        key = msgspec.msgpack.encode(params)
        with self._lock:
            future = self._cache.get(key)
            if future is not None and not (future.done() and future.exception() is not None):
                self._cache.move_to_end(key)
                return future
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="sluice-grammar")
            future = self._pool.submit(self.backend.compile, params)
            self._cache[key] = future
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            return future

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def wait_for_any(self, timeout_s: float) -> None:
        """Block until a held request's compilation ends (or `timeout_s`): the engine loop
        calls this when held requests are all it has, instead of spinning."""
        if self._waiting:
            wait([f for _, f in self._waiting.values()], timeout_s, FIRST_COMPLETED)

    def take_ready(self) -> tuple[list[Request], list[EngineCoreOutput]]:
        """Held requests whose grammar is ready (matcher attached, for the scheduler), and
        outputs finishing those whose grammar failed to compile (aborted, the reason in
        `stop_reason`)."""
        ready: list[Request] = []
        failed: list[EngineCoreOutput] = []
        for rid, (request, future) in list(self._waiting.items()):
            if not future.done():
                continue
            del self._waiting[rid]
            error = future.exception()
            if error is None:
                self._matchers[rid] = future.result().deep_copy()
                ready.append(request)
                continue
            message = str(error) if isinstance(error, SluiceError) else \
                f"{type(error).__name__}: {error}"
            logger.warning("request %s: structured output failed to compile: %s", rid, message)
            from sluice.messages import FinishReason
            failed.append(EngineCoreOutput(rid, [], finish_reason=FinishReason.ABORT,
                                           stop_reason=f"structured output error: {message}"))
        return ready, failed

    def drop(self, request_ids: Iterable[str]) -> None:
        """Forget these requests (finished or aborted), held or active."""
        for rid in request_ids:
            self._waiting.pop(rid, None)
            self._matchers.pop(rid, None)

    # ---- per step --------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        """Whether any admitted request has a grammar (if not, no step needs a bitmask)."""
        return bool(self._matchers)

    def grammar_output(self, scheduler_output: SchedulerOutput,
                       requests: Mapping[str, Request]) -> GrammarOutput | None:
        """The step's bitmask (see `output.GrammarOutput`), or None when no request that
        samples this step has a grammar. Call after `schedule()`."""
        matchers = self._matchers
        if not matchers:
            return None
        rows: list[str] = []
        for rid in scheduler_output.num_scheduled_tokens:
            if rid in matchers:
                request = requests.get(rid)
                if request is not None and request.num_computed_tokens >= request.num_tokens:
                    rows.append(rid)
        if not rows:
            return None
        from llguidance.numpy import fill_next_token_bitmask, fill_next_token_bitmask_par
        bitmask = np.full((len(rows), self.num_words), -1, dtype=np.int32)
        if len(rows) >= _PARALLEL_FILL_ROWS:
            if self._executor is None:
                from llguidance import LLExecutor
                self._executor = LLExecutor()
            fill_next_token_bitmask_par(self._executor,
                                        [(matchers[rid], i) for i, rid in enumerate(rows)],
                                        bitmask)
        else:
            for i, rid in enumerate(rows):
                fill_next_token_bitmask(matchers[rid], bitmask, i)
        return GrammarOutput.from_array(rows, bitmask)

    def advance(self, outputs: list[EngineCoreOutput]) -> list[str]:
        """Feed each output's new tokens to its request's matcher; drop the matchers of
        finished requests. Returns the unfinished requests whose grammar can no longer
        continue (stopped: complete; or in error): the caller finishes them as stopped."""
        matchers = self._matchers
        if not matchers:
            return []
        ended: list[str] = []
        for out in outputs:
            matcher = matchers.get(out.request_id)
            if matcher is None:
                continue
            if not matcher.consume_tokens(out.new_token_ids):
                logger.warning("request %s: the grammar rejected sampled tokens %s: %s",
                               out.request_id, out.new_token_ids, matcher.get_error())
            if out.finish_reason is not None:
                del matchers[out.request_id]
            elif matcher.is_stopped():
                ended.append(out.request_id)
        return ended

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
