"""Model weights on CPU in transparent huge pages.

A decode step streams every weight once. With 4 KiB pages that is a TLB miss every 4 KiB, and
the hardware prefetchers stop at each page boundary; in 2 MiB pages the same GEMV reads ~20%
faster here (26-27 -> 31-32 GB/s for a 160 MB weight at one row, the reference model's decode).

`place_parameters_in_huge_pages(model)` moves every parameter of `model` into one anonymous
mapping advised MADV_HUGEPAGE (honoured when the system's transparent_hugepage setting is
`madvise` or `always`; otherwise the mapping is ordinary memory and nothing changes). Call it
before the weights are loaded: parameters are re-pointed, not copied, so values are lost and
the peak memory is the model once.
"""

from __future__ import annotations

import logging
import mmap

import torch
from torch import nn

logger = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20
ALIGN = 64  # every parameter starts on a cache line


def huge_page_buffer(nbytes: int) -> torch.Tensor:
    """A zero-filled uint8 tensor of `nbytes`, 2 MiB-aligned, in a mapping advised for huge
    pages (the tensor keeps the mapping alive)."""
    mapping = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        mapping.madvise(mmap.MADV_HUGEPAGE)
    except (AttributeError, OSError) as e:  # no THP support: ordinary pages
        logger.debug("MADV_HUGEPAGE unavailable (%s); weights use ordinary pages", e)
    buffer = torch.frombuffer(mapping, dtype=torch.uint8)
    skip = (-buffer.data_ptr()) % HUGE_PAGE
    return buffer[skip:skip + nbytes]


def place_parameters_in_huge_pages(model: nn.Module) -> int:
    """Re-point every CPU parameter of `model` (shared ones once) at a slice of one huge-page
    buffer, in `named_parameters` order; values are NOT kept. Returns the bytes placed."""
    params = [p for p in model.parameters() if p.device.type == "cpu"]
    offsets, total = [], 0
    for p in params:
        offsets.append(total)
        total += -(-p.numel() * p.element_size() // ALIGN) * ALIGN
    if not params:
        return 0
    buffer = huge_page_buffer(total)
    for p, start in zip(params, offsets):
        nbytes = p.numel() * p.element_size()
        p.data = buffer[start:start + nbytes].view(p.dtype).view(p.shape)
    return total
