"""The step's LoRA mapping: which adapter slot each token of the flattened batch uses, and the
one guarded slot through which LoRA-wrapped layers read it.

    with set_lora_mapping(mapping):          # the model runner, around the forward
        hidden = model(input_ids, positions)  # LoRALinearMethod.apply reads current_lora_mapping()

Nesting raises. Outside a `set_lora_mapping` block (or with mapping None: no token of the step
uses an adapter) `current_lora_mapping()` is None and wrapped layers compute the base product
only.

Segments (`LoRAMapping`): tokens are grouped by slot so that each adapter's pair runs as one
shrink GEMM and one expand GEMM over all its tokens (never a per-token loop):

    index None:    segments (slot, start, end) are rows [start, end) of the batch itself: every
                   slot's tokens form one contiguous run (one adapter for the whole batch, or
                   requests of one adapter scheduled next to each other); no gather/scatter.
    index [N]:     the batch rows of the N adapter tokens, grouped by slot (slot order, batch
                   order within a slot); segments (slot, start, end) are positions in `index`.
                   Layers gather x[index], run the segments, scatter-add the deltas back.

Base-model tokens appear in no segment.

Stacked form (`stacked`: a step of at most STACKED_MAX_TOKENS tokens whose adapters need more
than one segment, i.e. decode-sized mixed batches): every wrapped layer keeps its slots' weights
stacked (`lora_a` = A of every slot [max_loras * stride, in], `lora_b` = B.T of every slot
[max_loras * stride, out], slot s in rows [s * stride, (s + 1) * stride), zero-padded; see
`sluice.lora.layers`) and runs ALL adapter tokens in three ops whatever the number of adapters:

    h = x @ lora_a[:n].T;   h *= mask(stride);   y += h @ lora_b[:n]

with n = num_slots * stride (`num_slots` = 1 + the highest slot used) and `mask(stride)` [T, n]
the 0/1 matrix that keeps, for each token, only its own slot's block (all zeros for base
tokens). Extra work: each token multiplies by every used slot's block (n columns instead of its
own), which for small T costs less than the Python and threading overhead of one GEMM pair per
segment; larger steps (prefill) use the segments.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

#: steps of at most this many tokens with more than one adapter segment use the stacked form
STACKED_MAX_TOKENS = 16


@dataclass(frozen=True)
class LoRAMapping:
    """Token -> adapter slot for one step, as segments (module doc). `token_slots` [T] long
    is each token's slot (-1: base model); `stacked` whether layers use the stacked form."""
    num_tokens: int
    segments: tuple[tuple[int, int, int], ...]
    index: torch.Tensor | None = None
    token_slots: torch.Tensor | None = None
    stacked: bool = False
    _masks: dict[tuple[int, torch.dtype], torch.Tensor] = field(
        default_factory=dict, compare=False, repr=False)

    @property
    def num_slots(self) -> int:
        """1 + the highest slot any token uses (the stacked form's slot count)."""
        return 1 + max(slot for slot, _, _ in self.segments)

    def mask(self, stride: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[T, num_slots * stride] of `dtype`: 1 where column // stride is the token's slot,
        else 0 (cached per stride and dtype: one per kind of wrapped layer per step)."""
        mask = self._masks.get((stride, dtype))
        if mask is None:
            cols = torch.arange(self.num_slots * stride, device=self.token_slots.device) // stride
            mask = (self.token_slots[:, None] == cols[None, :]).to(dtype)
            self._masks[(stride, dtype)] = mask
        return mask

    @classmethod
    def from_requests(cls, slots: Sequence[int | None], num_tokens: Sequence[int],
                      device: torch.device | str = "cpu") -> "LoRAMapping | None":
        """The mapping of a batch whose request r (batch order) runs `num_tokens[r]` tokens
        with adapter slot `slots[r]` (None: the base model); None when no token uses a slot.
        Cost: O(requests) Python plus one index tensor when a slot's tokens are split."""
        runs: list[tuple[int, int, int]] = []   # (slot, start, end), adjacent same-slot merged
        start = 0
        for slot, n in zip(slots, num_tokens):
            if slot is not None and n:
                if runs and runs[-1][0] == slot and runs[-1][2] == start:
                    runs[-1] = (slot, runs[-1][1], start + n)
                else:
                    runs.append((slot, start, start + n))
            start += n
        if not runs:
            return None
        by_slot: dict[int, list[tuple[int, int]]] = {}
        for slot, s, e in runs:
            by_slot.setdefault(slot, []).append((s, e))
        stacked = len(runs) > 1 and start <= STACKED_MAX_TOKENS
        token_slots = None
        if stacked:
            token_slots = torch.repeat_interleave(
                torch.tensor([-1 if s is None else s for s in slots]),
                torch.tensor(list(num_tokens))).to(device)
        if all(len(r) == 1 for r in by_slot.values()):
            return cls(start, tuple(runs), None, token_slots, stacked)
        segments, pieces, pos = [], [], 0
        for slot in sorted(by_slot):
            seg_start = pos
            for s, e in by_slot[slot]:
                pieces.append(torch.arange(s, e))
                pos += e - s
            segments.append((slot, seg_start, pos))
        index = torch.cat(pieces).to(device)
        return cls(start, tuple(segments), index, token_slots, stacked)


_current: LoRAMapping | None = None
_active = False


@contextmanager
def set_lora_mapping(mapping: LoRAMapping | None) -> Iterator[LoRAMapping | None]:
    """Make `mapping` visible to LoRA-wrapped layers for one forward (refuses nesting)."""
    global _current, _active
    if _active:
        raise RuntimeError("set_lora_mapping: a LoRA mapping is already active; mappings "
                           "cannot be nested.")
    _current, _active = mapping, True
    try:
        yield mapping
    finally:
        _current, _active = None, False


def current_lora_mapping() -> LoRAMapping | None:
    """The active step's mapping, or None (no adapter tokens, or no mapping set)."""
    return _current
