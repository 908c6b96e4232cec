"""Model building blocks written for paged attention and a later tensor-parallel split."""

from sluice.model.layers.activation import SiluAndMul, get_act_and_mul
from sluice.model.layers.embedding import LMHead, VocabEmbedding
from sluice.model.layers.linear import (ColumnParallelLinear, MergedColumnLinear, QKVLinear,
                                        ReplicatedLinear, RowParallelLinear,
                                        default_weight_loader)
from sluice.model.layers.norm import RMSNorm
from sluice.model.layers.rotary import RotaryEmbedding

__all__ = ["ColumnParallelLinear", "LMHead", "MergedColumnLinear", "QKVLinear", "RMSNorm",
           "ReplicatedLinear", "RotaryEmbedding", "RowParallelLinear", "SiluAndMul",
           "VocabEmbedding", "default_weight_loader", "get_act_and_mul"]
