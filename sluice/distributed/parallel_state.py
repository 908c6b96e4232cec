"""Parallel state, set once per worker process: the world, the tensor-parallel (TP) group and
the pipeline-parallel (PP) group of this rank, each behind a `Communicator`.

Rank layout (vLLM's): world_size = pp_size * tp_size and global rank
    rank = pp_rank * tp_size + tp_rank
so TP group p holds ranks [p*tp, (p+1)*tp) and PP group t holds ranks {t, t+tp, t+2*tp, ...}.
Rank 0 (tp_rank 0 of the first stage) is the driver; the step's result comes from tp_rank 0
of the last stage (`ParallelConfig.output_rank`; rank 0 itself without pipeline parallelism),
which samples.

Before `init_parallel_state` runs (the single-process engine, unit tests), every group is a
`SingleRankCommunicator`, so code written for TP/PP runs unchanged with one rank and never
touches `torch.distributed`. Layers read `get_tp_group()` / `get_pp_group()` once, in their
constructors (the model is built after the state is set); nothing else keeps global state.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

from sluice.distributed.comm import Communicator, SingleRankCommunicator, TorchCommunicator

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParallelLayout:
    """Where global rank `rank` sits in a tp_size x pp_size world."""

    tp_size: int = 1
    pp_size: int = 1
    rank: int = 0

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def pp_rank(self) -> int:
        return self.rank // self.tp_size

    def tp_group_ranks(self, pp_rank: int) -> list[int]:
        return [pp_rank * self.tp_size + t for t in range(self.tp_size)]

    def pp_group_ranks(self, tp_rank: int) -> list[int]:
        return [p * self.tp_size + tp_rank for p in range(self.pp_size)]

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1


_SINGLE = SingleRankCommunicator()
_layout = ParallelLayout()
_world: Communicator = _SINGLE
_tp: Communicator = _SINGLE
_pp: Communicator = _SINGLE


def init_parallel_state(layout: ParallelLayout, init_method: str, backend: str,
                        timeout_s: float = 600.0) -> None:
    """Join the world (`torch.distributed.init_process_group(backend, init_method,
    world_size, rank)`, e.g. init_method "tcp://127.0.0.1:29500") and build this rank's TP and
    PP groups. Every rank must call it with the same sizes; groups are created by all ranks
    in the same order, as torch.distributed requires. A world of one rank builds nothing."""
    global _layout, _world, _tp, _pp
    _layout = layout
    if layout.world_size == 1:
        _world = _tp = _pp = _SINGLE
        return
    dist.init_process_group(backend, init_method=init_method, world_size=layout.world_size,
                            rank=layout.rank, timeout=timedelta(seconds=timeout_s))
    _world = TorchCommunicator(dist.group.WORLD, list(range(layout.world_size)))
    tp, pp = _SINGLE, _SINGLE
    for p in range(layout.pp_size):
        ranks = layout.tp_group_ranks(p)
        group = dist.new_group(ranks)   # every rank takes part in every new_group call
        if layout.tp_size > 1 and layout.rank in ranks:
            tp = TorchCommunicator(group, ranks)
    for t in range(layout.tp_size):
        ranks = layout.pp_group_ranks(t)
        group = dist.new_group(ranks)
        if layout.pp_size > 1 and layout.rank in ranks:
            pp = TorchCommunicator(group, ranks)
    _tp, _pp = tp, pp
    logger.debug("rank %d: tp %d/%d, pp %d/%d (%s)", layout.rank, layout.tp_rank,
                 layout.tp_size, layout.pp_rank, layout.pp_size, backend)


def destroy_parallel_state() -> None:
    """Leave the world (safe to call when it was never joined, and twice)."""
    global _layout, _world, _tp, _pp
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _layout, _world, _tp, _pp = ParallelLayout(), _SINGLE, _SINGLE, _SINGLE


def get_layout() -> ParallelLayout:
    return _layout


def get_world_group() -> Communicator:
    return _world


def get_tp_group() -> Communicator:
    return _tp


def get_pp_group() -> Communicator:
    return _pp
