"""Waiting queues: the order in which the scheduler admits requests.

* `FCFSQueue`: arrival order (a deque). Preempted requests go back to the front (`prepend`).
* `PriorityQueue`: a heap on `(priority, arrival_time, request_id)`; a lower priority value is
  served first (as in vLLM), ties by arrival. Preempted requests re-enter by the same key.

Both remove a batch of requests in one O(n) pass (`remove_requests`); neither ever removes a
single element from the middle.
"""

from __future__ import annotations

import heapq
from abc import ABC, abstractmethod
from collections import deque
from typing import Iterator

from sluice.core.request import Request


class RequestQueue(ABC):
    """The common interface of the waiting queues."""

    @abstractmethod
    def add(self, request: Request) -> None:
        """Enqueue a newly arrived request."""

    @abstractmethod
    def prepend(self, request: Request) -> None:
        """Re-enqueue a preempted request ahead of later arrivals."""

    @abstractmethod
    def peek(self) -> Request:
        """The next request to admit (IndexError when empty)."""

    @abstractmethod
    def pop(self) -> Request:
        """Remove and return the next request to admit (IndexError when empty)."""

    @abstractmethod
    def remove_requests(self, request_ids: set[str]) -> None:
        """Drop every queued request whose id is in `request_ids` (one pass)."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __iter__(self) -> Iterator[Request]:
        """In admission order."""

    def __bool__(self) -> bool:
        return len(self) > 0


class FCFSQueue(RequestQueue):
    def __init__(self) -> None:
        self._queue: deque[Request] = deque()

    def add(self, request: Request) -> None:
        self._queue.append(request)

    def prepend(self, request: Request) -> None:
        self._queue.appendleft(request)

    def peek(self) -> Request:
        if not self._queue:
            raise IndexError("peek from an empty queue")
        return self._queue[0]

    def pop(self) -> Request:
        return self._queue.popleft()

    def remove_requests(self, request_ids: set[str]) -> None:
        if request_ids:
            self._queue = deque(r for r in self._queue if r.request_id not in request_ids)

    def __len__(self) -> int:
        return len(self._queue)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._queue)


class PriorityQueue(RequestQueue):
    def __init__(self) -> None:
        self._heap: list[tuple[int, float, str, Request]] = []

    def add(self, request: Request) -> None:
        heapq.heappush(self._heap, (request.priority, request.arrival_time,
                                    request.request_id, request))

    def prepend(self, request: Request) -> None:
        self.add(request)  # its key already orders it ahead of later arrivals

    def peek(self) -> Request:
        if not self._heap:
            raise IndexError("peek from an empty queue")
        return self._heap[0][-1]

    def pop(self) -> Request:
        return heapq.heappop(self._heap)[-1]

    def remove_requests(self, request_ids: set[str]) -> None:
        if request_ids:
            self._heap = [e for e in self._heap if e[2] not in request_ids]
            heapq.heapify(self._heap)

    def __len__(self) -> int:
        return len(self._heap)

    def __iter__(self) -> Iterator[Request]:
        return (entry[-1] for entry in sorted(self._heap, key=lambda e: e[:3]))


def create_request_queue(policy: str) -> RequestQueue:
    """The waiting queue for `SchedulerConfig.scheduling_policy` ("fcfs" or "priority")."""
    if policy == "fcfs":
        return FCFSQueue()
    if policy == "priority":
        return PriorityQueue()
    raise ValueError(f"unknown scheduling policy {policy!r}; expected 'fcfs' or 'priority'")
