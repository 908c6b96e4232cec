"""The startup heap frozen out of the garbage collector (`sluice.gc_heap`): what is frozen
stays alive and is skipped, later cycles are still collected, and a thaw hands frozen cycles
back to the collector."""

from __future__ import annotations

import gc
import weakref

import pytest

from sluice.gc_heap import freeze_startup_heap, thaw_heap


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


def _cycle() -> weakref.ref:
    """A two-object reference cycle, unreachable once this returns; a weak ref to one end."""
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    return weakref.ref(a)


@pytest.fixture
def frozen():
    gc.unfreeze()
    yield
    gc.unfreeze()


def test_cycles_made_after_the_freeze_are_collected(frozen):
    assert freeze_startup_heap() == gc.get_freeze_count() > 0
    dead = _cycle()
    gc.collect()
    assert dead() is None


def test_a_frozen_cycle_is_kept_until_the_thaw(frozen):
    holder = [_Node()]
    holder[0].other = _Node()
    holder[0].other.other = holder[0]
    node = weakref.ref(holder[0])
    freeze_startup_heap()
    holder.clear()           # the cycle is garbage now, but frozen
    gc.collect()
    assert node() is not None
    thaw_heap()
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert node() is None


def test_the_freeze_collects_existing_garbage_first(frozen):
    dead = _cycle()
    freeze_startup_heap()
    assert dead() is None
