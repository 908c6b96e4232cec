"""Vocab-parallel token embedding and LM head (optionally tied to the embedding).

The vocabulary is split by rows over the ranks of the tensor-parallel group (`tp_group`, by
default `get_tp_group()` read once in the constructor). It is first padded up to a multiple of
tp (`sluice.model_spec.parallel_check.padded_vocab_size`; no padding with one rank), so rank r
holds rows [r*Vp/tp, (r+1)*Vp/tp); padded rows are zero.

* Embedding: each rank looks up the ids that fall in its rows (others read row 0 and are
  zeroed), then the partial embeddings are summed by an all-reduce.
* LM head: each rank computes the logits of its rows; they are gathered to tp rank 0 (the
  driver, which samples) and trimmed to the real vocabulary. Other ranks get None from
  `forward`: they only take part in the gather.
* Tied: the head shares the embedding's (local) weight Parameter, so both are split alike.
* GGUF blocks (`sluice.model.gguf_quant`): the embedding's weight may be a file's quantized
  rows (uint8 [Vp/tp, row bytes], `gguf_blocks` = the `GgufBlockLinearMethod` that reads them):
  a lookup dequantizes just the looked-up rows; a head over blocks (its own, or tied to such an
  embedding) computes its logits with that method.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sluice.distributed.comm import Communicator
from sluice.distributed.parallel_state import get_tp_group
from sluice.model.layers.layer_ops import current_layer_ops
from sluice.model.layers.linear import LazyTensor, _check_shape, set_weight_loader
from sluice.model.layers.linear_method import LinearMethod
from sluice.model_spec.parallel_check import padded_vocab_size


class _VocabShard:
    """The rows of a [vocab, dim] matrix one rank holds, and a loader that reads only them."""

    def _init_shard(self, num_embeddings: int, tp_group: Communicator | None) -> int:
        self.tp_group = tp_group if tp_group is not None else get_tp_group()
        self.tp_rank, self.tp_size = self.tp_group.rank, self.tp_group.size
        self.num_embeddings = num_embeddings           # the real vocabulary
        self.num_embeddings_padded = padded_vocab_size(num_embeddings, self.tp_size)
        self.rows_per_rank = self.num_embeddings_padded // self.tp_size
        self.vocab_start = self.tp_rank * self.rows_per_rank
        self.vocab_end = min(self.vocab_start + self.rows_per_rank, num_embeddings)
        return self.rows_per_rank

    def _load_rows(self, param: nn.Parameter, loaded: torch.Tensor | LazyTensor,
                   shard_id: str | int | None = None) -> None:
        """Copy this rank's rows of an HF [vocab, dim] tensor; zero the padding rows."""
        assert shard_id is None
        _check_shape((self.num_embeddings, *param.shape[1:]), loaded)
        n = max(0, self.vocab_end - self.vocab_start)
        if n:
            param.data[:n].copy_(loaded.narrow(0, self.vocab_start, n))
        param.data[n:].zero_()


class VocabEmbedding(nn.Module, _VocabShard):
    """input_ids [T] long -> [T, dim]; weight [Vp/tp, dim]: this rank's rows of HF's
    embed_tokens.weight."""

    def __init__(self, num_embeddings: int, embedding_dim: int,
                 dtype: torch.dtype | None = None, tp_group: Communicator | None = None) -> None:
        super().__init__()
        rows = self._init_shard(num_embeddings, tp_group)
        self.embedding_dim = embedding_dim
        self.dtype = dtype
        self.gguf_blocks = None  # a GgufBlockLinearMethod when the weight holds GGUF blocks
        self.weight = nn.Parameter(torch.empty(rows, embedding_dim, dtype=dtype),
                                   requires_grad=False)
        set_weight_loader(self.weight, self._load_rows)

    def store_weight_in(self, weight_dtype: torch.dtype) -> None:
        """Keep the (not yet loaded) weight in `weight_dtype` (16-bit weights over float32
        activations, `half_linear`); lookups return `self.dtype`. A tied LM head shares it."""
        if self.gguf_blocks is None and self.weight.dtype != weight_dtype:
            self.weight = nn.Parameter(torch.empty(self.weight.shape, dtype=weight_dtype,
                                                   device=self.weight.device), requires_grad=False)
            set_weight_loader(self.weight, self._load_rows)

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        if self.gguf_blocks is None:
            rows = F.embedding(ids, self.weight)
            return rows if self.dtype is None else rows.to(self.dtype)
        rows = self.gguf_blocks.dequantize_rows(self.weight, ids.reshape(-1))
        return rows.to(self.dtype or rows.dtype).view(*ids.shape, self.embedding_dim)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return self._lookup(input_ids)
        outside = (input_ids < self.vocab_start) | (input_ids >= self.vocab_end)
        local = torch.where(outside, 0, input_ids - self.vocab_start)
        out = self._lookup(local)
        out.masked_fill_(outside.unsqueeze(-1), 0)
        return self.tp_group.all_reduce(out)


class LMHead(nn.Module, _VocabShard):
    """hidden [n, dim] -> logits [n, vocab] in float32 (on tp rank 0; None on the others).

    `linear_method` (by default the model's, `layer_ops.current_layer_ops()`, read once here)
    computes hidden @ W.T, as for the linear layers. `greedy`, made by
    `process_weights_after_loading` where the LM head's method, dtype and rank count are in
    `greedy.GREEDY_SCREEN_SUPPORT` and the CPU has bf16 dot products, maps hidden rows straight
    to their greedy tokens (`sluice.model.layers.greedy.GreedyScreen`). With `tied_to`, the
    head shares the embedding's weight Parameter (no own parameter, so `named_parameters()`
    lists it once, under the embedding); `weight` (and `lm_weight`) read it.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int,
                 dtype: torch.dtype | None = None, tied_to: VocabEmbedding | None = None,
                 tp_group: Communicator | None = None,
                 linear_method: LinearMethod | None = None) -> None:
        super().__init__()
        rows = self._init_shard(num_embeddings, tp_group if tp_group is not None
                                else getattr(tied_to, "tp_group", None))
        self.linear_method = (linear_method if linear_method is not None
                              else current_layer_ops().linear_method)
        self.greedy: Callable[[torch.Tensor], torch.Tensor | None] | None = None
        self.tied = tied_to is not None
        if tied_to is not None:
            assert tied_to.weight.shape == (rows, embedding_dim)
            self._embedding = [tied_to]  # list: do not register the embedding as a submodule
        else:
            self.linear_method.create_weights(self, embedding_dim, rows, bias=False,
                                              dtype=dtype, weight_loader=self._load_rows)

    def __getattr__(self, name: str):
        # a tied head's `weight` is the embedding's Parameter (not registered here)
        if name == "weight" and self.__dict__.get("tied"):
            return self.__dict__["_embedding"][0].weight
        return super().__getattr__(name)

    @property
    def lm_weight(self) -> torch.Tensor:
        return self.weight

    def process_weights_after_loading(self) -> None:
        """The method's after-load step (packing), then the greedy screen where it applies."""
        from sluice.model.layers.greedy import greedy_screen_for
        self.linear_method.process_weights_after_loading(self)
        self.greedy = greedy_screen_for(self)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor | None:
        logits = self.linear_method.apply(self, hidden, None).float()
        if self.tp_size == 1:
            return logits
        full = self.tp_group.gather(logits, dst=0, dim=-1)
        return None if full is None else full[..., :self.num_embeddings].contiguous()

    def greedy_tokens(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """hidden [n, dim] -> argmax of each row's logits [n] int64, without the full logits;
        None when there is no screen or it could not decide (compute the logits instead).
        Always None with tp > 1 (the screen steps aside for a split vocabulary:
        `greedy.GREEDY_SCREEN_SUPPORT`)."""
        return self.greedy(hidden) if self.greedy is not None else None
