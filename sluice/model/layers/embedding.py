"""Token embedding and LM head (optionally tied to the embedding).

TP seam: a vocab-parallel split (rows per rank + masked lookup + all-reduce, and a gathered
LM head) would go here; today both are replicated.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sluice.model.layers.linear import default_weight_loader, set_weight_loader


class VocabEmbedding(nn.Module):
    """input_ids [T] long -> [T, dim]; weight [vocab, dim] as HF's embed_tokens.weight."""

    def __init__(self, num_embeddings: int, embedding_dim: int,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim, dtype=dtype),
                                   requires_grad=False)
        set_weight_loader(self.weight, default_weight_loader)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)


class LMHead(nn.Module):
    """hidden [n, dim] -> logits [n, vocab] in float32.

    `gemm` computes hidden @ W.T: F.linear unless `layer_ops.install_layer_ops` installs the
    CPU operators. `greedy` (set by the same call where the CPU has bf16 dot products) maps
    hidden rows straight to their greedy tokens (`sluice.model.layers.greedy.GreedyScreen`).
    With `tied_to`, the head shares the embedding's weight Parameter (no own parameter, so
    `named_parameters()` lists it once, under the embedding).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int,
                 dtype: torch.dtype | None = None, tied_to: VocabEmbedding | None = None) -> None:
        super().__init__()
        self.gemm = F.linear
        self.greedy: Callable[[torch.Tensor], torch.Tensor | None] | None = None
        self.tied = tied_to is not None
        if tied_to is not None:
            assert tied_to.weight.shape == (num_embeddings, embedding_dim)
            self._embedding = [tied_to]  # list: do not register the embedding as a submodule
        else:
            self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim, dtype=dtype),
                                       requires_grad=False)
            set_weight_loader(self.weight, default_weight_loader)

    @property
    def lm_weight(self) -> torch.Tensor:
        return self._embedding[0].weight if self.tied else self.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.gemm(hidden, self.lm_weight, None).float()

    def greedy_tokens(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """hidden [n, dim] -> argmax of each row's logits [n] int64, without the full logits;
        None when there is no screen or it could not decide (compute the logits instead)."""
        return self.greedy(hidden) if self.greedy is not None else None
