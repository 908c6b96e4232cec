"""Logprobs as batch tensors, and their conversion to the wire type `messages.TokenLogprobs`.

Logprobs are always taken from the model's raw logits (log_softmax before penalties, bias,
temperature or filtering), as in vLLM's default `raw_logprobs` mode.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from sluice.messages import TokenLogprobs


class LogprobsTensors(NamedTuple):
    """Logprobs for a batch of positions, each tensor shaped [num_rows, 1 + k].

    Column 0 is the chosen token (sampled, or the prompt's next token) with its rank under the
    raw distribution (1 = most likely, 1 + the number of strictly more likely tokens);
    columns 1..k are the top-k tokens, most likely first, with ranks 1..k.
    """
    token_ids: torch.Tensor  # long
    logprobs: torch.Tensor   # float32
    ranks: torch.Tensor      # long


def gather_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor, k: int) -> LogprobsTensors:
    """Column 0: `token_ids` [n] with their logprobs and ranks; columns 1..k: the top-k of
    `logprobs` [n, vocab] (already log-softmax'd)."""
    chosen = token_ids.unsqueeze(1)
    chosen_logprobs = logprobs.gather(1, chosen)
    chosen_ranks = (logprobs > chosen_logprobs).sum(dim=-1, keepdim=True) + 1
    if k <= 0:
        return LogprobsTensors(chosen, chosen_logprobs, chosen_ranks)
    top_logprobs, top_ids = logprobs.topk(k, dim=-1)
    top_ranks = torch.arange(1, k + 1, device=logprobs.device).expand(logprobs.shape[0], k)
    return LogprobsTensors(torch.cat([chosen, top_ids], dim=1),
                           torch.cat([chosen_logprobs, top_logprobs], dim=1),
                           torch.cat([chosen_ranks, top_ranks], dim=1))


def compute_prompt_logprobs(logits: torch.Tensor, target_token_ids: torch.Tensor,
                            k: int) -> LogprobsTensors:
    """Prompt logprobs: row i of `logits` [n, vocab] predicts `target_token_ids[i]`.

    For a chunk covering prompt positions p .. p+n-1 the targets are prompt tokens p+1 .. p+n
    (the last prompt position has no target: its logits sample the first output token).
    `logits` is not modified.
    """
    logprobs = torch.log_softmax(logits.to(torch.float32), dim=-1)
    return gather_logprobs(logprobs, target_token_ids.to(torch.long), k)


def to_token_logprobs(tensors: LogprobsTensors, row: int, num_logprobs: int) -> TokenLogprobs:
    """Row `row` as a `TokenLogprobs`, trimmed to the chosen token + the row's own top-k."""
    end = 1 + num_logprobs
    return TokenLogprobs(token_ids=tensors.token_ids[row, :end].tolist(),
                         logprobs=tensors.logprobs[row, :end].tolist(),
                         ranks=tensors.ranks[row, :end].tolist())


def to_token_logprobs_list(tensors: LogprobsTensors,
                           num_logprobs: int | Sequence[int]) -> list[TokenLogprobs]:
    """Every row as a `TokenLogprobs`, with one `.tolist()` per tensor (cheaper than per row).

    `num_logprobs`: one k for all rows (prompt logprobs) or one k per row.
    """
    token_ids = tensors.token_ids.tolist()
    logprobs = tensors.logprobs.tolist()
    ranks = tensors.ranks.tolist()
    if isinstance(num_logprobs, int):
        num_logprobs = [num_logprobs] * len(token_ids)
    return [TokenLogprobs(token_ids=t[:1 + k], logprobs=lp[:1 + k], ranks=r[:1 + k])
            for t, lp, r, k in zip(token_ids, logprobs, ranks, num_logprobs, strict=True)]
