"""Data parallelism in the frontend: one `EngineCoreClient` over N engine cores.

    AsyncLLM ─► DPAsyncMPClient ─┬─ AsyncMPClient ══ZMQ══► engine core 0 (+ its TP/PP workers)
                                 └─ AsyncMPClient ══ZMQ══► engine core 1
             get_output() ◄── one queue ◄── a pump task per engine (notes what finished)

Routing (`DPRouter.choose`, on the event loop, O(full blocks of the prompt)):

1. load(e): the requests this frontend sent to engine e that have not finished; its tie-break,
   the tokens still owed to them (prompt until the first output, then max_tokens − generated).
2. Candidates: the engines within `max_imbalance` requests of the least-loaded one, so a
   popular prefix cannot pile every request onto one engine.
3. Prefix affinity: the prompt's full blocks are hashed exactly as the engines hash them
   (`core.kv_cache.hashing`, chained, cache_salt included), and a bounded LRU table remembers
   for each block hash the engine that last got a prompt containing it. Walking from the
   longest prefix down, the first block whose engine is a candidate picks it: that engine's
   prefix cache most likely still holds those blocks.
4. Otherwise the least-loaded candidate (ties: fewer tokens owed, then a rotating start).

Aborts go to the engine that holds the request. Utility calls (reset_prefix_cache, sleep,
wake_up, sleep_level, ping, check_health) go to every engine. One engine dying makes the
client dead, as one engine would: `is_dead`, and `get_output` raises `EngineDeadError` naming
the engine, so `AsyncLLM` fails every request and the server answers 503 and exits non-zero.
Torch-free.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterable, Sequence, TypeVar

from sluice.core.kv_cache.hashing import BlockHash, hash_token_blocks
from sluice.engine.launch import EngineProcess
from sluice.errors import EngineDeadError
from sluice.frontend.client import HEALTH_TIMEOUT_S, AsyncMPClient, EngineCoreClient
from sluice.messages import EngineCoreOutput, EngineCoreOutputs, EngineCoreRequest

logger = logging.getLogger(__name__)

DEFAULT_MAX_IMBALANCE = 4
"""Prefix affinity may give an engine at most this many more outstanding requests than the
least-loaded one (the same bound as `sluice router --router-mode kv`)."""
MAX_AFFINITY_BLOCKS = 1 << 16
"""Block hashes remembered for affinity (least recently routed forgotten first)."""
_DEAD = object()
T = TypeVar("T")


@dataclass
class _Outstanding:
    engine: int
    prompt_tokens: int   # owed until the request's first output
    max_new_tokens: int  # owed until generated


class DPRouter:
    """Which engine gets a request, from what this frontend sent and saw (see the module
    docstring). Pure bookkeeping, no I/O; one event loop thread uses it."""

    def __init__(self, num_engines: int, block_size: int, max_model_len: int,
                 max_imbalance: int = DEFAULT_MAX_IMBALANCE, prefix_affinity: bool = True):
        self.num_engines = num_engines
        self.prefix_affinity = prefix_affinity   # off: the engines cache no prefixes
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.max_imbalance = max_imbalance
        self.loads = [0] * num_engines         # outstanding requests per engine
        self.tokens_owed = [0] * num_engines   # tie-break: outstanding tokens per engine
        self._requests: dict[str, _Outstanding] = {}
        self._last_engine: OrderedDict[BlockHash, int] = OrderedDict()
        self._turn = itertools.count()

    def choose(self, request: EngineCoreRequest) -> int:
        """The engine for `request`; remembers its prefix blocks as served there."""
        token_ids = request.prompt_token_ids
        # the blocks a prefix-cache hit can cover (the last prompt token is always computed)
        lora_id = request.lora_request.lora_int_id if request.lora_request is not None else 0
        hashes = (hash_token_blocks(token_ids[:max(0, len(token_ids) - 1)], self.block_size,
                                    request.cache_salt, lora_int_id=lora_id)
                  if self.prefix_affinity else [])
        bound = min(self.loads) + self.max_imbalance
        engine = next((e for e in map(self._last_engine.get, reversed(hashes))
                       if e is not None and self.loads[e] <= bound), None)
        if engine is None:
            start = next(self._turn) % self.num_engines
            order = [*range(start, self.num_engines), *range(start)]
            engine = min(order, key=lambda e: (self.loads[e], self.tokens_owed[e]))
        for block_hash in hashes:
            self._last_engine[block_hash] = engine
            self._last_engine.move_to_end(block_hash)
        while len(self._last_engine) > MAX_AFFINITY_BLOCKS:
            self._last_engine.popitem(last=False)
        return engine

    def add(self, request: EngineCoreRequest, engine: int) -> None:
        """Count `request` as outstanding on `engine`."""
        max_new = request.sampling_params.max_tokens
        if max_new is None:
            max_new = max(0, self.max_model_len - len(request.prompt_token_ids))
        state = _Outstanding(engine, len(request.prompt_token_ids), max_new)
        self._requests[request.request_id] = state
        self.loads[engine] += 1
        self.tokens_owed[engine] += state.prompt_tokens + state.max_new_tokens

    def on_output(self, output: EngineCoreOutput) -> None:
        """Account one engine output: tokens delivered; finished requests released."""
        state = self._requests.get(output.request_id)
        if state is None:
            return
        delivered = min(len(output.new_token_ids), state.max_new_tokens)
        self.tokens_owed[state.engine] -= state.prompt_tokens + delivered
        state.prompt_tokens = 0
        state.max_new_tokens -= delivered
        if output.finished:
            self.release(output.request_id)

    def release(self, request_id: str) -> int | None:
        """Forget `request_id` (finished or aborted); returns the engine it was on."""
        state = self._requests.pop(request_id, None)
        if state is None:
            return None
        self.loads[state.engine] -= 1
        self.tokens_owed[state.engine] -= state.prompt_tokens + state.max_new_tokens
        return state.engine

    def engine_of(self, request_id: str) -> int | None:
        state = self._requests.get(request_id)
        return None if state is None else state.engine

    def forget_prefixes(self) -> None:
        """After the engines' prefix caches were reset: no affinity is left to follow."""
        self._last_engine.clear()


class DPAsyncMPClient(EngineCoreClient):
    """`EngineCoreClient` over several `AsyncMPClient`s, one per data-parallel engine (see the
    module docstring). `clients[i]` serves engine `engine_indexes[i]`."""

    def __init__(self, clients: Sequence[AsyncMPClient],
                 max_imbalance: int = DEFAULT_MAX_IMBALANCE):
        assert len(clients) > 1
        self.clients = list(clients)
        self.ready = clients[0].ready
        self.engine_indexes = tuple(c.engine_index for c in clients)
        self.router = DPRouter(len(clients), self.ready.block_size, self.ready.max_model_len,
                               max_imbalance, clients[0].config.cache.enable_prefix_caching)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._outputs: asyncio.Queue[Any] | None = None
        self._closed = False
        self._first_dead: int | None = None
        logger.info("data parallelism: %d engines (%s), routed by load and prefix affinity",
                    len(clients), ", ".join(f"pid {c.process.pid}" for c in clients))

    @property
    def processes(self) -> list[EngineProcess]:
        return [c.process for c in self.clients]

    # ---- state --------------------------------------------------------------------------------

    @property
    def is_dead(self) -> bool:
        return any(c.is_dead for c in self.clients)

    @property
    def closed(self) -> bool:
        return self._closed

    def dead_error(self) -> EngineDeadError:
        dead = [i for i, c in enumerate(self.clients) if c.is_dead]
        if not dead:
            return EngineDeadError("The engine cores were shut down; no more requests can be "
                                   "served.")
        i = self._first_dead if self._first_dead in dead else dead[0]
        return EngineDeadError(f"data-parallel engine {self.engine_indexes[i]} (of "
                               f"{len(self.clients)}): {self.clients[i].dead_error()}")

    def _check_alive(self) -> None:
        if self._closed or self.is_dead:
            raise self.dead_error()

    # ---- outputs: one pump per engine into one queue ------------------------------------------

    def _ensure_started(self) -> asyncio.Queue[Any]:
        """Start the pumps in the running loop (once per loop, as `AsyncMPClient`)."""
        loop = asyncio.get_running_loop()
        if (outputs := self._outputs_of(loop)) is not None:
            return outputs
        self._loop, self._outputs = loop, asyncio.Queue()
        for i, client in enumerate(self.clients):
            loop.create_task(self._pump(i, client, self._outputs), name=f"sluice-dp-pump-{i}")
        return self._outputs

    async def _pump(self, i: int, client: AsyncMPClient, outputs: asyncio.Queue[Any]) -> None:
        try:
            while True:
                engine_outputs = await client.get_output()
                for output in engine_outputs.outputs:
                    self.router.on_output(output)
                outputs.put_nowait(engine_outputs)
        except EngineDeadError:
            if client.is_dead and self._first_dead is None:
                self._first_dead = i
            outputs.put_nowait(_DEAD)

    async def get_output(self) -> EngineCoreOutputs:
        outputs = self._ensure_started()
        item = await outputs.get()
        if item is _DEAD:
            outputs.put_nowait(_DEAD)
            raise self.dead_error()
        return item

    # ---- requests -----------------------------------------------------------------------------

    async def add_request(self, request: EngineCoreRequest) -> None:
        self._ensure_started()
        self._check_alive()
        engine = self.router.choose(request)
        self.router.add(request, engine)
        try:
            await self.clients[engine].add_request(request)
        except BaseException:
            self.router.release(request.request_id)
            raise

    def _by_engine(self, request_ids: Iterable[str]) -> dict[int, list[str]]:
        """Release `request_ids` and group them by the engine holding them (ids no engine
        holds any more, finished meanwhile, are dropped)."""
        groups: dict[int, list[str]] = {}
        for request_id in request_ids:
            engine = self.router.release(request_id)
            if engine is not None:
                groups.setdefault(engine, []).append(request_id)
        return groups

    async def abort_requests(self, request_ids: Iterable[str]) -> None:
        self._ensure_started()
        self._check_alive()
        for engine, ids in self._by_engine(request_ids).items():
            await self.clients[engine].abort_requests(ids)

    def abort_requests_nowait(self, request_ids: Iterable[str]) -> None:
        for engine, ids in self._by_engine(request_ids).items():
            self.clients[engine].abort_requests_nowait(ids)

    # ---- utility calls: every engine ----------------------------------------------------------

    async def _on_all(self, call: Callable[[AsyncMPClient], Awaitable[T]]) -> list[T]:
        """`call(client)` on every engine at once; the first failure is raised (a dead or hung
        engine's `EngineDeadError` names it)."""
        self._ensure_started()
        self._check_alive()
        results = await asyncio.gather(*(call(c) for c in self.clients),
                                       return_exceptions=True)
        for index, result in zip(self.engine_indexes, results):
            if isinstance(result, EngineDeadError):
                raise EngineDeadError(f"data-parallel engine {index} (of {len(results)}): "
                                      f"{result}")
            if isinstance(result, BaseException):
                raise result
        return results  # type: ignore[return-value]

    async def ping(self, timeout_s: float = HEALTH_TIMEOUT_S) -> float:
        return max(await self._on_all(lambda c: c.ping(timeout_s)))

    async def check_health(self, timeout_s: float = HEALTH_TIMEOUT_S) -> None:
        await self._on_all(lambda c: c.check_health(timeout_s))

    async def reset_prefix_cache(self) -> bool:
        done = all(await self._on_all(lambda c: c.reset_prefix_cache()))
        if done:
            self.router.forget_prefixes()
        return done

    async def sleep(self, level: int = 1) -> None:
        """All engines sleep, or none: if one refuses, those that slept are woken again."""
        self._ensure_started()
        self._check_alive()
        results = await asyncio.gather(*(c.sleep(level) for c in self.clients),
                                       return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            slept = [c for c, r in zip(self.clients, results) if not isinstance(r, BaseException)]
            await asyncio.gather(*(c.wake_up() for c in slept), return_exceptions=True)
            raise failed[0]

    async def wake_up(self) -> None:
        await self._on_all(lambda c: c.wake_up())

    async def sleep_level(self) -> int:
        return max(await self._on_all(lambda c: c.sleep_level()))

    def shutdown(self) -> None:
        """Stop every engine (they stop at the same time); idempotent, any thread."""
        self._closed = True
        for client in self.clients:
            client.request_stop()
        for client in self.clients:   # reaps each in turn; all were stopping meanwhile
            client.shutdown()
