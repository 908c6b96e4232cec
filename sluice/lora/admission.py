"""`LoRAAdmission`: at most `--max-loras` distinct adapters per step, without starvation. No torch.

The scheduler calls it through `core.sched.hooks.AdmissionPolicy` while it walks the waiting
queue (see `Scheduler._schedule_waiting`). Base-model requests never count and are never held
back by it. The *active set* of a step is the adapters of the running requests plus those
admitted so far in this walk; it never exceeds `max_loras`, so running requests never have to be
preempted for it.

The rule, for a waiting request of adapter `a` (queue order: arrival, or priority):

1. `a` active                 → admitted, unless `a` is the *draining* adapter and a blocked
                                request was met earlier in this walk (see 3);
2. `a` not active, set < max  → admitted (`a` joins the active set);
3. `a` not active, set full   → *blocked*: skipped this step, keeping its place in the queue.
   The first blocked request of a walk makes sure a slot will free up for it: unless one is
   draining already, the active adapter with the fewest running requests (ties: the lowest id)
   becomes the *draining* adapter, and from then on no request of that adapter *behind* a
   blocked request is admitted. Its running requests finish in bounded time (max_tokens,
   max_model_len), the adapter leaves the active set, and the next walk reaches the oldest
   blocked request before any later arrival, so it takes the slot. Other active adapters
   and the base model keep being admitted meanwhile (throughput), and a request of the
   draining adapter that is *ahead* of the blocked one (older) still goes first.

The draining adapter is sticky across steps (so two adapters of similar load cannot take turns
being "the smallest" forever); it is cleared once it is no longer active.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from sluice.core.request import Request


class LoRAAdmission:
    """The `AdmissionPolicy` for `--max-loras` (see the module docstring)."""

    def __init__(self, max_loras: int):
        assert max_loras >= 1, max_loras
        self.max_loras = max_loras
        self.draining: int | None = None        # adapter id kept from new admissions
        self._active: dict[int, int] = {}       # adapter id -> running (+ admitted) requests
        self._blocked_seen = False              # a blocked request met earlier in this walk

    def begin_step(self, running: Sequence["Request"]) -> None:
        active: dict[int, int] = {}
        for request in running:
            lora_id = request.lora_int_id
            if lora_id:
                active[lora_id] = active.get(lora_id, 0) + 1
        self._active = active
        if self.draining is not None and self.draining not in active:
            self.draining = None   # its slot is free: the oldest blocked request gets it now
        self._blocked_seen = False

    def may_admit(self, request: "Request") -> bool:
        lora_id = request.lora_int_id
        if not lora_id:
            return True
        if lora_id in self._active:
            return not (self._blocked_seen and lora_id == self.draining)
        if len(self._active) < self.max_loras:
            return True
        if not self._blocked_seen:
            self._blocked_seen = True
            if self.draining is None:
                self.draining = min(self._active, key=lambda i: (self._active[i], i))
        return False

    def admitted(self, request: "Request") -> None:
        lora_id = request.lora_int_id
        if lora_id:
            self._active[lora_id] = self._active.get(lora_id, 0) + 1
            assert len(self._active) <= self.max_loras, (self._active, self.max_loras)

    @property
    def active_lora_ids(self) -> set[int]:
        """The adapters of the current step's walk (for tests and stats)."""
        return set(self._active)
