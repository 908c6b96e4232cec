"""Sampler: one step's logits [num_rows, vocab] -> one token per row, vectorised over the batch.

Order of operations (vLLM v1, with its default raw logprobs)::

    raw logits ──► logprobs = log_softmax(raw logits)       (only if some row asked for logprobs)
        │
        ├─ grammar mask            structured output: tokens the row's grammar forbids -> -inf
        ├─ allowed_token_ids       every other token -> -inf
        ├─ bad_words               a bad word's last token -> -inf when the output ends with
        │                          the word's other tokens
        ├─ logit_bias              add the row's bias to its tokens
        ├─ min_tokens              EOS and stop_token_ids -> -inf while len(output) < min_tokens
        ├─ repetition penalty      prompt+output tokens: logit/p if logit > 0 else logit*p (HF)
        ├─ frequency / presence    output tokens: logit -= f * count + p * (count > 0) (OpenAI)
        │
        ├─ greedy rows ──────────► argmax
        └─ random rows ──────────► / temperature ─► top-k ─► top-p ─► min-p (filters.py)
                                   ─► draw from softmax by inverse CDF, one uniform per row

Randomness: each row consumes exactly one uniform number per step, from its request's own
generator when seeded, else from the shared generator. A seeded request's tokens therefore
depend only on its seed and its logits, never on the batch around it. (Inverse-CDF sampling
draws one number per row where the exponential race would draw `vocab` of them; on CPU that is
~5x cheaper for a 150k vocabulary. The CDF is summed in blocks so that float32 rounding does not
swallow the tail of the distribution.)

The sampler works IN PLACE on the logits it is given (after taking the raw logprobs): a caller
that still needs the raw logits afterwards passes a copy.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from sluice.sample.filters import apply_min_p, apply_top_k_top_p
from sluice.sample.logprobs import LogprobsTensors, gather_logprobs
from sluice.sample.metadata import SamplingMetadata

_NEG_INF = float("-inf")
_CDF_BLOCK = 1024


class SamplerOutput(NamedTuple):
    """`sampled_token_ids` [num_rows] long; `logprobs` with k = metadata.max_num_logprobs
    columns of top-k (see `LogprobsTensors`), or None when no row asked for logprobs."""
    sampled_token_ids: torch.Tensor
    logprobs: LogprobsTensors | None


Argmax = Callable[[torch.Tensor], torch.Tensor]


def torch_argmax(logits: torch.Tensor) -> torch.Tensor:
    """[rows, vocab] -> [rows] long, the first maximum of each row."""
    return logits.argmax(dim=-1)


class Sampler:
    """Stateless; call once per step with that step's `SamplingMetadata`. `argmax` computes
    greedy tokens (default torch's; the model runner passes the C++ one on CPU)."""

    def __init__(self, argmax: Argmax = torch_argmax) -> None:
        self.argmax = argmax

    def __call__(self, logits: torch.Tensor, metadata: SamplingMetadata) -> SamplerOutput:
        """Sample one token per row of `logits` [num_rows, vocab] (modified in place)."""
        if metadata.is_plain_greedy:
            return SamplerOutput(self.argmax(logits), None)
        if logits.dtype != torch.float32 or not logits.is_contiguous():
            logits = logits.to(torch.float32).contiguous()
        raw_logprobs = None
        if metadata.max_num_logprobs is not None:
            raw_logprobs = torch.log_softmax(logits, dim=-1)
        logits = apply_logits_processing(logits, metadata)
        token_ids = sample_tokens(logits, metadata, self.argmax)
        logprobs = None
        if raw_logprobs is not None:
            logprobs = gather_logprobs(raw_logprobs, token_ids, metadata.max_num_logprobs)
        return SamplerOutput(token_ids, logprobs)


def apply_logits_processing(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """The grammar mask, allowed_token_ids, bad_words, logit_bias, min_tokens, then
    penalties; in place on contiguous float32 logits."""
    if md.grammar_mask is not None:
        rows, drop = md.grammar_mask
        logits[rows] = logits[rows].masked_fill_(drop, _NEG_INF)
    if md.allowed_token_mask is not None:
        rows, drop = md.allowed_token_mask
        logits[rows] = logits[rows].masked_fill_(drop, _NEG_INF)
    if md.bad_words_mask is not None:
        rows, tokens = md.bad_words_mask
        logits[rows, tokens] = _NEG_INF
    if md.logit_bias is not None:
        rows, tokens, values = md.logit_bias
        logits.index_put_((rows, tokens), values, accumulate=True)
    if md.min_tokens_mask is not None:
        rows, tokens = md.min_tokens_mask
        logits[rows, tokens] = _NEG_INF
    if not md.no_penalties:
        apply_penalties(logits, md)
    return logits


def apply_penalties(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """Repetition (HF), then presence and frequency (OpenAI) penalties, in place.

    Touches only the (row, token) pairs of the metadata's flat indices, which may repeat:
    a gather-modify-scatter writes the same value for every copy of an index, so it applies
    once per distinct token; `index_add_` applies once per occurrence (the count).
    """
    vocab_size = logits.shape[-1]
    flat = logits.view(-1)
    if md.seen_token_index is not None:
        index = md.seen_token_index
        penalty = md.repetition_penalties[index // vocab_size]
        values = flat[index]
        flat[index] = torch.where(values > 0, values / penalty, values * penalty)
    if md.output_token_index is not None:
        index = md.output_token_index
        rows = index // vocab_size
        flat[index] = flat[index] - md.presence_penalties[rows]
        flat.index_add_(0, index, md.frequency_penalties[rows], alpha=-1.0)
    return logits


def sample_tokens(logits: torch.Tensor, md: SamplingMetadata,
                  argmax: Argmax = torch_argmax) -> torch.Tensor:
    """Greedy rows -> argmax; random rows -> temperature, top-k, top-p, min-p, then a draw.

    `logits` are the processed logits (destroyed). Returns [num_rows] long.
    """
    greedy_tokens = None
    if not md.all_random:
        greedy_tokens = argmax(logits)
        if md.all_greedy:
            return greedy_tokens
    uniform = draw_uniform(md, logits.device)
    random_tokens = sample_from_weights(sampling_weights(logits, md), uniform)
    if greedy_tokens is None:
        return random_tokens
    return torch.where(md.greedy_mask, greedy_tokens, random_tokens)


def sampling_weights(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """Processed `logits` -> each row's unnormalised sampling weights (>= 0, the row's
    largest is 1): / temperature, top-k, top-p, min-p, then exp(logit - max). In place: the
    returned tensor is `logits`. Greedy rows' weights are those of temperature 1."""
    if md.temperature is not None:
        logits.div_(md.temperature.unsqueeze(1))
    apply_top_k_top_p(logits, md.top_k, md.max_top_k, md.top_p)
    if md.min_p is not None:
        apply_min_p(logits, md.min_p)
    return logits.sub_(logits.amax(dim=-1, keepdim=True)).exp_()


def draw_uniform(md: SamplingMetadata, device: torch.device) -> torch.Tensor:
    """One U[0, 1) number per row [num_rows] float64: seeded rows from their own generator
    (one draw each), the rest from the shared generator."""
    uniform = torch.empty(md.num_rows, dtype=torch.float64, device=device)
    if len(md.generators) < md.num_rows:
        uniform.uniform_(generator=md.shared_generator)
    for row, generator in md.generators.items():
        uniform[row:row + 1].uniform_(generator=generator)
    return uniform


def sample_from_weights(weights: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: row r picks token i with probability weights[r, i] / sum(weights[r]).

    `weights` [n, vocab] float32 >= 0 (each row with a positive sum) are overwritten with
    per-block cumulative sums; `uniform` [n] in [0, 1). A token of weight 0 is never picked.

    Two levels keep float32 rounding local: blocks of _CDF_BLOCK columns are summed in float32,
    the block totals in float64::

        columns   |0 ........ B-1|B ....... 2B-1| ... |(nb-1)B .. vocab-1|   (last block short)
        in place  | cumsum blk 0 | cumsum blk 1 | ... | cumsum last blk  |
        block_cdf  float64 cumsum of the block totals -> pick a block, then a column in it
    """
    num_rows, vocab_size = weights.shape
    num_full = vocab_size // _CDF_BLOCK
    if num_full:
        weights[:, :num_full * _CDF_BLOCK].unflatten(1, (num_full, _CDF_BLOCK)).cumsum_(-1)
    if vocab_size % _CDF_BLOCK:
        weights[:, num_full * _CDF_BLOCK:].cumsum_(-1)
    starts = torch.arange(0, vocab_size, _CDF_BLOCK, device=weights.device)
    lasts = (starts + _CDF_BLOCK).clamp_(max=vocab_size) - 1
    block_totals = weights[:, lasts]                                   # [n, num_blocks]
    block_cdf = block_totals.to(torch.float64).cumsum_(-1)
    target = uniform.unsqueeze(1) * block_cdf[:, -1:]                  # [n, 1], < total
    block = torch.searchsorted(block_cdf, target, right=True).clamp_(max=len(starts) - 1)
    before = torch.where(block > 0, block_cdf.gather(1, (block - 1).clamp(min=0)), 0.0)
    block_total = block_totals.gather(1, block)
    # Offset inside the block, kept strictly below the block's float32 total.
    offset = torch.minimum((target - before).to(torch.float32),
                           torch.nextafter(block_total, torch.zeros_like(block_total)))
    block_start = starts[block]                                        # [n, 1]
    columns = (block_start + torch.arange(_CDF_BLOCK, device=weights.device)).clamp_(
        max=vocab_size - 1)
    in_block = torch.searchsorted(weights.gather(1, columns), offset, right=True)
    return (block_start + in_block).squeeze(1).clamp_(max=vocab_size - 1)
