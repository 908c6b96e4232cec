"""The worker's adapters: a CPU cache of loaded adapters and `max_loras` active slots.

    cache   lora_int_id -> the adapter's per-layer slot weights (`layers.shard_for_layer`:
            stacked / block-diagonal, this rank's shard, the model's dtype), in CPU memory, in
            least-recently-used order; at most `max_cpu_loras` (the least recently used one
            not needed by the current step is evicted when another is loaded).
    slots   `max_loras` slots; slot s of every wrapped layer (`layer.lora_a` / `lora_b`, see
            `sluice.lora.layers`) holds a copy of the weights of adapter `slot_ids[s]` on the
            model's device. An adapter keeps its slot while it stays in use; a new one takes
            the lowest free slot or else the least recently used slot not needed this step.

Per step (`prepare`, called by the model runner before the forward): the batch's requests in
order, each with its `LoRARequest` or None (base model), and their token counts -> the order
that groups the requests by adapter slot (the runner builds its batch in that order: the
model's result does not depend on the order of requests in a batch, and outputs are keyed by
request id) and the step's `LoRAMapping` (`sluice.lora.forward_context`; None when no request
uses an adapter). Grouped, each adapter's tokens are one contiguous segment: no gather or
scatter in the layers. Adapters are loaded on first use from the request's `lora_path` (keyed
by `lora_int_id`). The scheduler admits at most `max_loras` distinct adapters per step; more
is an invariant violation.

Memory: the slots are allocated with the model (`max_loras` adapters of rank `max_lora_rank`
on all seven projections; model tensors, so the runner's `model_memory_bytes` counts them);
`reserved_bytes()` is what the CPU cache may hold at most (`max_cpu_loras` such adapters),
which the worker sets aside from the KV cache's share. `activate_dummy()` marks every slot
full-rank (zero weights) for the profiling / warm-up forward, so that it runs the LoRA path
with `max_loras` adapters.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch
from torch import nn

from sluice.config import LoRAConfig
from sluice.errors import ConfigError
from sluice.hf_config import ModelSpec
from sluice.lora.forward_context import LoRAMapping
from sluice.lora.layers import SlotWeights, set_slot, shard_for_layer
from sluice.lora.peft import load_adapter
from sluice.lora.request import LoRARequest

logger = logging.getLogger(__name__)

_DUMMY_ID = -1   # the profiling adapter's id (real ids are >= 1)

AdapterSlots = list[SlotWeights | None]   # per wrapped layer, in `layers` order


class LoRAWorkerManager:
    """Loads, caches and activates adapters for one worker (module doc)."""

    def __init__(self, config: LoRAConfig, spec: ModelSpec, layers: list[nn.Module],
                 dtype: torch.dtype, device: torch.device) -> None:
        self.max_loras = config.max_loras
        self.max_cpu_loras = config.max_cpu_loras or config.max_loras
        if self.max_cpu_loras < self.max_loras:
            raise ConfigError(f"--max-cpu-loras ({self.max_cpu_loras}) must be at least "
                              f"--max-loras ({self.max_loras}): every active adapter is also "
                              "kept loaded.")
        self.max_lora_rank = config.max_lora_rank
        self.spec, self.layers, self.dtype, self.device = spec, layers, dtype, device
        self.cache: OrderedDict[int, AdapterSlots] = OrderedDict()
        self.slot_ids: list[int | None] = [None] * self.max_loras
        self._slot_used: list[int] = [0] * self.max_loras   # step counter of last use
        self._step = 0
        self.num_loads = 0   # adapters read from disk so far (cache misses)

    # ---- the step ------------------------------------------------------------------------
    def prepare(self, lora_requests: list[LoRARequest | None], num_tokens: list[int]
                ) -> tuple[list[int] | None, LoRAMapping | None]:
        """Load and activate the step's adapters -> (order, mapping): `order` None, or the
        batch order that groups the requests by slot (base model first, stable within a
        group; `order[k]` = the index of the request to run k-th), so that every adapter's
        tokens are one contiguous segment; the mapping is that of the (re)ordered batch
        (None when no request uses an adapter)."""
        self._step += 1
        wanted: dict[int, LoRARequest] = {}
        for req in lora_requests:
            if req is not None:
                wanted.setdefault(req.lora_int_id, req)
        if not wanted:
            return None, None
        if len(wanted) > self.max_loras:
            raise RuntimeError(f"a step uses {len(wanted)} adapters, more than --max-loras "
                               f"{self.max_loras} (the scheduler admits at most that many)")
        slot_of = {lid: self._activate(req, set(wanted)) for lid, req in wanted.items()}
        slots = [-1 if req is None else slot_of[req.lora_int_id] for req in lora_requests]
        order: list[int] | None = sorted(range(len(slots)), key=slots.__getitem__)
        if order == list(range(len(slots))):
            order = None
        else:
            slots, num_tokens = [slots[i] for i in order], [num_tokens[i] for i in order]
        mapping = LoRAMapping.from_requests([None if s < 0 else s for s in slots], num_tokens,
                                            self.device)
        return order, mapping

    def _activate(self, req: LoRARequest, needed: set[int]) -> int:
        """The slot of adapter `req` (loading it into the cache and a slot if needed)."""
        lid = req.lora_int_id
        weights = self._cached(req, needed)
        if lid in self.slot_ids:
            slot = self.slot_ids.index(lid)
        else:
            free = [s for s, i in enumerate(self.slot_ids) if i is None or i not in needed]
            assert free, "more adapters than slots in one step"
            slot = min(free, key=lambda s: (self.slot_ids[s] is not None, self._slot_used[s], s))
            self._fill_slot(slot, lid, weights)
        self._slot_used[slot] = self._step
        return slot

    def _cached(self, req: LoRARequest, needed: set[int]) -> AdapterSlots:
        """The adapter's slot weights from the cache (LRU refresh), else loaded from disk
        after evicting least recently used adapters not needed this step."""
        lid = req.lora_int_id
        if lid in self.cache:
            self.cache.move_to_end(lid)
            return self.cache[lid]
        for old in list(self.cache):
            if len(self.cache) < self.max_cpu_loras:
                break
            if old not in needed:
                self.remove(old)
        weights = self._load(req)
        self.cache[lid] = weights
        return weights

    def _load(self, req: LoRARequest) -> AdapterSlots:
        adapter = load_adapter(req.lora_path, self.spec, self.max_lora_rank, torch.float32)
        self.num_loads += 1
        logger.info("LoRA adapter %s (id %d) loaded from %s: rank %d, %s", req.lora_name,
                    req.lora_int_id, req.lora_path, adapter.config.max_rank,
                    ", ".join(adapter.config.target_modules))
        return self._per_layer(adapter.weights)

    def _per_layer(self, weights: dict) -> AdapterSlots:
        """Full HF pairs {(layer, proj): (A, B)} -> slot weights per wrapped layer."""
        out: AdapterSlots = []
        for layer in self.layers:
            idx, subs = layer.lora_target
            pairs = {sub: weights[(idx, sub)] for sub in subs if (idx, sub) in weights}
            out.append(shard_for_layer(layer, pairs, self.dtype, "cpu"))
        return out

    def _fill_slot(self, slot: int, lid: int | None, weights: AdapterSlots | None) -> None:
        for i, layer in enumerate(self.layers):
            set_slot(layer, slot, None if weights is None else weights[i])
        self.slot_ids[slot] = lid

    # ---- management ----------------------------------------------------------------------
    def remove(self, lora_int_id: int) -> bool:
        """Drop an adapter from the cache and its slot; whether it was loaded."""
        if lora_int_id in self.slot_ids:
            self._fill_slot(self.slot_ids.index(lora_int_id), None, None)
        return self.cache.pop(lora_int_id, None) is not None

    def loaded_ids(self) -> list[int]:
        """Cached adapter ids, least recently used first."""
        return list(self.cache)

    # ---- memory and profiling ------------------------------------------------------------
    def reserved_bytes(self) -> int:
        """Bytes of `max_cpu_loras` rank-`max_lora_rank` adapters on every projection, in the
        cache's form (per wrapped layer what one slot holds: stride x (in + out), the
        block-diagonal zeros of merged layers included)."""
        element = torch.empty((), dtype=self.dtype).element_size()
        per_adapter = sum(layer.lora_stride * (layer.in_features + layer.out_features)
                          for layer in self.layers)
        return self.max_cpu_loras * per_adapter * element

    def activate_dummy(self) -> None:
        """Mark every slot as a full-rank adapter on all projections, with zero weights
        (profiling/warm-up; `deactivate_dummy` clears them). Evicts the adapters in slots."""
        for slot in range(self.max_loras):
            self._fill_slot(slot, None, None)
            for layer in self.layers:
                layer.lora_ranks[slot] = layer.lora_stride
            self.slot_ids[slot] = _DUMMY_ID

    def deactivate_dummy(self) -> None:
        for slot, lid in enumerate(self.slot_ids):
            if lid == _DUMMY_ID:
                self._fill_slot(slot, None, None)

    def dummy_mapping(self, num_tokens: list[int]) -> LoRAMapping | None:
        """Requests spread round-robin over the slots (after `activate_dummy`)."""
        return LoRAMapping.from_requests([r % self.max_loras for r in range(len(num_tokens))],
                                         num_tokens, self.device)
