"""The worker side of speculative decoding: sample at every draft position, accept a prefix.

A sample row s with d_s draft tokens t_1..t_d (`drafts[s]`) ran d_s + 1 positions this step:
its last sampled token, then the drafts. Position j (0..d_s) predicts the token after
output + drafts[:j]; its hidden state is at flat index e_s - d_s + j, where e_s is the row's
last flat index (`StepBatch.logits_indices`). Every position is a sampling row of its own
(`SamplingRow` with output_token_ids = output + drafts[:j]), so penalties, min_tokens, bad
words, logit_bias, allowed_token_ids, temperature, top-k/top-p/min-p are applied at each
position exactly as the non-speculative sampler would apply them there. The expanded rows
are laid out row after row:

    expanded index of (s, j) = starts[s] + j,   starts[s] = sum_{s' < s} (d_s' + 1)

Greedy rows accept drafts while they equal the target's argmax; random rows use the
rejection sampler (`sample.rejection`), which keeps the target distribution. A plain greedy
step (every row greedy, no logits processing, no logprobs) asks the model for its greedy
tokens directly (`greedy_tokens`, the LM head's screen), as the non-speculative step does.

Randomness: a seeded random row draws d_s + 1 uniforms from its own generator (d_s for the
acceptance tests, one for the final draw), unseeded rows from the shared generator; a row
without drafts therefore draws exactly the one number the plain sampler would.

Logprobs (when asked): the raw model logprobs of each emitted token at its position, with the
position's top-k — the entries the non-speculative run returns for the same tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch

from sluice.messages import TokenLogprobs
from sluice.sample.logprobs import gather_logprobs, to_token_logprobs
from sluice.sample.metadata import SamplingRow, build_sampling_metadata, is_greedy
from sluice.sample.rejection import rejection_sample
from sluice.sample.sampler import apply_logits_processing, sampling_weights
from sluice.worker.request_state import CachedRequestState


class VerifiedTokens(NamedTuple):
    """Per sample row: the emitted tokens (accepted drafts, then one of the target's own) and,
    for rows that asked for logprobs, one entry per emitted token (else None)."""
    token_ids: list[list[int]]
    logprobs: list[list[TokenLogprobs] | None]


def draft_positions(logits_indices: np.ndarray, num_drafts: Sequence[int]) -> np.ndarray:
    """The flat indices of every sample row's d + 1 positions, row after row (module doc)."""
    return np.concatenate([np.arange(end - d, end + 1)
                           for end, d in zip(logits_indices.tolist(), num_drafts)])


def verify_drafts(model: torch.nn.Module, argmax: Callable[[torch.Tensor], torch.Tensor],
                  hidden_rows: torch.Tensor, rows: Sequence[CachedRequestState],
                  drafts: Sequence[list[int]], vocab_size: int, device: torch.device,
                  shared_generator: torch.Generator) -> VerifiedTokens:
    """Sample the expanded positions of `rows` (hidden states `hidden_rows`, laid out as in
    the module docstring) and accept each row's longest valid draft prefix."""
    num_drafts = [len(d) for d in drafts]
    starts = np.concatenate([[0], np.cumsum([d + 1 for d in num_drafts])[:-1]]).astype(np.int64)
    expanded = [SamplingRow(s.sampling_params, s.prompt_token_ids, s.output_token_ids + d[:j],
                            s.eos_token_id, s.generator)
                for s, d in zip(rows, drafts) for j in range(len(d) + 1)]
    md = build_sampling_metadata(expanded, vocab_size=vocab_size, device=device,
                                 shared_generator=shared_generator)
    if md.is_plain_greedy:
        target = model.greedy_tokens(hidden_rows)
        if target is None:
            target = argmax(model.compute_logits(hidden_rows))
        return VerifiedTokens(_accept_greedy(target.tolist(), starts, drafts), [None] * len(rows))

    logits = model.compute_logits(hidden_rows)
    if logits.dtype != torch.float32 or not logits.is_contiguous():
        logits = logits.to(torch.float32).contiguous()
    raw_logprobs = (torch.log_softmax(logits, dim=-1) if md.max_num_logprobs is not None
                    else None)
    logits = apply_logits_processing(logits, md)
    target = argmax(logits)
    greedy_rows = [is_greedy(s.sampling_params) for s in rows]
    if all(greedy_rows):
        emitted = _accept_greedy(target.tolist(), starts, drafts)
    else:
        emitted = _rejection_sample(sampling_weights(logits, md), target, starts, drafts,
                                    greedy_rows, rows, shared_generator)
    logprobs: list[list[TokenLogprobs] | None] = [None] * len(rows)
    if raw_logprobs is not None:
        chosen = torch.zeros(len(expanded), dtype=torch.long)
        for s, tokens in enumerate(emitted):
            chosen[int(starts[s]):int(starts[s]) + len(tokens)] = torch.tensor(tokens)
        tensors = gather_logprobs(raw_logprobs, chosen.to(raw_logprobs.device),
                                  md.max_num_logprobs)
        for s, (state, tokens) in enumerate(zip(rows, emitted)):
            k = state.sampling_params.logprobs
            if k is not None:
                logprobs[s] = [to_token_logprobs(tensors, int(starts[s]) + j, k)
                               for j in range(len(tokens))]
    return VerifiedTokens(emitted, logprobs)


def _accept_greedy(target: list[int], starts: np.ndarray,
                   drafts: Sequence[list[int]]) -> list[list[int]]:
    """Accept drafts while they equal the target's argmax; then the argmax at the first
    mismatch (or after the last draft)."""
    out = []
    for start, draft in zip(starts.tolist(), drafts):
        tokens = []
        for j, token in enumerate(draft):
            if token != target[start + j]:
                break
            tokens.append(token)
        tokens.append(target[start + len(tokens)])
        out.append(tokens)
    return out


def _rejection_sample(weights: torch.Tensor, target_argmax: torch.Tensor, starts: np.ndarray,
                      drafts: Sequence[list[int]], greedy_rows: list[bool],
                      rows: Sequence[CachedRequestState],
                      shared_generator: torch.Generator) -> list[list[int]]:
    """`sample.rejection.rejection_sample` over the padded [S, K + 1, V] layout (K = the most
    drafts of any row); `weights` [expanded rows, V] are the unnormalised sampling weights."""
    num_rows, k = len(drafts), max(len(d) for d in drafts)
    vocab = weights.shape[-1]
    probs = weights / weights.sum(dim=-1, keepdim=True)
    row_of = np.repeat(np.arange(num_rows), [len(d) + 1 for d in drafts])
    pos_of = np.arange(len(row_of)) - starts[row_of]
    row_index, pos_index = torch.from_numpy(row_of), torch.from_numpy(pos_of)
    target_probs = probs.new_zeros(num_rows, k + 1, vocab)
    target_probs[row_index, pos_index] = probs
    argmax_padded = torch.zeros(num_rows, k + 1, dtype=torch.long)
    argmax_padded[row_index, pos_index] = target_argmax.to(torch.long).cpu()
    draft_ids = torch.zeros(num_rows, k, dtype=torch.long)
    uniforms = torch.zeros(num_rows, k + 1, dtype=torch.float64)
    for s, (draft, state, greedy) in enumerate(zip(drafts, rows, greedy_rows)):
        draft_ids[s, :len(draft)] = torch.tensor(draft, dtype=torch.long)
        if greedy:
            continue
        drawn = torch.empty(len(draft) + 1, dtype=torch.float64)
        drawn.uniform_(generator=state.generator or shared_generator)
        uniforms[s, :len(draft)] = drawn[:-1]
        uniforms[s, k] = drawn[-1]
    device = weights.device
    return rejection_sample(
        target_probs, draft_ids.to(device),
        torch.tensor([len(d) for d in drafts], dtype=torch.long, device=device),
        uniforms.to(device), greedy=torch.tensor(greedy_rows, device=device),
        target_argmax=argmax_padded.to(device))
