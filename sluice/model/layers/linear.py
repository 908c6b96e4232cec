"""Linear layers with weight loaders that map Hugging Face tensors into our (fused) parameters.

Contract: every parameter that a checkpoint fills carries a `weight_loader(param, loaded,
shard_id)` attribute. `shard_id` is None for plain layers, "q"/"k"/"v" for `QKVLinear` and an
int for `MergedColumnLinear`. `loaded` is a `torch.Tensor` or a `LazyTensor` (a memory-mapped
checkpoint tensor not read yet: loaders `narrow` it, so each rank reads only its own slice).
Loaders check shapes and raise `ValueError` with both shapes; the model's `load_weights` turns
that into a `ModelLoadError` naming the HF tensor.

The product: each layer holds a `LinearMethod` (`sluice.model.layers.linear_method`) chosen
when the model is built (`layer_ops.current_layer_ops()`, read once in the constructor, or the
`linear_method` argument). The method creates `weight` / `bias` (with the layer's loader
attached), derives what it needs after loading (`process_weights_after_loading`: e.g. a oneDNN
pre-packed copy) and computes `apply(layer, x, bias)`; the layer keeps its shapes, its shard and
its TP group, and does the all-reduce itself.

Tensor parallelism: each parallel layer takes its `tp_group` (a `sluice.distributed`
`Communicator`) at construction, by default `get_tp_group()` read once there, and keeps its
rank and size. Column layers keep `out/tp` output rows per rank and their loaders narrow dim 0
of the HF tensor to this rank's rows; `RowParallelLinear` keeps `in/tp` input columns, narrows
dim 1 and all-reduces its output over the group. With one rank every narrow is the identity and
the all-reduce is skipped. The split rules (and KV-head replication) live in
`sluice.model_spec.parallel_check`.

Fused layouts (rows of `weight`, i.e. output features):

    QKVLinear:          [ q: H*D | k: Hkv*D | v: Hkv*D ]        (per rank: H/tp q heads and
                                                  Hkv/tp KV heads, or 1 replicated if tp > Hkv)
    MergedColumnLinear: [ shard 0: sizes[0] | shard 1: sizes[1] | ... ]   (gate_up: [gate | up])
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sluice.distributed.comm import Communicator
from sluice.distributed.parallel_state import get_tp_group
from sluice.model.layers.layer_ops import current_layer_ops
from sluice.model.layers.linear_method import (LinearMethod, WeightLoader,  # noqa: F401
                                               set_weight_loader)
from sluice.model_spec.parallel_check import kv_head_start, local_kv_heads


class LazyTensor:
    """A checkpoint tensor not read yet (a safetensors `get_slice` handle into the memory-mapped
    file): `shape`, `dim()`, `narrow(dim, start, length)` reads just that slice, `materialize()`
    reads all of it. Valid while the file it came from is open (during `load_weights`)."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle
        self.shape = torch.Size(handle.get_shape())

    def dim(self) -> int:
        return len(self.shape)

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        dim = dim % len(self.shape)
        index = (slice(None),) * dim + (slice(start, start + length),)
        return self._handle[index]

    def materialize(self) -> torch.Tensor:
        return self._handle[...]   # `[:]` fails on a 0-dim tensor (a scalar scale)


def materialize(loaded: torch.Tensor | LazyTensor) -> torch.Tensor:
    """`loaded` as a tensor (reads a `LazyTensor` whole)."""
    return loaded.materialize() if isinstance(loaded, LazyTensor) else loaded


def _check_shape(param_shape: torch.Size | tuple, loaded: torch.Tensor | LazyTensor) -> None:
    if tuple(param_shape) != tuple(loaded.shape):
        raise ValueError(f"shape mismatch: expected {tuple(param_shape)}, "
                         f"checkpoint has {tuple(loaded.shape)}")


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor | LazyTensor,
                          shard_id: str | int | None = None) -> None:
    """Copy a whole tensor into `param` (dtype/device converted by `copy_`)."""
    assert shard_id is None, f"unexpected shard id {shard_id!r} for an unfused parameter"
    _check_shape(param.shape, loaded)
    param.data.copy_(materialize(loaded))


def _divide(n: int, d: int, what: str) -> int:
    if n % d:
        raise ValueError(f"{what} ({n}) is not divisible by tensor_parallel_size ({d})")
    return n // d


class LinearBase(nn.Module):
    """y = x @ W.T (+ b) with W of shape [out_local, in_local]; parameters are uninitialised.
    `linear_method` (by default the one of the model being built,
    `layer_ops.current_layer_ops()`, read once here) creates the parameters and computes the
    product (`sluice.model.layers.linear_method`); the layer keeps the shapes, the shard and
    the weight loaders."""

    def __init__(self, in_features: int, out_features: int, bias: bool,
                 dtype: torch.dtype | None = None,
                 linear_method: LinearMethod | None = None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.linear_method = (linear_method if linear_method is not None
                              else current_layer_ops().linear_method)
        self.linear_method.create_weights(self, in_features, out_features, bias=bias,
                                          dtype=dtype, weight_loader=self.weight_loader)

    def process_weights_after_loading(self) -> None:
        """The method's after-load step (packing); see `linear_method`."""
        self.linear_method.process_weights_after_loading(self)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor,
                      shard_id: str | int | None = None) -> None:
        default_weight_loader(param, loaded, shard_id)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_method.apply(self, x, self.bias)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, "
                f"bias={self.bias is not None}, method={self.linear_method!r}")


class ReplicatedLinear(LinearBase):
    """A plain linear layer, identical on every rank."""


class ColumnParallelLinear(LinearBase):
    """Output features split across the ranks of `tp_group` (default: `get_tp_group()`):
    rank r keeps rows [r*out/tp, (r+1)*out/tp). Its output stays split (no gather)."""

    def __init__(self, in_features: int, out_features: int, bias: bool,
                 dtype: torch.dtype | None = None, tp_group: Communicator | None = None,
                 linear_method: LinearMethod | None = None) -> None:
        self.tp_group = tp_group if tp_group is not None else get_tp_group()
        self.tp_rank, self.tp_size = self.tp_group.rank, self.tp_group.size
        super().__init__(in_features, self._local_out_features(out_features), bias, dtype,
                         linear_method)

    def _local_out_features(self, out_features: int) -> int:
        return _divide(out_features, self.tp_size, "out_features")

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor | LazyTensor,
                      shard_id: str | int | None = None) -> None:
        assert shard_id is None
        rows = param.shape[0]
        _check_shape((rows * self.tp_size, *param.shape[1:]), loaded)
        param.data.copy_(loaded.narrow(0, self.tp_rank * rows, rows))


class RowParallelLinear(LinearBase):
    """Input features split across the ranks of `tp_group`; partial outputs are summed by an
    all-reduce over it. The bias is added once (after the reduction), so it is not split."""

    def __init__(self, in_features: int, out_features: int, bias: bool,
                 dtype: torch.dtype | None = None, tp_group: Communicator | None = None,
                 linear_method: LinearMethod | None = None) -> None:
        self.tp_group = tp_group if tp_group is not None else get_tp_group()
        self.tp_rank, self.tp_size = self.tp_group.rank, self.tp_group.size
        super().__init__(_divide(in_features, self.tp_size, "in_features"), out_features, bias,
                         dtype, linear_method)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor | LazyTensor,
                      shard_id: str | int | None = None) -> None:
        assert shard_id is None
        if param.dim() == 1 or self.tp_size == 1:
            default_weight_loader(param, loaded)
            return
        cols = param.shape[1]
        _check_shape((param.shape[0], cols * self.tp_size), loaded)
        param.data.copy_(loaded.narrow(1, self.tp_rank * cols, cols))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return self.linear_method.apply(self, x, self.bias)
        out = self.tp_group.all_reduce(self.linear_method.apply(self, x, None))
        return out if self.bias is None else out + self.bias


class MergedColumnLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input fused into one GEMM.

    `output_sizes` are the full (unsharded) sizes; shard i occupies rows
    [sum(sizes[:i])/tp, sum(sizes[:i+1])/tp) of this rank's weight. gate_up uses [I, I].
    """

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool,
                 dtype: torch.dtype | None = None, tp_group: Communicator | None = None,
                 linear_method: LinearMethod | None = None) -> None:
        self.output_sizes = list(output_sizes)
        super().__init__(in_features, sum(output_sizes), bias, dtype, tp_group, linear_method)
        self._local_sizes = [_divide(s, self.tp_size, "output size") for s in output_sizes]

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor | LazyTensor,
                      shard_id: str | int | None = None) -> None:
        assert isinstance(shard_id, int), f"MergedColumnLinear shard id must be int: {shard_id!r}"
        size = self._local_sizes[shard_id]
        offset = sum(self._local_sizes[:shard_id])
        _check_shape((self.output_sizes[shard_id], *param.shape[1:]), loaded)
        param.data.narrow(0, offset, size).copy_(loaded.narrow(0, self.tp_rank * size, size))

    def shard_ids(self) -> list[int]:
        return list(range(len(self.output_sizes)))


class QKVLinear(ColumnParallelLinear):
    """q, k and v projections fused into one GEMM; output rows are [q | k | v].

    Per rank: q has (H/tp)*D rows; k and v (Hkv/tp)*D rows each, or D rows each when
    tp > Hkv (KV-head replication: rank r holds KV head r // (tp/Hkv), see
    `sluice.model_spec.parallel_check`). Loaders take HF's separate q_proj/k_proj/v_proj tensors
    (weights [heads*D, hidden] or biases [heads*D]) and read only this rank's heads.
    """

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool, dtype: torch.dtype | None = None,
                 tp_group: Communicator | None = None,
                 linear_method: LinearMethod | None = None) -> None:
        group = tp_group if tp_group is not None else get_tp_group()
        tp = group.size
        if tp > num_kv_heads and tp % num_kv_heads:
            raise ValueError(f"num_key_value_heads ({num_kv_heads}) does not divide "
                             f"tensor_parallel_size ({tp}): KV heads cannot be replicated")
        self.head_dim = head_dim
        self.total_num_heads, self.total_num_kv_heads = num_heads, num_kv_heads
        self.num_heads = _divide(num_heads, tp, "num_attention_heads")
        self.num_kv_heads = local_kv_heads(num_kv_heads, tp)
        if tp <= num_kv_heads:
            _divide(num_kv_heads, tp, "num_key_value_heads")
        self.kv_head_start = kv_head_start(num_kv_heads, tp, group.rank)
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim
        super().__init__(hidden_size, (num_heads + 2 * num_kv_heads) * head_dim, bias, dtype,
                         group, linear_method)

    def _local_out_features(self, out_features: int) -> int:
        return self.q_size + 2 * self.kv_size

    def _slice(self, shard_id: str) -> tuple[int, int, int, int]:
        """(offset, size) of a shard in this rank's output rows, and (start, total rows) of
        this rank's slice in the HF tensor."""
        d = self.head_dim
        if shard_id == "q":
            return 0, self.q_size, self.tp_rank * self.q_size, self.total_num_heads * d
        kv = (self.kv_head_start * d, self.total_num_kv_heads * d)
        if shard_id == "k":
            return self.q_size, self.kv_size, *kv
        if shard_id == "v":
            return self.q_size + self.kv_size, self.kv_size, *kv
        raise AssertionError(f"QKVLinear shard id must be 'q', 'k' or 'v', got {shard_id!r}")

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor | LazyTensor,
                      shard_id: str | int | None = None) -> None:
        assert isinstance(shard_id, str)
        offset, size, start, total = self._slice(shard_id)
        _check_shape((total, *param.shape[1:]), loaded)
        param.data.narrow(0, offset, size).copy_(loaded.narrow(0, start, size))

    def split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Views of q [T, H*D], k [T, Hkv*D], v [T, Hkv*D] into a [T, (H+2Hkv)*D] output
        (local head counts)."""
        return qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)

    def shard_ids(self) -> list[str]:
        return ["q", "k", "v"]
