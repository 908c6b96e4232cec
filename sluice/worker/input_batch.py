"""Flatten one step's scheduled tokens into the arrays the model and attention need.

For requests r = 0..R-1 in batch order, with c_r = num_computed_tokens and n_r = num_scheduled::

    query_start_loc[r] = n_0 + ... + n_{r-1}        (query_start_loc[R] = T, total tokens)
    tokens of r        = token_ids_r[c_r : c_r + n_r] at positions c_r .. c_r + n_r - 1
    seq_lens[r]        = c_r + n_r                   (context length after this step)
    slot_mapping[t]    = block_table[r, pos // block_size] * block_size + pos % block_size
    block_table[r]     = the request's block ids, right-padded with 0 (the null block)

A request samples a token when c_r + n_r == len(token_ids_r); its logits come from flat index
query_start_loc[r + 1] - 1.

Speculative decoding: a request with d_r draft tokens (`drafts[r]`, unknown to its state) runs
its known tokens and then the drafts, i.e. the tokens (token_ids_r + drafts_r)[c_r : c_r + n_r];
it samples when c_r + n_r == len(token_ids_r) + d_r, at the d_r + 1 flat indices
query_start_loc[r + 1] - 1 - d_r .. query_start_loc[r + 1] - 1 (`num_drafts[r]` = d_r).
No torch here: numpy only, converted by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sluice.worker.request_state import CachedRequestState


@dataclass
class StepBatch:
    """The flattened batch of one step (numpy arrays; see module docstring)."""
    request_ids: list[str]
    input_ids: np.ndarray        # [T] int64
    positions: np.ndarray        # [T] int64
    query_start_loc: np.ndarray  # [R + 1] int64
    seq_lens: np.ndarray         # [R] int64
    num_computed: np.ndarray     # [R] int64
    block_table: np.ndarray      # [R, max_blocks] int32
    slot_mapping: np.ndarray     # [T] int64
    sample_rows: np.ndarray      # [S] int64, batch rows that sample this step
    logits_indices: np.ndarray   # [S] int64, flat token index whose logits are sampled
    num_drafts: np.ndarray | None = None   # [R] int64 draft tokens per row; None: no drafts

    @property
    def num_tokens(self) -> int:
        return int(self.query_start_loc[-1])


def build_step_batch(states: list[CachedRequestState], num_scheduled: list[int],
                     block_size: int, drafts: list[list[int]] | None = None) -> StepBatch:
    """Build the flat batch for `states` (batch order) with `num_scheduled[r]` tokens each;
    `drafts[r]`: row r's draft tokens (speculative decoding), None for no drafts at all."""
    num_reqs = len(states)
    n = np.asarray(num_scheduled, dtype=np.int64)
    computed = np.fromiter((s.num_computed_tokens for s in states), np.int64, num_reqs)
    query_start_loc = np.zeros(num_reqs + 1, dtype=np.int64)
    np.cumsum(n, out=query_start_loc[1:])
    seq_lens = computed + n
    total = int(query_start_loc[-1])

    req_of_token = np.repeat(np.arange(num_reqs), n)
    positions = np.arange(total, dtype=np.int64) + np.repeat(computed - query_start_loc[:-1], n)

    input_ids = np.empty(total, dtype=np.int64)
    max_blocks = max(len(s.block_ids) for s in states)
    block_table = np.zeros((num_reqs, max_blocks), dtype=np.int32)
    for r, state in enumerate(states):
        c, start = int(computed[r]), int(query_start_loc[r])
        count = int(n[r])
        if drafts is not None and drafts[r]:
            input_ids[start:start + count] = (state.token_ids + drafts[r])[c:c + count]
        elif count == 1:
            input_ids[start] = state.token_ids[c]
        else:
            input_ids[start:start + count] = state.token_ids[c:c + count]
        block_table[r, :len(state.block_ids)] = state.block_ids

    slot_mapping = (block_table[req_of_token, positions // block_size].astype(np.int64)
                    * block_size + positions % block_size)
    num_known = np.fromiter((len(s.token_ids) for s in states), np.int64, num_reqs)
    num_drafts = None
    if drafts is not None:
        num_drafts = np.fromiter((len(d) for d in drafts), np.int64, num_reqs)
        num_known = num_known + num_drafts
    sample_rows = np.nonzero(seq_lens == num_known)[0]
    return StepBatch(
        request_ids=[s.request_id for s in states], input_ids=input_ids, positions=positions,
        query_start_loc=query_start_loc, seq_lens=seq_lens, num_computed=computed,
        block_table=block_table, slot_mapping=slot_mapping, sample_rows=sample_rows,
        logits_indices=query_start_loc[1:][sample_rows] - 1, num_drafts=num_drafts)
