"""`Offloader`: runs the API-server process's CPU-heavy calls (tokenizing, chat-template
rendering, detokenizing large inputs) on a small thread pool, so that the event loop keeps
answering `/health` and streaming to other clients meanwhile. No torch.

Why threads help: the Rust tokenizer releases the GIL while it encodes a batch (transformers'
`encode` goes through `encode_batch`), and pure-Python work such as jinja rendering is preempted
every `sys.getswitchinterval()` (5 ms), so the loop thread gets its turn either way.

Small inputs are not worth a thread hop (~50 us): `run_if_large` runs them inline.
"""

from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

T = TypeVar("T")

INLINE_CHARS = 4096
"""Inputs up to this many characters (or token ids) are processed on the event loop: their cost
(well under a millisecond) is below the cost of the thread hop."""


class Offloader:
    """A bounded thread pool (`max_workers` threads; callers queue beyond that)."""

    def __init__(self, max_workers: int = 2, name: str = "sluice-offload"):
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=name)

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)` on a pool thread; its exception is raised here."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    async def run_if_large(self, size: int, fn: Callable[..., T], *args: Any,
                           **kwargs: Any) -> T:
        """`fn(...)` inline when `size` (characters or items of its input) is at most
        `INLINE_CHARS`, else on a pool thread."""
        if size <= INLINE_CHARS:
            return fn(*args, **kwargs)
        return await self.run(fn, *args, **kwargs)

    def shutdown(self) -> None:
        """Stop the threads once queued calls finish (does not wait)."""
        self._pool.shutdown(wait=False, cancel_futures=True)
