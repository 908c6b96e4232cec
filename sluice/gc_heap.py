"""Keep the startup heap out of Python's cyclic garbage collector.

A started engine holds a few hundred thousand long-lived Python objects (torch modules and
their parameters, the tokenizer, imported modules, the scheduler's tables). Each full (oldest
generation) collection walks all of them and pauses the process meanwhile: ~110 ms for the
benchmark reference model's engine, one step's delay for every request in flight of a
server. `freeze_startup_heap()` collects once and moves every object alive at that point into
the permanent generation (`gc.freeze`), which later collections skip (the same full collection:
~15 ms); objects made afterwards (requests, outputs) are collected as usual.
Frozen objects are still freed by reference counting; only cycles among them would outlive
the freeze, which is why the heap is collected first, and why `thaw_heap()` returns the frozen
objects to the oldest generation when their owner shuts down: a program that makes and drops
several `LLM`s in turn (a notebook, a test suite) gets each dropped engine's cycles collected.

Called once a process has finished starting: at the end of `EngineCore.__init__` (the engine
core process, or the offline `LLM`'s process), and by the OpenAI server when it begins serving;
`EngineCore.shutdown` and the server's shutdown thaw, and so does `EngineCore.sleep` (the
weights and the KV cache it releases may sit in frozen cycles; `wake_up` freezes again). With
two engines in one process the first shutdown thaws both heaps: later full collections walk
them again (slower, still correct).
"""

from __future__ import annotations

import gc
import logging

logger = logging.getLogger(__name__)


def freeze_startup_heap() -> int:
    """Collect, then freeze every object alive now; returns how many are frozen in total."""
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    logger.debug("garbage collector: %d startup objects frozen", frozen)
    return frozen


def thaw_heap() -> None:
    """Return every frozen object to the oldest generation (`gc.unfreeze`); see the module
    docstring for when."""
    gc.unfreeze()
