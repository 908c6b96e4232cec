"""How a model's heads, MLP and vocabulary split over tensor-parallel ranks, and its decoder
layers over pipeline stages (`pipeline_partition`, at the end). No torch.

The one home of the tensor- and pipeline-parallel split rules; the layers
(`sluice.model.layers.linear`, `.embedding`), the model runner (its stage's layer range), the
KV cache (`sluice.model.attention.kv_cache`) and the engine's startup check read them here.

* Query heads: `num_attention_heads / tp` per rank (tp must divide them).
* KV heads: with tp <= num_key_value_heads, `num_key_value_heads / tp` per rank (tp must divide
  them); with tp > num_key_value_heads the KV heads are *replicated*: every rank holds one, rank
  r holds KV head r // (tp / num_key_value_heads) (num_key_value_heads must divide tp). The
  query heads of rank r then all belong to that KV head's group.
* MLP: `intermediate_size / tp` per rank.
* Vocabulary: padded up to a multiple of tp (`padded_vocab_size`) so every rank holds the same
  number of embedding / LM-head rows; padded rows are zero and their logits are dropped. With
  tp = 1 nothing is padded, so a single-rank model is exactly what it was. (vLLM also pads to a
  multiple of 64 per rank for GEMM alignment; sluice's CPU GEMMs do not need it, and padding
  only to tp keeps TP=1 byte-identical.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sluice.errors import ConfigError

if TYPE_CHECKING:
    from sluice.hf_config import ModelSpec


def tensor_parallel_problems(num_attention_heads: int, num_key_value_heads: int,
                             intermediate_size: int, tp_size: int) -> list[str]:
    """One line per reason these sizes cannot be split over `tp_size` ranks (empty: they can)."""
    tp = tp_size
    flag = f"--tensor-parallel-size {tp}"
    problems = []
    if tp < 1:
        return [f"{flag}: must be at least 1"]
    if num_attention_heads % tp:
        problems.append(f"{flag} does not divide the model's num_attention_heads "
                        f"({num_attention_heads}); choose a tensor-parallel size that divides "
                        f"{num_attention_heads}.")
    if tp <= num_key_value_heads:
        if num_key_value_heads % tp:
            problems.append(f"{flag} does not divide the model's num_key_value_heads "
                            f"({num_key_value_heads}); choose a tensor-parallel size that "
                            f"divides {num_key_value_heads}, or a multiple of it.")
    elif tp % num_key_value_heads:
        problems.append(f"{flag} is larger than the model's num_key_value_heads "
                        f"({num_key_value_heads}) but not a multiple of it, so KV heads cannot "
                        f"be replicated evenly; choose a divisor or a multiple of "
                        f"{num_key_value_heads}.")
    if intermediate_size % tp:
        problems.append(f"{flag} does not divide the model's intermediate_size "
                        f"({intermediate_size}).")
    return problems


def check_tensor_parallel(spec: ModelSpec, tp_size: int) -> None:
    """Raise `ConfigError` (each line naming tp and the model's number) when `spec` cannot be
    split over `tp_size` tensor-parallel ranks. Call before any worker starts."""
    problems = tensor_parallel_problems(spec.num_attention_heads, spec.num_key_value_heads,
                                        spec.intermediate_size, tp_size)
    if problems:
        raise ConfigError(problems)


def local_kv_heads(num_key_value_heads: int, tp_size: int) -> int:
    """KV heads each rank holds (and caches): kvh / tp, or 1 when replicated (tp > kvh)."""
    return max(1, num_key_value_heads // tp_size)


def kv_head_start(num_key_value_heads: int, tp_size: int, tp_rank: int) -> int:
    """Index of the first KV head rank `tp_rank` holds."""
    if tp_size > num_key_value_heads:
        return tp_rank // (tp_size // num_key_value_heads)
    return tp_rank * (num_key_value_heads // tp_size)


def padded_vocab_size(vocab_size: int, tp_size: int) -> int:
    """`vocab_size` rounded up to a multiple of `tp_size` (see the module docstring)."""
    return -(-vocab_size // tp_size) * tp_size


# ---- pipeline parallelism: contiguous layer ranges per stage ---------------------------------

def pipeline_partition(num_layers: int, pp_size: int, override: str | None = None) -> list[int]:
    """Layers per stage, in stage order. Default (vLLM's `get_pp_indices`): an even split, the
    remainder given one layer each to the stages just before the last (the last stage also
    holds the final norm and the LM head, the first the embedding), e.g.

        8 layers / 2 stages -> [4, 4]      3 / 2 -> [2, 1]      10 / 4 -> [2, 3, 3, 2]

    `override` ("3,5": `--pp-layer-partition`) gives the counts explicitly. Raises
    `ConfigError` when there are more stages than layers or the override does not fit."""
    flag = f"--pipeline-parallel-size {pp_size}"
    if override:
        try:
            counts = [int(part) for part in override.split(",")]
        except ValueError:
            counts = []
        if len(counts) != pp_size or min(counts, default=0) < 1 or sum(counts) != num_layers:
            raise ConfigError(
                f"--pp-layer-partition {override!r} does not split the model's {num_layers} "
                f"layers over {pp_size} stages: give {pp_size} comma-separated counts of at "
                f"least 1 that add up to {num_layers}, or leave it out for an even split.")
        return counts
    if pp_size > num_layers:
        raise ConfigError(f"{flag} exceeds the model's num_hidden_layers ({num_layers}): every "
                          f"stage needs at least one layer. Fix: use at most {num_layers} "
                          "pipeline stages.")
    counts = [num_layers // pp_size] * pp_size
    for i in range(2, num_layers % pp_size + 2):
        counts[-i] += 1
    return counts


def stage_layer_range(num_layers: int, pp_size: int, pp_rank: int,
                      override: str | None = None) -> tuple[int, int]:
    """`(start, end)`: the decoder layers [start, end) pipeline stage `pp_rank` holds."""
    counts = pipeline_partition(num_layers, pp_size, override)
    start = sum(counts[:pp_rank])
    return start, start + counts[pp_rank]


def check_pipeline_parallel(spec: ModelSpec, pp_size: int, override: str | None = None) -> None:
    """Raise `ConfigError` when `spec`'s layers cannot be split over `pp_size` stages (call
    before any rank starts)."""
    pipeline_partition(spec.num_hidden_layers, pp_size, override)
