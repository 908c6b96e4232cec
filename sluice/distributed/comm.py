"""Collective communication behind one object per process group: the only module (with
`parallel_state`) that calls `torch.distributed`.

`Communicator` is what layers, the model runner and the workers call. Two implementations:

* `SingleRankCommunicator`: a group of one rank; every collective is the identity (or a copy
  where the contract returns a new tensor). Used whenever a group has size 1, so the
  single-process path never touches `torch.distributed`.
* `TorchCommunicator`: a `torch.distributed` process group (gloo on CPU, NCCL on CUDA, picked by
  the platform when the world is initialised). A faster CPU shared-memory all-reduce can be a
  third implementation without touching the callers.

Ranks are given in-group (0 .. size-1) everywhere; `TorchCommunicator` maps them to global
ranks for point-to-point calls.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
import torch.distributed as dist


class Communicator(ABC):
    """Collectives over one group of `size` ranks; this process is `rank` (in-group)."""

    rank: int
    size: int

    @abstractmethod
    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over the group, in place; returns it."""

    @abstractmethod
    def all_gather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's `tensor` (same shape on all ranks) along `dim`, in rank
        order; a new tensor on every rank."""

    @abstractmethod
    def gather(self, tensor: torch.Tensor, dst: int = 0, dim: int = -1) -> torch.Tensor | None:
        """Like `all_gather`, but only rank `dst` receives the result; the others get None."""

    @abstractmethod
    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Overwrite `tensor` on every rank with rank `src`'s (same shape/dtype on all ranks)."""

    @abstractmethod
    def broadcast_object(self, obj: Any = None, src: int = 0) -> Any:
        """Rank `src`'s picklable `obj` on every rank (control data only, never on a hot path
        that a typed message could carry)."""

    @abstractmethod
    def send(self, tensor: torch.Tensor, dst: int) -> None:
        """Send `tensor` to in-group rank `dst` (blocking)."""

    @abstractmethod
    def recv(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        """Receive into `tensor` (shape/dtype agreed beforehand) from in-group rank `src`."""

    @abstractmethod
    def barrier(self) -> None: ...


class SingleRankCommunicator(Communicator):
    """A group of one: collectives are the identity."""

    def __init__(self) -> None:
        self.rank, self.size = 0, 1

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        return tensor.clone()

    def gather(self, tensor: torch.Tensor, dst: int = 0, dim: int = -1) -> torch.Tensor | None:
        return tensor.clone()

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        return tensor

    def broadcast_object(self, obj: Any = None, src: int = 0) -> Any:
        return obj

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        raise RuntimeError("send on a single-rank group: there is no other rank")

    def recv(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        raise RuntimeError("recv on a single-rank group: there is no other rank")

    def barrier(self) -> None:
        pass


class TorchCommunicator(Communicator):
    """A `torch.distributed` process group over the global ranks `ranks` (in-group rank i is
    global rank ranks[i])."""

    def __init__(self, group: dist.ProcessGroup, ranks: list[int]) -> None:
        self.group = group
        self.ranks = list(ranks)
        self.size = len(ranks)
        self.rank = self.ranks.index(dist.get_rank())

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor, group=self.group)
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        dist.all_gather(parts, tensor, group=self.group)
        return torch.cat(parts, dim=dim)

    def gather(self, tensor: torch.Tensor, dst: int = 0, dim: int = -1) -> torch.Tensor | None:
        tensor = tensor.contiguous()
        if tensor.device.type != "cpu":   # NCCL has no gather: all_gather, keep dst's copy
            out = self.all_gather(tensor, dim)
            return out if self.rank == dst else None
        parts = [torch.empty_like(tensor) for _ in range(self.size)] if self.rank == dst else None
        dist.gather(tensor, parts, dst=self.ranks[dst], group=self.group)
        return torch.cat(parts, dim=dim) if parts is not None else None

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        dist.broadcast(tensor, src=self.ranks[src], group=self.group)
        return tensor

    def broadcast_object(self, obj: Any = None, src: int = 0) -> Any:
        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=self.ranks[src], group=self.group)
        return box[0]

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        dist.send(tensor.contiguous(), dst=self.ranks[dst], group=self.group)

    def recv(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        dist.recv(tensor, src=self.ranks[src], group=self.group)
        return tensor

    def barrier(self) -> None:
        dist.barrier(group=self.group)

